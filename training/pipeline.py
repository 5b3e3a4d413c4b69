"""The training stage's DAG tasks: train, compress, evaluate, promote.

Each reads and writes the run directory of its logical date; the MLflow run id passes
between them as a file there (``mlflow_run_id``), never through XCom.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date

import pandas as pd
import torch

from shopml.config import Settings
from training import registry
from training.compress import quantize_int8
from training.evaluate import evaluate_run, write_table
from training.launch import train_distributed


class PromotionRefused(Exception):
    """Raised only when asked to fail on a losing model (not the default)."""


def _run_id(settings: Settings, ds: date) -> str:
    return (settings.paths.run(ds) / "mlflow_run_id").read_text().strip()


def train(settings: Settings, ds: date) -> dict[str, object]:
    """Start the MLflow run, train with Horovod, log the loss curve."""
    import mlflow

    run_dir = settings.paths.run(ds)
    params = {f"train.{k}": v for k, v in settings.train.model_dump().items()}
    params |= {"eval.k": settings.eval.k, "eval.promotion_margin": settings.eval.promotion_margin}
    run_id = registry.start_run(settings, ds.isoformat(), params)
    (run_dir / "mlflow_run_id").write_text(run_id)
    train_distributed(settings, run_dir, run_id)
    curve = json.loads((run_dir / "loss_curve.json").read_text())
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(curve, "loss_curve.json")
    return {"run_id": run_id, "final_loss": curve[-1]["loss"], "epochs": len(curve)}


def compress(settings: Settings, ds: date) -> dict[str, object]:
    """The int8 copy, saved beside the float model (evaluate measures both)."""
    run_dir = settings.paths.run(ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    torch.save(quantize_int8(model), run_dir / "model_int8.pt")
    return {"int8": str(run_dir / "model_int8.pt")}


def evaluate(settings: Settings, ds: date) -> pd.DataFrame:
    """Model, int8 copy, baselines and current champion on the same holdout."""
    import mlflow

    run_dir = settings.paths.run(ds)
    models = {
        "two_tower": torch.load(run_dir / "model.pt", weights_only=False),
        "two_tower_int8": torch.load(run_dir / "model_int8.pt", weights_only=False),
    }
    champ = registry.champion_version(settings)
    if champ is not None:
        models[f"champion_v{champ}"] = registry.load_version(settings, champ)
    table = evaluate_run(run_dir, settings.eval.k, models)
    write_table(table, run_dir)
    k = settings.eval.k
    with mlflow.start_run(run_id=_run_id(settings, ds)):
        for row in table.to_dict("records"):
            for metric in (f"recall_at_{k}", f"ndcg_at_{k}", "size_mb", "latency_ms"):
                if pd.notna(row.get(metric)):
                    mlflow.log_metric(f"{row['model']}.{metric}", float(row[metric]))
        mlflow.log_table(table, "evaluation.json")
    print(table.drop(columns="protocol").to_string(index=False))
    return table


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    ndcg: float
    ratio_to_top_frequency: float


def promote(settings: Settings, ds: date) -> Decision:
    """Register the model; move ``champion`` only if it beats popularity and the champion."""
    import mlflow

    run_dir = settings.paths.run(ds)
    k, margin = settings.eval.k, settings.eval.promotion_margin
    table = pd.DataFrame(json.loads((run_dir / "evaluation.json").read_text())).set_index("model")
    metric = f"ndcg_at_{k}"
    ndcg = float(table.loc["two_tower", metric])
    bars = {"popularity": float(table.loc["popularity", metric])}
    bars |= {m: float(table.loc[m, metric]) for m in table.index if m.startswith("champion_v")}
    beaten = {m: ndcg > v * (1 + margin) for m, v in bars.items()}

    run_id = _run_id(settings, ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    uri = registry.log_model(settings, run_id, model, "model")
    registry.log_model(
        settings, run_id, torch.load(run_dir / "model_int8.pt", weights_only=False), "model_int8"
    )
    version = registry.register(settings, uri, run_id)
    ratio = ndcg / float(table.loc["personal_top_frequency", metric])
    if all(beaten.values()):
        registry.set_champion(settings, version)
        reason = "beats " + ", ".join(f"{m} ({v:.4f})" for m, v in bars.items())
    else:
        lost = [f"{m} ({bars[m]:.4f})" for m, ok in beaten.items() if not ok]
        reason = (
            f"NOT promoted: {metric}={ndcg:.4f} does not beat {', '.join(lost)} by margin {margin}"
        )
    decision = Decision(version, all(beaten.values()), reason, ndcg, ratio)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("promoted", float(decision.promoted))
        mlflow.log_metric("ratio_to_personal_top_frequency", ratio)
        mlflow.set_tag("promotion", reason)
    (run_dir / "promotion.json").write_text(json.dumps(decision.__dict__, indent=2))
    print(
        f"model version {version}: {reason}; {metric} ratio to personal top-frequency {ratio:.3f}"
    )
    return decision
