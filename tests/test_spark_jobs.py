"""Spark transforms on tiny hand-made frames (pure DataFrame -> DataFrame)."""

from datetime import date, datetime

import pytest

from shopml import schema as S
from spark_jobs import clean, features, ingest

pytestmark = pytest.mark.spark


def _events(spark, rows):
    cols = [S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.TIMESTAMP, S.SESSION_ID, S.QUERY]
    return spark.createDataFrame(
        rows, schema=", ".join(f"{c} {'timestamp' if c == S.TIMESTAMP else 'string'}" for c in cols)
    )


def test_flag_events_names_each_rule(spark):
    t = datetime(2025, 3, 1, 10)
    df = _events(
        spark,
        [
            ("u1", "i1", "purchase", t, "o1", None),
            ("u1", "i1", "purchase", t, "o1", None),  # duplicate
            (None, "i1", "purchase", t, "o1", None),
            ("u2", "i2", "teleport", t, "o2", None),
            ("u2", "i2", "view", datetime(1970, 1, 1), "o2", None),
            ("u2", "i2", "view", datetime(2025, 3, 2, 0, 0, 1), "o2", None),  # after the run's day
        ],
    )
    flagged = clean.flag_events(df, "2025-03-02 00:00:00")
    reasons = sorted((r[S.REJECT_REASON] or "ok") for r in flagged.collect())
    assert reasons == sorted(
        [
            "ok",
            "duplicate",
            "null_key",
            "unknown_event_type",
            "timestamp_before_2000",
            "after_logical_date",
        ]
    )
    ok, bad = clean.split_flagged(flagged)
    assert ok.count() == 1 and bad.count() == 5 and S.REJECT_REASON not in ok.columns


def test_flag_items_negative_price_and_duplicates(spark):
    items = spark.createDataFrame(
        [
            ("a", "A", None, 1.0, None, None),
            ("a", "A2", None, 1.0, None, None),
            ("b", "B", None, -3.0, None, None),
            (None, "?", None, 2.0, None, None),
        ],
        "item_id string, title string, category string, price double, text string, image string",
    )
    reasons = {(r[S.TITLE], r[S.REJECT_REASON]) for r in clean.flag_items(items).collect()}
    assert reasons == {("A", None), ("A2", "duplicate"), ("B", "negative_price"), ("?", "null_key")}


def test_user_features_are_cumulative_and_valid_from_next_midnight(spark):
    df = _events(
        spark,
        [
            ("u1", "a", "purchase", datetime(2025, 1, 1, 9), "o1", None),
            ("u1", "b", "purchase", datetime(2025, 1, 1, 9), "o1", None),
            ("u1", "a", "purchase", datetime(2025, 1, 4, 9), "o2", None),  # a reorder
            ("u1", "c", "view", datetime(2025, 1, 4, 10), None, None),
        ],
    )
    rows = features.user_features(df).orderBy(S.FEATURE_TIMESTAMP).collect()
    assert [r[S.FEATURE_TIMESTAMP] for r in rows] == [datetime(2025, 1, 2), datetime(2025, 1, 5)]
    last = rows[-1]
    assert last[S.USER_N_EVENTS] == 4 and last[S.USER_N_PURCHASES] == 3
    assert last[S.USER_N_BASKETS] == 2 and last[S.USER_N_DISTINCT_ITEMS] == 3
    assert last[S.USER_REORDER_RATE] == pytest.approx(1 / 3)
    assert last[S.USER_AVG_BASKET_SIZE] == pytest.approx(1.5)
    assert (rows[0][S.USER_DAYS_SINCE_PRIOR], last[S.USER_DAYS_SINCE_PRIOR]) == (-1.0, 3.0)


def test_item_features_count_trailing_30_days(spark):
    df = _events(
        spark,
        [
            ("u1", "a", "purchase", datetime(2025, 1, 1), "o1", None),
            ("u2", "a", "purchase", datetime(2025, 1, 20), "o2", None),
            ("u1", "a", "purchase", datetime(2025, 3, 1), "o3", None),
        ],
    )
    rows = features.item_features(df).orderBy(S.FEATURE_TIMESTAMP).collect()
    assert [r[S.ITEM_PURCHASES_30D] for r in rows] == [1, 2, 1]
    assert [r[S.ITEM_N_USERS] for r in rows] == [1, 2, 2]
    assert rows[-1][S.ITEM_REORDER_RATE] == pytest.approx(1 / 3)


def test_instacart_timestamps_follow_order_gaps(spark):
    raw = spark.createDataFrame(
        [
            (10, 7, 1, 2, 8, None, 100, 1.0, 0.0),
            (10, 7, 1, 2, 8, None, 101, 2.0, 0.0),
            (11, 7, 2, 3, 14, 5.0, 100, 1.0, 1.0),
        ],
        "order_id int, user_id int, order_number int, order_dow int, order_hour_of_day int, "
        "days_since_prior_order double, product_id int, add_to_cart_order double, reordered double",
    )
    ev = ingest.instacart_events(raw, "2025-01-01").orderBy(S.TIMESTAMP).collect()
    assert [r[S.TIMESTAMP] for r in ev] == [
        datetime(2025, 1, 1, 8, 0, 1),
        datetime(2025, 1, 1, 8, 0, 2),
        datetime(2025, 1, 6, 14, 0, 1),
    ]
    assert {r[S.EVENT_TYPE] for r in ev} == {S.PURCHASE}
    assert [r[S.SESSION_ID] for r in ev] == ["10", "10", "11"]


def test_conform_events_reports_missing_columns(spark):
    df = spark.createDataFrame([("u", "i")], "user_id string, item_id string")
    with pytest.raises(
        ValueError, match=r"missing required column\(s\) \['event_type', 'timestamp'\]"
    ):
        ingest.conform_events(df)


def test_land_names_an_unreadable_source_file(spark, settings, tmp_path):
    """A Parquet file edited by another tool next to a stale Hadoop .crc: clear error, no data."""
    import pyarrow.parquet as pq

    from spark_jobs.jobs import SourceReadError, land

    src = tmp_path / "src"
    ts = datetime(2025, 3, 1, 10)
    _events(spark, [("u1", "i1", "purchase", ts, None, None)]).write.parquet(str(src / "events"))
    spark.createDataFrame(
        [("i1", "t", "c", 1.0)], "item_id string, title string, category string, price double"
    ).write.parquet(str(src / "items"))
    part = next((src / "events").glob("part-*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table, part, compression="gzip")  # same rows, other bytes: .crc is stale
    with pytest.raises(SourceReadError, match=r"cannot read .*part-.*\.crc"):
        land(_from(settings, src), date(2025, 3, 1), spark=spark)
    assert not list(settings.paths.raw_events.rglob("*.parquet"))  # nothing landed


def _from(settings, source):
    from shopml.config import LandConfig

    return settings.model_copy(update={"land": LandConfig(source=str(source))})


def _source(spark, root, days):
    """A canonical source directory with one purchase on each of ``days`` (of March 2025)."""
    rows = [(f"u{d}", "i1", "purchase", datetime(2025, 3, d, 10), None, None) for d in days]
    _events(spark, rows).write.mode("overwrite").parquet(str(root / "events"))
    spark.createDataFrame(
        [("i1", "t", "c", 1.0)], "item_id string, title string, category string, price double"
    ).write.mode("overwrite").parquet(str(root / "items"))
    return root


def test_land_writes_only_its_logical_dates_partition(spark, settings, tmp_path):
    from spark_jobs.jobs import land

    p = settings.paths
    land(_from(settings, _source(spark, tmp_path / "a", [1, 2, 3])), date(2025, 3, 3), spark=spark)
    land(_from(settings, _source(spark, tmp_path / "b", [1, 2, 3, 4])), date(2025, 3, 4), spark)
    first = sorted(d.name for d in p.raw_events_for("2025-03-03").glob("event_date=*"))
    assert first == ["event_date=2025-03-01", "event_date=2025-03-02", "event_date=2025-03-03"]
    # a rerun of 03-03 from a source that lost a day replaces that date's snapshot whole ...
    land(_from(settings, _source(spark, tmp_path / "c", [2, 3])), date(2025, 3, 3), spark=spark)
    rerun = sorted(d.name for d in p.raw_events_for("2025-03-03").glob("event_date=*"))
    assert rerun == ["event_date=2025-03-02", "event_date=2025-03-03"]
    # ... and leaves every other date's untouched
    assert spark.read.parquet(str(p.raw_events_for("2025-03-04"))).count() == 4
    assert spark.read.parquet(str(p.raw_items_for("2025-03-04"))).count() == 1


def test_keep_first_users_keeps_rows_without_user_for_validation(spark):
    ts = datetime(2025, 3, 1, 10)
    rows = [(u, "i1", "purchase", ts, None, None) for u in ("3", "b", "1", "2", "10", None)]
    got = ingest.keep_first_users(_events(spark, rows), 2).select(S.USER_ID).collect()
    # numeric order: "1", "2" (not "10"); the null row stays for GX to catch
    assert sorted(r[0] or "<null>" for r in got) == ["1", "2", "<null>"]
    # ids that are not numbers come after the numbers, in their own order
    got = ingest.keep_first_users(_events(spark, rows), 6).select(S.USER_ID).collect()
    assert {r[0] for r in got} == {"1", "2", "3", "10", "b", None}
    words = [(u, "i1", "purchase", ts, None, None) for u in ("zed", "amy", "bo")]
    got = ingest.keep_first_users(_events(spark, words), 2).select(S.USER_ID).collect()
    assert sorted(r[0] for r in got) == ["amy", "bo"]
