"""Real distributed training: the one loop under horovodrun -np 2 (Gloo) on a tiny run."""

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from shopml import schema as S
from shopml.config import TrainConfig
from training.train import train_two_tower

pytestmark = pytest.mark.integration


def test_two_horovod_workers_learn_the_two_tower(settings, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    users = [f"u{i}" for i in range(30)]
    items = [f"i{i}" for i in range(40)]
    rows = [
        {S.USER_ID: u, S.ITEM_ID: items[(3 * n + j) % 40], **dict.fromkeys(S.USER_FEATURES, 2.0)}
        for n, u in enumerate(users)
        for j in range(4)
    ]
    # 8 row groups of 16 (the last 8): each rank reads its own four (mlkit.shards)
    pd.DataFrame(rows).to_parquet(run_dir / "train.parquet", row_group_size=16)
    (run_dir / "vocab.json").write_text(
        json.dumps({"users": users, "items": items, "popular": items[:3]})
    )
    # lr 0.05: the embeddings are updated lazily (mlkit.loop.LazyAdam), a row once per epoch here
    cfg = TrainConfig(epochs=6, workers=2, batch_size=16, negatives=16, dim=8, lr=0.05)
    model, curve = train_two_tower(settings.model_copy(update={"train": cfg}), run_dir)
    assert [p["epoch"] for p in curve] == list(range(6))
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]  # it learned, across both ranks
    assert model.item_ids == items


# --- faults: a retried task resumes; a killed worker does not stop an elastic job --------------

CRASH = {"after_batches": None, "seen": 0}


@dataclass(frozen=True)
class Line:
    """y = 2a - b on 64 seeded points: a loss that falls for as long as it trains."""

    kill_rank_at_epoch: int | None = None  # that rank's process dies there, once (elastic test)
    marker: str = ""

    def build(self):
        return torch.nn.Linear(2, 1)

    def dataset(self, net):
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.TensorDataset(x, x @ torch.tensor([[2.0], [-1.0]]))

    def loss(self, net, batch, gen):
        import os
        import signal

        import horovod.torch as hvd

        CRASH["seen"] += 1
        if CRASH["after_batches"] is not None and CRASH["seen"] > CRASH["after_batches"]:
            raise RuntimeError("simulated crash of the task")
        batches_per_epoch = 4  # 64 points, 2 ranks, batches of 8
        if (
            self.kill_rank_at_epoch is not None
            and hvd.rank() == 1
            and not os.path.exists(self.marker)
            and CRASH["seen"] > batches_per_epoch * self.kill_rank_at_epoch + 2
        ):
            open(self.marker, "w").close()  # noqa: SIM115
            os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-epoch
        x, y = batch
        return torch.nn.functional.mse_loss(net(x), y)


def test_a_retried_training_resumes_from_its_last_checkpoint(tmp_path, capsys):
    from mlkit.launch import train
    from mlkit.loop import LoopConfig

    cfg = LoopConfig(epochs=6, batch_size=16, lr=0.05, name="line",
                     checkpoint=str(tmp_path / "ckpt.pt"), data_version="v1")  # fmt: skip
    CRASH.update(after_batches=12, seen=0)  # 4 batches an epoch: dies in the 4th epoch
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(Line(), cfg, workers=1)
    CRASH.update(after_batches=None, seen=0)
    _, curve = train(Line(), cfg, workers=1)  # the retry
    assert "line: resumed from" in capsys.readouterr().out
    assert [p["epoch"] for p in curve] == list(range(6))
    assert CRASH["seen"] == 3 * 4  # only epochs 3, 4, 5 ran again
    assert curve[-1]["loss"] < curve[2]["loss"]  # and it went on learning
    # a checkpoint of other data (a rebuilt training set) is not resumed
    CRASH.update(seen=0)
    other_data = LoopConfig(**{**cfg.__dict__, "data_version": "v2"})
    train(Line(), other_data, workers=1)
    assert CRASH["seen"] == 6 * 4
    # nor one of the task's other settings (mlkit.loop.task_settings); the same ones resume
    CRASH.update(seen=0)
    train(Line(), other_data, workers=1)
    assert CRASH["seen"] == 0  # all 6 epochs were done: nothing left to run
    train(Line(marker="another setting"), other_data, workers=1)
    assert CRASH["seen"] == 6 * 4


def test_an_elastic_job_survives_a_killed_worker(tmp_path):
    """Two Gloo ranks, rank 1 SIGKILLed mid-epoch: the job finishes on the survivor from the
    last committed epoch, with the loss still falling."""
    from mlkit.launch import train
    from mlkit.loop import LoopConfig

    CRASH.update(after_batches=None, seen=0)
    cfg = LoopConfig(epochs=8, batch_size=8, lr=0.02, name="line")
    task = Line(kill_rank_at_epoch=3, marker=str(tmp_path / "killed"))
    _, curve = train(task, cfg, workers=2, elastic=True)
    assert (tmp_path / "killed").exists()  # the worker really died
    assert [p["epoch"] for p in curve] == list(range(8))
    assert curve[-1]["loss"] < curve[3]["loss"] < curve[0]["loss"]
