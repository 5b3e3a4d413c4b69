"""The training and evaluation data of one run, built from the cleaned lake and Feast.

Protocol (stated in every evaluation table): each user's last basket is held out; users
with a single basket only train. Items a user already bought stay rankable in the holdout
(repeats allowed): most of a grocery basket is reorders.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pandas as pd

from mlkit.shards import ROW_GROUP
from mlkit.splits import split_last_basket
from shopml import schema as S
from shopml.config import Settings
from shopml.feast_store import point_in_time_features

PROTOCOL = "temporal leave-last-basket-out per user; full catalog ranking; repeats allowed"


def load_clean(settings: Settings, ds: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    p = settings.paths
    events = pd.read_parquet(p.clean_events_for(ds))
    items = pd.read_parquet(p.clean_items_for(ds))
    events[S.TIMESTAMP] = pd.to_datetime(events[S.TIMESTAMP], utc=True)
    return events, items


def build_training_set(settings: Settings, ds: date) -> dict[str, int]:
    """Write ``train.parquet`` (examples with point-in-time features), ``test.parquet`` and
    ``vocab.json`` into the run directory."""
    events, items = load_clean(settings, ds)
    split = split_last_basket(events)
    train_purchases = split.train[split.train[S.EVENT_TYPE] == S.PURCHASE]
    if train_purchases.empty:
        raise ValueError(f"no purchases to train on up to {ds}: check the source and the date")
    entity = train_purchases[[S.USER_ID, S.ITEM_ID]].assign(
        **{S.ENTITY_TIMESTAMP: train_purchases[S.TIMESTAMP].to_numpy()}
    )
    examples = point_in_time_features(settings, entity)
    test_entity = split.test_time.rename(S.ENTITY_TIMESTAMP).reset_index()
    test_entity[S.ITEM_ID] = ""  # user features only; the item view returns nothing for ""
    test_users = point_in_time_features(settings, test_entity)

    popularity = train_purchases[S.ITEM_ID].value_counts()
    item_ids = sorted(items[S.ITEM_ID].astype(str).unique())
    user_ids = sorted(split.train[S.USER_ID].unique())
    run = settings.paths.run(ds)
    run.mkdir(parents=True, exist_ok=True)
    # in row groups: each Horovod rank reads its own (mlkit.shards)
    examples.to_parquet(run / "train.parquet", index=False, row_group_size=ROW_GROUP)
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
