"""Two-stage recommendation: candidate retrieval, then a multitask deep ranker (DCN-v2).

Stage 1 (retrieval) takes the union of the top candidates of several cheap sources
(two-tower, item-kNN, popularity and, where repeats count, the user's own history).
Stage 2 ranks only those candidates with a DCN-v2 (Wang et al., WWW 2021: explicit feature
crosses plus a deep MLP) with two heads trained together:

* ``engage``: the user interacts with the item next (click / add-to-cart / any event),
* ``convert``: the user purchases it (or, for rating data, rates it >= 4).

On data that has only purchases (the Instacart demo) the two labels coincide and the model is
in effect single-task; the heads exist for retailers' logs with views, clicks and carts.

How the ranker learns without peeking at the test split: inside the training part, each
user's last basket (or last interaction) is held out again; sources fitted on the rest
produce candidates, the held-out items label them. At scoring time the sources are refitted
on the whole training part. This is the same shape serving uses (retrieve, then rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import sparse
from torch import nn

from mlkit.interactions import ITEM_IDX, RATING, USER_IDX, Interactions
from served_model.ranker import DCNv2
from shopml import schema as S
from zoo.base import build, register
from zoo.neural import _Neural


def _top_mask(scores: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of each row's top ``n`` positive-scored entries."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, part, True, axis=1)
    return mask & (scores > 0)


class _Context:
    """Per-(user, item) statistics of a training part, for the ranker's features."""

    def __init__(self, data: Interactions) -> None:
        ev = data.events
        self.count = data.matrix
        days = ev[S.TIMESTAMP].astype("int64").to_numpy() / 86_400e9
        self.now = days.max()
        order = np.lexsort((days, ev[ITEM_IDX].to_numpy(), ev[USER_IDX].to_numpy()))
        u, i, d = ev[USER_IDX].to_numpy()[order], ev[ITEM_IDX].to_numpy()[order], days[order]
        keep = np.r_[(u[1:] != u[:-1]) | (i[1:] != i[:-1]), True]  # last event per pair
        self.last = sparse.csr_matrix(
            (d[keep] - days.min() + 1.0, (u[keep], i[keep])), shape=(data.n_users, data.n_items)
        )  # days since the first event, + 1 so that 0 means "never"
        self.t0 = days.min()
        self.user_n = np.log1p(np.asarray(self.count.sum(axis=1)).ravel())
        self.user_distinct = np.log1p(np.diff(self.count.indptr))
        item_n = np.asarray(self.count.sum(axis=0)).ravel()
        self.item_pop = np.log1p(item_n)
        recent = days > self.now - 30
        self.item_recent = np.log1p(
            np.bincount(ev[ITEM_IDX].to_numpy()[recent], minlength=data.n_items)
        )
        self.n_users = data.n_users

    def features(
        self, users: np.ndarray, items: np.ndarray, source_scores: list[np.ndarray]
    ) -> np.ndarray:
        """One row per candidate (users[j], items[j]); source scores are already gathered."""
        known = users < self.n_users
        uu = np.where(known, users, 0)
        count = np.asarray(self.count[uu, items]).ravel() * known
        last = np.asarray(self.last[uu, items]).ravel() * known
        age = np.where(last > 0, (self.now - (last + self.t0 - 1.0)) / 30.0, 24.0)
        cols = [
            *source_scores,
            np.log1p(count),
            np.minimum(age, 24.0),
            (count > 0).astype(np.float32),
            self.user_n[uu] * known,
            self.user_distinct[uu] * known,
            self.item_pop[items],
            self.item_recent[items],
        ]
        return np.stack(cols, axis=1).astype(np.float32)


@dataclass
class _Stage:
    """Fitted sources and statistics of one training part."""

    sources: dict[str, Any]
    context: _Context


@register
@dataclass
class Hybrid(_Neural):
    """Retrieve candidates from several sources, rank them with a multitask DCN-v2."""

    name: ClassVar[str] = "hybrid"
    sources: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "two_tower": {"epochs": 5},
            "item_knn": {},
            "popularity": {},
        }
    )
    include_history: bool = True  # the user's own items are candidates (repeat purchases)
    per_source: int = 100
    cross_layers: int = 2
    hidden: int = 128
    convert_weight: float = 0.5  # final score = mix of the two heads' probabilities
    epochs: int = 5
    batch_size: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sources:
            raise ValueError("hybrid needs at least one candidate source")
        for name, cfg in self.sources.items():
            build(name, **cfg)  # unknown names / bad configs fail before training
        if not 0.0 <= self.convert_weight <= 1.0:
            raise ValueError(f"convert_weight must be in [0, 1], got {self.convert_weight}")

    # --- stage 1 ------------------------------------------------------------------------
    def _fit_stage(self, data: Interactions) -> _Stage:
        fitted = {name: build(name, **cfg).fit(data) for name, cfg in self.sources.items()}
        return _Stage(fitted, _Context(data))

    def _candidates(
        self, stage: _Stage, users: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row in batch, item, features) of the union of every source's top candidates."""
        scores = [s.score(users) for s in stage.sources.values()]
        mask = np.zeros_like(scores[0], dtype=bool)
        for s in scores:
            mask |= _top_mask(s, self.per_source)
        if self.include_history:
            known = users < stage.context.n_users
            hist = np.zeros(mask.shape, dtype=bool)
            hist[known] = stage.context.count[users[known]].toarray() > 0
            mask |= hist
        rows, items = np.nonzero(mask)
        feats = stage.context.features(users[rows], items, [s[rows, items] for s in scores])
        return rows, items, feats

    # --- what the Horovod loop needs ------------------------------------------------------
    def prepare(self, data: Interactions) -> None:
        from mlkit.splits import leave_last_out

        inner = leave_last_out(data)
        stage = self._fit_stage(inner.train)
        users = np.unique(inner.test.events[USER_IDX].to_numpy())
        rows, items, feats = self._candidates(stage, users)
        test = inner.test.events
        engaged = sparse.csr_matrix(
            (np.ones(len(test)), (test[USER_IDX], test[ITEM_IDX])),
            shape=(data.n_users, data.n_items),
        )
        converted_rows = (test[S.EVENT_TYPE] == S.PURCHASE).to_numpy()
        if RATING in test.columns:
            converted_rows |= (test[RATING] >= 4).to_numpy()
        conv = test[converted_rows]
        converted = sparse.csr_matrix(
            (np.ones(len(conv)), (conv[USER_IDX], conv[ITEM_IDX])),
            shape=(data.n_users, data.n_items),
        )
        uu = users[rows]
        self._x = torch.tensor(feats)
        self._y = torch.tensor(
            np.stack(
                [
                    np.asarray(engaged[uu, items]).ravel() > 0,
                    np.asarray(converted[uu, items]).ravel() > 0,
                ],
                axis=1,
            ).astype(np.float32)
        )
        self.label_rates = self._y.mean(0).tolist()
        self.stage = self._fit_stage(data)  # scoring uses sources fitted on all training data

    def build(self, data: Interactions) -> nn.Module:
        return DCNv2(self._x.shape[1], self.cross_layers, self.hidden, heads=2)

    def examples(self, data: Interactions) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(self._x, self._y)

    def loss(self, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self.net(x), y)

    def fit(self, data: Interactions) -> Hybrid:
        super().fit(data)
        del self._x, self._y  # training examples are not part of the shipped model
        return self

    # --- stage 2 ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, feats: np.ndarray) -> np.ndarray:
        """(engage, convert) probabilities of candidate feature rows: (n, 2)."""
        return torch.sigmoid(self.net(torch.tensor(feats))).numpy()

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        rows, items, feats = self._candidates(self.stage, users)
        p = self.predict(feats) if len(feats) else np.zeros((0, 2), dtype=np.float32)
        final = (1 - self.convert_weight) * p[:, 0] + self.convert_weight * p[:, 1]
        out = np.zeros((len(users), len(self.popularity)), dtype=np.float32)
        out[rows, items] = 1.0 + final  # every candidate ranks above every non-candidate
        return out + 1e-6 * self.popularity
