"""The served ranker's compression candidates side by side (the recommender half of
``python -m benchmarks.compression``).

:func:`ranker_table` takes the latest nightly run that has a ``compression/`` folder (written
by the ``compress`` task, ``training.pipeline.compress``), loads every saved candidate and
re-measures the ranking stage's latency for all of them in this one process, interleaved, at
the serving shape (one user, the run's ranking depth: 200 candidates by default), with a
bootstrap CI of each p50. NDCG@10
(validation and test, with the paired-bootstrap CI of the difference to the teacher) is the
one the nightly measured on the served path; it is read, not recomputed.

``python -m benchmarks.compression_ranker`` prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from served_model.ranker import LEGACY_FEATURES, RANKER_FEATURES
from shopml.config import load_settings
from training import compress as C
from training.pipeline import COMPRESSION_DIR, COMPRESSION_FILE
from training.ranking import RANKER_ROWS

COLUMNS = [
    "candidate", "format", "bytes", "params", "size_ratio", "p50_ms", "p50_ms_ci_low",
    "p50_ms_ci_high", "p99_ms", "speed_ratio", "nightly_p50_ms", "max_abs_diff",
    "val_ndcg", "test_ndcg", "test_diff", "test_diff_ci_low", "test_diff_ci_high", "verdict",
]  # fmt: skip


def latest_compression(home: Path | None = None) -> Path:
    """The ``compression/`` folder of the latest run that has one."""
    settings = load_settings(**({"home": home} if home is not None else {}))
    runs = sorted((settings.paths.home / "runs").glob(f"ds=*/{COMPRESSION_DIR}/{COMPRESSION_FILE}"))
    if not runs:
        raise FileNotFoundError(
            f"no run under {settings.paths.home / 'runs'} has {COMPRESSION_DIR}/"
            f"{COMPRESSION_FILE}: run the nightly (make demo) or `shopml compress --ds …` first"
        )
    return runs[-1].parent


def ranker_table(home: Path | None = None, repeats: int = 500) -> pd.DataFrame:
    """Teacher and candidates of the latest nightly run: size, params, p50/p99 re-measured
    here (CI of the p50), NDCG@10 as the nightly measured it, ratios to the teacher and the
    gate's verdict."""
    folder = latest_compression(home)
    record = json.loads((folder / COMPRESSION_FILE).read_text())
    nightly = pd.DataFrame(record["table"]).set_index("candidate")
    # every candidate reads the teacher's features (students are built on them)
    features = tuple(record.get("chosen_features", LEGACY_FEATURES))
    rankers = {
        name: C.load_saved_ranker(
            folder / row["file"], row["format"], int(row["params"]), features
        )  # fmt: skip
        for name, row in nightly.iterrows()
    }
    rows_file = folder.parent / RANKER_ROWS
    if rows_file.exists():
        with np.load(rows_file) as z:
            x = z["x"][z["validation"]] if z["validation"].any() else z["x"]
    else:  # rows not kept: any plausible rows time the same arithmetic
        x = np.random.default_rng(0).lognormal(size=(1000, len(RANKER_FEATURES)))
        x = x.astype(np.float32)
    depth = int(record.get("serving_rows", C.SERVING_ROWS))  # the run's ranking depth
    times = C.ranking_latency(rankers, C.serving_rows(x, depth), repeats=repeats)
    out = []
    for name in rankers:
        row = nightly.loc[name]
        out.append({
            "candidate": name, "format": row["format"], "bytes": int(row["bytes"]),
            "params": int(row["params"]), **C.latency_summary(times[name]),
            "nightly_p50_ms": row["p50_ms"], "max_abs_diff": row.get("max_abs_diff"),
            **{c: row.get(c) for c in ("val_ndcg", "test_ndcg", "test_diff",
                                       "test_diff_ci_low", "test_diff_ci_high")},
            "verdict": row.get("verdict"),
        })  # fmt: skip
    table = pd.DataFrame(out)
    teacher = table.set_index("candidate").loc[record["choice"]["teacher"]]
    table["size_ratio"] = teacher["bytes"] / table["bytes"]
    table["speed_ratio"] = teacher["p50_ms"] / table["p50_ms"]
    table.attrs["run"] = str(folder.parent)
    table.attrs["chosen"] = record["chosen"]
    return table[COLUMNS]


RANKER_TARGETS = {"speed_ratio": 2.0, "max_relative_loss": 0.01}


def main() -> None:
    t = ranker_table()
    print(f"ranker candidates of {t.attrs['run']} (chosen: {t.attrs['chosen']})")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(t.round(4).to_string(index=False))
    chosen = t.set_index("candidate").loc[t.attrs["chosen"]]
    teacher = t.set_index("candidate").loc[C.TEACHER]
    best = t["speed_ratio"].max()
    print(
        f"  chosen speed {chosen['speed_ratio']:.2f}x the teacher's p50 (fastest candidate "
        f"{best:.2f}x; target >= {RANKER_TARGETS['speed_ratio']:.0f}x: "
        f"{'met' if chosen['speed_ratio'] >= RANKER_TARGETS['speed_ratio'] else 'NOT met'})"
    )
    if pd.notna(chosen.get("val_ndcg")) and pd.notna(teacher.get("val_ndcg")):
        rel = chosen["val_ndcg"] / teacher["val_ndcg"] - 1
        print(
            f"  chosen NDCG@10 on validation {rel:+.2%} vs the teacher (target >= "
            f"-{RANKER_TARGETS['max_relative_loss']:.0%})"
        )


if __name__ == "__main__":
    main()
