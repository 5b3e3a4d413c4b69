"""Peer libraries in the benchmark's process, on the benchmark's split: Cornac's models.

Microsoft Recommenders' MovieLens benchmark notebook runs its BPR and BiVAE rows with Cornac;
here the same library runs on ShopML's split and is judged by ShopML's one evaluation library
(``mlkit.metrics``), so a row of ours and a peer's differ only in the model. Each peer is
wrapped in the zoo's contract (``fit(Interactions)``, ``score(users)`` over the whole
catalog): user and item indices are mapped to Cornac's, interactions are binary (as the
zoo's), an item Cornac never saw ranks below every item it scores, and a user it never saw
gets popularity.

Peer configurations are Cornac's as the Recommenders notebook sets them
(``examples/06_benchmarks/benchmark_utils.py``: their choice, not tuned on our split, so
never chosen by looking at test numbers; their notebook feeds the 1-5 ratings, ours the
binary interactions every zoo model sees, and trains BiVAE on a GPU); Cornac's EASE takes the
regularisation our ``ease`` was tuned to on validation, so it checks our implementation
against a library's on the same split.

    python -m benchmarks.recsys --dataset movielens-100k --peers
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlkit.interactions import Interactions
from mlkit.metrics import evaluate
from mlkit.splits import Split
from zoo.compare import Fitted

# Recommenders' examples/06_benchmarks: BPR and BiVAE with these (their notebook's) settings
PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "cornac_bpr": ("BPR", {"k": 200, "max_iter": 200, "learning_rate": 0.01,
                           "lambda_reg": 0.001}),
    "cornac_bivae": ("BiVAECF", {"k": 100, "encoder_structure": [200], "act_fn": "tanh",
                                 "likelihood": "pois", "n_epochs": 500, "batch_size": 1024,
                                 "learning_rate": 0.001, "use_gpu": False}),
    "cornac_ease": ("EASE", {"posB": False}),  # lamb: our tuned ease's l2
}  # fmt: skip
FLOOR = -1e9  # below every score a Cornac model gives: items it never saw


@dataclass
class CornacPeer:
    """A Cornac recommender (``model``: its class in ``cornac.models``) in the zoo's contract."""

    model: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 42

    def fit(self, data: Interactions) -> CornacPeer:
        import cornac

        x = data.matrix.tocoo()
        triplets = [(str(u), str(i), 1.0) for u, i in zip(x.row, x.col, strict=True)]
        train = cornac.data.Dataset.from_uir(triplets, seed=self.seed)
        self.net = getattr(cornac.models, self.model)(**self.config, seed=self.seed, verbose=False)
        self.net.fit(train)
        self.n_items = data.n_items
        self.user_pos = {int(u): c for u, c in train.uid_map.items()}
        item_pos = np.full(data.n_items, -1, dtype=np.int64)
        for i, c in train.iid_map.items():
            item_pos[int(i)] = c
        self.item_pos = item_pos
        counts = np.asarray((data.matrix > 0).sum(axis=0), dtype=np.float64).ravel()
        self.popular = (counts / max(counts.max(), 1.0)).astype(np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        out = np.empty((len(users), self.n_items), dtype=np.float32)
        known = self.item_pos >= 0
        for row, user in enumerate(np.asarray(users)):
            at = self.user_pos.get(int(user))
            if at is None:  # never seen: popularity, as the zoo answers an unseen user
                out[row] = self.popular
                continue
            scores = np.asarray(self.net.score(at), dtype=np.float32).ravel()
            out[row] = FLOOR
            out[row, known] = scores[self.item_pos[known]]
        return out


def fit_peer(
    label: str, model: str, config: dict[str, Any], split: Split, k: int, exclude_seen: bool
) -> Fitted:
    """Fit a peer on the split's training part and evaluate it on its test part, as
    ``zoo.compare.fit_and_evaluate`` does for the zoo's models (a :class:`Fitted` row)."""
    peer = CornacPeer(model, config)
    started = time.perf_counter()
    peer.fit(split.train)
    seconds = time.perf_counter() - started
    result = evaluate(peer, split.train, split.test, k, exclude_seen=exclude_seen,
                      split=split.description)  # fmt: skip
    return Fitted(label, {"cornac": model, **config}, peer, result, seconds, 0)


def peer_configs(configs: dict[str, dict]) -> dict[str, tuple[str, dict[str, Any]]]:
    """:data:`PEERS`, Cornac's EASE given our ``ease``'s tuned l2 (``configs``: the
    benchmark's tuned configs)."""
    out = dict(PEERS)
    if "l2" in configs.get("ease", {}):
        model, config = out["cornac_ease"]
        out["cornac_ease"] = (model, {**config, "lamb": float(configs["ease"]["l2"])})
    return out
