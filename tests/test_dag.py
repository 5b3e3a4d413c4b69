"""The DAG file: imports cleanly, stays light at parse time, and has the expected graph."""

import json
import subprocess
import sys

from tests.conftest import REPO

EXPECTED = [
    "land",
    "validate_raw",
    "clean",
    "build_features",
    "validate_features",
    "feast_sync",
    "training_set",
    "train",
    "train_ranker",
    "compress",
    "evaluate",
    "promote",
    "batch_score",
]


def test_dagbag_imports_without_errors_and_graph_is_a_chain(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("SHOPML_SCHEDULE", raising=False)  # the default: nightly
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags.get("nightly_retrain")  # in memory: no metadata DB needed
    assert dag is not None
    for upstream, downstream in zip(EXPECTED, EXPECTED[1:], strict=False):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert dag.get_task("batch_score").downstream_task_ids == set()
    assert set(dag.params.keys()) == {
        "source",
        "max_users",
        "epochs",
        "workers",
        "served_study_trials",
        "promotion_margin",
        "precompute_k",
        "models",
        "model_configs",
    }
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.expression == "0 0 * * *"


def test_schedule_none_makes_the_dag_manual_only(monkeypatch):
    """The embedded demo's setting: unpausing it to trigger one run starts no nightly runs."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("SHOPML_SCHEDULE", "none")
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["nightly_retrain"]
    assert dag.schedule is None and not dag.timetable.can_be_scheduled


def test_parsing_imports_no_heavy_library_and_opens_no_database(tmp_path):
    """Parse the file in a fresh interpreter whose Airflow DB path does not exist."""
    code = (
        "import runpy, sys, json;"
        f"runpy.run_path({str(REPO / 'dags' / 'nightly_retrain.py')!r});"
        "heavy=[m for m in ('pyspark','torch','mlflow','feast','great_expectations','pandas')"
        " if m in sys.modules];"
        "print(json.dumps(heavy))"
    )
    missing_db = tmp_path / "no" / "such" / "airflow.db"
    env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{missing_db}",
        "AIRFLOW_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert not missing_db.exists()


def test_production_spark_stages_are_spark_submit_of_the_same_entry_points(tmp_path):
    """SHOPML_SPARK__SUBMIT=true: land/clean/build_features become SparkSubmitOperator tasks
    on the configured connection, running spark_jobs/jobs.py (what a person runs by hand)."""
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag;"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r});"
        "assert 'nightly_retrain' in bag.dags, bag.import_errors;"
        "dag = bag.dags['nightly_retrain'];"
        "out = {t: [type(dag.get_task(t)).__name__, dag.get_task(t).application,"
        " dag.get_task(t).application_args, dag.get_task(t)._conn_id,"
        " sorted(dag.get_task(t).downstream_task_ids)]"
        " for t in ('land', 'clean', 'build_features')};"
        "print(json.dumps(out))"
    )
    env = {
        **{k: v for k, v in __import__("os").environ.items() if not k.startswith("SHOPML_")},
        "SHOPML_SPARK__SUBMIT": "true",
        "SHOPML_SPARK__CONN_ID": "spark_cluster",
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",  # a loaded CI machine parses slowly
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = json.loads(proc.stdout.strip().splitlines()[-1])
    jobs = str(REPO / "spark_jobs" / "jobs.py")
    assert tasks["land"] == [
        "SparkSubmitOperator",
        jobs,
        [
            "land",
            "--ds={{ ds }}",
            "--source={{ params.source }}",
            "--max-users={{ params.max_users or '' }}",
        ],
        "spark_cluster",
        ["validate_raw"],
    ]
    assert tasks["clean"][0:4] == ["SparkSubmitOperator", jobs, ["clean", "--ds={{ ds }}"],
                                   "spark_cluster"]  # fmt: skip
    assert tasks["build_features"][2] == ["features", "--ds={{ ds }}"]
    assert tasks["build_features"][4] == ["validate_features"]


SEARCH_EXPECTED = [
    "search_data",
    "validate_search",
    "train_bi_encoder",
    "train_cross_encoder",
    "build_index",
    "evaluate_search",
    "compress_search",
    "promote_search",
]


def test_search_dag_is_a_chain_with_typed_params_and_parses_light(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["search_retrain"]
    for upstream, downstream in zip(SEARCH_EXPECTED, SEARCH_EXPECTED[1:], strict=False):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert dag.get_task("validate_search").retries == 0  # bad data is not retried
    assert set(dag.params.keys()) == {
        "search_source", "max_products", "search_workers", "bi_encoder_pairs",
        "cross_encoder_pairs", "eval_queries", "search_promotion_margin", "student_layers",
        "distil_pairs", "compression_tolerance",
    }  # fmt: skip
    heavy = ("pyspark", "torch", "mlflow", "sentence_transformers", "pandas")
    assert _heavy_after_parsing("search_retrain.py", tmp_path, heavy) == []


def test_intraday_dag_is_an_hourly_chain_with_typed_params_and_parses_light(monkeypatch, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("SHOPML_SCHEDULE", raising=False)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["intraday_update"]
    steps = ["stream_window", "warm_start", "register_challenger"]
    for upstream, downstream in zip(steps, steps[1:], strict=False):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert set(dag.params.keys()) == {
        "until", "eval_hours", "intraday_epochs", "workers", "promotion_margin"
    }  # fmt: skip
    assert dag.timetable.expression == "0 * * * *" and dag.max_active_runs == 1
    monkeypatch.setenv("SHOPML_SCHEDULE", "none")  # the embedded demo: manual runs only
    manual = DagBag(dag_folder=str(REPO / "dags")).dags["intraday_update"]
    assert manual.schedule is None and not manual.timetable.can_be_scheduled
    heavy = ("pyspark", "torch", "mlflow", "feast", "pandas")
    assert _heavy_after_parsing("intraday_update.py", tmp_path, heavy) == []


def _heavy_after_parsing(dag_file: str, tmp_path, modules: tuple[str, ...]) -> list[str]:
    """The ``modules`` a fresh interpreter has imported after parsing ``dags/<dag_file>``."""
    code = (
        "import runpy, sys, json;"
        f"runpy.run_path({str(REPO / 'dags' / dag_file)!r});"
        f"print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
