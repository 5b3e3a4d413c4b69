"""The served configuration, chosen on validation: part of DAG task ``train_ranker``.

What the served path retrieves and how it ranks (each candidate source's quota, how many
candidates are ranked, the ranker's size and the feature groups it reads) is one Optuna study
(TPE, seeded, as ``zoo.tune``) on a validation split inside the run's training part. The
run's holdout is never read: ``evaluate`` reports the chosen configuration on it once.

* **One replay for every trial.** The lists are replayed once with each quota at the top of
  its range (:func:`upper_config`) and each candidate's position in every source's list
  kept, so a trial's lists are *selected* out of them (``mlkit.two_stage.select_candidates``,
  exact), not replayed again.
* **Validation.** Each user's latest replayed basket (round 0: the last basket of the
  training part). A trial's ranker learns on the older rounds and is judged by NDCG@k of its
  top k against the whole basket (items its lists missed count as misses), with the one
  evaluation library (``mlkit.metrics.rankings_per_user``).
* **Trial 0 is the settings' configuration**, and the study changes it only for a trial
  that beats it on validation with the paired-bootstrap CI of the per-user difference above
  zero (``mlkit.bootstrap.paired_ci``), the rule the promotion gate applies to models: the
  best of many noisy trials leads by chance alone, and a tie never changes what is served.

The chosen ranker is then trained on every round (``training.ranking``), and the chosen
quotas travel with the version (the manifest's ``retrieval``): evaluation, compression and
serving all use what was chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mlkit.bootstrap import paired_ci
from mlkit.metrics import rankings_per_user
from mlkit.two_stage import REPLAY_ROUND, fit_ranker, ranker_matrix, select_candidates
from served_model.engine import QUOTAS, RETRIEVAL_FIELDS
from served_model.ranker import FEATURE_GROUPS, RANKER_FEATURES, ranker_logits
from shopml import schema as S
from shopml.config import ServingConfig, Settings

# (low, high, step) of each searched integer; a setting above ``high`` widens the range
QUOTA_SPACE: dict[str, tuple[int, int, int]] = {
    "history_candidates": (0, 60, 10),
    "user_knn_candidates": (0, 80, 10),
    "ease_candidates": (0, 60, 10),
    "ann_candidates": (0, 200, 20),
    "knn_candidates": (0, 60, 10),
    "popular_candidates": (0, 20, 5),
}
DEPTH_SPACE = (50, 300, 25)  # max_candidates: how many of the union are ranked
CROSS_LAYERS = (1, 3)
HIDDEN = (32, 64, 128)
DEFAULT_RANKER = {"cross_layers": 2, "hidden": 64, "features": list(RANKER_FEATURES)}
# the record of a run that serves the settings' configuration (no study, or none yet)
NO_STUDY: dict[str, Any] = {"retrieval": {}, "ranker": DEFAULT_RANKER, "trials": []}
assert set(QUOTA_SPACE) == set(QUOTAS.values()), "every source's quota is searched"


def _ranges(cfg: ServingConfig) -> dict[str, tuple[int, int, int]]:
    """The searched ranges, each widened (on its step) to hold the setting's value."""
    out = {}
    for name, (low, high, step) in {**QUOTA_SPACE, "max_candidates": DEPTH_SPACE}.items():
        value = getattr(cfg, name)
        top = max(high, low + -(-(value - low) // step) * step)
        out[name] = (min(low, value), top, step)
    return out


def upper_config(cfg: ServingConfig) -> ServingConfig:
    """``cfg`` with every quota at the top of its range and no cut: the one replay every
    trial selects its lists from."""
    ranges = _ranges(cfg)
    quotas = {q: ranges[q][1] for q in QUOTA_SPACE}
    return cfg.model_copy(update={**quotas, "max_candidates": sum(quotas.values())})


def _retrieval(cfg: ServingConfig) -> dict[str, int]:
    return {name: int(getattr(cfg, name)) for name in RETRIEVAL_FIELDS}


def _features(groups: list[str]) -> list[str]:
    """The features of ``groups``, in ``RANKER_FEATURES`` order."""
    wanted = {f for g in groups for f in FEATURE_GROUPS[g]}
    return [f for f in RANKER_FEATURES if f in wanted]


def _params(cfg: ServingConfig) -> dict[str, Any]:
    """The settings' configuration as trial parameters (trial 0)."""
    groups = {f"use_{g}": True for g in FEATURE_GROUPS}
    ranker = {"cross_layers": DEFAULT_RANKER["cross_layers"], "hidden": DEFAULT_RANKER["hidden"]}
    return {**_retrieval(cfg), **ranker, **groups}


def _suggest(trial: Any, ranges: dict[str, tuple[int, int, int]]) -> tuple[dict, dict]:
    """(retrieval, ranker) of one trial."""
    retrieval = {
        name: trial.suggest_int(name, low, high, step=step)
        for name, (low, high, step) in ranges.items()
    }
    groups = [g for g in FEATURE_GROUPS if trial.suggest_categorical(f"use_{g}", [True, False])]
    ranker = {
        "cross_layers": trial.suggest_int("cross_layers", *CROSS_LAYERS),
        "hidden": trial.suggest_categorical("hidden", list(HIDDEN)),
        "features": _features(groups),
    }
    return retrieval, ranker


def validation_ndcg(
    ranker: Any, rows: pd.DataFrame, truth: dict[str, set[str]], k: int
) -> pd.DataFrame:
    """Per-user metrics of ``ranker``'s top ``k`` of each user's ``rows`` against the
    user's whole basket ``truth`` (``mlkit.metrics.rankings_per_user``)."""
    scored = rows[[S.USER_ID, S.ITEM_ID]].assign(score=ranker_logits(ranker, ranker_matrix(rows)))
    top = scored.sort_values([S.USER_ID, "score"], ascending=[True, False], kind="stable")
    lists = top.groupby(S.USER_ID, sort=False).head(k).groupby(S.USER_ID, sort=False)[S.ITEM_ID]
    return rankings_per_user(lists.agg(list).to_dict(), truth, k)


def served_study(
    settings: Settings, rows: pd.DataFrame, baskets: list[pd.DataFrame]
) -> dict[str, Any]:
    """Choose the served configuration (module doc) from rows replayed with
    :func:`upper_config` and the baskets that label them (``replayed_baskets``).

    Returns the record ``train_ranker`` writes: the chosen ``retrieval`` and ``ranker``, its
    validation NDCG@k beside the settings' (trial 0), and every trial."""
    import optuna

    cfg, k = settings.train, settings.eval.k
    n_trials = cfg.served_study_trials
    if n_trials < 1:
        raise ValueError("served_study needs train.served_study_trials >= 1")
    latest = rows[rows[REPLAY_ROUND] == 0]
    older = rows[rows[REPLAY_ROUND] > 0]
    if older.empty or latest.empty:
        raise ValueError(
            "the served study validates on each user's latest replayed basket and trains on the "
            "older ones: it needs train.ranker_rounds >= 2 and users with three training "
            "baskets (or set train.served_study_trials=0 to serve the settings' configuration)"
        )
    basket = baskets[0][baskets[0][S.USER_ID].isin(set(latest[S.USER_ID]))]
    truth = basket.groupby(S.USER_ID)[S.ITEM_ID].agg(set).to_dict()
    ranges = _ranges(settings.serving)
    trials: list[dict[str, Any]] = []
    per_user: dict[int, pd.Series] = {}  # trial -> validation NDCG@k per user

    def objective(trial: optuna.Trial) -> float:
        retrieval, ranker = _suggest(trial, ranges)
        served = settings.serving.model_copy(update=retrieval)
        train, val = select_candidates(older, served), select_candidates(latest, served)
        users = pd.Series(0.0, index=sorted(truth))  # a trial with nothing to rank scores 0
        if ranker["features"] and len(train) and train[S.LABEL].any() and len(val):
            net, _ = fit_ranker(
                ranker_matrix(train),
                train[S.LABEL].to_numpy(np.float32),
                cfg.ranker_epochs,
                cfg.seed,
                (ranker_matrix(val), val[S.LABEL].to_numpy(np.float32)),
                batch_size=cfg.ranker_batch_size,
                lr=cfg.ranker_lr,
                features=tuple(ranker["features"]),
                cross_layers=ranker["cross_layers"],
                hidden=ranker["hidden"],
            )
            users = validation_ndcg(net, val, truth, k).set_index(S.USER_ID)["ndcg"]
        per_user[trial.number] = users
        ndcg = float(users.mean())
        trials.append({"trial": trial.number, "retrieval": retrieval, "ranker": ranker,
                       f"val_ndcg_at_{k}": ndcg, "train_rows": len(train)})  # fmt: skip
        best = max(t[f"val_ndcg_at_{k}"] for t in trials)
        print(f"served study trial {trial.number}: validation NDCG@{k} {ndcg:.4f} "
              f"(best so far {best:.4f})", flush=True)  # fmt: skip
        return ndcg

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed)
    )
    study.enqueue_trial(_params(settings.serving))
    study.optimize(objective, n_trials=n_trials)
    best = trials[study.best_trial.number]
    lead = paired_ci(per_user[best["trial"]], per_user[0], seed=cfg.seed)
    chosen = best if best["trial"] != 0 and lead.low > 0 else trials[0]
    if chosen is not best:
        why = (
            f"kept the settings' configuration: the best trial ({best['trial']}) leads it by "
            f"{lead.mean:+.4f} [{lead.low:+.4f}, {lead.high:+.4f}], a CI that is not above 0"
        )
    elif best["trial"] == 0:
        why = "kept the settings' configuration: no trial scored higher on validation"
    else:
        why = (f"trial {best['trial']} beats the settings' configuration on validation by "
               f"{lead.mean:+.4f} [{lead.low:+.4f}, {lead.high:+.4f}]")  # fmt: skip
    print(f"served configuration: {why}; {chosen['retrieval']}, ranker "
          f"{chosen['ranker']['cross_layers']} cross layers, {chosen['ranker']['hidden']} wide, "
          f"{len(chosen['ranker']['features'])} features", flush=True)  # fmt: skip
    return {
        "retrieval": chosen["retrieval"],
        "ranker": chosen["ranker"],
        f"val_ndcg_at_{k}": chosen[f"val_ndcg_at_{k}"],
        "chosen_trial": chosen["trial"],
        "decision": why,
        "best_trial": best["trial"],
        f"best_val_ndcg_at_{k}": best[f"val_ndcg_at_{k}"],
        "best_vs_default": {"diff": lead.mean, "ci_low": lead.low, "ci_high": lead.high},
        f"default_val_ndcg_at_{k}": trials[0][f"val_ndcg_at_{k}"],
        "validation": {
            "users": len(truth),
            "split": "each user's latest replayed basket (the last of the training part); "
            "trial rankers learn on the older replayed baskets",
        },
        "trials": trials,
    }
