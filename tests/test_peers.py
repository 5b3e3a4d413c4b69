"""Cornac's models as benchmark peers (benchmarks.peers): the zoo's contract, and a library's
EASE agreeing with ours on the same data (which also proves the index mapping)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_recommenders import _clustered


@pytest.fixture(scope="module")
def data():
    return _clustered(users=30, items=24, per_user=10)


def test_cornac_ease_ranks_as_our_ease_on_the_same_interactions(data):
    from benchmarks.peers import CornacPeer
    from zoo import build

    users = np.arange(data.n_users)
    ours = build("ease", l2=20.0).fit(data).score(users)
    theirs = CornacPeer("EASE", {"lamb": 20.0, "posB": False}).fit(data).score(users)
    # ours scales each user's row to a maximum of 1 (plus a popularity tie-break below 1e-5)
    theirs = np.maximum(theirs, 0.0) / theirs.max(axis=1, keepdims=True)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert (theirs.argmax(axis=1) == ours.argmax(axis=1)).all()


def test_a_peer_scores_the_whole_catalog_and_falls_back_to_popularity(data):
    from benchmarks.peers import CornacPeer
    from mlkit.metrics import evaluate
    from mlkit.splits import make_split

    split = make_split(data, "stratified", ratio=0.75, seed=1)
    peer = CornacPeer("BPR", {"k": 8, "max_iter": 30, "learning_rate": 0.05}).fit(split.train)
    scores = peer.score(np.array([0, 1, data.n_users + 3]))  # the last one never seen
    assert scores.shape == (3, data.n_items) and np.isfinite(scores).all()
    assert np.array_equal(scores[2], peer.popular)
    got = evaluate(peer, split.train, split.test, 5, exclude_seen=True, n_boot=10)
    assert 0 < got.means()["ndcg_at_5"] <= 1
