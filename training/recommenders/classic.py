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

from shopml import schema as S
from training.interactions import ITEM_IDX, USER_IDX, WEIGHT, Interactions
from training.recommenders.base import register


def _row_normalize(m: np.ndarray) -> np.ndarray:
    """Scale each row to max 1 so components of a blend are comparable."""
    top = m.max(axis=1, keepdims=True)
    return np.divide(m, top, out=np.zeros_like(m), where=top > 0)


def _rows(m: sparse.csr_matrix, users: np.ndarray) -> np.ndarray:
    """Dense rows of ``m`` for ``users``; users outside ``m`` (unseen at fit time) get zeros."""
    users = np.asarray(users)
    out = np.zeros((len(users), m.shape[1]), dtype=np.float32)
    known = users < m.shape[0]
    if known.any():
        out[known] = m[users[known]].toarray()
    return out


def _sparse_rows(m: sparse.csr_matrix, users: np.ndarray) -> sparse.csr_matrix:
    """Sparse rows of ``m`` for ``users``; unseen users get empty rows."""
    users = np.asarray(users)
    known = users < m.shape[0]
    picked = m[np.where(known, users, 0)]
    return sparse.diags(known.astype(np.float32)) @ picked


def decayed_history(data: Interactions, half_life_days: float | None) -> sparse.csr_matrix:
    """User x item history where each event weighs ``0.5 ** (age / half_life)``.

    Age is measured from the user's own last event, so a user who shops rarely is not
    penalised against one who shopped yesterday. ``None`` = plain counts.
    """
    ev = data.events
    w = ev[WEIGHT].to_numpy(np.float64)
    if half_life_days:
        ts = ev[S.TIMESTAMP].astype("int64").to_numpy() / 86_400e9
        last = pd.Series(ts).groupby(ev[USER_IDX].to_numpy()).transform("max").to_numpy()
        w = w * np.power(0.5, (last - ts) / half_life_days)
    m = sparse.csr_matrix(
        (w.astype(np.float32), (ev[USER_IDX], ev[ITEM_IDX])),
        shape=(data.n_users, data.n_items),
    )
    m.sum_duplicates()
    return m


class _Base:
    """Shared state: the training matrix, popularity for unseen users, the repeat blend."""

    name: ClassVar[str]
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def _fit_common(self, data: Interactions) -> None:
        self.train_matrix = data.matrix
        counts = np.asarray(self.train_matrix.sum(axis=0)).ravel()
        self.popularity = (counts / max(counts.max(), 1.0)).astype(np.float32)
        self.history = (
            decayed_history(data, self.repeat_half_life_days) if self.repeat_weight else None
        )

    def _finish(self, scores: np.ndarray, users: np.ndarray) -> np.ndarray:
        """Blend the repeat component; users with no signal at all get popularity."""
        scores = _row_normalize(scores.astype(np.float32))
        if self.history is not None:
            scores = scores + self.repeat_weight * _row_normalize(_rows(self.history, users))
        empty = ~scores.any(axis=1)
        scores[empty] = self.popularity
        # a tiny popularity term breaks ties deterministically and fills short lists
        return scores + 1e-6 * self.popularity


@register
@dataclass
class Popularity(_Base):
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
        return np.tile(self.scores + 1e-6 * self.popularity, (len(users), 1))


@register
@dataclass
class RecentPopularity(Popularity):
    """Popularity over a recent window: trends matter in commerce."""

    name: ClassVar[str] = "recent_popularity"
    days: float | None = 30.0


@register
@dataclass
class PersonalTopFrequency(_Base):
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
        own = _rows(self.own, users)
        # popularity (< 0.01) only orders the items the user never bought
        return own + 0.01 * self.popularity


def _cosine(x: sparse.csr_matrix, shrink: float, neighbors: int) -> sparse.csr_matrix:
    """Cosine similarity between the columns of ``x`` with shrinkage, top-``neighbors`` kept.

    ``sim(i, j) = <x_i, x_j> / (|x_i| |x_j| + shrink)``; the diagonal is dropped.
    """
    xc = x.tocsc().astype(np.float32)
    norms = np.sqrt(np.asarray(xc.multiply(xc).sum(axis=0)).ravel())
    co = (xc.T @ xc).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    co = co.tocoo()
    data = co.data / (norms[co.row] * norms[co.col] + shrink)
    sim = sparse.csr_matrix((data.astype(np.float32), (co.row, co.col)), shape=co.shape)
    return _keep_top(sim, neighbors)


def _keep_top(m: sparse.csr_matrix, k: int) -> sparse.csr_matrix:
    """Keep the ``k`` largest entries of each row (the neighbourhood)."""
    m = m.tocsr()
    rows, cols, vals = [], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        if hi == lo:
            continue
        d, c = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > k:
            top = np.argpartition(-d, k - 1)[:k]
            d, c = d[top], c[top]
        rows.append(np.full(len(c), r))
        cols.append(c)
        vals.append(d)
    if not rows:
        return sparse.csr_matrix(m.shape, dtype=np.float32)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape
    )


def _check_positive(**values: float) -> None:
    for key, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{key} must be > 0, got {v}")


@register
@dataclass
class ItemKNN(_Base):
    """Score = the user's items times the item-item cosine neighbourhood."""

    name: ClassVar[str] = "item_knn"
    neighbors: int = 100
    shrink: float = 10.0
    binary: bool = True
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def __post_init__(self) -> None:
        _check_positive(neighbors=self.neighbors)

    def fit(self, data: Interactions) -> ItemKNN:
        self._fit_common(data)
        x = self.train_matrix.copy()
        if self.binary:
            x.data[:] = 1.0
        self.x = x
        # neighbours of each item j over columns; scores = x_u @ sim (sim symmetric pre-topk)
        self.sim = _cosine(x, self.shrink, self.neighbors).T.tocsr()
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return self._finish((_sparse_rows(self.x, users) @ self.sim).toarray(), users)


@register
@dataclass
class UserKNN(_Base):
    """Score = similarity-weighted history of the user's nearest users.

    With ``own_weight`` > 0 and ``half_life_days`` set this is TIFU-KNN: the user's own
    time-decayed history blended with the neighbours' (Hu et al. 2020).
    """

    name: ClassVar[str] = "user_knn"
    neighbors: int = 100
    shrink: float = 10.0
    half_life_days: float | None = None
    own_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(neighbors=self.neighbors)
        if not 0.0 <= self.own_weight <= 1.0:
            raise ValueError(f"own_weight must be in [0, 1], got {self.own_weight}")

    def fit(self, data: Interactions) -> UserKNN:
        self._fit_common(data)
        self.hist = decayed_history(data, self.half_life_days)
        # row-normalised histories: a heavy user's vector should not swamp the neighbourhood
        norms = np.sqrt(np.asarray(self.hist.multiply(self.hist).sum(axis=1)).ravel())
        self.hist_n = sparse.diags(1.0 / np.maximum(norms, 1e-9)).astype(np.float32) @ self.hist
        self.sim = _cosine(self.hist.T.tocsr(), self.shrink, self.neighbors)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        sim = self.sim[np.minimum(users, self.sim.shape[0] - 1)]
        wsum = np.asarray(np.abs(sim).sum(axis=1)).ravel()
        neigh = np.asarray((sim @ self.hist_n).todense()) / np.maximum(wsum, 1e-9)[:, None]
        neigh[users >= self.sim.shape[0]] = 0.0
        own = _rows(self.hist_n, users)
        scores = self.own_weight * own + (1 - self.own_weight) * neigh
        return self._finish(scores, users)


@register
@dataclass
class EASE(_Base):
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
        _check_positive(l2=self.l2, max_items=self.max_items)

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

    def score(self, users: np.ndarray) -> np.ndarray:
        xs = _rows(self.x, users)[:, self.keep]
        scores = np.zeros((len(users), self.x.shape[1]), dtype=np.float32)
        scores[:, self.keep] = xs @ self.b
        return self._finish(np.maximum(scores, 0.0), users)
