"""Feast repo: definitions agree with the schema, and the training join is point-in-time."""

from __future__ import annotations

import runpy
from datetime import date

import pandas as pd
import pytest

from shopml import feast_store
from shopml import schema as S

DEFS = feast_store.FEATURE_REPO / "definitions.py"


@pytest.fixture(params=["file", "spark"])
def store_settings(request, settings):
    """The same checks on both offline stores: Feast's file (Dask) store and its Spark store
    (the production default, needed at scale). The Spark store uses the suite's session."""
    if request.param == "spark":
        request.getfixturevalue("spark")
    feast = settings.feast.model_copy(update={"offline_store": request.param})
    return settings.model_copy(update={"feast": feast})


def test_feature_views_use_the_canonical_column_names():
    defs = runpy.run_path(str(DEFS))
    user_fields = [f.name for f in defs["user_features"].schema]
    item_fields = [f.name for f in defs["item_features"].schema]
    assert sorted(user_fields) == sorted(S.USER_FEATURES)
    assert sorted(item_fields) == sorted(S.ITEM_FEATURES)
    assert defs["user"].join_key == S.USER_ID and defs["item"].join_key == S.ITEM_ID
    assert defs["user_source"].timestamp_field == S.FEATURE_TIMESTAMP
    session_fields = [f.name for f in defs["session_features"].schema]
    assert sorted(session_fields) == sorted(S.SESSION_FEATURES)
    assert defs["session_push"].batch_source.timestamp_field == S.ENTITY_TIMESTAMP


@pytest.mark.integration
def test_historical_features_pick_the_latest_snapshot_not_after_each_row(store_settings):
    settings = store_settings
    ds = date(2025, 1, 31)
    root = settings.paths.features / f"ds={ds.isoformat()}"
    snaps = pd.DataFrame(
        {
            S.USER_ID: ["a", "a", "a", "b"],
            S.FEATURE_TIMESTAMP: pd.to_datetime(
                ["2025-01-02", "2025-01-05", "2025-01-09", "2025-01-03"], utc=True
            ),
            **{f: [1.0, 2.0, 3.0, 7.0] for f in S.USER_FEATURES},
        }
    )
    for f in S.USER_FEATURES[:4]:
        snaps[f] = snaps[f].astype("int64")
    items = pd.DataFrame(
        {
            S.ITEM_ID: ["x"],
            S.FEATURE_TIMESTAMP: pd.to_datetime(["2025-01-01"], utc=True),
            **{f: [1] for f in S.ITEM_FEATURES},
        }
    )
    items[S.ITEM_REORDER_RATE] = items[S.ITEM_REORDER_RATE].astype("float32")
    (root / "user").mkdir(parents=True)
    (root / "item").mkdir(parents=True)
    # Microsecond timestamps, as the Spark feature job writes them (the lake's Spark session
    # reads pandas' default nanoseconds as longs).
    snaps.to_parquet(root / "user" / "part-0.parquet", index=False, coerce_timestamps="us")
    items.to_parquet(root / "item" / "part-0.parquet", index=False, coerce_timestamps="us")
    feast_store.apply(settings, ds)

    entity = pd.DataFrame(
        {
            S.USER_ID: ["a", "a", "a", "a", "b", "c"],
            S.ITEM_ID: ["x"] * 6,
            "event_timestamp": pd.to_datetime(
                [
                    "2025-01-01",
                    "2025-01-04 12:00",
                    "2025-01-05",
                    "2025-01-20",
                    "2025-01-03",
                    "2025-01-10",
                ],
                utc=True,
                format="ISO8601",
            ),
        }
    )
    from shopml.feast_store import point_in_time_features

    got = point_in_time_features(settings, entity)

    def oracle(user: str, ts: pd.Timestamp) -> float:
        rows = snaps[(snaps[S.USER_ID] == user) & (snaps[S.FEATURE_TIMESTAMP] <= ts)]
        return (
            float(rows.sort_values(S.FEATURE_TIMESTAMP).iloc[-1][S.USER_N_EVENTS])
            if len(rows)
            else 0.0
        )

    got = got.sort_values([S.USER_ID, "event_timestamp"]).reset_index(drop=True)
    expected = [oracle(u, t) for u, t in zip(got[S.USER_ID], got["event_timestamp"], strict=True)]
    # Every returned row carries the latest snapshot not after its timestamp (never a later one).
    assert got[S.USER_N_EVENTS].tolist() == expected
    assert expected[-4:] == [2.0, 3.0, 7.0, 0.0]
    # every row comes back: a@2025-01-01, earlier than any snapshot of a (Feast 0.67's file
    # store drops it from its answer), with zeros
    assert len(got) == len(entity)


@pytest.mark.integration
def test_rows_sharing_a_user_and_an_instant_all_get_their_features(store_settings, monkeypatch):
    """A user's candidates at one moment: every (user, item) row comes back, in order, with
    its own item's point-in-time features (Feast's file store alone would keep one)."""
    from shopml.feast_store import point_in_time_features

    settings = store_settings
    ds = date(2025, 1, 31)
    root = settings.paths.features / f"ds={ds.isoformat()}"
    users = pd.DataFrame(
        {
            S.USER_ID: ["a", "b"],
            S.FEATURE_TIMESTAMP: pd.to_datetime(["2025-01-02", "2025-01-03"], utc=True),
            **{f: [4, 5] for f in S.USER_FEATURES},
        }
    )
    purchases = {"x": 10, "y": 20, "z": 30}
    items = pd.DataFrame(
        {
            S.ITEM_ID: list(purchases),
            S.FEATURE_TIMESTAMP: pd.to_datetime(["2025-01-01"] * 3, utc=True),
            **{f: list(purchases.values()) for f in S.ITEM_FEATURES},
        }
    )
    for frame in (users, items):
        for f in (S.USER_REORDER_RATE, S.USER_AVG_BASKET_SIZE, S.USER_DAYS_SINCE_PRIOR,
                  S.ITEM_REORDER_RATE):  # fmt: skip
            if f in frame:
                frame[f] = frame[f].astype("float32")
    (root / "user").mkdir(parents=True)
    (root / "item").mkdir(parents=True)
    users.to_parquet(root / "user" / "part-0.parquet", index=False, coerce_timestamps="us")
    items.to_parquet(root / "item" / "part-0.parquet", index=False, coerce_timestamps="us")
    feast_store.apply(settings, ds)

    at = pd.Timestamp("2025-01-12 08:00", tz="UTC")
    entity = pd.DataFrame(
        {S.USER_ID: ["a", "a", "a", "b"], S.ITEM_ID: ["x", "y", "z", "x"], "event_timestamp": at}
    )
    got = point_in_time_features(settings, entity)
    assert got[[S.USER_ID, S.ITEM_ID]].values.tolist() == entity.iloc[:, :2].values.tolist()
    assert (got["event_timestamp"] == at).all()
    assert got[S.ITEM_N_PURCHASES].tolist() == [10, 20, 30, 10]
    assert got[S.USER_N_EVENTS].tolist() == [4, 4, 4, 5]
    # Feast asked a row at a time (feast.historical_chunk_rows): the very same answer
    from feast import FeatureStore

    asked = []
    real = FeatureStore.get_historical_features

    def counted(self, entity_df, **kw):
        asked.append(len(entity_df))
        return real(self, entity_df=entity_df, **kw)

    monkeypatch.setattr(FeatureStore, "get_historical_features", counted)
    one = settings.feast.model_copy(update={"historical_chunk_rows": 1})
    chunked = point_in_time_features(settings.model_copy(update={"feast": one}), entity)
    pd.testing.assert_frame_equal(chunked, got)
    assert asked == [1] * 5  # the user view's 2 distinct (user, instant), the item view's 3
