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
    assert bundle.format_version(tmp_path) == 3  # before the zoo scores and ranker features
    (tmp_path / bundle.MANIFEST_FILE).write_text(json.dumps({"format_version": 4}))
    assert bundle.format_version(tmp_path) == bundle.FORMAT_VERSION == 4
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


def test_a_ranker_reads_its_own_columns_of_full_width_rows():
    """A champion's ranker from before the zoo scores (``LEGACY_FEATURES``) and an ablation's
    ranker score the engine's full-width rows on their own columns only."""
    import numpy as np

    from served_model.ranker import (
        LEGACY_FEATURES,
        RANKER_FEATURES,
        ranker_scores,
        ranker_view,
    )

    x = np.random.default_rng(0).random((5, len(RANKER_FEATURES)), dtype=np.float32)
    legacy = Ranker(features=LEGACY_FEATURES).eval()
    cols = [RANKER_FEATURES.index(f) for f in LEGACY_FEATURES]
    assert ranker_view(legacy, x).tolist() == x[:, cols].tolist()
    with torch.no_grad():
        direct = torch.sigmoid(legacy(torch.from_numpy(x[:, cols]))).numpy()
    np.testing.assert_allclose(ranker_scores(legacy, x), direct, rtol=1e-6)
    with pytest.raises(ValueError, match="ranker features must be some of"):
        Ranker(features=("no_such_feature",))
    with pytest.raises(ValueError, match="columns"):
        ranker_view(legacy, x[:, :4])


def test_zoo_score_tables_round_trip_and_older_tables_have_none(tmp_path):
    import pandas as pd
    from scipy import sparse

    from shopml import schema as S

    model = TwoTower(["u1", "u2"], ["a", "b", "c"], ["a"], dim=4)
    purchases = pd.DataFrame({S.USER_ID: ["u1", "u2", "u2"], S.ITEM_ID: ["a", "b", "c"],
                              S.TIMESTAMP: pd.Timestamp("2025-01-01", tz="UTC")})  # fmt: skip
    catalog = pd.DataFrame({S.ITEM_ID: ["a", "b", "c"]})
    scores = {"ease": sparse.csr_matrix(([0.5, 0.25], ([1, 2], [2, 0])), shape=(3, 3))}
    tables = bundle.build_tables(model, purchases, catalog, scores)
    tables.save(tmp_path / "t.npz")
    loaded = bundle.Tables.load(tmp_path / "t.npz")
    assert loaded.scores["ease"].toarray().tolist() == scores["ease"].toarray().tolist()
    bundle.build_tables(model, purchases, catalog).save(tmp_path / "old.npz")
    assert bundle.Tables.load(tmp_path / "old.npz").scores == {}
    with pytest.raises(ValueError, match="shape"):
        bundle.build_tables(model, purchases, catalog, {"ease": sparse.csr_matrix((2, 3))})
