"""The whole nightly DAG through Airflow on a slice of the real Instacart data, then serving;
then a corrupted input that must stop at validation and leave the champion alone; then a
rerun of the date that must reproduce it, and a backfill that must not touch it; then the
privacy proofs: no raw user id anywhere in the state, and a user forgotten for good."""

from __future__ import annotations

import json
import shutil
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.airflow_run import log_text
from served_model.ranker import RANKER_FEATURES
from shopml import schema as S
from tests.conftest import PIPELINE_CONF, PIPELINE_DS, PLANTED

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(airflow_pipeline):
    home, airflow, result = airflow_pipeline
    return home, airflow, result


@pytest.fixture
def pipeline_settings(pipeline, monkeypatch):
    from shopml.config import load_settings

    monkeypatch.setenv("SHOPML_HOME", str(pipeline[0]))
    return load_settings()


def test_airflow_records_the_true_run_and_every_task_log(pipeline):
    """Not `airflow dags test`: a real start (not the logical date) and logs the UI reads."""
    from datetime import datetime, timedelta

    home, airflow, result = pipeline
    started = datetime.fromisoformat(result.start_date.replace("Z", "+00:00"))
    assert datetime.now(started.tzinfo) - started < timedelta(hours=2)
    assert 0 < result.seconds < 3600
    assert {t["task_id"] for t in result.tasks if t["state"] == "success"} >= {
        "land", "validate_raw", "train", "evaluate", "promote", "batch_score"
    }  # fmt: skip
    evaluate_log = log_text(airflow.task_log(result.run_id, "evaluate"))
    assert "two_stage" in evaluate_log and "served" in evaluate_log


def test_dag_trains_evaluates_and_promotes_a_champion(pipeline, pipeline_settings):
    from training import registry

    home = pipeline[0]
    run = home / "runs" / "ds=2025-12-31"
    table = pd.DataFrame(json.loads((run / "evaluation.json").read_text())).set_index("model")
    assert {
        "popularity",
        "personal_top_frequency",
        "two_tower",
        "two_tower_int8",
        "two_stage",  # the served path: retrieval + ranker
        "user_knn",  # the zoo models of the `models` Param's default
        "item_knn",
    } <= set(table.index)
    decision = json.loads((run / "promotion.json").read_text())
    assert decision["promoted"] and decision["gate"]["reference"] == "baseline"
    assert decision["gate"]["numbers"]["diff_vs_baseline_ci_low"] > 0
    assert table.loc["two_tower", "ndcg_at_10"] > table.loc["popularity", "ndcg_at_10"]
    assert table.loc["two_stage", "ndcg_at_10"] > table.loc["two_tower", "ndcg_at_10"]
    assert table.loc["two_tower_int8", "size_mb"] < table.loc["two_tower", "size_mb"]
    assert registry.champion_version(pipeline_settings) == "1"
    # the decision is in the ledger, with the gate's numbers
    from training import ledger

    (entry,) = ledger.entries(pipeline_settings)
    assert (entry.action, entry.champion_before, entry.champion_after) == ("gate", None, "1")
    assert entry.promoted and entry.metrics["diff_vs_baseline_ci_low"] > 0
    assert entry.actor.startswith("airflow:nightly_retrain/")
    # the registered version carries what serving needs: index, ranker, candidate tables and
    # the zoo scorers' per-user tables the ranker reads
    manifest = json.loads((run / "serving" / "serving_manifest.json").read_text())
    assert manifest["items"] == len(json.loads((run / "vocab.json").read_text())["items"])
    assert manifest["scores"] == ["ease", "user_knn"] and manifest["format_version"] == 4
    # ... and the configuration the study chose on validation (3 trials: the Param), the
    # settings' first: the ranker's features and the quotas serving will use
    study = json.loads((run / "served_study.json").read_text())
    assert len(study["trials"]) == 3 and study["trials"][0]["ranker"]["features"] == list(
        RANKER_FEATURES
    )
    assert study["best_val_ndcg_at_10"] == max(t["val_ndcg_at_10"] for t in study["trials"]) > 0
    assert study["chosen_trial"] in (0, study["best_trial"]) and study["decision"]
    assert manifest["retrieval"] == study["retrieval"] and manifest["retrieval"]
    assert manifest["ranker"]["features"] == study["ranker"]["features"]
    # the replay's two-tower never saw a replayed basket: its examples end before each
    # user's last train.ranker_rounds (3) training baskets
    from mlkit.splits import split_last_basket

    events = pd.read_parquet(run / "train_events.parquet")
    replayed = []
    for _ in range(3):
        inner = split_last_basket(events)
        replayed.append(inner.test_time)  # per user: the held-out basket's time
        events = inner.train
    first = pd.concat(replayed).groupby(level=0).min()
    seen = pd.read_parquet(run / "earlier" / "train.parquet")
    seen = seen[seen[S.USER_ID].isin(first.index)]  # users with one basket replay none
    assert len(seen) and (seen[S.ENTITY_TIMESTAMP] < seen[S.USER_ID].map(first)).all()
    # the run says whether the served path beats the best other model, with the paired CI
    versus = json.loads((run / "served_vs_best.json").read_text())
    assert versus["best_other"] in table.index and versus["served"] == "two_stage"
    assert versus["diff_ci_low"] <= versus["diff"] <= versus["diff_ci_high"]
    # the ranker beats a constant guess of its positive rate (log-loss = the rate's entropy)
    ranker = json.loads((run / "ranker_loss.json").read_text())
    p = ranker["positive_rate"]
    assert min(e["val_loss"] for e in ranker["curve"]) < -(p * np.log(p) + (1 - p) * np.log(1 - p))
    # with precompute_k, the champion's top-k of every user was written (and put online)
    top = pd.read_parquet(home / "lake" / "recommendations" / "ds=2025-12-31")
    assert set(top["rank"]) == set(range(1, 6)) and set(top["model_version"]) == {"1"}
    assert top[S.USER_ID].nunique() == len(json.loads((run / "vocab.json").read_text())["users"])
    # every stage left its partition of the logical date
    for path in (
        "lake/clean/events/ds=2025-12-31",
        "lake/features/ds=2025-12-31/user",
        "gx/gx/uncommitted/data_docs/local_site/index.html",
    ):
        assert (home / path).exists(), path


def _raw_ids(settings, source: Path, pseudonyms) -> list[str]:
    """The source's raw ids of these pseudonyms, in their order (the state holds only
    pseudonyms; clients send raw ids)."""
    from shopml.privacy import Pseudonymizer

    pseudonym = Pseudonymizer.of(settings)
    raw = pd.read_parquet(source / "events", columns=[S.USER_ID])[S.USER_ID].dropna().unique()
    of = {pseudonym(u): u for u in raw}
    return [of[p] for p in pseudonyms]


def test_serving_answers_known_unknown_and_bad_requests(pipeline_settings, planted_source):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    tested = pd.read_parquet(pipeline_settings.paths.run(PIPELINE_DS) / "test_users.parquet")
    train_users = pd.Series(_raw_ids(pipeline_settings, planted_source, tested[S.USER_ID]))
    assert train_users.str.startswith(PLANTED).all()  # the ids the retailer knows
    with TestClient(create_app(pipeline_settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "model_version": "1"}
        ready = client.get("/readyz").json()
        assert {k: ready[k] for k in ("status", "model_version", "arms")} == {
            "status": "ready",
            "model_version": "1",
            "arms": {"champion": "1"},
        }
        # the ranker serves in the format the compression gate chose, and says so
        compression = pipeline_settings.paths.run(PIPELINE_DS) / "compression/compression.json"
        chosen = json.loads(compression.read_text())["chosen_format"]
        ranker = ready["models"]["champion.ranker"]
        assert ranker["version"] == "1" and ranker["format"] == chosen and ranker["bytes"] > 0
        metrics = client.get("/metrics").text
        assert f'format="{chosen}"' in metrics and "shopml_model_info" in metrics
        known = client.get(f"/recommendations/{train_users.iloc[0]}", params={"k": 5}).json()
        assert known["fallback"] is False and len(known["items"]) == 5
        assert known["model_version"] == "1" and known["arm"] == "champion"
        unknown = client.get("/recommendations/not-a-user").json()
        assert unknown["fallback"] is True and len(unknown["items"]) == 10
        assert unknown["fallback_reason"] == "unknown_user"
        batch = client.post("/recommendations", json={"user_ids": train_users.iloc[:3].tolist()})
        assert [r["fallback"] for r in batch.json()["results"]] == [False] * 3
        item = known["items"][0]["item_id"]
        assert len(client.get(f"/items/{item}/similar", params={"k": 5}).json()["items"]) == 5
        assert client.get("/items/not-an-item/similar").status_code == 404
        bad = client.get(f"/recommendations/{train_users.iloc[0]}", params={"k": 0})
        assert bad.status_code == 422 and "k" in bad.text


def test_corrupted_input_stops_at_validation_and_keeps_champion(
    pipeline, pipeline_settings, tmp_path
):
    from training import registry

    home, airflow, _ = pipeline
    source = tmp_path / "source"
    # a user's own export: Parquet files only, no Hadoop .crc side files or _SUCCESS markers
    plain = shutil.ignore_patterns("*.crc", "_SUCCESS")
    landed = pipeline_settings.paths
    shutil.copytree(landed.raw_events_for(PIPELINE_DS), source / "events", ignore=plain)
    shutil.copytree(landed.raw_items_for(PIPELINE_DS), source / "items", ignore=plain)
    # one day's file with null user ids, and a catalog with negative prices
    day_dir = sorted((source / "events").iterdir())[-5]
    for f in day_dir.glob("*.parquet"):
        table = pq.read_table(f)  # rewritten with its own schema, as the writer would
        nulls = pa.nulls(table.num_rows, type=pa.string())
        table = table.set_column(table.schema.get_field_index(S.USER_ID), S.USER_ID, nulls)
        pq.write_table(table, f)
    items = pd.read_parquet(source / "items")
    items[S.PRICE] = [-1.0 if i % 10 == 0 else 3.5 for i in range(len(items))]
    shutil.rmtree(source / "items")
    (source / "items").mkdir()
    items.to_parquet(source / "items" / "part-0.parquet", index=False)

    result = airflow.run("2026-01-01", {**PIPELINE_CONF, "source": str(source)}, timeout=900)
    assert result.state == "failed"
    states = {t["task_id"]: t["state"] for t in result.tasks}
    assert states["land"] == "success" and states["validate_raw"] == "failed"
    assert states["train"] == "upstream_failed"
    log = log_text(airflow.task_log(result.run_id, "validate_raw"))
    assert "suite 'raw_event_partitions': FAILED" in log, log[-6000:]
    assert "expect_column_values_to_be_between on column 'user_id_null_share'" in log
    assert f"bad partitions: {day_dir.name.split('=')[1]}" in log
    assert "expect_column_values_to_be_between on column 'price'" in log
    quarantine = home / "lake" / "quarantine" / "ds=2026-01-01"
    assert (quarantine / "partitions" / day_dir.name).exists()
    report = json.loads((quarantine / "raw_event_partitions.json").read_text())
    assert report["bad_partitions"] == [day_dir.name.split("=")[1]]
    assert not (home / "runs" / "ds=2026-01-01" / "mlflow_run_id").exists()  # never trained
    assert registry.champion_version(pipeline_settings) == "1"
    from training import ledger

    assert len(ledger.entries(pipeline_settings)) == 1  # no decision was taken


def _rows(path: Path) -> pd.DataFrame:
    """A partition's rows in a stable order (Spark's file split and order may differ)."""
    frame = pd.read_parquet(path)
    frame = frame[sorted(frame.columns)]
    return frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)


def _state(settings) -> dict[str, object]:
    """What a rerun of the date must reproduce, row for row."""
    from served_model.features import OnlineFeatures
    from shopml.feast_store import open_store

    p, ds = settings.paths, PIPELINE_DS
    partitions = {
        "raw_events": p.raw_events_for(ds), "raw_items": p.raw_items_for(ds),
        "clean_events": p.clean_events_for(ds), "clean_items": p.clean_items_for(ds),
        "user_features": p.features_for(ds) / "user", "item_features": p.features_for(ds) / "item",
        "quarantine": p.quarantine_for(ds) / "event_rows",
        "recommendations": p.recommendations_for(ds),
    }  # fmt: skip
    state: dict[str, object] = {name: _rows(path) for name, path in partitions.items()}
    users = sorted(state["clean_events"][S.USER_ID].unique())[:25]
    state["online_users"] = OnlineFeatures(open_store(settings)).users(users)
    table = pd.DataFrame(json.loads((p.run(ds) / "evaluation.json").read_text()))
    table = table[~table["model"].str.startswith("champion_v")].set_index("model")
    state["evaluation"] = table.drop(columns=["latency_ms"])  # wall time: differs by nature
    return state


def test_a_rerun_reproduces_the_date_and_a_backfill_leaves_newer_dates_alone(
    pipeline, pipeline_settings, pipeline_conf
):
    """Rerun 2025-12-31 through Airflow: lake partitions, features, Feast online values,
    top-k lists and the evaluation of every model are identical. What legitimately differs:
    MLflow run ids, the new registry version (the rerun's model is registered as v2 and, being
    equal to the champion, not promoted), wall-clock latencies, and the champion's rows that
    the rerun adds (there was no champion the first time)."""
    from spark_jobs.jobs import clean, land
    from training import ledger, registry

    home, airflow, _ = pipeline
    before = _state(pipeline_settings)
    result = airflow.run(PIPELINE_DS, pipeline_conf, timeout=1500)
    assert result.state == "success", result.table() + airflow.failures(result)
    after = _state(pipeline_settings)
    for name, value in before.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(value, after[name], obj=name)
        else:
            np.testing.assert_array_equal(value, after[name], err_msg=name)
    assert registry.champion_version(pipeline_settings) == "1"
    assert ledger.entries(pipeline_settings)[-1].promoted is False  # equal is not better

    # a backfill of an older date writes its own partitions and leaves 2025-12-31's alone
    from shopml.config import LandConfig

    older = pipeline_settings.model_copy(
        update={"land": LandConfig(source=pipeline_conf["source"], max_users=100)}
    )
    land(older, date(2025, 12, 20))
    clean(older, date(2025, 12, 20))
    assert (home / "lake" / "clean" / "events" / "ds=2025-12-20").exists()
    untouched = _state(pipeline_settings)
    for name in ("raw_events", "clean_events", "quarantine"):
        pd.testing.assert_frame_equal(after[name], untouched[name], obj=name)


def _files_holding(root: Path, needle: str) -> list[str]:
    """Files under ``root`` whose content holds ``needle``: Parquet decoded (its pages are
    compressed), zip archives (torch checkpoints, MLflow's) and gzip opened, every other
    file searched byte for byte (SQLite databases, JSON, logs, pickles, indexes)."""
    import gzip
    import zipfile

    found, raw = [], needle.encode()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if f.suffix == ".parquet" or f.name.endswith(".parquet.forget"):
            table = pq.read_table(f, partitioning=None)
            text = " ".join(str(c.to_pylist()) for c in table.columns)
            hit = needle in text
        else:
            data = f.read_bytes()
            hit = raw in data
            if not hit and zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    hit = any(raw in z.read(n) for n in z.namelist())
            if not hit and data[:2] == b"\x1f\x8b":
                hit = raw in gzip.decompress(data)
        if hit:
            found.append(str(f.relative_to(root)))
    return found


def test_no_raw_user_id_is_anywhere_in_the_state(pipeline, pipeline_settings, planted_source):
    """Every raw id of the run's source holds ``Zq9planted``: after the DAG runs (and reruns)
    nothing under SHOPML_HOME holds it (the lake, quarantine, features, Feast's online store
    and registry, the MLflow database and artifacts, GX's reports, the Airflow database and
    every task log), while the pseudonyms are there for the same search to find."""
    home = pipeline[0]
    assert not _files_holding(home, PLANTED)
    tested = pd.read_parquet(pipeline_settings.paths.run(PIPELINE_DS) / "test_users.parquet")
    pseudonym = tested[S.USER_ID].iloc[0]
    holding = _files_holding(home, pseudonym)
    assert any(f.startswith("lake/raw/events/") for f in holding), holding  # the search works
    assert any(f.startswith("mlflow/") for f in holding), holding
    assert _raw_ids(pipeline_settings, planted_source, [pseudonym])[0].startswith(PLANTED)


def test_a_forgotten_user_leaves_the_lake_feast_and_every_later_land(
    pipeline_settings, planted_source
):
    """``shopml forget`` on the served run: the user's rows leave every partition, their
    online features and precomputed list go, and a later land drops them while keeping
    everyone else."""
    from typer.testing import CliRunner

    from cli.main import app
    from served_model.features import OnlineFeatures
    from shopml.config import LandConfig
    from shopml.feast_store import open_store
    from spark_jobs.jobs import land

    s = pipeline_settings
    tested = pd.read_parquet(s.paths.run(PIPELINE_DS) / "test_users.parquet")[S.USER_ID]
    user = tested.iloc[1]
    (raw,) = _raw_ids(s, planted_source, [user])
    lake = s.paths.lake
    assert _files_holding(lake, user)
    store = open_store(s)
    assert np.isfinite(OnlineFeatures(store).users([user])).all()

    out = CliRunner().invoke(app, ["forget", "--user", raw])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["user"] == user and summary["rows_removed"] > 0
    assert summary["online_rows_removed"] > 0
    assert not _files_holding(lake, user)
    assert np.isnan(OnlineFeatures(store).users([user])).all()
    lists = store.get_online_features(
        features=["user_recommendations:recommended_items"], entity_rows=[{S.USER_ID: user}]
    ).to_dict()
    assert lists["recommended_items"] == [None]

    # a later land (here a backfill; a rerun of a date goes through the same land) drops
    # them and keeps everyone else
    source = LandConfig(source=str(planted_source), max_users=PIPELINE_CONF["max_users"])
    day = date(2025, 12, 25)
    counts = land(s.model_copy(update={"land": source}), day)
    assert counts["forgotten"] > 0
    users = set(pd.read_parquet(s.paths.raw_events_for(day))[S.USER_ID])
    assert user not in users and tested.iloc[2] in users
    assert not _files_holding(lake, user)


def test_intraday_update_learns_streamed_purchases_and_the_nightly_gate_settles_it(
    pipeline_settings,
):
    """The held-out baskets of the shared run, streamed again as the next day's purchases:
    the champion's two-tower warm-starts on the morning's, is judged on the afternoon's,
    is registered and (unless worse) becomes the challenger; a rerun cuts the same events;
    the nightly gate then settles it."""
    import torch

    from shopml.stream import stream_of
    from training import intraday, ledger, registry

    s = pipeline_settings
    s = s.model_copy(update={
        "intraday": s.intraday.model_copy(update={"eval_hours": 12.0, "epochs": 2}),
        "train": s.train.model_copy(update={"workers": 1}),
    })  # fmt: skip
    champion = registry.champion_version(s)
    baskets = pd.read_parquet(s.paths.run(PIPELINE_DS) / "test.parquet")
    hour = {u: i % 24 for i, u in enumerate(sorted(baskets[S.USER_ID].unique()))}
    day = pd.Timestamp("2026-01-01", tz="UTC")
    events = [
        {S.USER_ID: u, S.ITEM_ID: str(item), S.EVENT_TYPE: S.PURCHASE, S.SESSION_ID: f"{u}-next",
         S.QUERY: None,
         S.TIMESTAMP: int((day + pd.Timedelta(hours=hour[u], seconds=i)).timestamp() * 1e6)}
        for i, (u, item) in enumerate(zip(baskets[S.USER_ID], baskets[S.ITEM_ID], strict=True))
    ]  # fmt: skip
    stream_of(s).append(events)
    until = datetime(2026, 1, 2, tzinfo=intraday.UTC)

    out = intraday.run(s, until)
    assert out["window"]["events"] == len(events)
    morning = sum(hour[e[S.USER_ID]] < 12 for e in events)
    assert out["warm_start"]["purchases"] == morning > 0
    assert out["warm_start"]["examples"] == morning  # every user and item is known
    run_dir = s.paths.intraday_run(until)
    before = torch.load(run_dir / intraday.CHAMPION_MODEL, weights_only=False)
    after = torch.load(run_dir / intraday.UPDATE_MODEL, weights_only=False)
    assert not torch.equal(before.user_emb.weight, after.user_emb.weight)  # it learnt
    result = out["challenger"]
    assert result["judged_users"] == len({u for u, h in hour.items() if h >= 12})
    version = result["version"]
    tags = registry.version_tags(s, version)
    assert tags["warm_start_of"] == champion and tags["intraday_gate"] == result["intraday_gate"]
    assert tags["data_end"] == "2026-01-01T12:00:00+00:00"
    expected = version if result["challenger"] else None
    assert registry.alias_version(s, registry.CHALLENGER) == expected
    assert ledger.entries(s)[-1].action == "challenger"
    # a rerun of the hour cuts the same events from the archive (exactly once)
    assert intraday.stream_window(s, until)["events"] == len(events)

    with ledger.alias_lock(s):
        intraday.settle_challenger(s, date(2026, 1, 1), None)
    assert registry.alias_version(s, registry.CHALLENGER) is None
    promoted = result["challenger"] and result["intraday_gate"] == "promote"
    assert registry.champion_version(s) == (version if promoted else champion)
