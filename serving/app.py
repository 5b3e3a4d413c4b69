"""FastAPI service: the MLflow champion + the user's Feast online features.

Start with ``shopml serve`` (uvicorn). The model is loaded once at startup from
``models:/<name>@champion``; users unknown to the model, or with no online features, get
the popularity list the champion was trained with.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Path, Query
from pydantic import BaseModel

from shopml.config import Settings, load_settings

MAX_K = 100


class Recommendation(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    user_id: str
    model_version: str
    fallback: bool  # true when the popularity list answered
    items: list[Recommendation]


@dataclass
class Champion:
    version: str
    model: Any  # training.model.TwoTower
    store: Any  # feast.FeatureStore


def load_champion(settings: Settings) -> Champion:
    from shopml.feast_store import open_store
    from training import registry

    version = registry.champion_version(settings)
    if version is None:
        raise RuntimeError(
            f"no '{registry.CHAMPION}' alias on model '{settings.model_name}': run the nightly "
            "pipeline (make demo) first"
        )
    return Champion(version, registry.load_version(settings, version), open_store(settings))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    state: dict[str, Champion] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state["champion"] = load_champion(settings)
        yield
        state.clear()

    app = FastAPI(title="ShopML recommendations", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str | None]:
        """Liveness: the process answers (a missing model is readiness, not a reason to restart)."""
        champ = state.get("champion")
        return {"status": "ok", "model_version": champ.version if champ else None}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        """Readiness: the champion is loaded, so traffic may be routed here."""
        champ = state.get("champion")
        if champ is None:
            raise HTTPException(503, "model not loaded")
        return {"status": "ready", "model_version": champ.version}

    @app.get("/recommendations/{user_id}", response_model=Recommendations)
    def recommend(
        user_id: str = Path(..., min_length=1, max_length=128),
        k: int = Query(10, ge=1, le=MAX_K, description=f"number of items, 1..{MAX_K}"),
    ) -> Recommendations:
        champ = state["champion"]
        model = champ.model
        features = _online_features(champ, user_id)
        if user_id not in model.user_index or features is None:
            items = [Recommendation(item_id=i, score=0.0) for i in model.popular_items[:k]]
            return Recommendations(
                user_id=user_id, model_version=champ.version, fallback=True, items=items
            )
        (top,) = model.recommend([user_id], [features], k)
        return Recommendations(
            user_id=user_id,
            model_version=champ.version,
            fallback=False,
            items=[Recommendation(item_id=i, score=s) for i, s in top],
        )

    return app


def _online_features(champ: Champion, user_id: str) -> dict[str, Any] | None:
    """The user's features from the Feast online store, or None when it has none."""
    service = champ.store.get_feature_service("recommender_serving")
    row = champ.store.get_online_features(features=service, entity_rows=[{"user_id": user_id}])
    values = {k: v[0] for k, v in row.to_dict().items()}
    if all(values.get(f) is None for f in champ.model.feature_names):
        return None
    return values
