"""The baselines every model is compared with, computed from the same training events."""

from __future__ import annotations

import pandas as pd

from shopml import schema as S


def popularity(train: pd.DataFrame, k: int) -> list[str]:
    """The ``k`` most purchased items (ties by item id, for determinism)."""
    purchases = train[train[S.EVENT_TYPE] == S.PURCHASE]
    counts = purchases.groupby(S.ITEM_ID).size().reset_index(name="n")
    return counts.sort_values(["n", S.ITEM_ID], ascending=[False, True])[S.ITEM_ID].head(k).tolist()


def personal_top_frequency(train: pd.DataFrame, users: list[str], k: int) -> dict[str, list[str]]:
    """Each user's most-bought items (ties: most recent first), filled with popularity.

    The strong baseline of repeat-purchase commerce: most of a next basket is reorders.
    """
    purchases = train[train[S.EVENT_TYPE] == S.PURCHASE]
    stats = (
        purchases.groupby([S.USER_ID, S.ITEM_ID])
        .agg(n=(S.TIMESTAMP, "size"), last=(S.TIMESTAMP, "max"))
        .reset_index()
    )
    stats = stats.sort_values(
        [S.USER_ID, "n", "last", S.ITEM_ID], ascending=[True, False, False, True]
    )
    own = stats.groupby(S.USER_ID)[S.ITEM_ID].apply(lambda s: s.head(k).tolist()).to_dict()
    fill = popularity(train, 2 * k)
    out = {}
    for u in users:
        ranked = list(own.get(u, []))
        ranked += [i for i in fill if i not in ranked][: k - len(ranked)]
        out[u] = ranked[:k]
    return out
