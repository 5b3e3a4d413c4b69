"""The one place a SparkSession is built, from :class:`shopml.config.SparkConfig`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from shopml.config import SparkConfig


def get_spark(config: SparkConfig, app_name: str = "shopml") -> SparkSession:
    """Get or create the session. Under ``spark-submit`` the master comes from the launcher.

    Settings that matter for correctness are pinned here: UTC everywhere (Feast and the
    model see the same instants), microsecond Parquet timestamps (INT96 is Spark-only),
    dynamic partition overwrite so a rerun replaces only the partitions it writes, and
    nanosecond Parquet timestamps (pandas' default) read as longs, which Spark 4 otherwise
    refuses (``PARQUET_TYPE_ILLEGAL``); ``spark_jobs.ingest.event_time`` converts them.
    """
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")
        .config("spark.sql.shuffle.partitions", str(config.shuffle_partitions))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", config.driver_memory)
        .config("spark.driver.bindAddress", config.local_ip)
        .config("spark.driver.host", config.local_ip)
    )
    if not config.submitted and "SPARK_SUBMIT_OPTS" not in os.environ:
        builder = builder.master(config.master)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
