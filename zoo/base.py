"""The contract every recommender of the zoo follows, and the registry of their names.

A recommender is fitted on the training ``Interactions`` and returns, for a batch of user
indices, a dense ``(len(users), n_items)`` float32 score matrix over the whole catalog. Ranking,
exclusion of seen items (a protocol choice, not a model choice) and metrics are done outside
the model by ``mlkit.metrics``, so every model is evaluated by the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from scipy import sparse

from mlkit.interactions import ITEM_IDX, USER_IDX, WEIGHT, Interactions
from shopml import schema as S


@runtime_checkable
class Recommender(Protocol):
    name: ClassVar[str]

    def fit(self, data: Interactions) -> Recommender:
        """Learn from ``data`` (the split's training part); returns ``self``."""
        ...

    def score(self, users: np.ndarray) -> np.ndarray:
        """Scores of every catalog item for each user index in ``users`` (higher is better).

        Users unseen at fit time must still get a row (e.g. popularity).
        """
        ...


REGISTRY: dict[str, Callable[..., Recommender]] = {}


def register(cls: type) -> type:
    """Class decorator: make a recommender selectable by its ``name`` (DAG Params, CLI)."""
    REGISTRY[cls.name] = cls
    return cls


def build(name: str, **config: Any) -> Recommender:
    """Instantiate a registered recommender; unknown names and bad configs fail before fitting."""
    import zoo  # noqa: F401  (registers the zoo)

    if name not in REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(REGISTRY)}")
    try:
        return REGISTRY[name](**config)
    except TypeError as err:
        raise ValueError(f"bad config for model '{name}': {err}") from err


# --- shared by the models: state, repeat blend, checks ---------------------------------------


def row_normalize(m: np.ndarray) -> np.ndarray:
    """Scale each row to max 1 so components of a blend are comparable."""
    top = m.max(axis=1, keepdims=True)
    return np.divide(m, top, out=np.zeros_like(m), where=top > 0)


def row_normalize_sparse(m: sparse.spmatrix) -> sparse.csr_matrix:
    """:func:`row_normalize` of a non-negative sparse matrix, kept sparse."""
    m = sparse.csr_matrix(m, dtype=np.float32)
    top = m.max(axis=1).toarray().ravel()
    scale = np.divide(1.0, top, out=np.zeros_like(top), where=top > 0)
    return sparse.csr_matrix(sparse.diags(scale) @ m)


def top_n_rows(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, value) of each row's ``n`` highest positive scores."""
    n = min(n, scores.shape[1])
    cols = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(scores, cols, axis=1)
    rows = np.repeat(np.arange(len(scores)), n)
    keep = vals.ravel() > 0
    return rows[keep], cols.ravel()[keep], vals.ravel()[keep]


def dense_rows(m: sparse.csr_matrix, users: np.ndarray) -> np.ndarray:
    """Dense rows of ``m`` for ``users``; users outside ``m`` (unseen at fit time) get zeros."""
    users = np.asarray(users)
    out = np.zeros((len(users), m.shape[1]), dtype=np.float32)
    known = users < m.shape[0]
    if known.any():
        out[known] = m[users[known]].toarray()
    return out


def sparse_rows(m: sparse.csr_matrix, users: np.ndarray) -> sparse.csr_matrix:
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


TIE_BREAK = 1e-6  # times popularity, added to every score: ties and short lists (_finish)


class Base:
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
        scores = row_normalize(scores.astype(np.float32))
        if self.history is not None:
            scores = scores + self.repeat_weight * row_normalize(dense_rows(self.history, users))
        empty = ~scores.any(axis=1)
        scores[empty] = self.popularity
        # a tiny popularity term breaks ties deterministically and fills short lists
        return scores + TIE_BREAK * self.popularity

    def top_n(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, value) of each user's ``n`` best positive scores: the top of
        :meth:`score` (ties aside), without a dense (users x catalog) row where the model
        has ``raw_scores`` (its scores before :meth:`_finish`, sparse).

        A dense row per user makes scoring every user (the serving tables) users x items,
        quadratic in the data. Exact: outside the raw scores' entries a score is
        ``TIE_BREAK * popularity`` (or popularity, for a user with no signal), so the best items
        lie among those entries and the ``n`` most popular items."""
        raw = getattr(self, "raw_scores", None)
        if raw is None:
            return top_n_rows(self.score(users), n)
        users = np.asarray(users)
        s = row_normalize_sparse(raw(users))
        if self.history is not None:
            s = s + self.repeat_weight * row_normalize_sparse(sparse_rows(self.history, users))
        s = sparse.csr_matrix(s, dtype=np.float32)
        s.eliminate_zeros()
        pop = self.popularity
        empty = np.diff(s.indptr) == 0
        s.data = s.data + np.float32(TIE_BREAK) * pop[s.indices]
        # each row's best n scored entries: from a dense block of the columns scored in this
        # batch when that is dense (EASE scores every modelled item), else entry by entry
        used = np.unique(s.indices)
        if s.nnz > 0.05 * s.shape[0] * max(len(used), 1):
            r, c, v = top_n_rows(s[:, used].toarray(), n)
            c = used[c]
        else:
            coo = s.tocoo()
            r, c, v = coo.row, coo.col, coo.data
        fill = np.argsort(-pop, kind="stable")[: min(n, len(pop))]
        fill_rows = np.repeat(np.arange(len(users)), len(fill))
        fill_cols = np.tile(fill, len(users))
        fill_vals = np.where(empty[fill_rows], pop[fill_cols], np.float32(0))
        fill_vals = fill_vals + np.float32(TIE_BREAK) * pop[fill_cols]
        rows = np.concatenate([r, fill_rows]).astype(np.int64)
        cols = np.concatenate([c, fill_cols]).astype(np.int64)
        vals = np.concatenate([v, fill_vals]).astype(np.float32)
        # an item both scored and popular: keep the scored entry (the larger)
        key = rows * len(pop) + cols
        order = np.lexsort((-vals, key))
        first = np.r_[True, key[order][1:] != key[order][:-1]]
        rows, cols, vals = rows[order][first], cols[order][first], vals[order][first]
        order = np.lexsort((-vals, rows))  # each row's best first
        rows, cols, vals = rows[order], cols[order], vals[order]
        start = np.searchsorted(rows, rows, side="left")
        keep = (np.arange(len(rows)) - start < n) & (vals > 0)
        return rows[keep], cols[keep], vals[keep]


def check_positive(**values: float) -> None:
    for key, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{key} must be > 0, got {v}")
