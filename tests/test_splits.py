import numpy as np
import pandas as pd
import pytest

from mlkit import splits
from mlkit.interactions import from_events
from shopml import schema as S

T0 = pd.Timestamp("2025-01-01", tz="UTC")


def _data(rows, sessions=True):
    """rows: (user, item, day, session)."""
    ev = pd.DataFrame(
        [
            {
                S.USER_ID: u,
                S.ITEM_ID: i,
                S.EVENT_TYPE: S.PURCHASE,
                S.TIMESTAMP: T0 + pd.Timedelta(days=d),
                S.SESSION_ID: s,
            }
            for u, i, d, s in rows
        ]
    )
    if not sessions:
        ev = ev.drop(columns=S.SESSION_ID)
    return from_events(ev)


def _pairs(inter):
    ev = inter.events
    return sorted(zip(inter.user_ids[ev["user_idx"]], inter.item_ids[ev["item_idx"]], strict=True))


def test_leave_last_out_holds_out_the_last_basket_as_a_unit():
    data = _data(
        [
            ("a", "x", 0, "a1"),
            ("a", "y", 0, "a1"),
            ("a", "x", 5, "a2"),
            ("a", "z", 9, "a3"),  # a's last basket: {z, w}
            ("a", "w", 9, "a3"),
            ("b", "x", 1, "b1"),  # b has one basket: stays in train
            ("c", "y", 2, "c1"),
            ("c", "x", 4, "c2"),  # c2 and c3 start together: the larger id (c3) is last
            ("c", "z", 4, "c3"),
        ]
    )
    sp = splits.leave_last_out(data)
    assert _pairs(sp.test) == [("a", "w"), ("a", "z"), ("c", "z")]
    # c2 started at the same time as the held-out c3: not before it, so it is future for c
    assert ("c", "x") not in _pairs(sp.train)
    assert sp.dropped == 1
    assert ("b", "x") in _pairs(sp.train)
    assert "last session (basket)" in sp.description
    assert sp.train.n_items == sp.test.n_items == data.n_items  # vocabularies kept


def test_leave_last_out_without_sessions_holds_out_the_last_interaction():
    data = _data(
        [("a", "x", 0, None), ("a", "y", 3, None), ("a", "z", 3, None), ("b", "x", 1, None)],
        sessions=False,
    )
    sp = splits.leave_last_out(data)
    # a's last two events share a time: the later row (z) is held out; b has one event
    assert _pairs(sp.test) == [("a", "z")]
    assert _pairs(sp.train) == [("a", "x"), ("a", "y"), ("b", "x")]
    assert "last interaction" in sp.description
    with pytest.raises(ValueError, match="no session_id"):
        splits.leave_last_out(data, by_session=True)


def test_temporal_cut_keeps_baskets_whole_and_train_in_the_past():
    data = _data(
        [
            ("a", "x", 0, "a1"),
            ("a", "y", 4, "a2"),  # a2 spans the cut (day 4 and day 6): all of it tests
            ("a", "z", 6, "a2"),
            ("b", "x", 2, "b1"),
            ("c", "y", 7, "c1"),  # c only after the cut: a cold test user
        ]
    )
    sp = splits.temporal_cut(data, cutoff="2025-01-06")
    assert _pairs(sp.train) == [("a", "x"), ("b", "x")]
    assert _pairs(sp.test) == [("a", "y"), ("a", "z"), ("c", "y")]
    assert (sp.train.events[S.TIMESTAMP] < pd.Timestamp("2025-01-06", tz="UTC")).all()
    warm = splits.temporal_cut(data, cutoff="2025-01-06", warm_only=True)
    assert _pairs(warm.test) == [("a", "y"), ("a", "z")]
    assert warm.dropped == 1
    # default cut: the event time at the 0.8 quantile (index floor(0.8 * 5) = 4 -> day 7)
    assert _pairs(splits.temporal_cut(data, by_session=False).test) == [("c", "y")]
    with pytest.raises(ValueError, match="test part is empty"):
        splits.temporal_cut(data, cutoff="2026-01-01")


def _recommenders_stratified(df, ratio, seed, column=S.USER_ID):
    """The Microsoft Recommenders python_stratified_split algorithm, written with pandas as in
    recommenders/datasets/python_splitters.py (_do_stratification, is_random=True); ``column``
    is its ``filter_by`` column."""
    df = df.copy()
    np.random.seed(seed)
    df["random"] = np.random.rand(df.shape[0])
    df = df.sort_values([column, "random"])
    groups = df.groupby(column)
    df["count"] = groups[column].transform("count")
    df["rank"] = (groups.cumcount() + 1) / df["count"]
    return df[df["rank"] <= ratio].index


def _random_events(n, n_users, n_items, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            S.USER_ID: rng.integers(0, n_users, n).astype(str),
            S.ITEM_ID: rng.integers(0, n_items, n).astype(str),
            S.EVENT_TYPE: S.PURCHASE,
            S.TIMESTAMP: T0 + pd.to_timedelta(rng.integers(0, 10**6, n), unit="s"),
        }
    )


@pytest.mark.parametrize("ratio,seed,by", [(0.75, 42, "user"), (0.5, 7, "user"),
                                           (0.75, 42, "item")])  # fmt: skip
def test_stratified_split_reproduces_microsoft_recommenders_row_for_row(ratio, seed, by):
    ev = _random_events(600, 25, 50, seed=1)
    data = from_events(ev)
    sp = splits.stratified_split(data, ratio=ratio, seed=seed, by=by)
    expected_train = np.zeros(len(ev), dtype=bool)
    column = S.USER_ID if by == "user" else S.ITEM_ID
    expected_train[_recommenders_stratified(ev, ratio, seed, column)] = True
    got_train = np.zeros(len(ev), dtype=bool)
    # subset keeps row order: recover the rows through a row-number column
    tagged = data.subset(np.ones(len(ev), dtype=bool))
    tagged.events["row"] = np.arange(len(ev))
    got = splits.stratified_split(tagged, ratio=ratio, seed=seed, by=by)
    got_train[got.train.events["row"].to_numpy()] = True
    np.testing.assert_array_equal(got_train, expected_train)
    assert len(sp.train.events) == expected_train.sum()
    # per user: a user with 4 interactions trains on 3 (3/4 <= 0.75)
    four = _data([("a", f"x{i}", i, None) for i in range(4)], sessions=False)
    assert len(splits.stratified_split(four, 0.75).train.events) == 3


def test_random_split_matches_scikit_learn_train_test_split():
    model_selection = pytest.importorskip("sklearn.model_selection")
    ev = _random_events(101, 10, 20, seed=2)
    data = from_events(ev)
    data.events["row"] = np.arange(len(ev))
    sp = splits.random_split(data, ratio=0.75, seed=42)
    rows, _ = model_selection.train_test_split(
        np.arange(len(ev)), test_size=None, train_size=0.75, random_state=42
    )
    assert sorted(sp.train.events["row"]) == sorted(rows)


def test_splits_are_deterministic_disjoint_and_cover_the_data():
    data = from_events(_random_events(400, 20, 30, seed=3))
    data.events["row"] = np.arange(len(data.events))
    for method in splits.METHODS:
        a, b = splits.make_split(data, method), splits.make_split(data, method)
        assert a.train.events.equals(b.train.events) and a.test.events.equals(b.test.events)
        train, test = set(a.train.events["row"]), set(a.test.events["row"])
        assert not train & test
        assert len(train) + len(test) + a.dropped == len(data.events)
    other = splits.stratified_split(data, seed=1)
    assert not other.train.events.equals(splits.stratified_split(data, seed=42).train.events)


def test_split_errors_are_readable():
    data = from_events(_random_events(50, 5, 10, seed=4))
    with pytest.raises(ValueError, match="ratio must be in"):
        splits.stratified_split(data, ratio=1.0)
    with pytest.raises(ValueError, match="unknown split method"):
        splits.make_split(data, "kfold")
    with pytest.raises(ValueError, match="bad parameters"):
        splits.make_split(data, "random", folds=3)
    with pytest.raises(ValueError, match="no interactions"):
        splits.leave_last_out(data.subset(np.zeros(50, dtype=bool)))


# --- one rule, two adapters ---------------------------------------------------------------------


def _basket_events(seed, n=400):
    """Purchases of 30 users over 20 days; a third without a session (they fall back to the
    user's day), some baskets starting at the same instant (ties by basket id)."""
    rng = np.random.default_rng(seed)
    day = rng.integers(0, 20, n)
    hour = rng.choice([9, 9, 13], n)  # repeated instants
    session = np.array([f"s{d}-{h}" for d, h in zip(day, hour, strict=True)], dtype=object)
    session[rng.random(n) < 0.33] = None
    return pd.DataFrame(
        {
            S.USER_ID: rng.integers(0, 30, n).astype(str),
            S.ITEM_ID: rng.integers(0, 50, n).astype(str),
            S.EVENT_TYPE: S.PURCHASE,
            S.TIMESTAMP: T0 + pd.to_timedelta(day, unit="D") + pd.to_timedelta(hour, unit="h"),
            S.SESSION_ID: session,
        }
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_last_basket_and_leave_last_out_are_one_rule(seed):
    events = _basket_events(seed)
    by_ids = splits.split_last_basket(events)
    by_index = splits.leave_last_out(from_events(events))
    assert _pairs(by_index.test) == sorted(
        set(zip(by_ids.test[S.USER_ID], by_ids.test[S.ITEM_ID], strict=True))
    )
    assert _pairs(by_index.train) == sorted(
        zip(by_ids.train[S.USER_ID], by_ids.train[S.ITEM_ID], strict=True)
    )


def test_split_last_basket_holds_out_purchases_and_drops_the_users_future():
    t = lambda d, h=10: T0 + pd.Timedelta(days=d, hours=h)  # noqa: E731
    events = pd.DataFrame(
        [
            ("a", "x", S.PURCHASE, t(0), "o1"),
            ("a", "y", S.PURCHASE, t(3), "o2"),  # a's last basket: {y, z}
            ("a", "z", S.PURCHASE, t(3), "o2"),
            ("a", "v", "view", t(3), "o2"),  # in the basket, not a purchase: not a label
            ("a", "w", "view", t(4), None),  # after the basket began: future for a
            ("b", "x", S.PURCHASE, t(1), None),  # one basket (b's day): b only trains
            ("b", "y", S.PURCHASE, t(1, 18), None),
        ],
        columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TYPE, S.TIMESTAMP, S.SESSION_ID],
    )
    sp = splits.split_last_basket(events)
    assert sorted(map(tuple, sp.test.to_numpy())) == [("a", "y"), ("a", "z")]
    assert sorted(zip(sp.train[S.USER_ID], sp.train[S.ITEM_ID], strict=True)) == [
        ("a", "x"), ("b", "x"), ("b", "y"),
    ]  # fmt: skip
    assert sp.test_time.to_dict() == {"a": t(3)}
    assert set(sp.train[S.BASKET_ID]) == {"o1", "b#2025-01-02"}


@pytest.mark.spark
def test_the_basket_rule_is_the_same_in_spark_and_pandas(spark):
    from spark_jobs.features import with_basket_and_flags

    events = _basket_events(3).assign(**{S.QUERY: None})
    sdf = spark.createDataFrame(
        events.assign(**{S.TIMESTAMP: events[S.TIMESTAMP].dt.tz_localize(None)}).astype(
            {S.TIMESTAMP: "datetime64[us]"}
        )
    )
    spark_ids = with_basket_and_flags(sdf).select(S.BASKET_ID).toPandas()[S.BASKET_ID]
    ours = splits.basket_ids(events[S.USER_ID], events[S.SESSION_ID], events[S.TIMESTAMP])
    assert sorted(spark_ids) == sorted(ours)
