import math

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from mlkit import metrics as M
from mlkit.interactions import from_events
from shopml import schema as S


def recall_at_k(ranked, relevant, k):
    """Naive reference: share of the relevant items found in the top k."""
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def ndcg_at_k(ranked, relevant, k):
    """Naive reference: DCG of the top k over the ideal DCG of min(|relevant|, k) hits."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(ranked[:k]) if item in relevant)
    return dcg / sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))


def test_recall_and_ndcg_by_hand():
    relevant = {"b", "d", "z"}
    out = M.rankings_per_user({"u": ["a", "b", "c", "d"], "v": ["z", "b", "d"]},
                              {"u": relevant, "v": relevant, "w": {"b"}}, 4)  # fmt: skip
    out = out.set_index(S.USER_ID)
    assert out.loc["u", "recall"] == pytest.approx(2 / 3)
    # hits at ranks 2 and 4 (1-based): 1/log2(3) + 1/log2(5); ideal: 3 hits at top.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out.loc["u", "ndcg"] == pytest.approx(dcg / idcg)
    assert out.loc["v", "ndcg"] == pytest.approx(1.0)
    assert out.loc["w", "ndcg"] == 0.0  # no ranking at all scores 0


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
    from mlkit.interactions import from_events
    from zoo import build

    data = from_events(train)

    def top3(name: str, users: list[int]) -> list[list[str]]:
        scores = build(name).fit(data).score(np.array(users))
        return [list(data.item_ids[row]) for row in M.topk(scores, 3)]

    # all four items were bought twice: ties break by item id
    assert top3("popularity", [0]) == [["p", "q", "x"]]
    u1, new = data.user_index["u1"], data.n_users  # an index past the vocabulary: unseen user
    # own items by frequency, then popularity fill; an unseen user gets popularity
    assert top3("personal_top_frequency", [u1, new]) == [["x", "y", "p"], ["p", "q", "x"]]


# --------------------------------------------------------------------------------------------
# The evaluation library (index space): hand-computed cases, parity, errors
# --------------------------------------------------------------------------------------------


LOG2_3 = math.log2(3)


def _rel(rows: list[set[int]], n_items: int) -> sparse.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in sorted(items)]
    return sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


def test_topk_ties_break_by_item_index_and_exclusion_leaves_empty_slots():
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.9]], dtype=np.float32)
    # 0.9 at items 1 and 4 (tie -> 1 first), then 0.5 at items 0 and 2 (tie -> 0 first)
    assert M.topk(scores, 3).tolist() == [[1, 4, 0]]
    assert M.topk(scores, 5).tolist() == [[1, 4, 0, 2, 3]]
    seen = sparse.csr_matrix(np.array([[0, 1, 0, 0, 0]]))
    assert M.topk(scores, 3, exclude=seen).tolist() == [[4, 0, 2]]
    # all but item 3 excluded: one real item, then empty slots; k > catalog pads too
    all_but_3 = sparse.csr_matrix(np.array([[1, 1, 1, 0, 1]]))
    assert M.topk(scores, 3, exclude=all_but_3).tolist() == [[3, -1, -1]]
    assert M.topk(scores, 7)[0, 5:].tolist() == [-1, -1]
    # all-equal scores: the first k items by index
    assert M.topk(np.zeros((2, 6)), 3).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_topk_matches_a_full_stable_sort_on_random_ties():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 4, size=(20, 30)).astype(np.float64)  # many ties
    exclude = sparse.random(20, 30, density=0.2, random_state=7, format="csr")
    got = M.topk(scores, 8, exclude)
    masked = scores.copy()
    masked[exclude.toarray() != 0] = -np.inf
    expected = np.argsort(-masked, axis=1, kind="stable")[:, :8]
    expected[np.take_along_axis(masked, expected, 1) == -np.inf] = -1
    np.testing.assert_array_equal(got, expected)


def test_per_user_metrics_by_hand():
    # user 0 ranks items [0, 1, 2, 3]; relevant {1, 3, 9}: hits at ranks 2 and 4 (1-based)
    # user 1 ranks [4, 5, 6, 7]; relevant {8}: no hit
    top = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    rel = _rel([{1, 3, 9}, {8}], 10)
    out = M.per_user_metrics(top, rel, 4)
    u0 = out.iloc[0]
    assert u0["n_relevant"] == 3 and u0["hits"] == 2
    assert u0["hr"] == 1.0
    assert u0["recall"] == pytest.approx(2 / 3)  # 2 hits / 3 relevant
    assert u0["precision"] == pytest.approx(0.5)  # 2 hits / k = 4
    # DCG = 1/log2(3) + 1/log2(5); IDCG = min(3, 4) = 3 hits: 1 + 1/log2(3) + 1/log2(4)
    assert u0["ndcg"] == pytest.approx(
        (1 / LOG2_3 + 1 / math.log2(5)) / (1 + 1 / LOG2_3 + 1 / math.log2(4))
    )
    assert u0["mrr"] == pytest.approx(0.5)  # first hit at rank 2
    # precision at the hits: rank 2 -> 1/2, rank 4 -> 2/4; sum 1.0
    # AP = 1.0 / min(3, 4) = 1/3; AP_full = 1.0 / 3 = 1/3 (equal because |rel| < k)
    assert u0["ap"] == pytest.approx(1 / 3)
    assert u0["ap_full"] == pytest.approx(1 / 3)
    assert out.iloc[1][list(M.RANKING_METRICS)].tolist() == [0.0] * 7

    # k = 2: only the hit at rank 2 counts. precision@2 at it = 1/2
    # AP = 0.5 / min(3, 2) = 0.25 (MLlib / Recommenders map_at_k); AP_full = 0.5 / 3 = 1/6
    at2 = M.per_user_metrics(top, rel, 2).iloc[0]
    assert at2["ap"] == pytest.approx(0.25)
    assert at2["ap_full"] == pytest.approx(1 / 6)
    assert at2["precision"] == pytest.approx(0.5)  # 1 hit / 2
    # IDCG over min(3, 2) = 2 slots: 1 + 1/log2(3); DCG = 1/log2(3)
    assert at2["ndcg"] == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))


def test_empty_slots_are_misses_and_precision_divides_by_k():
    # list [2, -1, -1]: one real item, relevant {2, 5}: hit at rank 1
    out = M.per_user_metrics(np.array([[2, -1, -1]]), _rel([{2, 5}], 6), 3).iloc[0]
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 2)
    assert out["ndcg"] == pytest.approx(1 / (1 + 1 / LOG2_3))  # ideal: 2 hits at the top


def _naive_ap(ranked, relevant, k, denominator):
    hits, total = 0, 0.0
    for i, item in enumerate(ranked[:k], start=1):
        if item in relevant:
            hits += 1
            total += hits / i
    return total / denominator if relevant else 0.0


def test_rankings_per_user_agrees_with_the_scalar_functions_on_a_seeded_random_case():
    rng = np.random.default_rng(3)
    items = [f"i{j}" for j in range(40)]
    rankings, truth = {}, {}
    for u in range(50):
        truth[f"u{u}"] = set(rng.choice(items, size=rng.integers(1, 8), replace=False))
        if u % 7:  # every 7th user has no ranking at all
            rankings[f"u{u}"] = list(rng.choice(items, size=rng.integers(3, 15), replace=False))
    k = 10
    out = M.rankings_per_user(rankings, truth, k).set_index("user_id")
    for u, rel in truth.items():
        ranked = rankings.get(u, [])
        row = out.loc[u]
        assert row["recall"] == pytest.approx(recall_at_k(ranked, rel, k))
        assert row["ndcg"] == pytest.approx(ndcg_at_k(ranked, rel, k))
        assert row["ap"] == pytest.approx(_naive_ap(ranked, rel, k, min(len(rel), k)))
        assert row["ap_full"] == pytest.approx(_naive_ap(ranked, rel, k, len(rel)))
        ranks = [i for i, x in enumerate(ranked[:k], start=1) if x in rel]
        assert row["mrr"] == pytest.approx(1 / ranks[0] if ranks else 0.0)
        assert row["hr"] == float(bool(ranks))
        assert row["precision"] == pytest.approx(len(ranks) / k)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).random(300)
    a = M.bootstrap_ci(values, n_boot=500, seed=1)
    b = M.bootstrap_ci(values, n_boot=500, seed=1)
    assert a == b
    assert a.low < values.mean() < a.high
    # the standard error of a uniform mean over 300 users is ~0.0167: 95% width ~ 0.065
    assert 0.04 < a.high - a.low < 0.09
    const = M.bootstrap_ci([0.25] * 10, n_boot=50)
    assert (const.low, const.mean, const.high) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="non-empty"):
        M.bootstrap_ci([])
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_ci([1.0], alpha=1.5)


def test_paired_ci_pairs_users_by_index_and_refuses_different_users():
    """The one paired comparison: per-user differences matched by user, not by position."""
    import pandas as pd

    from mlkit.bootstrap import bootstrap_ci, paired_ci

    rng = np.random.default_rng(0)
    ref = pd.Series(rng.random(50), index=rng.permutation(50))
    mine = (ref + 0.1).sample(frac=1.0, random_state=1)  # same users, another order
    ci = paired_ci(mine, ref, n_boot=200, seed=3)
    assert ci.mean == pytest.approx(0.1) and ci.low == pytest.approx(0.1)
    diff = (mine.sort_index() - ref.sort_index()).to_numpy()
    assert ci == bootstrap_ci(diff, n_boot=200, seed=3)
    with pytest.raises(ValueError, match="same users"):
        paired_ci(mine.iloc[1:], ref)


def _tiny():
    """3 users, 4 items. Train: u0 {i0, i1}, u1 {i0, i2}, u2 {i0}. Test: u0 i2, u1 i1, u2 i3."""
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    rows = [("u0", "i0"), ("u0", "i1"), ("u1", "i0"), ("u1", "i2"), ("u2", "i0")]
    test_rows = [("u0", "i2"), ("u1", "i1"), ("u2", "i3")]
    ev = pd.DataFrame(
        [
            {
                S.USER_ID: u,
                S.ITEM_ID: i,
                S.EVENT_TYPE: S.PURCHASE,
                S.TIMESTAMP: t0 + pd.Timedelta(days=d),
            }
            for d, (u, i) in enumerate(rows + test_rows)
        ]
    )
    data = from_events(ev)
    is_test = np.arange(len(ev)) >= len(rows)
    return data.subset(~is_test), data.subset(is_test)


def _fixed(users):
    """Every user gets the same scores: i0 > i1 > i2 > i3."""
    return np.tile(np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32), (len(users), 1))


def test_evaluate_by_hand_seen_items_kept():
    train, test = _tiny()
    r = M.evaluate(_fixed, train, test, k=2, exclude_seen=False, cold_threshold=1, n_boot=50)
    # every list is [i0, i1]. u0 wants i2: miss; u1 wants i1: hit at rank 2; u2 wants i3: miss
    # NDCG: u1 = (1/log2 3) / 1 = 0.6309; mean = 0.6309 / 3
    assert r.summary["ndcg_at_2"] == pytest.approx((1 / LOG2_3) / 3)
    assert r.summary["recall_at_2"] == pytest.approx(1 / 3)
    assert r.summary["mrr_at_2"] == pytest.approx(0.5 / 3)
    assert r.summary["coverage_at_2"] == pytest.approx(2 / 4)  # {i0, i1} of 4 items
    # novelty: p(i0) = 3/3 users -> 0 bits, p(i1) = 1/3 -> log2 3 bits; mean over the list
    assert r.summary["novelty_at_2"] == pytest.approx(LOG2_3 / 2)
    # diversity: binary user vectors i0 = (1,1,1), i1 = (1,0,0): cos = 1/sqrt(3)
    assert r.summary["diversity_at_2"] == pytest.approx(1 - 1 / math.sqrt(3))
    assert "kept" in r.protocol and "full ranking of 4 items" in r.protocol
    assert (r.table()["protocol"] == r.protocol).all()


def test_evaluate_by_hand_seen_items_excluded_and_segments():
    train, test = _tiny()
    r = M.evaluate(_fixed, train, test, k=2, exclude_seen=True, cold_threshold=1, n_boot=50)
    # u0 saw {i0, i1} -> [i2, i3], wants i2: hit at 1, NDCG 1
    # u1 saw {i0, i2} -> [i1, i3], wants i1: hit at 1, NDCG 1
    # u2 saw {i0}     -> [i1, i2], wants i3: miss
    pu = r.per_user.set_index("user_id")
    assert pu["ndcg"].tolist() == [1.0, 1.0, 0.0]
    assert r.summary["ndcg_at_2"] == pytest.approx(2 / 3)
    assert r.summary["coverage_at_2"] == pytest.approx(3 / 4)  # {i1, i2, i3}
    # i3 was never interacted with: zero vector, similarity 0 -> diversity 1 for [i2, i3] and
    # [i1, i3]; [i1, i2] have disjoint users: cos 0 -> 1
    assert pu["diversity"].tolist() == [1.0, 1.0, 1.0]
    # novelty: p(i1) = p(i2) = 1/3, p(i3) floored at 1/3 -> log2 3 bits each
    assert pu["novelty"].tolist() == pytest.approx([LOG2_3] * 3)
    assert "excluded" in r.protocol
    # training interactions: u0 2, u1 2, u2 1. cold = <= 1: u2
    assert r.segments["cold"]["user_id"].tolist() == ["u2"]
    # heavy: top ceil(0.1 * 3) = 1 user -> the count 2, ties included: u0 and u1
    assert r.segments["heavy"]["user_id"].tolist() == ["u0", "u1"]
    # head: training counts i0 3, i1 1, i2 1, i3 0 (total 5); 80% = 4 -> head {i0, i1}
    # long tail {i2, i3}: held-out i2 (u0) and i3 (u2) are long-tail, u1's i1 is head
    np.testing.assert_array_equal(M.head_items(train), [True, True, False, False])
    lt = r.segments["long_tail"].set_index("user_id")
    assert lt.index.tolist() == ["u0", "u2"]
    assert lt["ndcg"].tolist() == [1.0, 0.0]
    assert r.means("long_tail")["ndcg_at_2"] == pytest.approx(0.5)
    assert r.segments["mostly_long_tail"]["user_id"].tolist() == ["u0", "u2"]
    table = r.table().set_index("segment")
    assert table.loc["cold", "users"] == 1 and table.loc["all", "users"] == 3


def test_evaluate_batches_give_the_same_answer_and_accept_a_recommender():
    train, test = _tiny()

    class Model:
        name = "fixed"

        def score(self, users):
            return _fixed(users)

    one = M.evaluate(Model(), train, test, k=3, exclude_seen=True, batch=1, n_boot=20)
    many = M.evaluate(_fixed, train, test, k=3, exclude_seen=True, batch=1024, n_boot=20)
    assert one.summary == many.summary


def test_evaluate_rejects_bad_input_with_readable_errors():
    train, test = _tiny()
    with pytest.raises(ValueError, match="k must be a positive integer"):
        M.evaluate(_fixed, train, test, k=0, exclude_seen=True)
    with pytest.raises(ValueError, match="test set is empty"):
        M.evaluate(_fixed, train, test.subset(np.zeros(3, dtype=bool)), exclude_seen=True)
    with pytest.raises(ValueError, match=r"returned scores of shape \(3, 2\)"):
        M.evaluate(lambda u: np.zeros((len(u), 2)), train, test, exclude_seen=True)
    with pytest.raises(ValueError, match="NaN"):
        M.evaluate(lambda u: np.full((len(u), 4), np.nan), train, test, exclude_seen=True)
    other = from_events(
        pd.DataFrame(
            {
                S.USER_ID: ["x"],
                S.ITEM_ID: ["zz"],
                S.EVENT_TYPE: [S.PURCHASE],
                S.TIMESTAMP: [pd.Timestamp("2025-01-01", tz="UTC")],
            }
        )
    )
    with pytest.raises(ValueError, match="different item vocabularies"):
        M.evaluate(_fixed, train, other, exclude_seen=True)
    with pytest.raises(TypeError):
        M.evaluate(_fixed, train, test)  # exclude_seen is part of the protocol: no default


def test_evaluate_is_fast_enough_at_movielens_size():
    """943 users x 1682 items, k=10, with bootstrap: well under a second on a laptop."""
    import time

    rng = np.random.default_rng(0)
    n = 20_000
    ev = pd.DataFrame(
        {
            S.USER_ID: rng.integers(0, 943, n).astype(str),
            S.ITEM_ID: rng.integers(0, 1682, n).astype(str),
            S.EVENT_TYPE: S.PURCHASE,
            S.TIMESTAMP: pd.Timestamp("2025-01-01", tz="UTC"),
        }
    )
    data = from_events(ev)
    is_test = rng.random(n) < 0.25
    train, test = data.subset(~is_test), data.subset(is_test)
    scores = rng.random((data.n_users, data.n_items), dtype=np.float32)
    start = time.perf_counter()
    r = M.evaluate(lambda u: scores[u], train, test, k=10, exclude_seen=True)
    elapsed = time.perf_counter() - start
    assert r.summary["users"] > 900
    assert elapsed < 5.0  # generous: shared CI machines; typically ~0.1 s


@pytest.mark.spark
def test_spark_metrics_equal_the_python_metrics_on_a_seeded_random_case(spark):
    from spark_jobs.metrics import METRICS, mean_ranking_metrics, ranking_metrics

    rng = np.random.default_rng(5)
    items = [f"i{j}" for j in range(30)]
    rankings, truth = {}, {}
    for u in range(40):
        truth[f"u{u}"] = set(rng.choice(items, size=rng.integers(1, 12), replace=False))
        if u % 9:  # some users have no ranking: they score 0 on both sides
            ranked = list(rng.choice(items, size=rng.integers(2, 14), replace=False))
            if u % 5 == 0:
                ranked.insert(1, ranked[0])  # a repeated item counts once, at its first slot
            rankings[f"u{u}"] = ranked
    k = 10
    ranked_df = spark.createDataFrame(
        list(rankings.items()), "user_id string, ranked array<string>"
    )
    truth_df = spark.createDataFrame(
        [(u, i) for u, rel in truth.items() for i in rel], "user_id string, item_id string"
    )
    got = ranking_metrics(ranked_df, truth_df, k).toPandas().set_index("user_id").sort_index()
    expected = M.rankings_per_user(rankings, truth, k).set_index("user_id").sort_index()
    assert got.index.tolist() == expected.index.tolist()
    for col in ("n_relevant", "hits", *METRICS):
        np.testing.assert_allclose(got[col].to_numpy(float), expected[col].to_numpy(float))
    means = mean_ranking_metrics(ranked_df, truth_df, k)
    python = {M.metric_key(m, k): float(expected[m].mean()) for m in METRICS}
    python["users"] = float(len(expected))
    assert means.keys() <= python.keys()
    for key, value in means.items():
        assert value == pytest.approx(python[key])


@pytest.mark.parametrize("block_entries", [1, 7, 10**9])
def test_intra_list_diversity_is_the_same_a_block_of_lists_at_a_time(monkeypatch, block_entries):
    """Lists x vector width is quadratic at scale (lists x training users), so it is summed
    a block of lists at a time: the same values whatever the block."""
    from mlkit import beyond_accuracy as B

    vectors = sparse.random(30, 12, density=0.3, random_state=5, format="csr")
    top = np.random.default_rng(5).integers(-1, 30, size=(9, 4))
    monkeypatch.setattr(B, "_BLOCK_ENTRIES", 10**9)
    whole = B.intra_list_diversity(top, vectors)
    monkeypatch.setattr(B, "_BLOCK_ENTRIES", block_entries)
    np.testing.assert_allclose(B.intra_list_diversity(top, vectors), whole)
    np.testing.assert_allclose(B.intra_list_diversity(top, vectors.toarray()), whole)
