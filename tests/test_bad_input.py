"""A corpus of bad input, tried as a retailer's export would arrive, through the project's own
``land`` -> ``validate_raw`` -> ``clean``. Every kind ends in one of three outcomes, asserted:

* ``refused``: ``land`` stops with a message naming the file and column (nothing landed);
* ``stopped``: validation fails the run before cleaning, naming the check;
* ``quarantined``: the bad rows reach quarantine with their reason, the rest is kept;

and, for the last two, every row is accounted for (source rows = kept + quarantined, or
landed + quarantined at land when validation stopped). ``accepted`` marks real-world export
forms that must land whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopml import schema as S

pytestmark = pytest.mark.spark

DS = date(2025, 3, 4)
USERS, ITEMS, PER_DAY = 40, 200, 3


def base() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Four days of purchases by 40 users (3 a day each) over a 200-item catalog."""
    rows = []
    for day in range(1, 5):
        for u in range(USERS):
            for j in range(PER_DAY):
                rows.append({
                    S.USER_ID: f"u{u:02d}",
                    S.ITEM_ID: f"i{(u * 7 + j * 3 + day) % ITEMS:03d}",
                    S.EVENT_TYPE: "purchase",
                    S.TIMESTAMP: pd.Timestamp(f"2025-03-0{day} 08:00", tz="UTC")
                    + pd.Timedelta(seconds=u * 60 + j),
                    S.SESSION_ID: f"s{day}-{u}",
                    S.QUERY: None,
                })  # fmt: skip
    items = pd.DataFrame({
        S.ITEM_ID: [f"i{i:03d}" for i in range(ITEMS)],
        S.TITLE: [f"product {i}" for i in range(ITEMS)],
        S.CATEGORY: "c",
        S.PRICE: [1.0 + i for i in range(ITEMS)],
    })  # fmt: skip
    return pd.DataFrame(rows), items


Mutation = Callable[[pd.DataFrame, pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]


@dataclass
class Case:
    mutate: Mutation
    outcome: str  # accepted | quarantined | stopped | refused
    detail: str = ""  # the quarantine reason, or a phrase of the refusal / failed check
    count: int | None = None  # rows expected under that reason
    land: dict = field(default_factory=dict)  # LandConfig fields (e.g. timestamp_unit)
    write: Callable[[Path, pd.DataFrame], None] | None = None  # how the events file is written


def _rows(n: int, **values) -> Mutation:
    """Set ``values`` on the first ``n`` events of day 2."""

    def mutate(ev, it):
        idx = ev.index[ev[S.TIMESTAMP].dt.day == 2][:n]
        for col, v in values.items():
            ev[col] = ev[col].astype(object)
            ev.loc[idx, col] = v
        return ev, it

    return mutate


def _day(day: int, **values) -> Mutation:
    def mutate(ev, it):
        idx = ev.index[ev[S.TIMESTAMP].dt.day == day]
        for col, v in values.items():
            ev[col] = ev[col].astype(object)
            ev.loc[idx, col] = v
        return ev, it

    return mutate


def _timestamps(convert: Callable[[pd.Series], pd.Series]) -> Mutation:
    def mutate(ev, it):
        ev[S.TIMESTAMP] = convert(ev[S.TIMESTAMP])
        return ev, it

    return mutate


def _epoch(unit_seconds: float, dtype: str) -> Callable[[pd.Series], pd.Series]:
    return lambda ts: (ts.astype("int64") / 1e9 / unit_seconds).astype(dtype)


def _items(mutate_items: Callable[[pd.DataFrame], pd.DataFrame]) -> Mutation:
    return lambda ev, it: (ev, mutate_items(it))


def _extra_events(make: Callable[[pd.DataFrame], pd.DataFrame]) -> Mutation:
    return lambda ev, it: (pd.concat([ev, make(ev)], ignore_index=True), it)


def _bot(ev: pd.DataFrame) -> pd.DataFrame:
    day3 = pd.Timestamp("2025-03-03 12:00", tz="UTC")
    return pd.DataFrame({
        S.USER_ID: "u00", S.ITEM_ID: [f"i{i % ITEMS:03d}" for i in range(300)],
        S.EVENT_TYPE: "view", S.TIMESTAMP: [day3 + pd.Timedelta(seconds=i) for i in range(300)],
        S.SESSION_ID: "bot", S.QUERY: None,
    })  # fmt: skip


def _write_us(path: Path, events: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(events, preserve_index=False)
    pq.write_table(table, path, coerce_timestamps="us")


def _write_empty(path: Path, events: pd.DataFrame) -> None:
    pq.write_table(pa.Table.from_pandas(events.iloc[:0], preserve_index=False), path)


def _write_garbage(path: Path, events: pd.DataFrame) -> None:
    path.write_text(events.to_csv(index=False))


def _unknown(share: float) -> Mutation:
    def mutate(ev, it):
        idx = ev.index[ev[S.TIMESTAMP].dt.day == 3]
        bad = idx[: int(len(idx) * share)]
        ev.loc[bad, S.ITEM_ID] = [f"zz{i}" for i in range(len(bad))]
        return ev, it

    return mutate


def _one_item(ev, it):
    idx = ev.index[ev[S.TIMESTAMP].dt.day == 3]
    ev.loc[idx[: int(len(idx) * 0.9)], S.ITEM_ID] = "i001"
    return ev, it


def _unparsable(ev, it):
    idx = ev.index[ev[S.TIMESTAMP].dt.day == 2][:3]
    ev[S.TIMESTAMP] = ev[S.TIMESTAMP].dt.strftime("%Y-%m-%d %H:%M:%S")
    ev.loc[idx, S.TIMESTAMP] = "yesterday"
    return ev, it


def _dup_events(ev, it):
    return pd.concat([ev, ev.iloc[:3]], ignore_index=True), it


def _float_ids(ev, it):
    ev[S.USER_ID] = ev[S.USER_ID].str[1:].astype(float)
    return ev, it


def _dot_zero_ids(ev, it):
    ev[S.USER_ID] = ev[S.USER_ID].str[1:].astype(int).astype(str) + ".0"
    return ev, it


def _padded_item_ids(ev, it):
    ev[S.ITEM_ID] = " " + ev[S.ITEM_ID] + "  "
    return ev, it


CORPUS: dict[str, Case] = {
    # --- real export forms that must land whole ---------------------------------------------
    "pandas_nanosecond_timestamps": Case(lambda ev, it: (ev, it), "accepted"),
    "microsecond_timestamps": Case(lambda ev, it: (ev, it), "accepted", write=_write_us),
    "epoch_milliseconds_declared": Case(
        _timestamps(_epoch(1e-3, "int64")), "accepted", land={"timestamp_unit": "ms"}
    ),
    "epoch_seconds_declared": Case(
        _timestamps(_epoch(1.0, "int64")), "accepted", land={"timestamp_unit": "s"}
    ),
    "epoch_seconds_as_floats": Case(
        _timestamps(_epoch(1.0, "float64")), "accepted", land={"timestamp_unit": "s"}
    ),
    "iso_8601_strings": Case(
        _timestamps(lambda ts: ts.dt.strftime("%Y-%m-%dT%H:%M:%SZ")), "accepted"
    ),
    "float_user_ids": Case(_float_ids, "accepted"),
    "numeric_ids_with_dot_zero": Case(_dot_zero_ids, "accepted"),
    "whitespace_around_ids": Case(_padded_item_ids, "accepted"),
    # --- rows that go to quarantine with a reason -------------------------------------------
    "null_timestamps": Case(_rows(2, **{S.TIMESTAMP: None}), "quarantined", "null_timestamp", 2),
    "unparsable_timestamp_strings": Case(_unparsable, "quarantined", "unparsable_timestamp", 3),
    "events_after_the_logical_date": Case(
        _rows(4, **{S.TIMESTAMP: pd.Timestamp("2025-03-06 10:00", tz="UTC")}),
        "quarantined",
        "after_logical_date",
        4,
    ),  # fmt: skip
    "epoch_zero_timestamps": Case(
        _rows(2, **{S.TIMESTAMP: pd.Timestamp("1970-01-01", tz="UTC")}),
        "quarantined",
        "timestamp_before_2000",
        2,
    ),  # fmt: skip
    "null_user_id_on_a_few_rows": Case(_rows(1, **{S.USER_ID: None}), "quarantined", "null_key", 1),
    "empty_string_item_id": Case(_rows(1, **{S.ITEM_ID: ""}), "quarantined", "null_key", 1),
    "control_characters_in_ids": Case(
        _rows(2, **{S.USER_ID: "u\x07bell"}), "quarantined", "id_control_characters", 2
    ),
    "ids_thousands_of_characters_long": Case(
        _rows(1, **{S.ITEM_ID: "x" * 3000}), "quarantined", "id_too_long", 1
    ),
    "unknown_event_type_on_a_few_rows": Case(
        _rows(1, **{S.EVENT_TYPE: "teleport"}), "quarantined", "unknown_event_type", 1
    ),
    "duplicate_events": Case(_dup_events, "quarantined", "duplicate", 3),
    "events_of_a_few_unknown_items": Case(_unknown(0.02), "quarantined", "unknown_item", 2),
    "nan_price": Case(
        _items(lambda it: it.assign(**{S.PRICE: [np.nan] + list(it[S.PRICE][1:])})),
        "quarantined",
        "non_finite_price",
        1,
    ),  # fmt: skip
    "infinite_price": Case(
        _items(lambda it: it.assign(**{S.PRICE: [np.inf] + list(it[S.PRICE][1:])})),
        "quarantined",
        "non_finite_price",
        1,
    ),  # fmt: skip
    "negative_price": Case(
        _items(lambda it: it.assign(**{S.PRICE: [-5.0] + list(it[S.PRICE][1:])})),
        "quarantined",
        "negative_price",
        1,
    ),  # fmt: skip
    "duplicate_item_ids": Case(
        _items(lambda it: pd.concat([it, it.iloc[:1]], ignore_index=True)),
        "quarantined",
        "duplicate",
        1,
    ),  # fmt: skip
    # --- validation stops the run before cleaning --------------------------------------------
    "null_user_ids_for_a_whole_day": Case(
        _day(2, **{S.USER_ID: None}), "stopped", "user_id_null_share"
    ),
    "unknown_event_type_for_a_whole_day": Case(
        _day(2, **{S.EVENT_TYPE: "teleport"}), "stopped", "unknown_event_type"
    ),
    "thirty_percent_unknown_items": Case(_unknown(0.3), "stopped", "unknown_item_share"),
    "bot_flood": Case(_extra_events(_bot), "stopped", "top_user_share"),
    "stuck_clock": Case(
        _day(3, **{S.TIMESTAMP: pd.Timestamp("2025-03-03 09:00", tz="UTC")}),
        "stopped",
        "top_timestamp_share",
    ),  # fmt: skip
    "one_item_is_most_of_a_day": Case(_one_item, "stopped", "top_item_share"),
    "catalog_without_item_ids": Case(
        _items(lambda it: it.assign(**{S.ITEM_ID: None})), "stopped", "item_id"
    ),  # fmt: skip
    # --- refused at land, nothing landed -------------------------------------------------
    "epoch_milliseconds_undeclared": Case(
        _timestamps(_epoch(1e-3, "int64")), "refused", "SHOPML_LAND__TIMESTAMP_UNIT"
    ),
    "empty_events_file": Case(lambda ev, it: (ev, it), "refused", "no events", write=_write_empty),
    "missing_required_column": Case(
        lambda ev, it: (ev.drop(columns=[S.EVENT_TYPE]), it), "refused", "missing required"
    ),
    "boolean_timestamps": Case(
        _timestamps(lambda ts: ts.dt.day > 2), "refused", "has type boolean"
    ),
    "not_a_parquet_file": Case(
        lambda ev, it: (ev, it), "refused", "cannot read", write=_write_garbage
    ),  # fmt: skip
}


def _source(root: Path, case: Case) -> tuple[Path, int]:
    events, items = case.mutate(*base())
    (root / "events").mkdir(parents=True)
    (root / "items").mkdir(parents=True)
    path = root / "events" / "part-0.parquet"
    if case.write:
        case.write(path, events)
    else:
        pq.write_table(pa.Table.from_pandas(events, preserve_index=False), path)
    # as Spark or a database export writes it: NaN stays NaN (pandas would write a null)
    columns = {c: pa.array(items[c].tolist(), from_pandas=False) for c in items.columns}
    pq.write_table(pa.table(columns), root / "items" / "part-0.parquet")
    return root, len(events)


def _count(path: Path) -> int:
    return len(pd.read_parquet(path)) if path.exists() else 0


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_bad_input_is_refused_stopped_or_quarantined_and_no_row_is_lost(
    kind, spark, settings, tmp_path
):
    from shopml.config import LandConfig
    from spark_jobs.ingest import SourceSchemaError
    from spark_jobs.jobs import SourceReadError, clean, land
    from validation.run import ValidationFailed, validate_raw

    case = CORPUS[kind]
    source, source_rows = _source(tmp_path / "source", case)
    s = settings.model_copy(update={"land": LandConfig(source=str(source), **case.land)})
    p = s.paths
    try:
        landed = land(s, DS, spark=spark)
    except (SourceSchemaError, SourceReadError) as refusal:
        assert case.outcome == "refused", f"{kind}: refused unexpectedly: {refusal}"
        assert case.detail in str(refusal) and str(source) in str(refusal), str(refusal)
        assert not list(p.raw_events.rglob("*.parquet")), "nothing may be landed"
        return
    assert case.outcome != "refused", f"{kind}: landed, expected a refusal ({case.detail})"
    assert landed["source_rows"] == source_rows  # what Spark read is what the file holds
    assert source_rows == landed["landed"] + landed["quarantined"]
    try:
        validate_raw(s, DS)
    except ValidationFailed as stop:
        assert case.outcome == "stopped", f"{kind}: validation stopped unexpectedly: {stop}"
        assert case.detail in str(stop), str(stop)
        assert list(p.quarantine_for(DS).glob("*.json")), "the failed report is quarantined"
        return
    assert case.outcome != "stopped", f"{kind}: validation passed, expected {case.detail}"
    report = clean(s, DS, spark=spark)
    q = p.quarantine_for(DS)
    kept = _count(p.clean_events_for(DS))
    quarantined = _count(q / "event_rows") + _count(q / "landed_rows")
    assert source_rows == kept + quarantined, report  # conservation, from the files themselves
    reasons = dict(report["rejected_by_reason"])
    for landed_reason in (
        pd.read_parquet(q / "landed_rows")[S.REJECT_REASON] if (q / "landed_rows").exists() else []
    ):
        reasons[landed_reason] = reasons.get(landed_reason, 0) + 1
    if case.outcome == "accepted":
        assert reasons == {}, reasons
        clean_events = pd.read_parquet(p.clean_events_for(DS))
        assert clean_events[S.USER_ID].nunique() == USERS
        assert not clean_events[S.USER_ID].str.contains(r"\.0$|^\s|\s$").any()
        assert not clean_events[S.ITEM_ID].str.contains(r"^\s|\s$").any()
    else:
        assert reasons.get(case.detail) == case.count, reasons


def test_the_corpus_has_thirty_kinds_and_every_outcome():
    assert len(CORPUS) >= 30
    assert {c.outcome for c in CORPUS.values()} == {"accepted", "quarantined", "stopped", "refused"}
