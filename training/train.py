"""The nightly two-tower: what the one Horovod loop (``mlkit.loop``) trains for the pipeline.

Examples are the run's training purchases with the user's point-in-time Feast features
(``train.parquet``, written by ``training.data``); the model is the served
``served_model.two_tower.TwoTower`` over the run's vocabularies (``vocab.json``); the loss is
its sampled softmax. Each rank reads only its own row groups of the examples
(``mlkit.shards``), so nothing large is pickled and no process holds the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mlkit.launch import train as launch
from mlkit.loop import Curve, LoopConfig
from mlkit.shards import read_shard
from served_model.two_tower import TwoTower, sampled_softmax_loss
from shopml import schema as S
from shopml.config import Settings, service_environment
from training.data import read_vocab


@dataclass(frozen=True)
class TwoTowerTask:
    """The pipeline's two-tower as a ``mlkit.loop.Trainable``."""

    run_dir: Path
    dim: int
    negatives: int
    sparse: bool = True  # sparse embedding gradients (train.sparse_embeddings)

    def build(self) -> TwoTower:
        vocab = read_vocab(self.run_dir)
        return TwoTower(vocab["users"], vocab["items"], vocab["popular"], dim=self.dim,
                        sparse=self.sparse)  # fmt: skip

    def dataset(self, net: TwoTower) -> torch.utils.data.TensorDataset:
        return self._tensors(net, pd.read_parquet(self.run_dir / "train.parquet"))

    def shard(self, net: TwoTower, rank: int, size: int) -> torch.utils.data.TensorDataset:
        """This rank's row groups of ``train.parquet`` (``mlkit.shards``): no process reads
        the whole training set."""
        columns = [S.USER_ID, S.ITEM_ID, *net.feature_names]
        return self._tensors(net, read_shard(self.run_dir / "train.parquet", rank, size, columns))

    def _tensors(self, net: TwoTower, df: pd.DataFrame) -> torch.utils.data.TensorDataset:
        item_pos = {item: i for i, item in enumerate(net.item_ids)}
        users = net.user_indices(df[S.USER_ID].tolist())
        items = torch.tensor(df[S.ITEM_ID].map(item_pos).to_numpy(dtype=np.int64))
        feats = torch.tensor(df[list(net.feature_names)].to_numpy(dtype=np.float32))
        return torch.utils.data.TensorDataset(users, feats, items)

    def loss(self, net: TwoTower, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        users, feats, items = batch
        return sampled_softmax_loss(net, users, feats, items, self.negatives, gen)


CHECKPOINT = Path("checkpoints") / "two_tower.pt"


def data_version(*files: Path) -> str:
    """Identifies the training data a checkpoint belongs to (a rebuilt set is another one)."""
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def train_two_tower(settings: Settings, run_dir: Path) -> tuple[TwoTower, Curve]:
    """Train on ``settings.train.workers`` Horovod processes; rank 0's model and the curve.

    Every epoch is checkpointed under the run directory, so a retried task resumes from the
    last one (``mlkit.loop``); with ``train.elastic`` a lost worker does not stop the job."""
    cfg = settings.train
    loop = LoopConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        name="two_tower",
        checkpoint=str(run_dir / CHECKPOINT),
        data_version=data_version(run_dir / "train.parquet", run_dir / "vocab.json"),
    )
    task = TwoTowerTask(run_dir, cfg.dim, cfg.negatives, cfg.sparse_embeddings)
    return launch(task, loop, cfg.workers, env=service_environment(settings), elastic=cfg.elastic)
