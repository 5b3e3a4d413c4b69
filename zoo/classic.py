"""Neighbourhood and linear baselines, in numpy/scipy: the models a tuned neural net must beat.

* ``popularity`` / ``recent_popularity``: global counts, or counts in the last ``days``.
* ``personal_top_frequency``: the user's own most-bought items, filled with popularity. On
  repeat-purchase data (groceries) it is the baseline to beat.
* ``item_knn`` / ``user_knn``: cosine neighbourhoods with shrinkage (Sarwar et al. 2001;
  shrinkage as in Koren 2008). ``user_knn`` with a time-decayed own-history term is the
  TIFU-KNN recipe for next-basket recommendation (Hu et al., SIGIR 2020).
* ``ease``: the closed-form linear autoencoder of Steck (WWW 2019).

Every model here can be made repeat-aware with ``repeat_weight``: its scores are blended with
the user's own (normalised) purchase history, so reorders and new items compete in one list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import sparse

from mlkit.interactions import ITEM_IDX, USER_IDX, WEIGHT, Interactions
from served_model.similarity import cosine_neighbours
from shopml import schema as S
from zoo.base import (
    TIE_BREAK,
    Base,
    check_positive,
    decayed_history,
    dense_rows,
    register,
    sparse_rows,
)


@register
@dataclass
class Popularity(Base):
    """Most interacted items overall (``days``: only the last ``days`` before the cut)."""

    name: ClassVar[str] = "popularity"
    days: float | None = None

    def __post_init__(self) -> None:
        if self.days is not None and self.days <= 0:
            raise ValueError(f"days must be > 0, got {self.days}")

    def fit(self, data: Interactions) -> Popularity:
        self._fit_common(data)
        ev = data.events
        if self.days:
            cut = ev[S.TIMESTAMP].max() - pd.Timedelta(days=self.days)
            ev = ev[ev[S.TIMESTAMP] > cut]
        counts = np.bincount(ev[ITEM_IDX], weights=ev[WEIGHT], minlength=data.n_items)
        self.scores = (counts / max(counts.max(), 1.0)).astype(np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.scores + TIE_BREAK * self.popularity, (len(users), 1))


@register
@dataclass
class RecentPopularity(Popularity):
    """Popularity over a recent window: trends matter in commerce."""

    name: ClassVar[str] = "recent_popularity"
    days: float | None = 30.0


@register
@dataclass
class PersonalTopFrequency(Base):
    """The user's own items by purchase count, ties to the most recent, then popularity."""

    name: ClassVar[str] = "personal_top_frequency"

    def fit(self, data: Interactions) -> PersonalTopFrequency:
        self._fit_common(data)
        ev = data.events
        ts = ev[S.TIMESTAMP].astype("int64").to_numpy() / 1e9
        keys = [ev[USER_IDX].to_numpy(), ev[ITEM_IDX].to_numpy()]
        last = pd.Series(ts).groupby(keys).max()
        t_min, t_max = ts.min(), ts.max()
        recency = (last.to_numpy() - t_min) / max(t_max - t_min, 1.0)  # in [0, 1]
        u, i = (last.index.get_level_values(n).to_numpy() for n in (0, 1))
        rec = sparse.csr_matrix((recency.astype(np.float32), (u, i)), shape=self.train_matrix.shape)
        # integer counts dominate; recency (< 1) breaks ties among equal counts
        self.own = (self.train_matrix + 0.5 * rec).tocsr()
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        own = dense_rows(self.own, users)
        # popularity (< 0.01) only orders the items the user never bought
        return own + 0.01 * self.popularity


@register
@dataclass
class ItemKNN(Base):
    """Score = the user's items times the item-item cosine neighbourhood."""

    name: ClassVar[str] = "item_knn"
    neighbors: int = 100
    shrink: float = 10.0
    binary: bool = True
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def __post_init__(self) -> None:
        check_positive(neighbors=self.neighbors)

    def fit(self, data: Interactions) -> ItemKNN:
        self._fit_common(data)
        x = self.train_matrix.copy()
        if self.binary:
            x.data[:] = 1.0
        self.x = x
        # neighbours of each item j over columns; scores = x_u @ sim (sim symmetric pre-topk)
        self.sim = cosine_neighbours(x, self.shrink, self.neighbors).T.tocsr()
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return self._finish((sparse_rows(self.x, users) @ self.sim).toarray(), users)


@register
@dataclass
class UserKNN(Base):
    """Score = similarity-weighted history of the user's nearest users.

    With ``own_weight`` > 0 and ``half_life_days`` set this is TIFU-KNN: the user's own
    time-decayed history blended with the neighbours' (Hu et al. 2020).
    """

    name: ClassVar[str] = "user_knn"
    neighbors: int = 100
    shrink: float = 10.0
    half_life_days: float | None = None
    own_weight: float = 0.0
    neighbour_pool: int = 10_000
    seed: int = 42

    def __post_init__(self) -> None:
        check_positive(neighbors=self.neighbors)
        if not 0.0 <= self.own_weight <= 1.0:
            raise ValueError(f"own_weight must be in [0, 1], got {self.own_weight}")
        if self.neighbour_pool < 0:
            raise ValueError(
                f"neighbour_pool must be >= 0 (0: every user), got {self.neighbour_pool}"
            )

    def fit(self, data: Interactions) -> UserKNN:
        self._fit_common(data)
        self.hist = decayed_history(data, self.half_life_days)
        # row-normalised histories: a heavy user's vector should not swamp the neighbourhood
        norms = np.sqrt(np.asarray(self.hist.multiply(self.hist).sum(axis=1)).ravel())
        self.hist_n = sparse.diags(1.0 / np.maximum(norms, 1e-9)).astype(np.float32) @ self.hist
        self.columns = self.hist.T.tocsr()  # users as columns: cosine_neighbours' input
        n = data.n_users
        self.pool = (
            None
            if not self.neighbour_pool or n <= self.neighbour_pool
            else np.sort(np.random.default_rng(self.seed).choice(n, self.neighbour_pool, False))
        )
        return self

    def neighbourhoods(self, users: np.ndarray) -> sparse.csr_matrix:
        """Rows ``users`` of the user x user neighbourhood matrix (the others empty).

        Computed when scored, for the users scored only: the whole matrix is quadratic in
        the users (10^5 users at 10^7 events: hours), while the replay and the evaluation
        score a sample of them. Row by row the same as computing it all at fit time.

        With more users than ``neighbour_pool``, neighbours are searched among a seeded
        sample of that many users: a user who bought a popular item co-occurs with most
        shoppers, so an exhaustive search costs users x users. The pool bounds each user's
        search, which makes scoring every user (the serving tables) linear in the users.
        What it costs in NDCG: ``python -m benchmarks.scale --neighbour-pool``."""
        return cosine_neighbours(
            self.columns, self.shrink, self.neighbors, of=np.unique(users), among=self.pool
        )

    def raw_scores(self, users: np.ndarray) -> sparse.csr_matrix:
        """Own history blended with the neighbours', sparse: before :meth:`Base._finish`."""
        users = np.asarray(users)
        n = self.columns.shape[1]
        known = np.minimum(users, n - 1)
        sim = self.neighbourhoods(known)[known]
        wsum = np.asarray(np.abs(sim).sum(axis=1)).ravel()
        scale = np.where(users < n, 1.0 / np.maximum(wsum, 1e-9), 0.0).astype(np.float32)
        neigh = sparse.diags(scale) @ (sim @ self.hist_n)
        own = sparse_rows(self.hist_n, users)
        return (self.own_weight * own + (1 - self.own_weight) * neigh).tocsr()

    def score(self, users: np.ndarray) -> np.ndarray:
        return self._finish(self.raw_scores(users).toarray(), users)


@register
@dataclass
class EASE(Base):
    """Closed form ``B = I - P / diag(P)``, ``P = (X^T X + λI)^-1`` (Steck 2019).

    The inverse is dense in the number of items, so only the ``max_items`` most popular items
    are modelled (all of them when the catalog is smaller); the rest rank by popularity.
    """

    name: ClassVar[str] = "ease"
    l2: float = 200.0
    max_items: int = 8000
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def __post_init__(self) -> None:
        check_positive(l2=self.l2, max_items=self.max_items)

    def fit(self, data: Interactions) -> EASE:
        self._fit_common(data)
        x = self.train_matrix.copy()
        x.data[:] = 1.0
        counts = np.asarray(x.sum(axis=0)).ravel()
        keep = np.sort(np.argsort(-counts, kind="stable")[: self.max_items])
        keep = keep[counts[keep] > 0]
        xs = x[:, keep]
        g = (xs.T @ xs).toarray().astype(np.float64)
        g[np.diag_indices_from(g)] += self.l2
        p = np.linalg.inv(g)
        b = p / (-np.diag(p))
        b[np.diag_indices_from(b)] = 0.0
        self.keep, self.b, self.x = keep, b.astype(np.float32), x
        return self

    def raw_scores(self, users: np.ndarray) -> sparse.csr_matrix:
        """``max(x_u B, 0)`` on the modelled items, sparse: before :meth:`Base._finish`.
        The history is multiplied sparse (a few dozen items per user), not as a dense row."""
        dense = np.maximum(np.asarray(sparse_rows(self.x, users)[:, self.keep] @ self.b), 0.0)
        k = len(self.keep)  # row u's entries: the modelled items, in catalog columns
        return sparse.csr_matrix(
            (dense.astype(np.float32).ravel(), np.tile(self.keep, len(dense)),
             np.arange(len(dense) + 1) * k),
            shape=(len(dense), self.x.shape[1]),
        )  # fmt: skip

    def score(self, users: np.ndarray) -> np.ndarray:
        return self._finish(self.raw_scores(users).toarray(), users)
