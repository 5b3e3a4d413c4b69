"""The one place a SparkSession is built, from :class:`shopml.config.SparkConfig`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from shopml.config import SparkConfig


def get_spark(config: SparkConfig, app_name: str = "shopml") -> SparkSession:
    """Get or create the session. Under ``spark-submit`` the master comes from the launcher.

    The settings that matter for correctness are :meth:`SparkConfig.session_conf`, shared
    with the session Feast's Spark offline store builds; ``spark_jobs.ingest.event_time``
    converts the nanosecond timestamps it reads as longs.
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    for key, value in config.session_conf().items():
        builder = builder.config(key, value)
    if not config.submitted and "SPARK_SUBMIT_OPTS" not in os.environ:
        builder = builder.master(config.master)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
