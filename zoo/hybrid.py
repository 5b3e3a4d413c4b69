"""``hybrid``: the served two-stage design (``mlkit.two_stage``) fitted on the zoo's data.

Stage 1 is the engine ``shopml serve`` runs (``served_model.engine``): candidates from the
served two-tower's faiss index, the user's own history, item-kNN of their items and
popularity, filtered. Stage 2 is the served DCN-v2 ``Ranker``, trained by the one loop on the
lists replayed just before each user's last baskets inside the training part (then the basket
before, ``rounds`` times), labelled by what was bought. So the zoo measures the same design
the pipeline serves, on any dataset, beside the models it must beat.

What differs from the pipeline: the zoo has no Feast snapshots, so the ranker's user and item
features are 0 (``mlkit.two_stage.no_features``) and it ranks on the history features alone
(prior purchases, days since, item-kNN affinity); and the two-tower has no user features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from mlkit.interactions import ITEM_IDX, USER_IDX, Interactions
from mlkit.two_stage import (
    fit_ranker,
    no_features,
    offline_engine,
    ranker_matrix,
    replayed_rows,
    scorer,
)
from shopml import schema as S
from shopml.config import ServingConfig
from zoo.base import Base, build, check_positive, register
from zoo.sources import source_fitter


def raw_events(data: Interactions) -> pd.DataFrame:
    """Interactions back in the canonical schema (raw ids), as the pipeline's stages read them."""
    ev = data.events
    out = pd.DataFrame(
        {
            S.USER_ID: data.user_ids[ev[USER_IDX].to_numpy()],
            S.ITEM_ID: data.item_ids[ev[ITEM_IDX].to_numpy()],
            S.EVENT_TYPE: S.PURCHASE,  # every zoo interaction is a positive
            S.TIMESTAMP: ev[S.TIMESTAMP].to_numpy(),
        }
    )
    if S.SESSION_ID in ev:
        out[S.SESSION_ID] = ev[S.SESSION_ID].to_numpy()
    out[S.TIMESTAMP] = pd.to_datetime(out[S.TIMESTAMP], utc=True)
    return out


@register
@dataclass
class Hybrid(Base):
    """Served retrieval (two-tower ANN, history, item-kNN, popularity) + the served ranker."""

    name: ClassVar[str] = "hybrid"
    two_tower: dict[str, Any] = field(default_factory=lambda: {"epochs": 10})
    rounds: int = 3  # baskets per user replayed as ranker examples
    epochs: int = 8  # ranker epochs
    batch_size: int = 2048
    lr: float = 2e-3
    seed: int = 42
    candidates: dict[str, Any] = field(default_factory=dict)  # ServingConfig overrides
    # zoo scorers as sources and features (zoo.sources): name -> its config; {} = none
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive(rounds=self.rounds, epochs=self.epochs, batch_size=self.batch_size,
                       lr=self.lr)  # fmt: skip
        build("two_tower", **self.two_tower)  # a bad two-tower config fails before training
        self.cfg = ServingConfig(**self.candidates)  # as does a bad candidate setting
        for name, config in self.sources.items():
            build(name, **config)  # and a bad source config

    def fit(self, data: Interactions) -> Hybrid:
        self._fit_common(data)
        events = raw_events(data)
        self.two_tower_model = build("two_tower", **self.two_tower).fit(data)
        model = self.two_tower_model.net
        rows = replayed_rows(model, events, self.rounds, no_features, self.cfg,
                             self._source_fit())  # fmt: skip
        self.ranker, self.curve = fit_ranker(
            ranker_matrix(rows), rows[S.LABEL].to_numpy(np.float32), self.epochs, self.seed,
            batch_size=self.batch_size, lr=self.lr,
        )  # fmt: skip
        self._events, self._data = events, data
        return self

    def _source_fit(self):
        """The zoo sources bound to the two-tower's vocabularies (None without sources)."""
        if not self.sources:
            return None
        net = self.two_tower_model.net
        return source_fitter(net.user_index, list(net.item_ids), self.sources)

    def _scorer(self):
        """The served path over every training purchase, each user's moment just after their
        last one; built on first use (the faiss index does not pickle, the rest does)."""
        if getattr(self, "_score_fn", None) is None:
            events = self._events
            engine = offline_engine(
                events, self.two_tower_model.net, self.ranker, self.cfg, self._source_fit()
            )
            last = events.groupby(S.USER_ID)[S.TIMESTAMP].max() + pd.Timedelta(seconds=1)
            moments = pd.DataFrame(
                {S.USER_ID: last.index, S.ITEM_ID: "", S.ENTITY_TIMESTAMP: last.to_numpy()}
            )
            users = no_features(moments).set_index(S.USER_ID)
            self._score_fn = scorer(engine, self._data, users, no_features)
        return self._score_fn

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_score_fn"}

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        known = users < self.train_matrix.shape[0]
        out = np.zeros((len(users), self.train_matrix.shape[1]), dtype=np.float32)
        if known.any():
            out[known] = self._scorer()(users[known]) + 2.0  # served candidates above the rest
        return self._finish(out, users)
