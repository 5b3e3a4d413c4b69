"""Deep recommenders in PyTorch, trained data-parallel with Horovod like the pipeline's model.

* ``two_tower``: user and item towers; softmax over in-batch negatives plus uniformly sampled
  ones, each logit corrected by the log of its sampling probability (logQ, Yi et al. 2019),
  so popular items are not over-penalised just for appearing often as in-batch negatives.
* ``sasrec``: causal self-attention over the user's item sequence (Kang & McAuley 2018),
  next-item cross-entropy over the full catalog, or sampled softmax for large catalogs.

``fit`` with ``workers=1`` trains in this process (Horovod of size 1); with ``workers>1`` it
runs the same loop under ``horovodrun -np N --gloo`` and loads rank 0's weights.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from shopml import schema as S
from training.interactions import ITEM_IDX, USER_IDX, Interactions
from training.recommenders.base import register
from training.recommenders.classic import _Base, _check_positive


@dataclass
class _Neural(_Base):
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
        _check_positive(
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

    # --- fit ------------------------------------------------------------------------------------
    def fit(self, data: Interactions) -> _Neural:
        self._fit_common(data)
        self.prepare(data)
        if self.workers > 1:
            self.net = _fit_with_horovodrun(self, data)
        else:
            self.net = train_loop(self, data)
        self.net.eval()
        return self

    def prepare(self, data: Interactions) -> None:
        """Precompute what both training and scoring need (called before training)."""


def train_loop(model: _Neural, data: Interactions) -> nn.Module:
    """The data-parallel loop; every rank runs it, rank 0's weights are the result."""
    import horovod.torch as hvd

    # --- distributed setup: one process per worker, each pinned to its device --------------
    hvd.init()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
    torch.manual_seed(model.seed)  # same initial weights on every rank (broadcast anyway)
    gen = torch.Generator().manual_seed(model.seed + hvd.rank())  # negatives differ by rank

    # --- data: each rank reads its shard -----------------------------------------------------
    net = model.build(data)
    model.net = net
    dataset = model.examples(data)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True, seed=model.seed
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=model.batch_size, sampler=sampler)

    # --- optimizer: LR scaled by workers, state broadcast, gradients averaged --------------
    optimizer = torch.optim.Adam(
        net.parameters(), lr=model.lr * hvd.size(), weight_decay=model.weight_decay
    )
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=[(f"{model.name}.{n}", p) for n, p in net.named_parameters()]
    )

    # --- loop ---------------------------------------------------------------------------------
    model.curve = []
    for epoch in range(model.epochs):
        sampler.set_epoch(epoch)
        net.train()
        total, batches = 0.0, 0
        for batch in loader:
            optimizer.zero_grad()
            loss = model.loss(batch, gen)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        avg = hvd.allreduce(torch.tensor(total / max(batches, 1)), name=f"loss{epoch}").item()
        model.curve.append(avg)
    return net


def _fit_with_horovodrun(model: _Neural, data: Interactions) -> nn.Module:
    """Run :func:`train_loop` on ``model.workers`` Gloo processes; return rank 0's module."""
    with tempfile.TemporaryDirectory(prefix="shopml-hvd-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        out = Path(tmp) / "net.pt"
        with spec.open("wb") as f:
            pickle.dump((model, data), f)
        cmd = [
            str(Path(sys.executable).with_name("horovodrun")),
            "-np", str(model.workers), "-H", f"localhost:{model.workers}", "--gloo",
            sys.executable, "-m", "training.recommenders.neural", str(spec), str(out),
        ]  # fmt: skip
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root,
               os.environ.get("PYTHONPATH")]))}  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"horovodrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        net, curve = torch.load(out, weights_only=False)
        model.curve = curve
        return net


def _worker_main(spec: str, out: str) -> None:
    import horovod.torch as hvd

    with open(spec, "rb") as f:
        model, data = pickle.load(f)
    model._fit_common(data)
    model.prepare(data)
    net = train_loop(model, data)
    if hvd.rank() == 0:
        torch.save((net, model.curve), out)


# --- two-tower ------------------------------------------------------------------------------------


class _Towers(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users + 1, dim)  # last row: users unseen at training
        self.item = nn.Embedding(n_items, dim)
        self.item_bias = nn.Embedding(n_items, 1)
        self.user_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.user.weight, std=0.05)
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.zeros_(self.item_bias.weight)

    def user_vec(self, users: torch.Tensor) -> torch.Tensor:
        e = self.user(users)
        return e + self.user_mlp(e)


@register
@dataclass
class TwoTowerRetrieval(_Neural):
    """Dot-product retrieval model trained with mixed negatives and logQ correction."""

    name: ClassVar[str] = "two_tower"
    negatives: int = 512
    temperature: float = 0.1

    def build(self, data: Interactions) -> nn.Module:
        return _Towers(data.n_users, data.n_items, self.dim)

    def prepare(self, data: Interactions) -> None:
        counts = np.bincount(data.events[ITEM_IDX], minlength=data.n_items).astype(np.float64)
        self.log_p = torch.tensor(
            np.log(np.maximum(counts, 0.5) / counts.sum()), dtype=torch.float32
        )
        self.n_items = data.n_items

    def examples(self, data: Interactions) -> torch.utils.data.Dataset:
        ev = data.events
        return torch.utils.data.TensorDataset(
            torch.tensor(ev[USER_IDX].to_numpy(np.int64)),
            torch.tensor(ev[ITEM_IDX].to_numpy(np.int64)),
        )

    def loss(self, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        users, pos = batch
        net = self.net
        u = nn.functional.normalize(net.user_vec(users), dim=-1)
        neg = torch.randint(self.n_items, (self.negatives,), generator=gen)
        cand = torch.cat([pos, neg])
        v = nn.functional.normalize(net.item(cand), dim=-1)
        logits = (u @ v.T) / self.temperature + net.item_bias(cand).squeeze(-1)
        # logQ: expected count of each candidate in the batch's negatives
        b = len(pos)
        log_q = torch.cat(
            [
                self.log_p[pos] + math.log(b),
                torch.full((self.negatives,), math.log(self.negatives / self.n_items)),
            ]
        )
        logits = logits - log_q
        # accidental hits: a candidate equal to the row's positive (other than itself) is masked
        hit = cand.unsqueeze(0) == pos.unsqueeze(1)
        hit[torch.arange(b), torch.arange(b)] = False
        logits = logits.masked_fill(hit, float("-inf"))
        return nn.functional.cross_entropy(logits, torch.arange(b))

    @torch.no_grad()
    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        idx = torch.tensor(np.where(users < self.train_matrix.shape[0], users,
                                    self.train_matrix.shape[0]))  # fmt: skip
        u = nn.functional.normalize(self.net.user_vec(idx), dim=-1)
        v = nn.functional.normalize(self.net.item.weight, dim=-1)
        s = (u @ v.T) / self.temperature + self.net.item_bias.weight.squeeze(-1)
        s = torch.softmax(s, dim=1).numpy()
        s[users >= self.train_matrix.shape[0]] = 0.0
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


if __name__ == "__main__":  # the horovodrun worker entry point
    _worker_main(sys.argv[1], sys.argv[2])
