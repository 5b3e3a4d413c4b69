"""The synthetic retailer: deterministic, shaped like a retailer's log, and its defects end in
quarantine with their reasons."""

from __future__ import annotations

import pandas as pd
import pytest

from shopml import schema as S
from spark_jobs.synth import Shape, events, write

pytestmark = pytest.mark.spark

SHAPE = Shape(events=16_000, users=400, items=2_000, days=60, defect_rate=0.01, seed=7)


def _pandas(df) -> pd.DataFrame:
    return df.toPandas().sort_values([S.SESSION_ID, S.TIMESTAMP, S.ITEM_ID], kind="stable")


def test_same_seed_same_rows_however_spark_splits_the_work(spark):
    one, many = _pandas(events(spark, SHAPE, 1)), _pandas(events(spark, SHAPE, 7))
    assert len(one) == SHAPE.events
    pd.testing.assert_frame_equal(one.reset_index(drop=True), many.reset_index(drop=True))
    other = _pandas(events(spark, Shape(**{**SHAPE.__dict__, "seed": 8}), 3))
    assert not one[S.ITEM_ID].reset_index(drop=True).equals(other[S.ITEM_ID].reset_index(drop=True))


def test_popularity_funnels_and_periodic_repeat_purchases(spark):
    ev = _pandas(events(spark, Shape(**{**SHAPE.__dict__, "defect_rate": 0.0})))
    counts = ev[S.ITEM_ID].value_counts()
    assert counts.iloc[0] > 20 * counts.median()  # Zipf-like: a head and a long tail
    assert set(ev[S.EVENT_TYPE]) == {"view", "click", "cart", S.PURCHASE}
    # each item of a session is viewed first, then reaches one deeper step
    firsts = ev.groupby([S.SESSION_ID, ev.groupby(S.SESSION_ID).cumcount() // 2]).head(1)
    assert (firsts[S.EVENT_TYPE] == "view").all()
    bought = ev[ev[S.EVENT_TYPE] == S.PURCHASE]
    repeat = bought.groupby(S.USER_ID)[S.ITEM_ID].agg(lambda s: s.duplicated().mean())
    assert repeat.median() > 0.3  # regulars come back
    # every user shops on a period of whole days: the gaps between their visits are one number
    days = ev.assign(day=pd.to_datetime(ev[S.TIMESTAMP]).dt.floor("D"))
    for _, visits in days.groupby(S.USER_ID):
        gaps = visits["day"].drop_duplicates().sort_values().diff().dropna().dt.days
        assert gaps.nunique() == 1 and gaps.iloc[0] >= 2, gaps.tolist()


def test_defects_end_in_quarantine_with_their_reasons(spark, settings, tmp_path):
    from shopml.config import LandConfig
    from spark_jobs.jobs import clean, land

    counts = write(spark, SHAPE, tmp_path / "retailer")
    assert counts == {"events": SHAPE.events, "items": SHAPE.items}
    s = settings.model_copy(update={"land": LandConfig(source=str(tmp_path / "retailer"))})
    ds = SHAPE.end
    landed = land(s, ds, spark)
    cleaned = clean(s, ds, spark)
    reasons = cleaned["rejected_by_reason"]
    assert {"unknown_item"} <= set(reasons), reasons  # missing users and 2099 clocks too
    assert landed["source_rows"] == SHAPE.events
    defects = SHAPE.events * SHAPE.defect_rate
    assert 0.5 * defects < sum(reasons.values()) < 2 * defects, reasons


def test_the_duckdb_peer_computes_the_feature_jobs_rows(spark, settings, tmp_path):
    """benchmarks.spark_features times DuckDB against the Spark job: it must compute the
    same rows (a change to spark_jobs/features.py without its SQL fails here)."""
    import shutil

    from benchmarks.spark_features import DS, assert_equal, duckdb_features
    from spark_jobs.jobs import build_features

    write(spark, Shape(events=4_000, users=60, items=300, days=90, defect_rate=0.0),
          tmp_path / "retailer")  # fmt: skip
    src = settings.paths.clean_events_for(DS)
    shutil.copytree(tmp_path / "retailer" / "events", src)
    rows = build_features(settings, DS, spark)
    duckdb_features(src, tmp_path / "duck", threads=2)
    equal = assert_equal(settings.paths.features_for(DS), tmp_path / "duck")
    assert equal == {"user": rows["user_rows"], "item": rows["item_rows"]} and min(equal.values())
