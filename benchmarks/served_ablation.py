"""What each part of the served path adds: the ablation rows of the nightly's two-stage path.

On the latest nightly run (``make demo``), every row is the served path with one thing
removed, all evaluated on the same candidate lists by ``training.pipeline.compression_ndcg``
(per-user NDCG@10 on the validation split, each ranker-validation user's last training
basket, and on the run's holdout), with the paired-bootstrap CI of the difference to the
full path:

* ``full``: the run's ranker (``ranker.pt``), every feature group;
* ``-<group>``: a ranker trained on the same rows without one feature group
  (``served_model.ranker.FEATURE_GROUPS``: Feast features, purchase history, item-kNN
  affinity, the two-tower's score, each zoo scorer's score); the candidate lists stay;
* ``leaky replay``: the full ranker trained on lists replayed with the run's own two-tower,
  which has seen the baskets that label them (``train.ranker_retrieval = "run"``), where
  ``full`` replays with one trained without them;
* ``previous design``: no zoo sources, and a ranker on the features of bundle format 3
  (``LEGACY_FEATURES``), replayed and evaluated without the zoo sources: what was served
  before the zoo scorers joined.

Rankers are seeded and trained exactly as ``train_ranker`` does. Test numbers are reported,
never used to choose anything: the served configuration is chosen on validation.

``python -m benchmarks.served_ablation [--ds 2025-12-31]``
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from functools import partial

import numpy as np
import pandas as pd
import torch

from mlkit.bootstrap import paired_ci
from mlkit.two_stage import fit_ranker, ranker_matrix, replayed_rows
from served_model.ranker import FEATURE_GROUPS, LEGACY_FEATURES, RANKER_FEATURES
from shopml import schema as S
from shopml.config import Settings, load_settings
from shopml.feast_store import point_in_time_features
from training.pipeline import compression_ndcg
from training.ranking import RANKER_ROWS, zoo_sources

FULL = "full"


def _fit(settings: Settings, x, y, val, features=None):
    cfg = settings.train
    ranker, _ = fit_ranker(x[~val], y[~val], cfg.ranker_epochs, cfg.seed, (x[val], y[val]),
                           batch_size=cfg.ranker_batch_size, lr=cfg.ranker_lr,
                           features=features)  # fmt: skip
    return ranker


def _replayed(settings: Settings, ds: date, model, sources, val_users: set[str]):
    """Rows replayed as ``train_ranker`` does, with another retrieval model or sources;
    the validation mask marks the same users."""
    run_dir = settings.paths.run(ds)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    features = partial(point_in_time_features, settings)
    rows = replayed_rows(model, events, settings.train.ranker_rounds, features,
                         settings.serving, sources)  # fmt: skip
    val = rows[S.USER_ID].astype(str).isin(val_users).to_numpy()
    return ranker_matrix(rows), rows[S.LABEL].to_numpy(np.float32), val


def rankers(settings: Settings, ds: date) -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (ranker, evaluated with the zoo sources)."""
    run_dir = settings.paths.run(ds)
    with np.load(run_dir / RANKER_ROWS) as z:
        x, y, val = z["x"], z["y"], z["validation"]
    out = {FULL: (torch.load(run_dir / "ranker.pt", weights_only=False).eval(), True)}
    for group, names in FEATURE_GROUPS.items():
        kept = tuple(f for f in RANKER_FEATURES if f not in names)
        out[f"-{group}"] = (_fit(settings, x, y, val, kept), True)
        print(f"trained -{group}", flush=True)
    val_users = set(json.loads((run_dir / "ranker_validation_users.json").read_text()))
    own = torch.load(run_dir / "model.pt", weights_only=False)
    xl, yl, vl = _replayed(settings, ds, own, zoo_sources(settings, own), val_users)
    out["leaky replay"] = (_fit(settings, xl, yl, vl), True)
    print("trained leaky replay", flush=True)
    from training.ranking import replay_two_tower

    earlier = replay_two_tower(settings, ds)
    xp, yp, vp = _replayed(settings, ds, earlier, None, val_users)
    out["previous design"] = (_fit(settings, xp, yp, vp, LEGACY_FEATURES), False)
    print("trained previous design", flush=True)
    return out


def table(settings: Settings, ds: date) -> pd.DataFrame:
    built = rankers(settings, ds)
    with_zoo = {n: r for n, (r, zoo) in built.items() if zoo}
    without = {n: r for n, (r, zoo) in built.items() if not zoo}
    evaluated = compression_ndcg(settings, ds, with_zoo)
    plain = settings.model_copy(
        update={"train": settings.train.model_copy(update={"zoo_sources": []})}
    )
    previous = compression_ndcg(plain, ds, without)
    for split in evaluated:
        evaluated[split].update(previous[split])
    rows = []
    for name in built:
        row = {"variant": name}
        for split in ("val", "test"):
            mine = evaluated[split][name].user_values()
            ci = paired_ci(mine, evaluated[split][FULL].user_values(), seed=settings.train.seed)
            row |= {f"{split}_ndcg": float(mine.mean()), f"{split}_diff": ci.mean,
                    f"{split}_ci_low": ci.low, f"{split}_ci_high": ci.high,
                    f"{split}_users": len(mine)}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds", default="2025-12-31", help="the nightly run's logical date")
    args = p.parse_args()
    started = time.perf_counter()
    settings = load_settings()
    out = table(settings, date.fromisoformat(args.ds))
    pd.set_option("display.width", 200)
    print(f"\n## Served-path ablation, run ds={args.ds} (NDCG@{settings.eval.k}; diff = variant "
          "minus full, paired bootstrap 95% CI over users)\n")  # fmt: skip
    print(out.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    path = settings.paths.run(date.fromisoformat(args.ds)) / "served_ablation.json"
    path.write_text(json.dumps(out.to_dict("records"), indent=2))
    print(f"\nwritten {path}; wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
