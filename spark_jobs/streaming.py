"""Spark Structured Streaming over the event stream: session features and the lake archive.

Two queries read the stream (``spark_jobs.stream_source``), each with its own checkpoint
under ``SHOPML_HOME/stream/checkpoints``, so each resumes where it stopped:

* ``session_features``: each shopper's current session (items so far, length, last
  category, time of the last event), aggregated with a watermark and pushed through Feast's
  push source into the online store every micro-batch (``shopml stream``; in the chart, its
  own Deployment). Once the watermark (``events.watermark`` behind the newest event) has
  passed the end of a day, that day's sessions are closed: their state goes, and Spark drops
  their later events from the aggregation from the next micro-batch on (Spark judges
  lateness by the previous batch's watermark). Those events still reach the lake.
  Windows are computed here, in Spark, because Feast's stream aggregations run only in its
  Kafka processor.
* ``archive``: every accepted event, once, into ``lake/stream/events`` with Spark's
  exactly-once file sink; ``land`` drains it (``trigger(availableNow)``) before reading it
  beside the source, so the next night trains on them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from shopml import schema as S
from shopml.config import Settings
from shopml.stream import stream_of, stream_options
from spark_jobs.features import basket_column
from spark_jobs.session import get_spark

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

PUSH_SOURCE = "session_push"
SESSION_QUERY = "session_features"
ARCHIVE_QUERY = "archive"
_LAST_ITEM = "_last_item"


def read_events(spark: SparkSession, settings: Settings) -> DataFrame:
    """The stream as an unbounded DataFrame (``entry_id`` and the canonical event columns)."""
    from spark_jobs.stream_source import NAME, register

    register(spark)
    return spark.readStream.format(NAME).options(**stream_options(settings)).load()


def session_features(events: DataFrame, watermark: str, max_items: int) -> DataFrame:
    """One row per (user, session) with the session's features so far.

    A session is a basket (``spark_jobs.features.basket_column``: the event's session id,
    else the user's UTC day) within one UTC day. The day window puts event time in the
    grouping key, which is what lets the watermark close sessions: a day's state is dropped
    once the watermark passes its end, and an event of a closed day is dropped from the
    aggregation instead of reopening it. (Spark's ``session_window`` would cut sessions by a
    gap instead, but supports no update output mode, and the online store wants each
    change at once.)
    """
    from pyspark.sql import functions as F

    ev = events.withWatermark(S.TIMESTAMP, watermark).withColumn(S.SESSION_ID, basket_column())
    window = F.window(S.TIMESTAMP, "1 day").alias("_day")
    agg = ev.groupBy(S.USER_ID, S.SESSION_ID, window).agg(
        F.count(F.lit(1)).alias(S.SESSION_LENGTH),
        F.max(S.TIMESTAMP).alias("last_event"),
        F.max_by(S.ITEM_ID, S.TIMESTAMP).alias(_LAST_ITEM),
        F.collect_list(F.struct(S.TIMESTAMP, S.ITEM_ID)).alias("_touches"),
    )
    # distinct items, the most recent last, at most max_items
    newest_first = F.reverse(F.transform(F.array_sort("_touches"), lambda t: t[S.ITEM_ID]))
    items = F.reverse(F.slice(F.array_distinct(newest_first), 1, max_items))
    return agg.select(
        S.USER_ID,
        S.SESSION_ID,
        items.alias(S.SESSION_ITEMS),
        S.SESSION_LENGTH,
        _LAST_ITEM,
        "last_event",
    )


def latest_sessions(batch: DataFrame, items: DataFrame | None):
    """A micro-batch's changed sessions as the push source's rows (pandas): each user's
    newest session only (the online store keeps one row per user), with the category of
    its last item from the catalog.

    The catalog join is a broadcast (map-side) join and the newest session is chosen in
    pandas, on the few rows a micro-batch changes: no shuffle stage is added to every
    micro-batch, whose time is the feature's freshness."""
    from pyspark.sql import functions as F

    rows = batch
    if items is not None:
        catalog = items.select(
            F.col(S.ITEM_ID).alias(_LAST_ITEM), F.col(S.CATEGORY).alias(S.SESSION_LAST_CATEGORY)
        )
        rows = rows.join(F.broadcast(catalog), _LAST_ITEM, "left")
    else:
        rows = rows.withColumn(S.SESSION_LAST_CATEGORY, F.lit(None).cast("string"))
    out = rows.select(
        S.USER_ID,
        *(c for c in S.SESSION_FEATURES if c != S.SESSION_LAST_EVENT_MS),
        F.unix_millis("last_event").alias(S.SESSION_LAST_EVENT_MS),
        F.col("last_event").alias(S.ENTITY_TIMESTAMP),
    ).toPandas()
    out = (
        out.sort_values(
            [S.USER_ID, S.SESSION_LAST_EVENT_MS, S.SESSION_ID],
            ascending=[True, False, True],
            kind="stable",
        )  # fmt: skip
        .drop_duplicates(S.USER_ID)
        .reset_index(drop=True)
    )
    out[S.ENTITY_TIMESTAMP] = out[S.ENTITY_TIMESTAMP].dt.tz_localize("UTC")
    out[S.SESSION_ITEMS] = out[S.SESSION_ITEMS].map(list)
    return out


def latest_catalog(spark: SparkSession, settings: Settings) -> DataFrame | None:
    """The newest cleaned catalog in the lake (None before the first nightly run)."""
    root = settings.paths.clean_items
    dates = sorted(p for p in root.glob("ds=*") if p.is_dir()) if root.exists() else []
    return spark.read.parquet(str(dates[-1])) if dates else None


def start_session_features(
    settings: Settings, spark: SparkSession | None = None, *, once: bool = False
) -> StreamingQuery:
    """Start the session-features query: every ``events.trigger`` (or, ``once``, up to the
    stream's end and stop), pushing each micro-batch's changed sessions to the online store.

    The Feast store must know the push source (``feast apply`` of the nightly ``feast_sync``).
    """
    from feast.data_source import PushMode

    from shopml.feast_store import open_store

    spark = spark or get_spark(settings.spark, "shopml-stream")
    cfg = settings.events
    store = open_store(settings)
    store.get_data_source(PUSH_SOURCE)  # fails now, with Feast's message, if never applied
    items = latest_catalog(spark, settings)
    if items is not None:
        items = items.cache()

    def push(batch: DataFrame, batch_id: int) -> None:
        rows = latest_sessions(batch, items)
        if len(rows):
            # an upsert per user: replaying a batch after a restart writes the same values
            store.push(PUSH_SOURCE, rows, to=PushMode.ONLINE)

    sessions = session_features(read_events(spark, settings), cfg.watermark, cfg.session_items)
    writer = (
        sessions.writeStream.queryName(SESSION_QUERY)
        .outputMode("update")
        .option("checkpointLocation", str(settings.paths.stream_checkpoints / SESSION_QUERY))
        .foreachBatch(push)
    )
    if once:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=cfg.trigger)
    # the query plans every micro-batch in a copy of the session taken at start: the state's
    # partitions are set for it alone
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", str(cfg.state_partitions))
    try:
        return writer.start()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)


def archive(settings: Settings, spark: SparkSession | None = None) -> dict[str, int]:
    """Drain the stream into ``lake/stream/events`` (by ``event_date``) and stop.

    Spark's file sink commits each micro-batch's files in its metadata log together with the
    offsets, so an interrupted drain neither loses nor doubles an entry: the next one resumes
    after the last committed entry. A stream that never held an entry costs no query.
    """
    from pyspark.sql import functions as F

    p = settings.paths
    if stream_of(settings).last_id() is None:
        return {"archived": 0}
    spark = spark or get_spark(settings.spark, "shopml-archive")
    events = read_events(spark, settings).withColumn(
        S.EVENT_DATE, F.date_format(S.TIMESTAMP, "yyyy-MM-dd")
    )
    query = (
        events.writeStream.queryName(ARCHIVE_QUERY)
        .format("parquet")
        .option("path", str(p.streamed_events))
        .option("checkpointLocation", str(p.stream_checkpoints / ARCHIVE_QUERY))
        .partitionBy(S.EVENT_DATE)
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    return {"archived": sum(int(b.get("numInputRows", 0)) for b in query.recentProgress)}


def _instant(t: datetime):
    """``t`` as a Spark timestamp literal (the session's zone is UTC)."""
    from pyspark.sql import functions as F

    return F.to_timestamp(F.lit(t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")))


def archived(
    spark: SparkSession, settings: Settings, end: datetime, start: datetime | None = None
) -> DataFrame | None:
    """Archived events stamped in ``[start, end)`` (from the first when ``start`` is None),
    in the canonical event columns; None when nothing was ever archived.

    Read through the file sink's metadata log, so only committed micro-batches count.
    """
    from pyspark.sql import functions as F

    root = settings.paths.streamed_events
    if not (root / "_spark_metadata").exists():
        return None
    stamped = F.col(S.TIMESTAMP)
    due = stamped < _instant(end)
    if start is not None:
        due &= stamped >= _instant(start)
    return spark.read.parquet(str(root)).where(due).select(*S.EVENT_COLUMNS)


def streamed_events(spark: SparkSession, settings: Settings, ds) -> DataFrame | None:
    """Archived events stamped before the end of ``ds`` (the others are not yet due: a later
    date's ``land`` takes them). None when there are none."""
    from shopml.paths import end_of_day

    return archived(spark, settings, end_of_day(ds))


def streamed_between(
    settings: Settings, start: datetime, end: datetime, out: Path,
    spark: SparkSession | None = None,
) -> int:  # fmt: skip
    """Drain the stream into the lake (:func:`archive`), then write the archived events
    stamped in ``[start, end)`` to the Parquet directory ``out`` (canonical columns; none
    written when the stream never held an event); returns their count.

    The intraday update reads its events this way: from the exactly-once archive ``land``
    reads, so the hourly and the nightly paths see one set of events.
    """
    archive(settings, spark)
    if not (settings.paths.streamed_events / "_spark_metadata").exists():
        return 0
    spark = spark or get_spark(settings.spark, "shopml-intraday")
    events = archived(spark, settings, end, start)
    events.coalesce(1).write.mode("overwrite").parquet(str(out))
    return spark.read.parquet(str(out)).count()
