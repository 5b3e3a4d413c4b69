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
from typing import Any

import pandas as pd
import torch

from mlkit.interactions import Interactions
from shopml import schema as S
from shopml.config import Settings
from shopml.feast_store import point_in_time_features
from training import gate, intraday, ledger, registry, report
from training.compress import quantize_int8
from training.evaluate import (
    ScorerFactory,
    evaluate_run,
    segments_of,
    served_vs_best,
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


COMPRESSION_DIR = "compression"  # the ranker's candidates and compression.json
COMPRESSION_FILE = "compression.json"


def compress(settings: Settings, ds: date) -> dict[str, object]:
    """The two-tower's int8 copy (``evaluate`` reports it), and the served ranker's compressed
    candidates, measured and chosen (``training.compress``; the gate is
    ``training.gate.choose_compressed``). Writes ``compression/`` (each candidate and
    ``compression.json``: the table, the choice, the reasons) and logs the table and the
    Pareto plot to the run."""
    import mlflow

    run_dir = settings.paths.run(ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    torch.save(quantize_int8(model), run_dir / "model_int8.pt")
    table, choice = compress_ranker(settings, ds)
    registry.use_tracking(settings)
    with mlflow.start_run(run_id=_run_id(settings, ds)):
        report.log_compression(table, choice, settings.eval.k)
    cols = ["candidate", "format", "bytes", "params", "p50_ms", "p99_ms", "val_ndcg",
            "test_ndcg", "test_diff_ci_low", "test_diff_ci_high", "verdict"]  # fmt: skip
    print(table[cols].to_string(index=False))
    print(f"ranker served as: {choice['chosen']}")
    return {"int8": str(run_dir / "model_int8.pt"), "ranker": choice["chosen"],
            "table": str(run_dir / COMPRESSION_DIR / COMPRESSION_FILE)}  # fmt: skip


def _ranker_rows(settings: Settings, ds: date, teacher: torch.nn.Module):
    """The ranker's rows (x) and validation mask as ``train_ranker`` saved them; runs from
    before it saved them replay the rows again (same seed, same split)."""
    import numpy as np

    from training.ranking import RANKER_ROWS, RANKER_VALIDATION_USERS

    run_dir = settings.paths.run(ds)
    if not (run_dir / RANKER_ROWS).exists():
        from training.ranking import train_ranker

        train_ranker(settings, ds)  # writes the rows (and refits the same seeded ranker)
    with np.load(run_dir / RANKER_ROWS) as z:
        x, val = z["x"], z["validation"]
    users = set(json.loads((run_dir / RANKER_VALIDATION_USERS).read_text()))
    return x, val, users


@dataclass(frozen=True)
class ReplayedRounds:
    """One scorer's evaluations on several replayed baskets of the same users, read as one.

    ``user_values`` is each user's mean over the baskets they have, indexed by user id: a
    paired comparison (``mlkit.bootstrap.paired_ci``) then resamples users, not baskets, since
    one user's baskets are not independent of each other."""

    results: tuple[Any, ...]  # mlkit.metrics.EvaluationResult, one per round

    def user_values(self, metric: str = "ndcg", segment: str = "all") -> pd.Series:
        per_round = [r.segments[segment].set_index(S.USER_ID)[metric] for r in self.results]
        return pd.concat(per_round).groupby(level=0).mean().sort_index()


def compression_ndcg(
    settings: Settings, ds: date, rankers: dict, retrieval: dict[str, int] | None = None
) -> dict[str, dict]:
    """Per-user NDCG@k of the served path with each ranker swapped in, on the validation
    split and on the run's test split (the holdout).

    Validation is every replayed basket of the ranker's validation users (the last
    ``train.ranker_rounds`` baskets of their training part, each with tables and features
    from before it): lists no candidate learnt from, each user's mean over them
    (:class:`ReplayedRounds`). With the last basket alone the demo's gate judged a 1%
    tolerance on ~60 users, inside its own noise; every round triples the lists.
    ``eval.compression_eval_users`` > 0 evaluates a seeded sample of users per split.
    ``retrieval``: the quotas the lists are retrieved with (None: the run's chosen ones;
    ``{}``: the settings')."""
    from mlkit.interactions import from_events, index_like
    from mlkit.metrics import evaluate as evaluate_scores
    from mlkit.two_stage import held_out_rounds, offline_engine, ranker_scorers
    from served_model.engine import version_config
    from training.data import PROTOCOL, read_vocab
    from training.evaluate import run_interactions, sample_users
    from training.ranking import replay_two_tower, served_retrieval, zoo_sources

    run_dir = settings.paths.run(ds)
    k, n, seed = settings.eval.k, settings.eval.compression_eval_users, settings.train.seed
    if retrieval is None:
        retrieval = served_retrieval(run_dir)  # the chosen quotas
    serving = version_config(settings.serving, retrieval)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    replay_model = replay_two_tower(settings, ds)  # retrieval that has not seen val baskets
    features = partial(point_in_time_features, settings)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    _, _, val_users = _ranker_rows(settings, ds, rankers[next(iter(rankers))])
    out: dict[str, dict] = {}

    # validation: the replayed baskets of the ranker's validation users, latest first
    catalog = pd.DataFrame({S.ITEM_ID: read_vocab(run_dir)["items"]})
    rounds: dict[str, list] = {name: [] for name in rankers}
    replay_sources = zoo_sources(settings, replay_model)
    for inner in held_out_rounds(events, settings.train.ranker_rounds):  # what the ranker replays
        users = sample_users(set(inner.test_time.index) & val_users, n, seed)
        if not users:
            break
        train = from_events(inner.train, catalog)
        test = index_like(train, inner.test[inner.test[S.USER_ID].isin(users)])
        at = inner.test_time.reindex(users)
        moments = pd.DataFrame({S.USER_ID: at.index, S.ITEM_ID: "", S.ENTITY_TIMESTAMP: at.values})
        val_features = features(moments.reset_index(drop=True)).set_index(S.USER_ID)
        purchases = inner.train[inner.train[S.EVENT_TYPE] == S.PURCHASE]
        engine = offline_engine(purchases, replay_model, None, serving, replay_sources,
                                users=users)  # fmt: skip
        scorers = ranker_scorers(engine, train, val_features, features, rankers)
        for name, f in scorers.items():
            rounds[name].append(
                evaluate_scores(f, train, test, k, exclude_seen=False, split=PROTOCOL)
            )
    out["val"] = {name: ReplayedRounds(tuple(r)) for name, r in rounds.items()}

    # test: the run's holdout, tables from every training purchase (as evaluate's SERVED row)
    train, test, test_features = run_interactions(run_dir, n, seed)
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]
    engine = offline_engine(purchases, model, None, serving, zoo_sources(settings, model),
                            users=test_features.index)  # fmt: skip
    scorers = ranker_scorers(engine, train, test_features, features, rankers)
    out["test"] = {
        name: evaluate_scores(f, train, test, k, exclude_seen=False, split=PROTOCOL)
        for name, f in scorers.items()
    }
    return out


def compress_ranker(settings: Settings, ds: date) -> tuple[pd.DataFrame, dict[str, object]]:
    """Build, measure and choose the served ranker's compressed candidates (module doc)."""
    import numpy as np

    from mlkit.bootstrap import paired_ci
    from served_model.engine import version_config
    from served_model.ranker import features_of, ranker_format, ranker_params
    from training import compress as C
    from training.ranking import served_retrieval

    run_dir = settings.paths.run(ds)
    out_dir = run_dir / COMPRESSION_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, k = settings.train, settings.eval.k
    teacher = torch.load(run_dir / "ranker.pt", weights_only=False).eval()
    x, val, _ = _ranker_rows(settings, ds, teacher)
    rankers, facts = C.ranker_candidates(
        teacher,
        x[~val],
        x[val],
        student_cross_layers=cfg.ranker_student_cross_layers,
        student_hidden=cfg.ranker_student_hidden,
        student_epochs=cfg.ranker_student_epochs,
        seed=cfg.seed,
        students=cfg.ranker_students,
        batch_size=cfg.ranker_batch_size,
        lr=cfg.ranker_lr,
    )
    paths = {name: C.save_ranker(r, out_dir / name) for name, r in rankers.items()}
    # the serving shape: one user and as many candidates as the run's served path ranks
    depth = version_config(settings.serving, served_retrieval(run_dir)).max_candidates
    times = C.ranking_latency(
        rankers, C.serving_rows(x[val] if val.any() else x, depth, seed=cfg.seed)
    )
    evaluated = compression_ndcg(settings, ds, rankers)
    metric = "ndcg"

    def per_user(split: str, name: str) -> pd.Series:
        return evaluated[split][name].user_values(metric)

    rows = []
    for name, ranker in rankers.items():
        row = {"candidate": name, "format": ranker_format(ranker),
               "file": paths[name].name, "bytes": C.artifact_bytes(paths[name]),
               "params": ranker_params(ranker), **C.latency_summary(times[name]),
               **facts.get(name, {})}  # fmt: skip
        for split in ("val", "test"):
            mine, ref = per_user(split, name), per_user(split, C.TEACHER)
            ci = paired_ci(mine, ref, seed=cfg.seed)
            row |= {f"{split}_ndcg": float(mine.mean()), f"{split}_users": len(mine),
                    f"{split}_diff": ci.mean, f"{split}_diff_ci_low": ci.low,
                    f"{split}_diff_ci_high": ci.high}  # fmt: skip
        rows.append(row)
    table = pd.DataFrame(rows)
    choice = gate.choose_compressed(
        [{**r, "name": r["candidate"]} for r in table.to_dict("records")],
        C.TEACHER,
        "val_ndcg",
        settings.eval.compression_tolerance,
        latency="p50_ms",
    )
    table["verdict"] = [
        "CHOSEN" if n == choice.chosen else choice.reasons.get(n, "") for n in table["candidate"]
    ]
    teacher_row = table.set_index("candidate").loc[C.TEACHER]
    table["size_ratio"] = teacher_row["bytes"] / table["bytes"]
    table["speed_ratio"] = teacher_row["p50_ms"] / table["p50_ms"]
    record = {
        "k": k,
        "metric": f"ndcg_at_{k}",
        "serving_rows": depth,
        "chosen": choice.chosen,
        "chosen_file": paths[choice.chosen].name,
        "chosen_format": ranker_format(rankers[choice.chosen]),
        "chosen_params": ranker_params(rankers[choice.chosen]),
        "chosen_features": list(features_of(rankers[choice.chosen])),
        "choice": choice.to_dict(),
        "table": table.replace({np.nan: None}).to_dict("records"),
    }
    (out_dir / COMPRESSION_FILE).write_text(json.dumps(record, indent=2, default=float))
    return table, record


def served_ranker(run_dir: Path) -> torch.nn.Module:
    """The ranker the run serves: the compression gate's choice when ``compress`` made one,
    else the trained ranker."""
    from served_model.ranker import LEGACY_FEATURES
    from training.compress import load_saved_ranker

    record = run_dir / COMPRESSION_DIR / COMPRESSION_FILE
    if not record.exists():
        return torch.load(run_dir / "ranker.pt", weights_only=False).eval()
    chosen = json.loads(record.read_text())
    return load_saved_ranker(
        run_dir / COMPRESSION_DIR / chosen["chosen_file"],
        chosen["chosen_format"],
        chosen["chosen_params"],
        tuple(chosen.get("chosen_features", LEGACY_FEATURES)),
    )


def served_path(
    settings: Settings,
    purchases: pd.DataFrame,
    model: torch.nn.Module,
    ranker: torch.nn.Module,
    retrieval: dict[str, int],
) -> ScorerFactory:
    """The path ``shopml serve`` answers with (retrieval + ranker, ``mlkit.two_stage``),
    replayed on the holdout with Feast's point-in-time features; tables and zoo scorers know
    ``purchases``; ``retrieval``: the version's own quotas (``served_model.engine.
    version_config``). A ranker that reads no zoo score (a champion registered before they
    existed) is replayed without the zoo sources, as it serves."""
    from mlkit.two_stage import offline_engine, scorer
    from served_model.engine import version_config
    from training.ranking import served_zoo_sources

    sources = served_zoo_sources(settings, model, ranker)
    cfg = version_config(settings.serving, retrieval)

    def factory(train: Interactions, test_users: pd.DataFrame) -> Callable:
        engine = offline_engine(purchases, model, ranker.eval(), cfg, sources,
                                users=test_users.index)  # fmt: skip
        return scorer(engine, train, test_users, partial(point_in_time_features, settings))

    return factory


def evaluate(settings: Settings, ds: date) -> pd.DataFrame:
    """Model, int8 copy, champion, baselines and the Params' zoo models on the same holdout."""
    import mlflow

    from training.ranking import served_retrieval
    from zoo import build

    run_dir = settings.paths.run(ds)
    zoo = {m: (m, settings.eval.model_configs.get(m, {})) for m in settings.eval.models}
    for name, config in zoo.values():
        build(name, **config)  # unknown names and bad configs fail before anything is fitted
    models = {
        "two_tower": torch.load(run_dir / "model.pt", weights_only=False),
        "two_tower_int8": torch.load(run_dir / "model_int8.pt", weights_only=False),
    }
    ranker = served_ranker(run_dir)  # the compression gate's choice: what serving runs
    events = pd.read_parquet(run_dir / "train_events.parquet")
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]  # the tables know no held-out basket
    # the path `shopml serve` answers with: retrieval + ranker, point-in-time features
    scorers = {SERVED: served_path(settings, purchases, models["two_tower"], ranker,
                                   served_retrieval(run_dir))}  # fmt: skip
    champ = registry.champion_version(settings)
    if champ is not None:
        model, champion_ranker, retrieval = registry.load_servable(
            settings, champ, run_dir / "champion"
        )
        models[f"champion_v{champ}"] = model
        if champion_ranker is not None:  # versions registered before two-stage serving have none
            scorers[f"champion_v{champ}_{SERVED}"] = served_path(
                settings, purchases, model, champion_ranker, retrieval
            )
    k = settings.eval.k
    table, per_user = evaluate_run(
        run_dir,
        k,
        models,
        zoo,
        scorers=scorers,
        max_users=settings.eval.max_users,
        seed=settings.train.seed,
    )
    table.insert(1, "role", [role_of(m, set(zoo)) for m in table["model"]])
    write_results(table, per_user, run_dir)
    versus = served_vs_best(table, per_user, SERVED, k, settings.train.seed)
    (run_dir / SERVED_VS_BEST).write_text(json.dumps(versus, indent=2))
    curves = {
        "two-tower (train loss)": json.loads((run_dir / "loss_curve.json").read_text()),
        "ranker": json.loads((run_dir / "ranker_loss.json").read_text())["curve"],
    }
    configs = {label: config for label, (_, config) in zoo.items()}
    with mlflow.start_run(run_id=_run_id(settings, ds)):
        report.log_evaluation(table, k, ds.isoformat(), SERVED, configs, curves)
        mlflow.log_dict(versus, SERVED_VS_BEST)
        mlflow.log_metrics({"served_vs_best_other.diff": versus["diff"],
                            "served_vs_best_other.ratio": versus["ratio"]})  # fmt: skip
        mlflow.set_tag("served_vs_best_other", served_line(versus, k))
    cols = ["model", "role", f"ndcg_at_{k}", f"recall_at_{k}", f"ndcg_at_{k}_ci_low",
            f"ndcg_at_{k}_ci_high", "size_mb", "latency_ms"]  # fmt: skip
    print(table[[c for c in cols if c in table]].to_string(index=False))
    print(served_line(versus, k))
    return table


SERVED_VS_BEST = "served_vs_best.json"


def served_line(v: dict[str, Any], k: int) -> str:
    """The evaluation's one-line answer: is the served path the best model of the run?"""
    return (
        f"served path {v['served_ndcg']:.4f} vs best other model {v['best_other']} "
        f"{v['best_other_ndcg']:.4f} (NDCG@{k}): {v['verdict']}, {v['ratio']:.3f}x, difference "
        f"{v['diff']:+.4f} [{v['diff_ci_low']:+.4f}, {v['diff_ci_high']:+.4f}] over {v['users']} "
        f"users; {v['ratio_to_personal_top_frequency']:.3f}x personal top-frequency "
        f"({v['diff_to_personal_top_frequency']:+.4f} "
        f"[{v['diff_to_personal_top_frequency_ci_low']:+.4f}, "
        f"{v['diff_to_personal_top_frequency_ci_high']:+.4f}])"
    )


def serving_artifacts(settings: Settings, ds: date, model: torch.nn.Module) -> list[Path]:
    """The faiss index, ranker and candidate tables registered with the model (serving/bundle.py).

    Built from every purchase up to ``ds`` (the held-out baskets included: serving should know
    a shopper's latest basket) and the run's catalog.
    """
    from served_model.bundle import write_artifacts
    from training.data import load_clean
    from training.ranking import served_retrieval, zoo_sources

    run_dir = settings.paths.run(ds)
    events, items = load_clean(settings, ds)
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]
    fit = zoo_sources(settings, model)
    scores = fit(purchases) if fit is not None else None
    return write_artifacts(run_dir / "serving", model, served_ranker(run_dir), purchases, items,
                           scores, served_retrieval(run_dir))  # fmt: skip


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
        # the intraday challenger (training.intraday): promoted, kept or retired here
        settled = intraday.settle_challenger(settings, ds, version if promoted else None)
    if settled:
        print(settled)
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
