"""Pseudonymous user ids and forgetting a user (shopml.privacy), on tiny data.

The end-to-end proofs (planted ids searched for in the whole state directory after a DAG run,
``shopml forget`` on a real run) are in tests/test_e2e.py, on the shared pipeline run."""

from __future__ import annotations

import hashlib
import hmac
import stat
from datetime import date, datetime

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shopml import privacy
from shopml import schema as S

KEY = "k" * 40


def test_the_pseudonym_is_hmac_sha256_and_no_id_stays_no_id():
    assert privacy.pseudonym(KEY.encode(), "user-7") == (
        hmac.new(KEY.encode(), b"user-7", hashlib.sha256).hexdigest()
    )
    assert privacy.pseudonym(KEY.encode(), "user-7") != privacy.pseudonym(b"x" * 40, "user-7")
    assert privacy.pseudonym(KEY.encode(), None) is None
    assert privacy.pseudonym(KEY.encode(), "") is None  # cleaning quarantines it as null_key


def test_embedded_generates_a_private_key_once_and_production_refuses_to(settings, monkeypatch):
    key = privacy.load_key(settings)
    path = privacy.key_path(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 64
    assert privacy.load_key(settings) == key  # the same key on every later call
    monkeypatch.setenv("SHOPML_PRIVACY__KEY", "s" * 32)
    from shopml.config import load_settings

    assert privacy.load_key(load_settings()) == b"s" * 32  # the environment wins
    monkeypatch.setenv("SHOPML_PRIVACY__KEY", "short")
    with pytest.raises(privacy.MissingKey, match="at least 32"):
        privacy.load_key(load_settings())
    monkeypatch.delenv("SHOPML_PRIVACY__KEY")
    from shopml.config import Profile

    prod = settings.model_copy(  # validators do not run on model_copy: only these matter here
        update={"profile": Profile.PRODUCTION, "home": settings.home / "elsewhere"}
    )
    with pytest.raises(privacy.MissingKey, match="SHOPML_PRIVACY__KEY.*existingSecret"):
        privacy.load_key(prod)
    assert not privacy.key_path(prod).exists()  # nothing generated


@pytest.mark.spark
@hsettings(max_examples=1, deadline=None)
@given(ids=st.lists(st.text(min_size=0, max_size=40) | st.none(), min_size=30, max_size=30))
def test_spark_and_serving_hash_every_id_alike(spark, ids):
    """One function on both sides, so the lake and the service always meet: unicode,
    empty and missing ids included (one batch of 30 random ids per run)."""
    from spark_jobs.ingest import pseudonymize

    frame = spark.createDataFrame([(i, u) for i, u in enumerate(ids)], "n int, user_id string")
    got = frame.select("n", pseudonymize(S.USER_ID, KEY.encode()).alias("p")).collect()
    assert {r["n"]: r["p"] for r in got} == {
        i: privacy.pseudonym(KEY.encode(), u) for i, u in enumerate(ids)
    }


def _source(spark, root, users: list[str | None]):
    rows = [
        (u, f"i{n % 3}", "purchase", datetime(2025, 3, 1 + n % 2, 10, n), f"o{n}", None)
        for n, u in enumerate(users)
    ]
    cols = "user_id string, item_id string, event_type string, timestamp timestamp, "
    cols += "session_id string, query string"
    spark.createDataFrame(rows, cols).write.mode("overwrite").parquet(str(root / "events"))
    spark.createDataFrame(
        [(f"i{j}", "t", "c", 1.0) for j in range(3)],
        "item_id string, title string, category string, price double",
    ).write.mode("overwrite").parquet(str(root / "items"))
    return root


@pytest.mark.spark
def test_land_writes_pseudonyms_judges_raw_ids_and_drops_the_forgotten(
    spark, settings, tmp_path, monkeypatch
):
    from shopml.config import LandConfig
    from spark_jobs.jobs import land

    bell, long_id = "bell\x07x", "L" * 200
    users = ["ann"] * 3 + ["bob"] * 2 + [bell, long_id, None]
    s = settings.model_copy(
        update={"land": LandConfig(source=str(_source(spark, tmp_path / "src", users)))}
    )
    pid = privacy.Pseudonymizer.of(s)
    ds = date(2025, 3, 2)
    # bob asked to be forgotten before this run (a rerun or backfill drops him alike)
    monkeypatch.setattr(privacy, "forgotten", lambda _: {pid("bob")})
    counts = land(s, ds, spark=spark)
    assert counts == {"events": 4, "source_rows": 8, "landed": 4, "quarantined": 2,
                      "forgotten": 2, "items": 3, "streamed": 0}  # fmt: skip
    raw = pd.read_parquet(s.paths.raw_events_for(ds))
    assert sorted(raw[S.USER_ID].dropna()) == [pid("ann")] * 3  # pseudonyms only
    assert raw[S.USER_ID].isna().sum() == 1  # left for validation to judge
    quarantined = pd.read_parquet(s.paths.quarantine_for(ds) / "landed_rows")
    assert dict(zip(quarantined[S.USER_ID], quarantined[S.REJECT_REASON], strict=True)) == {
        pid(bell): "id_control_characters",
        pid(long_id): "id_too_long",
    }


def test_forget_removes_the_user_from_every_parquet_file(settings, monkeypatch):
    """Lake and run files of several kinds (Spark-style with a .crc side file, one without
    user ids); the request is recorded once, as the pseudonym. Feast's online rows: the
    SQLite store in tests/test_e2e.py, Redis in tests/test_production.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shopml import feast_store

    asked = []
    monkeypatch.setattr(
        feast_store, "delete_online_rows", lambda _, key, ids: asked.append((key, ids)) or 0
    )
    pid = privacy.Pseudonymizer.of(settings)
    gone, kept = "shopper-1", "shopper-2"
    p = settings.paths
    events = p.raw_events_for("2025-12-31") / "event_date=2025-12-30"
    events.mkdir(parents=True)
    rows = pa.table({S.USER_ID: [pid(u) for u in (gone, kept, gone)], S.ITEM_ID: ["a", "b", "c"]})
    pq.write_table(rows, events / "part-0.parquet")
    (events / ".part-0.parquet.crc").write_bytes(b"stale after a rewrite")
    p.raw_items_for("2025-12-31").mkdir(parents=True)
    pq.write_table(pa.table({S.ITEM_ID: ["a"]}), p.raw_items_for("2025-12-31") / "part-0.parquet")
    p.run("2025-12-31").mkdir(parents=True)
    pq.write_table(pa.table({S.USER_ID: [pid(gone)]}), p.run("2025-12-31") / "users.parquet")

    done = privacy.forget(settings, gone)
    again = privacy.forget(settings, gone)  # idempotent: nothing left to remove

    assert done.user == pid(gone) and asked == [(S.USER_ID, [pid(gone)])] * 2
    assert done.files_rewritten == 2 and done.rows_removed == 2 + 1
    assert again.files_rewritten == 0 and again.rows_removed == 0
    assert pq.read_table(events / "part-0.parquet")[S.USER_ID].to_pylist() == [pid(kept)]
    assert not (events / ".part-0.parquet.crc").exists()
    assert pq.read_table(p.run("2025-12-31") / "users.parquet").num_rows == 0
    assert privacy.forgotten(settings) == {pid(gone)}
    ledger = privacy.ledger_path(settings).read_text()
    assert gone not in ledger and ledger.count("\n") == 1
