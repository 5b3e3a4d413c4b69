"""What people see in MLflow: nested runs that line up, plots, a description from the gate."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from training import report
from training.gate import decide


def _table() -> pd.DataFrame:
    rows = []
    models = [("popularity", "baseline", 0.10), ("user_knn", "zoo", 0.47),
              ("two_tower", "retrieval", 0.39), ("two_stage", "served", 0.46)]  # fmt: skip
    for name, role, ndcg in models:
        rows.append({"model": name, "role": role, "ndcg_at_10": ndcg, "recall_at_10": ndcg / 2,
                     "ndcg_at_10_ci_low": ndcg - 0.02, "ndcg_at_10_ci_high": ndcg + 0.02,
                     "cold.ndcg_at_10": ndcg / 3, "heavy.ndcg_at_10": ndcg * 1.1,
                     "long_tail.ndcg_at_10": None, "size_mb": 1.5, "protocol": "p"})  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture
def tracking(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # artifacts under tmp_path too: a SQLite store's default artifact root is ./mlruns, which
    # left every test run's plots in the working tree
    mlflow.create_experiment("report-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("report-test")
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_every_model_is_a_nested_run_with_the_same_metric_names(tracking, tmp_path):
    table = _table()
    curves = {"two-tower": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]}
    with tracking.start_run(run_name="nightly-2025-12-31") as parent:
        report.log_evaluation(table, 10, "2025-12-31", "two_stage", {"user_knn": {"k": 40}}, curves)
    client = tracking.MlflowClient()
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == set(table["model"])
    names = {frozenset(k for k in r.data.metrics if k != "long_tail.ndcg_at_10") for r in children}
    assert len(names) == 1 and {"ndcg_at_10", "cold.ndcg_at_10", "size_mb"} <= set(
        next(iter(names))
    )
    assert by_name["two_stage"].data.tags["role"] == "served"
    assert by_name["popularity"].data.tags["ds"] == "2025-12-31"
    assert by_name["user_knn"].data.params == {"config.k": "40"}
    # the parent carries the served path's metrics under the same names, and the plots
    parent_run = client.get_run(parent.info.run_id)
    assert parent_run.data.metrics["ndcg_at_10"] == pytest.approx(0.46)
    assert not any(
        "." in k and k.split(".")[0] in set(table["model"]) for k in parent_run.data.metrics
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert artifacts == {"plots/ndcg_by_model.png", "plots/segments_by_model.png",
                         "plots/loss_curves.png"}  # fmt: skip
    png = tracking.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="plots/ndcg_by_model.png", dst_path=str(tmp_path)
    )
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compact = report.compact_table(table, 10)
    assert list(compact["model"]) == ["user_knn", "two_stage", "two_tower", "popularity"]
    assert "protocol" not in compact and compact["recall_at_10"].iloc[0] == 0.235


def test_decision_markdown_carries_the_date_numbers_and_every_reason():
    per_user = lambda m: pd.DataFrame({"user_idx": range(50), "ndcg": [m] * 50})  # noqa: E731
    verdict = decide(per_user(0.5), baseline=per_user(0.1), segments=())
    text = report.decision_markdown(verdict, _table(), 10, "2025-12-31", "two_stage", "3")
    assert "Promoted to `champion`" in text and "**2025-12-31**" in text and "version 3" in text
    assert "| baseline | +0.4000 |" in text
    assert all(f"- {r}" in text for r in verdict.reasons)
    fig = report.gate_difference(verdict.numbers, verdict.promote, "ndcg")
    assert fig.axes and fig.axes[0].get_title() == "Gate: PROMOTED"


def test_the_served_study_logs_its_choice_beside_the_settings_and_every_trial(tracking):
    trials = [
        {"trial": n, "retrieval": {"ann_candidates": a, "max_candidates": 200},
         "ranker": {"cross_layers": 2, "hidden": 64, "features": ["f1", "f2"][: 1 + n % 2]},
         "val_ndcg_at_10": v, "train_rows": 1000 + n}
        for n, (a, v) in enumerate([(120, 0.41), (40, 0.44), (200, 0.39)])
    ]  # fmt: skip
    record = {"retrieval": trials[1]["retrieval"], "ranker": trials[1]["ranker"],
              "val_ndcg_at_10": 0.44, "chosen_trial": 1, "default_val_ndcg_at_10": 0.41,
              "best_val_ndcg_at_10": 0.44, "decision": "trial 1 beats the settings'",
              "trials": trials}  # fmt: skip
    with tracking.start_run(run_name="nightly-2025-12-31") as run:
        report.log_served_study(record, 10)
        # a retried train_ranker logs into the same run, perhaps with another choice
        report.log_served_study({**record, "retrieval": trials[0]["retrieval"]}, 10)
    client = tracking.MlflowClient()
    got = client.get_run(run.info.run_id).data
    assert got.tags["served.ann_candidates"] == "120"
    assert got.tags["served.ranker.features"] == "['f1', 'f2']"
    assert got.tags["served.decision"] == "trial 1 beats the settings'"
    assert got.metrics["served_study.val_ndcg_at_10"] == pytest.approx(0.44)
    assert got.metrics["served_study.default_val_ndcg_at_10"] == pytest.approx(0.41)
    assert got.metrics["served_study.trials"] == 3
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"served_study.json", "served_study_trials.json"} <= paths
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/served_study.png"
    ]
