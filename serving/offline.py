"""The served two-stage path, evaluated offline on a run's holdout like every other model.

Same engine, same sources, filters and ranker as ``shopml serve``; only the inputs are made
honest for a backtest: the candidate tables come from the training purchases alone (no
held-out basket), and the user's and each candidate's features are Feast's point-in-time
values at the moment the held-out basket started (``get_historical_features``), where serving
reads the online store. The nightly ``evaluate`` task reports it as ``two_stage``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from serving.bundle import Bundle, build_index, build_tables, item_matrix
from serving.engine import TwoStage
from shopml import schema as S
from shopml.config import Settings
from training.interactions import Interactions
from training.model import TwoTower
from training.ranking import EVENT_TS

_REORDER = S.ITEM_FEATURES.index(S.ITEM_REORDER_RATE)


def offline_engine(run_dir: Path, model: TwoTower, ranker: torch.nn.Module, settings: Settings):
    """A two-stage engine over the run's training purchases only."""
    events = pd.read_parquet(run_dir / "train_events.parquet")
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]
    catalog = pd.DataFrame({S.ITEM_ID: model.item_ids})
    vectors = item_matrix(model)
    bundle = Bundle(
        "offline", model, ranker.eval(), build_index(vectors),
        build_tables(model, purchases, catalog), vectors,
    )  # fmt: skip
    return TwoStage(bundle, features=None, cfg=settings.serving)


def two_stage_scorer(
    settings: Settings,
    run_dir: Path,
    model: TwoTower,
    ranker: torch.nn.Module,
    train: Interactions,
    test_users: pd.DataFrame,
) -> Callable[[np.ndarray], np.ndarray]:
    """Index-space scores: ranked candidates get the ranker's probability, every other item
    stays below them (ordered by popularity), as a served list would never show them."""
    from training.data import point_in_time_features

    engine = offline_engine(run_dir, model, ranker, settings)
    pos = pd.Index(train.item_ids).get_indexer(model.item_ids)
    popularity = np.asarray(train.matrix.sum(axis=0)).ravel()
    floor = -1.0 + 1e-3 * popularity / max(popularity.max(), 1.0)

    def score(users: np.ndarray) -> np.ndarray:
        ids = train.user_ids[users].tolist()
        out = np.tile(floor.astype(np.float32), (len(ids), 1))
        asked = []
        for row, user in enumerate(ids):
            if user not in model.user_index or user not in test_users.index:
                continue  # unknown at training time: the popularity order above answers
            feats = test_users.loc[user, list(S.USER_FEATURES)].to_numpy(np.float32)
            query, cand, prior, _ = engine.retrieve(model.user_index[user], np.nan_to_num(feats))
            asked.append((row, user, feats, query, cand, prior))
        if not asked:
            return out
        entity = pd.concat(
            [
                pd.DataFrame(
                    {
                        S.USER_ID: user,
                        S.ITEM_ID: np.asarray(model.item_ids, dtype=object)[cand],
                        EVENT_TS: test_users.loc[user, EVENT_TS],
                    }
                )
                for _, user, _, _, cand, _ in asked
            ],
            ignore_index=True,
        )
        pit = point_in_time_features(settings, entity).drop_duplicates([S.USER_ID, S.ITEM_ID])
        pit = pit.set_index([S.USER_ID, S.ITEM_ID])
        for row, user, feats, query, cand, prior in asked:
            keys = pd.MultiIndex.from_arrays(
                [[user] * len(cand), np.asarray(model.item_ids, dtype=object)[cand]]
            )
            # Feast's file store drops rows older than any snapshot of their entity: such an
            # item had no features yet, which the ranker knows as zeros (as in training)
            items = pit.reindex(keys)[list(S.ITEM_FEATURES)].fillna(0.0).to_numpy(np.float32)
            keep = engine.servable(
                cand, prior, items[:, _REORDER] > settings.serving.reorder_min_rate
            )
            top = settings.serving.max_candidates
            cand, prior, items = cand[keep][:top], prior[keep][:top], items[keep][:top]
            if len(cand):
                out[row, pos[cand]] = engine.score(query, cand, prior, np.nan_to_num(feats), items)
        return out

    return score
