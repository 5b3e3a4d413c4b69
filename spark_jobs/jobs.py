"""Entry points of the Spark stage: each reads and writes one logical date's partitions.

Run in-process (``shopml spark clean --ds 2026-01-01``) or on a cluster with
``spark-submit spark_jobs/jobs.py clean --ds 2026-01-01`` (same code, master from the launcher).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from typing import TYPE_CHECKING

from shopml import schema as S
from shopml.config import Settings
from shopml.paths import end_of_day
from spark_jobs import clean as C
from spark_jobs import features as F
from spark_jobs import ingest, streaming
from spark_jobs.session import get_spark

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@contextmanager
def _readable_source(source: str) -> Iterator[None]:
    """Turn Spark's unreadable-file failure into an error that names the file and a fix."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        yield
    except (PySparkException, Py4JJavaError) as err:
        if "FAILED_READ_FILE" not in str(err):
            raise
        found = re.search(r"reading file (\S+?)\.?\s", str(err))
        where = found.group(1) if found else source
        raise SourceReadError(
            f"cannot read {where} from source '{source}': the file is not valid Parquet, or a "
            "stale Hadoop '.crc' side file next to it no longer matches (delete the .crc files "
            "after editing Parquet by other tools). Nothing was landed; fix or remove the file "
            "and rerun."
        ) from err


class SourceReadError(RuntimeError):
    """A source file cannot be read at all (before any data validation can look at it)."""


class ConservationError(RuntimeError):
    """Rows went missing between two stages: every row must be kept or quarantined."""


def _conserve(stage: str, counts: dict[str, int], total: str, parts: tuple[str, ...]) -> None:
    if counts[total] != sum(counts[p] for p in parts):
        raise ConservationError(
            f"{stage}: {counts[total]} {total} != "
            + " + ".join(f"{counts[p]} {p}" for p in parts)
            + "; rows were lost without a reason. Nothing downstream should run on this date."
        )


_STREAMED = "_streamed"  # a land helper column: the row came from the event stream


def land(settings: Settings, ds: date, spark: SparkSession | None = None) -> dict[str, int]:
    """Copy the source as it stands on ``ds`` into that date's raw partition, user ids
    pseudonymized.

    Events go to ``lake/raw/events/ds=<ds>/`` (by ``event_date`` inside), the catalog to
    ``lake/raw/items/ds=<ds>/``. The whole ``ds`` partition is replaced (a rerun leaves no
    stale ``event_date`` behind) and no other date's is touched, so a rerun or a backfill of
    one date is idempotent and independent. Source and slice come from ``settings.land``.

    Every user id is replaced by its keyed hash (``shopml.privacy``) before anything is
    written, and the events of users who asked to be forgotten are dropped (counted as
    ``forgotten``, never written anywhere). Raw user ids are judged here, while they can
    still be read: too long or with control characters, their rows go with those whose
    timestamp does not parse to ``lake/quarantine/ds=<ds>/landed_rows`` with the reason.
    The counts must add up (``source_rows = landed + quarantined + forgotten``).

    Events accepted by ``POST /events`` are an input beside the source: the stream is
    drained into ``lake/stream/events`` (exactly once, ``spark_jobs.streaming.archive``) and
    those stamped before the end of ``ds`` land with the source's (``streamed`` counts them;
    they were judged on arrival and carry pseudonyms already). The archive only grows, so a
    rerun lands the same rows, and an event can reach the lake by no other path.
    """
    from pyspark.sql import functions as fn

    from shopml import privacy

    spark = spark or get_spark(settings.spark, "shopml-land")
    p, cfg = settings.paths, settings.land
    key = privacy.load_key(settings)
    gone = sorted(privacy.forgotten(settings))
    # Reading can fail at schema inference (a footer) or later at the write: both named.
    with _readable_source(cfg.source):
        events, items = ingest.read_source(
            spark, cfg.source, settings.anchor_date, cfg.timestamp_unit
        )
        if cfg.max_users:
            events = ingest.keep_first_users(events, cfg.max_users)
        unparsed = fn.col(ingest.RAW_TIMESTAMP).isNotNull()
        reason = C.first_failing([("unparsable_timestamp", unparsed), *C.bad_ids(S.USER_ID)])
        events = (
            events.withColumn(S.REJECT_REASON, reason)
            .withColumn(S.USER_ID, ingest.pseudonymize(S.USER_ID, key))
            .withColumn(_STREAMED, fn.lit(False))
        )
        # Accepted real-time events (POST /events) beside the source: drained from the
        # stream into the lake first, so a rerun of this date reads the same rows
        # (spark_jobs.streaming). Their user ids are pseudonyms already.
        streaming.archive(settings, spark)
        streamed = streaming.streamed_events(spark, settings, ds)
        if streamed is not None:
            none = fn.lit(None).cast("string")
            streamed = streamed.select(
                *S.EVENT_COLUMNS,
                none.alias(ingest.RAW_TIMESTAMP),
                none.alias(S.REJECT_REASON),
                fn.lit(True).alias(_STREAMED),
            )
            events = events.unionByName(streamed)
        events = ingest.with_event_date(events).cache()
        forgotten = spark.createDataFrame([(u,) for u in gone], f"{S.USER_ID} string")
        kept = events.join(forgotten, S.USER_ID, "left_anti")
        (
            kept.where(fn.col(S.REJECT_REASON).isNull())
            .drop(ingest.RAW_TIMESTAMP, S.REJECT_REASON, _STREAMED)
            .write.mode("overwrite")
            .option("partitionOverwriteMode", "static")  # replace the whole ds snapshot
            .partitionBy(S.EVENT_DATE)
            .parquet(str(p.raw_events_for(ds)))
        )
        (
            kept.where(fn.col(S.REJECT_REASON).isNotNull())
            .drop(S.EVENT_DATE, _STREAMED)
            .write.mode("overwrite")
            .parquet(str(p.quarantine_for(ds) / "landed_rows"))
        )
        items.write.mode("overwrite").parquet(str(p.raw_items_for(ds)))
    counts = {
        "source_rows": events.count(),
        "streamed": events.where(_STREAMED).count(),
        "landed": spark.read.parquet(str(p.raw_events_for(ds))).count(),
        "quarantined": spark.read.parquet(str(p.quarantine_for(ds) / "landed_rows")).count(),
        "forgotten": events.join(forgotten, S.USER_ID, "left_semi").count(),
        "items": spark.read.parquet(str(p.raw_items_for(ds))).count(),
    }
    events.unpersist()
    _conserve("land", counts, "source_rows", ("landed", "quarantined", "forgotten"))
    return {"events": counts["landed"], **counts}


def clean(settings: Settings, ds: date, spark: SparkSession | None = None) -> dict[str, object]:
    """Clean the date's raw events and the catalog; every rejected row goes to quarantine
    with its reason (events after the logical date too: they are not lost, only not yet due),
    and the counts must add up (``landed = kept + quarantined``)."""
    from pyspark.sql import functions as fn

    spark = spark or get_spark(settings.spark, "shopml-clean")
    p = settings.paths
    raw = spark.read.parquet(str(p.raw_events_for(ds)))
    upper = end_of_day(ds).strftime("%Y-%m-%d %H:%M:%S")
    events_ok, events_bad = C.split_flagged(C.flag_events(raw.drop(S.EVENT_DATE), upper))
    items_ok, items_bad = C.split_flagged(
        C.flag_items(spark.read.parquet(str(p.raw_items_for(ds))))
    )
    # Events about items missing from the catalog cannot be served: quarantine them too.
    unknown = events_ok.join(items_ok.select(S.ITEM_ID), S.ITEM_ID, "left_anti").withColumn(
        S.REJECT_REASON, fn.lit("unknown_item")
    )
    events_ok = events_ok.join(items_ok.select(S.ITEM_ID), S.ITEM_ID, "left_semi")

    events_ok.write.mode("overwrite").parquet(str(p.clean_events_for(ds)))
    items_ok.write.mode("overwrite").parquet(str(p.clean_items_for(ds)))
    q = p.quarantine_for(ds)
    events_bad.unionByName(unknown).write.mode("overwrite").parquet(str(q / "event_rows"))
    items_bad.write.mode("overwrite").parquet(str(q / "item_rows"))

    kept = spark.read.parquet(str(p.clean_events_for(ds))).count()
    rejected = spark.read.parquet(str(q / "event_rows"))
    items_rejected = spark.read.parquet(str(q / "item_rows"))
    counts = {
        "landed": raw.count(),
        "kept": kept,
        "quarantined": rejected.count(),
        "items_landed": spark.read.parquet(str(p.raw_items_for(ds))).count(),
        "items_kept": spark.read.parquet(str(p.clean_items_for(ds))).count(),
        "items_quarantined": items_rejected.count(),
    }
    both = rejected.select(S.REJECT_REASON).unionByName(items_rejected.select(S.REJECT_REASON))
    report: dict[str, object] = {
        "ds": ds.isoformat(),
        "events_kept": kept,
        "items_kept": counts["items_kept"],
        "counts": counts,
        "rejected_by_reason": {
            r[S.REJECT_REASON]: r["count"] for r in both.groupBy(S.REJECT_REASON).count().collect()
        },
    }
    run_dir = p.run(ds)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "clean_report.json").write_text(json.dumps(report, indent=2))
    _conserve("clean (events)", counts, "landed", ("kept", "quarantined"))
    _conserve("clean (items)", counts, "items_landed", ("items_kept", "items_quarantined"))
    return report


def build_features(
    settings: Settings, ds: date, spark: SparkSession | None = None
) -> dict[str, int]:
    """User and item daily feature snapshots from the cleaned events of ``ds``."""
    spark = spark or get_spark(settings.spark, "shopml-features")
    p = settings.paths
    events = spark.read.parquet(str(p.clean_events_for(ds)))
    # flagged once, kept for both tables: the flags' window is the job's costliest step
    flagged = F.with_basket_and_flags(events).select(*F.FLAGGED_COLUMNS).cache()
    out = p.features_for(ds)
    F.user_features(flagged, flagged=True).write.mode("overwrite").parquet(str(out / "user"))
    F.item_features(flagged, flagged=True).write.mode("overwrite").parquet(str(out / "item"))
    flagged.unpersist()
    return {
        "user_rows": spark.read.parquet(str(out / "user")).count(),
        "item_rows": spark.read.parquet(str(out / "item")).count(),
    }


def main(argv: list[str] | None = None) -> None:
    """``spark-submit spark_jobs/jobs.py {land,clean,features} --ds YYYY-MM-DD [--source S]``.

    Under spark-submit the launcher sets the master, so the session must not (``submitted``).
    """
    import argparse

    from shopml.config import LandConfig, load_settings

    parser = argparse.ArgumentParser(prog="spark_jobs.jobs")
    parser.add_argument("job", choices=["land", "clean", "features"])
    parser.add_argument("--ds", type=date.fromisoformat, required=True)
    parser.add_argument("--source", default=ingest.INSTACART)
    parser.add_argument(  # "" (an empty Airflow template) means all users
        "--max-users", type=lambda v: int(v) if v else None, default=None
    )
    args = parser.parse_args(argv)
    settings = load_settings(land=LandConfig(source=args.source, max_users=args.max_users))
    settings = settings.model_copy(
        update={"spark": settings.spark.model_copy(update={"submitted": True})}
    )
    if args.job == "land":
        print(land(settings, args.ds))
    elif args.job == "clean":
        print(clean(settings, args.ds))
    else:
        print(build_features(settings, args.ds))


if __name__ == "__main__":
    main()
