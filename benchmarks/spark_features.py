"""The Spark feature job against a DuckDB peer on the same Parquet, row for row, side by side.

For each size, a synthetic retailer (``spark_jobs.synth``, no defects: the feature job reads
cleaned events) is written where the job reads its input (the clean events of a date), then,
``--repeats`` times in turn:

* **Spark**: ``spark_jobs.jobs.build_features``, the nightly task itself (user and item
  daily snapshots, read Parquet -> window and group -> write Parquet), on ``--master``;
* **DuckDB**: the same features in SQL (:data:`FLAGS_SQL` once, then :data:`USER_SQL` and
  :data:`ITEM_SQL`), read Parquet -> ``COPY ... TO`` Parquet, with as many threads as the
  machine has cores.

One untimed run of both comes first (the JVM's first job is slower).

The two outputs must be equal row for row (keys exact, floats to 1e-6 relative) or the run
fails. Printed per size: each engine's median seconds and rows/s, the ratio DuckDB time /
Spark time (Spark's throughput as a share of DuckDB's) with a bootstrap CI over the
repeats, and each engine's scaling exponent (the slope of log time on log size).

``python -m benchmarks.spark_features [--sizes 100000 1000000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from mlkit.bootstrap import bootstrap_ci
from shopml import schema as S
from shopml.config import load_settings

DS = date(2025, 12, 31)

FLAGS_SQL = f"""
WITH ev AS (
  SELECT {S.USER_ID}, {S.ITEM_ID}, {S.EVENT_TYPE}, "{S.TIMESTAMP}" AS ts,
         CAST("{S.TIMESTAMP}" AS DATE) AS day,
         COALESCE({S.SESSION_ID}, {S.USER_ID} || '#' || strftime(CAST("{S.TIMESTAMP}" AS DATE),
                  '%Y-%m-%d')) AS basket,
         CASE WHEN {S.EVENT_TYPE} = '{S.PURCHASE}' THEN 1 ELSE 0 END AS is_purchase
  FROM read_parquet('{{src}}/*.parquet')
), g AS (
  SELECT *,
    CASE WHEN is_purchase = 1 AND COALESCE(SUM(is_purchase) OVER (
      PARTITION BY {S.USER_ID}, {S.ITEM_ID} ORDER BY ts
      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) > 0 THEN 1 ELSE 0 END AS is_reorder,
    CASE WHEN row_number() OVER (PARTITION BY {S.USER_ID}, {S.ITEM_ID} ORDER BY ts) = 1
         THEN 1 ELSE 0 END AS is_first_touch
  FROM ev
)
SELECT * FROM g"""

# spark_jobs.features.user_features, in DuckDB's SQL
USER_SQL = f"""
WITH daily AS (
  SELECT {S.USER_ID}, day, count(*) AS events, sum(is_purchase) AS purchases,
         sum(is_reorder) AS reorders, sum(is_first_touch) AS new_items,
         count(DISTINCT CASE WHEN is_purchase = 1 THEN basket END) AS baskets
  FROM g GROUP BY ALL
), cum AS (
  SELECT {S.USER_ID}, day,
    sum(events) OVER w AS e, sum(purchases) OVER w AS p, sum(reorders) OVER w AS r,
    sum(new_items) OVER w AS n, sum(baskets) OVER w AS b,
    lag(day) OVER (PARTITION BY {S.USER_ID} ORDER BY day) AS prev
  FROM daily
  WINDOW w AS (PARTITION BY {S.USER_ID} ORDER BY day
               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT {S.USER_ID}, CAST(day + 1 AS TIMESTAMP) AS {S.FEATURE_TIMESTAMP},
  CAST(e AS BIGINT) AS {S.USER_N_EVENTS}, CAST(p AS BIGINT) AS {S.USER_N_PURCHASES},
  CAST(b AS BIGINT) AS {S.USER_N_BASKETS}, CAST(n AS BIGINT) AS {S.USER_N_DISTINCT_ITEMS},
  CAST(CASE WHEN p > 0 THEN r / p ELSE 0 END AS FLOAT) AS {S.USER_REORDER_RATE},
  CAST(CASE WHEN b > 0 THEN p / b ELSE 0 END AS FLOAT) AS {S.USER_AVG_BASKET_SIZE},
  CAST(COALESCE(datediff('day', prev, day), -1) AS FLOAT) AS {S.USER_DAYS_SINCE_PRIOR}
FROM cum"""

# spark_jobs.features.item_features, in DuckDB's SQL
ITEM_SQL = f"""
WITH daily AS (
  SELECT {S.ITEM_ID}, day, count(*) AS events, sum(is_purchase) AS purchases,
         sum(is_reorder) AS reorders, sum(is_first_touch) AS new_users
  FROM g GROUP BY ALL
)
SELECT {S.ITEM_ID}, CAST(day + 1 AS TIMESTAMP) AS {S.FEATURE_TIMESTAMP},
  CAST(sum(events) OVER w AS BIGINT) AS {S.ITEM_N_EVENTS},
  CAST(sum(purchases) OVER w AS BIGINT) AS {S.ITEM_N_PURCHASES},
  CAST(sum(new_users) OVER w AS BIGINT) AS {S.ITEM_N_USERS},
  CAST(CASE WHEN sum(purchases) OVER w > 0 THEN sum(reorders) OVER w / sum(purchases) OVER w
            ELSE 0 END AS FLOAT) AS {S.ITEM_REORDER_RATE},
  CAST(sum(purchases) OVER (PARTITION BY {S.ITEM_ID} ORDER BY day
       RANGE BETWEEN INTERVAL 29 DAYS PRECEDING AND CURRENT ROW) AS BIGINT)
       AS {S.ITEM_PURCHASES_30D}
FROM daily
WINDOW w AS (PARTITION BY {S.ITEM_ID} ORDER BY day
             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"""


def duckdb_features(src: Path, out: Path, threads: int) -> None:
    """The peer: both tables, Parquet in, Parquet out."""
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"threads": threads})
    try:
        con.execute("SET TimeZone = 'UTC'")
        # flagged once for both tables, as the Spark job does
        con.execute(f"CREATE TEMP TABLE g AS {FLAGS_SQL.format(src=src)}")
        for name, sql in (("user", USER_SQL), ("item", ITEM_SQL)):
            con.execute(f"COPY ({sql}) TO '{out / name}.parquet' (FORMAT parquet)")
    finally:
        con.close()


def _frame(path: Path, key: str) -> pd.DataFrame:
    df = pd.read_parquet(path)
    df[S.FEATURE_TIMESTAMP] = pd.to_datetime(df[S.FEATURE_TIMESTAMP]).dt.tz_localize(None)
    return df.sort_values([key, S.FEATURE_TIMESTAMP]).reset_index(drop=True)


def assert_equal(spark_out: Path, duck_out: Path) -> dict[str, int]:
    """Row for row: the same keys and counts, floats to 1e-6 relative."""
    rows = {}
    for name, key in (("user", S.USER_ID), ("item", S.ITEM_ID)):
        a = _frame(spark_out / name, key)
        b = _frame(duck_out / f"{name}.parquet", key)[list(a.columns)]
        pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-6)
        rows[name] = len(a)
    return rows


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """The slope of log(seconds) on log(size)."""
    if len(sizes) < 2:
        return math.nan
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main() -> None:
    from spark_jobs.jobs import build_features
    from spark_jobs.session import get_spark
    from spark_jobs.synth import Shape, write

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--master", default="local[*]", help="Spark master (e.g. spark://host:7077)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DuckDB threads")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shopml-features-"))
    os.environ["SHOPML_HOME"] = str(root / "home")
    settings = load_settings()
    settings = settings.model_copy(
        update={"spark": settings.spark.model_copy(update={"master": args.master})}
    )
    spark = get_spark(settings.spark, "shopml-spark-features")
    cores = spark.sparkContext.defaultParallelism
    results = []
    try:
        for size in args.sizes:
            src = settings.paths.clean_events_for(DS)
            shape = Shape(events=size, users=max(100, size // 100), items=max(1000, size // 200),
                          defect_rate=0.0)  # fmt: skip
            synth = write(spark, shape, root / "synth")
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(root / "synth" / "events", src)
            times: dict[str, list[float]] = {"spark": [], "duckdb": []}
            if size == args.sizes[0]:  # untimed: the JVM's and DuckDB's first run warm them up
                build_features(settings, DS, spark)
                duckdb_features(src, root / "duck", args.threads)
            for _ in range(args.repeats):
                started = time.perf_counter()
                rows = build_features(settings, DS, spark)
                times["spark"].append(time.perf_counter() - started)
                started = time.perf_counter()
                duckdb_features(src, root / "duck", args.threads)
                times["duckdb"].append(time.perf_counter() - started)
            equal = assert_equal(settings.paths.features_for(DS), root / "duck")
            ratios = np.array(times["duckdb"]) / np.array(times["spark"])
            ci = bootstrap_ci(ratios, seed=0)
            row = {"events": synth["events"], "user_rows": rows["user_rows"],
                   "item_rows": rows["item_rows"], "equal_rows": equal,
                   "spark_s": float(np.median(times["spark"])),
                   "duckdb_s": float(np.median(times["duckdb"])),
                   "spark_share_of_duckdb": ci.mean, "share_ci": [ci.low, ci.high],
                   "times": times}  # fmt: skip
            row["spark_rows_per_s"] = size / row["spark_s"]
            row["duckdb_rows_per_s"] = size / row["duckdb_s"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)
    sizes = [r["events"] for r in results]
    print(f"\n## Feature job: Spark ({args.master}, {cores} cores) vs DuckDB ({args.threads} "
          f"threads), the same Parquet, equal row for row; median of {args.repeats}\n")  # fmt: skip
    print(
        "| events | Spark s | Spark rows/s | DuckDB s | DuckDB rows/s | Spark throughput ÷ "
        "DuckDB's [95% CI] |\n|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['events']:,} | {r['spark_s']:.1f} | {r['spark_rows_per_s']:,.0f} | "
            f"{r['duckdb_s']:.1f} | {r['duckdb_rows_per_s']:,.0f} | "
            f"{r['spark_share_of_duckdb']:.3f} "
            f"[{r['share_ci'][0]:.3f}, {r['share_ci'][1]:.3f}] |"
        )
    for engine in ("spark", "duckdb"):
        seconds = [r[f"{engine}_s"] for r in results]
        print(f"{engine} scaling exponent (log time on log size): {exponent(sizes, seconds):.2f}")


if __name__ == "__main__":
    main()
