"""The model zoo on tiny seeded data: contract, planted signal, closed forms, bad configs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlkit.interactions import from_events
from mlkit.metrics import evaluate
from mlkit.splits import Split, make_split
from shopml import schema as S
from zoo import REGISTRY, build

FAST = {
    "two_tower": {"epochs": 2, "negatives": 16, "dim": 8},
    "sasrec": {"epochs": 2, "dim": 8, "max_len": 8},
    "hybrid": {
        "epochs": 20,
        "batch_size": 64,
        "lr": 0.01,
        "two_tower": {"epochs": 5, "negatives": 16, "dim": 8, "lr": 0.02, "batch_size": 64},
    },
    "als": {"rank": 4, "iterations": 3},
}
SPARK_MODELS = {"als", "content_tfidf"}
# Enough training for the deep models to learn the planted clusters (still seconds each).
PLANTED = {
    "two_tower": {"epochs": 30, "negatives": 16, "dim": 8, "lr": 0.02, "batch_size": 64},
    "sasrec": {"epochs": 30, "dim": 16, "max_len": 8, "lr": 0.01, "batch_size": 32},
}


def _clustered(seed: int = 0, users: int = 40, items: int = 30, per_user: int = 12):
    """Two taste clusters: even users buy even items, odd users odd items (plus noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    for u in range(users):
        own = np.arange(u % 2, items, 2)
        for n in range(per_user):
            i = rng.choice(own) if rng.random() < 0.9 else rng.integers(items)
            rows.append((f"u{u}", f"i{i:02d}", S.PURCHASE, t0 + pd.Timedelta(hours=u * 100 + n)))
    events = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.TIMESTAMP])
    basket = (events.groupby(S.USER_ID).cumcount() // 3).astype(str)
    events[S.SESSION_ID] = events[S.USER_ID] + "-" + basket
    catalog = pd.DataFrame(
        {
            S.ITEM_ID: [f"i{i:02d}" for i in range(items)],
            S.TITLE: [("even" if i % 2 == 0 else "odd") + f" thing {i}" for i in range(items)],
            S.CATEGORY: ["c"] * items,
        }
    )
    return from_events(events, catalog)


@pytest.fixture(scope="module")
def data():
    return _clustered()


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - SPARK_MODELS))
def test_every_model_scores_the_whole_catalog_for_known_and_unseen_users(data, name):
    model = build(name, **FAST.get(name, {})).fit(data)
    users = np.array([0, 1, data.n_users + 5])  # the last one was never seen at fit time
    scores = model.score(users)
    assert scores.shape == (3, data.n_items)
    assert np.isfinite(scores).all()
    assert scores[2].std() > 0  # an unseen user still gets a ranking (popularity)


@pytest.mark.spark
@pytest.mark.parametrize("name", sorted(SPARK_MODELS))
def test_spark_models_score_the_whole_catalog(data, spark, name):
    model = build(name, **FAST.get(name, {})).fit(data)
    scores = model.score(np.array([0, 1]))
    assert scores.shape == (2, data.n_items) and np.isfinite(scores).all()
    # even users lean to even items in every model that learns from behaviour or text
    assert scores[0, 0::2].mean() > scores[0, 1::2].mean()


@pytest.mark.parametrize("name", ["item_knn", "user_knn", "ease", "hybrid", "two_tower", "sasrec"])
def test_models_find_the_planted_clusters_better_than_popularity(data, name):
    split = make_split(data, "stratified", ratio=0.75, seed=1)
    pop = evaluate(build("popularity").fit(split.train), split.train, split.test, 5,
                   exclude_seen=True, n_boot=10)  # fmt: skip
    model = build(name, **PLANTED.get(name, FAST.get(name, {}))).fit(split.train)
    got = evaluate(model, split.train, split.test, 5, exclude_seen=True, n_boot=10)
    assert got.means()["ndcg_at_5"] > pop.means()["ndcg_at_5"] + 0.05


def test_personal_top_frequency_orders_by_count_then_recency():
    t = pd.Timestamp("2025-01-01", tz="UTC")
    ev = pd.DataFrame(
        [("u", "a", t), ("u", "b", t + pd.Timedelta(days=1)), ("u", "b", t + pd.Timedelta(days=2)),
         ("u", "c", t + pd.Timedelta(days=3)), ("v", "d", t), ("v", "d", t), ("v", "d", t)],
        columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP],
    ).assign(**{S.EVENT_TYPE: S.PURCHASE})  # fmt: skip
    data = from_events(ev)
    model = build("personal_top_frequency").fit(data)
    order = np.argsort(-model.score(np.array([data.user_index["u"]]))[0])
    # b twice; then c (more recent) before a; then d, never bought by u, by popularity
    assert list(data.item_ids[order]) == ["b", "c", "a", "d"]


def test_ease_matches_its_closed_form():
    rng = np.random.default_rng(3)
    x = (rng.random((12, 6)) < 0.4).astype(np.float64)
    rows, cols = np.nonzero(x)
    ev = pd.DataFrame(
        {
            S.USER_ID: [f"u{r:02d}" for r in rows],
            S.ITEM_ID: [f"i{c}" for c in cols],
            S.EVENT_TYPE: S.PURCHASE,
            S.TIMESTAMP: pd.Timestamp("2025-01-01", tz="UTC"),
        }
    )
    data = from_events(ev)
    model = build("ease", l2=2.0).fit(data)
    xs = data.matrix.toarray()
    p = np.linalg.inv(xs.T @ xs + 2.0 * np.eye(xs.shape[1]))
    b = np.eye(xs.shape[1]) - p / np.diag(p)
    expected = np.maximum(xs @ b, 0)
    top = expected.max(axis=1, keepdims=True)
    expected = np.divide(expected, top, out=np.zeros_like(expected), where=top > 0)
    got = model.score(np.arange(data.n_users)) - 1e-6 * model.popularity
    nonempty = expected.any(axis=1)
    np.testing.assert_allclose(got[nonempty], expected[nonempty], atol=1e-4)


def test_unknown_model_and_bad_configs_fail_before_training():
    with pytest.raises(ValueError, match="unknown model 'ncf'; choose one of"):
        build("ncf")
    with pytest.raises(ValueError, match="bad config for model 'item_knn'"):
        build("item_knn", neighbours=10)
    with pytest.raises(ValueError, match="neighbors must be > 0"):
        build("item_knn", neighbors=0)
    with pytest.raises(ValueError, match="bad config for model 'two_tower'"):
        build("hybrid", two_tower={"nope": 1})
    with pytest.raises(ValueError, match="max_candidates"):
        build("hybrid", candidates={"max_candidates": 0})


def test_bad_inputs_give_clear_errors(data):
    with pytest.raises(ValueError, match="no events of type"):
        from_events(pd.DataFrame(columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.TIMESTAMP]))
    with pytest.raises(ValueError, match="no 'user_id' column"):
        from_events(pd.DataFrame({S.ITEM_ID: ["a"], S.EVENT_TYPE: [S.PURCHASE]}))
    from zoo.compare import compare

    split = make_split(data, "stratified", ratio=0.75, seed=1)
    with pytest.raises(ValueError, match="k must be"):
        compare({"p": ("popularity", {})}, split, 0, exclude_seen=True)
    with pytest.raises(ValueError, match="training part is empty"):
        make_split(data, "temporal_cut", cutoff="2020-01-01")
    empty = Split(data.subset(np.zeros(len(data.events), bool)), data, "custom", "custom")
    with pytest.raises(ValueError, match="empty training set after the split"):
        compare({"p": ("popularity", {})}, empty, 10, exclude_seen=True)


def test_tuning_searches_the_space_on_a_validation_split(data):
    from zoo.tune import tune

    split = make_split(data, "stratified", ratio=0.75, seed=1)
    best, score, trials = tune("item_knn", split, n_trials=3, k=5, exclude_seen=True)
    assert len(trials) == 3 and 10 <= best["neighbors"] <= 500
    assert "repeat_weight" not in best  # seen items excluded: the repeat blend is moot
    assert score == max(t["ndcg_at_5"] for t in trials)
    with pytest.raises(ValueError, match="no search space for model"):
        tune("nope", split, 1, 5, True)


@pytest.mark.slow
def test_a_zoo_model_learns_on_two_horovod_workers(data):
    config = {**PLANTED["two_tower"], "epochs": 8}
    model = build("two_tower", workers=2, **config).fit(data)
    assert len(model.curve) == 8 and np.isfinite(model.curve).all()
    assert model.curve[-1] < 0.8 * model.curve[0]  # the loss fell across both ranks
    assert model.score(np.array([0])).shape == (1, data.n_items)


@pytest.mark.parametrize(
    "name,config",
    [
        ("user_knn", {"neighbors": 5, "own_weight": 0.5, "half_life_days": 30.0}),
        ("user_knn", {"neighbors": 5, "neighbour_pool": 10}),
        ("ease", {"l2": 20.0, "repeat_weight": 2.0, "max_items": 12}),
    ],
)
def test_top_n_without_dense_rows_is_the_top_of_the_dense_scores(data, name, config):
    """``Base.top_n`` (what the nightly serving tables use: zoo.sources.zoo_scores) builds no
    (users x catalog) row, yet keeps each user's best items of ``score`` exactly: the scored
    items, the popularity fill of a short list, and popularity for an unseen user."""
    from zoo.base import top_n_rows

    model = build(name, **config).fit(data)
    users = np.r_[np.arange(data.n_users), data.n_users + 2]  # the last one unseen
    dense_rows, _, dense_vals = top_n_rows(model.score(users), 8)
    rows, cols, vals = model.top_n(users, 8)
    scores = model.score(users)
    np.testing.assert_allclose(vals, scores[rows, cols], rtol=1e-6)  # its values are scores
    for u in range(len(users)):  # and the best ones (ties: any of them)
        np.testing.assert_allclose(
            np.sort(vals[rows == u]), np.sort(dense_vals[dense_rows == u]), rtol=1e-6
        )


def test_user_knn_searches_a_seeded_pool_when_there_are_more_users(data):
    """``neighbour_pool``: past that many users, every neighbour comes from one seeded sample
    of them, the same on every fit; at or below it every user is searched."""
    pooled = build("user_knn", neighbors=5, neighbour_pool=10).fit(data)
    again = build("user_knn", neighbors=5, neighbour_pool=10).fit(data)
    np.testing.assert_array_equal(pooled.pool, again.pool)
    assert len(pooled.pool) == 10
    sim = pooled.neighbourhoods(np.arange(data.n_users))
    assert set(np.unique(sim.indices)) <= set(pooled.pool)
    assert build("user_knn", neighbour_pool=data.n_users).fit(data).pool is None
    assert build("user_knn", neighbour_pool=0).fit(data).pool is None
    with pytest.raises(ValueError, match="neighbour_pool"):
        build("user_knn", neighbour_pool=-1)


def test_zoo_sources_are_each_users_top_items_in_the_served_index_space():
    """The nightly zoo tables (served candidate sources and ranker features) hold exactly the
    zoo model's own top items per user, mapped onto the two-tower's vocabularies: users and
    items it does not know are dropped, row 0 (unknown users) stays empty."""
    from zoo.hybrid import raw_events
    from zoo.sources import zoo_scores

    events = raw_events(_clustered())
    data = from_events(events)
    served_users = [u for u in data.user_ids if u != data.user_ids[0]]  # one user unknown
    user_index = {u: i + 1 for i, u in enumerate(served_users)}
    item_ids = sorted([*data.item_ids, "never_bought"])
    config = {"own_weight": 0.5, "neighbors": 5}
    tables = zoo_scores(user_index, item_ids, events, {"user_knn": config}, top_n=3)
    table = tables["user_knn"]
    assert table.shape == (len(served_users) + 1, len(item_ids))
    assert table[0].nnz == 0 and (table.getnnz(axis=1)[1:] == 3).all()
    own = build("user_knn", **config).fit(data).score(np.arange(data.n_users))
    for u in (1, 7):
        expected = set(data.item_ids[np.argsort(-own[u])[:3]])
        row = table[user_index[data.user_ids[u]]]
        assert {item_ids[i] for i in row.indices} == expected
    with pytest.raises(ValueError, match="unknown zoo sources"):
        zoo_scores(user_index, item_ids, events, {"item_knn": {}})
