import math

import pandas as pd
import pytest

from shopml import schema as S
from training import baselines
from training.metrics import evaluate_rankings, ndcg_at_k, recall_at_k


def test_recall_and_ndcg_by_hand():
    ranked = ["a", "b", "c", "d"]
    relevant = {"b", "d", "z"}
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 4) == pytest.approx(2 / 3)
    # hits at ranks 2 and 4 (1-based): 1/log2(3) + 1/log2(5); ideal: 3 hits at top.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevant, 4) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["z", "b", "d"], relevant, 3) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, set(), 3) == 0.0


def test_evaluate_rankings_scores_missing_users_zero():
    out = evaluate_rankings({"u1": ["a"]}, {"u1": {"a"}, "u2": {"b"}}, 1)
    assert out["recall_at_1"] == pytest.approx(0.5)
    assert out["ndcg_at_1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="holdout is empty"):
        evaluate_rankings({}, {}, 10)


def _events(rows):
    return pd.DataFrame(
        [
            {
                S.USER_ID: u,
                S.ITEM_ID: i,
                S.EVENT_TYPE: S.PURCHASE,
                S.TIMESTAMP: pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(days=d),
            }
            for u, i, d in rows
        ]
    )


def test_popularity_and_personal_top_frequency():
    train = _events(
        [
            ("u1", "x", 0),
            ("u1", "x", 1),
            ("u1", "y", 2),
            ("u2", "p", 0),
            ("u3", "p", 0),
            ("u2", "q", 1),
            ("u3", "q", 3),
            ("u2", "y", 4),
        ]
    )
    # all four items were bought twice: ties break by item id
    assert baselines.popularity(train, 3) == ["p", "q", "x"]
    tf = baselines.personal_top_frequency(train, ["u1", "new"], 3)
    assert tf["u1"] == ["x", "y", "p"]  # own items by frequency, then popularity fill
    assert tf["new"] == ["p", "q", "x"]
