"""The bundle format registered with every version: versioned, and older versions still load."""

import json
import sys
import types

import pytest
import torch

from served_model import bundle
from served_model.ranker import Ranker
from served_model.two_tower import TwoTower


def _save_as_format_1(obj, path, monkeypatch):
    """torch.save ``obj`` with its class under the first layout's module path, as versions
    registered before the redesign hold it."""
    cls = type(obj)
    old = {TwoTower: "training.model", Ranker: "training.ranking"}[cls]
    legacy = types.ModuleType(old)
    setattr(legacy, cls.__name__, cls)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, old, legacy)
        m.setattr(cls, "__module__", old)
        torch.save(obj, path)
    assert old not in sys.modules and cls.__module__.startswith("served_model")


def test_format_1_pickles_load_through_the_legacy_map(tmp_path, monkeypatch):
    model = TwoTower(["u1", "u2"], ["a", "b", "c"], ["a"], dim=4)
    ranker = Ranker()
    _save_as_format_1(model, tmp_path / "model.pt", monkeypatch)
    _save_as_format_1(ranker, tmp_path / "ranker.pt", monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="training.model"):
        torch.load(tmp_path / "model.pt", weights_only=False)  # what a plain load would do
    loaded = bundle.load_pickled(tmp_path / "model.pt")
    assert isinstance(loaded, TwoTower) and loaded.item_ids == ["a", "b", "c"]
    assert torch.equal(loaded.item_emb.weight, model.item_emb.weight)
    assert isinstance(bundle.load_pickled(tmp_path / "ranker.pt"), Ranker)


def test_format_version_is_read_from_the_manifest(tmp_path):
    assert bundle.format_version(tmp_path) == 1  # no manifest: registered before versioning
    (tmp_path / bundle.MANIFEST_FILE).write_text(json.dumps({"items": 3}))
    assert bundle.format_version(tmp_path) == 1
    (tmp_path / bundle.MANIFEST_FILE).write_text(json.dumps({"format_version": 2}))
    assert bundle.format_version(tmp_path) == 2  # before the ranker's format was recorded
    (tmp_path / bundle.MANIFEST_FILE).write_text(json.dumps({"format_version": 3}))
    assert bundle.format_version(tmp_path) == bundle.FORMAT_VERSION == 3
    (tmp_path / bundle.MANIFEST_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="newer than this ShopML reads"):
        bundle.format_version(tmp_path)


def test_a_format_1_mlflow_version_loads(tmp_path, monkeypatch):
    """The two-tower as MLflow logged it before the redesign (class under training.model)."""
    import mlflow

    model = TwoTower(["u1"], ["a", "b"], ["a"], dim=4)
    legacy = types.ModuleType("training.model")
    legacy.TwoTower = TwoTower
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "training.model", legacy)
        m.setattr(TwoTower, "__module__", "training.model")
        mlflow.pytorch.save_model(model, str(tmp_path / "v1"), serialization_format="pickle")
    loaded = bundle.load_model_dir(tmp_path / "v1")
    assert isinstance(loaded, TwoTower) and loaded.item_ids == ["a", "b"]
