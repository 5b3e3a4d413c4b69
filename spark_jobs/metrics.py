"""Ranking metrics in Spark SQL, for top-k lists scored in batch at a scale pandas won't hold.

Same definitions as ``mlkit.metrics`` (its module docstring), so a number computed here and
one computed in Python mean the same thing; ``tests/test_metrics.py`` checks equality on a
seeded random case. Only built-in SQL functions are used (higher-order ``transform``,
``aggregate``, ``filter``; no Python UDFs), so the work stays in the JVM.

Inputs: ``ranked`` with (user, array<string> best first) and ``truth`` with one row per
held-out (user, item). Users are those of ``truth``; a user without a ranking scores 0. A
repeated item counts once, at its first position (later copies are misses), as in
``mlkit.metrics.rankings_per_user``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shopml import schema as S

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

#: Per-user metric columns, as in ``mlkit.metrics.RANKING_METRICS``.
METRICS: tuple[str, ...] = ("hr", "recall", "precision", "ndcg", "mrr", "ap", "ap_full")


def _sum(array: Column, zero: Column) -> Column:
    from pyspark.sql import functions as F

    return F.aggregate(array, zero, lambda acc, x: acc + x)


def ranking_metrics(
    ranked: DataFrame,
    truth: DataFrame,
    k: int,
    user_col: str = S.USER_ID,
    ranked_col: str = "ranked",
    item_col: str = S.ITEM_ID,
) -> DataFrame:
    """One row per truth user: ``n_relevant``, ``hits`` and the metrics of ``METRICS`` at k."""
    from pyspark.sql import functions as F

    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    for frame, cols, name in (
        (ranked, (user_col, ranked_col), "ranked"),
        (truth, (user_col, item_col), "truth"),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} has no {missing} column(s) (columns: {frame.columns})")

    rel = (
        truth.where(F.col(item_col).isNotNull())
        .groupBy(user_col)
        .agg(F.collect_set(F.col(item_col).cast("string")).alias("_rel"))
    )
    top = F.coalesce(F.slice(F.col(ranked_col), 1, k), F.array().cast("array<string>"))
    df = rel.join(ranked.select(user_col, top.alias("_top")), on=user_col, how="left").withColumn(
        "_top", F.coalesce("_top", F.array().cast("array<string>"))
    )
    # hit at 0-based position i: relevant, and not already listed at an earlier position
    df = df.withColumn(
        "_hit",
        F.transform(
            "_top",
            lambda x, i: F.coalesce(
                F.array_contains("_rel", x) & ~F.array_contains(F.slice("_top", 1, i), x),
                F.lit(False),
            ),
        ),
    )
    hit_int = F.transform("_hit", lambda h: h.cast("int"))
    n_rel = F.size("_rel")
    n_hits = _sum(hit_int, F.lit(0))
    dcg = _sum(
        F.transform("_hit", lambda h, i: F.when(h, 1.0 / F.log2(i + 2)).otherwise(0.0)),
        F.lit(0.0),
    )
    idcg = _sum(
        F.transform(F.sequence(F.lit(1), F.least(n_rel, F.lit(k))), lambda j: 1.0 / F.log2(j + 1)),
        F.lit(0.0),
    )
    # precision at each hit: hits among the first i + 1 over i + 1
    precision_at_hit = F.transform(
        "_hit",
        lambda h, i: F.when(h, _sum(F.slice(hit_int, 1, i + 1), F.lit(0)) / (i + 1)).otherwise(0.0),
    )
    first = F.array_position("_hit", True)
    df = df.select(
        user_col,
        n_rel.alias("n_relevant"),
        n_hits.alias("hits"),
        idcg.alias("_idcg"),
        dcg.alias("_dcg"),
        first.alias("_first"),
        _sum(precision_at_hit, F.lit(0.0)).alias("_sum_precision"),
    )
    positive = F.col("n_relevant") > 0
    return df.select(
        user_col,
        "n_relevant",
        "hits",
        (F.col("hits") > 0).cast("double").alias("hr"),
        F.when(positive, F.col("hits") / F.col("n_relevant")).otherwise(0.0).alias("recall"),
        (F.col("hits") / F.lit(float(k))).alias("precision"),
        F.when(positive, F.col("_dcg") / F.col("_idcg")).otherwise(0.0).alias("ndcg"),
        F.when(F.col("_first") > 0, 1.0 / F.col("_first")).otherwise(0.0).alias("mrr"),
        F.when(positive, F.col("_sum_precision") / F.least("n_relevant", F.lit(k)))
        .otherwise(0.0)
        .alias("ap"),
        F.when(positive, F.col("_sum_precision") / F.col("n_relevant"))
        .otherwise(0.0)
        .alias("ap_full"),
    )


def mean_ranking_metrics(
    ranked: DataFrame,
    truth: DataFrame,
    k: int,
    user_col: str = S.USER_ID,
    ranked_col: str = "ranked",
    item_col: str = S.ITEM_ID,
) -> dict[str, float]:
    """Means over truth users, keyed by ``mlkit.metrics.metric_key`` (and ``users``)."""
    from pyspark.sql import functions as F

    from mlkit.metrics import metric_key

    per_user = ranking_metrics(ranked, truth, k, user_col, ranked_col, item_col)
    row = per_user.agg(
        F.count(F.lit(1)).alias("users"), *(F.avg(m).alias(m) for m in METRICS)
    ).first()
    if row is None or row["users"] == 0:
        raise ValueError("no users to evaluate: the holdout is empty")
    out = {metric_key(m, k): float(row[m]) for m in METRICS}
    out["users"] = float(row["users"])
    return out
