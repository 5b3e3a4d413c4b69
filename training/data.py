"""The training and evaluation data of one run, built from the cleaned lake and Feast.

Protocol (stated in every evaluation table): each user's last basket is held out; users
with a single basket only train. Items a user already bought stay rankable in the holdout
(repeats allowed): most of a grocery basket is reorders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from shopml import schema as S
from shopml.config import Settings

BASKET = "basket_id"
PROTOCOL = "temporal leave-last-basket-out per user; full catalog ranking; repeats allowed"


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame  # events before each user's last basket (and all of single-basket users)
    test: pd.DataFrame  # one row per (user, item) of the held-out last basket
    test_time: pd.Series  # user_id -> start of the held-out basket


def load_clean(settings: Settings, ds: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    p = settings.paths
    events = pd.read_parquet(p.clean_events / f"ds={ds.isoformat()}")
    items = pd.read_parquet(p.clean_items / f"ds={ds.isoformat()}")
    events[S.TIMESTAMP] = pd.to_datetime(events[S.TIMESTAMP], utc=True)
    return events, items


def with_basket(events: pd.DataFrame) -> pd.DataFrame:
    """Basket = session when present, else the user's day (same rule as spark_jobs.features)."""
    day = events[S.TIMESTAMP].dt.strftime("%Y-%m-%d")
    basket = events[S.SESSION_ID].fillna(events[S.USER_ID] + "#" + day)
    return events.assign(**{BASKET: basket})


def split_last_basket(events: pd.DataFrame) -> Split:
    """Hold out each user's last basket of purchases (deterministic: by time, then basket id)."""
    ev = with_basket(events)
    purchases = ev[ev[S.EVENT_TYPE] == S.PURCHASE]
    starts = purchases.groupby([S.USER_ID, BASKET], as_index=False)[S.TIMESTAMP].min()
    starts = starts.sort_values([S.USER_ID, S.TIMESTAMP, BASKET])
    n_baskets = starts.groupby(S.USER_ID)[BASKET].transform("size")
    last = starts[n_baskets >= 2].groupby(S.USER_ID).tail(1)
    test_time = last.set_index(S.USER_ID)[S.TIMESTAMP]
    held = ev.merge(last[[S.USER_ID, BASKET]], on=[S.USER_ID, BASKET], how="left", indicator=True)
    is_test = (held["_merge"] == "both").to_numpy()
    # Events after the held-out basket started (e.g. views) are future for that user.
    after = ev[S.USER_ID].map(test_time).notna() & (ev[S.TIMESTAMP] >= ev[S.USER_ID].map(test_time))
    train = ev[~is_test & ~after.to_numpy()]
    test = ev[is_test & (ev[S.EVENT_TYPE] == S.PURCHASE).to_numpy()][[S.USER_ID, S.ITEM_ID]]
    return Split(train=train, test=test.drop_duplicates(), test_time=test_time)


def point_in_time_features(settings: Settings, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Feast ``get_historical_features`` with the training feature service.

    ``entity_df`` needs ``user_id``, ``item_id`` and ``event_timestamp``; each row gets the
    latest feature snapshot valid at its timestamp (never a later one). The rows Feast returns
    come back in ``entity_df``'s order, with its timestamps (its file store can still drop an
    entity row older than any snapshot of its entity: see tests/test_feast.py).

    Feast 0.67's file offline store keeps one row per (user_id, event_timestamp) when it joins
    the user view (it de-duplicates on the join keys seen so far), so rows that share a user
    and an instant (a user's candidates at one moment, negatives beside their positive) would
    collapse into one. Such rows are nudged apart by microseconds for the join, far below the
    daily snapshot grain, and get their own timestamps back.
    """
    from shopml.feast_store import open_store

    ts = "event_timestamp"
    entity = entity_df.reset_index(drop=True).assign(_row=np.arange(len(entity_df)))
    nudge = entity.groupby([S.USER_ID, ts]).cumcount().to_numpy()
    entity[ts] = pd.to_datetime(entity[ts], utc=True) + pd.to_timedelta(nudge, unit="us")
    store = open_store(settings)
    service = store.get_feature_service("recommender_training")
    out = store.get_historical_features(entity_df=entity, features=service).to_df()
    out = out.sort_values("_row").reset_index(drop=True)
    out[ts] = entity_df[ts].reset_index(drop=True).iloc[out["_row"]].reset_index(drop=True)
    out = out.drop(columns="_row")
    for f in (*S.USER_FEATURES, *S.ITEM_FEATURES):
        out[f] = out[f].astype("float32").fillna(0.0)  # no snapshot yet: a brand-new entity
    return out


def build_training_set(settings: Settings, ds: date) -> dict[str, int]:
    """Write ``train.parquet`` (examples with point-in-time features), ``test.parquet`` and
    ``vocab.json`` into the run directory."""
    events, items = load_clean(settings, ds)
    split = split_last_basket(events)
    train_purchases = split.train[split.train[S.EVENT_TYPE] == S.PURCHASE]
    if train_purchases.empty:
        raise ValueError(f"no purchases to train on up to {ds}: check the source and the date")
    entity = train_purchases[[S.USER_ID, S.ITEM_ID]].assign(
        event_timestamp=train_purchases[S.TIMESTAMP].to_numpy()
    )
    examples = point_in_time_features(settings, entity)
    test_entity = split.test_time.rename("event_timestamp").reset_index()
    test_entity[S.ITEM_ID] = ""  # user features only; the item view returns nothing for ""
    test_users = point_in_time_features(settings, test_entity)

    popularity = train_purchases[S.ITEM_ID].value_counts()
    item_ids = sorted(items[S.ITEM_ID].astype(str).unique())
    user_ids = sorted(split.train[S.USER_ID].unique())
    run = settings.paths.run(ds)
    run.mkdir(parents=True, exist_ok=True)
    examples.to_parquet(run / "train.parquet", index=False)
    split.train.to_parquet(run / "train_events.parquet", index=False)
    split.test.to_parquet(run / "test.parquet", index=False)
    test_users.drop(columns=[S.ITEM_ID, *S.ITEM_FEATURES]).to_parquet(
        run / "test_users.parquet", index=False
    )
    vocab = {"users": user_ids, "items": item_ids, "popular": popularity.index[:1000].tolist()}
    (run / "vocab.json").write_text(json.dumps(vocab))
    return {"train_examples": len(examples), "test_users": len(test_users), "items": len(item_ids)}


def read_vocab(run_dir: Path) -> dict[str, list[str]]:
    return json.loads((run_dir / "vocab.json").read_text())
