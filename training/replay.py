"""The served two-stage path, replayed offline: to train its ranker and to evaluate it.

Same engine, sources, filters and ranker inputs as ``shopml serve``; only the inputs are made
honest for a backtest: the candidate tables come from purchases before the moment replayed,
and the user's and each candidate's features are Feast's point-in-time values at that moment
(``get_historical_features``), where serving reads the online store.

* Training (``training.ranking``): inside the run's training part, each user's last basket is
  held out again; the candidates retrieved just before it, labelled by that basket, are the
  ranker's examples. The ranker so learns on exactly the lists it will rank.
* Evaluation: the run's held-out baskets; the nightly ``evaluate`` task reports it as
  ``two_stage``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from mlkit.interactions import Interactions
from served_model.bundle import Bundle, build_index, build_tables, item_matrix
from served_model.engine import TwoStage
from served_model.ranker import HISTORY_FEATURES
from served_model.two_tower import TwoTower
from shopml import schema as S
from shopml.config import Settings

CAND = "candidate_index"


def offline_engine(
    purchases: pd.DataFrame, model: TwoTower, ranker: torch.nn.Module | None, settings: Settings
) -> TwoStage:
    """A two-stage engine whose tables know only ``purchases``."""
    catalog = pd.DataFrame({S.ITEM_ID: model.item_ids})
    vectors = item_matrix(model)
    tables = build_tables(model, purchases, catalog)
    bundle = Bundle("offline", model, ranker, build_index(vectors), tables, vectors)
    return TwoStage(bundle, features=None, cfg=settings.serving)


def candidate_rows(
    settings: Settings, engine: TwoStage, at: pd.Series, user_features: pd.DataFrame
) -> pd.DataFrame:
    """One row per (user, servable candidate) at the moment ``at[user]``: user_id, item_id,
    the candidate's item index, its history features and the point-in-time user and item
    features. ``user_features`` (indexed by user) feeds retrieval's user vector."""
    from shopml.feast_store import point_in_time_features

    model, item_ids = engine.model, np.asarray(engine.model.item_ids, dtype=object)
    frames = []
    for user, ts in at.items():
        if user not in model.user_index or user not in user_features.index:
            continue  # unknown to the model: serving answers with popularity
        feats = np.nan_to_num(user_features.loc[user, list(S.USER_FEATURES)].to_numpy(np.float32))
        _, cand, history, _ = engine.retrieve(model.user_index[user], feats)
        frame = pd.DataFrame(history, columns=list(HISTORY_FEATURES))
        frames.append(frame.assign(**{S.USER_ID: user, S.ITEM_ID: item_ids[cand], CAND: cand,
                                      S.ENTITY_TIMESTAMP: ts}))  # fmt: skip
    if not frames:
        return pd.DataFrame(
            columns=[S.USER_ID, S.ITEM_ID, CAND, S.ENTITY_TIMESTAMP, *HISTORY_FEATURES]
        )
    rows = pd.concat(frames, ignore_index=True)
    rows = point_in_time_features(settings, rows)  # same order, user and item features added
    reorderable = rows[S.ITEM_REORDER_RATE].to_numpy() > settings.serving.reorder_min_rate
    keep = engine.servable(
        rows[CAND].to_numpy(), rows[list(HISTORY_FEATURES)].to_numpy(), reorderable
    )
    rows = rows[keep]
    return rows.groupby(S.USER_ID, sort=False).head(settings.serving.max_candidates)


def two_stage_scorer(
    settings: Settings,
    purchases: pd.DataFrame,
    model: TwoTower,
    ranker: torch.nn.Module,
    train: Interactions,
    test_users: pd.DataFrame,
) -> Callable[[np.ndarray], np.ndarray]:
    """Index-space scores for ``mlkit.metrics``: ranked candidates get the ranker's
    probability; every other item stays below them (ordered by popularity), as a served list
    would never show it. ``test_users`` holds each user's held-out moment (event_timestamp)
    and features then."""
    engine = offline_engine(purchases, model, ranker.eval(), settings)
    pos = pd.Index(train.item_ids).get_indexer(model.item_ids)
    popularity = np.asarray(train.matrix.sum(axis=0)).ravel()
    floor = (-1.0 + 1e-3 * popularity / max(popularity.max(), 1.0)).astype(np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        ids = train.user_ids[users].tolist()
        out = np.tile(floor, (len(ids), 1))
        at = test_users[S.ENTITY_TIMESTAMP].reindex(ids).dropna()
        rows = candidate_rows(settings, engine, at, test_users)
        rows = rows[pos[rows[CAND].to_numpy()] >= 0]  # an older model's items the run lacks
        if rows.empty:
            return out
        scores = engine.score(
            rows[CAND].to_numpy(),
            rows[list(HISTORY_FEATURES)].to_numpy(np.float32),
            rows[list(S.USER_FEATURES)].to_numpy(np.float32),
            rows[list(S.ITEM_FEATURES)].to_numpy(np.float32),
        )
        row_of = {u: i for i, u in enumerate(ids)}
        out[rows[S.USER_ID].map(row_of).to_numpy(), pos[rows[CAND].to_numpy()]] = scores
        return out

    return score
