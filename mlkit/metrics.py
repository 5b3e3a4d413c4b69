"""Offline evaluation: the one library every model, the DAG and the promotion gate go through.

Why one library: a metric is only comparable between two models if the same code ranked the
catalog, excluded (or kept) the items the user had already seen and averaged over the same
users. Models therefore only return scores (``Recommender.score``); everything after that
(top-k, exclusion, metrics, segments, confidence intervals) happens here.

Protocol, stated in every table (``EvaluationResult.protocol``):

* **Full ranking.** Every catalog item is ranked for every test user; there are no sampled
  negatives (sampled metrics overstate quality and reorder models). This library offers no
  sampled metrics; if one is ever added its key must say so (``..._sampled``).
* **Seen items** are excluded or kept per protocol, never per model: movie-style benchmarks
  (MovieLens, the Microsoft Recommenders tables) exclude them; repeat-purchase commerce
  (Instacart) must keep them, since most of a basket is reorders. ``evaluate`` therefore has
  no default for ``exclude_seen``.
* **Binary relevance.** Every held-out (user, item) counts as relevant once, whatever its
  weight or rating (as in the Microsoft Recommenders ranking metrics).

Metric definitions at cut-off k (per user, then the plain mean over users; ``rel`` = the user's
held-out items, ``hit_i`` = 1 if the item at rank i is relevant, ranks are 1-based):

* ``hr``        1 if any of the top k is relevant (hit rate).
* ``recall``    hits / |rel|.
* ``precision`` hits / k (k, not the list length: a short list is a worse list).
* ``ndcg``      sum_i hit_i / log2(i + 1)  over the ideal DCG of min(|rel|, k) hits at the top.
* ``mrr``       1 / rank of the first hit (0 without a hit): MRR@k.
* ``ap``        sum_i hit_i * precision@i / min(|rel|, k). Its mean is reported as
                ``map_at_k``: this is Spark MLlib's ``meanAveragePrecisionAt(k)`` and the
                current Microsoft Recommenders ``map_at_k``; it reaches 1.0 for a perfect list
                even when |rel| > k.
* ``ap_full``   the same sum / |rel|, reported as ``map_full_at_k``: the Microsoft
                Recommenders ``map`` function. Older Recommenders releases computed exactly this
                under the name ``map_at_k``, so tables made with them report it as "MAP": compare
                those with ``map_full_at_k``, and tables from current releases or Spark MLlib
                with ``map_at_k``. The two agree whenever every user has |rel| <= k.

Beyond accuracy (over the recommended lists, excluded slots ignored):

* ``coverage``  distinct recommended items / catalog size.
* ``diversity`` intra-list diversity: mean pairwise (1 - cosine similarity) of the items in a
                list. Item vectors are supplied by the caller; by default each item's binary
                column of the training user x item matrix (so cosine = co-occurrence / sqrt of
                the two popularities, as Microsoft Recommenders' ``item_cooccurrence_count``).
                Items without a vector (never interacted) have similarity 0 to everything.
* ``novelty``   mean over the list of -log2 p(i), p(i) = share of training users who interacted
                with i (the "item choice" popularity of Castells et al., as in Microsoft
                Recommenders). Items nobody interacted with get p = 1 / n_users, i.e. they count
                as novel as the rarest observed item (finite, and a lower bound).

Confidence intervals: ``mlkit.bootstrap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from mlkit.beyond_accuracy import (
    catalog_coverage,
    default_item_vectors,
    intra_list_diversity,
    item_user_share,
    novelty,
)
from mlkit.bootstrap import ConfidenceInterval, bootstrap_ci
from mlkit.interactions import ITEM_IDX, USER_IDX, Interactions
from shopml import schema as S

#: Per-user ranking metrics, in table order (column names of ``per_user_metrics``).
RANKING_METRICS: tuple[str, ...] = ("hr", "recall", "precision", "ndcg", "mrr", "ap", "ap_full")
#: Per-user beyond-accuracy metrics (columns added by ``evaluate``).
LIST_METRICS: tuple[str, ...] = ("diversity", "novelty")
#: Summary key stem of each per-user column (``ap`` averages to MAP).
_SUMMARY_NAME = {"ap": "map", "ap_full": "map_full"}
#: Segments ``evaluate`` reports next to ``all``.
SEGMENTS: tuple[str, ...] = ("cold", "heavy", "long_tail", "mostly_long_tail")


def metric_key(metric: str, k: int) -> str:
    """Summary/table key of a per-user metric column, e.g. ``("ap", 10) -> "map_at_10"``."""
    return f"{_SUMMARY_NAME.get(metric, metric)}_at_{k}"


def rankings_per_user(
    rankings: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], k: int
) -> pd.DataFrame:
    """Per-user metrics of id-space rankings (one row per user of ``truth``, in its order).

    A user without a ranking scores 0; a list shorter than ``k`` is a worse list (precision
    still divides by ``k``). A repeated item counts once, at its first position (its later
    slots are misses), so Recall agrees with ``recall_at_k``. Used by ``evaluate_rankings``
    and as the reference of the Spark parity test.
    """
    _check_k(k)
    users = list(truth)
    vocab: dict[str, int] = {}
    topk_idx = np.full((len(users), k), -1, dtype=np.int64)
    rows: list[int] = []
    cols: list[int] = []
    for r, user in enumerate(users):
        seen: set[str] = set()
        for j, item in enumerate(list(rankings.get(user, []))[:k]):
            if item in seen:
                continue
            seen.add(item)
            topk_idx[r, j] = vocab.setdefault(item, len(vocab))
        for item in truth[user]:
            rows.append(r)
            cols.append(vocab.setdefault(item, len(vocab)))
    relevant = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(users), max(len(vocab), 1))
    )
    out = per_user_metrics(topk_idx, relevant, k)
    out.insert(0, S.USER_ID, users)
    return out


# --------------------------------------------------------------------------------------------
# Index space: top-k, relevance, per-user metrics
# --------------------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def topk(
    scores: np.ndarray, k: int, exclude: sparse.spmatrix | np.ndarray | None = None
) -> np.ndarray:
    """Indices of the ``k`` best items per row, best first: ``(n_users, k)`` int64.

    Ties break by the lower item index, so a ranking never depends on the partition
    algorithm or the platform. Items where ``exclude`` is non-zero are never recommended;
    a slot with no eligible item left (everything excluded, or ``k`` > catalog) is ``-1``
    and counts as a miss everywhere. Cost: one partition plus a few passes over the scores,
    no full sort of the catalog.
    """
    _check_k(k)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (users, items) matrix, got shape {scores.shape}")
    n, n_items = scores.shape
    if n_items == 0:
        raise ValueError("scores have no item columns: the catalog is empty")
    dtype = scores.dtype if scores.dtype in (np.float32, np.float64) else np.float64
    s = np.array(scores, dtype=dtype, copy=True)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: the model produced an invalid score")
    if exclude is not None:
        if exclude.shape != s.shape:
            raise ValueError(f"exclude has shape {exclude.shape}, scores {s.shape}")
        r, c = exclude.nonzero()
        s[r, c] = -np.inf
    kk = min(k, n_items)
    if n == 0:
        return np.full((0, k), -1, dtype=np.int64)
    # the kk-th largest value of each row; everything above it is in, ties at it go by index
    kth = -np.partition(-s, kk - 1, axis=1)[:, kk - 1]
    above = s > kth[:, None]
    at = s == kth[:, None]
    need = kk - above.sum(axis=1)
    chosen = above | (at & (np.cumsum(at, axis=1, dtype=np.int32) <= need[:, None]))
    cols = np.nonzero(chosen)[1].reshape(n, kk)  # row-major: ascending item index per row
    vals = np.take_along_axis(s, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: equal scores keep index order
    out = np.take_along_axis(cols, order, axis=1).astype(np.int64)
    out[np.take_along_axis(vals, order, axis=1) == -np.inf] = -1
    if kk < k:
        out = np.hstack([out, np.full((n, k - kk), -1, dtype=np.int64)])
    return out


def holdout_users(test: Interactions) -> np.ndarray:
    """Sorted indices of the users with at least one held-out event."""
    return np.unique(test.events[USER_IDX].to_numpy()).astype(np.int64)


def relevance_matrix(test: Interactions, users: np.ndarray | None = None) -> sparse.csr_matrix:
    """Binary ``(len(users), n_items)`` CSR of held-out items, rows in ``users`` order.

    Built from event presence, not weights: a held-out rating of 1 star is as relevant as 5
    (binary relevance, module docstring); duplicates collapse to one relevant item.
    """
    ev = test.events
    full = sparse.csr_matrix(
        (np.ones(len(ev), dtype=np.int8), (ev[USER_IDX].to_numpy(), ev[ITEM_IDX].to_numpy())),
        shape=(test.n_users, test.n_items),
    )
    full.sum_duplicates()
    full.data[:] = 1
    if users is None:
        users = holdout_users(test)
    return full[np.asarray(users, dtype=np.int64)]


def per_user_metrics(
    topk_idx: np.ndarray, relevant: sparse.spmatrix, k: int | None = None
) -> pd.DataFrame:
    """One row per user: ``n_relevant``, ``hits`` and the ranking metrics at ``k``.

    ``topk_idx`` is ``topk``'s output (``-1`` = empty slot), ``relevant`` the aligned binary
    relevance rows. Kept per user (not only means) so bootstrap intervals, segments and the
    paired promotion gate all reuse the same numbers. A user without relevant items scores 0.
    """
    topk_idx = np.asarray(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be (users, k), got shape {topk_idx.shape}")
    n, width = topk_idx.shape
    k = width if k is None else k
    _check_k(k)
    if k > width:
        raise ValueError(f"k={k} but the lists only have {width} slots")
    if relevant.shape[0] != n:
        raise ValueError(f"relevance has {relevant.shape[0]} rows for {n} ranked users")
    top = topk_idx[:, :k]
    rel = sparse.csr_matrix(relevant)
    rel.sum_duplicates()
    rel.eliminate_zeros()
    n_rel = np.diff(rel.indptr).astype(np.int64)
    valid = top >= 0
    if n and k:
        lookup = rel[np.repeat(np.arange(n), k), np.where(valid, top, 0).ravel()]
        hits = (np.asarray(lookup).reshape(n, k) != 0) & valid
    else:
        hits = np.zeros((n, k), dtype=bool)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(n_rel, k)]
    n_hits = hits.sum(axis=1)
    dcg = hits @ discount
    first = hits.argmax(axis=1)
    precision_at_hit = np.cumsum(hits, axis=1) / np.arange(1, k + 1) * hits
    sum_precision = precision_at_hit.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pd.DataFrame(
            {
                "n_relevant": n_rel,
                "hits": n_hits,
                "hr": (n_hits > 0).astype(np.float64),
                "recall": np.where(n_rel > 0, n_hits / n_rel, 0.0),
                "precision": n_hits / k,
                "ndcg": np.where(ideal > 0, dcg / ideal, 0.0),
                "mrr": np.where(n_hits > 0, 1.0 / (first + 1), 0.0),
                "ap": np.where(n_rel > 0, sum_precision / np.minimum(n_rel, k), 0.0),
                "ap_full": np.where(n_rel > 0, sum_precision / n_rel, 0.0),
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# evaluate: a model on a split
# --------------------------------------------------------------------------------------------


def protocol_text(k: int, n_items: int, exclude_seen: bool, split: str | None = None) -> str:
    """The sentence that goes into every table, so no number travels without its protocol."""
    seen = (
        "items seen in training excluded"
        if exclude_seen
        else "items seen in training kept (repeat purchases count)"
    )
    text = f"full ranking of {n_items} items, k={k}, {seen}, binary relevance, mean over users"
    return f"{split}; {text}" if split else text


@dataclass
class EvaluationResult:
    """Everything one evaluation produced: per-user rows, segments, summary and protocol.

    ``per_user`` has one row per test user (``user_idx``, ``user_id``, ``n_train``,
    ``n_relevant``, ``hits``, the ranking metrics, ``diversity``, ``novelty``,
    ``long_tail_share`` and the boolean segment flags ``cold``, ``heavy``,
    ``mostly_long_tail``). ``segments`` maps ``all`` and each segment name to its per-user
    frame; ``long_tail``'s metrics are computed against the long-tail held-out items only.
    """

    k: int
    exclude_seen: bool
    protocol: str
    per_user: pd.DataFrame
    segments: dict[str, pd.DataFrame]
    summary: dict[str, float]
    topk_idx: np.ndarray = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def means(self, segment: str = "all") -> dict[str, float]:
        """Mean of every per-user metric in one segment (empty segment: NaN), plus ``users``."""
        frame = self.segments[segment]
        cols = [c for c in (*RANKING_METRICS, *LIST_METRICS) if c in frame.columns]
        out = {
            metric_key(c, self.k): float(frame[c].mean()) if len(frame) else math.nan for c in cols
        }
        out["users"] = float(len(frame))
        return out

    def user_values(self, metric: str = "ndcg", segment: str = "all") -> pd.Series:
        """One metric per user of a segment, indexed by ``user_idx`` (what paired
        comparisons, ``mlkit.bootstrap.paired_ci``, take)."""
        return self.segments[segment].set_index("user_idx")[metric].sort_index()

    def table(self) -> pd.DataFrame:
        """One row per segment with the means and the protocol (for JSON, MLflow, reports)."""
        rows = [{"segment": name, **self.means(name)} for name in self.segments]
        table = pd.DataFrame(rows)
        table["protocol"] = self.protocol
        return table

    def ci(
        self,
        metric: str = "ndcg",
        n_boot: int = 1000,
        alpha: float = 0.05,
        seed: int = 0,
        segment: str = "all",
    ) -> ConfidenceInterval:
        """Bootstrap CI over users of one metric's mean in one segment."""
        return bootstrap_ci(self.segments[segment][metric].to_numpy(), n_boot, alpha, seed)


def _score_fn(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    fn = getattr(model, "score", None)
    if callable(fn):
        return fn
    if callable(model):
        return model
    raise ValueError(f"{model!r} is neither a Recommender (with .score) nor a callable")


def _heavy_mask(n_train: np.ndarray, fraction: float) -> np.ndarray:
    """Top ``fraction`` of users by training interactions; ties at the cut are all heavy."""
    if len(n_train) == 0:
        return np.zeros(0, dtype=bool)
    n_top = max(1, math.ceil(fraction * len(n_train)))
    threshold = np.sort(n_train)[::-1][n_top - 1]
    return (n_train >= threshold) & (n_train > 0)


def head_items(train: Interactions, head_share: float = 0.8) -> np.ndarray:
    """Boolean mask of the head: the fewest most-interacted items making up ``head_share`` of
    training interactions (ties by item index). Everything else is the long tail."""
    if not 0 < head_share <= 1:
        raise ValueError(f"head_share must be in (0, 1], got {head_share}")
    counts = np.bincount(train.events[ITEM_IDX].to_numpy(), minlength=train.n_items)
    head = np.zeros(train.n_items, dtype=bool)
    total = counts.sum()
    if total == 0:
        return head
    order = np.lexsort((np.arange(train.n_items), -counts))
    n_head = int(np.searchsorted(np.cumsum(counts[order]), head_share * total, side="left")) + 1
    head[order[:n_head]] = True
    return head


def evaluate(
    model: Any,
    train: Interactions,
    test: Interactions,
    k: int = 10,
    *,
    exclude_seen: bool,
    users: np.ndarray | None = None,
    batch: int = 1024,
    cold_threshold: int = 5,
    heavy_fraction: float = 0.1,
    head_share: float = 0.8,
    item_vectors: np.ndarray | sparse.spmatrix | None = None,
    headline: str = "ndcg",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    split: str | None = None,
) -> EvaluationResult:
    """Rank the whole catalog for every test user with ``model`` and measure it.

    ``model`` is a ``Recommender`` (its ``score``) or any callable ``users -> scores``.
    ``exclude_seen`` has no default on purpose: it is part of the protocol (module
    docstring). ``users`` restricts to some test users (default: all with held-out events).
    Scores are requested ``batch`` users at a time so memory stays at ``batch x n_items``.

    Segments: ``cold`` users have at most ``cold_threshold`` training interactions; ``heavy``
    users are the top ``heavy_fraction`` by training interactions (ties included);
    ``long_tail`` re-scores the same lists against each user's long-tail held-out items only
    (long tail = outside the head making up ``head_share`` of training interactions);
    ``mostly_long_tail`` are the users whose held-out items are more than half long-tail.
    The summary carries a percentile bootstrap CI of the ``headline`` metric over users.
    """
    _check_k(k)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    if headline not in RANKING_METRICS:
        raise ValueError(f"headline must be one of {RANKING_METRICS}, got {headline!r}")
    if train.n_items != test.n_items or not np.array_equal(train.item_ids, test.item_ids):
        raise ValueError(
            "train and test have different item vocabularies: split one "
            "Interactions (Interactions.subset) instead of indexing twice"
        )
    if train.n_users != test.n_users or not np.array_equal(train.user_ids, test.user_ids):
        raise ValueError("train and test have different user vocabularies")
    if test.events.empty:
        raise ValueError("no users to evaluate: the test set is empty")
    candidates = holdout_users(test)
    if users is not None:
        requested = np.unique(np.asarray(users, dtype=np.int64))
        users = np.intersect1d(candidates, requested)
    else:
        users = candidates
    if len(users) == 0:
        raise ValueError("no users to evaluate: none of the requested users has held-out events")

    score = _score_fn(model)
    name = getattr(model, "name", type(model).__name__)
    seen = train.matrix if exclude_seen else None
    lists = []
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        scores = np.asarray(score(chunk))
        if scores.shape != (len(chunk), train.n_items):
            raise ValueError(
                f"model {name} returned scores of shape {scores.shape}, "
                f"expected ({len(chunk)}, {train.n_items})"
            )
        lists.append(topk(scores, k, seen[chunk] if seen is not None else None))
    top = np.vstack(lists)

    relevant = relevance_matrix(test, users)
    per_user = per_user_metrics(top, relevant, k)
    n_train = np.bincount(train.events[USER_IDX].to_numpy(), minlength=train.n_users)[users]
    per_user.insert(0, USER_IDX, users)
    per_user.insert(1, S.USER_ID, train.user_ids[users])
    per_user.insert(2, "n_train", n_train)
    vectors = default_item_vectors(train) if item_vectors is None else item_vectors
    if vectors.shape[0] != train.n_items:
        raise ValueError(f"item_vectors have {vectors.shape[0]} rows for {train.n_items} items")
    per_user["diversity"] = intra_list_diversity(top, vectors)
    per_user["novelty"] = novelty(top, item_user_share(train))

    tail = ~head_items(train, head_share)
    relevant_tail = sparse.csr_matrix(relevant.multiply(tail[None, :]))
    relevant_tail.eliminate_zeros()  # multiply keeps the head entries as stored zeros
    n_tail = np.diff(relevant_tail.indptr)
    per_user["long_tail_share"] = n_tail / per_user["n_relevant"].to_numpy()
    per_user["cold"] = n_train <= cold_threshold
    per_user["heavy"] = _heavy_mask(n_train, heavy_fraction)
    per_user["mostly_long_tail"] = per_user["long_tail_share"] > 0.5

    has_tail = n_tail > 0
    long_tail = per_user_metrics(top[has_tail], relevant_tail[has_tail], k)
    long_tail.insert(0, USER_IDX, users[has_tail])
    long_tail.insert(1, S.USER_ID, train.user_ids[users[has_tail]])
    long_tail.insert(2, "n_train", n_train[has_tail])
    for col in LIST_METRICS:  # the same lists, so the same diversity and novelty
        long_tail[col] = per_user[col].to_numpy()[has_tail]

    segments = {
        "all": per_user,
        "cold": per_user[per_user["cold"]].reset_index(drop=True),
        "heavy": per_user[per_user["heavy"]].reset_index(drop=True),
        "long_tail": long_tail,
        "mostly_long_tail": per_user[per_user["mostly_long_tail"]].reset_index(drop=True),
    }
    protocol = protocol_text(k, train.n_items, exclude_seen, split)
    result = EvaluationResult(
        k=k,
        exclude_seen=exclude_seen,
        protocol=protocol,
        per_user=per_user,
        segments=segments,
        summary={},
        topk_idx=top,
        settings={
            "cold_threshold": cold_threshold,
            "heavy_fraction": heavy_fraction,
            "head_share": head_share,
            "headline": headline,
        },
    )
    summary = result.means("all")
    summary[f"coverage_at_{k}"] = catalog_coverage(top, train.n_items)
    ci = bootstrap_ci(per_user[headline].to_numpy(), n_boot, alpha, seed)
    summary[f"{metric_key(headline, k)}_ci_low"] = ci.low
    summary[f"{metric_key(headline, k)}_ci_high"] = ci.high
    result.summary = summary
    return result


# --------------------------------------------------------------------------------------------
# Graded relevance (search): one row per query
# --------------------------------------------------------------------------------------------

#: Per-query search metrics (columns of ``graded_per_query``), with their cut-offs.
SEARCH_METRICS: tuple[str, ...] = ("ndcg_at_10", "mrr_at_10", "recall_at_100")


def graded_per_query(
    rankings: Mapping[str, Sequence[str]],
    grades: Mapping[str, Mapping[str, int]],
    k: int = 10,
    recall_k: int = 100,
    relevant_grade: int = 2,
) -> pd.DataFrame:
    """Per-query graded metrics of ranked item ids (one row per query of ``grades``).

    * ``ndcg_at_{k}``: DCG with gain ``2**grade - 1`` and discount ``log2(rank + 1)`` over the
      ideal DCG of the query's own grades sorted (TREC / LightGBM's definition);
    * ``mrr_at_{k}``: 1 / rank of the first item graded ``>= relevant_grade`` (0 without one);
    * ``recall_at_{recall_k}``: share of the items graded ``>= relevant_grade`` in the top
      ``recall_k``.

    A query without a ranking scores 0; an item ranked twice counts once, at its first place.
    Grades not given are 0.
    """
    _check_k(k)
    _check_k(recall_k)
    discount = 1.0 / np.log2(np.arange(2, max(k, 1) + 2))
    rows = []
    for query, graded in grades.items():
        ranked = list(dict.fromkeys(rankings.get(query, [])))
        gains = np.array([2.0 ** graded.get(item, 0) - 1 for item in ranked[:k]])
        dcg = float((gains * discount[: len(gains)]).sum())
        ideal = np.sort(np.array([2.0**g - 1 for g in graded.values() if g > 0]))[::-1][:k]
        idcg = float((ideal * discount[: len(ideal)]).sum())
        relevant = {item for item, g in graded.items() if g >= relevant_grade}
        first = next((r for r, item in enumerate(ranked[:k], 1) if item in relevant), None)
        found = len(relevant & set(ranked[:recall_k]))
        rows.append((
            query,
            dcg / idcg if idcg > 0 else 0.0,
            1.0 / first if first else 0.0,
            found / len(relevant) if relevant else 0.0,
        ))  # fmt: skip
    return pd.DataFrame(
        rows, columns=["query_id", f"ndcg_at_{k}", f"mrr_at_{k}", f"recall_at_{recall_k}"]
    )
