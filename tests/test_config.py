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


def test_invalid_values_are_rejected():
    with pytest.raises(ValidationError):
        load_settings(train={"epochs": 0})
