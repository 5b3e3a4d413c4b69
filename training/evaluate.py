"""Offline evaluation of a run: the model, its int8 copy, the baselines and the champion,
all on the same holdout, written as one table."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from shopml import schema as S
from training import baselines
from training.data import PROTOCOL
from training.metrics import evaluate_rankings
from training.model import TwoTower


def holdout(run_dir: Path) -> tuple[dict[str, set[str]], pd.DataFrame, pd.DataFrame]:
    """(truth per user, the test users' point-in-time features, the training events)."""
    test = pd.read_parquet(run_dir / "test.parquet")
    truth = test.groupby(S.USER_ID)[S.ITEM_ID].apply(set).to_dict()
    users = pd.read_parquet(run_dir / "test_users.parquet").set_index(S.USER_ID)
    train = pd.read_parquet(run_dir / "train_events.parquet")
    return truth, users, train


@torch.no_grad()
def model_rankings(model: TwoTower, user_features: pd.DataFrame, k: int) -> dict[str, list[str]]:
    users = user_features.index.tolist()
    rows = user_features[list(model.feature_names)].to_dict("records")
    return {
        u: [i for i, _ in recs]
        for u, recs in zip(users, model.recommend(users, rows, k), strict=True)
    }


def model_size_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def cpu_latency_ms(
    model: TwoTower, user_features: pd.DataFrame, k: int, repeats: int = 50
) -> float:
    """Median wall time of one single-user recommendation on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = user_features.head(1)
        model_rankings(model, one, k)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model_rankings(model, one, k)
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times))
    finally:
        torch.set_num_threads(threads)


def evaluate_run(
    run_dir: Path,
    k: int,
    models: dict[str, TwoTower],
) -> pd.DataFrame:
    """One row per model/baseline: Recall@k, NDCG@k and (for models) size and latency."""
    truth, user_features, train = holdout(run_dir)
    users = list(truth)
    feats = user_features.reindex(users).fillna(0.0)
    rows: list[dict[str, Any]] = []
    pop = baselines.popularity(train, k)
    rows.append({"model": "popularity", **evaluate_rankings(dict.fromkeys(users, pop), truth, k)})
    rows.append(
        {
            "model": "personal_top_frequency",
            **evaluate_rankings(baselines.personal_top_frequency(train, users, k), truth, k),
        }
    )
    for name, model in models.items():
        rows.append(
            {
                "model": name,
                **evaluate_rankings(model_rankings(model, feats, k), truth, k),
                "size_mb": model_size_bytes(model) / 1e6,
                "latency_ms": cpu_latency_ms(model, feats, k),
            }
        )
    table = pd.DataFrame(rows)
    table["protocol"] = PROTOCOL
    return table


def write_table(table: pd.DataFrame, run_dir: Path) -> Path:
    path = run_dir / "evaluation.json"
    path.write_text(json.dumps(table.to_dict("records"), indent=2))
    return path
