"""Beyond-accuracy metrics of recommended lists: coverage, intra-list diversity, novelty.

Definitions are in ``mlkit.metrics``' module docstring (the one evaluation library calls
these for every model, on the same top-k lists as the accuracy metrics).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from mlkit.interactions import ITEM_IDX, USER_IDX, Interactions

_BLOCK_ENTRIES = 20_000_000  # (lists x vector width) per block of intra_list_diversity


def catalog_coverage(topk_idx: np.ndarray, n_items: int) -> float:
    """Distinct recommended items over the catalog size (empty slots ignored)."""
    if n_items <= 0:
        raise ValueError("n_items must be positive")
    items = np.unique(topk_idx[topk_idx >= 0])
    return len(items) / n_items


def default_item_vectors(train: Interactions) -> sparse.csr_matrix:
    """Each item's binary column of the training user x item matrix, as an item x user CSR."""
    m = train.matrix.T.tocsr()
    m.data = (m.data != 0).astype(np.float32)
    m.eliminate_zeros()
    return m


def intra_list_diversity(
    topk_idx: np.ndarray, item_vectors: np.ndarray | sparse.spmatrix
) -> np.ndarray:
    """Per user: mean pairwise (1 - cosine similarity) of the recommended items.

    Vectorized: with unit vectors, the sum of pairwise similarities over ordered pairs of a
    list is ``|sum v|^2 - sum |v|^2``, so one sparse product gives every user's value. NaN for
    lists with fewer than two items. Zero vectors have similarity 0 to everything.
    """
    n, k = topk_idx.shape
    n_items = item_vectors.shape[0]
    if sparse.issparse(item_vectors):
        v = sparse.csr_matrix(item_vectors, dtype=np.float64)
        norms = np.sqrt(np.asarray(v.multiply(v).sum(axis=1)).ravel())
        unit = sparse.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ v
    else:
        v = np.asarray(item_vectors, dtype=np.float64)
        norms = np.linalg.norm(v, axis=1)
        unit = v / np.where(norms > 0, norms, 1.0)[:, None]
    valid = topk_idx >= 0
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    cols = topk_idx.ravel()[valid.ravel()]
    pick = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n_items))
    # a block of lists at a time: each summed row is as wide as the vectors (every training
    # user, for the default vectors) and nearly dense when a list holds a popular item, so
    # all rows at once were lists x users (10^4 x 10^5 at 10^7 events: 12 GB)
    sq = np.empty(n, dtype=np.float64)
    step = max(1, _BLOCK_ENTRIES // max(unit.shape[1], 1))
    for lo in range(0, n, step):
        summed = pick[lo : lo + step] @ unit
        if sparse.issparse(summed):
            sq[lo : lo + step] = np.asarray(summed.multiply(summed).sum(axis=1)).ravel()
        else:
            sq[lo : lo + step] = np.einsum("ij,ij->i", summed, summed)
    with_vector = np.asarray(pick @ (norms > 0).astype(np.float64)).ravel()
    length = valid.sum(axis=1)
    pairs = length * (length - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, 1.0 - (sq - with_vector) / pairs, np.nan)


def item_user_share(train: Interactions) -> np.ndarray:
    """p(i): share of the training users who interacted with item i (floor 1 / n_users)."""
    ev = train.events
    n_users = max(int(ev[USER_IDX].nunique()), 1)
    pairs = ev[[USER_IDX, ITEM_IDX]].drop_duplicates()
    users_per_item = np.bincount(pairs[ITEM_IDX].to_numpy(), minlength=train.n_items)
    return np.maximum(users_per_item, 1) / n_users


def novelty(topk_idx: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Per user: mean -log2 p(i) over the recommended items (NaN for an empty list)."""
    valid = topk_idx >= 0
    bits = np.where(valid, -np.log2(share[np.where(valid, topk_idx, 0)]), 0.0)
    length = valid.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(length > 0, bits.sum(axis=1) / length, np.nan)
