"""The served two-stage path, replayed offline: to train its ranker and to evaluate it.

One design for the nightly pipeline and the zoo's ``hybrid``: the engine ``shopml serve``
runs (``served_model.engine.TwoStage``: retrieval from the user's history, the zoo scorers'
nightly top lists, the two-tower's faiss index, item-kNN and popularity; the filters; the
DCN-v2 ``Ranker``), with inputs made honest for a backtest: the candidate tables and the zoo
scorers (a :data:`SourceFit`) know only purchases before the moment replayed, and features
come from a :data:`FeatureSource` valid at that moment, Feast's point-in-time values in the
pipeline (``shopml.feast_store.point_in_time_features``), none in the zoo. The two-tower
that retrieves for the replay is the caller's: the pipeline passes one trained without the
replayed baskets (``training.ranking``), so its ANN source and score do not find the
labelled items more easily than tomorrow's.

* Training (:func:`replayed_rows`, :func:`fit_ranker`): each user's last basket is held out
  again (``mlkit.splits.split_last_basket``), the candidates retrieved just before it are
  labelled by it, then the basket before, for ``rounds`` rounds. The ranker so learns on the
  lists it will rank, with the one training loop (``mlkit.loop``).
* Evaluation (:func:`scorer`): index-space scores of the held-out baskets for
  ``mlkit.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import nn

from mlkit.interactions import Interactions
from mlkit.launch import train as launch
from mlkit.loop import Curve, LoopConfig
from mlkit.splits import BasketSplit, split_last_basket
from served_model.bundle import Bundle, build_index, build_tables, item_matrix
from served_model.engine import NOT_IN_SOURCE, QUOTAS, SOURCES, TwoStage
from served_model.ranker import (
    HISTORY_FEATURES,
    Ranker,
    ranker_inputs,
    ranker_logits,
    ranker_view,
)
from served_model.two_tower import TwoTower
from shopml import schema as S
from shopml.config import ServingConfig, TrainConfig

CAND = "candidate_index"
REPLAY_ROUND = "replay_round"  # replayed_rows: 0 is each user's latest replayed basket
# candidate_rows: the candidate's position in each source's list (NOT_IN_SOURCE: absent)
RANK_COLUMNS = tuple(f"rank_{s}" for s in SOURCES)
# Rows with user_id, item_id and event_timestamp in; the same rows, in order, with the
# user's and the item's features (USER_FEATURES, ITEM_FEATURES) valid at that time out.
FeatureSource = Callable[[pd.DataFrame], pd.DataFrame]
# Purchases (user_id, item_id, timestamp) in, and optionally ``users=``, the users whose rows
# are asked for (None: all); zoo source name -> its per-user top-N table
# (``served_model.bundle.Tables.scores``) fitted on exactly those purchases out
# (``zoo.sources.source_fitter``).
SourceFit = Callable[..., dict[str, sparse.csr_matrix]]


def no_features(rows: pd.DataFrame) -> pd.DataFrame:
    """The zoo's feature source: no snapshots, so every feature is 0 and every item counts as
    reorderable (the reorder filter needs Feast's rate; without it nothing is filtered)."""
    values = dict.fromkeys((*S.USER_FEATURES, *S.ITEM_FEATURES), np.float32(0.0))
    values[S.ITEM_REORDER_RATE] = np.float32(1.0)
    return rows.assign(**values)


def offline_engine(
    purchases: pd.DataFrame,
    model: TwoTower,
    ranker: nn.Module | None,
    cfg: ServingConfig,
    sources: SourceFit | None = None,
    users: Collection[str] | None = None,
) -> TwoStage:
    """A two-stage engine whose tables (and zoo scorers, when ``sources`` fits them) know
    only ``purchases``. ``users``: the only users it will be asked for (a replay's or an
    evaluation's sample), the zoo scorers' rows are computed for them alone; None: all."""
    catalog = pd.DataFrame({S.ITEM_ID: model.item_ids})
    vectors = item_matrix(model)
    scores = sources(purchases, users=users) if sources is not None else None
    tables = build_tables(model, purchases, catalog, scores)
    bundle = Bundle("offline", model, ranker, build_index(vectors), tables, vectors)
    return TwoStage(bundle, features=None, cfg=cfg)


def candidate_rows(
    engine: TwoStage,
    at: pd.Series,
    user_features: pd.DataFrame,
    features: FeatureSource,
    sessions: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per (user, servable candidate) at the moment ``at[user]``: user_id, item_id,
    the candidate's item index, its history features, its position in each source's list
    (:data:`RANK_COLUMNS`, for :func:`select_candidates`) and the user's and item's
    features then. ``user_features`` (indexed by user) feeds retrieval's user vector;
    ``sessions``: a user's current session (item indices, oldest first), retrieved with as
    ``TwoStage.rank`` does."""
    model, cfg = engine.model, engine.cfg
    item_ids = np.asarray(model.item_ids, dtype=object)
    frames = []
    for user, ts in at.items():
        if user not in model.user_index or user not in user_features.index:
            continue  # unknown to the model: serving answers with popularity
        feats = np.nan_to_num(user_features.loc[user, list(S.USER_FEATURES)].to_numpy(np.float32))
        session = (sessions or {}).get(user)
        got = engine.retrieve(model.user_index[user], feats, ranks=True, session=session)
        frame = pd.DataFrame(got.history, columns=list(HISTORY_FEATURES))
        frame[list(RANK_COLUMNS)] = got.ranks
        frames.append(frame.assign(**{S.USER_ID: user, S.ITEM_ID: item_ids[got.cand],
                                      CAND: got.cand, S.ENTITY_TIMESTAMP: ts}))  # fmt: skip
    if not frames:
        columns = [S.USER_ID, S.ITEM_ID, CAND, S.ENTITY_TIMESTAMP, *HISTORY_FEATURES,
                   *RANK_COLUMNS]  # fmt: skip
        return pd.DataFrame(columns=columns)
    rows = features(pd.concat(frames, ignore_index=True))  # same order, features added
    reorderable = rows[S.ITEM_REORDER_RATE].to_numpy() > cfg.reorder_min_rate
    keep = engine.servable(
        rows[CAND].to_numpy(), rows[list(HISTORY_FEATURES)].to_numpy(), reorderable
    )
    return rows[keep].groupby(S.USER_ID, sort=False).head(cfg.max_candidates)


def select_candidates(rows: pd.DataFrame, cfg: ServingConfig) -> pd.DataFrame:
    """The rows ``cfg``'s quotas and ``max_candidates`` would have retrieved, out of rows
    retrieved with quotas at least as large (their :data:`RANK_COLUMNS`).

    Exact because each source's list with a smaller quota is a prefix of its list with a
    larger one, and the filters judge each candidate alone: a candidate is kept when some
    source lists it within its quota, ordered as the union orders it (by the first such
    source in priority order, then its position there), and each user's list is cut at
    ``max_candidates``. (The one approximation: faiss's HNSW search depth follows the ANN
    quota, so a smaller quota's list can differ from a prefix in rare near-ties.)"""
    ranks = rows[list(RANK_COLUMNS)].to_numpy(np.int64)
    quotas = np.array([getattr(cfg, QUOTAS[s]) for s in SOURCES], dtype=np.int64)
    within = (ranks != NOT_IN_SOURCE) & (ranks < quotas)
    kept = within.any(axis=1)
    first = within.argmax(axis=1)
    position = ranks[np.arange(len(rows)), first]
    order = pd.DataFrame({"user": rows[S.USER_ID].to_numpy(), "source": first, "rank": position})
    order = order[kept]
    # stable on the replay's user order, so a user's rows stay together as they were
    order["user"] = pd.Categorical(order["user"], categories=pd.unique(rows[S.USER_ID]))
    order = order.sort_values(["user", "source", "rank"], kind="stable")
    chosen = order.groupby("user", sort=False, observed=True).head(cfg.max_candidates).index
    return rows.iloc[chosen.to_numpy()]  # ``order``'s index: positions in ``rows``


def held_out_events(events: pd.DataFrame, test: pd.DataFrame, start: pd.Series) -> pd.DataFrame:
    """The purchase events of a held-out basket (``test``'s (user, item) pairs, from each
    user's basket ``start`` on), with their timestamps: the order items entered it (a
    ``BasketSplit`` keeps the pairs only)."""
    bought = events[(events[S.EVENT_TYPE] == S.PURCHASE) & events[S.USER_ID].isin(start.index)]
    times = pd.to_datetime(bought[S.TIMESTAMP], utc=True)
    bought = bought[times >= pd.to_datetime(bought[S.USER_ID].map(start), utc=True)]
    pairs = test[[S.USER_ID, S.ITEM_ID]].drop_duplicates()
    return bought.merge(pairs, on=[S.USER_ID, S.ITEM_ID])


def session_prefixes(
    baskets: pd.DataFrame, item_pos: Mapping[str, int], most: int, seed: int
) -> dict[str, np.ndarray]:
    """Each user's held-out basket replayed as a session so far: its first ``m`` distinct
    items in the order they entered it (``m`` drawn per user from 0..``most``, seeded, and
    below the basket's size, so something is left to predict); item indices of
    ``item_pos``; users drawing 0, or with an item the model lacks among them, get none."""
    rng = np.random.default_rng(seed)
    out = {}
    ordered = baskets.sort_values([S.USER_ID, S.TIMESTAMP], kind="stable")
    for user, group in ordered.groupby(S.USER_ID, sort=True):
        items = list(dict.fromkeys(group[S.ITEM_ID].astype(str)))
        m = min(int(rng.integers(0, most + 1)), len(items) - 1)
        if m > 0 and all(i in item_pos for i in items[:m]):
            out[str(user)] = np.array([item_pos[i] for i in items[:m]], dtype=np.int64)
    return out


def replayed_rows(
    model: TwoTower,
    events: pd.DataFrame,
    rounds: int,
    features: FeatureSource,
    cfg: ServingConfig,
    sources: SourceFit | None = None,
    session_items: int = 0,
    seed: int = 0,
    max_users: int | None = None,
) -> pd.DataFrame:
    """The ranker's examples: each user's last basket in ``events`` held out again, the lists
    the served path retrieves just before it, labelled by that basket; then the basket before
    that, ``rounds`` times (each round's tables and zoo scorers know only earlier
    purchases; :data:`REPLAY_ROUND` numbers them, 0 the latest). ``model`` retrieves; it
    should not have learnt from these baskets.

    ``session_items`` > 0 replays each basket as a session already begun
    (:func:`session_prefixes`): its first items are the session the lists are retrieved
    with (as a pushed session is served), they leave the lists, and the rest of the basket
    labels them: the same point-in-time rules, one moment later in the basket.

    ``max_users``: replay the baskets of a seeded sample of that many users only (the tables
    and scorers still learn from everyone's purchases). The rows grow as users x candidates
    x rounds: 6 x 10^7 at 10^5 users, more than one process should hold."""
    frames = []
    current = events  # the round's events: its split's train, plus the held-out basket
    everyone = events[S.USER_ID].unique()
    sample = None
    if max_users is not None and len(everyone) > max_users:
        sample = np.random.default_rng(seed).choice(everyone, size=max_users, replace=False)
    for r, inner in enumerate(held_out_rounds(events, rounds)):
        purchases = inner.train[inner.train[S.EVENT_TYPE] == S.PURCHASE]
        at = inner.test_time
        if sample is not None:
            at = at[at.index.isin(sample)]
        engine = offline_engine(purchases, model, None, cfg, sources, users=at.index)
        moments = pd.DataFrame({S.USER_ID: at.index, S.ITEM_ID: "", S.ENTITY_TIMESTAMP: at})
        users = features(moments.reset_index(drop=True)).set_index(S.USER_ID)
        sessions = None
        if session_items:
            held = held_out_events(current, inner.test, inner.test_time)
            sessions = session_prefixes(held, engine.item_pos, session_items, seed + r)
        current = inner.train
        rows = candidate_rows(engine, at, users, features, sessions)
        bought = pd.MultiIndex.from_frame(inner.test[[S.USER_ID, S.ITEM_ID]])
        label = pd.MultiIndex.from_frame(rows[[S.USER_ID, S.ITEM_ID]]).isin(bought)
        frames.append(rows.assign(**{S.LABEL: label.astype(np.float32), REPLAY_ROUND: r}))
    if not frames:
        raise ValueError(
            "no user has two training baskets: the ranker has nothing to learn from; "
            "check the source or widen max_users"
        )
    return pd.concat(frames, ignore_index=True)


def held_out_rounds(events: pd.DataFrame, rounds: int) -> Iterator[BasketSplit]:
    """Each user's last basket held out again, then the basket before it, up to ``rounds``
    times (fewer when no user has a basket left): the rounds :func:`replayed_rows` replays,
    latest first. Each split's ``train`` is the next round's events."""
    for _ in range(rounds):
        inner = split_last_basket(events)
        if inner.test.empty:
            return
        yield inner
        events = inner.train


def replayed_baskets(events: pd.DataFrame, rounds: int) -> list[pd.DataFrame]:
    """The held-out baskets :func:`replayed_rows` labels its rounds with, round ``r`` at
    position ``r``: what a replayed list is judged against, items it did not retrieve
    included."""
    return [inner.test for inner in held_out_rounds(events, rounds)]


def ranker_matrix(rows: pd.DataFrame) -> np.ndarray:
    """Replayed rows as ranker inputs (``served_model.ranker.ranker_inputs``)."""
    return ranker_inputs(
        rows[list(S.USER_FEATURES)].to_numpy(np.float32),
        rows[list(S.ITEM_FEATURES)].to_numpy(np.float32),
        rows[list(HISTORY_FEATURES)].to_numpy(np.float32),
    )


@dataclass
class RankerTask:
    """The ranker as a ``mlkit.loop.Trainable``: binary cross-entropy on labelled rows, the
    epoch with the lowest validation loss kept."""

    x: np.ndarray  # full-width rows (RANKER_FEATURES); the ranker reads ``features`` of them
    y: np.ndarray
    validation: tuple[np.ndarray, np.ndarray] | None = None
    features: tuple[str, ...] | None = None  # None: all of RANKER_FEATURES
    cross_layers: int = 2
    hidden: int = 64

    def build(self) -> Ranker:
        return Ranker(self.cross_layers, self.hidden, features=self.features)

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        x = np.ascontiguousarray(ranker_view(net, self.x))
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(self.y))

    def loss(self, net: nn.Module, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        xb, yb = batch
        return nn.functional.binary_cross_entropy_with_logits(net(xb), yb)

    @torch.no_grad()
    def validation_loss(self, net: nn.Module) -> float | None:
        if self.validation is None:
            return None
        xv = torch.from_numpy(np.ascontiguousarray(ranker_view(net, self.validation[0])))
        yv = torch.from_numpy(self.validation[1])
        return nn.functional.binary_cross_entropy_with_logits(net(xv), yv).item()


def fit_ranker(
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = TrainConfig.model_fields["ranker_batch_size"].default,
    lr: float = TrainConfig.model_fields["ranker_lr"].default,
    features: tuple[str, ...] | None = None,
    cross_layers: int = 2,
    hidden: int = 64,
) -> tuple[Ranker, Curve]:
    """Train the ranker in this process with the one loop; returns it and its curve.
    ``features`` (a subset of ``RANKER_FEATURES``) makes a ranker that reads only those;
    ``cross_layers`` and ``hidden`` size it (``served_model.ranker.Ranker``)."""
    cfg = LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, name="ranker")
    task = RankerTask(x, y, validation, features, cross_layers, hidden)
    return launch(task, cfg, workers=1)  # the loop returns it in eval mode


def scorer(
    engine: TwoStage, train: Interactions, test_users: pd.DataFrame, features: FeatureSource
) -> Callable[[np.ndarray], np.ndarray]:
    """Index-space scores for ``mlkit.metrics``: ranked candidates get the ranker's
    probability; every other item stays below them (ordered by popularity), as a served list
    would never show it. ``test_users`` holds each user's held-out moment (event_timestamp)
    and features then; ``engine`` carries the ranker and tables of the moment."""
    return ranker_scorers(engine, train, test_users, features, {"": engine.bundle.ranker})[""]


def ranker_scorers(
    engine: TwoStage,
    train: Interactions,
    test_users: pd.DataFrame,
    features: FeatureSource,
    rankers: dict[str, nn.Module],
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """One :func:`scorer` per ranker (any format of ``served_model.ranker``), all over the same
    candidate rows: each user's candidates are retrieved once and ranked by every ranker, so
    comparing compressed rankers costs one replay, not one per ranker."""
    model = engine.model
    pos = pd.Index(train.item_ids).get_indexer(model.item_ids)
    popularity = np.asarray(train.matrix.sum(axis=0)).ravel()
    floor = (-1.0 + 1e-3 * popularity / max(popularity.max(), 1.0)).astype(np.float32)
    cache: dict[str, pd.DataFrame] = {}

    def rows_of(ids: list[str]) -> pd.DataFrame:
        missing = [u for u in ids if u not in cache]
        if missing:
            at = test_users[S.ENTITY_TIMESTAMP].reindex(missing).dropna()
            rows = candidate_rows(engine, at, test_users, features)
            rows = rows[pos[rows[CAND].to_numpy(np.int64)] >= 0]  # items the run lacks
            groups = dict(tuple(rows.groupby(S.USER_ID, sort=False)))
            for u in missing:
                cache[u] = groups.get(u, rows.iloc[:0])
        return pd.concat([cache[u] for u in ids], ignore_index=True)

    def make(ranker: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        def score(users: np.ndarray) -> np.ndarray:
            ids = train.user_ids[users].tolist()
            out = np.tile(floor, (len(ids), 1))
            rows = rows_of(ids)
            if rows.empty:
                return out
            cand = rows[CAND].to_numpy(np.int64)
            scores = engine.score(
                cand,
                rows[list(HISTORY_FEATURES)].to_numpy(np.float32),
                rows[list(S.USER_FEATURES)].to_numpy(np.float32),
                rows[list(S.ITEM_FEATURES)].to_numpy(np.float32),
                ranker=ranker,
            )
            row_of = {u: i for i, u in enumerate(ids)}
            out[rows[S.USER_ID].map(row_of).to_numpy(), pos[cand]] = scores
            return out

        return score

    return {name: make(r) for name, r in rankers.items()}


def init_student(student: Ranker, teacher: Ranker) -> Ranker:
    """Start a smaller ranker from the teacher's layers where the shapes allow: the input
    norm and the first cross layers as they are; of the deep MLP, the hidden units the
    teacher leans on most (largest outgoing weights), with their weights; the head on those."""
    s, t = student.net, teacher.net
    s.norm.load_state_dict(t.norm.state_dict())
    for mine, theirs in zip(s.cross, t.cross, strict=False):
        mine.load_state_dict(theirs.state_dict())
    n, h = t.norm.num_features, s.deep[0].out_features
    th = t.deep[0].out_features
    if h > th:
        return student
    with torch.no_grad():
        head = t.heads.weight[:, n:]  # (heads, th): the deep part's weights in the head
        keep2 = torch.argsort(head.abs().sum(0), descending=True)[:h].sort().values
        keep1 = torch.argsort(t.deep[2].weight[keep2].abs().sum(0), descending=True)[:h]
        keep1 = keep1.sort().values
        s.deep[0].weight.copy_(t.deep[0].weight[keep1])
        s.deep[0].bias.copy_(t.deep[0].bias[keep1])
        s.deep[2].weight.copy_(t.deep[2].weight[keep2][:, keep1])
        s.deep[2].bias.copy_(t.deep[2].bias[keep2])
        s.heads.weight[:, :n].copy_(t.heads.weight[:, :n])
        s.heads.weight[:, n:].copy_(head[:, keep2])
        s.heads.bias.copy_(t.heads.bias)
    return student


@dataclass
class DistilledRankerTask:
    """A smaller ranker learning the teacher's logits (mean squared error) on the teacher's own
    training rows, as a ``mlkit.loop.Trainable``; the epoch with the lowest validation
    error (on the teacher's logits of the validation rows) is kept."""

    x: np.ndarray
    target: np.ndarray  # the teacher's logits of ``x``
    teacher: Ranker
    cross_layers: int = 1
    hidden: int = 32
    validation: tuple[np.ndarray, np.ndarray] | None = None

    def build(self) -> Ranker:
        student = Ranker(self.cross_layers, self.hidden, features=self.teacher.feature_names)
        return init_student(student, self.teacher)

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        x = np.ascontiguousarray(ranker_view(net, self.x))
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(self.target))

    def loss(self, net: nn.Module, batch: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        xb, tb = batch
        return nn.functional.mse_loss(net(xb), tb)

    @torch.no_grad()
    def validation_loss(self, net: nn.Module) -> float | None:
        if self.validation is None:
            return None
        xv = torch.from_numpy(np.ascontiguousarray(ranker_view(net, self.validation[0])))
        return nn.functional.mse_loss(net(xv), torch.from_numpy(self.validation[1])).item()


def teacher_logits(teacher: nn.Module, x: np.ndarray) -> np.ndarray:
    return ranker_logits(teacher.eval(), x).astype(np.float32)


def distil_ranker(
    teacher: Ranker,
    x: np.ndarray,
    epochs: int,
    seed: int,
    validation: np.ndarray | None = None,
    cross_layers: int = 1,
    hidden: int = 32,
    batch_size: int = TrainConfig.model_fields["ranker_batch_size"].default,
    lr: float = TrainConfig.model_fields["ranker_lr"].default,
    workers: int = 1,
) -> tuple[Ranker, Curve]:
    """A student ranker distilled from ``teacher`` on rows ``x`` with the one loop."""
    task = DistilledRankerTask(
        x,
        teacher_logits(teacher, x),
        teacher.eval(),
        cross_layers,
        hidden,
        None if validation is None else (validation, teacher_logits(teacher, validation)),
    )
    cfg = LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, name="student")
    student, curve = launch(task, cfg, workers=workers)
    return student.eval(), curve
