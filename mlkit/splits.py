"""Train/test splits of ``Interactions`` in index space, seeded and deterministic.

Every split keeps the vocabularies of its input (``Interactions.subset``), so a model fitted on
``train`` scores exactly the items and users ``test`` is measured on, and it carries a sentence
describing itself that ``mlkit.metrics.evaluate`` puts into every table.

* ``leave_last_out``: per user, the last session/basket as a unit (repeat-purchase commerce:
  the next basket is the thing to predict), else the last interaction.
* ``temporal_cut``: one global cut time; what happened before trains, after tests (no user
  sees the future of another).
* ``stratified_split``: the per-user random split of published benchmarks (Microsoft
  Recommenders ``python_stratified_split``, ratio 0.75, seed 42), reproduced row for row so
  numbers can be put next to their tables.
* ``random_split``: the global random split (Microsoft Recommenders ``python_random_split``).

The basket rule (``basket_ids``) and the hold-out rule (``hold_out_last_basket``) are written
once here; ``leave_last_out`` applies them in index space and ``split_last_basket`` to the
pipeline's raw-id DataFrames (tests/test_splits.py holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlkit.interactions import ITEM_IDX, USER_IDX, Interactions
from shopml import schema as S

METHODS: tuple[str, ...] = ("leave_last_out", "temporal_cut", "stratified", "random")


@dataclass(frozen=True)
class Split:
    """A train/test pair over the same vocabularies, and how it was made.

    ``dropped`` counts events in neither part (e.g. a user's events after their held-out
    basket began, or cold test users under ``warm_only``).
    """

    train: Interactions
    test: Interactions
    name: str
    description: str
    dropped: int = 0


def _check(data: Interactions) -> pd.DataFrame:
    ev = data.events
    if ev.empty:
        raise ValueError("cannot split: there are no interactions")
    missing = [c for c in (USER_IDX, S.TIMESTAMP) if c not in ev.columns]
    if missing:
        raise ValueError(f"interactions have no {missing} column(s) (columns: {list(ev.columns)})")
    return ev


def _make(
    data: Interactions, train: np.ndarray, test: np.ndarray, name: str, description: str
) -> Split:
    if not train.any():
        raise ValueError(f"{name}: the training part is empty ({description})")
    if not test.any():
        raise ValueError(f"{name}: the test part is empty ({description})")
    dropped = int((~train & ~test).sum())
    return Split(data.subset(train), data.subset(test), name, description, dropped)


def basket_ids(user: pd.Series, session: pd.Series | None, timestamp: pd.Series) -> np.ndarray:
    """The basket of each event: its session when it has one, else the user's UTC day.

    The one basket rule (``shopml.schema.BASKET_ID``); ``spark_jobs.features`` writes the same
    rule in Spark for the feature snapshots.
    """
    day = pd.to_datetime(timestamp, utc=True).dt.strftime("%Y-%m-%d")
    fallback = user.astype(str).to_numpy(dtype=object) + "#" + day.to_numpy(dtype=object)
    if session is None:
        return fallback
    sid = session.to_numpy(dtype=object)
    null = session.isna().to_numpy()
    return np.where(null, fallback, sid.astype(str)).astype(object)


@dataclass(frozen=True)
class HeldOut:
    """Which rows ``hold_out_last_basket`` held out, and when each user's held-out basket began."""

    held: np.ndarray  # bool per row: in the user's last basket
    future: np.ndarray  # bool per row: the user's, at or after that basket began, not in it
    start: pd.Series  # user key -> start time of the held-out basket


def hold_out_last_basket(
    user: np.ndarray, basket: np.ndarray, ts: np.ndarray, eligible: np.ndarray | None = None
) -> HeldOut:
    """The hold-out rule: each user's basket that *started* last (ties: the larger basket id)
    among the ``eligible`` rows (e.g. purchases) is held out, when the user has at least two.

    Rows of that user at or after its start but outside it (a later view, a basket that began
    at the same instant) are future information: they belong to neither side. Users with a
    single basket are not held out (nothing would be left to learn from).
    """
    n = len(user)
    eligible = np.ones(n, dtype=bool) if eligible is None else eligible
    frame = pd.DataFrame({"u": user, "s": basket, "t": ts})
    starts = frame[eligible].groupby(["u", "s"], as_index=False, sort=False)["t"].min()
    starts = starts.sort_values(["u", "t", "s"], kind="stable")
    count = starts.groupby("u")["s"].transform("size")
    last = starts[count >= 2].groupby("u").tail(1)
    merged = frame.merge(last[["u", "s"]], on=["u", "s"], how="left", indicator=True)
    held = (merged["_merge"] == "both").to_numpy()
    start = last.set_index("u")["t"]
    began = frame["u"].map(start)
    future = (began.notna() & (frame["t"] >= began)).to_numpy() & ~held
    return HeldOut(held, future, start)


def _units(ev: pd.DataFrame, by_session: bool | None) -> tuple[np.ndarray | None, bool]:
    """Per-event basket key (``basket_ids``, or None for single events) and whether baskets
    are used.

    ``by_session=None`` uses baskets when the session column exists and has a value
    somewhere; an event without a session then belongs to its user's day.
    """
    has = S.SESSION_ID in ev.columns and ev[S.SESSION_ID].notna().any()
    if by_session is None:
        by_session = has
    if by_session and not has:
        raise ValueError("by_session=True but the interactions carry no session_id")
    if not by_session:
        return None, False
    return basket_ids(ev[USER_IDX], ev[S.SESSION_ID], ev[S.TIMESTAMP]), True


def _times(ev: pd.DataFrame) -> np.ndarray:
    """Event times as UTC ``datetime64[ns]`` (fast comparisons, no Timestamp objects)."""
    return pd.to_datetime(ev[S.TIMESTAMP], utc=True).to_numpy(dtype="datetime64[ns]")


def _utc(value: pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def leave_last_out(data: Interactions, by_session: bool | None = None) -> Split:
    """Hold out each user's last unit: the last session/basket, else the last interaction.

    Baskets follow ``hold_out_last_basket`` (the rule ``split_last_basket`` applies to raw
    ids); without sessions the last interaction is the latest event (ties: the later row).
    Users with a single unit stay in train whole: they have nothing to learn from if held out.
    """
    ev = _check(data)
    n = len(ev)
    unit, use_sessions = _units(ev, by_session)
    user = ev[USER_IDX].to_numpy()
    ts = _times(ev)
    if use_sessions:
        out = hold_out_last_basket(user, unit, ts)
        test, train = out.held, ~out.held & ~out.future
        what = "last session (basket) per user held out as a unit, by start time"
    else:
        order = np.lexsort((np.arange(n), ts, user))  # user, time, row
        last_pos = np.ones(n, dtype=bool)
        last_pos[:-1] = user[order][1:] != user[order][:-1]  # last row of each user's run
        counts = np.bincount(user, minlength=data.n_users)
        test = np.zeros(n, dtype=bool)
        test[order[last_pos]] = True
        test &= counts[user] >= 2
        train = ~test
        what = "last interaction per user held out"
    return _make(
        data,
        train,
        test,
        "leave_last_out",
        f"temporal leave-last-out: {what}; single-unit users train only",
    )


def temporal_cut(
    data: Interactions,
    cutoff: pd.Timestamp | str | None = None,
    train_fraction: float = 0.8,
    by_session: bool | None = None,
    warm_only: bool = False,
) -> Split:
    """Global cut: events before ``cutoff`` train, from ``cutoff`` on test.

    Without ``cutoff``, it is the timestamp at the ``train_fraction`` quantile of events
    (lower order statistic, so ties at the cut all go to test). A session belongs to the side
    of its last event, so a basket is never split and train holds nothing at or after the
    cut. ``warm_only`` keeps only test users with training events (no cold start).
    """
    ev = _check(data)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    ts = _times(ev)
    unit, use_sessions = _units(ev, by_session)
    if use_sessions:
        key = pd.Series(ts).groupby([ev[USER_IDX].to_numpy(), unit]).transform("max").to_numpy()
    else:
        key = ts
    if cutoff is None:
        cut = _utc(np.sort(ts)[int(np.floor(train_fraction * len(ts)))])
    else:
        cut = _utc(cutoff)
    train = key < cut.tz_localize(None).to_datetime64()
    test = ~train
    if warm_only:
        warm = np.zeros(data.n_users, dtype=bool)
        warm[ev[USER_IDX].to_numpy()[train]] = True
        test &= warm[ev[USER_IDX].to_numpy()]
    unit_text = "sessions by their last event" if use_sessions else "events"
    users_text = "; test restricted to users with training events" if warm_only else ""
    return _make(
        data,
        train,
        test,
        "temporal_cut",
        f"global temporal cut at {cut.isoformat()}: {unit_text} before it train, "
        f"the rest test{users_text}",
    )


def stratified_split(
    data: Interactions, ratio: float = 0.75, seed: int = 42, by: str = "user"
) -> Split:
    """Per-user (or per-item) random split: each user's (item's) interactions shuffled with
    ``seed``, ``ratio`` to train.

    Row for row the Microsoft Recommenders ``python_stratified_split(df, ratio, seed=seed,
    filter_by=by)`` (``min_rating=1``) when ``data.events`` is in the order of the frame given
    to it: one uniform draw per row from the legacy generator seeded with ``seed``, rows
    sorted by (group, draw), and a row trains when its rank / group count <= ``ratio`` (e.g.
    4 interactions: ranks 1-3 train, 3/4 = 0.75). Their MovieLens benchmark notebook uses
    ``filter_by="item"``; ``"user"`` is the function's default.
    """
    ev = _check(data)
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if by not in ("user", "item"):
        raise ValueError(f"by must be 'user' or 'item', got {by!r}")
    key = ev[USER_IDX if by == "user" else ITEM_IDX].to_numpy()
    draw = np.random.RandomState(seed).rand(len(ev))
    order = np.lexsort((draw, key))
    sorted_keys = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - group_start + 1
    count = np.bincount(key)[sorted_keys]
    train = np.zeros(len(ev), dtype=bool)
    train[order] = rank / count <= ratio
    return _make(
        data,
        train,
        ~train,
        "stratified",
        f"random per-{by} split (Microsoft Recommenders python_stratified_split, "
        f"filter_by={by!r}): {ratio:g} of each {by}'s interactions to train, seed {seed}",
    )


def random_split(data: Interactions, ratio: float = 0.75, seed: int = 42) -> Split:
    """Global random split of interactions: ``ratio`` of all rows to train.

    Row for row Microsoft Recommenders ``python_random_split(df, ratio, seed)``, i.e.
    scikit-learn's ``train_test_split(train_size=ratio, random_state=seed)``: floor(ratio * n)
    training rows taken after the first n - floor(ratio * n) of a legacy-generator permutation
    (reimplemented here so the split does not import scikit-learn; the tests check equality).
    """
    ev = _check(data)
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    n = len(ev)
    n_train = int(np.floor(ratio * n))
    permutation = np.random.RandomState(seed).permutation(n)
    train = np.zeros(n, dtype=bool)
    train[permutation[n - n_train :]] = True
    return _make(
        data,
        train,
        ~train,
        "random",
        f"global random split (Microsoft Recommenders python_random_split): {ratio:g} of "
        f"interactions to train, seed {seed}",
    )


def make_split(data: Interactions, method: str, **params: Any) -> Split:
    """Split by method name (DAG Params, CLI): one of ``METHODS``."""
    functions = {
        "leave_last_out": leave_last_out,
        "temporal_cut": temporal_cut,
        "stratified": stratified_split,
        "random": random_split,
    }
    if method not in functions:
        raise ValueError(f"unknown split method {method!r}; choose one of {list(METHODS)}")
    try:
        return functions[method](data, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters for split {method!r}: {err}") from err


# --- the pipeline's raw-id adapter ------------------------------------------------------------


@dataclass(frozen=True)
class BasketSplit:
    """The nightly run's split of canonical events (raw ids)."""

    train: pd.DataFrame  # events before each user's last basket (and all of single-basket users)
    test: pd.DataFrame  # one row per (user, item) of the held-out last basket
    test_time: pd.Series  # user_id -> start of the held-out basket


def split_last_basket(events: pd.DataFrame) -> BasketSplit:
    """Hold out each user's last basket of purchases (``hold_out_last_basket`` on raw ids).

    ``train`` keeps every event type before the held-out basket (views, carts...), with its
    ``basket_id``; ``test`` is the basket's purchased (user, item) pairs.
    """
    session = events.get(S.SESSION_ID)
    ts = pd.to_datetime(events[S.TIMESTAMP], utc=True)
    ev = events.assign(**{S.BASKET_ID: basket_ids(events[S.USER_ID], session, ts)})
    purchase = (ev[S.EVENT_TYPE] == S.PURCHASE).to_numpy()
    out = hold_out_last_basket(
        ev[S.USER_ID].to_numpy(dtype=object),
        ev[S.BASKET_ID].to_numpy(dtype=object),
        ts.to_numpy(dtype="datetime64[ns]"),
        eligible=purchase,
    )
    test_time = pd.to_datetime(out.start, utc=True).rename_axis(S.USER_ID).rename(S.TIMESTAMP)
    train = ev[~out.held & ~out.future]
    test = ev[out.held & purchase][[S.USER_ID, S.ITEM_ID]].drop_duplicates()
    return BasketSplit(train=train, test=test, test_time=test_time)
