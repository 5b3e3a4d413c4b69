"""Bayesian hyperparameter search (Optuna TPE) over one model's config.

Trials fit on a validation split carved from the training part (never the test split) and
are logged as nested MLflow runs under one parent run, so the search can be inspected in the
MLflow UI. The best config is returned (and written to JSON by the CLI/benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlkit.splits import Split
from zoo.compare import fit_and_evaluate

Space = Callable[[Any, bool], dict[str, Any]]


def _repeat(t: Any, repeats: bool) -> dict[str, Any]:
    """The repeat-blend weight, searched only where repeats count (seen items not excluded)."""
    return {"repeat_weight": t.suggest_float("repeat_weight", 0.0, 3.0)} if repeats else {}


# One search space per model: what a practitioner would tune, with sane ranges.
SPACES: dict[str, Space] = {
    "popularity": lambda t, r: {},
    "recent_popularity": lambda t, r: {"days": t.suggest_float("days", 3, 180, log=True)},
    "personal_top_frequency": lambda t, r: {},
    "item_knn": lambda t, r: {
        "neighbors": t.suggest_int("neighbors", 10, 500, log=True),
        "shrink": t.suggest_float("shrink", 0.0, 100.0),
        **_repeat(t, r),
    },
    "user_knn": lambda t, r: {
        "neighbors": t.suggest_int("neighbors", 10, 500, log=True),
        "shrink": t.suggest_float("shrink", 0.0, 100.0),
        "own_weight": t.suggest_float("own_weight", 0.0, 1.0),
        "half_life_days": t.suggest_float("half_life_days", 3, 720, log=True),
    },
    "ease": lambda t, r: {
        "l2": t.suggest_float("l2", 10, 3000, log=True),
        **_repeat(t, r),
    },
    "als": lambda t, r: {
        "rank": t.suggest_categorical("rank", [32, 64, 128]),
        "reg": t.suggest_float("reg", 1e-3, 1.0, log=True),
        "alpha": t.suggest_float("alpha", 1.0, 100.0, log=True),
        **_repeat(t, r),
    },
    "content_tfidf": lambda t, r: _repeat(t, r),
    "two_tower": lambda t, r: {
        "epochs": t.suggest_int("epochs", 3, 15),
        "lr": t.suggest_float("lr", 3e-4, 1e-2, log=True),
        "negatives": t.suggest_int("negatives", 128, 2048, log=True),
        **_repeat(t, r),
    },
    "sasrec": lambda t, r: {
        "epochs": t.suggest_int("epochs", 5, 30),
        "lr": t.suggest_float("lr", 3e-4, 5e-3, log=True),
        "dropout": t.suggest_float("dropout", 0.0, 0.5),
        **_repeat(t, r),
    },
}


def tune(
    name: str,
    validation: Split,
    n_trials: int,
    k: int,
    exclude_seen: bool,
    fixed: dict[str, Any] | None = None,
    seed: int = 0,
    log_to_mlflow: bool = False,
) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """(best config, its validation NDCG@k, every trial) after ``n_trials`` TPE trials."""
    import optuna

    if name not in SPACES:
        raise ValueError(f"no search space for model '{name}'; tunable: {sorted(SPACES)}")
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    fixed = dict(fixed or {})
    trials: list[dict[str, Any]] = []
    try:  # a space with nothing to search (e.g. popularity) needs one trial, not n_trials
        SPACES[name](optuna.trial.FixedTrial({}), not exclude_seen)
        n_trials = 1
    except ValueError:
        pass

    def objective(trial: optuna.Trial) -> float:
        config = {**SPACES[name](trial, not exclude_seen), **fixed}
        fitted = fit_and_evaluate(name, config, validation, k, exclude_seen, n_boot=50)
        ndcg = fitted.result.means()[f"ndcg_at_{k}"]
        trials.append({"trial": trial.number, "config": config, f"ndcg_at_{k}": ndcg})
        if log_to_mlflow:
            import mlflow

            with mlflow.start_run(run_name=f"{name}-trial-{trial.number}", nested=True):
                mlflow.log_params(config)
                mlflow.log_metric(f"val_ndcg_at_{k}", ndcg)
        return ndcg

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    if log_to_mlflow:
        import mlflow

        with mlflow.start_run(run_name=f"tune-{name}"):
            mlflow.set_tag("validation_split", validation.description)
            study.optimize(objective, n_trials=n_trials)
            mlflow.log_params({f"best.{p}": v for p, v in study.best_params.items()})
            mlflow.log_metric(f"best_val_ndcg_at_{k}", study.best_value)
    else:
        study.optimize(objective, n_trials=n_trials)
    best = trials[study.best_trial.number]["config"]
    return best, study.best_value, trials
