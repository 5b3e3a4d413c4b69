"""Compression benchmark: teacher and compressed candidates side by side, in one run.

    python -m benchmarks.compression [--ds 2025-12-31] [--queries 100] [--rounds 3]
                                     [--skip-ranker] [--skip-search]

**Search cross-encoder** (the search DAG's ``compress_search`` of ``--ds``; default the latest
search run with a ``compression/`` folder): every candidate reranker (teacher fp32, PyTorch
int8, ONNX, ONNX Runtime dynamic and static int8, the distilled student and the pruned model
with their int8 ONNX forms) is loaded here and timed at the serving shape (one query x the
rerank depth) on ``--queries`` validation queries' real candidate lists, interleaved, ``--rounds``
times; p50 with its bootstrap CI, p99, file size, parameters and the ratios to the teacher.
NDCG@10 on validation (what chose) and test (what is reported), with the paired-bootstrap CI of
the difference to the teacher on the same queries, is the pipeline's (read, not recomputed:
the choice was made there, on validation).

**Recommender ranker** (the nightly ``compress`` task): ``benchmarks.compression_ranker``.

The targets (issue 12) are printed under each table with the measured value beside them.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import pandas as pd

from shopml.config import load_settings
from training import search as ts
from training.compress import latency_summary

SEARCH_TARGETS = {"size_ratio": 4.0, "speed_ratio": 3.0, "max_relative_loss": 0.02}


def latest_search_run(ds: str | None = None) -> Path:
    """The search run of ``ds``, or the latest one whose compression finished."""
    settings = load_settings()
    if ds:
        return settings.paths.search_run(date.fromisoformat(ds))
    runs = sorted(settings.paths.home.glob(f"search_runs/ds=*/{ts.COMPRESSION}/choice.json"))
    if not runs:
        raise FileNotFoundError(
            f"no search run under {settings.paths.home} has been compressed: run "
            "`make demo-search` (or `shopml search compress --ds …`) first"
        )
    return runs[-1].parents[1]


def search_table(run_dir: Path, queries: int = 100, rounds: int = 3) -> pd.DataFrame:
    """Every reranker candidate of ``run_dir`` timed here, side by side, with the pipeline's
    quality columns and the ratios to the teacher."""
    from served_model.search import QueryConfig, SearchBundle, SearchEngine, load_cross_encoder

    out = run_dir / ts.COMPRESSION
    record = json.loads((out / "choice.json").read_text())
    measured = pd.read_json(out / "candidates.json").set_index("candidate")
    settings = load_settings()
    config = QueryConfig.from_dict(record["config"])
    engine = SearchEngine(SearchBundle.load(run_dir / "bundle"))
    ds = date.fromisoformat(run_dir.name.removeprefix("ds="))
    lists = ts._rerank_lists(engine, ts._split(settings, ds, "validation", queries), config)
    models = {name: load_cross_encoder(run_dir / row["path"]) for name, row in measured.iterrows()}
    times = ts.latency_ms(models, lists, rounds=rounds)
    rows = []
    for name, row in measured.iterrows():
        rows.append({
            "candidate": name, "format": row["format"], "MB": row["bytes"] / 1e6,
            "params": int(row["params"]), **latency_summary(times[name]),
            "val_ndcg": row["val_ndcg"],
            "val_diff [95% CI]": f"{row['val_diff']:+.4f} [{row['val_diff_low']:+.4f}, "
                                 f"{row['val_diff_high']:+.4f}]",
            "test_ndcg": row["test_ndcg"],
            "test_diff [95% CI]": f"{row['test_diff']:+.4f} [{row['test_diff_low']:+.4f}, "
                                  f"{row['test_diff_high']:+.4f}]",
            "max_abs_diff": row.get("max_abs_diff"), "chosen": bool(row["chosen"]),
            "why": row["why"],
        })  # fmt: skip
    table = pd.DataFrame(rows)
    teacher = table.set_index("candidate").loc[ts.TEACHER]
    table["size_ratio"] = teacher["MB"] / table["MB"]
    table["speed_ratio"] = teacher["p50_ms"] / table["p50_ms"]
    table["val_rel"] = table["val_ndcg"] / teacher["val_ndcg"] - 1
    table.attrs.update(run=str(run_dir), chosen=record["chosen"], pairs=len(lists))
    return table


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _search_targets(table: pd.DataFrame) -> list[str]:
    c = table[table["chosen"]].iloc[0]
    t = SEARCH_TARGETS
    return [
        f"chosen: {c['candidate']} ({c['format']})",
        f"  size   {c['size_ratio']:.2f}x smaller than the teacher (target >= "
        f"{t['size_ratio']:.0f}x: {_verdict(c['size_ratio'] >= t['size_ratio'])})",
        f"  speed  {c['speed_ratio']:.2f}x faster p50 at the serving shape (target >= "
        f"{t['speed_ratio']:.0f}x: {_verdict(c['speed_ratio'] >= t['speed_ratio'])})",
        f"  NDCG@10 on validation {c['val_rel']:+.2%} vs the teacher (target >= "
        f"-{t['max_relative_loss']:.0%}: {_verdict(c['val_rel'] >= -t['max_relative_loss'])}); "
        f"test diff {c['test_diff [95% CI]']}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ds", default=None, help="the search run's date (default: latest)")
    parser.add_argument("--queries", type=int, default=100, help="validation queries timed")
    parser.add_argument("--rounds", type=int, default=3, help="passes over those queries")
    parser.add_argument("--skip-ranker", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 80)
    if not args.skip_search:
        table = search_table(latest_search_run(args.ds), args.queries, args.rounds)
        print(f"\n== search cross-encoder: {table.attrs['run']} "
              f"({table.attrs['pairs']} queries x rerank depth, {args.rounds} rounds)")  # fmt: skip
        cols = ["candidate", "format", "MB", "params", "p50_ms", "p50_ms_ci_low",
                "p50_ms_ci_high", "p99_ms", "size_ratio", "speed_ratio", "val_ndcg",
                "val_diff [95% CI]", "test_ndcg", "test_diff [95% CI]", "chosen"]  # fmt: skip
        print(table[cols].round(4).to_string(index=False))
        print("\n".join(_search_targets(table)))
        print("why not:")
        for r in table[~table["chosen"]].itertuples():
            print(f"  {r.candidate}: {r.why}")
    if not args.skip_ranker:
        from benchmarks.compression_ranker import main as ranker_main

        print("\n== recommender ranker (nightly compress)")
        ranker_main()


if __name__ == "__main__":
    main()
