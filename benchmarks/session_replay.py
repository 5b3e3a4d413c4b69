"""Session replay: what a fresh session adds to the answer for the rest of the basket.

Instacart's ``add_to_cart_order`` is the order in which items entered a basket, and the lake
keeps it (``spark_jobs.ingest``: one second per position). On the latest nightly run
(``make demo``), each test user's held-out basket is replayed as a session: its first ``m``
items (m = 1, 2, 3) are the session so far, and the answer is scored against the basket's
remaining items (NDCG@10 and Recall@10 with ``mlkit.metrics``; repeats allowed: a remaining
item the user bought before counts as any other). Rows, on the same users for each ``m``:

* ``stale, session excluded``: the nightly served path (the run's two-tower, ranker and
  chosen quotas; tables and zoo scorers knowing the training purchases; Feast features at
  the basket's start, point in time, as ``evaluate`` replays it) with the session's items
  removed from its list: the cheap baseline;
* ``fresh session``: the same path told the session, as the service is by a pushed session
  feature (``served_model.engine.TwoStage.retrieve(session=...)``: the session's items seed
  item-kNN beside the user's most bought and leave the list).

The ranker is the nightly one in both rows: it has not learnt from sessions. Two more rows
use a ranker trained as ``train_ranker`` trains the nightly one (the same replayed rounds,
retrieval model, quotas, size, features, validation users and seed), except that each
replayed basket is a session already begun (``mlkit.two_stage.replayed_rows(
session_items=3)``: its first 0-3 items retrieve, leave the lists, and the rest labels
them): ``... session-trained ranker``. The last row, ``fresh session, intraday update``,
is the fresh-session path with the two-tower the hourly ``intraday_update`` would have
made had it run right after the sessions' first ``m`` items: the run's two-tower warm-started
(``training.intraday.warm_started``: ``intraday.epochs`` at ``intraday.lr_scale`` x the
nightly rate, point-in-time features) on those items' purchases, of every replayed user at
once; its tables, quotas and ranker are the run's (only the two-tower changes, as in the
DAG). It is the most the update can know at the answer, a bound on the hourly one, which
would have learnt from the sessions of the hours before only. Only users whose basket has
more than ``m`` distinct items count; the CI is the paired bootstrap of the per-user
difference to the stale row.

``python -m benchmarks.session_replay [--ds 2025-12-31]``
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

from mlkit.bootstrap import bootstrap_ci, paired_ci
from mlkit.metrics import rankings_per_user
from mlkit.two_stage import CAND, candidate_rows, held_out_events, offline_engine
from served_model.engine import TwoStage, version_config
from served_model.ranker import HISTORY_FEATURES, features_of
from shopml import schema as S
from shopml.config import Settings, load_settings
from shopml.feast_store import point_in_time_features
from training.pipeline import served_ranker
from training.ranking import served_retrieval, served_zoo_sources, zoo_sources

STALE = "stale, session excluded"
FRESH = "fresh session"
TRAINED = ", session-trained ranker"
INTRADAY = ", intraday update"
SESSION_ITEMS = 3  # the session-trained ranker's replayed sessions: 0..3 items
MS = (1, 2, 3)


def served_engine(settings: Settings, ds: date, model: torch.nn.Module | None = None) -> TwoStage:
    """The run's served path as ``training.pipeline.served_path`` replays it (``model``: a
    two-tower in place of the run's)."""
    run_dir = settings.paths.run(ds)
    if model is None:
        model = torch.load(run_dir / "model.pt", weights_only=False)
    ranker = served_ranker(run_dir).eval()
    events = pd.read_parquet(run_dir / "train_events.parquet")
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE]
    sources = served_zoo_sources(settings, model, ranker)
    cfg = version_config(settings.serving, served_retrieval(run_dir))
    return offline_engine(purchases, model, ranker, cfg, sources)


def held_baskets(settings: Settings, ds: date, start: pd.Series) -> pd.DataFrame:
    """Each test user's held-out basket's events (the run's ``test.parquet``) from the lake's
    clean events, in the order they entered it."""
    test = pd.read_parquet(settings.paths.run(ds) / "test.parquet")
    clean = pd.read_parquet(settings.paths.clean_events_for(ds),
                            columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.TIMESTAMP])  # fmt: skip
    return held_out_events(clean, test, start).sort_values([S.USER_ID, S.TIMESTAMP], kind="stable")


def baskets(held: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's distinct items of :func:`held_baskets`, in the order they entered it."""
    return {u: list(dict.fromkeys(g[S.ITEM_ID].astype(str))) for u, g in held.groupby(S.USER_ID)}


def intraday_engine(
    settings: Settings, ds: date, held: pd.DataFrame, cart: dict[str, set[str]], m: int
) -> TwoStage:
    """The served path with the run's two-tower warm-started on the purchases of every
    user's ``cart`` (the first ``m`` items of their basket), as ``intraday_update`` trains."""
    from training.intraday import warm_started

    run_dir = settings.paths.run(ds)
    work = run_dir / "session_replay" / f"intraday_m{m}"
    work.mkdir(parents=True, exist_ok=True)
    users, items = held[S.USER_ID].astype(str), held[S.ITEM_ID].astype(str)
    in_cart = [i in cart.get(u, ()) for u, i in zip(users, items, strict=True)]
    bought = held[np.asarray(in_cart, dtype=bool) & (held[S.EVENT_TYPE] == S.PURCHASE).to_numpy()]
    run = torch.load(run_dir / "model.pt", weights_only=False)
    model, curve, counts = warm_started(settings, work, run, bought, f"in the m={m} carts")
    print(f"m={m}: intraday update on {counts}, loss {curve[0]['loss']:.4f} -> "
          f"{curve[-1]['loss']:.4f}", flush=True)  # fmt: skip
    return served_engine(settings, ds, model)


def session_ranker(settings: Settings, ds: date) -> torch.nn.Module:
    """A ranker trained as ``train_ranker`` trains the run's, on baskets replayed as
    sessions already begun (see the module doc)."""
    from mlkit.two_stage import fit_ranker, ranker_matrix, replayed_rows
    from training.ranking import replay_two_tower, served_record

    run_dir = settings.paths.run(ds)
    events = pd.read_parquet(run_dir / "train_events.parquet")
    earlier = replay_two_tower(settings, ds)
    study = served_record(run_dir)
    cfg = version_config(settings.serving, study["retrieval"])
    rows = replayed_rows(earlier, events, settings.train.ranker_rounds,
                         partial(point_in_time_features, settings), cfg,
                         zoo_sources(settings, earlier), SESSION_ITEMS,
                         settings.train.seed)  # fmt: skip
    val_users = set(json.loads((run_dir / "ranker_validation_users.json").read_text()))
    val = rows[S.USER_ID].astype(str).isin(val_users).to_numpy()
    x, y = ranker_matrix(rows), rows[S.LABEL].to_numpy(np.float32)
    t, size = settings.train, study["ranker"]
    net, _ = fit_ranker(x[~val], y[~val], t.ranker_epochs, t.seed, (x[val], y[val]),
                        batch_size=t.ranker_batch_size, lr=t.ranker_lr,
                        features=features_of(served_ranker(run_dir)),
                        cross_layers=size["cross_layers"], hidden=size["hidden"])  # fmt: skip
    return net.eval()


def ranked(
    engine: TwoStage, rows: pd.DataFrame, ranker: torch.nn.Module | None = None
) -> dict[str, list[str]]:
    """Each user's candidates, best first, by ``ranker`` (the engine's by default)."""
    if rows.empty:
        return {}
    scores = engine.score(
        rows[CAND].to_numpy(np.int64),
        rows[list(HISTORY_FEATURES)].to_numpy(np.float32),
        rows[list(S.USER_FEATURES)].to_numpy(np.float32),
        rows[list(S.ITEM_FEATURES)].to_numpy(np.float32),
        ranker=ranker,
    )
    order = rows.assign(_score=scores).sort_values([S.USER_ID, "_score"], ascending=[True, False])
    return {u: g[S.ITEM_ID].astype(str).tolist() for u, g in order.groupby(S.USER_ID)}


def replay(settings: Settings, ds: date, k: int) -> pd.DataFrame:
    engine = served_engine(settings, ds)
    run_dir = settings.paths.run(ds)
    users = pd.read_parquet(run_dir / "test_users.parquet").set_index(S.USER_ID)
    at = users[S.ENTITY_TIMESTAMP]
    features = partial(point_in_time_features, settings)
    held = held_baskets(settings, ds, at)
    by_user = baskets(held)
    kept = run_dir / "session_ranker.pt"  # seeded: a rerun would train the same ranker
    if kept.exists():
        trained = torch.load(kept, weights_only=False).eval()
    else:
        trained = session_ranker(settings, ds)
        torch.save(trained, kept)
        print("trained the session ranker", flush=True)
    stale_rows = candidate_rows(engine, at, users, features)
    stale = {
        STALE: ranked(engine, stale_rows),
        STALE + TRAINED: ranked(engine, stale_rows, trained),
    }
    rows = []
    for m in MS:
        chosen = [u for u, items in by_user.items() if len(items) > m and u in users.index
                  and u in engine.model.user_index
                  and all(i in engine.item_pos for i in items[:m])]  # fmt: skip
        truth = {u: set(by_user[u][m:]) for u in chosen}
        sessions = {u: np.array([engine.item_pos[i] for i in by_user[u][:m]]) for u in chosen}
        cart = {u: set(by_user[u][:m]) for u in chosen}
        lists = {name: {u: [i for i in got.get(u, []) if i not in cart[u]] for u in chosen}
                 for name, got in stale.items()}  # fmt: skip
        rows_m = candidate_rows(engine, at[chosen], users, features, sessions)
        lists[FRESH] = ranked(engine, rows_m)
        lists[FRESH + TRAINED] = ranked(engine, rows_m, trained)
        updated = intraday_engine(settings, ds, held, cart, m)
        lists[FRESH + INTRADAY] = ranked(
            updated, candidate_rows(updated, at[chosen], users, features, sessions)
        )
        metrics = {name: rankings_per_user(got, truth, k).set_index(S.USER_ID)
                   for name, got in lists.items()}  # fmt: skip
        for name, got in metrics.items():
            row = {"m": m, "row": name, "users": len(chosen)}
            for metric in ("ndcg", "recall"):
                ci = bootstrap_ci(got[metric].to_numpy(), seed=settings.train.seed)
                row |= {f"{metric}_at_{k}": ci.mean, f"{metric}_ci": [ci.low, ci.high]}
            if name != STALE:
                ref = metrics[STALE]["ndcg"]
                diff = paired_ci(got["ndcg"], ref, seed=settings.train.seed)
                row |= {"ratio": float(got["ndcg"].mean() / max(ref.mean(), 1e-12)),
                        "diff": diff.mean, "diff_ci": [diff.low, diff.high]}  # fmt: skip
            rows.append(row)
        print(f"m={m}: {len(chosen)} users", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds", default="2025-12-31", help="the nightly run's logical date")
    args = p.parse_args()
    started = time.perf_counter()
    settings = load_settings()
    ds, k = date.fromisoformat(args.ds), settings.eval.k
    out = replay(settings, ds, k)
    pd.set_option("display.width", 220)
    print(f"\n## Session replay, run ds={args.ds}: the rest of each held-out basket after its "
          f"first m items (NDCG@{k}, Recall@{k}; 95% bootstrap CIs; diff = fresh - stale, "
          "paired)\n")  # fmt: skip
    print(out.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    path = settings.paths.run(ds) / "session_replay.json"
    path.write_text(json.dumps(out.to_dict("records"), indent=2))
    print(f"\nwritten {path}; wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
