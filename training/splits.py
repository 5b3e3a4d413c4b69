"""Train/test splits of ``Interactions`` in index space, seeded and deterministic.

Every split keeps the vocabularies of its input (``Interactions.subset``), so a model fitted on
``train`` scores exactly the items and users ``test`` is measured on, and it carries a sentence
describing itself that ``training.metrics.evaluate`` puts into every table.

* ``leave_last_out``: per user, the last session/basket as a unit (repeat-purchase commerce:
  the next basket is the thing to predict), else the last interaction.
* ``temporal_cut``: one global cut time; what happened before trains, after tests (no user
  sees the future of another).
* ``stratified_split``: the per-user random split of published benchmarks (Microsoft
  Recommenders ``python_stratified_split``, ratio 0.75, seed 42), reproduced row for row so
  numbers can be put next to their tables.
* ``random_split``: the global random split (Microsoft Recommenders ``python_random_split``).

``training.data.split_last_basket`` (raw ids, Instacart purchases) is the id-space sibling of
``leave_last_out``; both hold out the basket that started last, ties by basket id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shopml import schema as S
from training.interactions import USER_IDX, Interactions

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


def _units(ev: pd.DataFrame, by_session: bool | None) -> tuple[np.ndarray | None, bool]:
    """Per-event unit key (session id, or None for single events) and whether sessions are used.

    ``by_session=None`` uses sessions when the column exists and has a value somewhere; an
    event without a session is then a unit of its own.
    """
    has = S.SESSION_ID in ev.columns and ev[S.SESSION_ID].notna().any()
    if by_session is None:
        by_session = has
    if by_session and not has:
        raise ValueError("by_session=True but the interactions carry no session_id")
    if not by_session:
        return None, False
    sid = ev[S.SESSION_ID]
    key = sid.astype(str).to_numpy(dtype=object)
    null = sid.isna().to_numpy()
    key[null] = [f"\x00event#{i}" for i in np.flatnonzero(null)]
    return key, True


def _times(ev: pd.DataFrame) -> np.ndarray:
    """Event times as UTC ``datetime64[ns]`` (fast comparisons, no Timestamp objects)."""
    return pd.to_datetime(ev[S.TIMESTAMP], utc=True).to_numpy(dtype="datetime64[ns]")


def _utc(value: pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def leave_last_out(data: Interactions, by_session: bool | None = None) -> Split:
    """Hold out each user's last unit: the last session/basket, else the last interaction.

    The last session is the one that started last (ties: the larger session id, as
    ``training.data.split_last_basket``); the last interaction is the latest event (ties: the
    later row). Events of a user after the held-out session began but outside it are future
    information and go to neither part. Users with a single unit stay in train whole: they
    have nothing to learn from if held out.
    """
    ev = _check(data)
    n = len(ev)
    unit, use_sessions = _units(ev, by_session)
    user = ev[USER_IDX].to_numpy()
    ts = _times(ev)
    if use_sessions:
        frame = pd.DataFrame({"u": user, "s": unit, "t": ts})
        starts = frame.groupby(["u", "s"], as_index=False, sort=False)["t"].min()
        starts = starts.sort_values(["u", "t", "s"], kind="stable")
        count = starts.groupby("u")["s"].transform("size")
        last = starts[count >= 2].groupby("u").tail(1)
        held = frame.merge(last[["u", "s"]], on=["u", "s"], how="left", indicator=True)
        test = (held["_merge"] == "both").to_numpy()
        start = frame["u"].map(last.set_index("u")["t"])
        future = (start.notna() & (frame["t"] >= start)).to_numpy() & ~test
        train = ~test & ~future
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


def stratified_split(data: Interactions, ratio: float = 0.75, seed: int = 42) -> Split:
    """Per-user random split: each user's interactions shuffled with ``seed``, ``ratio`` to train.

    Row for row the Microsoft Recommenders ``python_stratified_split(df, ratio, seed=seed)``
    (its default ``min_rating=1, filter_by="user"``) when ``data.events`` is in the order of
    the frame given to it: one uniform draw per row from the legacy generator seeded with
    ``seed``, rows sorted by (user, draw), and a row trains when its rank / user count <=
    ``ratio`` (e.g. 4 interactions: ranks 1-3 train, 3/4 = 0.75).
    """
    ev = _check(data)
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    user = ev[USER_IDX].to_numpy()
    draw = np.random.RandomState(seed).rand(len(ev))
    order = np.lexsort((draw, user))
    sorted_users = user[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_users[1:] != sorted_users[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - group_start + 1
    count = np.bincount(user, minlength=data.n_users)[sorted_users]
    train = np.zeros(len(ev), dtype=bool)
    train[order] = rank / count <= ratio
    return _make(
        data,
        train,
        ~train,
        "stratified",
        f"random per-user split (Microsoft Recommenders python_stratified_split): "
        f"{ratio:g} of each user's interactions to train, seed {seed}",
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
