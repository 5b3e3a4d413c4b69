"""Search benchmark: the quality table of a search run with ratios and CIs, and /search latency.

    python -m benchmarks.search [--ds 2025-12-31] [--rate 10] [--duration 30] [--no-latency]

Quality (from the search DAG's run of ``--ds``: ``SHOPML_HOME/search_runs/ds=…``): every row
on the test queries with NDCG@10 and its bootstrap CI, MRR@10, Recall@100, the two views
(product-overlapping / product-disjoint) and cold products, and its ratio to the two bars of
the issue, **BM25 + popularity** and **zero-shot MiniLM**, with the paired-bootstrap CI of
each difference (same queries). Configurations were chosen on validation queries by the
pipeline (``training.search``); nothing here looks at test numbers to choose.

Latency: ``shopml serve`` on the same home (needs the recommender champion of ``make demo``
and the search champion of ``make demo-search``), driven open-loop (``benchmarks.loadgen``)
at ``--rate`` requests/s with the test queries, with the cross-encoder rerank on and off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pandas as pd

from benchmarks.measure import summarize_load
from benchmarks.serving import free_port, start_server, stop_server, wait_ready
from mlkit.bootstrap import bootstrap_ci
from shopml.config import load_settings

BARS = ("bm25_popularity", "minilm_zero_shot")
METRIC = "ndcg_at_10"
ROOT = Path(__file__).resolve().parents[1]


def quality_table(run_dir: Path) -> pd.DataFrame:
    """One row per configuration, with its ratio to each bar and the difference's CI."""
    table = pd.read_json(run_dir / "evaluation.json")
    per_query = pd.read_parquet(run_dir / "per_query.parquet")
    wide = per_query.pivot(index="query_id", columns="model", values=METRIC)
    rows = []
    for r in table.to_dict("records"):
        row = {
            "model": r["model"], "role": r["role"],
            "ndcg@10 [95% CI]": f"{r[METRIC]:.4f} [{r[f'{METRIC}_ci_low']:.4f}, "
                                f"{r[f'{METRIC}_ci_high']:.4f}]",
            "mrr@10": f"{r['mrr_at_10']:.4f}", "recall@100": f"{r['recall_at_100']:.4f}",
            "overlap": f"{r[f'overlapping.{METRIC}']:.4f}",
            "disjoint": f"{r[f'disjoint.{METRIC}']:.4f}",
            "cold": f"{r[f'cold.{METRIC}']:.4f}", "p50 ms": f"{r['latency_ms']:.1f}",
        }  # fmt: skip
        for bar in BARS:
            diff = bootstrap_ci((wide[r["model"]] - wide[bar]).to_numpy())
            ratio = r[METRIC] / wide[bar].mean()
            row[f"x {bar}"] = (
                f"{ratio:.3f} (diff {diff.mean:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}])"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def latency(settings, run_dir: Path, rate: float, duration: float, rerank: bool) -> dict:
    """``shopml serve`` with search, loaded open-loop with the test queries."""
    queries = pd.read_parquet(run_dir / "per_query.parquet")["query_id"].unique()
    table = pd.read_parquet(settings.paths.search_table_for("queries", run_dir.name[3:]))
    texts = table[table["query_id"].isin(queries)]["query"].tolist()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="shopml-bench-search-") as tmp:
        tmp = Path(tmp)
        paths = tmp / "paths.txt"
        paths.write_text("\n".join(f"/search?q={urllib.parse.quote(q)}&k=10" for q in texts))
        log = tmp / "serve.log"
        proc = start_server(port, log, {"SHOPML_SEARCH__SERVE_RERANK": str(rerank).lower()},
                            home=settings.paths.home)  # fmt: skip
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", log, timeout=300)
            out = tmp / "load.json"
            subprocess.run(
                [sys.executable, "-m", "benchmarks.loadgen", "--url", f"http://127.0.0.1:{port}",
                 "--rate", str(rate), "--duration", str(duration), "--paths-file", str(paths),
                 "--out", str(out)],
                check=True, cwd=ROOT,
            )  # fmt: skip
            return summarize_load(out, duration)
        finally:
            stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__)
    p.add_argument("--ds", default="2025-12-31")
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--no-latency", action="store_true")
    args = p.parse_args()
    settings = load_settings()
    run_dir = settings.paths.search_run(args.ds)
    if not (run_dir / "evaluation.json").exists():
        raise SystemExit(f"no search run at {run_dir}: run `make demo-search` first")
    tuning = json.loads((run_dir / "tuning.json").read_text())
    print(f"search benchmark, run {run_dir} ({tuning['test_queries']} test queries; configs "
          f"chosen on {tuning['validation_queries']} validation queries)")  # fmt: skip
    print(quality_table(run_dir).to_markdown(index=False))
    if args.no_latency:
        return
    from training import registry

    if registry.champion_version(settings) is None:
        print(f"\n/search latency: not measured. The service that answers /search also serves "
              f"recommendations and starts only with a '{settings.model_name}' champion: run "
              "`make demo` (the nightly DAG), then `make bench-search`.")  # fmt: skip
        return
    rows = []
    for rerank in (True, False):
        s = latency(settings, run_dir, args.rate, args.duration, rerank)
        ms = s["latency_ms"]
        rows.append(
            {
                "rerank": rerank,
                "rate": args.rate,
                "requests": s["requests"],
                "errors": s["errors"],
                "p50 ms": round(ms["p50"], 1),
                "p99 ms": round(ms["p99"], 1),
                "achieved rps": round(s["achieved_rps"], 1),
            }
        )
    print(f"\n/search at {args.rate:g} requests/s for {args.duration:g} s (open loop):")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
