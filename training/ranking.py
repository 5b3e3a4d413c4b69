"""DAG task ``train_ranker``: the served ranker (``served_model.ranker``) learns on replayed lists.

Inside the run's training part each user's last basket is held out again, the served path's
candidate lists just before it are replayed with Feast's point-in-time features
(``mlkit.two_stage``, the design the zoo's ``hybrid`` shares), and the items of that basket
label them; then the basket before, for ``train.ranker_rounds`` rounds. So the ranker learns
on the lists it will rank. Labels never come from the run's held-out baskets.

Nothing that produces a replayed list has seen the basket that labels it:

* the zoo scorers (``train.zoo_sources``: TIFU-kNN, EASE; ``zoo.sources``) and the tables
  are fitted per round on the purchases before it;
* the two-tower that retrieves (its ANN source and its score feature) is, with
  ``train.ranker_retrieval = "earlier"``, one trained on the run's training examples before
  each user's first replayed basket (:func:`earlier_two_tower`). The run's own two-tower has
  learnt those baskets: its score would be memorised on them, and a ranker trained on it
  trusts it more than tomorrow's lists deserve (``"run"``, the ablation, shows by how much).

An earlier design, sampled negatives (popular or uniform items, plus own history), scored
worse offline: it made the ranker learn a different question.
"""

from __future__ import annotations

import json
from datetime import date
from functools import partial

import numpy as np
import pandas as pd
import torch

from mlkit.two_stage import (
    SourceFit,
    fit_ranker,
    held_out_rounds,
    ranker_matrix,
    replayed_baskets,
    replayed_rows,
    select_candidates,
)
from served_model.two_tower import TwoTower
from shopml import schema as S
from shopml.config import Settings
from shopml.feast_store import point_in_time_features

RANKER_ROWS = "ranker_rows.npz"  # x, y and the validation mask of the ranker's rows
RANKER_VALIDATION_USERS = "ranker_validation_users.json"
EARLIER_DIR = "earlier"  # the replay's two-tower: its examples, vocabulary and model
SERVED_STUDY = "served_study.json"  # the served configuration and how it was chosen


def served_record(run_dir) -> dict:
    """The run's ``served_study.json`` (``training.served_study``); a run from before the
    study reads as one that serves the settings' configuration (``NO_STUDY``)."""
    from training.served_study import NO_STUDY

    path = run_dir / SERVED_STUDY
    return json.loads(path.read_text()) if path.exists() else NO_STUDY


def served_retrieval(run_dir) -> dict[str, int]:
    """The run's chosen quotas and ranking depth; empty when it serves the settings'."""
    return served_record(run_dir)["retrieval"]


def zoo_source_configs(settings: Settings) -> dict[str, dict[str, object]]:
    """The zoo scorers the served path uses (``train.zoo_sources``), each with its
    ``eval.model_configs`` entry."""
    return {n: settings.eval.model_configs.get(n, {}) for n in settings.train.zoo_sources}


def zoo_sources(settings: Settings, model: TwoTower) -> SourceFit | None:
    """:func:`zoo_source_configs` bound to ``model``'s vocabularies; None when none."""
    from zoo.sources import source_fitter

    configs = zoo_source_configs(settings)
    if not configs:
        return None
    return source_fitter(model.user_index, list(model.item_ids), configs)


def served_zoo_sources(
    settings: Settings, model: TwoTower, ranker: torch.nn.Module
) -> SourceFit | None:
    """:func:`zoo_sources` for a path served with ``ranker``: None when the ranker reads no
    zoo score (a champion registered before they existed), which is then replayed without
    the zoo sources, as it serves."""
    from served_model.ranker import ZOO_SOURCES, features_of

    if not set(ZOO_SOURCES.values()) & set(features_of(ranker)):
        return None
    return zoo_sources(settings, model)


def earlier_two_tower(settings: Settings, ds: date, events: pd.DataFrame) -> TwoTower:
    """A two-tower trained, with the run's settings and vocabularies, only on the training
    examples before each user's first replayed basket (``train.ranker_rounds`` baskets held
    out again): the replay's retrieval model, which has not seen what it is asked to find."""
    import shutil

    from training.train import CHECKPOINT, train_two_tower

    run_dir = settings.paths.run(ds)
    events = events.copy()
    for inner in held_out_rounds(events, settings.train.ranker_rounds):
        events = inner.train
    cut = events.groupby(S.USER_ID)[S.TIMESTAMP].max()
    examples = pd.read_parquet(run_dir / "train.parquet")
    until = examples[S.USER_ID].map(cut)
    kept = examples[until.notna() & (examples[S.ENTITY_TIMESTAMP] <= until)]
    if kept.empty:
        raise ValueError(
            "no training purchase lies before the replayed baskets: lower train.ranker_rounds "
            "or set train.ranker_retrieval='run'"
        )
    out = run_dir / EARLIER_DIR
    out.mkdir(exist_ok=True)
    kept.to_parquet(out / "train.parquet", index=False)
    shutil.copy(run_dir / "vocab.json", out / "vocab.json")
    model, _ = train_two_tower(settings, out)
    torch.save(model, out / "model.pt")  # compress validates on the same replay
    (out / CHECKPOINT).unlink(missing_ok=True)
    return model


def replay_two_tower(settings: Settings, ds: date) -> TwoTower:
    """The two-tower the ranker's lists were replayed with (:func:`earlier_two_tower`'s, or
    the run's own when there is none)."""
    run_dir = settings.paths.run(ds)
    earlier = run_dir / EARLIER_DIR / "model.pt"
    return torch.load(earlier if earlier.exists() else run_dir / "model.pt", weights_only=False)


def train_ranker(settings: Settings, ds: date) -> dict[str, object]:
    """Choose the served configuration and fit its ranker on replayed candidate lists; writes
    ``ranker.pt``, its curve and ``served_study.json``.

    With ``train.served_study_trials`` > 0 the quotas, ranking depth and the ranker's size
    and features are chosen on validation first (``training.served_study``). The ranker then
    learns on every replayed round; ``train.ranker_validation_share`` of the users (seeded)
    picks its best epoch (lowest validation loss)."""
    from training.served_study import NO_STUDY, served_study, upper_config

    cfg = settings.train
    run_dir = settings.paths.run(ds)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    if cfg.ranker_retrieval == "earlier":
        model = earlier_two_tower(settings, ds, events)
    else:
        model = torch.load(run_dir / "model.pt", weights_only=False)
    features = partial(point_in_time_features, settings)
    study = cfg.served_study_trials > 0
    replay = upper_config(settings.serving) if study else settings.serving
    rows = replayed_rows(model, events, cfg.ranker_rounds, features, replay,
                         zoo_sources(settings, model), seed=cfg.seed,
                         max_users=cfg.ranker_max_users)  # fmt: skip
    if study:
        record = served_study(settings, rows, replayed_baskets(events, cfg.ranker_rounds))
        rows = select_candidates(rows, settings.serving.model_copy(update=record["retrieval"]))
    else:
        record = NO_STUDY
    (run_dir / SERVED_STUDY).write_text(json.dumps(record, indent=2))
    x, y = ranker_matrix(rows), rows[S.LABEL].to_numpy(np.float32)
    users = rows[S.USER_ID].unique()
    rng = np.random.default_rng(cfg.seed)
    size = max(1, int(len(users) * cfg.ranker_validation_share))
    val = rows[S.USER_ID].isin(set(rng.choice(users, size=size, replace=False))).to_numpy()
    ranker, curve = fit_ranker(
        x[~val],
        y[~val],
        cfg.ranker_epochs,
        cfg.seed,
        (x[val], y[val]),
        batch_size=cfg.ranker_batch_size,
        lr=cfg.ranker_lr,
        features=tuple(record["ranker"]["features"]),
        cross_layers=record["ranker"]["cross_layers"],
        hidden=record["ranker"]["hidden"],
    )
    torch.save(ranker, run_dir / "ranker.pt")
    # the rows it learnt from and its validation users: what ``compress`` distils on and
    # where it chooses a compressed ranker (training/compress.py)
    np.savez_compressed(run_dir / RANKER_ROWS, x=x, y=y, validation=val)
    (run_dir / RANKER_VALIDATION_USERS).write_text(
        json.dumps(sorted(map(str, rows.loc[val, S.USER_ID].unique())))
    )
    (run_dir / "ranker_loss.json").write_text(
        json.dumps({"positive_rate": float(y.mean()), "curve": curve})
    )
    if study:
        _log_study(settings, ds, record)
    return {"rows": len(rows), "positives": int(y.sum()), "users": len(users), "curve": curve,
            "served": {"retrieval": record["retrieval"], "ranker": record["ranker"]}}  # fmt: skip


def _log_study(settings: Settings, ds: date, record: dict) -> None:
    """The study into the night's MLflow run (``training.report.log_served_study``)."""
    import mlflow

    from training import registry, report

    run_file = settings.paths.run(ds) / "mlflow_run_id"
    if not run_file.exists():  # the ranker trained outside a nightly run (no ``train`` task)
        return
    run_id = run_file.read_text().strip()
    registry.use_tracking(settings)
    with mlflow.start_run(run_id=run_id):
        report.log_served_study(record, settings.eval.k)
