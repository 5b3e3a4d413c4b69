"""Item-item cosine neighbourhoods: the item-kNN candidate source serving ships in every
bundle, and the zoo's neighbourhood models (``item_knn``, ``user_knn``) use the same function."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def cosine_neighbours(x: sparse.csr_matrix, shrink: float, neighbors: int) -> sparse.csr_matrix:
    """Cosine similarity between the columns of ``x`` with shrinkage, top-``neighbors`` kept.

    ``sim(i, j) = <x_i, x_j> / (|x_i| |x_j| + shrink)``; the diagonal is dropped.
    """
    xc = x.tocsc().astype(np.float32)
    norms = np.sqrt(np.asarray(xc.multiply(xc).sum(axis=0)).ravel())
    co = (xc.T @ xc).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    co = co.tocoo()
    data = co.data / (norms[co.row] * norms[co.col] + shrink)
    sim = sparse.csr_matrix((data.astype(np.float32), (co.row, co.col)), shape=co.shape)
    return keep_top(sim, neighbors)


def keep_top(m: sparse.csr_matrix, k: int) -> sparse.csr_matrix:
    """Keep the ``k`` largest entries of each row (the neighbourhood)."""
    m = m.tocsr()
    rows, cols, vals = [], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        if hi == lo:
            continue
        d, c = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > k:
            top = np.argpartition(-d, k - 1)[:k]
            d, c = d[top], c[top]
        rows.append(np.full(len(c), r))
        cols.append(c)
        vals.append(d)
    if not rows:
        return sparse.csr_matrix(m.shape, dtype=np.float32)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape
    )
