"""Ranking metrics at k over full-catalog top-k lists (binary relevance)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant items found in the top ``k``."""
    if not relevant:
        return 0.0
    return len(set(ranked[:k]) & relevant) / len(relevant)


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """DCG of the top ``k`` over the ideal DCG of ``min(|relevant|, k)`` hits at the top."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return dcg / ideal


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], k: int
) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over the users in ``truth`` (a missing ranking scores 0)."""
    users = list(truth)
    if not users:
        raise ValueError("no users to evaluate: the holdout is empty")
    recall = sum(recall_at_k(rankings.get(u, []), truth[u], k) for u in users) / len(users)
    ndcg = sum(ndcg_at_k(rankings.get(u, []), truth[u], k) for u in users) / len(users)
    return {f"recall_at_{k}": recall, f"ndcg_at_{k}": ndcg, "users": float(len(users))}
