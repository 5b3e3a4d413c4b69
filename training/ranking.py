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

from mlkit.splits import split_last_basket
from mlkit.two_stage import SourceFit, fit_ranker, ranker_matrix, replayed_rows
from served_model.two_tower import TwoTower
from shopml import schema as S
from shopml.config import Settings
from shopml.feast_store import point_in_time_features

RANKER_ROWS = "ranker_rows.npz"  # x, y and the validation mask of the ranker's rows
RANKER_VALIDATION_USERS = "ranker_validation_users.json"
EARLIER_DIR = "earlier"  # the replay's two-tower: its examples, vocabulary and model


def zoo_sources(settings: Settings, model: TwoTower) -> SourceFit | None:
    """The zoo scorers the served path uses (``train.zoo_sources``, each with its
    ``eval.model_configs`` entry), bound to ``model``'s vocabularies; None when none."""
    from zoo.sources import source_fitter

    names = settings.train.zoo_sources
    if not names:
        return None
    configs = {n: settings.eval.model_configs.get(n, {}) for n in names}
    return source_fitter(model.user_index, list(model.item_ids), configs)


def earlier_two_tower(settings: Settings, ds: date, events: pd.DataFrame) -> TwoTower:
    """A two-tower trained, with the run's settings and vocabularies, only on the training
    examples before each user's first replayed basket (``train.ranker_rounds`` baskets held
    out again): the replay's retrieval model, which has not seen what it is asked to find."""
    import shutil

    from training.train import CHECKPOINT, train_two_tower

    run_dir = settings.paths.run(ds)
    events = events.copy()
    for _ in range(settings.train.ranker_rounds):
        inner = split_last_basket(events)
        if inner.test.empty:
            break
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
    """Fit the ranker on replayed candidate lists; writes ``ranker.pt`` and its curve.

    ``train.ranker_validation_share`` of the users (seeded) is the validation set; the epoch
    with the lowest validation loss is kept."""
    cfg = settings.train
    run_dir = settings.paths.run(ds)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    if cfg.ranker_retrieval == "earlier":
        model = earlier_two_tower(settings, ds, events)
    else:
        model = torch.load(run_dir / "model.pt", weights_only=False)
    features = partial(point_in_time_features, settings)
    rows = replayed_rows(model, events, cfg.ranker_rounds, features, settings.serving,
                         zoo_sources(settings, model))  # fmt: skip
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
    )
    torch.save(ranker, run_dir / "ranker.pt")
    # the rows it learnt from and its validation users: what ``compress`` distils on and
    # where it chooses a compressed ranker (training/compress.py)
    np.savez_compressed(run_dir / RANKER_ROWS, x=x, y=y, validation=val)
    (run_dir / RANKER_VALIDATION_USERS).write_text(
        json.dumps(sorted(map(str, rows.loc[val, S.USER_ID].unique())))
    )
    record = {"positive_rate": float(y.mean()), "curve": curve}
    (run_dir / "ranker_loss.json").write_text(json.dumps(record))
    return {"rows": len(rows), "positives": int(y.sum()), "users": len(users), "curve": curve}
