"""Real distributed training: horovodrun -np 2 over Gloo on a tiny run directory."""

import json

import pandas as pd
import pytest
import torch

from shopml import schema as S
from shopml.config import TrainConfig
from training.launch import train_distributed

pytestmark = pytest.mark.integration


def test_horovodrun_two_workers_trains_and_saves_on_rank0(settings, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    users = [f"u{i}" for i in range(30)]
    items = [f"i{i}" for i in range(40)]
    rows = [
        {S.USER_ID: u, S.ITEM_ID: items[(3 * n + j) % 40], **dict.fromkeys(S.USER_FEATURES, 2.0)}
        for n, u in enumerate(users)
        for j in range(4)
    ]
    pd.DataFrame(rows).to_parquet(run_dir / "train.parquet")
    (run_dir / "vocab.json").write_text(
        json.dumps({"users": users, "items": items, "popular": items[:3]})
    )
    cfg = TrainConfig(epochs=6, workers=2, batch_size=16, negatives=16, dim=8, lr=0.02)
    path = train_distributed(settings.model_copy(update={"train": cfg}), run_dir, None)
    curve = json.loads((run_dir / "loss_curve.json").read_text())
    assert len(curve) == 6 and curve[-1]["loss"] < curve[0]["loss"]
    model = torch.load(path, weights_only=False)
    assert model.item_ids == items
