"""The search DAG through the session's real Airflow on a small slice of the real reviews:
a champion is registered through the gate, and ``/search`` answers with it."""

from __future__ import annotations

import pytest

from tests.conftest import PIPELINE_DS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# a small slice and step budgets (the demo's are SearchConfig's defaults)
SEARCH_CONF = {
    "max_products": 60,
    "search_workers": 1,  # in process: Horovod's start-up is tested by test_horovod and e2e
    "bi_encoder_pairs": 48,
    "cross_encoder_pairs": 48,
    "eval_queries": 30,
    "student_layers": 1,
    "distil_pairs": 32,
}


@pytest.fixture(scope="module")
def search_run(airflow_pipeline):
    home, airflow, _ = airflow_pipeline
    result = airflow.run(PIPELINE_DS, SEARCH_CONF, dag_id="search_retrain", timeout=1500)
    assert result.state == "success", result.table() + "\n" + airflow.failures(result)
    return home, result


@pytest.fixture
def search_settings(search_run, monkeypatch):
    from shopml.config import load_settings

    monkeypatch.setenv("SHOPML_HOME", str(search_run[0]))
    return load_settings()


def test_the_dag_registers_a_search_champion_through_the_gate(search_settings):
    import json

    from training import registry

    ss = registry.search_settings(search_settings)
    assert registry.champion_version(ss) == "1"
    run_dir = search_settings.paths.search_run(PIPELINE_DS)
    decision = json.loads((run_dir / "promotion.json").read_text())
    assert decision["promoted"] is True and decision["gate"]["reference"] == "baseline"
    table = json.loads((run_dir / "evaluation.json").read_text())
    choice = json.loads((run_dir / "compression" / "choice.json").read_text())
    compressed = choice["chosen"] != "teacher"  # then the teacher's served row stays beside
    assert {r["model"] for r in table} == {
        "bm25", "bm25_popularity", "minilm_zero_shot", "bi_encoder", "hybrid",
        "hybrid_cross_encoder", *(["hybrid_cross_encoder_teacher"] if compressed else []),
    }  # fmt: skip
    assert all(0 <= r["ndcg_at_10"] <= 1 and r["queries"] == 30 for r in table)


def test_the_compression_gate_chose_among_measured_candidates(search_settings):
    import json

    import pandas as pd

    from served_model.search import MANIFEST, reranker_info

    run_dir = search_settings.paths.search_run(PIPELINE_DS)
    candidates = pd.read_json(run_dir / "compression" / "candidates.json")
    assert set(candidates["candidate"]) == {
        "teacher", "teacher_torch_int8", "teacher_onnx", "teacher_onnx_int8",
        "teacher_onnx_int8_static", "student", "student_onnx_int8", "pruned",
        "pruned_onnx_int8",
    }  # fmt: skip
    assert (candidates["p50_ms"] > 0).all() and candidates["val_ndcg"].between(0, 1).all()
    assert candidates.loc[candidates["candidate"] == "teacher_onnx", "max_abs_diff"].iloc[0] < 1e-3
    chosen = candidates[candidates["chosen"]]
    assert len(chosen) == 1 and (candidates[~candidates["chosen"]]["why"] != "").all()
    # what the bundle serves is the chosen candidate, in its format
    manifest = json.loads((run_dir / "bundle" / MANIFEST).read_text())
    assert manifest["reranker"]["candidate"] == chosen["candidate"].iloc[0]
    served = reranker_info(run_dir / "bundle" / "cross_encoder")["format"]
    assert served == manifest["reranker"]["format"] == chosen["format"].iloc[0]


def test_search_answers_with_the_champion_and_refuses_bad_queries(search_settings):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    with TestClient(create_app(search_settings)) as client:
        answer = client.get("/search", params={"q": "Flowy summer DRESS!", "k": 5}).json()
        assert answer["model_version"] == "1" and answer["arm"] == "champion"
        assert len(answer["items"]) == 5 and answer["fallback"] is False
        assert answer["normalized_query"] == "flowy summer dress"
        assert sum(answer["facets"].values()) >= 5
        dresses = client.get("/search", params={"q": "dress", "category": "Dresses"}).json()
        assert {i["category"] for i in dresses["items"]} == {"Dresses"}
        typo = client.get("/search", params={"q": "jaens"}).json()
        assert typo["corrected"] == {"jaens": "jeans"}
        for bad in ("", "   ", "x" * 257):
            refused = client.get("/search", params={"q": bad})
            assert refused.status_code == 422 and "q" in refused.text
        assert client.get("/search", params={"q": "dress", "k": 0}).status_code == 422
        metrics = client.get("/metrics").text
        assert 'stage="search_rerank"' in metrics and 'alias="search"' in metrics
        reranker = client.get("/readyz").json()["models"]["search.reranker"]
        assert reranker["format"] in metrics and reranker["bytes"] > 0


def test_the_registered_version_is_a_working_pyfunc(search_settings):
    import mlflow
    import pandas as pd

    from training import registry

    ss = registry.search_settings(search_settings)
    registry.use_tracking(ss)
    model = mlflow.pyfunc.load_model(f"models:/{ss.model_name}@champion")
    out = model.predict(pd.DataFrame({"query": ["warm wool sweater"]}), params={"k": 3})
    assert len(out.loc[0, "item_ids"]) == 3
