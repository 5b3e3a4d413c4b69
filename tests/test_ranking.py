"""The served ranker's inputs and training, and the faiss index serving retrieves with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from served_model.ranker import HISTORY_FEATURES, ranker_inputs
from shopml import schema as S


def _ts(day: int, second: int = 0) -> pd.Timestamp:
    return pd.Timestamp("2025-03-01", tz="UTC") + pd.Timedelta(days=day, seconds=second)


def test_ranker_inputs_broadcast_one_user_row_and_zero_missing_values():
    user = np.arange(len(S.USER_FEATURES), dtype=np.float32)
    items = np.full((3, len(S.ITEM_FEATURES)), np.nan, dtype=np.float32)
    h = len(HISTORY_FEATURES)
    history = np.arange(3 * h, dtype=np.float32).reshape(3, h)
    x = ranker_inputs(user, items, history)
    assert x.shape == (3, len(S.USER_FEATURES) + len(S.ITEM_FEATURES) + h)
    assert (x[:, : len(S.USER_FEATURES)] == user).all()
    assert (x[:, len(S.USER_FEATURES) : -h] == 0).all()
    assert x[:, -h:].tolist() == history.tolist()
    assert x.dtype == np.float32
    # a row per candidate, float64 evidence and infinities: float32 rows, nothing non-finite
    users = np.stack([user, user + 1, user + 2])
    history64 = history.astype(np.float64)
    history64[1, 0] = np.inf
    y = ranker_inputs(users, np.ones_like(items), history64)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert y[:, : len(S.USER_FEATURES)].tolist() == users.tolist()
    assert y[1, -h] == np.finfo(np.float32).max and y[2, -h:].tolist() == history[2].tolist()


def test_ranker_learns_the_reorder_signal():
    """Bought-before items are the positives: the fitted ranker must rank them first."""
    from mlkit.two_stage import fit_ranker

    rng = np.random.default_rng(0)
    n = 4000
    prior = rng.integers(0, 4, n).astype(np.float32)
    label = (prior > 0).astype(np.float32)
    flip = rng.random(n) < 0.1
    label[flip] = 1 - label[flip]
    x = ranker_inputs(
        rng.random((n, len(S.USER_FEATURES)), dtype=np.float32),
        rng.random((n, len(S.ITEM_FEATURES)), dtype=np.float32),
        np.stack(
            [
                prior,
                rng.random(n, dtype=np.float32) * 30,
                *rng.random((len(HISTORY_FEATURES) - 2, n), dtype=np.float32),
            ],
            1,
        ),
    )
    val = (x[-500:], label[-500:])
    ranker, curve = fit_ranker(x[:-500], label[:-500], epochs=5, seed=0, validation=val,
                               batch_size=128)  # fmt: skip
    assert curve[-1]["loss"] < curve[0]["loss"]
    # the kept weights are those of the best validation epoch
    with torch.no_grad():
        kept = torch.nn.functional.binary_cross_entropy_with_logits(
            ranker(torch.from_numpy(val[0])), torch.from_numpy(val[1])
        ).item()
    assert kept == pytest.approx(min(p["val_loss"] for p in curve), rel=1e-5)
    with torch.no_grad():
        scores = ranker(torch.from_numpy(x)).numpy()
    pos, neg = scores[label == 1], scores[label == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.85


@pytest.fixture
def model():
    from served_model.two_tower import TwoTower

    torch.manual_seed(0)
    users = [f"u{i}" for i in range(30)]
    items = [f"i{j}" for j in range(300)]
    return TwoTower(users, items, items[:10], dim=16).eval()


def test_flat_index_returns_the_models_exact_top_items(model):
    from served_model.bundle import build_index, item_matrix

    index = build_index(item_matrix(model))
    assert type(index).__name__ == "IndexFlatIP"
    feats = torch.rand(1, len(S.USER_FEATURES))
    user = torch.tensor([3])
    with torch.no_grad():
        exact = model(user, feats)[0].numpy()
        query = np.append(model.user_vector(user, feats)[0].numpy(), 1.0)[None].astype("float32")
    scores, ids = index.search(query, 10)
    assert ids[0].tolist() == np.argsort(-exact)[:10].tolist()
    assert np.allclose(scores[0], np.sort(exact)[::-1][:10], atol=1e-5)


def test_hnsw_index_for_large_catalogs_keeps_recall(model, monkeypatch):
    import served_model.bundle as bundle

    monkeypatch.setattr(bundle, "FLAT_INDEX_MAX_ITEMS", 100)
    vectors = bundle.item_matrix(model)
    index = bundle.build_index(vectors)
    assert type(index).__name__ == "IndexHNSWFlat"
    index.hnsw.efSearch = 64
    queries = np.random.default_rng(1).normal(size=(50, vectors.shape[1])).astype("float32")
    _, ann = index.search(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann, exact, strict=True)])
    assert recall >= 0.9


def test_tables_round_trip_and_map_purchases_to_the_model(model, tmp_path):
    from served_model.bundle import Tables, build_tables

    purchases = pd.DataFrame(
        {
            S.USER_ID: ["u1", "u1", "u2", "u2", "ghost"],
            S.ITEM_ID: ["i5", "i5", "i5", "i7", "i9"],
            S.TIMESTAMP: [_ts(0), _ts(40), _ts(41), _ts(41), _ts(41)],
        }
    )
    catalog = pd.DataFrame(
        {S.ITEM_ID: ["i5", "i7", "i9", "not-in-model"], S.CATEGORY: ["a", "b", "a", "a"]}
    )
    tables = build_tables(model, purchases, catalog)
    tables.save(tmp_path / "t.npz")
    loaded = Tables.load(tmp_path / "t.npz")
    assert loaded.popular[:3].tolist() == [5, 7, 9]  # i5 bought 3 times, then i7, i9
    u1 = model.user_index["u1"]
    assert loaded.history[u1, 5] == 2 and loaded.history[0, 9] == 1  # row 0: unknown users
    assert loaded.in_catalog.sum() == 3 and loaded.in_catalog[[5, 7, 9]].all()
    assert loaded.category_popular["a"][:2].tolist() == [5, 9]
    assert set(loaded.knn_idx[5][loaded.knn_idx[5] >= 0]) == {7}  # co-bought by u2
    day = (_ts(40) - pd.Timestamp("1970-01-01", tz="UTC")) / pd.Timedelta(days=1)
    assert loaded.history_last[u1, 5] == pytest.approx(day)  # the later of u1's two purchases
    assert loaded.user_last[u1] == pytest.approx(day)


def test_lookup_finds_positions_and_survives_an_empty_table():
    from served_model.engine import _lookup

    found, at = _lookup(np.array([2, 5, 9]), np.array([5, 1, 9, 12]))
    assert found.tolist() == [True, False, True, False] and at[found].tolist() == [1, 2]
    found, _ = _lookup(np.array([], dtype=np.int64), np.array([3, 4]))
    assert found.tolist() == [False, False]


def test_replayed_sessions_are_prefixes_of_each_basket_in_the_order_it_was_filled():
    """A basket replayed as a session already begun: its first m items in add-to-cart
    (time) order, m in 0..most and below the basket's size; seeded."""
    import pandas as pd

    from mlkit.two_stage import session_prefixes

    t = pd.Timestamp("2025-03-01", tz="UTC")
    rows = [(f"u{u}", item, t + pd.Timedelta(seconds=s))
            for u in range(40) for s, item in enumerate("dcba")]  # fmt: skip
    rows += [("solo", "a", t), ("odd", "zz", t), ("odd", "a", t + pd.Timedelta(seconds=1))]
    baskets = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP])
    baskets = baskets.sample(frac=1.0, random_state=0)  # the order must come from the times
    pos = {i: n for n, i in enumerate("abcd")}
    got = {u: list(v) for u, v in session_prefixes(baskets, pos, most=3, seed=0).items()}
    assert got == {u: list(v) for u, v in session_prefixes(baskets, pos, 3, seed=0).items()}
    assert "solo" not in got and "odd" not in got  # nothing left to predict; an unknown item
    lengths = {len(v) for v in got.values()}
    assert lengths == {1, 2, 3}  # and some users drew 0 (no session)
    assert 0 < len(got) < 40
    for items in got.values():
        assert items == [pos[i] for i in "dcba"[: len(items)]]
