"""Interactions in index space: the one input every recommender of the zoo is fitted on.

Raw ids (strings from the canonical schema) are mapped once to dense indices, so models,
metrics and splits work on numpy/scipy arrays and the whole catalog is ranked with one matrix
product. ``Interactions`` keeps the id vocabularies to map back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from scipy import sparse

from shopml import schema as S

USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
WEIGHT = "weight"
RATING = "rating"


@dataclass(frozen=True)
class Interactions:
    """Events of one training set with dense user/item indices.

    ``events`` has columns ``user_idx``, ``item_idx``, ``timestamp`` (UTC), ``event_type``,
    ``weight`` (1.0 per event unless a weight column is chosen) and, when present,
    ``session_id`` and ``rating``. ``user_ids[i]`` / ``item_ids[j]`` map indices back to
    raw ids. The item vocabulary is the whole catalog, so items nobody interacted with are
    still rankable.
    """

    events: pd.DataFrame
    user_ids: np.ndarray
    item_ids: np.ndarray
    items: pd.DataFrame | None = field(default=None, compare=False)  # catalog, aligned to index

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def matrix(self) -> sparse.csr_matrix:
        """User x item sum of weights (e.g. purchase counts), CSR, float32."""
        ev = self.events
        m = sparse.csr_matrix(
            (ev[WEIGHT].to_numpy(np.float32), (ev[USER_IDX], ev[ITEM_IDX])),
            shape=(self.n_users, self.n_items),
            dtype=np.float32,
        )
        m.sum_duplicates()
        return m

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.item_ids)}

    def subset(self, mask: np.ndarray) -> Interactions:
        """The same vocabularies over a subset of the events (e.g. a split's train part)."""
        return Interactions(
            self.events[mask].reset_index(drop=True), self.user_ids, self.item_ids, self.items
        )


def from_events(
    events: pd.DataFrame,
    items: pd.DataFrame | None = None,
    event_types: tuple[str, ...] | None = (S.PURCHASE,),
    weight_column: str | None = None,
) -> Interactions:
    """Index canonical events (optionally only some event types) against the catalog.

    The item vocabulary is the union of the catalog (if given) and the items seen in events,
    sorted, so indices are deterministic across runs.
    """
    ev = events if event_types is None else events[events[S.EVENT_TYPE].isin(event_types)]
    if ev.empty:
        raise ValueError(
            f"no events of type {list(event_types or [])} to build interactions from: "
            "check the source, the date and the split"
        )
    for col in (S.USER_ID, S.ITEM_ID):
        if col not in ev.columns:
            raise ValueError(f"events have no '{col}' column (columns: {list(ev.columns)})")
    user_ids = np.array(sorted(ev[S.USER_ID].astype(str).unique()), dtype=object)
    item_set = set(ev[S.ITEM_ID].astype(str))
    if items is not None:
        item_set |= set(items[S.ITEM_ID].astype(str))
    item_ids = np.array(sorted(item_set), dtype=object)
    u_index = pd.Index(user_ids)
    i_index = pd.Index(item_ids)
    out = pd.DataFrame(
        {
            USER_IDX: u_index.get_indexer(ev[S.USER_ID].astype(str)),
            ITEM_IDX: i_index.get_indexer(ev[S.ITEM_ID].astype(str)),
            S.TIMESTAMP: pd.to_datetime(ev[S.TIMESTAMP], utc=True).to_numpy(),
            S.EVENT_TYPE: ev[S.EVENT_TYPE].to_numpy(),
            WEIGHT: ev[weight_column].astype("float32").to_numpy()
            if weight_column
            else np.ones(len(ev), dtype=np.float32),
        }
    )
    if S.SESSION_ID in ev.columns:
        out[S.SESSION_ID] = ev[S.SESSION_ID].to_numpy()
    if RATING in ev.columns:  # explicit feedback, when a source has it (e.g. MovieLens)
        out[RATING] = ev[RATING].astype("float32").to_numpy()
    catalog = None
    if items is not None:
        catalog = (
            items.assign(**{S.ITEM_ID: items[S.ITEM_ID].astype(str)})
            .drop_duplicates(S.ITEM_ID)
            .set_index(S.ITEM_ID)
            .reindex(item_ids)
            .reset_index()
        )
    return Interactions(out, user_ids, item_ids, catalog)


def index_like(reference: Interactions, events: pd.DataFrame) -> Interactions:
    """Index ``events`` (e.g. a holdout) with ``reference``'s vocabularies.

    Rows whose user or item the reference does not know cannot be scored and are dropped;
    ``timestamp`` and ``event_type`` are optional (a holdout of (user, item) pairs is enough).
    """
    users = pd.Index(reference.user_ids).get_indexer(events[S.USER_ID].astype(str))
    items = pd.Index(reference.item_ids).get_indexer(events[S.ITEM_ID].astype(str))
    keep = (users >= 0) & (items >= 0)
    n = int(keep.sum())
    out = pd.DataFrame(
        {
            USER_IDX: users[keep],
            ITEM_IDX: items[keep],
            S.TIMESTAMP: pd.to_datetime(events[S.TIMESTAMP], utc=True).to_numpy()[keep]
            if S.TIMESTAMP in events
            else pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]").to_numpy(),
            S.EVENT_TYPE: events[S.EVENT_TYPE].to_numpy()[keep]
            if S.EVENT_TYPE in events
            else np.full(n, S.PURCHASE, dtype=object),
            WEIGHT: np.ones(n, dtype=np.float32),
        }
    )
    return Interactions(out, reference.user_ids, reference.item_ids, reference.items)
