import pytest
from pydantic import ValidationError

from shopml.config import Profile, load_settings, service_environment, settings_from_params


def test_embedded_is_default_and_lives_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPML_HOME", str(tmp_path))
    s = load_settings()
    assert s.profile is Profile.EMBEDDED
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert s.paths.run("2025-12-31") == tmp_path / "runs" / "ds=2025-12-31"
    env = service_environment(s)
    assert env["SHOPML_FEAST_REGISTRY"] == str(tmp_path / "feast" / "registry.db")


def test_production_requires_a_tracking_server(monkeypatch):
    monkeypatch.setenv("SHOPML_PROFILE", "production")
    with pytest.raises(ValidationError, match="SHOPML_MLFLOW_TRACKING_URI"):
        load_settings()


def test_nested_env_and_params_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOPML_HOME", str(tmp_path))
    monkeypatch.setenv("SHOPML_TRAIN__DIM", "16")
    s = settings_from_params({"epochs": 3, "workers": 1, "promotion_margin": 0.05})
    assert (s.train.epochs, s.train.workers, s.train.dim) == (3, 1, 16)
    assert s.eval.promotion_margin == 0.05


def test_every_dag_param_reaches_its_settings_field(monkeypatch):
    from shopml.config import PARAM_FIELDS

    monkeypatch.setenv("SHOPML_LAND__SOURCE", "/from/env")
    params = {
        "source": "/retailer/export",
        "max_users": 7,
        "epochs": 2,
        "workers": 1,
        "served_study_trials": 3,
        "promotion_margin": 0.02,
        "models": ["ease"],
        "model_configs": {"ease": {"l2": 10.0}},
        "search_source": "/retailer/search-export",
        "max_products": 50,
        "search_workers": 1,
        "bi_encoder_pairs": 64,
        "cross_encoder_pairs": 96,
        "eval_queries": 40,
        "search_promotion_margin": 0.01,
        "student_layers": 2,
        "distil_pairs": 128,
        "compression_tolerance": 0.03,
        "intraday_epochs": 3,
        "eval_hours": 6.0,
    }
    assert set(params) == set(PARAM_FIELDS)  # a new Param needs its field here
    s = settings_from_params(params)
    for param, (section, field) in PARAM_FIELDS.items():
        assert getattr(getattr(s, section), field) == params[param], param
    # an empty Param keeps the environment's value; a bad one fails with the field's message
    assert settings_from_params({"source": None}).land.source == "/from/env"
    with pytest.raises(ValidationError, match="max_users"):
        settings_from_params({"max_users": 0})


def test_the_dags_declare_exactly_the_params_settings_read():
    import ast
    from pathlib import Path

    from shopml.config import PARAM_FIELDS

    declared: set[str] = set()
    for name in ("nightly_retrain.py", "search_retrain.py", "intraday_update.py"):
        dag = Path(__file__).resolve().parents[1] / "dags" / name
        tree = ast.parse(dag.read_text())
        params = next(
            n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "PARAMS"
        )
        declared |= {k.value for k in params.keys}
    # precompute_k: the batch task's; until: the intraday window's end, the task's own
    assert declared - {"precompute_k", "until"} == set(PARAM_FIELDS)


def test_invalid_values_are_rejected():
    with pytest.raises(ValidationError):
        load_settings(train={"epochs": 0})


def _production_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOPML_HOME", str(tmp_path))
    monkeypatch.setenv("SHOPML_PROFILE", "production")
    monkeypatch.setenv("SHOPML_MLFLOW_TRACKING_URI", "postgresql://postgres@db:5432/mlflow")
    monkeypatch.setenv("SHOPML_MLFLOW_ARTIFACT_ROOT", "file:///srv/mlflow")
    monkeypatch.setenv("SHOPML_FEAST__REGISTRY", "postgresql+psycopg2://postgres@db:5432/feast")
    monkeypatch.setenv("SHOPML_FEAST__REDIS_CONNECTION", "redis:6379,db=3")


def test_production_profile_selects_redis_and_sql_registry(monkeypatch, tmp_path):
    from shopml.feast_store import FEATURE_REPO, store_yaml

    _production_env(monkeypatch, tmp_path)
    s = load_settings()
    assert s.feast.online_store == "redis"  # the profile's default
    assert s.tracking_uri == "postgresql://postgres@db:5432/mlflow"
    assert s.artifact_root == "file:///srv/mlflow"
    assert store_yaml(s) == FEATURE_REPO / "feature_store.production.yaml"
    env = service_environment(s)
    assert env["MLFLOW_TRACKING_URI"] == s.tracking_uri
    assert env["SHOPML_MLFLOW_ARTIFACT_ROOT"] == "file:///srv/mlflow"
    assert env["SHOPML_FEAST_REGISTRY"] == "postgresql+psycopg2://postgres@db:5432/feast"
    assert env["SHOPML_FEAST_REDIS"] == "redis:6379,db=3"
    # a child process rebuilds the same settings from the environment alone
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings().feast == s.feast


def test_production_feast_config_is_read_by_feast(monkeypatch, tmp_path):
    from feast.repo_config import load_repo_config

    from shopml.feast_store import feast_environment, store_yaml

    _production_env(monkeypatch, tmp_path)
    s = load_settings()
    for key, value in feast_environment(s).items():
        monkeypatch.setenv(key, value)
    config = load_repo_config(store_yaml(s).parent, store_yaml(s))
    assert config.project == "shopml"
    assert config.registry.registry_type == "sql"
    assert config.registry.path == "postgresql+psycopg2://postgres@db:5432/feast"
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "redis:6379,db=3"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHOPML_FEAST__REGISTRY": ""}, "SHOPML_FEAST__REGISTRY"),
        ({"SHOPML_FEAST__REGISTRY": "/var/feast/registry.db"}, "SQLAlchemy URL"),
        ({"SHOPML_FEAST__ONLINE_STORE": "sqlite"}, "SHOPML_FEAST__ONLINE_STORE=redis"),
    ],
)
def test_production_rejects_embedded_backends(monkeypatch, tmp_path, env, message):
    _production_env(monkeypatch, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        load_settings()


def test_embedded_rejects_the_redis_online_store(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOPML_HOME", str(tmp_path))
    monkeypatch.setenv("SHOPML_FEAST__ONLINE_STORE", "redis")
    with pytest.raises(ValidationError, match="profile=production"):
        load_settings()


def test_opening_the_feast_store_leaves_the_environment_alone(settings):
    import os

    from shopml.feast_store import open_store

    before = dict(os.environ)
    store = open_store(settings)
    assert dict(os.environ) == before
    assert store.config.project == settings.feast.project
    assert store.config.online_store.path == str(settings.paths.feast / "online.db")
