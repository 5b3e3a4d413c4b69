"""Two-stage recommendation for one loaded model version: retrieve, filter, rank.

Stage 1 (retrieval) takes the union, in this order of priority, of

* ``history``: the user's own purchases (most bought first),
* ``user_knn``: the TIFU-kNN scorer's top items for the user (own decayed history blended
  with similar users'), precomputed nightly (``Tables.scores``),
* ``ease``: EASE's top items for the user, precomputed nightly,
* ``ann``: the faiss index over the two-tower's item vectors, queried with the user vector,
* ``item_knn``: co-purchase neighbours of the user's most bought items and of the items of
  their current session (pushed by the streaming job; ``serving.session_max_age_s``),
* ``popular``: global popularity,

drops items out of the catalog, the session's items (in the cart already) and items the
user bought that are not reorderable (``item_reorder_rate`` from Feast at most
``serving.reorder_min_rate``), and keeps at most
``serving.max_candidates``. Stage 2 scores those candidates with the version's ranker on the
user's and the items' online features and each candidate's per-source evidence (purchase
count and recency, item-kNN affinity, the two-tower's and the zoo scorers' scores). Every
answer that is not the two-stage one is a *fallback* with a reason (unknown user, no online
features, Feast or the index unavailable), served from recent popularity, optionally within
a category.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from served_model.bundle import Bundle
from served_model.explain import attributions, ranker_reasons, source_text
from served_model.features import FeaturesUnavailable, OnlineFeatures
from served_model.ranker import DAYS_BEFORE_LATEST as DAYS
from served_model.ranker import (
    HISTORY_FEATURES,
    NEVER_DAYS,
    TWO_TOWER_SCORE,
    ZOO_SOURCES,
    ranker_inputs,
    ranker_scores,
)
from served_model.ranker import KNN_AFFINITY as KNN
from served_model.ranker import PRIOR_PURCHASES as PRIOR
from shopml import schema as S
from shopml.config import ServingConfig

SOURCES = ("history", *ZOO_SOURCES, "ann", "item_knn", "popular")  # in order of priority
# each source's quota: the ``ServingConfig`` field that caps how many items it gives
QUOTAS = {s: "knn_candidates" if s == "item_knn" else f"{s}_candidates" for s in SOURCES}
# what a version's own retrieval settings may set (the manifest's ``retrieval``, chosen on
# validation by ``training.served_study``): the quotas and how many candidates are ranked
RETRIEVAL_FIELDS = (*QUOTAS.values(), "max_candidates")
NOT_IN_SOURCE = -1  # a rank of :class:`Retrieved`: the source did not give the item
_COL = {f: i for i, f in enumerate(HISTORY_FEATURES)}
_NO_HISTORY = np.array([NEVER_DAYS if f == DAYS else 0.0 for f in HISTORY_FEATURES], np.float32)
KNN_SEEDS = 10  # the user's most bought items whose neighbours are candidates
_REORDER = S.ITEM_FEATURES.index(S.ITEM_REORDER_RATE)


def _lookup(sorted_items: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, position in ``sorted_items``) of each of ``items``."""
    at = np.searchsorted(sorted_items, items)
    if len(sorted_items) == 0:  # e.g. a user whose items have no co-purchase neighbours
        return np.zeros(len(items), dtype=bool), at
    found = (at < len(sorted_items)) & (
        sorted_items[np.minimum(at, len(sorted_items) - 1)] == items
    )
    return found, at


class UnknownItem(KeyError):
    """An item id the served version does not know."""


@dataclass
class Ranked:
    """One user's answer, with how it was made (for the response, metrics and logs)."""

    items: list[tuple[str, float]]
    fallback: str | None = None  # reason; None when the two stages answered
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    candidates: dict[str, int] = field(default_factory=dict)  # per source, and "ranked"
    # TwoStage's memo: "answer" (this answer reused), "hit" (the ANN candidates reused, then
    # filtered and ranked), "miss" (computed); None: not asked (a fallback)
    ann_memo: str | None = None
    # per item, when asked (``explain``): the source's reason and the ranker's strongest
    # attributions, in words (``served_model.explain``)
    reasons: list[list[dict]] | None = None


@dataclass
class _Memo:
    """What one user's online feature row gave (``TwoStage``'s memo), reused while the row
    reads the same."""

    row: bytes  # the row's float32 bytes
    ann: np.ndarray | None = None  # the ANN source's items (TwoStage._ann)
    query: np.ndarray | None = None  # the user vector with the bias slot, ``[u, 1]``
    # the last answer: ((item generation, k), items, candidate counts) (TwoStage.rank)
    answer: tuple[tuple[int, int], list, dict] | None = None


class Retrieved(NamedTuple):
    """Stage 1's answer for one user (:meth:`TwoStage.retrieve`): only the session's items
    are left out; the servable filters come after."""

    cand: np.ndarray  # candidates, in the sources' order of priority
    history: np.ndarray  # the evidence on each (HISTORY_FEATURES)
    counts: dict[str, int]  # candidates per source
    memo: str | None  # the ANN memo's "hit" or "miss"
    origin: np.ndarray  # the source that found each candidate first
    # when asked: each candidate's position in each source's list (columns in SOURCES order,
    # NOT_IN_SOURCE where absent), from which a smaller quota's union is exactly recomputed
    ranks: np.ndarray | None = None


def version_config(cfg: ServingConfig, retrieval: dict[str, int]) -> ServingConfig:
    """``cfg`` with a version's own retrieval settings (``Bundle.retrieval``) applied to the
    fields the operator did not set: a version serves with the quotas it was chosen and
    evaluated with, and an explicit setting (e.g. ``SHOPML_SERVING__ANN_CANDIDATES``) still
    wins, as an operator's override should."""
    unknown = sorted(set(retrieval) - set(RETRIEVAL_FIELDS))
    if unknown:
        raise ValueError(f"a version's retrieval settings name unknown fields {unknown}")
    update = {k: v for k, v in retrieval.items() if k not in cfg.model_fields_set}
    return cfg.model_copy(update=update) if update else cfg


def _row_key(user_features: np.ndarray) -> bytes:
    return user_features.astype(np.float32).tobytes()


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t


class TwoStage:
    """Retrieval + ranking of one version; safe to share between request threads."""

    def __init__(self, bundle: Bundle, features: OnlineFeatures, cfg: ServingConfig) -> None:
        self.bundle = bundle
        self.version = bundle.version
        self.model = bundle.model
        self.features = features
        self.cfg = version_config(cfg, bundle.retrieval)
        self.item_ids = np.asarray(self.model.item_ids, dtype=object)
        self.item_pos = {it: i for i, it in enumerate(self.model.item_ids)}
        if bundle.index is not None and hasattr(bundle.index, "hnsw"):
            bundle.index.hnsw.efSearch = max(self.cfg.ann_ef_search, self.cfg.ann_candidates)
        self.item_features: np.ndarray | None = None  # set by refresh_item_features
        self.reorderable = np.ones(len(self.item_ids), dtype=bool)
        self._item_generation = 0  # counts refresh_item_features: answers made before are stale
        self._lock = threading.Lock()
        self._memo: OrderedDict[int, _Memo] = OrderedDict()  # user index -> entry, LRU order
        self._memo_lock = threading.Lock()
        self._categories: dict[int, str] | None = None  # item -> category, for reasons

    # --- item features: bulk, refreshed in the background ------------------------------------
    def refresh_item_features(self) -> None:
        """Re-read every item's online features; on failure keep the previous arrays."""
        values = self.features.items(list(self.model.item_ids))
        reorderable = np.nan_to_num(values[:, _REORDER], nan=0.0) > self.cfg.reorder_min_rate
        with self._lock:  # the two arrays change together
            self.item_features, self.reorderable = np.nan_to_num(values), reorderable
            self._item_generation += 1

    # --- answers ------------------------------------------------------------------------------
    def popular(self, k: int, category: str | None = None) -> list[tuple[str, float]]:
        """Recent popularity (within ``category`` when it is known), in catalog only."""
        t = self.bundle.tables
        order = t.category_popular.get(category, t.recent_popular) if category else t.recent_popular
        order = order[t.in_catalog[order]][:k]
        n = max(len(order), 1)
        return [(self.item_ids[i], float(n - r) / n) for r, i in enumerate(order)]

    def recommend(
        self, user_id: str, k: int, category: str | None = None, explain: bool = False
    ) -> Ranked:
        """One user: the online read, then :meth:`rank`."""
        return self.recommend_many([user_id], k, category, explain)[0]

    def recommend_many(
        self, user_ids: list[str], k: int, category: str | None = None, explain: bool = False
    ) -> list[Ranked]:
        """Many users with one online read for all of them (``explain``: with reasons)."""
        stages: dict[str, float] = {}
        known = [u for u in user_ids if u in self.model.user_index]
        rows: dict[str, np.ndarray] = {}
        sessions: dict[str, np.ndarray] = {}
        error = None
        if known:
            with _timed(stages, "features"):
                try:
                    if self.cfg.session_max_age_s:
                        values, pushed = self.features.users_and_sessions(known)
                        sessions = self._current_sessions(known, pushed)
                    else:
                        values = self.features.users(known)
                    rows = {u: v for u, v in zip(known, values, strict=True)}
                except FeaturesUnavailable as exc:
                    error = exc
        share = {s: v / len(user_ids) for s, v in stages.items()}
        out = []
        for u in user_ids:
            if u not in self.model.user_index:
                reason = "unknown_user"
            elif error is not None:
                reason = "feast_unavailable"
            elif np.isnan(rows[u]).all():
                reason = "no_online_features"
            elif self.bundle.index is None:
                reason = "index_unavailable"
            elif self.item_features is None:
                reason = "item_features_unavailable"
            else:
                reason = None
            if reason is None:
                ranked = self.rank(u, np.nan_to_num(rows[u]), k, explain, sessions.get(u))
            else:
                ranked = Ranked(self.popular(k, category), fallback=reason)
                if explain:
                    ranked.reasons = [
                        [{"kind": "source", "source": "popular",
                          "text": source_text("popular", _NO_HISTORY, category=category)}]
                        for _ in ranked.items
                    ]  # fmt: skip
            ranked.stages = {**share, **ranked.stages}
            out.append(ranked)
        return out

    def _current_sessions(
        self, users: list[str], pushed: list[tuple[list[str], int] | None]
    ) -> dict[str, np.ndarray]:
        """Each user's session items as item indices (oldest first), for sessions whose last
        event is at most ``serving.session_max_age_s`` old; items the version does not know
        are left out."""
        now_ms = time.time() * 1000.0
        horizon = self.cfg.session_max_age_s * 1000.0
        out = {}
        for user, session in zip(users, pushed, strict=True):
            if session is None or now_ms - session[1] > horizon:
                continue
            items = [self.item_pos[i] for i in session[0] if i in self.item_pos]
            if items:
                out[user] = np.asarray(items, dtype=np.int64)
        return out

    def rank(
        self,
        user_id: str,
        user_features: np.ndarray,
        k: int,
        explain: bool = False,
        session: np.ndarray | None = None,
    ) -> Ranked:
        """Retrieve, filter and rank for a known user with online features.

        ``session``: the items of the user's current session (item indices, oldest first):
        they seed the item-kNN source beside the user's most bought items, so what goes with
        the cart is found and its affinity reaches the ranker, and they are not offered
        again (they are in the cart already).

        An answer is a function of the user's feature row, their session, the item features
        (refreshed in bulk) and ``k`` for this version: the last one of each user is kept in
        the memo of :meth:`_ann` and given again while all are the same (``ann_memo``
        "answer"), so a pushed session feature is a miss like a changed row. ``explain``
        adds each item's reasons (:meth:`_reasons`); it is computed afresh."""
        stages: dict[str, float] = {}
        uidx, row = self.model.user_index[user_id], _row_key(user_features)
        with self._lock:
            item_features, reorderable = self.item_features, self.reorderable
            asked = (self._item_generation, k, None if session is None else session.tobytes())
        memo = self._recall(uidx, row)
        if not explain and memo is not None and memo.answer is not None and memo.answer[0] == asked:
            _, items, counts = memo.answer
            return Ranked(list(items), None, stages, dict(counts), "answer")
        with _timed(stages, "retrieval"):
            cand, history, counts, memo, origin, _ = self.retrieve(
                uidx, user_features, session=session
            )
        with _timed(stages, "filter"):
            keep = self.servable(cand, history, reorderable[cand])
            cand, history, origin = (
                cand[keep][: self.cfg.max_candidates],
                history[keep][: self.cfg.max_candidates],
                origin[keep][: self.cfg.max_candidates],
            )
        counts["ranked"] = len(cand)
        if len(cand) == 0:
            return Ranked(self.popular(k), "no_candidates", stages, counts, memo)
        with _timed(stages, "ranking"):
            x = ranker_inputs(user_features, item_features[cand], history)
            scores = ranker_scores(self.bundle.ranker, x)
            top = np.argsort(-scores, kind="stable")[:k]
        items = [(self.item_ids[cand[i]], float(scores[i])) for i in top]
        if explain:
            with _timed(stages, "explain"):
                reasons = self._reasons(uidx, x, top, cand, history, origin)
            return Ranked(items, None, stages, counts, memo, reasons)
        self._remember(uidx, row, answer=(asked, items, counts))
        return Ranked(items, None, stages, counts, memo)

    def _reasons(
        self,
        uidx: int,
        x: np.ndarray,
        top: np.ndarray,
        cand: np.ndarray,
        history: np.ndarray,
        origin: np.ndarray,
    ) -> list[list[dict]]:
        """Each top item's reasons: the source that found it, with its evidence, then the
        ranker's strongest attributions against the request's average candidate
        (``served_model.explain``)."""
        effects = attributions(self.bundle.ranker, x[top], x.mean(axis=0))
        seeds = self._seeds(uidx)
        out = []
        for row, i in enumerate(top):
            source = str(origin[i])
            text = source_text(
                source,
                history[i],
                seed_item=self._seed_of(seeds, cand[i]) if source == "item_knn" else None,
                category=self._category_of().get(int(cand[i])) if source == "popular" else None,
            )
            out.append([{"kind": "source", "source": source, "text": text},
                        *ranker_reasons(effects[row])])  # fmt: skip
        return out

    def _seeds(self, uidx: int) -> np.ndarray:
        """The user's most bought items: the item-kNN source's seeds."""
        items, counts, _ = self._history(uidx)
        return items[np.argsort(-counts, kind="stable")][:KNN_SEEDS]

    def _seed_of(self, seeds: np.ndarray, item: int) -> str | None:
        """The seed whose co-purchase neighbourhood holds ``item`` most strongly."""
        t = self.bundle.tables
        hit = t.knn_idx[seeds] == item
        if not hit.any():
            return None
        sims = np.where(hit, t.knn_sim[seeds], -np.inf).max(axis=1)
        return str(self.item_ids[seeds[int(np.argmax(sims))]])

    def _category_of(self) -> dict[int, str]:
        """Item index -> its category, from the per-category popularity lists (built once)."""
        if self._categories is None:
            self._categories = {
                int(i): c for c, items in self.bundle.tables.category_popular.items() for i in items
            }
        return self._categories

    def retrieve(
        self,
        uidx: int,
        user_features: np.ndarray,
        ranks: bool = False,
        session: np.ndarray | None = None,
    ) -> Retrieved:
        """Stage 1 (:class:`Retrieved`); ``ranks``: with each candidate's position in every
        source's list (what the offline study of the quotas needs; serving does not ask);
        ``session``: the current session's items, item-kNN seeds beside the most bought and
        never candidates themselves (they are in the cart already)."""
        query, ann, memo = self._ann(uidx, user_features)
        hist_items, hist_counts, hist_last = self._history(uidx)
        by_count = hist_items[np.argsort(-hist_counts, kind="stable")]
        seeds = by_count[:KNN_SEEDS]
        if session is not None:
            seeds = np.concatenate([session[::-1], seeds])
            seeds = seeds[np.sort(np.unique(seeds, return_index=True)[1])]  # newest first
        near, affinity = self._affinity(seeds)
        zoo = {name: self._zoo_row(name, uidx) for name in ZOO_SOURCES}
        sources, counts = self._sources(ann, by_count, near, affinity, zoo)
        cand = np.concatenate(list(sources.values()))
        _, first = np.unique(cand, return_index=True)
        first = np.sort(first)
        if session is not None:  # the cart's items are not offered again
            first = first[~np.isin(cand[first], session)]
        cand = cand[first]  # union, in the sources' order of priority
        ends = np.cumsum([len(v) for v in sources.values()])
        origin = np.asarray(list(sources), dtype=object)[np.searchsorted(ends, first, "right")]
        history = np.zeros((len(cand), len(HISTORY_FEATURES)), dtype=np.float32)
        history[:, _COL[DAYS]] = NEVER_DAYS
        hit, at = _lookup(hist_items, cand)
        history[hit, _COL[PRIOR]] = hist_counts[at[hit]]
        history[hit, _COL[DAYS]] = self.bundle.tables.user_last[uidx] - hist_last[at[hit]]
        hit, at = _lookup(near, cand)
        history[hit, _COL[KNN]] = affinity[at[hit]]
        history[:, _COL[TWO_TOWER_SCORE]] = self.bundle.item_vectors[cand] @ query
        for name, (items, values) in zoo.items():
            hit, at = _lookup(items, cand)
            history[hit, _COL[ZOO_SOURCES[name]]] = values[at[hit]]
        positions = None
        if ranks:
            positions = np.full((len(cand), len(SOURCES)), NOT_IN_SOURCE, dtype=np.int32)
            for j, name in enumerate(SOURCES):
                listed = sources.get(name, np.zeros(0, np.int64))
                order = np.argsort(listed, kind="stable")
                hit, at = _lookup(listed[order], cand)
                positions[hit, j] = order[at[hit]]
        return Retrieved(cand, history, counts, memo, origin, positions)

    def _zoo_row(self, name: str, uidx: int) -> tuple[np.ndarray, np.ndarray]:
        """A zoo scorer's top items for the user (sorted by index) and their scores; empty
        when the version has no such table (bundle formats before 4)."""
        table = self.bundle.tables.scores.get(name)
        if table is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        lo, hi = table.indptr[uidx], table.indptr[uidx + 1]
        items, values = table.indices[lo:hi], table.data[lo:hi]
        order = np.argsort(items)
        return items[order].astype(np.int64), values[order].astype(np.float32)

    def _ann(
        self, uidx: int, user_features: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        """The user vector ``[u, 1]`` (its inner product with an item's row of the index is
        the two-tower's score of the pair), the ANN source (the vector searched in the faiss
        index, best first; None when ``serving.ann_candidates`` is 0 or there is no index),
        and whether the memo answered ("hit") or they were computed ("miss").

        The vector and the search are the largest part of a request, and both are functions
        of the user, their online feature row and this version only. So they are memoised per
        user and reused while the row reads the same: every request still reads the row, and
        a changed row (the nightly materialization, or a pushed feature) is a miss that
        replaces the entry. Answers are identical with or without the memo. Bounded LRU of
        ``serving.ann_memo_users`` users (0: off); a new version starts with an empty one.
        """
        row = _row_key(user_features)
        memo = self._recall(uidx, row)
        if memo is not None and memo.query is not None:
            return memo.query, memo.ann, "hit"
        with torch.no_grad():
            user = self.model.user_vector(
                torch.tensor([uidx]), torch.from_numpy(user_features[None].astype(np.float32))
            )[0].numpy()
        query = np.append(user, np.float32(1.0)).astype(np.float32)
        ann = None
        if self.cfg.ann_candidates and self.bundle.index is not None:
            _, ids = self.bundle.index.search(query[None], self.cfg.ann_candidates)
            ann = ids[0][ids[0] >= 0].astype(np.int64)
        self._remember(uidx, row, ann=ann, query=query)
        return query, ann, "miss"

    def _recall(self, uidx: int, row: bytes) -> _Memo | None:
        """The user's memo entry when it was made from this feature row (None otherwise)."""
        if not self.cfg.ann_memo_users:
            return None
        with self._memo_lock:
            memo = self._memo.get(uidx)
            if memo is None or memo.row != row:
                return None
            self._memo.move_to_end(uidx)
            return memo

    def _remember(self, uidx: int, row: bytes, **parts: object) -> None:
        """Set ``parts`` (``ann``, ``answer``) of the user's entry for ``row``: an entry of
        another row is replaced, and the least recently used users beyond
        ``serving.ann_memo_users`` go."""
        if not self.cfg.ann_memo_users:
            return
        with self._memo_lock:
            memo = self._memo.get(uidx)
            if memo is None or memo.row != row:
                memo = self._memo[uidx] = _Memo(row)
            for name, value in parts.items():
                setattr(memo, name, value)
            self._memo.move_to_end(uidx)
            while len(self._memo) > self.cfg.ann_memo_users:
                self._memo.popitem(last=False)

    def servable(
        self, cand: np.ndarray, history: np.ndarray, reorderable: np.ndarray
    ) -> np.ndarray:
        """The filters: in the catalog, and not bought before unless reorderable."""
        return self.bundle.tables.in_catalog[cand] & ((history[:, 0] == 0) | reorderable)

    def score(
        self,
        cand: np.ndarray,
        history: np.ndarray,
        user_features: np.ndarray,
        items: np.ndarray,
        ranker: object | None = None,
    ) -> np.ndarray:
        """Stage 2: the ranker's probability for each candidate (the bundle's ranker, of any
        format of ``served_model.ranker``, unless another is given)."""
        x = ranker_inputs(user_features, items, history)
        return ranker_scores(self.bundle.ranker if ranker is None else ranker, x)

    def purchases(self, user_id: str) -> dict[str, float]:
        """The user's purchase counts by item id (empty for an unknown user): what search's
        personalization reads (``served_model.search.SearchEngine.affinity``)."""
        uidx = self.model.user_index.get(user_id)
        if uidx is None:
            return {}
        items, counts, _ = self._history(uidx)
        return {str(self.item_ids[i]): float(c) for i, c in zip(items, counts, strict=True)}

    def _history(self, uidx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The user's purchased item indices (sorted), how often and on which day each was
        last bought."""
        t = self.bundle.tables
        lo, hi = t.history.indptr[uidx], t.history.indptr[uidx + 1]
        order = np.argsort(t.history.indices[lo:hi])
        return (
            t.history.indices[lo:hi][order],
            t.history.data[lo:hi][order],
            t.history_last.data[lo:hi][order],
        )

    def _affinity(self, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item-kNN affinity to ``seeds`` (the user's most bought items): each neighbour item
        (sorted) with the sum of its cosine similarities to them."""
        tables = self.bundle.tables
        nbr, sim = tables.knn_idx[seeds].ravel(), tables.knn_sim[seeds].ravel()
        ok = nbr >= 0
        near, inv = np.unique(nbr[ok].astype(np.int64), return_inverse=True)
        return near, np.bincount(inv, weights=sim[ok], minlength=len(near)).astype(np.float32)

    def _sources(
        self,
        ann: np.ndarray | None,
        by_count: np.ndarray,
        near: np.ndarray,
        affinity: np.ndarray,
        zoo: dict[str, tuple[np.ndarray, np.ndarray]],
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Each source's candidates, best first, in the order of :data:`SOURCES` (``ann``:
        :meth:`_ann`'s, None when off; ``by_count``: the user's items, most bought first;
        ``near``/``affinity``: their item-kNN neighbourhood; ``zoo``: :meth:`_zoo_row` of
        each zoo scorer)."""
        cfg, tables = self.cfg, self.bundle.tables
        sources: dict[str, np.ndarray] = {}
        sources["history"] = by_count[: cfg.history_candidates].astype(np.int64)
        for name, (items, values) in zoo.items():
            quota = getattr(cfg, f"{name}_candidates")
            if quota and len(items):
                sources[name] = items[np.argsort(-values, kind="stable")][:quota]
        if ann is not None:
            sources["ann"] = ann
        if cfg.knn_candidates:
            sources["item_knn"] = near[np.argsort(-affinity, kind="stable")][: cfg.knn_candidates]
        sources["popular"] = tables.popular[: cfg.popular_candidates].astype(np.int64)
        return sources, {s: len(v) for s, v in sources.items()}

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """Nearest items in the two-tower's item space (inner product of item vectors)."""
        if item_id not in self.item_pos:
            raise UnknownItem(item_id)
        if self.bundle.index is None:
            raise FeaturesUnavailable("the ANN index of this version is not loaded")
        pos = self.item_pos[item_id]
        query = self.bundle.item_vectors[pos : pos + 1].copy()
        query[0, -1] = 0.0  # item . item, without the bias term
        scores, ids = self.bundle.index.search(query, min(k + 1 + 20, len(self.item_ids)))
        out = []
        for s, i in zip(scores[0], ids[0], strict=True):
            if i >= 0 and i != pos and self.bundle.tables.in_catalog[i]:
                out.append((self.item_ids[i], float(s)))
        return out[:k]
