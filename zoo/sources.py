"""The zoo's strongest scorers as the served path's candidate sources and ranker features.

On repeat-purchase data the best single models are neighbourhood and linear ones (TIFU-style
``user_knn``, ``ease``). Serving cannot run them per request (a user-kNN neighbourhood or a
dense item×item matrix is not a request-time computation), so each is fitted nightly on the
purchases the tables know and kept as a sparse table: every user's top ``top_n`` items with
their scores (``served_model.bundle.Tables.scores``). The engine takes each table's best
items as a candidate source and reads the score of every candidate as a ranker feature
(``served_model.ranker.ZOO_SOURCES``). A dense EASE matrix is never stored: at 100k items it
would be 40 GB, while ``top_n`` entries per user are what serving reads.

The tables are built on exactly the purchases the engine's other tables are built on, so
the replay (``mlkit.two_stage.replayed_rows``) fits them on the part before each replayed
basket: no row's score has seen the basket that labels it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from mlkit.interactions import from_events
from mlkit.two_stage import SourceFit
from served_model.ranker import ZOO_SOURCES
from shopml import schema as S
from zoo.base import build

TOP_N = 100  # items kept per user and scorer: above every default quota (ServingConfig)
_BLOCK = 50_000_000  # users per batch x n_items: bounds a batch's sparse and dense work


def zoo_scores(
    user_index: Mapping[str, int],
    item_ids: list[str],
    purchases: pd.DataFrame,
    configs: Mapping[str, Mapping[str, Any]],
    top_n: int = TOP_N,
    users: Collection[str] | None = None,
) -> dict[str, sparse.csr_matrix]:
    """Fit each zoo scorer in ``configs`` (names of ``ZOO_SOURCES``, each with its config)
    on ``purchases`` and keep every user's top ``top_n`` items, in the served model's index
    space: rows by ``user_index`` (the two-tower's, 0 = unknown), columns by ``item_ids``.

    ``users``: score only these users (the others' rows stay empty): a replay or an
    evaluation asks for a sample. Every user (``promote``'s serving tables) costs linear
    time: each user's top items come from the model's sparse scores (``Base.top_n``), never
    a dense row over the catalog (10^5 users x 5 x 10^4 items at 10^7 events), and user-kNN
    searches its neighbours among a bounded pool (``UserKNN.neighbour_pool``)."""
    unknown = sorted(set(configs) - set(ZOO_SOURCES))
    if unknown:
        raise ValueError(f"unknown zoo sources {unknown}; choose from {sorted(ZOO_SOURCES)}")
    shape = (max(user_index.values(), default=0) + 1, len(item_ids))
    if not configs or purchases.empty:
        return {name: sparse.csr_matrix(shape, dtype=np.float32) for name in configs}
    data = from_events(purchases.assign(**{S.EVENT_TYPE: S.PURCHASE}))
    rows_of = np.array([user_index.get(u, -1) for u in data.user_ids])
    cols_of = pd.Index(item_ids).get_indexer(data.item_ids)
    scored = (np.arange(data.n_users) if users is None
              else np.flatnonzero(pd.Index(data.user_ids).isin(list(users))))  # fmt: skip
    out = {}
    for name, config in configs.items():
        model = build(name, **dict(config)).fit(data)
        none = np.zeros(0, np.int64)  # no user to score: an empty table
        r_all, c_all, v_all = [none], [none], [np.zeros(0, np.float32)]
        chunk = max(1, _BLOCK // max(data.n_items, 1))
        for lo in range(0, len(scored), chunk):
            batch = scored[lo : lo + chunk]
            r, c, v = model.top_n(batch, top_n)
            r_all.append(rows_of[batch[r]])
            c_all.append(cols_of[c])
            v_all.append(v)
        r, c, v = (np.concatenate(a) for a in (r_all, c_all, v_all))
        ok = (r >= 0) & (c >= 0)  # users and items the served model does not know
        out[name] = sparse.csr_matrix((v[ok].astype(np.float32), (r[ok], c[ok])), shape=shape)
    return out


def source_fitter(
    user_index: Mapping[str, int],
    item_ids: list[str],
    configs: Mapping[str, Mapping[str, Any]],
    top_n: int = TOP_N,
) -> SourceFit:
    """:func:`zoo_scores` with the model and configs bound: what the replay calls per round."""

    def fit(
        purchases: pd.DataFrame, users: Collection[str] | None = None
    ) -> dict[str, sparse.csr_matrix]:
        return zoo_scores(user_index, item_ids, purchases, configs, top_n, users)

    return fit
