"""Real distributed training: the one loop under horovodrun -np 2 (Gloo) on a tiny run."""

import json

import pandas as pd
import pytest

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
    pd.DataFrame(rows).to_parquet(run_dir / "train.parquet")
    (run_dir / "vocab.json").write_text(
        json.dumps({"users": users, "items": items, "popular": items[:3]})
    )
    cfg = TrainConfig(epochs=6, workers=2, batch_size=16, negatives=16, dim=8, lr=0.02)
    model, curve = train_two_tower(settings.model_copy(update={"train": cfg}), run_dir)
    assert [p["epoch"] for p in curve] == list(range(6))
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]  # it learned, across both ranks
    assert model.item_ids == items
