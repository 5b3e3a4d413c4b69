"""Deep recommenders in PyTorch, trained data-parallel by the one Horovod loop (``mlkit.loop``).

* ``two_tower``: the served two-tower itself (``served_model.two_tower``), fitted on the
  zoo's interactions with the pipeline's sampled softmax.
* ``sasrec``: causal self-attention over the user's item sequence (Kang & McAuley 2018),
  next-item cross-entropy over the full catalog, or sampled softmax for large catalogs.

``fit`` with ``workers=1`` trains in this process (Horovod of size 1); with ``workers>1``
``mlkit.launch`` runs the same loop under ``horovodrun -np N --gloo`` and loads rank 0's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from mlkit.interactions import ITEM_IDX, USER_IDX, Interactions
from mlkit.launch import train as launch
from mlkit.loop import LoopConfig
from served_model.two_tower import UNKNOWN_USER, TwoTower, sampled_softmax_loss
from shopml import schema as S
from zoo.base import Base, check_positive, register


@dataclass
class _Neural(Base):
    """Shared hyperparameters and the Horovod training loop of the deep models."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    dim: int = 64
    weight_decay: float = 0.0
    workers: int = 1
    seed: int = 42
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def __post_init__(self) -> None:
        check_positive(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            dim=self.dim,
            workers=self.workers,
        )

    # --- what a subclass provides -------------------------------------------------------------
    def build(self, data: Interactions) -> nn.Module:
        raise NotImplementedError

    def examples(self, data: Interactions) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def loss(self, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # --- fit: the one loop (mlkit.loop), in process or on ``workers`` Horovod processes ----
    def fit(self, data: Interactions) -> _Neural:
        self._fit_common(data)
        self.prepare(data)
        cfg = LoopConfig(self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed,
                         name=self.name)  # fmt: skip
        self.net, curve = launch(_ZooTask(self, data), cfg, self.workers)
        self.curve = [point["loss"] for point in curve]
        self.net.eval()
        return self

    def prepare(self, data: Interactions) -> None:
        """Precompute what both training and scoring need (called before training)."""


@dataclass
class _ZooTask:
    """A zoo model and its data as a ``mlkit.loop.Trainable`` (pickled to every rank)."""

    model: _Neural
    data: Interactions

    def build(self) -> nn.Module:
        return self.model.build(self.data)

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        return self.model.examples(self.data)

    def loss(self, net: nn.Module, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        self.model.net = net
        return self.model.loss(batch, gen)


# --- two-tower ------------------------------------------------------------------------------------


@register
@dataclass
class TwoTowerRetrieval(_Neural):
    """The served two-tower (``served_model.two_tower.TwoTower``), fitted on interactions.

    Same module, sampled-softmax loss and loop as the nightly pipeline's. The zoo has no
    Feast snapshots, so the user tower here has no feature MLP (id embeddings only); the
    pipeline's run adds the user's point-in-time features.
    """

    name: ClassVar[str] = "two_tower"
    negatives: int = 1024
    # sparse embedding gradients, as the nightly pipeline trains (train.sparse_embeddings);
    # dense here, the setting the tuned configs were searched with
    sparse: bool = False

    def build(self, data: Interactions) -> nn.Module:
        return TwoTower(list(data.user_ids), list(data.item_ids), [], feature_names=(),
                        dim=self.dim, sparse=self.sparse)  # fmt: skip

    def examples(self, data: Interactions) -> torch.utils.data.Dataset:
        ev = data.events
        users = torch.tensor(ev[USER_IDX].to_numpy(np.int64) + 1)  # TwoTower: 0 = unknown
        return torch.utils.data.TensorDataset(
            users,
            torch.zeros((len(ev), 0), dtype=torch.float32),
            torch.tensor(ev[ITEM_IDX].to_numpy(np.int64)),
        )

    def loss(self, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        users, feats, items = batch
        return sampled_softmax_loss(self.net, users, feats, items, self.negatives, gen)

    @torch.no_grad()
    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        known = users < self.train_matrix.shape[0]
        idx = torch.tensor(np.where(known, users + 1, UNKNOWN_USER))
        s = self.net(idx, torch.zeros((len(users), 0)))
        s = torch.softmax(s, dim=1).numpy()
        s[~known] = 0.0
        return self._finish(s, users)


# --- SASRec ---------------------------------------------------------------------------------------


class _SASRec(nn.Module):
    def __init__(self, n_items: int, dim: int, max_len: int, layers: int, heads: int,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)  # index 0 = padding
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.item.weight, std=0.05)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden state at each position, attending only to earlier items: (B, L, dim).

        Sequences are right-padded, so with the causal mask a real position never sees a pad
        (no key-padding mask is needed, and no all-masked row can produce NaN).
        """
        length = seq.shape[1]
        x = self.item(seq) * math.sqrt(self.item.embedding_dim)
        x = self.drop(x + self.pos(torch.arange(length)))
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        h = self.encoder(x, mask=causal, is_causal=True)
        return self.norm(h)


def user_sequences(data: Interactions) -> list[np.ndarray]:
    """Each user's item indices (+1; 0 is padding) in time order."""
    ev = data.events.sort_values([USER_IDX, S.TIMESTAMP, ITEM_IDX], kind="stable")
    items = ev[ITEM_IDX].to_numpy() + 1
    bounds = np.searchsorted(ev[USER_IDX].to_numpy(), np.arange(data.n_users + 1))
    return [items[bounds[u] : bounds[u + 1]] for u in range(data.n_users)]


def _right_pad(seq: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` items of ``seq``, zero-padded on the right."""
    out = np.zeros(length, dtype=np.int64)
    tail = seq[-length:]
    out[: len(tail)] = tail
    return out


@register
@dataclass
class SASRec(_Neural):
    """Next-item transformer; the user's score row is the last position's hidden state."""

    name: ClassVar[str] = "sasrec"
    max_len: int = 50
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    full_softmax_max_items: int = 5000  # above this, sampled softmax with shared negatives
    negatives: int = 1024

    def build(self, data: Interactions) -> nn.Module:
        return _SASRec(data.n_items, self.dim, self.max_len, self.layers, self.heads, self.dropout)

    def prepare(self, data: Interactions) -> None:
        self.sequences = user_sequences(data)
        self.n_items = data.n_items

    def examples(self, data: Interactions) -> torch.utils.data.Dataset:
        """Windows of ``max_len + 1`` items (stride ``max_len``), so long histories all train."""
        windows = []
        for seq in self.sequences:
            if len(seq) < 2:
                continue
            for end in range(len(seq), 1, -self.max_len):
                windows.append(
                    _right_pad(seq[max(0, end - self.max_len - 1) : end], self.max_len + 1)
                )
        return torch.utils.data.TensorDataset(torch.tensor(np.stack(windows)))

    def loss(self, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        (win,) = batch
        inputs, targets = win[:, :-1], win[:, 1:]
        h = self.net(inputs)
        mask = (targets > 0) & (inputs > 0)
        h, targets = h[mask], targets[mask] - 1
        table = self.net.item.weight[1:]
        if self.n_items <= self.full_softmax_max_items:
            return nn.functional.cross_entropy(h @ table.T, targets)
        neg = torch.randint(self.n_items, (self.negatives,), generator=gen)
        pos_logit = (h * table[targets]).sum(-1, keepdim=True)
        neg_logit = (h @ table[neg].T).masked_fill(neg.unsqueeze(0) == targets.unsqueeze(1),
                                                   float("-inf"))  # fmt: skip
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        return nn.functional.cross_entropy(logits, torch.zeros(len(h), dtype=torch.long))

    @torch.no_grad()
    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        empty = np.zeros(0, dtype=np.int64)
        seqs = [self.sequences[u] if u < len(self.sequences) else empty for u in users]
        batch = torch.tensor(np.stack([_right_pad(s, self.max_len) for s in seqs]))
        last = torch.tensor([max(min(len(s), self.max_len) - 1, 0) for s in seqs])
        h = self.net(batch)[torch.arange(len(seqs)), last]
        s = torch.softmax(h @ self.net.item.weight[1:].T, dim=1).numpy()
        s[[len(q) == 0 for q in seqs]] = 0.0
        return self._finish(s, users)
