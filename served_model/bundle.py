"""What a registered model version serves with, built at promotion time and logged with it.

Beside the two-tower (the MLflow PyTorch model) every version carries, as the model's
``extra_files``:

* ``index.faiss``: an inner-product faiss index over the item tower's vectors, augmented with
  the item bias (query ``[u, 1]`` . item ``[v, b]`` = the model's exact score), HNSW for large
  catalogs and exact (flat) for small ones;
* ``ranker.pt``: the candidate ranker (``training.ranking.Ranker``);
* ``tables.npz``: the cheap candidate sources and filters: popularity, recent popularity (per
  category too), item-kNN neighbours, each user's purchase counts, the catalog mask.

So a champion is self-contained: serving downloads one registry version and needs nothing
from the training run's directory.

**Format versions.** The manifest names the bundle's ``format_version``; a loader reads every
version up to ``FORMAT_VERSION`` so a rollback to an older champion still serves:

* 1 (no ``format_version`` in the manifest): the two-tower and ranker pickled under the
  module paths of the first layout (``training.model``, ``training.ranking``,
  ``training.recommenders.ranker``); :data:`LEGACY_MODULES` maps them to today's classes.
* 2: the same files, classes under ``served_model``.
* 3: the manifest's ``ranker`` entry names the ranker's file and format (``torch``,
  ``torch_int8``: a pickled module in ``ranker.pt``; ``onnx``, ``onnx_int8``: ONNX in
  ``ranker.onnx``, run by ONNX Runtime), its bytes and parameters: the candidate the
  compression gate chose (``training.compress``). Without the entry, ``ranker.pt``.
* 4: ``tables.npz`` may hold ``scores``, the zoo scorers' top-N items per user (TIFU-kNN,
  EASE: candidate sources and ranker features), and the manifest's ``ranker`` entry names
  the ranker's ``features``. Rankers of earlier formats read ``LEGACY_FEATURES``. The
  manifest may name ``retrieval``: the source quotas and ranking depth chosen with the ranker
  on validation (``training.served_study``); the engine serves with them unless the operator
  set them (``served_model.engine.version_config``). It is additive: a reader that ignores
  it serves the version with its settings' quotas, as before.

A bundle newer than this code is refused with a message rather than half-loaded.
"""

from __future__ import annotations

import json
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from served_model.ranker import (
    LEGACY_FEATURES,
    OnnxRanker,
    features_of,
    ranker_format,
    ranker_params,
)
from served_model.two_tower import TwoTower
from shopml import schema as S

FORMAT_VERSION = 4
# Where format 1 pickled the classes a bundle holds -> where they live now.
LEGACY_MODULES: dict[str, str] = {
    "training.model": "served_model.two_tower",
    "training.ranking": "served_model.ranker",
    "training.recommenders.ranker": "served_model.ranker",
}
INDEX_FILE = "index.faiss"
RANKER_FILE = "ranker.pt"
ONNX_RANKER_FILE = "ranker.onnx"
TABLES_FILE = "tables.npz"
MANIFEST_FILE = "serving_manifest.json"
ARTIFACT_FILES = (INDEX_FILE, RANKER_FILE, TABLES_FILE, MANIFEST_FILE)  # ranker: or .onnx
FLAT_INDEX_MAX_ITEMS = 20_000  # exact search is fast enough below this
KNN_NEIGHBORS = 20
RECENT_DAYS = 30
POPULAR_KEEP = 1000


class _Unpickler(pickle.Unpickler):
    """Resolves classes pickled under a legacy module path (:data:`LEGACY_MODULES`)."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(LEGACY_MODULES.get(module, module), name)


# What ``torch.load(pickle_module=...)`` needs: an Unpickler and a load.
compat_pickle = types.ModuleType("shopml_compat_pickle")
compat_pickle.Unpickler = _Unpickler  # type: ignore[attr-defined]
compat_pickle.load = lambda f, **kw: _Unpickler(f, **kw).load()  # type: ignore[attr-defined]


def load_pickled(path: Path) -> Any:
    """A torch-saved module of any bundle format (legacy class paths resolved)."""
    return torch.load(path, weights_only=False, pickle_module=compat_pickle)


def load_model_dir(local: Path) -> TwoTower:
    """The two-tower of a downloaded MLflow version directory, of any bundle format.

    MLflow warns whenever the unpickler is not the module that saved the model
    (``mlflow.pytorch.pickle_module``); ours reads the same pickles, so that warning is muted
    for this call only.
    """
    import logging

    import mlflow

    logger = logging.getLogger("mlflow.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return mlflow.pytorch.load_model(str(local), pickle_module=compat_pickle)
    finally:
        logger.setLevel(level)


def format_version(files: Path) -> int:
    """The bundle format of a version's ``extra_files`` (1 when its manifest predates it)."""
    manifest = files / MANIFEST_FILE
    found = json.loads(manifest.read_text()).get("format_version", 1) if manifest.exists() else 1
    if found > FORMAT_VERSION:
        raise ValueError(
            f"bundle format {found} is newer than this ShopML reads ({FORMAT_VERSION}): "
            "upgrade the serving image before serving this version"
        )
    return int(found)


def item_matrix(model: TwoTower) -> np.ndarray:
    """Item vectors with the bias appended: ``[v, b]`` per item, float32, C-contiguous."""
    with torch.no_grad():
        vec, bias = model.item_vectors()
    return np.ascontiguousarray(
        np.concatenate([vec.numpy(), bias.numpy()[:, None]], axis=1), dtype=np.float32
    )


def build_index(vectors: np.ndarray, hnsw_m: int = 32, ef_construction: int = 80):
    """Inner-product index: exact below ``FLAT_INDEX_MAX_ITEMS`` items, HNSW above."""
    import faiss

    dim = vectors.shape[1]
    if len(vectors) <= FLAT_INDEX_MAX_ITEMS:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    index.add(vectors)
    return index


@dataclass
class Tables:
    """The non-neural candidate sources and filters, in the model's item index space."""

    popular: np.ndarray  # item indices, most purchased first
    recent_popular: np.ndarray  # most purchased in the last RECENT_DAYS
    category_popular: dict[str, np.ndarray]  # recent popularity within each category
    knn_idx: np.ndarray  # (n_items, KNN_NEIGHBORS) neighbour indices, -1 = none
    knn_sim: np.ndarray  # (n_items, KNN_NEIGHBORS) cosine similarity
    history: sparse.csr_matrix  # (n_model_users + 1, n_items) purchase counts; row 0 = unknown
    in_catalog: np.ndarray  # bool per item: still in the catalog the model was promoted with
    history_last: sparse.csr_matrix  # as ``history``: day (since 1970) of the last purchase
    user_last: np.ndarray  # per history row: day of the user's latest purchase
    # zoo scorer -> (history rows, n_items) its top-N items per user with their scores,
    # computed nightly from the same purchases (``zoo.sources``); empty before format 4
    scores: dict[str, sparse.csr_matrix] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        cats = sorted(self.category_popular)
        names = sorted(self.scores)
        score_arrays = {}
        for i, name in enumerate(names):
            m = self.scores[name].tocsr()
            score_arrays[f"score_{i}_data"] = m.data.astype(np.float32)
            score_arrays[f"score_{i}_indices"] = m.indices
            score_arrays[f"score_{i}_indptr"] = m.indptr
        np.savez_compressed(
            path,
            popular=self.popular,
            recent_popular=self.recent_popular,
            knn_idx=self.knn_idx,
            knn_sim=self.knn_sim,
            history_data=self.history.data,
            history_indices=self.history.indices,
            history_indptr=self.history.indptr,
            history_shape=np.array(self.history.shape),
            history_last=self.history_last.data,
            user_last=self.user_last,
            in_catalog=self.in_catalog,
            categories=np.array(cats, dtype=object),
            **{f"category_{i}": self.category_popular[c] for i, c in enumerate(cats)},
            score_names=np.array(names, dtype=object),
            **score_arrays,
        )

    @classmethod
    def load(cls, path: Path) -> Tables:
        with np.load(path, allow_pickle=True) as z:
            return cls._from_npz(z)

    @classmethod
    def _from_npz(cls, z: np.lib.npyio.NpzFile) -> Tables:
        history = sparse.csr_matrix(
            (z["history_data"], z["history_indices"], z["history_indptr"]),
            shape=tuple(z["history_shape"]),
        )
        history_last = sparse.csr_matrix(
            (z["history_last"], z["history_indices"], z["history_indptr"]), shape=history.shape
        )
        cats = [str(c) for c in z["categories"]]
        names = [str(n) for n in z["score_names"]] if "score_names" in z else []
        scores = {
            name: sparse.csr_matrix(
                (z[f"score_{i}_data"], z[f"score_{i}_indices"], z[f"score_{i}_indptr"]),
                shape=history.shape,
            )
            for i, name in enumerate(names)
        }
        return cls(
            popular=z["popular"],
            recent_popular=z["recent_popular"],
            category_popular={c: z[f"category_{i}"] for i, c in enumerate(cats)},
            knn_idx=z["knn_idx"],
            knn_sim=z["knn_sim"],
            history=history,
            in_catalog=z["in_catalog"],
            history_last=history_last,
            user_last=z["user_last"],
            scores=scores,
        )


def _top_neighbours(sim: sparse.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense (items, n) neighbour table from a sparse top-n similarity matrix."""
    idx = np.full((sim.shape[0], n), -1, dtype=np.int32)
    val = np.zeros((sim.shape[0], n), dtype=np.float32)
    for r in range(sim.shape[0]):
        lo, hi = sim.indptr[r], sim.indptr[r + 1]
        order = np.argsort(-sim.data[lo:hi])[:n]
        idx[r, : len(order)] = sim.indices[lo:hi][order]
        val[r, : len(order)] = sim.data[lo:hi][order]
    return idx, val


def build_tables(
    model: TwoTower,
    purchases: pd.DataFrame,
    catalog: pd.DataFrame,
    scores: dict[str, sparse.csr_matrix] | None = None,
) -> Tables:
    """Candidate tables from the run's training purchases and its catalog.

    ``purchases`` has user_id, item_id, timestamp; ``catalog`` item_id and, when the retailer
    has it, category. Both are mapped onto the model's vocabularies (unknown ids dropped).
    ``scores`` are the zoo scorers' per-user top-N tables, already in the model's index
    space (``zoo.sources.zoo_scores`` fits them on the same purchases).
    """
    from served_model.similarity import cosine_neighbours

    n_items = len(model.item_ids)
    item_pos = pd.Series(np.arange(n_items), index=pd.Index(model.item_ids))
    items = item_pos.reindex(purchases[S.ITEM_ID].astype(str)).to_numpy()
    users = np.array([model.user_index.get(u, 0) for u in purchases[S.USER_ID].astype(str)])
    ok = ~np.isnan(items)
    items, users = items[ok].astype(np.int64), users[ok]
    ts = pd.to_datetime(purchases[S.TIMESTAMP], utc=True).dt.tz_convert(None).to_numpy()[ok]

    counts = np.bincount(items, minlength=n_items)
    popular = np.argsort(-counts, kind="stable")[:POPULAR_KEEP]
    recent = ts >= ts.max() - np.timedelta64(RECENT_DAYS, "D") if len(ts) else ok[:0]
    recent_counts = np.bincount(items[recent], minlength=n_items)
    recent_popular = np.argsort(-recent_counts, kind="stable")[:POPULAR_KEEP]

    category_popular: dict[str, np.ndarray] = {}
    if S.CATEGORY in catalog and catalog[S.CATEGORY].notna().any():
        cat = catalog.dropna(subset=[S.CATEGORY])
        cat_pos = item_pos.reindex(cat[S.ITEM_ID].astype(str))
        for name, members in (
            cat.assign(_pos=cat_pos.to_numpy()).dropna(subset=["_pos"]).groupby(S.CATEGORY)["_pos"]
        ):
            m = members.to_numpy(np.int64)
            category_popular[str(name)] = m[np.argsort(-recent_counts[m], kind="stable")][
                :POPULAR_KEEP
            ]

    # counts and last purchase day per (user, item): two matrices with one sparsity pattern
    day = (ts - np.datetime64("1970-01-01", "ns")) / np.timedelta64(1, "D")
    pairs = (
        pd.DataFrame({"u": users, "i": items, "day": day})
        .groupby(["u", "i"], sort=True)["day"]
        .agg(["size", "max"])
        .reset_index()
    )
    shape = (len(model.user_index) + 1, n_items)
    coords = (pairs["u"].to_numpy(), pairs["i"].to_numpy())
    history = sparse.csr_matrix((pairs["size"].to_numpy(np.float32), coords), shape=shape)
    history_last = sparse.csr_matrix((pairs["max"].to_numpy(np.float32), coords), shape=shape)
    user_last = np.zeros(shape[0], dtype=np.float32)
    np.maximum.at(user_last, pairs["u"].to_numpy(), pairs["max"].to_numpy(np.float32))
    binary = history.copy()
    binary.data[:] = 1.0
    knn_idx, knn_sim = _top_neighbours(
        cosine_neighbours(binary, 10.0, KNN_NEIGHBORS), KNN_NEIGHBORS
    )
    in_catalog = np.zeros(n_items, dtype=bool)
    pos = item_pos.reindex(catalog[S.ITEM_ID].astype(str)).dropna().to_numpy(np.int64)
    in_catalog[pos] = True
    for name, m in (scores or {}).items():
        if m.shape != shape:
            raise ValueError(f"scores of '{name}' have shape {m.shape}; the history's is {shape}")
    return Tables(
        popular, recent_popular, category_popular, knn_idx, knn_sim, history, in_catalog,
        history_last, user_last, dict(scores or {}),
    )  # fmt: skip


def write_artifacts(
    out_dir: Path,
    model: TwoTower,
    ranker: torch.nn.Module,
    purchases: pd.DataFrame,
    catalog: pd.DataFrame,
    scores: dict[str, sparse.csr_matrix] | None = None,
    retrieval: dict[str, int] | None = None,
) -> list[Path]:
    """Build the index and tables of ``model``; returns the files to log with it.
    ``retrieval``: the quotas and ranking depth the ranker was chosen with (the manifest's
    ``retrieval``), which serving then uses unless its operator set them."""
    import faiss

    out_dir.mkdir(parents=True, exist_ok=True)
    vectors = item_matrix(model)
    index = build_index(vectors)
    faiss.write_index(index, str(out_dir / INDEX_FILE))
    ranker_path = out_dir / (ONNX_RANKER_FILE if isinstance(ranker, OnnxRanker) else RANKER_FILE)
    for stale in (ONNX_RANKER_FILE, RANKER_FILE):
        (out_dir / stale).unlink(missing_ok=True)
    if isinstance(ranker, OnnxRanker):
        ranker_path.write_bytes(ranker.model_bytes)
    else:
        torch.save(ranker, ranker_path)
    tables = build_tables(model, purchases, catalog, scores)
    tables.save(out_dir / TABLES_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "items": len(model.item_ids),
        "users": len(model.user_index),
        "index": type(index).__name__,
        "index_dim": int(vectors.shape[1]),
        "categories": len(tables.category_popular),
        "in_catalog": int(tables.in_catalog.sum()),
        "scores": sorted(tables.scores),
        "retrieval": dict(retrieval or {}),
        "ranker": {
            "features": list(features_of(ranker)),
            "file": ranker_path.name,
            "format": ranker_format(ranker),
            "bytes": ranker_path.stat().st_size,
            "params": ranker_params(ranker),
        },
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return [out_dir / f for f in (INDEX_FILE, ranker_path.name, TABLES_FILE, MANIFEST_FILE)]


def manifest_of(files: Path) -> dict[str, Any]:
    """A version's serving manifest (empty for format 1, which had none)."""
    path = files / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def ranker_file(files: Path) -> Path:
    """The ranker's file in a version's ``extra_files`` (``ranker.pt`` before format 3)."""
    return files / manifest_of(files).get("ranker", {}).get("file", RANKER_FILE)


def load_ranker(files: Path) -> torch.nn.Module | OnnxRanker:
    """The ranker of a version's ``extra_files``, in the format it was registered in."""
    path = ranker_file(files)
    info = manifest_of(files).get("ranker", {})
    if path.suffix == ".onnx":
        features = tuple(info.get("features", LEGACY_FEATURES))
        return OnnxRanker(
            path.read_bytes(), info.get("format", "onnx"), info.get("params", 0), features=features
        )
    return load_pickled(path).eval()


def ranker_info(files: Path, ranker: torch.nn.Module | OnnxRanker) -> dict[str, Any]:
    """Format, bytes and parameters of a loaded ranker (the manifest's, or measured)."""
    path = ranker_file(files)
    return {
        "format": ranker_format(ranker),
        "bytes": int(path.stat().st_size),
        "params": ranker_params(ranker),
    }


@dataclass
class Bundle:
    """One registry version, loaded: the model and what serves beside it."""

    version: str
    model: TwoTower
    ranker: torch.nn.Module
    index: object | None  # faiss index; None when it could not be loaded
    tables: Tables
    item_vectors: np.ndarray  # (n_items, dim + 1), the rows the index holds
    ranker_info: dict[str, Any] | None = None  # format, bytes, params (serving reports them)
    # the version's own quotas and ranking depth (the manifest's ``retrieval``, chosen on
    # validation with its ranker); empty: the settings' (``served_model.engine.version_config``)
    retrieval: dict[str, int] = field(default_factory=dict)


def load_bundle(version: str, model: TwoTower, files: Path) -> Bundle:
    """Load the artifacts in ``files`` (a version's ``extra_files``) beside ``model``.

    A missing or unreadable index leaves ``index=None``: serving then degrades to its
    fallback and counts it, rather than refusing the whole version.
    """
    import faiss

    format_version(files)  # refuses a format newer than this code
    index = None
    try:
        index = faiss.read_index(str(files / INDEX_FILE))
    except (RuntimeError, OSError):
        index = None
    ranker = load_ranker(files)
    model.eval()
    tables = Tables.load(files / TABLES_FILE)
    info = ranker_info(files, ranker)
    retrieval = manifest_of(files).get("retrieval", {})
    return Bundle(version, model, ranker, index, tables, item_matrix(model), info, retrieval)
