"""MLflow tracking and the model registry (aliases, not stages).

``champion`` is the alias serving loads; it moves only through :func:`promote_if_better`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from shopml.config import Settings

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from served_model.two_tower import TwoTower

log = logging.getLogger(__name__)

EXPERIMENT = "shopml-nightly"
CHAMPION = "champion"
CHALLENGER = "challenger"  # optional: serving sends a configured share of users to it
# What a serving image needs to unpickle the model; explicit so MLflow does not infer
# requirements by importing half of the environment.
PIP_REQUIREMENTS = ["torch==2.13.0", "shopml"]


def use_tracking(settings: Settings) -> None:
    """Point this process's MLflow client at the profile's tracking/registry server."""
    import mlflow

    if settings.tracking_uri.startswith("sqlite:///"):
        settings.paths.mlflow.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        # The artifact root is fixed when the experiment is created (the server's default
        # root is not used): runs and logged models are stored under it.
        mlflow.create_experiment(EXPERIMENT, artifact_location=settings.artifact_root)
    elif settings.mlflow_artifact_root and not experiment.artifact_location.startswith(
        settings.mlflow_artifact_root.rstrip("/")
    ):
        log.warning(
            "experiment %s keeps its artifact location %s; SHOPML_MLFLOW_ARTIFACT_ROOT=%s "
            "applies to new experiments only",
            EXPERIMENT,
            experiment.artifact_location,
            settings.mlflow_artifact_root,
        )
    mlflow.set_experiment(EXPERIMENT)


def start_run(settings: Settings, ds: str, params: dict[str, object]) -> str:
    """Create the run every training task of this DAG run logs into; returns its id."""
    import mlflow

    use_tracking(settings)
    with mlflow.start_run(run_name=f"nightly-{ds}", tags={"ds": ds}) as run:
        mlflow.log_params(params)
    return run.info.run_id


def served_signature(model: TwoTower):
    """What the served model answers, as MLflow shows it on the version's page: a user id and
    the user's online features in, ``k`` as a parameter, ranked item ids and scores out.

    Serving loads the bundle itself (``served_model.bundle``), not through pyfunc, so this
    documents the contract of ``/recommendations`` rather than pyfunc's tensor call."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "user_id"),
                     *(ColSpec("double", f) for f in model.feature_names)])  # fmt: skip
    outputs = Schema([ColSpec(Array("string"), "item_ids"), ColSpec(Array("double"), "scores")])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("k", "long", 10)]))


def log_model(
    settings: Settings,
    run_id: str,
    model: TwoTower,
    name: str,
    extra_files: list[Path] | None = None,
    input_example: pd.DataFrame | None = None,
) -> str:
    """Log ``model`` as an MLflow PyTorch model in ``run_id``; returns its models:/ URI.

    ``extra_files`` travel inside the model (``extra_files/``), so a registry version carries
    what serving needs beside the weights (serving/bundle.py). The signature and
    ``input_example`` (real users' online features) say what it is called with.
    """
    import mlflow

    use_tracking(settings)
    # MLflow tries the example through pyfunc's tensor call, which is not how the model is
    # served (see served_signature), and warns that it failed; that warning is muted.
    checker = logging.getLogger("mlflow.models.model")
    level = checker.level
    checker.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id):
            # pickle, not pt2: the module carries its id vocabularies and `recommend` by raw ids.
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                pip_requirements=PIP_REQUIREMENTS,
                serialization_format="pickle",
                extra_files=[str(f) for f in extra_files] if extra_files else None,
                signature=served_signature(model),
                input_example=input_example,
            )
    finally:
        checker.setLevel(level)
    return info.model_uri


MODEL_DESCRIPTION = (
    "ShopML's served recommender: two-tower retrieval (faiss) + DCN-v2 ranker over candidate "
    "sources, with Feast online features. Each version is one nightly run; its description "
    "is the promotion gate's decision. Serving loads the version under the `champion` alias."
)


def register(
    settings: Settings, model_uri: str, run_id: str, tags: dict[str, str] | None = None
) -> str:
    """A new registry version (every trained model is registered, promoted or not)."""
    import mlflow
    from mlflow import MlflowClient

    use_tracking(settings)
    version = mlflow.register_model(
        model_uri, settings.model_name, tags={"run_id": run_id, **(tags or {})}
    )
    client = MlflowClient()
    if not client.get_registered_model(settings.model_name).description:
        client.update_registered_model(settings.model_name, description=MODEL_DESCRIPTION)
    return str(version.version)


def describe_version(settings: Settings, version: str, description: str) -> None:
    """The version's description (markdown in the registry UI): what the gate decided, why."""
    from mlflow import MlflowClient

    use_tracking(settings)
    MlflowClient().update_model_version(settings.model_name, version, description=description)


def alias_version(settings: Settings, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    use_tracking(settings)
    try:
        mv = MlflowClient().get_model_version_by_alias(settings.model_name, alias)
    except MlflowException:
        return None
    return str(mv.version)


def version_exists(settings: Settings, version: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    use_tracking(settings)
    try:
        MlflowClient().get_model_version(settings.model_name, version)
    except MlflowException:
        return False
    return True


def search_settings(settings: Settings) -> Settings:
    """The same settings naming search's registered model (``SearchConfig.model_name``): every
    function of this module then reads and moves ``shopml-search``'s versions and aliases."""
    return settings.model_copy(update={"model_name": settings.search.model_name})


def champion_version(settings: Settings) -> str | None:
    return alias_version(settings, CHAMPION)


def download_version(settings: Settings, version: str, dst: Path) -> Path:
    """The version's model directory (MLmodel, weights, ``extra_files/``), copied under ``dst``."""
    import mlflow

    use_tracking(settings)
    uri = f"models:/{settings.model_name}/{version}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def load_servable(
    settings: Settings, version: str, dst: Path
) -> tuple[TwoTower, torch.nn.Module | None, dict[str, int]]:
    """A version's two-tower, the ranker registered with it (None when it has none) and its
    own retrieval settings (the manifest's ``retrieval``; empty: the settings')."""
    from served_model.bundle import load_model_dir, load_ranker, manifest_of, ranker_file

    local = download_version(settings, version, dst)
    files = local / "extra_files"
    ranker = load_ranker(files) if ranker_file(files).exists() else None
    return load_model_dir(local), ranker, manifest_of(files).get("retrieval", {})


def set_champion(settings: Settings, version: str) -> None:
    set_alias(settings, CHAMPION, version)


def set_alias(settings: Settings, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    use_tracking(settings)
    MlflowClient().set_registered_model_alias(settings.model_name, alias, version)


def delete_alias(settings: Settings, alias: str) -> None:
    """Remove ``alias`` (serving then sends its users to the champion); absent is fine."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    use_tracking(settings)
    with contextlib.suppress(MlflowException):
        MlflowClient().delete_registered_model_alias(settings.model_name, alias)


def version_tags(settings: Settings, version: str) -> dict[str, str]:
    """The tags a version was registered with (``ds``, ``run_id``, an intraday update's
    ``data_end`` and ``warm_start_of`` ...)."""
    from mlflow import MlflowClient

    use_tracking(settings)
    return dict(MlflowClient().get_model_version(settings.model_name, version).tags)
