"""The training stage's DAG tasks: train, compress, evaluate, promote.

Each reads and writes the run directory of its logical date; the MLflow run id passes
between them as a file there (``mlflow_run_id``), never through XCom.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from mlkit.interactions import Interactions
from shopml import schema as S
from shopml.config import Settings
from shopml.feast_store import point_in_time_features
from training import gate, ledger, registry, report
from training.compress import quantize_int8
from training.evaluate import (
    ScorerFactory,
    evaluate_run,
    segments_of,
    write_results,
)
from training.train import CHECKPOINT, train_two_tower

SERVED = "two_stage"  # the evaluation row of the path `shopml serve` answers with


def role_of(model: str, zoo: set[str]) -> str:
    """The role of an evaluation row (``training.report`` tags and colours runs by it)."""
    if model == SERVED:
        return "served"
    if model.startswith("champion_v"):
        return "champion"
    if model in zoo:
        return "zoo"
    if model.endswith("_int8"):
        return "compressed"
    return "retrieval" if model == "two_tower" else "baseline"


class PromotionRefused(Exception):
    """Raised only when asked to fail on a losing model (not the default)."""


def _run_id(settings: Settings, ds: date) -> str:
    return (settings.paths.run(ds) / "mlflow_run_id").read_text().strip()


def train(settings: Settings, ds: date) -> dict[str, object]:
    """Start the MLflow run, train with Horovod, save the model and log the loss curve."""
    import mlflow

    run_dir = settings.paths.run(ds)
    params = {f"train.{k}": v for k, v in settings.train.model_dump().items()}
    params |= {"eval.k": settings.eval.k, "eval.promotion_margin": settings.eval.promotion_margin}
    run_id = registry.start_run(settings, ds.isoformat(), params)
    (run_dir / "mlflow_run_id").write_text(run_id)
    model, curve = train_two_tower(settings, run_dir)
    torch.save(model, run_dir / "model.pt")
    # the checkpoint served a retry of this task; a later rerun of the date trains afresh
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    (run_dir / "loss_curve.json").write_text(json.dumps(curve))
    with mlflow.start_run(run_id=run_id):
        for point in curve:
            mlflow.log_metric("train_loss", point["loss"], step=int(point["epoch"]))
        mlflow.log_dict(curve, "loss_curve.json")
    return {"run_id": run_id, "final_loss": curve[-1]["loss"], "epochs": len(curve)}


def compress(settings: Settings, ds: date) -> dict[str, object]:
    """The int8 copy, saved beside the float model (evaluate measures both)."""
    run_dir = settings.paths.run(ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    torch.save(quantize_int8(model), run_dir / "model_int8.pt")
    return {"int8": str(run_dir / "model_int8.pt")}


def served_path(
    settings: Settings, purchases: pd.DataFrame, model: torch.nn.Module, ranker: torch.nn.Module
) -> ScorerFactory:
    """The path ``shopml serve`` answers with (retrieval + ranker, ``mlkit.two_stage``),
    replayed on the holdout with Feast's point-in-time features; tables know ``purchases``."""
    from mlkit.two_stage import offline_engine, scorer

    def factory(train: Interactions, test_users: pd.DataFrame) -> Callable:
        engine = offline_engine(purchases, model, ranker.eval(), settings.serving)
        return scorer(engine, train, test_users, partial(point_in_time_features, settings))

    return factory


def evaluate(settings: Settings, ds: date) -> pd.DataFrame:
    """Model, int8 copy, champion, baselines and the Params' zoo models on the same holdout."""
    import mlflow

    from zoo import build

    run_dir = settings.paths.run(ds)
    zoo = {m: (m, settings.eval.model_configs.get(m, {})) for m in settings.eval.models}
    for name, config in zoo.values():
        build(name, **config)  # unknown names and bad configs fail before anything is fitted
    models = {
        "two_tower": torch.load(run_dir / "model.pt", weights_only=False),
        "two_tower_int8": torch.load(run_dir / "model_int8.pt", weights_only=False),
    }
    ranker = torch.load(run_dir / "ranker.pt", weights_only=False)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]  # the tables know no held-out basket
    # the path `shopml serve` answers with: retrieval + ranker, point-in-time features
    scorers = {SERVED: served_path(settings, purchases, models["two_tower"], ranker)}
    champ = registry.champion_version(settings)
    if champ is not None:
        model, champion_ranker = registry.load_servable(settings, champ, run_dir / "champion")
        models[f"champion_v{champ}"] = model
        if champion_ranker is not None:  # versions registered before two-stage serving have none
            scorers[f"champion_v{champ}_{SERVED}"] = served_path(
                settings, purchases, model, champion_ranker
            )
    k = settings.eval.k
    table, per_user = evaluate_run(run_dir, k, models, zoo, scorers=scorers)
    table.insert(1, "role", [role_of(m, set(zoo)) for m in table["model"]])
    write_results(table, per_user, run_dir)
    curves = {
        "two-tower (train loss)": json.loads((run_dir / "loss_curve.json").read_text()),
        "ranker": json.loads((run_dir / "ranker_loss.json").read_text())["curve"],
    }
    configs = {label: config for label, (_, config) in zoo.items()}
    with mlflow.start_run(run_id=_run_id(settings, ds)):
        report.log_evaluation(table, k, ds.isoformat(), SERVED, configs, curves)
    cols = ["model", "role", f"ndcg_at_{k}", f"recall_at_{k}", f"ndcg_at_{k}_ci_low",
            f"ndcg_at_{k}_ci_high", "size_mb", "latency_ms"]  # fmt: skip
    print(table[[c for c in cols if c in table]].to_string(index=False))
    return table


def serving_artifacts(settings: Settings, ds: date, model: torch.nn.Module) -> list[Path]:
    """The faiss index, ranker and candidate tables registered with the model (serving/bundle.py).

    Built from every purchase up to ``ds`` (the held-out baskets included: serving should know
    a shopper's latest basket) and the run's catalog.
    """
    from served_model.bundle import write_artifacts
    from training.data import load_clean

    run_dir = settings.paths.run(ds)
    events, items = load_clean(settings, ds)
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]
    ranker = torch.load(run_dir / "ranker.pt", weights_only=False)
    return write_artifacts(run_dir / "serving", model, ranker, purchases, items)


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    ndcg: float
    ratio_to_top_frequency: float
    gate: dict[str, object]


def promote(settings: Settings, ds: date) -> Decision:
    """Register the model; move ``champion`` only if the gate says so (training/gate.py):
    the paired-bootstrap lower bound of its NDCG gain over the champion (first run:
    popularity) clears the margin and no protected segment regresses beyond tolerance."""
    import mlflow

    run_dir = settings.paths.run(ds)
    k = settings.eval.k
    table = pd.DataFrame(json.loads((run_dir / "evaluation.json").read_text())).set_index("model")
    per_user = pd.read_parquet(run_dir / "per_user.parquet")
    # The candidate is what serving would answer with, and so is the reference. A champion
    # registered before two-stage serving has no served-path row: it is then judged by the
    # row it does have, re-evaluated on today's holdout, never replaced by the baseline.
    candidate = SERVED if SERVED in table.index else "two_tower"
    evaluated = sorted(m for m in table.index if re.fullmatch(r"champion_v\d+(_.*)?", m))
    champion = next(
        (m for m in evaluated if m.endswith(SERVED)), evaluated[0] if evaluated else None
    )
    evaluated_against = re.match(r"champion_v(\d+)", champion).group(1) if champion else None
    verdict = gate.decide(
        segments_of(per_user, candidate),
        champion=segments_of(per_user, champion) if champion else None,
        baseline=segments_of(per_user, "popularity"),
        metric="ndcg",
        margin=settings.eval.promotion_margin,
        tolerance=settings.eval.segment_tolerance,
    )
    metric = f"ndcg_at_{k}"
    ndcg = float(table.loc[candidate, metric])

    run_id = _run_id(settings, ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    example = pd.read_parquet(run_dir / "test_users.parquet").head(2)
    example = example[[S.USER_ID, *model.feature_names]].astype({S.USER_ID: str})
    uri = registry.log_model(
        settings, run_id, model, "model", serving_artifacts(settings, ds, model), example
    )
    registry.log_model(
        settings,
        run_id,
        torch.load(run_dir / "model_int8.pt", weights_only=False),
        "model_int8",
        input_example=example,
    )
    tags = {"ds": ds.isoformat(), "evaluated_as": candidate}
    version = registry.register(settings, uri, run_id, tags)
    ratio = ndcg / float(table.loc["personal_top_frequency", metric])
    with ledger.alias_lock(settings):  # read, decide and move as one step (training/ledger.py)
        current = registry.champion_version(settings)
        promoted = verdict.promote and current == evaluated_against
        if promoted:
            registry.set_champion(settings, version)
            reason = "promoted: " + "; ".join(verdict.reasons)
        elif verdict.promote:
            was = f"v{evaluated_against}" if evaluated_against else "none"
            reason = (f"NOT promoted: the champion moved from {was} to v{current} since this "
                      "run's evaluation; rerun evaluate and promote for this date. "
                      + "; ".join(verdict.reasons))  # fmt: skip
        else:
            reason = "NOT promoted: " + "; ".join(verdict.reasons)
        entry = ledger.record(
            settings,
            ledger.Entry(
                action="gate",
                model=settings.model_name,
                champion_before=current,
                champion_after=version if promoted else current,
                reason=reason,
                ds=ds.isoformat(),
                challenger=version,
                promoted=promoted,
                metrics=ledger.metrics_of(verdict.numbers),
            ),
        )
    decision = Decision(version, promoted, reason, ndcg, ratio, verdict.to_dict())
    description = report.decision_markdown(
        verdict, table.reset_index(), k, ds.isoformat(), candidate, version, promoted
    )
    registry.describe_version(settings, version, description)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("promoted", float(decision.promoted))
        mlflow.log_metric("ratio_to_personal_top_frequency", ratio)
        mlflow.set_tags({
            "promotion": "promoted" if decision.promoted else "not promoted",
            "model_version": version,
            "ledger_run_id": entry.run_id,
            "mlflow.note.content": description,  # the run's description: the whole reason
        })  # fmt: skip
        mlflow.log_dict(verdict.to_dict(), "promotion.json")
        mlflow.log_figure(
            report.gate_difference(verdict.numbers, promoted, metric),
            f"{report.PLOTS}/gate_difference.png",
        )
    (run_dir / "promotion.json").write_text(json.dumps(decision.__dict__, indent=2, default=str))
    print(
        f"model version {version}: {reason}; {metric} ratio to personal top-frequency {ratio:.3f}"
    )
    return decision
