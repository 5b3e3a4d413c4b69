"""Fit and evaluate models of the zoo on one split, log them to MLflow, print one table.

The single entry point shared by the DAG's evaluate task, the CLI (``shopml zoo``), the
hyperparameter search and the benchmarks, so every number comes from the same code path:
``mlkit.metrics.evaluate`` on a ``mlkit.splits`` split.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mlkit.metrics import EvaluationResult, evaluate
from mlkit.splits import Split
from zoo import build

HEADLINE = ("hr", "recall", "precision", "ndcg", "mrr", "map", "map_full")


@dataclass
class Fitted:
    name: str
    config: dict[str, Any]
    model: Any
    result: EvaluationResult
    fit_seconds: float
    size_bytes: int

    def row(self) -> dict[str, Any]:
        """The table row: headline metrics, beyond-accuracy, CI, size and fit time."""
        k = self.result.k
        means = self.result.means()
        row: dict[str, Any] = {"model": self.name}
        for m in HEADLINE:
            row[f"{m}@{k}"] = means.get(f"{m}_at_{k}")
        ci = self.result.ci("ndcg", n_boot=500)
        row[f"ndcg@{k} 95% CI"] = f"[{ci.low:.4f}, {ci.high:.4f}]"
        row["coverage"] = self.result.summary.get(f"coverage_at_{k}")
        row["diversity"] = means.get(f"diversity_at_{k}")
        row["novelty"] = means.get(f"novelty_at_{k}")
        for seg in ("cold", "heavy", "long_tail"):
            if seg in self.result.segments:
                row[f"ndcg {seg}"] = self.result.means(seg).get(f"ndcg_at_{k}")
        row["size_mb"] = self.size_bytes / 1e6
        row["fit_s"] = self.fit_seconds
        row["config"] = json.dumps(self.config, sort_keys=True)
        return row


def model_size_bytes(model: Any) -> int:
    """Bytes of the pickled fitted model (weights, neighbourhoods, factors: what is shipped)."""
    return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def check_inputs(split: Split, k: int) -> None:
    """Impossible setups fail here, before any model is fitted."""
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    if split.train.events.empty:
        raise ValueError(
            f"empty training set after the split ({split.description}): "
            "check the data's date range and the split parameters"
        )
    if split.test.events.empty:
        raise ValueError(f"empty test set after the split ({split.description})")


def fit_and_evaluate(
    name: str, config: dict[str, Any], split: Split, k: int, exclude_seen: bool, **eval_kw: Any
) -> Fitted:
    """Build (config errors surface here, before any training), fit on train, evaluate on test."""
    check_inputs(split, k)
    model = build(name, **config)
    started = time.perf_counter()
    model.fit(split.train)
    seconds = time.perf_counter() - started
    result = evaluate(
        model, split.train, split.test, k, exclude_seen=exclude_seen, split=split.description,
        **eval_kw,
    )  # fmt: skip
    return Fitted(name, dict(config), model, result, seconds, model_size_bytes(model))


def compare(
    models: dict[str, tuple[str, dict[str, Any]]],
    split: Split,
    k: int,
    exclude_seen: bool,
    log_to_mlflow: bool = False,
) -> tuple[pd.DataFrame, dict[str, Fitted]]:
    """Fit every ``label -> (model name, config)`` on the same split; one row per model.

    All configs are built first, so a typo in the last model fails before the first trains.
    """
    check_inputs(split, k)
    for name, config in models.values():
        build(name, **config)
    fitted: dict[str, Fitted] = {}
    for label, (name, config) in models.items():
        f = fit_and_evaluate(name, config, split, k, exclude_seen)
        f.name = label
        fitted[label] = f
        if log_to_mlflow:
            log_fitted(f)
    table = pd.DataFrame([f.row() for f in fitted.values()])
    table.attrs["protocol"] = next(iter(fitted.values())).result.protocol if fitted else ""
    return table, fitted


def log_fitted(f: Fitted) -> None:
    """One nested MLflow run per model: its config, metrics, segment table and size."""
    import mlflow

    with mlflow.start_run(run_name=f.name, nested=True):
        mlflow.log_params({"model": f.name, **{f"config.{k}": v for k, v in f.config.items()}})
        metrics = {k.replace("@", "_at_"): v for k, v in f.row().items()
                   if isinstance(v, float) and v == v}  # fmt: skip
        mlflow.log_metrics({k.replace(" ", "_"): v for k, v in metrics.items()})
        mlflow.log_table(f.result.table(), "segments.json")
        mlflow.set_tag("protocol", f.result.protocol)


def format_table(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    """Markdown table with 4 decimals (what the benchmarks print and the docs quote)."""
    cols = columns or [c for c in table.columns if c != "config"]
    out = table[cols].copy()
    for c in cols:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    header = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(str(v) for v in r) + " |" for r in out.itertuples(index=False)]
    return "\n".join([header, sep, *body])


@dataclass(frozen=True)
class Protocol:
    """A dataset with its evaluation protocol: how to split, and whether seen items count."""

    dataset: str
    split: str
    split_params: dict[str, Any]
    exclude_seen: bool
    k: int = 10


PROTOCOLS: dict[str, Protocol] = {
    # stratified 75/25 per user (python_stratified_split's default), rank unseen items
    "movielens-100k": Protocol("movielens-100k", "stratified", {"ratio": 0.75, "seed": 42}, True),
    # Microsoft Recommenders' MovieLens benchmark notebook: the same, stratified per item
    "movielens-100k-item": Protocol(
        "movielens-100k", "stratified", {"ratio": 0.75, "seed": 42, "by": "item"}, True
    ),
    # Next-basket commerce: each user's last basket held out, repeats allowed (reorders count)
    "instacart": Protocol("instacart", "leave_last_out", {}, False),
}


def load_interactions(dataset: str):
    """The Interactions of a named dataset (read from installed packages, nothing downloaded)."""
    from mlkit.interactions import from_events
    from zoo import datasets

    if dataset == "movielens-100k":
        events, items = datasets.movielens_100k()
        return from_events(events, items, event_types=None)
    if dataset == "instacart":
        return from_events(datasets.instacart())
    raise ValueError(f"unknown dataset '{dataset}'; choose one of {sorted(PROTOCOLS)}")


def protocol_split(protocol: Protocol, data=None) -> Split:
    """The protocol's train/test split of its dataset (or of ``data`` when given)."""
    from mlkit.splits import make_split

    data = data if data is not None else load_interactions(protocol.dataset)
    return make_split(data, protocol.split, **protocol.split_params)


def validation_split(protocol: Protocol, split: Split) -> Split:
    """The same protocol applied inside the training part: what tuning may look at.

    Tuning on the test split would flatter every tuned model; the benchmarks tune here and
    report on the untouched test split.
    """
    from mlkit.splits import make_split

    return make_split(split.train, protocol.split, **protocol.split_params)
