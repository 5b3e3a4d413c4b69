"""The nightly pipeline's stages at growing sizes: wall time, peak memory, rows/s, exponents.

For each ``--events`` size, a synthetic retailer (``shopml synth``: users = events / 100,
items = events / 200, at least 100 and 1,000; 0.1% defects) is generated, then every stage
of the nightly DAG runs in order as its own ``shopml <stage> --ds`` process (what each Airflow
task runs) on a fresh ``SHOPML_HOME``, and its wall time and the peak resident memory of its
process tree (Spark's JVM and Horovod's workers included, sampled every 100 ms) are
recorded. Printed: the table
stage x size (seconds, peak GiB, source rows/s) and each stage's scaling exponent (the slope
of log seconds on log events between the sizes; > 1.1 is flagged superlinear).

Settings are the environment's (``SHOPML_TRAIN__EPOCHS``, ``SHOPML_TRAIN__SERVED_STUDY_TRIALS``
and the others apply): say which were lowered beside any figure. Feast's offline store is
its Spark store unless ``SHOPML_FEAST__OFFLINE_STORE`` says otherwise, and Spark's driver has
6 GiB unless ``SHOPML_SPARK__DRIVER_MEMORY`` says otherwise.

``python -m benchmarks.scale --events 100000 1000000 [--stop-after train]``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

DS = "2025-12-31"
STAGES = (
    "land", "validate-raw", "clean", "features", "validate-features", "feast-sync",
    "training-set", "train", "train-ranker", "compress", "evaluate", "promote",
)  # fmt: skip


def run_stage(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """(seconds, peak GiB, exit code) of one ``shopml`` process. The peak is of the whole
    process tree (Spark's JVM and Horovod's workers are children), sampled every 100 ms."""
    import psutil

    started = time.perf_counter()
    peak = 0
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in (root, *root.children(recursive=True)):
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.1)
    seconds = time.perf_counter() - started
    return seconds, peak / 2**30, proc.returncode


def merged_records(files: list[Path]) -> list[dict]:
    """The records of several ``--json`` files; a later file's (size, stage) replaces an
    earlier one's."""
    merged = {(r["events"], r["stage"]): r for f in files
              for r in json.loads(f.read_text())["records"]}  # fmt: skip
    return list(merged.values())


def table_of(records: list[dict]) -> str:
    """The Markdown table stage x size (wall s / peak GiB / events per s) and each stage's
    exponent (slope of log seconds on log events over the sizes it ran at; > 1.1 flagged)."""
    sizes = sorted({r["events"] for r in records})
    by_stage: dict[str, dict[int, dict]] = {}
    for r in records:
        by_stage.setdefault(r["stage"], {})[r["events"]] = r
    lines = [
        "## Nightly stages by size (events; wall s / peak GiB / events per s; exponent of s "
        "on events)",
        "",
        "| stage | " + " | ".join(f"{n:,}" for n in sizes) + " | exponent |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for name, runs in by_stage.items():
        cells = [(f"{runs[n]['seconds']:.0f} s / {runs[n]['peak_gib']:.2f} / "
                  f"{n / runs[n]['seconds']:,.0f}" + (" FAILED" if runs[n]["exit"] else ""))
                 if n in runs else "-" for n in sizes]  # fmt: skip
        ok = [n for n in sizes if n in runs and not runs[n]["exit"]]
        slope = (np.polyfit(np.log(ok), np.log([runs[n]["seconds"] for n in ok]), 1)[0]
                 if len(ok) > 1 else math.nan)  # fmt: skip
        flag = " (superlinear)" if slope > 1.1 else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {slope:.2f}{flag} |")
    totals = [sum(runs[n]["seconds"] for runs in by_stage.values() if n in runs) for n in sizes]
    lines.append("| total | " + " | ".join(f"{t:.0f} s" for t in totals) + " | |")
    failed = {r["events"]: r["stage"] for r in records if r["exit"]}
    if failed:
        lines.append(f"\nfailed: {failed}")
    return "\n".join(lines)


def sampling_effect(per_user: pd.DataFrame, users: int, seeds: int = 20) -> str:
    """What judging each model on a seeded sample of ``users`` test users (``eval.max_users``,
    ``eval.compression_eval_users``) does to its NDCG, from one evaluation of every user
    (a run's ``per_user.parquet``): the full mean and 95% CI beside one sample's (seed 42,
    the pipeline's), and the spread of the sample mean over ``seeds`` seeds. A user's NDCG
    does not depend on who else is evaluated, so these are the sample's exact figures."""
    from mlkit.bootstrap import bootstrap_ci
    from training.evaluate import sample_users

    rows = per_user[per_user["segment"] == "all"]
    lines = [f"| model | all users: NDCG [95% CI] | {users:,} users (seed 42) | "
             f"sample mean over {seeds} seeds: sd, range |", "|---|---|---|---|"]  # fmt: skip
    for model, frame in rows.groupby("model"):
        values = frame.set_index("user_idx")["ndcg"]
        full = bootstrap_ci(values.to_numpy(), seed=0)
        one = bootstrap_ci(values.loc[sample_users(values.index, users, 42)].to_numpy(), seed=0)
        means = np.array([values.loc[sample_users(values.index, users, s)].mean()
                          for s in range(seeds)])  # fmt: skip
        lines.append(
            f"| {model} | {full.mean:.4f} [{full.low:.4f}, {full.high:.4f}] (n={len(values):,}) | "
            f"{one.mean:.4f} [{one.low:.4f}, {one.high:.4f}] | "
            f"{means.std():.4f}, [{means.min():.4f}, {means.max():.4f}] |"
        )
    return "\n".join(lines)


def synth_purchases(source: Path) -> pd.DataFrame:
    """A synthetic retailer's purchases (``shopml synth --out SOURCE``), its defective rows
    (missing or unparseable ids and times) dropped: the zoo's input without the pipeline."""
    from shopml import schema as S

    cols = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.EVENT_TYPE]
    ev = pd.read_parquet(source / "events", columns=cols)
    p = ev[ev[S.EVENT_TYPE] == S.PURCHASE].drop(columns=S.EVENT_TYPE)
    p[S.TIMESTAMP] = pd.to_datetime(p[S.TIMESTAMP], errors="coerce", utc=True)
    p = p.dropna()
    return p.astype({S.USER_ID: str, S.ITEM_ID: str}).reset_index(drop=True)


def zoo_tables(sources: list[Path]) -> str:
    """Seconds to build the serving zoo tables (``train.zoo_sources``: every user's top
    items, what ``promote`` builds for the bundle) on each synthetic retailer, and the
    exponent between sizes: promote's one step that grows with users x items."""
    from shopml import schema as S
    from shopml.config import load_settings
    from training.ranking import zoo_source_configs
    from zoo.sources import zoo_scores

    configs = zoo_source_configs(load_settings())
    lines = ["| purchases | users | items | " + " | ".join(f"{n} s" for n in configs) + " |",
             "|---|---|---|" + "---|" * len(configs)]  # fmt: skip
    sizes, times = [], []
    for source in sources:
        p = synth_purchases(source)
        users, items = sorted(p[S.USER_ID].unique()), sorted(p[S.ITEM_ID].unique())
        index = {u: i + 1 for i, u in enumerate(users)}
        seconds = []
        for name, config in configs.items():
            started = time.perf_counter()
            zoo_scores(index, items, p, {name: config})
            seconds.append(time.perf_counter() - started)
        sizes.append(len(p))
        times.append(sum(seconds))
        lines.append(f"| {len(p):,} | {len(users):,} | {len(items):,} | "
                     + " | ".join(f"{t:.1f}" for t in seconds) + " |")  # fmt: skip
    for (a, ta), (b, tb) in itertools.pairwise(zip(sizes, times, strict=True)):
        lines.append(
            f"exponent {a:,} -> {b:,} purchases: {math.log(tb / ta) / math.log(b / a):.2f}"
        )
    return "\n".join(lines)


def neighbour_pool_effect(source: Path, pool: int) -> str:
    """What searching user-kNN's neighbours among a seeded pool of ``pool`` users
    (``neighbour_pool``) costs in NDCG@10, against searching every user: the served
    ``user_knn`` config on a synthetic retailer's purchases, each user's last basket held
    out with repeats allowed (the nightly protocol), paired bootstrap over users."""
    from mlkit.bootstrap import paired_ci
    from mlkit.interactions import from_events
    from shopml import schema as S
    from shopml.config import load_settings
    from zoo.compare import PROTOCOLS, compare, format_table, protocol_split

    protocol = PROTOCOLS["instacart"]  # leave the last basket out, repeats count
    split = protocol_split(
        protocol, from_events(synth_purchases(source).assign(**{S.EVENT_TYPE: S.PURCHASE}))
    )
    config = load_settings().eval.model_configs["user_knn"]
    every, pooled = "user_knn, every user", f"user_knn, pool of {pool:,}"
    table, fitted = compare(
        {every: ("user_knn", {**config, "neighbour_pool": 0}),
         pooled: ("user_knn", {**config, "neighbour_pool": pool})},
        split, protocol.k, protocol.exclude_seen,
    )  # fmt: skip
    diff = paired_ci(fitted[pooled].result.user_values(), fitted[every].result.user_values())
    return (format_table(table, ["model", "ndcg@10", "ndcg@10 95% CI", "fit_s"])
            + f"\n\npool - every user: NDCG@10 {diff.mean:+.4f} "
            f"[{diff.low:+.4f}, {diff.high:+.4f}] "
            f"over {len(fitted[every].result.user_values()):,} users "
            f"({split.train.n_users:,} users in training)")  # fmt: skip


def paired_effect(reference: Path, changed: Path) -> str:
    """Each model's NDCG in two evaluations of the same holdout (two runs' ``per_user.parquet``,
    e.g. before and after a sampling setting changed for one stage), and the paired-bootstrap
    CI of the difference over the users both judged: what the change costs, model by model."""
    from mlkit.bootstrap import bootstrap_ci, paired_ci

    a, b = (pd.read_parquet(f) for f in (reference, changed))
    a, b = (f[f["segment"] == "all"] for f in (a, b))
    lines = ["| model | reference NDCG | changed NDCG | changed - reference [95% CI] | users |",
             "|---|---|---|---|---|"]  # fmt: skip
    for model in sorted(set(a["model"]) & set(b["model"])):
        x = a[a["model"] == model].set_index("user_idx")["ndcg"]
        y = b[b["model"] == model].set_index("user_idx")["ndcg"]
        both = x.index.intersection(y.index)
        x, y = x.loc[both], y.loc[both]
        cx, cy = bootstrap_ci(x.to_numpy(), seed=0), bootstrap_ci(y.to_numpy(), seed=0)
        d = paired_ci(y, x)
        lines.append(
            f"| {model} | {cx.mean:.4f} [{cx.low:.4f}, {cx.high:.4f}] | "
            f"{cy.mean:.4f} [{cy.low:.4f}, {cy.high:.4f}] | "
            f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {len(both):,} |"
        )
    return "\n".join(lines)


def two_tower_ndcg(run_dir: Path, models: list[Path]) -> str:
    """NDCG@10 [95% CI] of two-tower checkpoints on a run's holdout (every test user), by the
    nightly evaluation's own scorer and library: what fewer epochs or another optimizer
    cost, with the training set held fixed."""
    import torch

    from mlkit.metrics import evaluate
    from training.data import PROTOCOL
    from training.evaluate import run_interactions, two_tower_scorer

    train, test, features = run_interactions(run_dir)
    lines = []
    for path in models:
        model = torch.load(path, weights_only=False)
        result = evaluate(two_tower_scorer(model, train, features), train, test, 10,
                          exclude_seen=False, split=PROTOCOL)  # fmt: skip
        ci = result.ci("ndcg", n_boot=500)
        lines.append(f"{path}: NDCG@10 {ci.mean:.4f} [{ci.low:.4f}, {ci.high:.4f}] "
                     f"over {len(result.user_values()):,} users")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--stop-after", choices=STAGES, default=STAGES[-1])
    p.add_argument("--keep", action="store_true", help="keep each size's SHOPML_HOME")
    p.add_argument("--start-at", choices=STAGES, help="go on from this stage in the kept "
                   "homes under --root (one earlier run's, with --keep)")  # fmt: skip
    p.add_argument("--root", type=Path, help="the directory of the homes (default: a new one)")
    p.add_argument("--json", type=Path, help="also write the records here, for "
                   "`python -m benchmarks.capacity --scale FILE`")  # fmt: skip
    p.add_argument("--table", type=Path, nargs="+", help="only print the table of these "
                   "--json files (a later file's stage and size replace an earlier's)")  # fmt: skip
    p.add_argument("--sampling-effect", type=Path, metavar="PER_USER", help="only print what "
                   "judging on --users sampled test users does to each model's NDCG, from this "
                   "per_user.parquet of an evaluation of every user")  # fmt: skip
    p.add_argument("--users", type=int, default=1_000, help="with --sampling-effect")
    p.add_argument("--two-tower", type=Path, nargs="+", metavar=("RUN_DIR", "MODEL"),
                   help="only print the NDCG@10 of these two-tower checkpoints (model.pt "
                   "files) on RUN_DIR's holdout")  # fmt: skip
    p.add_argument(
        "--zoo-tables",
        type=Path,
        nargs="+",
        metavar="SOURCE",
        help="only time the serving zoo tables for every user of these `shopml synth` outputs",
    )
    p.add_argument("--neighbour-pool", type=Path, metavar="SOURCE", help="only print what "
                   "user-kNN's neighbour pool of --pool users costs in NDCG@10 on this "
                   "`shopml synth` output")  # fmt: skip
    p.add_argument("--pool", type=int, default=1_000, help="with --neighbour-pool")
    p.add_argument("--paired", type=Path, nargs=2, metavar=("REFERENCE", "CHANGED"),
                   help="only print each model's NDCG difference between two per_user.parquet "
                   "files of the same holdout, paired over users")  # fmt: skip
    args = p.parse_args()
    if args.paired:
        print(paired_effect(*args.paired))
        return
    if args.zoo_tables:
        print(zoo_tables(args.zoo_tables))
        return
    if args.neighbour_pool:
        print(neighbour_pool_effect(args.neighbour_pool, args.pool))
        return
    if args.two_tower:
        print(two_tower_ndcg(args.two_tower[0], args.two_tower[1:]))
        return
    if args.sampling_effect:
        print(sampling_effect(pd.read_parquet(args.sampling_effect), args.users))
        return
    if args.table:
        print(table_of(merged_records(args.table)))
        return
    stages = STAGES[: STAGES.index(args.stop_after) + 1]
    if args.start_at and not args.root:
        p.error("--start-at goes on in an earlier run's homes: give its --root")
    root = args.root or Path(tempfile.mkdtemp(prefix="shopml-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, object]] = []
    for n in args.events:
        home = root / f"events={n}"
        # Feast's Spark offline store (the production default): its file store joins in one
        # Dask process and fails at 10^6 events ("Divisions calculation failed").
        # Spark's driver is local mode's only executor: 2g (the default) ran out of memory in
        # the ranker's point-in-time join of 10^6 events' candidate rows.
        env = {"SHOPML_FEAST__OFFLINE_STORE": "spark", "SHOPML_SPARK__DRIVER_MEMORY": "6g",
               **os.environ, "SHOPML_HOME": str(home)}  # fmt: skip
        env["AIRFLOW_HOME"] = str(home / "airflow")
        log = root / f"events={n}.log"
        users, items = max(100, n // 100), max(1_000, n // 200)
        source = home / "source"
        steps = [("synth", ["synth", "--events", str(n), "--users", str(users),
                            "--items", str(items), "--out", str(source)])]  # fmt: skip
        steps.append(("land", ["land", "--ds", DS, "--source", str(source)]))
        steps += [(s, [s, "--ds", DS]) for s in stages[1:]]
        if args.start_at:
            steps = steps[[name for name, _ in steps].index(args.start_at) :]
        for name, argv in steps:
            seconds, gib, code = run_stage(argv, env, log)
            records.append({"events": n, "stage": name, "seconds": round(seconds, 1),
                            "peak_gib": round(gib, 2), "exit": code})  # fmt: skip
            print(json.dumps(records[-1]), flush=True)
            if args.json:  # the settings that were lowered travel with the figures
                prefixes = ("SHOPML_TRAIN__", "SHOPML_EVAL__", "SHOPML_FEAST__", "SHOPML_SPARK__")
                lowered = {k: v for k, v in env.items() if k.startswith(prefixes)}
                args.json.write_text(json.dumps({"cores": os.cpu_count(), "settings": lowered,
                                                 "records": records}, indent=1))  # fmt: skip
            if code != 0:  # the table still shows what ran; this size stops here
                print(f"{name} FAILED at {n} events (exit {code}): see {log}", flush=True)
                break
    print(f"\nLogs: {root}\n" + table_of(records))
    if not args.keep:
        import shutil

        for n in args.events:
            shutil.rmtree(root / f"events={n}", ignore_errors=True)


if __name__ == "__main__":
    main()
