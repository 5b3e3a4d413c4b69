"""The one data-parallel training loop (PyTorch + Horovod), for every neural model ShopML trains.

The nightly pipeline's two-tower (``training.train``) and every deep model of the zoo
(``zoo.neural``, ``zoo.hybrid``) describe *what* to train as a :class:`Trainable`: how to build
the network, which examples it learns from and the loss of one batch. This module is *how*:
it reads top to bottom like Horovod's PyTorch example, every distributed step named:

1. ``hvd.init()``; each process pinned to its GPU (``local_rank``), or to its share of the CPU
   threads; the seed is the same everywhere, the per-rank generator (negatives) is offset
   by rank.
2. model; examples sharded with a ``DistributedSampler`` (``set_epoch`` every epoch), or,
   for a task that reads its own shard from storage (``shard``), each rank's rows only
   (``mlkit.shards``).
3. Adam with the learning rate scaled by ``hvd.size()`` (the effective batch grows with it),
   parameters and optimizer state broadcast from rank 0, gradients averaged by
   ``hvd.DistributedOptimizer``. Embedding tables with sparse gradients
   (``nn.Embedding(sparse=True)``) are allgathered by Horovod as (rows, values) and updated
   lazily (:class:`LazyAdam`), so a step costs the batch's rows, not the vocabulary's.
4. the epochs; each epoch's mean loss averaged across ranks with ``allreduce``, printed by
   rank 0 only.

Faults. The loop's state (model, optimizer, epoch, loss curve, best validation weights) lives
in an ``hvd.elastic.TorchState`` committed after every epoch, and the epochs are one function
of that state (``run_epochs``) that resumes from ``state.epoch``:

* a lost worker: under an elastic launch (``mlkit.launch``, ``elastic=True``: ``horovodrun
  --min-np/--max-np`` with a host discovery script) ``hvd.elastic.run(run_epochs)`` rolls the
  surviving ranks back to the last commit, re-shards the data over them and goes on;
* a lost task (a retried Airflow try): with ``LoopConfig.checkpoint`` rank 0 also writes the
  committed state there after every epoch, and a new run of the loop with the same
  configuration resumes from it (a checkpoint of another configuration is ignored).

Run by :func:`mlkit.launch.train`: in process for one worker, else as
``horovodrun -np N --gloo python -m mlkit.loop SPEC OUT`` (this module's ``__main__``).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Trainable(Protocol):
    """What one model contributes to the loop; it must pickle (it travels to every rank)."""

    def build(self) -> nn.Module:
        """A freshly initialised network (the loop seeds torch first)."""
        ...

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        """The training examples (indexed by ``net``'s vocabularies where it has them)."""
        ...

    def loss(self, net: nn.Module, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """The loss of one batch; ``gen`` is this rank's generator (e.g. sampled negatives)."""
        ...

    # Optional: ``validation_loss(net) -> float | None``. When a task has it, each epoch's
    # validation loss joins the curve and the weights of the best epoch are the result.
    # Optional: ``shard(net, rank, size) -> Dataset``, this rank's part of the examples read
    # from storage (mlkit.shards), so no process holds them all; then ``dataset`` is not
    # called and a ShardSampler replaces the DistributedSampler.


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings shared by every model trained by the loop."""

    epochs: int
    batch_size: int  # per worker
    lr: float  # base learning rate, scaled by the number of workers
    weight_decay: float = 0.0
    seed: int = 42
    name: str = "model"  # prefixes the allreduce names and the printed lines
    checkpoint: str | None = None  # file rank 0 writes after every epoch; resumed from
    data_version: str = ""  # identifies the training data: a checkpoint of other data is stale

    def fingerprint(self) -> dict[str, object]:
        """What a checkpoint must match to be resumed (not where it is written)."""
        return {k: v for k, v in self.__dict__.items() if k != "checkpoint"}


def _plain(value: object) -> bool:
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def task_settings(task: object) -> dict[str, object]:
    """The task's kind and its own settings (a dataclass's plain fields: sizes, counts,
    flags, feature names; not arrays, frames or paths), for the checkpoint's fingerprint.

    Without them a retried task whose settings changed meanwhile (``train.dim``,
    ``train.sparse_embeddings``, the negatives) would resume the other configuration's
    weights: a shape error at best, at worst a model trained half one way, half another."""
    import dataclasses

    out: dict[str, object] = {"task": type(task).__qualname__}
    if dataclasses.is_dataclass(task):
        for f in dataclasses.fields(task):
            value = getattr(task, f.name)
            if _plain(value):
                out[f.name] = value
    return out


Curve = list[dict[str, float]]


def train_loop(task: Trainable, cfg: LoopConfig) -> tuple[nn.Module, Curve]:
    """Train ``task`` on this process's rank; every rank returns the same weights and curve."""
    import horovod.torch as hvd

    # --- distributed setup ---------------------------------------------------------------------
    hvd.init()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())  # one GPU per process
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (broadcast from rank 0 anyway)

    # --- model and data -----------------------------------------------------------------------
    net = task.build()
    shard = getattr(task, "shard", None)
    dataset = None if shard is not None else task.dataset(net)

    # --- optimizer: LR scaled by workers, state broadcast, gradients averaged ------------------
    optimizer = LazyAdam(net.parameters(), lr=cfg.lr * hvd.size(), weight_decay=cfg.weight_decay)
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=[(f"{cfg.name}.{n}", p) for n, p in net.named_parameters()]
    )
    state = hvd.elastic.TorchState(
        model=net, optimizer=optimizer, epoch=0, curve=[], best_loss=float("inf"), best=None
    )
    fingerprint = {"loop": cfg.fingerprint(), "task": task_settings(task)}
    resume(state, cfg, fingerprint)
    validate = getattr(task, "validation_loss", None)

    # --- loop ---------------------------------------------------------------------------------
    def run_epochs(state: hvd.elastic.TorchState) -> None:
        # (re)entered after an elastic reset: the shards follow the surviving ranks
        data, sampler = _sharded(task, net, dataset, cfg.seed)
        loader = batch_loader(data, sampler, cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed + hvd.rank())  # negatives differ by rank
        for epoch in range(state.epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            net.train()
            started, total, batches = time.time(), 0.0, 0
            for batch in loader:
                optimizer.zero_grad()
                loss = task.loss(net, batch, gen)
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            mean = torch.tensor(total / max(batches, 1))
            epoch_loss = hvd.allreduce(mean, name=f"{cfg.name}.epoch_loss").item()
            point = {"epoch": epoch, "loss": epoch_loss, "seconds": time.time() - started}
            if validate is not None and (val := _validation(net, validate)) is not None:
                point["val_loss"] = val
                if val < state.best_loss:  # early stopping: keep the best epoch's weights
                    state.best_loss = val
                    state.best = {k: v.detach().clone() for k, v in net.state_dict().items()}
            state.curve.append(point)
            if hvd.rank() == 0:
                print(f"{cfg.name} epoch {epoch}: loss {epoch_loss:.4f}", flush=True)
            state.epoch = epoch + 1
            state.commit()  # the point a lost worker rolls back to
            if hvd.rank() == 0:
                save_checkpoint(state, cfg, fingerprint)  # the point a retried task resumes from

    if os.environ.get("HOROVOD_ELASTIC") == "1":
        hvd.elastic.run(run_epochs)(state)
    else:
        run_epochs(state)
    if state.best is not None:
        net.load_state_dict(state.best)
    net.eval()
    return net, list(state.curve)


def batch_loader(
    data: torch.utils.data.Dataset, sampler, batch_size: int
) -> torch.utils.data.DataLoader:
    """The batches of ``data`` in ``sampler``'s order. A ``TensorDataset`` is indexed a batch
    at a time (one gather per tensor), giving the very batches the per-row default would:
    fetching and collating row by row was 80% of the ranker's training time at 10^6 events
    (30 million ``__getitem__`` calls)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        rows = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
        return torch.utils.data.DataLoader(data, sampler=rows, batch_size=None)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)


class LazyAdam(torch.optim.Adam):
    """Adam that also takes sparse gradients (``nn.Embedding(sparse=True)``): dense ones take
    Adam's own step; a sparse one updates only the rows it touches, with SparseAdam's rule
    (the moments of untouched rows are not decayed; ``weight_decay`` is L2 on those rows).

    Why: with dense embedding gradients every step reads and writes the whole user and item
    tables (Adam's update, Horovod's allreduce), so one epoch cost steps x vocabulary, and as
    both grow with the data, training was quadratic in it (issue 17: 10^7 events, 10^5 users,
    did not finish). torch has no Adam for a mix of sparse and dense parameters; the state
    layout is Adam's (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints, Horovod's state
    broadcast (a dense zero step) and a dense step on the same tensor all read it."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if any(g["amsgrad"] or g["maximize"] for g in self.param_groups):
            raise ValueError("LazyAdam: amsgrad and maximize are not supported")

    def step(self, closure=None):
        sparse = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]  # fmt: skip
        for _, p, _ in sparse:  # hidden from Adam, which refuses them
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for _, p, grad in sparse:
                p.grad = grad
        with torch.no_grad():
            for group, p, grad in sparse:
                self._sparse_step(group, p, grad)
        return loss

    def _sparse_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        grad = grad.coalesce()  # duplicate rows summed: the update is per unique row
        rows, values = grad.indices()[0], grad.values()
        if group["weight_decay"]:
            values = values.add(p[rows], alpha=group["weight_decay"])
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        m = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        step_size = group["lr"] * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)


def _sharded(task: Trainable, net: nn.Module, dataset, seed: int):
    """This rank's examples and sampler: the task's own shard (every rank the same number
    of steps: the largest shard's, agreed by allreduce) or the whole dataset, sharded by a
    ``DistributedSampler``."""
    import horovod.torch as hvd

    from mlkit.shards import ShardSampler

    if dataset is not None:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True, seed=seed
        )
        return dataset, sampler
    local = task.shard(net, hvd.rank(), hvd.size())
    largest = hvd.allreduce(torch.tensor(len(local)), op=hvd.Max, name="shard_rows").item()
    return local, ShardSampler(len(local), int(largest), seed=seed + hvd.rank())


def save_checkpoint(state, cfg: LoopConfig, fingerprint: dict[str, object]) -> None:
    """The committed state, written atomically (a crash mid-write leaves the previous one)."""
    if not cfg.checkpoint:
        return
    path = cfg.checkpoint
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {
        "fingerprint": fingerprint,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "epoch": state.epoch,
        "curve": list(state.curve),
        "best_loss": state.best_loss,
        "best": state.best,
    }
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def resume(state, cfg: LoopConfig, fingerprint: dict[str, object]) -> bool:
    """Load ``cfg.checkpoint`` into ``state`` when it was written by the same configuration
    (``fingerprint``: the loop's settings and the task's, :func:`task_settings`);
    every rank loads the same file, so they resume in step. Returns whether it resumed."""
    if not cfg.checkpoint or not os.path.exists(cfg.checkpoint):
        return False
    saved = torch.load(cfg.checkpoint, weights_only=False)
    if saved.get("fingerprint") != fingerprint:
        print(f"{cfg.name}: checkpoint {cfg.checkpoint} is of another configuration; ignored")
        return False
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.epoch, state.curve = saved["epoch"], saved["curve"]
    state.best_loss, state.best = saved["best_loss"], saved["best"]
    state.commit()
    print(f"{cfg.name}: resumed from {cfg.checkpoint} after epoch {state.epoch - 1}", flush=True)
    return True


@torch.no_grad()
def _validation(net: nn.Module, validate) -> float | None:
    """The task's validation loss in eval mode (batch norm, dropout), averaged over ranks."""
    import horovod.torch as hvd

    net.eval()
    value = validate(net)
    if value is None:
        return None
    return hvd.allreduce(torch.tensor(float(value)), name="validation_loss").item()


def _worker_main(spec: str, out: str) -> None:
    """Entry point of each ``horovodrun`` process: rank 0 writes the trained network."""
    import horovod.torch as hvd

    with open(spec, "rb") as f:
        task, cfg = pickle.load(f)
    net, curve = train_loop(task, cfg)
    if hvd.rank() == 0:
        torch.save((net, curve), out)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
