"""Cosine neighbourhoods (served_model.similarity): the blocked computation keeps each
column's top neighbours exactly, whatever the block."""

import numpy as np
import pytest
from scipy import sparse

from served_model import similarity


def _oracle(x: np.ndarray, shrink: float) -> np.ndarray:
    co = x.T @ x
    np.fill_diagonal(co, 0.0)
    norms = np.sqrt((x * x).sum(axis=0))
    return co / (np.outer(norms, norms) + shrink)


@pytest.mark.parametrize("block_entries", [10**9, 500, 1])
def test_each_row_keeps_its_top_neighbours_whatever_the_block(monkeypatch, block_entries):
    x = sparse.random(120, 90, density=0.06, random_state=3, format="csr", dtype=np.float32)
    x.data[:] = 1.0
    monkeypatch.setattr(similarity, "_BLOCK_ENTRIES", block_entries)
    got = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4).toarray()
    full = _oracle(x.toarray().astype(np.float64), 5.0)
    assert got.shape == (90, 90) and not np.diag(got).any()
    for r in range(90):
        kept = np.sort(got[r][got[r] != 0])
        best = np.sort(full[r][full[r] != 0])[::-1][: len(kept)][::-1]
        assert len(kept) == min(4, np.count_nonzero(full[r]))
        np.testing.assert_allclose(kept, best, rtol=1e-5)  # the top values (ties: any of them)
    monkeypatch.setattr(similarity, "_BLOCK_ENTRIES", 10**9)
    whole = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4).toarray()
    np.testing.assert_array_equal(got, whole)  # and the very same entries as all at once


@pytest.mark.parametrize("block_entries", [10**9, 200])
def test_the_neighbourhoods_of_some_columns_are_those_rows_of_the_whole(monkeypatch, block_entries):
    """``of``: what user-kNN computes for the users it scores (zoo.classic.UserKNN)."""
    x = sparse.random(120, 90, density=0.06, random_state=4, format="csr", dtype=np.float32)
    whole = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4).toarray()
    monkeypatch.setattr(similarity, "_BLOCK_ENTRIES", block_entries)
    some = np.array([70, 3, 41, 88])
    got = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4, of=some).toarray()
    np.testing.assert_array_equal(got[some], whole[some])
    others = np.setdiff1d(np.arange(90), some)
    assert not got[others].any()


def test_neighbours_searched_among_a_pool_are_the_best_of_that_pool():
    """``among``: what bounds user-kNN's search at scale (zoo.classic.UserKNN.neighbour_pool).
    Each column's neighbours are its best within the pool, never outside it, and with the
    pool being every column the result is the whole computation's."""
    x = sparse.random(120, 90, density=0.08, random_state=5, format="csr", dtype=np.float32)
    full = _oracle(x.toarray().astype(np.float64), 5.0)
    pool = np.arange(0, 90, 3)
    got = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4, among=pool).toarray()
    outside = np.setdiff1d(np.arange(90), pool)
    assert not got[:, outside].any() and not np.diag(got).any()
    for r in range(90):
        within = full[r, pool][pool != r]
        best = np.sort(within[within != 0])[::-1][:4]
        np.testing.assert_allclose(np.sort(got[r][got[r] != 0])[::-1], best, rtol=1e-5)
    everyone = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4, among=np.arange(90))
    whole = similarity.cosine_neighbours(x, shrink=5.0, neighbors=4)
    np.testing.assert_array_equal(everyone.toarray(), whole.toarray())
