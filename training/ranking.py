"""DAG task ``train_ranker``: the served ranker (``served_model.ranker``) learns on replayed lists.

Inside the run's training part each user's last basket is held out again, the served path's
candidate lists just before it are replayed with Feast's point-in-time features
(``mlkit.two_stage``, the design the zoo's ``hybrid`` shares), and the items of that basket
label them; then the basket before, for ``train.ranker_rounds`` rounds. So the ranker learns
on the lists it will rank. Two earlier designs scored worse offline on a 100-user Instacart
slice (NDCG@10 of the served path): sampled negatives (popular or uniform items, plus own
history) made the ranker learn a different question, and feeding it the two-tower's score
taught it to trust a score that is memorised on its own training purchases. Labels never
come from the run's held-out baskets. One bias is left: the replay retrieves with the run's
two-tower, which was trained on the replayed baskets too, so its ANN source finds their items
more easily than it will find tomorrow's; the ranker may credit never-bought candidates a
little too much. The holdout evaluation of the served path is not affected.
"""

from __future__ import annotations

import json
from datetime import date
from functools import partial

import numpy as np
import pandas as pd
import torch

from mlkit.two_stage import fit_ranker, ranker_matrix, replayed_rows
from shopml import schema as S
from shopml.config import Settings
from shopml.feast_store import point_in_time_features

RANKER_ROWS = "ranker_rows.npz"  # x, y and the validation mask of the ranker's rows
RANKER_VALIDATION_USERS = "ranker_validation_users.json"


def train_ranker(settings: Settings, ds: date) -> dict[str, object]:
    """Fit the ranker on replayed candidate lists; writes ``ranker.pt`` and its curve.

    ``train.ranker_validation_share`` of the users (seeded) is the validation set; the epoch
    with the lowest validation loss is kept."""
    cfg = settings.train
    run_dir = settings.paths.run(ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    features = partial(point_in_time_features, settings)
    rows = replayed_rows(model, events, cfg.ranker_rounds, features, settings.serving)
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
