"""What each part of the served path adds: the ablation rows of the nightly's two-stage path.

On the latest nightly run (``make demo``), every row is the served path with one thing
removed or changed, all evaluated by ``training.pipeline.compression_ndcg`` (per-user
NDCG@10 on the validation split, every replayed basket of the ranker-validation users
averaged per user, and on the run's holdout), with the paired-bootstrap CI of the difference
to the full path:

* ``full``: the run's ranker (``ranker.pt``) with the configuration its study chose on
  validation (``served_study.json``: quotas, ranking depth, the ranker's size and features);
* ``-<group>``: a ranker of the same size trained on the same rows without one of its feature
  groups (``served_model.ranker.FEATURE_GROUPS``: Feast features, purchase history,
  item-kNN affinity, the two-tower's score, each zoo scorer's score); the lists stay;
* ``leaky replay``: the full ranker trained on lists replayed with the run's own two-tower,
  which has seen the baskets that label them (``train.ranker_retrieval = "run"``), where
  ``full`` replays with one trained without them;
* ``settings' configuration``: the study's trial 0, the settings' quotas with the default
  ranker on every feature, replayed and evaluated with the settings' quotas: what the
  study changed;
* ``previous design``: no zoo sources, and a ranker on the features of bundle format 3
  (``LEGACY_FEATURES``), replayed and evaluated with the settings' quotas and without the
  zoo sources: what was served before the zoo scorers joined.

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
from served_model.engine import version_config
from served_model.ranker import FEATURE_GROUPS, LEGACY_FEATURES, features_of
from shopml import schema as S
from shopml.config import Settings, load_settings
from shopml.feast_store import point_in_time_features
from training.pipeline import compression_ndcg
from training.ranking import RANKER_ROWS, served_record, zoo_sources
from training.served_study import DEFAULT_RANKER

FULL = "full"


def _fit(settings: Settings, x, y, val, features=None, ranker: dict | None = None):
    """A ranker trained as ``train_ranker`` does (``ranker``: its size, the study's)."""
    cfg, size = settings.train, ranker or DEFAULT_RANKER
    net, _ = fit_ranker(x[~val], y[~val], cfg.ranker_epochs, cfg.seed, (x[val], y[val]),
                        batch_size=cfg.ranker_batch_size, lr=cfg.ranker_lr, features=features,
                        cross_layers=size["cross_layers"], hidden=size["hidden"])  # fmt: skip
    return net


def _replayed(settings: Settings, ds: date, model, sources, val_users: set[str], retrieval):
    """Rows replayed as ``train_ranker`` does, with another retrieval model, sources or
    quotas; the validation mask marks the same users."""
    run_dir = settings.paths.run(ds)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    features = partial(point_in_time_features, settings)
    rows = replayed_rows(model, events, settings.train.ranker_rounds, features,
                         version_config(settings.serving, retrieval), sources)  # fmt: skip
    val = rows[S.USER_ID].astype(str).isin(val_users).to_numpy()
    return ranker_matrix(rows), rows[S.LABEL].to_numpy(np.float32), val


def rankers(settings: Settings, ds: date) -> dict[str, tuple[torch.nn.Module, bool, dict | None]]:
    """name -> (ranker, evaluated with the zoo sources, the quotas it is evaluated with:
    None for the run's chosen ones, ``{}`` for the settings')."""
    from training.ranking import replay_two_tower

    run_dir = settings.paths.run(ds)
    with np.load(run_dir / RANKER_ROWS) as z:
        x, y, val = z["x"], z["y"], z["validation"]
    full = torch.load(run_dir / "ranker.pt", weights_only=False).eval()
    study = served_record(run_dir)
    size, chosen, base = study["ranker"], study["retrieval"], features_of(full)
    out = {FULL: (full, True, None)}
    for group, names in FEATURE_GROUPS.items():
        kept = tuple(f for f in base if f not in names)
        if len(kept) < len(base) and kept:
            out[f"-{group}"] = (_fit(settings, x, y, val, kept, size), True, None)
            print(f"trained -{group}", flush=True)
    val_users = set(json.loads((run_dir / "ranker_validation_users.json").read_text()))
    own = torch.load(run_dir / "model.pt", weights_only=False)
    xl, yl, vl = _replayed(settings, ds, own, zoo_sources(settings, own), val_users, chosen)
    out["leaky replay"] = (_fit(settings, xl, yl, vl, base, size), True, None)
    print("trained leaky replay", flush=True)
    earlier = replay_two_tower(settings, ds)
    xs, ys, vs = _replayed(settings, ds, earlier, zoo_sources(settings, earlier), val_users, {})
    out["settings' configuration"] = (_fit(settings, xs, ys, vs), True, {})
    print("trained settings' configuration", flush=True)
    xp, yp, vp = _replayed(settings, ds, earlier, None, val_users, {})
    out["previous design"] = (_fit(settings, xp, yp, vp, LEGACY_FEATURES), False, {})
    print("trained previous design", flush=True)
    return out


def table(settings: Settings, ds: date) -> pd.DataFrame:
    built = rankers(settings, ds)
    plain = settings.model_copy(
        update={"train": settings.train.model_copy(update={"zoo_sources": []})}
    )
    evaluated: dict[str, dict] = {"val": {}, "test": {}}
    for zoo, retrieval in ((True, None), (True, {}), (False, {})):
        group = {n: r for n, (r, z, q) in built.items() if z == zoo and q == retrieval}
        if group:
            got = compression_ndcg(settings if zoo else plain, ds, group, retrieval)
            for split in evaluated:
                evaluated[split].update(got[split])
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
