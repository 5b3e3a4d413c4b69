"""The event stream and its Spark queries: both stream backends, the Feast push round trip,
watermarks and late events, restarts without duplicates, and land's reading of the stream."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime

import pytest

from shopml import schema as S
from shopml.stream import FileStream, RedisStream, parse_id

T0 = datetime(2025, 3, 1, 10, tzinfo=UTC)


def _event(user: str, item: str, at: datetime, session: str | None = "s1") -> dict[str, object]:
    return {
        S.USER_ID: user,
        S.ITEM_ID: item,
        S.EVENT_TYPE: "cart",
        S.TIMESTAMP: round(at.timestamp() * 1_000_000),
        S.SESSION_ID: session,
        S.QUERY: None,
    }


def _backends(tmp_path):
    yield FileStream(tmp_path / "stream")
    redis = RedisStream("redis://127.0.0.1:6379/0", f"shopml:test:{uuid.uuid4().hex}")
    try:
        yield redis
    finally:
        redis.client.delete(redis.key)


def test_both_backends_keep_batches_whole_and_in_order(tmp_path):
    """Redis (production) and files (embedded): the same ids, bounds and order. Redis is the
    machine's real server: this fails, never skips, when it is down."""
    for stream in _backends(tmp_path):
        assert stream.last_id() is None
        ids = [stream.append([_event("u", f"i{n}", T0), _event("u", "x", T0)]) for n in range(3)]
        assert [parse_id(i) for i in ids] == sorted(parse_id(i) for i in ids)
        assert len(set(ids)) == 3 and stream.last_id() == ids[-1]
        entries = list(stream.read("0-0"))
        assert [e for e, _ in entries] == ids
        assert [len(events) for _, events in entries] == [2, 2, 2]  # one entry per batch
        assert [events[0][S.ITEM_ID] for _, events in entries] == ["i0", "i1", "i2"]
        assert [e for e, _ in stream.read(ids[0], ids[1])] == [ids[1]]  # (after, upto]
        assert list(stream.read(ids[-1])) == []


# --- Spark ------------------------------------------------------------------------------------


def _online(settings, users: list[str]) -> dict[str, list]:
    from shopml.feast_store import open_store

    refs = [f"session_features:{f}" for f in S.SESSION_FEATURES]
    rows = [{S.USER_ID: u} for u in users]
    return open_store(settings).get_online_features(features=refs, entity_rows=rows).to_dict()


def _run_once(settings, spark) -> None:
    from spark_jobs.streaming import start_session_features

    start_session_features(settings, spark, once=True).awaitTermination()


@pytest.mark.spark
@pytest.mark.integration
def test_session_features_reach_the_online_store_once_even_across_restarts(spark, settings):
    """Event in -> Feast push source -> online feature out; a restarted query resumes from
    its checkpoint (no entry counted twice); a late event past the watermark no longer
    changes its session, yet reaches the lake; the archive holds every event once."""
    from shopml import feast_store
    from shopml.stream import stream_of
    from spark_jobs.streaming import archive

    feast_store.apply(settings, date(2025, 3, 1))
    stream = stream_of(settings)
    stream.append([_event("u1", "a", T0), _event("u1", "b", T0.replace(second=5))])
    stream.append([_event("u2", "c", T0, session=None)])
    shared = spark.conf.get("spark.sql.shuffle.partitions")
    _run_once(settings, spark)
    # the query's state has events.state_partitions partitions (its checkpoint keeps them);
    # the shared session keeps its own setting
    offsets = settings.paths.stream_checkpoints / "session_features" / "offsets" / "0"
    conf = json.loads(offsets.read_text().splitlines()[1])["conf"]
    assert conf["spark.sql.shuffle.partitions"] == str(settings.events.state_partitions) != shared
    assert spark.conf.get("spark.sql.shuffle.partitions") == shared
    got = _online(settings, ["u1", "u2", "nobody"])
    assert got[S.SESSION_ITEMS] == [["a", "b"], ["c"], None]
    assert got[S.SESSION_LENGTH] == [2, 1, None]
    assert got[S.SESSION_ID] == ["s1", "u2#2025-03-01", None]  # no session id: the user's day
    assert got[S.SESSION_LAST_EVENT_MS][0] == round(T0.replace(second=5).timestamp() * 1000)

    # a restart: only the new entries are read, the state goes on (a repeat item counts as an
    # event, not as a second item)
    stream.append([_event("u1", "a", T0.replace(minute=10))])
    _run_once(settings, spark)
    got = _online(settings, ["u1"])
    assert got[S.SESSION_LENGTH] == [3] and got[S.SESSION_ITEMS] == [["b", "a"]]

    # u3 on the next day moves the watermark (30 minutes behind) past the end of u1's day;
    # from the micro-batch after (Spark judges lateness by the previous batch's watermark)
    # u1's late event is dropped from the aggregation ...
    stream.append([_event("u3", "d", datetime(2025, 3, 2, 1, tzinfo=UTC))])
    _run_once(settings, spark)
    stream.append([_event("u3", "e", datetime(2025, 3, 2, 1, 5, tzinfo=UTC))])
    _run_once(settings, spark)
    stream.append([_event("u1", "late", T0.replace(minute=11))])
    _run_once(settings, spark)
    got = _online(settings, ["u1", "u3"])
    assert got[S.SESSION_LENGTH] == [3, 2] and got[S.SESSION_ITEMS][0] == ["b", "a"]

    # ... but not lost: the archive has every accepted event exactly once, drained twice
    assert archive(settings, spark) == {"archived": 7}
    assert archive(settings, spark) == {"archived": 0}
    rows = spark.read.parquet(str(settings.paths.streamed_events))
    assert rows.count() == 7 and rows.select("entry_id", S.ITEM_ID).distinct().count() == 7


@pytest.mark.spark
def test_land_takes_streamed_events_due_by_its_date_and_a_rerun_is_identical(
    spark, settings, tmp_path
):
    """Accepted events reach the lake through land: those stamped up to the end of ds, once
    (a rerun lands the same rows; a later one waits for its own date)."""
    from shopml.config import LandConfig
    from shopml.stream import stream_of
    from spark_jobs.jobs import land
    from tests.test_spark_jobs import _source

    settings = settings.model_copy(
        update={"land": LandConfig(source=str(_source(spark, tmp_path / "src", [1, 2])))}
    )
    stream = stream_of(settings)
    stream.append([_event("p1", "i1", T0), _event("p1", "i2", T0.replace(minute=1))])
    stream.append([_event("p2", "i1", datetime(2025, 3, 5, 9, tzinfo=UTC))])  # not yet due
    ds = date(2025, 3, 2)
    first = land(settings, ds, spark=spark)
    assert first["streamed"] == 2 and first["landed"] == 2 + 2
    assert land(settings, ds, spark=spark) == first
    raw = spark.read.parquet(str(settings.paths.raw_events_for(ds)))
    assert sorted(r[S.USER_ID] for r in raw.where(f"{S.USER_ID} = 'p1'").collect()) == ["p1"] * 2
    stream.append([_event("p3", "i1", T0.replace(hour=11))])  # arrives before the rerun
    again = land(settings, ds, spark=spark)
    assert again["streamed"] == 3 and again["landed"] == 5  # p1's rows are not doubled
    later = land(settings, date(2025, 3, 5), spark=spark)
    assert later["streamed"] == 4


def test_the_events_token_is_made_once_embedded_and_required_in_production(settings):
    from shopml.config import Profile
    from shopml.stream import MissingToken, load_token, token_path

    token = load_token(settings)
    assert load_token(settings) == token and len(token) >= 32
    assert token_path(settings).stat().st_mode & 0o777 == 0o600
    token_path(settings).unlink()
    production = settings.model_copy(update={"profile": Profile.PRODUCTION})
    with pytest.raises(MissingToken, match="SHOPML_EVENTS__TOKEN .*events.existingSecret"):
        load_token(production)
