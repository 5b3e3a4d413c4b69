"""The recommendation service on a small synthetic deployment: real Feast (SQLite online
store), real MLflow registry, real faiss index; the same code as ``shopml serve``."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from shopml import schema as S
from tests.fuzz import MAX_EXAMPLES, fuzz

pytestmark = pytest.mark.integration
_REORDER_COLUMN = S.ITEM_FEATURES.index(S.ITEM_REORDER_RATE)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """(settings, synthetic deployment); the environment is restored afterwards as a whole
    (open_store and MLflow export variables later tests must not inherit)."""
    from serving.synthetic import deploy
    from shopml.config import load_settings

    saved = dict(os.environ)
    os.environ["SHOPML_HOME"] = str(tmp_path_factory.mktemp("serving"))
    os.environ["SHOPML_SERVING__RELOAD_INTERVAL_S"] = "0"
    os.environ["SHOPML_SERVING__ITEM_FEATURE_REFRESH_S"] = "0"
    try:
        settings = load_settings()
        yield settings, deploy(settings, n_users=120, n_items=400, n_categories=4, per_user=16)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client(deployment):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    with TestClient(create_app(deployment[0])) as c:
        yield c


def _with(settings, **serving):
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=serving)})


def _engine(client, **serving):
    """A second engine over the served version with other serving settings."""
    from served_model.engine import TwoStage

    served = client.app.state.holder.arms["champion"].engine
    engine = TwoStage(served.bundle, served.features, served.cfg.model_copy(update=serving))
    engine.refresh_item_features()
    return engine


def _metric(client, line_start: str) -> float:
    """Sum of the exposed samples whose line starts with ``line_start``."""
    lines = client.get("/metrics").text.splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(line_start))


def test_known_user_gets_a_ranked_two_stage_answer(client, deployment):
    from serving.app import Recommendations

    _, dep = deployment
    stages = ("features", "retrieval", "filter", "ranking")
    before = [_metric(client, f'shopml_stage_seconds_count{{stage="{s}"}}') for s in stages]
    r = client.get(f"/recommendations/{dep.user_ids[0]}", params={"k": 7})
    assert r.status_code == 200
    body = r.json()
    Recommendations.model_validate(body, strict=True)  # the documented response model
    assert "Recommendations" in client.get("/openapi.json").json()["components"]["schemas"]
    assert body["fallback"] is False and body["fallback_reason"] is None
    assert body["model_version"] == dep.version and body["arm"] == "champion"
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == len(set(items)) == 7
    assert set(items) <= set(dep.item_ids)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    after = [_metric(client, f'shopml_stage_seconds_count{{stage="{s}"}}') for s in stages]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]


def test_explain_gives_each_item_its_source_and_the_rankers_reasons(client, deployment):
    """``?explain=true``: every item says which source found it, with that source's evidence
    (a bought item says how often), then the ranker's strongest attributions; the items
    and scores are those of the plain answer."""
    from serving.app import Recommendations

    _, dep = deployment
    raw = dep.user_ids[3]
    plain = client.get(f"/recommendations/{raw}", params={"k": 8}).json()
    r = client.get(f"/recommendations/{raw}", params={"k": 8, "explain": "true"})
    assert r.status_code == 200
    body = r.json()
    Recommendations.model_validate(body, strict=True)
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in plain["items"]]
    assert "reasons" not in plain["items"][0]
    bought = dep.purchases.loc[dep.purchases[S.USER_ID] == raw, S.ITEM_ID].value_counts()
    from served_model.engine import SOURCES

    for item in body["items"]:
        first, *ranker = item["reasons"]
        assert first["kind"] == "source" and first["source"] in SOURCES
        if item["item_id"] in bought.index:
            times = int(bought[item["item_id"]])
            assert first["text"].startswith(
                f"you bought it {'once' if times == 1 else f'{times} times'}"
            ), first
        assert len(ranker) <= 2 and all(x["kind"] == "ranker" and x["effect"] > 0 for x in ranker)
    assert any(item["reasons"][1:] for item in body["items"])  # the ranker explains some
    batch = client.post(
        "/recommendations", json={"user_ids": [raw], "k": 8, "explain": True}
    ).json()["results"][0]
    assert batch["items"] == body["items"]
    # batch scoring writes the same reasons, as JSON, when asked
    import json

    from serving.batch import REASONS, score_users

    top = score_users(_engine(client), [dep.pseudonym(raw)], 8, explain=True)
    assert [json.loads(r) for r in top[REASONS]] == [i["reasons"] for i in body["items"]]
    assert REASONS not in score_users(_engine(client), [dep.pseudonym(raw)], 8)


def test_feature_ablation_attributes_a_logit_to_the_group_that_moves_it():
    """``served_model.explain.attributions`` on a ranker whose logit is twice the purchase
    count: the history group carries the whole difference to the baseline, the others 0."""
    import torch

    from served_model.explain import attributions
    from served_model.ranker import FEATURE_GROUPS, PRIOR_PURCHASES, RANKER_FEATURES

    col = RANKER_FEATURES.index(PRIOR_PURCHASES)

    class Doubles:
        feature_names = RANKER_FEATURES

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * x[:, col]

    rows = np.random.default_rng(0).random((3, len(RANKER_FEATURES)), dtype=np.float32)
    rows[:, col] = [3.0, 1.0, 0.0]
    base = rows.mean(axis=0)
    effects = attributions(Doubles(), rows, base)
    history = list(FEATURE_GROUPS).index("history")
    np.testing.assert_allclose(effects[:, history], 2.0 * (rows[:, col] - base[col]), rtol=1e-5)
    assert np.abs(np.delete(effects, history, axis=1)).max() == 0


def test_candidates_come_from_every_source_and_are_capped(client, deployment):
    from served_model.engine import SOURCES, TwoStage

    user = deployment[1].pseudonym(deployment[1].user_ids[1])  # the engine's id
    ranked = _engine(client).recommend(user, 10)
    assert all(ranked.candidates[s] > 0 for s in SOURCES), ranked.candidates
    assert 0 < ranked.candidates["ranked"] <= 200
    assert ranked.candidates["ann"] == 120  # the faiss index returned its quota
    few = _engine(client, max_candidates=5).recommend(user, 10)
    assert few.candidates["ranked"] == 5 and len(few.items) == 5
    # a user whose items have no co-purchase neighbours is still ranked
    engine = _engine(client)
    tables = replace(engine.bundle.tables, knn_idx=np.full_like(engine.bundle.tables.knn_idx, -1))
    lonely = TwoStage(replace(engine.bundle, tables=tables), engine.features, engine.cfg)
    lonely.refresh_item_features()
    ranked = lonely.recommend(user, 10)
    assert (
        ranked.fallback is None and ranked.candidates["item_knn"] == 0 and len(ranked.items) == 10
    )


def test_bought_items_come_back_only_when_reorderable(client, deployment):
    """Of the items a user bought, only those whose item_reorder_rate (Feast) is above the
    threshold are offered again; items never bought are not affected."""
    _, dep = deployment
    raw = dep.user_ids[2]
    user = dep.pseudonym(raw)  # the engine's id
    engine = _engine(client)
    rate = dict(zip(engine.item_ids, engine.item_features[:, _REORDER_COLUMN], strict=True))
    bought = set(dep.purchases.loc[dep.purchases[S.USER_ID] == raw, S.ITEM_ID])
    threshold = float(np.median([rate[i] for i in bought]))
    low = {i for i in bought if rate[i] <= threshold}
    high = bought - low
    assert low and high, "the threshold splits the user's items"
    everything = {i for i, _ in engine.recommend(user, 1000).items}
    assert low & everything and high & everything  # all reorderable at the default, 0
    strict = _engine(client, reorder_min_rate=threshold).recommend(user, 1000).items
    served = {i for i, _ in strict}
    assert not served & low and high & served
    assert (everything - bought) <= served  # never-bought candidates stay


def test_items_out_of_the_catalog_are_never_served(client, deployment):
    from served_model.engine import TwoStage

    user = deployment[1].pseudonym(deployment[1].user_ids[3])  # the engine's id
    engine = _engine(client)
    first = [i for i, _ in engine.recommend(user, 20).items]
    tables = engine.bundle.tables
    in_catalog = tables.in_catalog.copy()
    removed = first[:5] + [engine.item_ids[i] for i in tables.recent_popular[:3]]
    in_catalog[[engine.item_pos[i] for i in removed]] = False
    bundle = replace(engine.bundle, tables=replace(tables, in_catalog=in_catalog))
    delisted = TwoStage(bundle, engine.features, engine.cfg)
    delisted.refresh_item_features()
    assert not {i for i, _ in delisted.recommend(user, 20).items} & set(removed)
    assert not {i for i, _ in delisted.popular(20)} & set(removed)


def test_unknown_user_gets_recent_popularity_optionally_by_category(client, deployment):
    _, dep = deployment
    p = dep.purchases
    recent = p[p[S.TIMESTAMP] >= p[S.TIMESTAMP].max() - pd.Timedelta(days=30)]
    counts = recent[S.ITEM_ID].value_counts()
    body = client.get("/recommendations/somebody-new", params={"k": 5}).json()
    assert body["fallback"] is True and body["fallback_reason"] == "unknown_user"
    served = [i["item_id"] for i in body["items"]]
    assert sorted(counts.reindex(served).fillna(0), reverse=True) == counts.iloc[:5].tolist()

    in_cat = set(dep.catalog.loc[dep.catalog[S.CATEGORY] == "cat-1", S.ITEM_ID])
    body = client.get("/recommendations/somebody-new", params={"k": 5, "category": "cat-1"})
    served = [i["item_id"] for i in body.json()["items"]]
    assert len(served) == 5 and set(served) <= in_cat
    cat_counts = counts[counts.index.isin(in_cat)]
    assert (
        sorted(cat_counts.reindex(served).fillna(0), reverse=True) == cat_counts.iloc[:5].tolist()
    )
    unknown_cat = client.get("/recommendations/somebody-new", params={"category": "nope"})
    assert unknown_cat.status_code == 200 and len(unknown_cat.json()["items"]) == 10


def test_similar_items_and_a_404_for_an_unknown_item(client, deployment):
    _, dep = deployment
    body = client.get("/items/item-0/similar", params={"k": 6}).json()
    similar = [i["item_id"] for i in body["items"]]
    assert body["model_version"] == dep.version
    assert len(similar) == 6 and "item-0" not in similar and set(similar) <= set(dep.item_ids)
    missing = client.get("/items/no-such-item/similar")
    assert missing.status_code == 404
    assert "no-such-item" in missing.json()["detail"] and "not in the catalog" in missing.text


@pytest.mark.parametrize(
    ("method", "path", "params", "field"),
    [
        ("get", "/recommendations/u1", {"k": 0}, "k"),
        ("get", "/recommendations/u1", {"k": 1001}, "k"),
        ("get", "/recommendations/" + "x" * 129, {}, "user_id"),
        ("get", "/recommendations/a%20b", {}, "user_id"),
        ("get", "/items/item-0/similar", {"k": 5000}, "k"),
        ("post", "/recommendations", {"user_ids": []}, "user_ids"),
        ("post", "/recommendations", {"user_ids": [f"u{i}" for i in range(1001)]}, "user_ids"),
        ("post", "/recommendations", {"user_ids": ["u1"], "k": 0}, "k"),
        ("post", "/recommendations", {"user_ids": ["x" * 200]}, "user_ids.0"),
    ],
)
def test_bad_parameters_are_422_with_a_clear_message(client, method, path, params, field):
    before = _metric(client, "shopml_errors_total{")
    r = client.get(path, params=params) if method == "get" else client.post(path, json=params)
    assert r.status_code == 422, r.text
    assert any(field in line for line in r.json()["detail"]), r.json()
    assert _metric(client, "shopml_errors_total{") == before + 1


def test_batch_answers_match_single_answers(client, deployment):
    from serving.app import BatchRecommendations

    users = [*deployment[1].user_ids[:3], "somebody-new"]
    body = client.post("/recommendations", json={"user_ids": users, "k": 4}).json()
    BatchRecommendations.model_validate(body, strict=True)
    assert [r["user_id"] for r in body["results"]] == users
    for result in body["results"]:
        single = client.get(f"/recommendations/{result['user_id']}", params={"k": 4}).json()
        assert result["items"] == single["items"]
        assert result["model_version"] == single["model_version"]
    assert body["results"][-1]["fallback_reason"] == "unknown_user"


def test_metrics_expose_latency_stages_candidates_and_version(client, deployment):
    unknown = 'shopml_fallbacks_total{arm="champion",reason="unknown_user"}'
    before = _metric(client, unknown)
    client.get(f"/recommendations/{deployment[1].user_ids[0]}")
    client.get("/recommendations/somebody-new")
    text = client.get("/metrics").text
    assert 'shopml_request_seconds_bucket{arm="champion",endpoint="recommendations"' in text
    assert 'shopml_candidates_count{source="ann"}' in text
    assert 'shopml_candidates_count{source="ranked"}' in text
    version = _metric(client, 'shopml_model_version{alias="champion"}')
    assert version == float(deployment[1].version)
    assert _metric(client, unknown) == before + 1


def test_request_logs_are_json_lines(client, deployment, caplog):
    from serving.observability import JsonFormatter

    with caplog.at_level(logging.INFO, logger="serving.app"):
        client.get(f"/recommendations/{deployment[1].user_ids[0]}", params={"k": 3})
    record = next(r for r in caplog.records if r.getMessage() == "recommend")
    line = json.loads(JsonFormatter().format(record))
    # the user's pseudonym (the lake's id), never the raw id the client sent; no address
    user = deployment[1].user_ids[0]
    assert line["msg"] == "recommend" and line["user_id"] == deployment[1].pseudonym(user)
    assert user not in json.dumps(line) and "client" not in line and "testclient" not in str(line)
    assert line["arm"] == "champion" and line["fallback"] is None
    assert set(line["stages_ms"]) == {"features", "retrieval", "filter", "ranking"}


def test_the_request_log_names_the_client_only_where_allowed(deployment, caplog):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.observability import JsonFormatter

    settings, dep = deployment
    allowed = settings.privacy.model_copy(update={"log_client_ip": True})
    app = create_app(settings.model_copy(update={"privacy": allowed}))
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="serving.app"):
        client.get(f"/recommendations/{dep.user_ids[0]}")
    record = next(r for r in caplog.records if r.getMessage() == "recommend")
    assert json.loads(JsonFormatter().format(record))["client"] == "testclient"


def test_feast_or_index_unavailable_degrades_to_popularity_and_is_counted(deployment):
    from fastapi.testclient import TestClient

    from served_model.features import OnlineFeatures
    from serving.app import create_app
    from shopml.feast_store import open_store

    settings, dep = deployment
    # the same registry, but an online store path that is a directory: every read fails
    broken = settings.model_copy(
        update={
            "home": settings.paths.home / "broken",
            "feast": settings.feast.model_copy(update={"registry": settings.feast_registry}),
        }
    )
    (broken.paths.feast / "online.db").mkdir(parents=True, exist_ok=True)
    user = dep.user_ids[0]
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.holder.arms["champion"].engine
        served = engine.features
        engine.features = OnlineFeatures(open_store(broken))
        reason = 'shopml_fallbacks_total{arm="champion",reason="feast_unavailable"}'
        before = _metric(client, reason)
        r = client.get(f"/recommendations/{user}", params={"k": 5})
        assert r.status_code == 200
        assert r.json()["fallback_reason"] == "feast_unavailable" and len(r.json()["items"]) == 5
        batch = client.post("/recommendations", json={"user_ids": [user, dep.user_ids[1]]})
        assert {x["fallback_reason"] for x in batch.json()["results"]} == {"feast_unavailable"}
        assert _metric(client, reason) == before + 3

        engine.features = served
        engine.bundle = replace(engine.bundle, index=None)
        r = client.get(f"/recommendations/{user}")
        assert r.status_code == 200 and r.json()["fallback_reason"] == "index_unavailable"
        similar = client.get("/items/item-0/similar")
        assert similar.status_code == 200 and len(similar.json()["items"]) == 10


def test_arm_of_is_stable_and_follows_the_share():
    from serving.models import arm_of

    users = [f"shopper-{i}" for i in range(4000)]
    assert {arm_of(u, 0.0) for u in users} == {"champion"}
    assert {arm_of(u, 1.0) for u in users} == {"challenger"}
    share = np.mean([arm_of(u, 0.3) == "challenger" for u in users])
    assert 0.27 < share < 0.33
    assert [arm_of(u, 0.3) for u in users] == [arm_of(u, 0.3) for u in users]


def test_ab_split_serves_the_challenger_to_its_share(deployment):
    from fastapi.testclient import TestClient
    from mlflow import MlflowClient

    from serving.app import create_app
    from serving.models import arm_of
    from serving.synthetic import register_version

    settings, dep = deployment
    challenger = register_version(settings, dep.catalog, dep.purchases, 32, 1, "challenger")
    try:
        with TestClient(create_app(_with(settings, challenger_share=0.5))) as client:
            assert client.get("/readyz").json()["arms"] == {
                "champion": dep.version,
                "challenger": challenger,
            }
            arms = {}
            for user in dep.user_ids[:60]:
                body = client.get(f"/recommendations/{user}").json()
                expected = arm_of(dep.pseudonym(user), 0.5)  # split on the lake's id
                assert body["arm"] == expected
                assert body["model_version"] == (
                    challenger if expected == "challenger" else dep.version
                )
                arms[user] = body["arm"]
            assert 10 < sum(a == "challenger" for a in arms.values()) < 50
            again = client.post("/recommendations", json={"user_ids": list(arms)}).json()
            assert {r["user_id"]: r["arm"] for r in again["results"]} == arms
            text = client.get("/metrics").text
            assert (
                'shopml_request_seconds_count{arm="challenger",endpoint="recommendations"}' in text
            )
    finally:
        MlflowClient().delete_registered_model_alias(settings.model_name, "challenger")


def test_hot_reload_switches_versions_without_failing_requests(deployment):
    """Move the champion alias while requests are running: the background check loads the new
    version and swaps it in; no request fails and each answer names one of the two versions."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.synthetic import register_version
    from training import registry

    settings, dep = deployment
    new = register_version(settings, dep.catalog, dep.purchases, 32, 2, alias=None)
    fast = _with(settings, reload_interval_s=0.2, item_feature_refresh_s=0.5)
    loaded = 'shopml_model_reloads_total{alias="champion",outcome="loaded"}'
    refreshed = 'shopml_item_feature_refreshes_total{outcome="ok"}'
    try:
        with TestClient(create_app(fast)) as client:
            loads, refreshes = _metric(client, loaded), _metric(client, refreshed)

            def ask(i: int) -> tuple[int, str]:
                r = client.get(f"/recommendations/{dep.user_ids[i % 50]}")
                return r.status_code, r.json().get("model_version")

            with ThreadPoolExecutor(4) as pool:
                early = pool.map(ask, range(40))
                registry.set_champion(settings, new)
                deadline, during = time.time() + 60, []
                while client.get("/readyz").json()["model_version"] != new:
                    assert time.time() < deadline, "the new champion was never loaded"
                    during += pool.map(ask, range(8))
                late = list(pool.map(ask, range(40)))
            answers = [*early, *during, *late]
            assert {status for status, _ in answers} == {200}
            assert {version for _, version in answers} <= {dep.version, new}
            assert {version for _, version in late} == {new}
            assert not list(settings.paths.home.glob("serving-v*"))  # downloads are not kept
            assert _metric(client, loaded) == loads + 1  # the switch, and nothing else
            while _metric(client, refreshed) == refreshes:  # the background item-feature read
                assert time.time() < deadline, "item features were never refreshed"
                time.sleep(0.1)
    finally:
        registry.set_champion(settings, dep.version)


def test_batch_scoring_writes_parquet_and_the_online_store(deployment):
    from serving.batch import batch_score
    from serving.synthetic import DS
    from shopml.feast_store import open_store

    settings, dep = deployment
    first = batch_score(settings, DS, k=5, to_online=True)
    again = batch_score(settings, DS, k=5, to_online=True)  # a rerun replaces the partition
    assert first == again
    out = settings.paths.recommendations / f"ds={DS.isoformat()}"
    assert [p.name for p in out.iterdir()] == ["part-0.parquet"]
    top = pd.read_parquet(out)
    assert len(top) == 5 * len(dep.user_ids) == first["rows"]
    assert set(top.groupby(S.USER_ID)["rank"].apply(tuple)) == {(1, 2, 3, 4, 5)}
    assert set(top["model_version"]) == {dep.version}
    user = dep.pseudonym(dep.user_ids[4])  # what the lake and Feast hold
    row = (
        open_store(settings)
        .get_online_features(
            features=[
                "user_recommendations:recommended_items",
                "user_recommendations:model_version",
            ],
            entity_rows=[{"user_id": user}],
        )
        .to_dict()
    )
    expected = top[top[S.USER_ID] == user].sort_values("rank")[S.ITEM_ID].tolist()
    assert row["recommended_items"][0] == expected
    assert row["model_version"][0] == dep.version


def test_each_apps_metrics_start_at_zero_even_in_prometheus_multiprocess_mode(
    tmp_path, monkeypatch
):
    """Feast's metrics module switches prometheus_client to file-backed values shared by name;
    the service's own metrics stay per app (one process per pod)."""
    from prometheus_client import values

    from serving.observability import Metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    first = Metrics()
    first.fallbacks.labels("unknown_user", "champion").inc(3)
    second = Metrics()
    second.fallbacks.labels("unknown_user", "champion").inc()
    line = 'shopml_fallbacks_total{arm="champion",reason="unknown_user"} '
    assert line + "1.0" in second.exposition().decode()
    assert line + "3.0" in first.exposition().decode()


def test_a_version_without_serving_artifacts_is_refused_and_the_old_one_kept(
    deployment, monkeypatch
):
    """A champion registered before two-stage serving (weights only) cannot serve: a running
    service keeps its version, counts the failure and tries again only after a while (a
    registry that was unreachable comes back); a starting one says why it cannot."""
    from fastapi.testclient import TestClient

    from served_model.two_tower import TwoTower
    from serving import models
    from serving.app import create_app
    from serving.models import load_arm
    from training import registry

    settings, dep = deployment
    users = [dep.pseudonym(u) for u in dep.user_ids]
    bare = TwoTower(users, dep.item_ids, dep.item_ids[:10], dim=8)
    run_id = registry.start_run(settings, "2025-12-31", {"bare": True})
    version = registry.register(settings, registry.log_model(settings, run_id, bare, "m"), run_id)
    with pytest.raises(RuntimeError, match=f"version {version} .* lacks its serving artifacts"):
        load_arm(settings, "champion", version)
    try:
        with TestClient(create_app(settings)) as client:
            holder = client.app.state.holder
            failed = 'shopml_model_reloads_total{alias="champion",outcome="failed"}'
            before = _metric(client, failed)
            registry.set_champion(settings, version)
            assert holder.sync() == []
            assert _metric(client, failed) == before + 1
            assert holder.sync() == [] and _metric(client, failed) == before + 1  # not at once
            later = models._now() + models.RETRY_FIRST_S + 1
            monkeypatch.setattr(models, "_now", lambda: later)
            assert holder.sync() == [] and _metric(client, failed) == before + 2  # tried again
            assert client.get("/readyz").json()["model_version"] == dep.version
        with (
            pytest.raises(RuntimeError, match="no loadable 'champion'"),
            TestClient(create_app(settings)),
        ):
            pass
    finally:
        registry.set_champion(settings, dep.version)


def test_feast_down_while_a_version_loads_serves_fallbacks_until_a_refresh(deployment, monkeypatch):
    """Item features unreadable at load: the version still starts (popularity fallback,
    reason item_features_unavailable), and the next successful refresh restores ranking."""
    from fastapi.testclient import TestClient

    from served_model.features import FeaturesUnavailable, OnlineFeatures
    from serving.app import create_app

    settings, dep = deployment
    read_items = OnlineFeatures.items

    def down(self, item_ids):
        raise FeaturesUnavailable("ConnectionError: the online store is down")

    monkeypatch.setattr(OnlineFeatures, "items", down)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        body = client.get(f"/recommendations/{dep.user_ids[0]}").json()
        assert body["fallback_reason"] == "item_features_unavailable" and len(body["items"]) == 10
        monkeypatch.setattr(OnlineFeatures, "items", read_items)
        client.app.state.holder.refresh_item_features()
        body = client.get(f"/recommendations/{dep.user_ids[0]}").json()
        assert body["fallback"] is False


def test_shopml_serve_with_two_workers_answers_and_adds_up_their_metrics(deployment, tmp_path):
    """`shopml serve --workers 2`: two processes behind one port; /metrics counts the
    requests of both (Prometheus multiprocess files), whichever worker is scraped."""
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx
    import psutil

    settings, dep = deployment
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("wb")
    shopml = str(Path(sys.executable).with_name("shopml"))
    proc = subprocess.Popen(
        [shopml, "serve", "--workers", "2", "--port", str(port)],
        env={**os.environ, "SHOPML_HOME": str(settings.paths.home)},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the workers never became ready"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "python" in p.name() or "shopml" in " ".join(p.cmdline())]  # fmt: skip
        assert len(workers) >= 2
        for user in dep.user_ids[:30]:  # a new connection each: both workers get some
            r = httpx.get(f"{base}/recommendations/{user}", headers={"Connection": "close"})
            assert r.status_code == 200 and r.json()["fallback"] is False
        lines = httpx.get(f"{base}/metrics").text.splitlines()
        count = 'shopml_request_seconds_count{arm="champion",endpoint="recommendations"}'
        assert sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(count)) == 30
        assert f'shopml_model_version{{alias="champion"}} {float(dep.version)}' in lines

        # Slow clients hold sockets, not compute threads (serving.threads is 1): while 8
        # connections trickle their headers and 8 their bodies, a byte every 0.2 s, every
        # other request still answers.
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
        body = b'{"user_ids": ["%s"], "k": 3}' % dep.user_ids[0].encode()
        head = (b"POST /recommendations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        for conn in slow[8:]:
            conn.sendall(head)  # the headers whole, the body to come
        try:
            for step in range(10):
                for conn in slow[:8]:
                    conn.sendall(head[step : step + 1])
                for conn in slow[8:]:
                    conn.sendall(body[step : step + 1])
                r = httpx.get(f"{base}/recommendations/{dep.user_ids[step]}", timeout=5)
                assert r.status_code == 200 and r.json()["fallback"] is False
                time.sleep(0.2)
        finally:
            for conn in slow:
                conn.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_readyz_and_metrics_show_each_served_models_format_and_size(client):
    """The ranker's format, bytes and parameters as the bundle's manifest registered them."""
    ready = client.get("/readyz").json()
    ranker = ready["models"]["champion.ranker"]
    engine = client.app.state.holder.arms["champion"].engine
    assert ranker["format"] == engine.bundle.ranker_info["format"]
    assert ranker["bytes"] > 0 and ranker["params"] > 0
    assert ranker["version"] == ready["model_version"]
    line = f'shopml_model_info{{format="{ranker["format"]}",model="champion.ranker"}}'
    assert _metric(client, line) == ranker["bytes"]


def test_a_slow_search_or_batch_does_not_hold_up_single_recommendations(client, deployment):
    """Search and batches compute on their own threads: while a search and a batch are both
    stuck in their engines, a single-user recommendation still answers."""
    import threading

    from served_model.search import SearchResult
    from serving.models import SearchArm

    _, dep = deployment
    holder = client.app.state.holder
    entered, release = threading.Barrier(3), threading.Event()

    class StuckSearch:
        def search(self, *_: object, **__: object) -> SearchResult:
            entered.wait(timeout=30)
            release.wait(timeout=30)
            return SearchResult(query="dress", items=[], facets={})

    engine = holder.arms["champion"].engine
    recommend_many = engine.recommend_many

    def stuck_batch(users: list[str], *args: object) -> object:
        entered.wait(timeout=30)
        release.wait(timeout=30)
        return recommend_many(users, *args)

    saved, holder._search = holder._search, SearchArm("1", StuckSearch())
    engine.recommend_many = stuck_batch  # the batch endpoint's engine call
    try:
        with ThreadPoolExecutor(2) as pool:
            slow_search = pool.submit(client.get, "/search", params={"q": "dress"})
            slow_batch = pool.submit(
                client.post, "/recommendations", json={"user_ids": dep.user_ids[:2]}
            )
            entered.wait(timeout=30)  # both are inside their engines now
            del engine.recommend_many  # single users answer through the real engine
            r = client.get(f"/recommendations/{dep.user_ids[0]}")
            assert r.status_code == 200 and not slow_search.done() and not slow_batch.done()
            release.set()
            assert slow_search.result(timeout=30).status_code == 200
            assert slow_batch.result(timeout=30).status_code == 200
    finally:
        release.set()
        holder._search = saved
        engine.__dict__.pop("recommend_many", None)


def test_the_ann_memo_answers_like_a_fresh_search_and_misses_on_a_changed_feature_row(
    client, deployment
):
    """Memoised answers and ANN candidates are the ones computed afresh, for as long as the
    user's feature row (and, for answers, k and the item features) reads the same; another
    row recomputes them; the memo is a bounded LRU."""
    _, dep = deployment
    memo, fresh = _engine(client), _engine(client, ann_memo_users=0)
    user = dep.pseudonym(dep.user_ids[3])  # the engine sees pseudonyms (serving hashes)
    uidx = memo.model.user_index[user]
    row = np.nan_to_num(memo.features.users([user])[0])
    changed = row.copy()
    changed[:3] = row[:3] * 4 + 50  # a busier shopper: counts up (as a pushed event would)
    assert not np.array_equal(fresh.retrieve(uidx, row)[0], fresh.retrieve(uidx, changed)[0])

    asked = [(row, 10), (row, 10), (changed, 10), (changed, 10), (changed, 5)]
    answers = [memo.rank(user, r, k) for r, k in asked]
    # the same row and k: the answer again; another k: the candidates again, ranked anew
    assert [a.ann_memo for a in answers] == ["miss", "answer", "miss", "answer", "hit"]
    for got, (r, k) in zip(answers, asked, strict=True):
        assert got.items == fresh.rank(user, r, k).items
    assert {fresh.rank(user, row, 10).ann_memo} == {"miss"}
    memo.refresh_item_features()  # new item features: answers are ranked anew
    assert memo.rank(user, changed, 5).ann_memo == "hit"

    small = _engine(client, ann_memo_users=2)
    users = [dep.pseudonym(u) for u in dep.user_ids[:3]]
    for u in users:
        small.rank(u, row, 5)
    assert len(small._memo) == 2 and small.model.user_index[users[0]] not in small._memo


def test_a_user_whose_online_features_change_gets_a_fresh_ann_answer(client, deployment):
    """Through the service and the online store: a second request is answered from the memo;
    after the user's online row changes (written as a push is), the next one is a miss and
    answers as a service without the memo would."""
    from shopml.feast_store import open_store

    settings, dep = deployment
    raw = dep.user_ids[5]
    user = dep.pseudonym(raw)  # the online store's key
    store = open_store(settings)
    refs = [f"user_features:{f}" for f in S.USER_FEATURES]
    old = store.get_online_features(features=refs, entity_rows=[{S.USER_ID: user}]).to_dict()

    def write(values: dict[str, object]) -> None:
        frame = pd.DataFrame({S.USER_ID: [user], **{f: [values[f]] for f in S.USER_FEATURES}})
        frame["feature_timestamp"] = pd.Timestamp.now(tz="UTC")  # the source's field
        store.write_to_online_store("user_features", frame)

    def hits(result: str) -> float:
        return _metric(client, f'shopml_ann_memo_total{{result="{result}"}}')

    client.get(f"/recommendations/{raw}")
    before = hits("answer"), hits("miss")
    client.get(f"/recommendations/{raw}")
    assert (hits("answer"), hits("miss")) == (before[0] + 1, before[1])
    new = {f: old[f][0] for f in S.USER_FEATURES}
    new.update({f: old[f][0] * 4 + 50 for f in S.USER_FEATURES[:3]})
    try:
        write(new)
        got = client.get(f"/recommendations/{raw}").json()
        assert (hits("answer"), hits("miss")) == (before[0] + 1, before[1] + 1)
        fresh = _engine(client, ann_memo_users=0)
        want = fresh.recommend(user, 10)
        assert [i["item_id"] for i in got["items"]] == [i for i, _ in want.items]
    finally:
        write({f: old[f][0] for f in S.USER_FEATURES})


def test_the_service_refuses_an_oversized_body_with_a_counted_413(client, deployment):
    settings, _ = deployment
    line = 'shopml_errors_total{endpoint="recommendations_batch",status="413"}'
    before = _metric(client, line)
    ids = [f"u{i:0120d}" for i in range(settings.serving.max_body_bytes // 100)]
    r = client.post("/recommendations", json={"user_ids": ids[:1000]})  # a full batch fits
    assert r.status_code == 200 and len(r.json()["results"]) == 1000
    r = client.post("/recommendations", json={"user_ids": ids, "k": 10})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"][0]
    assert _metric(client, line) == before + 1


def test_every_endpoint_answers_fuzzed_requests_without_a_5xx_and_readably(client):
    """Generated from the service's OpenAPI schema: valid and invalid requests to every
    endpoint. /search answers from a small BM25 search engine (the real engine; the
    pipeline's MiniLM models are not part of this deployment)."""
    import served_model.search as sv
    from serving.models import SearchArm
    from tests.test_search import tiny_products

    products = tiny_products()
    bundle = sv.SearchBundle(
        products=products,
        lexical=sv.Lexical.build(products[sv.TEXT].tolist()),
        config=sv.QueryConfig(candidates=10, rerank_depth=5),
    )
    holder = client.app.state.holder
    saved, holder._search = holder._search, SearchArm("1", sv.SearchEngine(bundle))
    try:
        counts = fuzz(client.app)
    finally:
        holder._search = saved
    print("fuzzing:", counts)
    assert counts["cases"] >= 6 * MAX_EXAMPLES
    for answer in ("GET /search 200", "GET /search 422", "POST /recommendations 200"):
        assert counts.get(answer), (answer, counts)


# --- POST /events ---------------------------------------------------------------------------


def _events_auth(deployment) -> dict[str, str]:
    from shopml.stream import load_token

    return {"Authorization": f"Bearer {load_token(deployment[0])}"}


def _stream_entries(client) -> list:
    return list(client.app.state.stream.read("0-0"))


def test_events_need_the_token_before_anything_is_read(client, deployment):
    good = {"events": [{"user_id": "u1", "item_id": "i1", "event_type": "view",
                        "timestamp": "2025-06-01T10:00:00Z"}]}  # fmt: skip
    before = _stream_entries(client)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        r = client.post("/events", json=good, headers=headers)
        assert r.status_code == 401 and "Bearer" in r.json()["detail"], r.text
    # a bad body without the token is a 401 too: nothing is said about the body
    assert client.post("/events", json={"events": "nope"}).status_code == 401
    assert _stream_entries(client) == before


def test_an_accepted_batch_is_one_stream_entry_with_pseudonyms(client, deployment):
    from shopml.privacy import Pseudonymizer

    events = [
        {"user_id": "shopper-7", "item_id": "i1", "event_type": "view",
         "timestamp": "2025-06-01T10:00:00+02:00", "session_id": "s9"},
        {"user_id": "shopper-7", "item_id": "i2", "event_type": "cart",
         "timestamp": 1748764900},  # epoch seconds
    ]  # fmt: skip
    before = len(_stream_entries(client))
    r = client.post("/events", json={"events": events}, headers=_events_auth(deployment))
    assert r.status_code == 202, r.text
    entries = _stream_entries(client)
    assert len(entries) == before + 1 and r.json() == {"accepted": 2, "entry_id": entries[-1][0]}
    stored = entries[-1][1]
    pseudonym = Pseudonymizer.of(deployment[0])("shopper-7")
    assert [e[S.USER_ID] for e in stored] == [pseudonym, pseudonym]  # never the raw id
    assert stored[0][S.TIMESTAMP] == 1748764800 * 1_000_000  # 10:00+02:00 in UTC microseconds
    assert stored[1][S.TIMESTAMP] == 1748764900 * 1_000_000
    assert [e[S.SESSION_ID] for e in stored] == ["s9", None]
    assert _metric(client, 'shopml_events_total{outcome="accepted"}') >= 2


def test_a_batch_with_one_bad_event_is_refused_whole_with_a_line_per_problem(client, deployment):
    ok = {"user_id": "u1", "item_id": "i1", "event_type": "view",
          "timestamp": "2025-06-01T10:00:00Z"}  # fmt: skip
    bad = [
        {**ok, "event_type": "teleport"},
        {**ok, "timestamp": "2025-06-01T10:00:00"},  # no zone: which instant?
        {**ok, "user_id": "has space"},
        {**ok, "colour": "red"},  # a misspelt or unknown field
        {k: v for k, v in ok.items() if k != "item_id"},
    ]
    before = _stream_entries(client)
    r = client.post("/events", json={"events": [ok, *bad]}, headers=_events_auth(deployment))
    assert r.status_code == 422
    detail = r.json()["detail"]
    for i, field in enumerate(("event_type", "timestamp", "user_id", "colour", "item_id"), 1):
        assert any(line.startswith(f"events.{i}.{field}") for line in detail), (i, detail)
    # the service's own rules: the cleaning job's time range, checked after the schema's
    early = {**ok, "timestamp": "1999-12-31T23:00:00Z"}
    late = {**ok, "timestamp": "2999-01-01T00:00:00Z"}
    r = client.post("/events", json={"events": [ok, early, late]}, headers=_events_auth(deployment))
    assert r.status_code == 422
    assert [line.split(":")[0] for line in r.json()["detail"]] == [
        "events.1.timestamp", "events.2.timestamp"]  # fmt: skip
    assert _stream_entries(client) == before  # nothing half-applied


def test_an_unavailable_stream_is_a_503_that_appended_nothing(client, deployment):
    class Down:
        def append(self, events):
            raise ConnectionError("Redis is down")

    ok = {"user_id": "u1", "item_id": "i1", "event_type": "view",
          "timestamp": "2025-06-01T10:00:00Z"}  # fmt: skip
    saved, client.app.state.stream = client.app.state.stream, Down()
    try:
        r = client.post("/events", json={"events": [ok]}, headers=_events_auth(deployment))
    finally:
        client.app.state.stream = saved
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert "nothing was appended" in r.json()["detail"]


def test_a_pushed_session_shapes_the_next_answer_and_goes_stale(client, deployment):
    """A session pushed through Feast's push source (as the streaming job does): the next
    answer leaves the cart's items out and brings their co-purchase neighbours forward (the
    memoised answer is not given again); a session older than serving.session_max_age_s is
    ignored."""
    import time as _time

    from feast.data_source import PushMode

    from shopml.feast_store import open_store

    settings, dep = deployment
    raw = dep.user_ids[7]
    user = dep.pseudonym(raw)
    store = open_store(settings)
    before = [i["item_id"] for i in client.get(f"/recommendations/{raw}?k=20").json()["items"]]
    cart = before[:2]

    def push(items: list[str], age_s: float) -> None:
        at = pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=age_s)
        store.push("session_push", pd.DataFrame({
            S.USER_ID: [user], S.SESSION_ID: ["s1"], S.SESSION_ITEMS: [items],
            S.SESSION_LENGTH: [len(items)], S.SESSION_LAST_CATEGORY: [None],
            S.SESSION_LAST_EVENT_MS: [int(at.timestamp() * 1000)], S.ENTITY_TIMESTAMP: [at],
        }), to=PushMode.ONLINE)  # fmt: skip

    try:
        push(cart, age_s=1)
        got = [i["item_id"] for i in client.get(f"/recommendations/{raw}?k=20").json()["items"]]
        assert not set(cart) & set(got) and got != before
        engine = client.app.state.holder.arms["champion"].engine
        session = np.array([engine.item_pos[i] for i in cart])
        want = _engine(client, ann_memo_users=0).rank(
            user, np.nan_to_num(engine.features.users([user])[0]), 20, session=session
        )
        assert got == [i for i, _ in want.items]  # what the engine answers for this session
        push(cart, age_s=settings.serving.session_max_age_s + 60)
        _time.sleep(0.01)
        stale = [i["item_id"] for i in client.get(f"/recommendations/{raw}?k=20").json()["items"]]
        assert stale == before
    finally:
        push([], age_s=settings.serving.session_max_age_s + 60)


def test_a_session_brings_its_items_co_purchase_neighbours_forward(client, deployment):
    """Planted sessions: for users whose session is one item, the answer holds more of that
    item's co-purchase neighbours (the bundle's item-kNN table: what a basket bought with it
    holds) than the stale answer with the item left out, summed over 30 users."""
    engine = _engine(client, ann_memo_users=0)
    _, dep = deployment
    knn = engine.bundle.tables.knn_idx
    rng = np.random.default_rng(0)
    stale_hits = fresh_hits = 0
    for raw in dep.user_ids[:30]:
        user = dep.pseudonym(raw)
        row = np.nan_to_num(engine.features.users([user])[0])
        item = int(rng.integers(len(engine.item_ids)))
        near = {engine.item_ids[i] for i in knn[item][:10] if i >= 0}
        stale = [i for i, _ in engine.rank(user, row, 11).items if i != engine.item_ids[item]]
        fresh = [i for i, _ in engine.rank(user, row, 10, session=np.array([item])).items]
        assert engine.item_ids[item] not in fresh
        stale_hits += len(near & set(stale[:10]))
        fresh_hits += len(near & set(fresh))
    assert fresh_hits > stale_hits, (fresh_hits, stale_hits)
