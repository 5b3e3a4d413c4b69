"""Offline evaluation of a nightly run: the trained model, its int8 copy, the champion, the
baselines and the zoo models chosen in the DAG's Params, all on the same holdout and through
the one evaluation library (``mlkit.metrics``), so the promotion gate compares like with like.

Writes ``evaluation.json`` (one row per model: metrics, segment NDCG, CI, size, latency) and
``per_user.parquet`` (per-user, per-segment metrics: what the gate resamples).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mlkit.interactions import Interactions, from_events, index_like
from mlkit.metrics import EvaluationResult, evaluate
from served_model.two_tower import TwoTower
from shopml import schema as S
from training.data import PROTOCOL, read_vocab

ScorerFactory = Callable[[Interactions, pd.DataFrame], Callable[[np.ndarray], np.ndarray]]
SEGMENTS = ("all", "cold", "heavy", "long_tail", "mostly_long_tail")

BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "popularity": ("popularity", {}),
    "personal_top_frequency": ("personal_top_frequency", {}),
}


def sample_users(users, n: int, seed: int) -> list:
    """A seeded sample of ``n`` of ``users``, sorted (all of them when ``n`` is 0 or more
    than there are): the users an evaluation is judged on when it samples."""
    users = sorted(users)
    if not n or n >= len(users):
        return users
    return sorted(np.random.default_rng(seed).choice(users, size=n, replace=False).tolist())


def run_interactions(
    run_dir: Path, max_users: int = 0, seed: int = 0
) -> tuple[Interactions, Interactions, pd.DataFrame]:
    """(train, test, test users' point-in-time features) of a run, on one vocabulary.

    ``max_users`` > 0: the holdout of a seeded sample of that many test users only
    (:func:`sample_users`); every model still learns from all of the training events."""
    catalog = pd.DataFrame({S.ITEM_ID: read_vocab(run_dir)["items"]})
    train = from_events(pd.read_parquet(run_dir / "train_events.parquet"), catalog)
    held = pd.read_parquet(run_dir / "test.parquet")
    if max_users:
        users = sample_users(held[S.USER_ID].unique(), max_users, seed)
        held = held[held[S.USER_ID].isin(users)]
    test = index_like(train, held)
    features = pd.read_parquet(run_dir / "test_users.parquet").set_index(S.USER_ID)
    if max_users:
        features = features[features.index.isin(users)]
    return train, test, features


def two_tower_scorer(
    model: TwoTower, train: Interactions, features: pd.DataFrame
) -> Callable[[np.ndarray], np.ndarray]:
    """Index-space scores of a (served) two-tower model, on the run's item vocabulary.

    A champion trained on an older catalog scores only the items it knows; items new since
    then get the lowest score (it cannot rank what it never saw).
    """
    pos = pd.Index(model.item_ids).get_indexer(train.item_ids)

    @torch.no_grad()
    def score(users: np.ndarray) -> np.ndarray:
        ids = train.user_ids[users].tolist()
        rows = features.reindex(ids)[list(model.feature_names)].fillna(0.0).to_dict("records")
        raw = model(model.user_indices(ids), model.features_tensor(rows)).numpy()
        out = np.full((len(ids), train.n_items), raw.min() - 1.0, dtype=np.float32)
        out[:, pos >= 0] = raw[:, pos[pos >= 0]]
        return out

    return score


def model_size_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def cpu_latency_ms(score: Callable[[np.ndarray], np.ndarray], repeats: int = 50) -> float:
    """Median wall time of scoring the whole catalog for one user on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = np.array([0])
        score(one)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            score(one)
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times))
    finally:
        torch.set_num_threads(threads)


def _row(name: str, result: EvaluationResult) -> dict[str, Any]:
    k = result.k
    row: dict[str, Any] = {"model": name, **result.means()}
    ci = result.ci("ndcg", n_boot=500)
    row[f"ndcg_at_{k}_ci_low"], row[f"ndcg_at_{k}_ci_high"] = ci.low, ci.high
    row[f"coverage_at_{k}"] = result.summary.get(f"coverage_at_{k}")
    for seg in ("cold", "heavy", "long_tail"):
        row[f"{seg}.ndcg_at_{k}"] = result.means(seg)[f"ndcg_at_{k}"]
    return row


def per_user_frame(name: str, result: EvaluationResult) -> pd.DataFrame:
    """Every segment's per-user metrics, stacked, labelled by model (the gate's input)."""
    frames = [f.assign(model=name, segment=seg) for seg, f in result.segments.items()]
    return pd.concat(frames, ignore_index=True)


def check_unique_names(names: list[str]) -> None:
    """One row per name: two models under one name would make the table (and the gate,
    which picks rows by name) ambiguous, so it fails before anything is fitted."""
    seen = pd.Series(names)
    twice = sorted(set(seen[seen.duplicated()]))
    if twice:
        raise ValueError(
            f"evaluation rows must have unique names; {twice} would appear twice (e.g. the zoo "
            "model 'two_tower' is the run's own two-tower, already evaluated): drop it from "
            "the `models` Param"
        )


def evaluate_run(
    run_dir: Path,
    k: int,
    models: dict[str, TwoTower],
    zoo: dict[str, tuple[str, dict[str, Any]]] | None = None,
    scorers: dict[str, ScorerFactory] | None = None,
    max_users: int = 0,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, per-user frame): baselines, the run's models and the zoo on the same holdout
    (of a seeded sample of ``max_users`` test users when > 0: ``eval.max_users``).

    Zoo models are fitted here on the run's training events (they need no Horovod launch or
    Feast features); ``training.report`` logs every row as a nested MLflow run.
    ``scorers`` are other scoring paths (e.g. the served two-stage one), each built from the
    run's (train, test users' point-in-time features).
    """
    from mlkit.splits import Split
    from zoo.compare import fit_and_evaluate

    check_unique_names([*BASELINES, *(zoo or {}), *models, *(scorers or {})])
    train, test, features = run_interactions(run_dir, max_users, seed)
    split = Split(train, test, "run", PROTOCOL)
    rows, per_user = [], []
    protocol = PROTOCOL
    for label, (name, config) in {**BASELINES, **(zoo or {})}.items():
        fitted = fit_and_evaluate(name, config, split, k, exclude_seen=False)
        fitted.name = label
        protocol = fitted.result.protocol
        rows.append(_row(label, fitted.result) | {"size_mb": fitted.size_bytes / 1e6})
        per_user.append(per_user_frame(label, fitted.result))
    for name, model in models.items():
        score = two_tower_scorer(model, train, features)
        result = evaluate(score, train, test, k, exclude_seen=False, split=PROTOCOL)
        rows.append(
            _row(name, result)
            | {"size_mb": model_size_bytes(model) / 1e6, "latency_ms": cpu_latency_ms(score)}
        )
        per_user.append(per_user_frame(name, result))
    for name, factory in (scorers or {}).items():
        result = evaluate(factory(train, features), train, test, k, exclude_seen=False,
                          split=PROTOCOL)  # fmt: skip
        rows.append(_row(name, result))
        per_user.append(per_user_frame(name, result))
    table = pd.DataFrame(rows)
    table["protocol"] = protocol  # the same for every row: one split, one ranking rule
    return table, pd.concat(per_user, ignore_index=True)


def served_vs_best(
    table: pd.DataFrame, per_user: pd.DataFrame, served: str, k: int, seed: int = 0
) -> dict[str, Any]:
    """The served path against the best other model of the table that is not the run's own
    building block or a champion (a zoo model or a baseline), by mean NDCG@k, with the
    paired-bootstrap CI of the per-user difference: which is better, and by how much; and
    the same difference to personal top-frequency, the baseline to beat on repeat data."""
    from mlkit.bootstrap import paired_ci

    metric = f"ndcg_at_{k}"
    roles = table.set_index("model")["role"] if "role" in table else pd.Series(dtype=str)
    peers = table[[roles.get(m, "zoo") in ("zoo", "baseline") for m in table["model"]]]
    best = str(peers.sort_values(metric, ascending=False)["model"].iloc[0])
    everyone = per_user[per_user["segment"] == "all"]

    def scores(model: str) -> pd.Series:
        return everyone[everyone["model"] == model].set_index("user_idx")["ndcg"].sort_index()

    def paired(other: str) -> Any:
        return paired_ci(scores(served), scores(other), seed=seed)

    users, ci = len(scores(served)), paired(best)
    rows = table.set_index("model")[metric]
    verdict = "better" if ci.low > 0 else "worse" if ci.high < 0 else "level (CI spans 0)"
    out = {
        "served": served, "best_other": best, "served_ndcg": float(rows[served]),
        "best_other_ndcg": float(rows[best]), "ratio": float(rows[served] / rows[best]),
        "diff": ci.mean, "diff_ci_low": ci.low, "diff_ci_high": ci.high, "users": users,
        "verdict": verdict,
    }  # fmt: skip
    if TOP_FREQUENCY in set(table["model"]):
        top = paired(TOP_FREQUENCY)
        out |= {"ratio_to_personal_top_frequency": float(rows[served] / rows[TOP_FREQUENCY]),
                "diff_to_personal_top_frequency": top.mean,
                "diff_to_personal_top_frequency_ci_low": top.low,
                "diff_to_personal_top_frequency_ci_high": top.high}  # fmt: skip
    return out


TOP_FREQUENCY = "personal_top_frequency"


def write_results(table: pd.DataFrame, per_user: pd.DataFrame, run_dir: Path) -> Path:
    path = run_dir / "evaluation.json"
    path.write_text(json.dumps(table.to_dict("records"), indent=2, default=float))
    per_user.to_parquet(run_dir / "per_user.parquet", index=False)
    return path


def segments_of(per_user: pd.DataFrame, model: str) -> dict[str, pd.DataFrame]:
    """The gate's input for one model: segment name -> per-user frame."""
    mine = per_user[per_user["model"] == model]
    if mine.empty:
        raise ValueError(f"no per-user results for model '{model}' in this run")
    frames = {seg: f.drop(columns=["model", "segment"]) for seg, f in mine.groupby("segment")}
    empty = mine.iloc[:0].drop(columns=["model", "segment"])
    # a segment with no users stored no rows; the gate reports it as empty, not as missing
    return {seg: frames.get(seg, empty) for seg in (*SEGMENTS, *frames)}
