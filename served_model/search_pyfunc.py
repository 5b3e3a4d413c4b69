"""A search bundle as an MLflow pyfunc model: what a ``shopml-search`` registry version is.

The version's artifacts are the bundle directory (``artifacts/bundle``), which serving reads
directly (``served_model.search.SearchBundle.load``); the pyfunc wrapper makes the same version
usable by anyone with MLflow: ``mlflow.pyfunc.load_model("models:/shopml-search@champion")
.predict(pd.DataFrame({"query": ["red summer dress"]}), params={"k": 5})``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

PIP_REQUIREMENTS = ["torch==2.13.0", "sentence-transformers", "bm25s", "PyStemmer", "faiss-cpu",
                    "rapidfuzz", "shopml"]  # fmt: skip


class SearchModel(mlflow.pyfunc.PythonModel):
    """Queries in (``query``, optional ``category``), ranked product ids and scores out."""

    def load_context(self, context) -> None:
        from served_model.search import SearchBundle, SearchEngine

        self.engine = SearchEngine(SearchBundle.load(Path(context.artifacts["bundle"])))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        k = int((params or {}).get("k", 10))
        out = []
        for row in model_input.to_dict("records"):
            result = self.engine.search(str(row["query"]), k=k, category=row.get("category"))
            out.append({"item_ids": [i for i, _ in result.items],
                        "scores": [s for _, s in result.items],
                        "fallback": result.fallback or ""})  # fmt: skip
        return pd.DataFrame(out)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "query"), ColSpec("string", "category", required=False)])
    outputs = Schema([ColSpec(Array("string"), "item_ids"), ColSpec(Array("double"), "scores"),
                      ColSpec("string", "fallback")])  # fmt: skip
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("k", "long", 10)]))


def log_search_model(bundle: Path, test_example: pd.DataFrame | None = None) -> str:
    """Log ``bundle`` as pyfunc model ``search`` in the active run; returns its models:/ URI."""
    example = None
    if test_example is not None and len(test_example):
        example = test_example[["query"]].head(2).reset_index(drop=True)
    info = mlflow.pyfunc.log_model(
        name="search",
        python_model=SearchModel(),
        artifacts={"bundle": str(bundle)},
        pip_requirements=PIP_REQUIREMENTS,
        signature=signature(),
        input_example=example,
    )
    return info.model_uri
