"""The recommendation service: two-stage retrieval and ranking of the registry's champion.

Start with ``shopml serve`` (uvicorn). Endpoints:

* ``GET /recommendations/{user_id}?k=10[&category=...]``: one user,
* ``POST /recommendations`` ``{"user_ids": [...], "k": 10}``: many users, one online read,
* ``GET /items/{item_id}/similar?k=10``: nearest items in the two-tower's item space,
* ``GET /search?q=...&k=10[&user_id=...&category=...]``: product search with the
  ``shopml-search`` champion (hybrid BM25 + dense retrieval, cross-encoder rerank, facets,
  typo tolerance, a zero-result fallback that says so; ``served_model.search``),
* ``POST /events`` ``{"events": [...]}``: real-time events (bearer token), validated whole
  and appended to the event stream as one entry (``shopml.stream``), or refused whole,
* ``GET /metrics`` (Prometheus), ``GET /healthz`` (liveness), ``GET /readyz`` (readiness).

Every answer names the registry version and A/B arm that produced it. User ids arrive as the
retailer knows them and are pseudonymized at once with the pipeline's key
(``shopml.privacy``): the engine, the A/B split and the request log only see the pseudonym,
and the log carries no IP (``privacy.log_client_ip``) and no query text beyond
``privacy.log_query_chars``. Bad parameters are
422s with a message; an unknown item is a 404; Feast or the index unavailable degrades to the
popularity fallback (counted in ``shopml_fallbacks_total``), never a 5xx.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal, TypeVar

from anyio import CapacityLimiter, to_thread
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from served_model.engine import Ranked, UnknownItem
from served_model.features import FeaturesUnavailable
from serving.guards import BodyLimit, RateLimit, Scope
from serving.models import Arm, ModelHolder
from serving.observability import Metrics, configure_json_logging
from shopml import schema as S
from shopml.config import Settings, load_settings
from shopml.privacy import Pseudonymizer
from shopml.stream import MissingToken, load_token, stream_of

MAX_K = 1000
MAX_ID_LENGTH = S.MAX_ID_LENGTH
MAX_BATCH_USERS = 1000
# No whitespace, control characters or slashes. Spelled out beyond \s so that Python's regex
# (the service) and ECMA's (the OpenAPI schema's clients) agree on every character.
ID_PATTERN = r"^[^\x00-\x20\x7f\x85\ufeff/\s]+$"
QUERY_PATTERN = r"[^\x00-\x20\x7f\x85\ufeff\s]"  # a query is not only spaces (same care)

log = logging.getLogger("serving.app")
T = TypeVar("T")


def _id_path() -> object:
    """A validated id path parameter (one instance per parameter: FastAPI binds it by name)."""
    return Path(..., min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)


def _k() -> object:
    return Query(10, ge=1, le=MAX_K, description=f"number of items, 1..{MAX_K}")


class Reason(BaseModel):
    kind: str = Field(description="'source': the candidate source that found the item; "
                      "'ranker': one of the ranker's strongest attributions")  # fmt: skip
    text: str = Field(description="the reason in plain words")
    source: str | None = Field(None, description="history, user_knn, ease, ann, item_knn, popular")
    group: str | None = Field(None, description="the ranker's feature group")
    effect: float | None = Field(
        None, description="the group's effect on the ranker's logit against the average candidate"
    )


class Recommendation(BaseModel):
    item_id: str
    score: float
    reasons: list[Reason] | None = Field(None, description="with explain=true")


class Recommendations(BaseModel):
    user_id: str
    model_version: str
    arm: str = Field(description="the registry alias that served this user (A/B arm)")
    fallback: bool = Field(description="true when the popularity fallback answered")
    fallback_reason: str | None = None
    items: list[Recommendation]


UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]


class BatchRequest(BaseModel):
    # the same rule as the path of GET /recommendations/{user_id}, in the schema
    user_ids: list[UserId] = Field(..., min_length=1, max_length=MAX_BATCH_USERS)
    k: int = Field(10, ge=1, le=MAX_K)
    category: str | None = Field(None, max_length=MAX_ID_LENGTH)
    explain: bool = Field(  # strict: 1 or "yes" is not the schema's boolean
        False, strict=True, description="each item's reasons (costs a little latency)"
    )


class BatchRecommendations(BaseModel):
    results: list[Recommendations]


class SimilarItems(BaseModel):
    item_id: str
    model_version: str
    items: list[Recommendation]


class SearchHit(BaseModel):
    item_id: str
    score: float
    category: str


class SearchAnswer(BaseModel):
    query: str = Field(description="the query as received")
    normalized_query: str = Field(description="as retrieved: normalised, typos corrected")
    corrected: dict[str, str] = Field(description="each corrected word -> the catalog's word")
    model_version: str
    arm: str
    fallback: bool = Field(description="true when part of the stack did not answer")
    fallback_reason: str | None = Field(
        None,
        description="comma-separated: relaxed_query, popular_in_category (zero results), "
        "dense_unavailable, reranker_unavailable (degraded to BM25)",
    )
    personalized: bool
    facets: dict[str, int] = Field(description="category -> count among the candidates")
    items: list[SearchHit]


MAX_SEARCH_K = 100


class Event(BaseModel):
    """One canonical event (README, 'Canonical schema'), judged by the rules cleaning applies
    in the lake (``spark_jobs.clean.flag_events``) so that nothing accepted here is
    quarantined there for its own content."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored

    user_id: UserId
    item_id: UserId
    event_type: Literal[S.EVENT_TYPES]  # type: ignore[valid-type]
    timestamp: AwareDatetime = Field(
        description="ISO-8601 with a zone (or epoch seconds), from 2000 to now + "
        "events.max_future_s"
    )
    session_id: UserId | None = None
    query: str | None = Field(None, max_length=512)


class EventBatch(BaseModel):
    events: list[Event] = Field(..., min_length=1)


class EventsAccepted(BaseModel):
    accepted: int = Field(description="events appended, all of the batch")
    entry_id: str = Field(description="the stream entry holding them (<ms>-<seq>)")


class Problem(BaseModel):
    """Every error answer: what was wrong, one line per problem (a 422 lists each bad
    parameter; the others say what to do)."""

    detail: list[str] | str


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    """The documented error answers of a route (``Problem`` bodies)."""
    why = {
        400: "the body is not JSON",
        401: "no or a wrong bearer token",
        404: "unknown id",
        413: "request body over serving.max_body_bytes",
        422: "invalid parameters, one line each",
        429: "over the per-client rate limit (serving.rate_limit_per_s; Retry-After says when)",
        503: "no model loaded for this endpoint yet, or (events) the stream is unavailable",
    }
    return {code: {"model": Problem, "description": why[code]} for code in codes}


def create_app(settings: Settings | None = None, holder: ModelHolder | None = None) -> FastAPI:
    settings = settings or load_settings()
    metrics = holder.metrics if holder else Metrics()
    pseudonym = Pseudonymizer.of(settings)  # fails fast without a key (production)
    privacy = settings.privacy
    holder = holder or ModelHolder(settings, metrics)

    # The compute of each kind of request runs on worker threads of its own pool (anyio
    # limiters, made in the lifespan: they belong to the event loop). The work holds the GIL
    # most of the time, so threads beside each other only contend: at 500 requests/s one
    # recommendation thread per process answered with p99 11 ms, two or four with p99
    # 290-460 ms (the GIL's hand-offs made every answer slower until the queue never
    # drained). Search (a rerank of tens of milliseconds, mostly in ONNX Runtime without the
    # GIL) and batches (up to MAX_BATCH_USERS users) get a thread each, so neither makes a
    # single-user recommendation wait behind it.
    pools: dict[str, CapacityLimiter] = {}

    async def compute(pool: str, fn: Callable[..., T], *args: object) -> T:
        return await to_thread.run_sync(fn, *args, limiter=pools[pool])

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        pools.update(recommendations=CapacityLimiter(settings.serving.threads),
                     batch=CapacityLimiter(1),
                     search=CapacityLimiter(1),
                     events=CapacityLimiter(1))  # fmt: skip
        await run_in_threadpool(holder.sync)
        if holder.arms.get("champion") is None:
            raise RuntimeError(
                f"no loadable 'champion' alias on model '{settings.model_name}': run the "
                "nightly pipeline (make demo) first; the log above says why a version failed"
            )
        holder.start()
        yield
        holder.stop()

    app = FastAPI(title="ShopML recommendations", lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics

    def refused(scope: Scope, status: int) -> None:
        metrics.errors.labels(_endpoint_of(scope["method"], scope["path"]), str(status)).inc()

    serving = settings.serving
    app.add_middleware(BodyLimit, max_bytes=serving.max_body_bytes, count=refused)
    if serving.rate_limit_per_s:  # outermost: a refused client costs no body read
        app.add_middleware(
            RateLimit, rate=serving.rate_limit_per_s, burst=serving.rate_limit_burst,
            count=refused,
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one readable line per problem, counted like every error."""
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors()
        ]
        metrics.errors.labels(_endpoint_of(request.method, request.url.path), "422").inc()
        return JSONResponse(status_code=422, content={"detail": problems})

    def client_of(request: Request) -> dict[str, str]:
        """The log's ``client`` field: the address, only where ``privacy.log_client_ip``
        allows (else no field)."""
        if privacy.log_client_ip and request.client:
            return {"client": request.client.host}
        return {}

    def answer(arm: Arm, user_id: str, ranked: Ranked) -> dict[str, object]:
        """A ``Recommendations`` as plain JSON data.

        The hot endpoints return ``JSONResponse`` of these: FastAPI then skips validating
        and re-serializing its own output through the response model (a third of the HTTP
        overhead per request here); the models still document the API, and the tests
        validate real answers against them.
        """
        return {
            "user_id": user_id,
            "model_version": arm.version,
            "arm": arm.alias,
            "fallback": ranked.fallback is not None,
            "fallback_reason": ranked.fallback,
            "items": [{"item_id": i, "score": s} for i, s in ranked.items]
            if ranked.reasons is None
            else [
                {"item_id": i, "score": s, "reasons": r}
                for (i, s), r in zip(ranked.items, ranked.reasons, strict=True)
            ],
        }

    def observe(arm: Arm, ranked: Ranked) -> None:
        for stage, seconds in ranked.stages.items():
            metrics.stage.labels(stage).observe(seconds)
        for source, n in ranked.candidates.items():
            metrics.candidates.labels(source).observe(n)
        if ranked.ann_memo:
            metrics.ann_memo.labels(ranked.ann_memo).inc()
        if ranked.fallback:
            metrics.fallbacks.labels(ranked.fallback, arm.alias).inc()

    def champion() -> Arm:
        arm = holder.arms.get("champion")
        if arm is None:
            metrics.errors.labels("any", "503").inc()
            raise HTTPException(503, "no model loaded yet")
        return arm

    # Probes and metrics run on the event loop, not in the capped compute pool: an
    # overloaded pod must still answer its kubelet and its Prometheus.
    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness: the process answers (a missing model is readiness, not a reason to restart)."""
        arm = holder.arms.get("champion")
        return {"status": "ok", "model_version": arm.version if arm else None}

    @app.get("/readyz", responses=_errors(503))
    async def readyz() -> dict[str, object]:
        """Readiness: the champion is loaded, so traffic may be routed here."""
        arm = champion()
        arms = {a.alias: a.version for a in holder.arms.values()}
        return {
            "status": "ready",
            "model_version": arm.version,
            "arms": arms,
            "models": holder.served_models(),  # each part's format, bytes and parameters
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus' text exposition format."""
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get(
        "/recommendations/{user_id}",
        response_model=Recommendations,
        responses=_errors(422, 429, 503),
    )
    async def recommend_endpoint(
        request: Request,
        user_id: str = _id_path(),
        k: int = _k(),
        category: str | None = Query(None, max_length=MAX_ID_LENGTH),
        explain: bool = Query(False, description="each item's reasons, in plain words"),
    ) -> JSONResponse:
        return await compute(
            "recommendations", recommend, user_id, k, category, client_of(request), explain
        )

    def recommend(
        user_id: str, k: int, category: str | None, client: dict[str, str], explain: bool = False
    ) -> JSONResponse:
        started = time.perf_counter()
        user = pseudonym(user_id)
        arm = holder.for_user(user) or champion()
        ranked = arm.engine.recommend(user, k, category, explain)
        observe(arm, ranked)
        elapsed = time.perf_counter() - started
        metrics.latency.labels("recommendations", arm.alias).observe(elapsed)
        log.info("recommend", extra={
            "user_id": user, "k": k, "arm": arm.alias, "model_version": arm.version,
            "fallback": ranked.fallback, "ms": round(elapsed * 1000, 2),
            "stages_ms": {s: round(v * 1000, 2) for s, v in ranked.stages.items()},
            "candidates": ranked.candidates, **client})  # fmt: skip
        return JSONResponse(answer(arm, user_id, ranked))

    @app.post(
        "/recommendations",
        response_model=BatchRecommendations,
        responses=_errors(400, 413, 422, 429, 503),
    )
    async def recommend_batch_endpoint(
        http: Request, request: BatchRequest = Body(...)
    ) -> JSONResponse:
        return await compute("batch", recommend_batch, request, client_of(http))

    def recommend_batch(request: BatchRequest, client: dict[str, str]) -> JSONResponse:
        started = time.perf_counter()
        by_arm: dict[str, list[str]] = {}
        arms: dict[str, Arm] = {}
        users_of = {u: pseudonym(u) for u in request.user_ids}  # raw id -> pseudonym
        for u, user in users_of.items():
            arm = holder.for_user(user) or champion()
            arms[arm.alias] = arm
            by_arm.setdefault(arm.alias, []).append(u)
        results: dict[str, dict[str, object]] = {}
        for alias, raw in by_arm.items():
            arm = arms[alias]
            ranked_all = arm.engine.recommend_many(
                [users_of[u] for u in raw], request.k, request.category, request.explain
            )
            for u, ranked in zip(raw, ranked_all, strict=True):
                observe(arm, ranked)
                results[u] = answer(arm, u, ranked)
        elapsed = time.perf_counter() - started
        metrics.latency.labels("recommendations_batch", "mixed").observe(elapsed)
        fallbacks = sum(r["fallback"] for r in results.values())
        log.info("recommend_batch", extra={
            "users": len(results), "k": request.k, "arms": {a: len(u) for a, u in by_arm.items()},
            "fallbacks": fallbacks, "ms": round(elapsed * 1000, 2), **client})  # fmt: skip
        return JSONResponse({"results": [results[u] for u in request.user_ids]})

    @app.get(
        "/items/{item_id}/similar",
        response_model=SimilarItems,
        responses=_errors(404, 422, 429, 503),
    )
    async def similar_endpoint(item_id: str = _id_path(), k: int = _k()) -> SimilarItems:
        return await compute("recommendations", similar, item_id, k)

    def similar(item_id: str, k: int) -> SimilarItems:
        started = time.perf_counter()
        arm = champion()
        try:
            items = arm.engine.similar(item_id, k)
        except UnknownItem:
            metrics.errors.labels("similar", "404").inc()
            raise HTTPException(
                404, f"item '{item_id}' is not in the catalog of model version {arm.version}"
            ) from None
        except FeaturesUnavailable:
            metrics.fallbacks.labels("index_unavailable", arm.alias).inc()
            items = arm.engine.popular(k)
        elapsed = time.perf_counter() - started
        metrics.latency.labels("similar", arm.alias).observe(elapsed)
        log.info("similar", extra={"item_id": item_id, "k": k, "model_version": arm.version,
                                   "ms": round(elapsed * 1000, 2)})  # fmt: skip
        return SimilarItems(
            item_id=item_id,
            model_version=arm.version,
            items=[Recommendation(item_id=i, score=s) for i, s in items],
        )

    max_query = settings.search.max_query_chars

    @app.get("/search", response_model=SearchAnswer, responses=_errors(422, 429, 503))
    async def search_endpoint(
        request: Request,
        q: str = Query(..., min_length=1, max_length=max_query, pattern=QUERY_PATTERN,
                       description=f"the query, 1..{max_query} characters, not only spaces"),
        k: int = Query(10, ge=1, le=MAX_SEARCH_K, description=f"1..{MAX_SEARCH_K}"),
        user_id: str | None = Query(None, min_length=1, max_length=MAX_ID_LENGTH,
                                    pattern=ID_PATTERN),
        category: str | None = Query(None, max_length=MAX_ID_LENGTH),
    ) -> JSONResponse:  # fmt: skip
        return await compute("search", search, q, k, user_id, category, client_of(request))

    def search(
        q: str, k: int, user_id: str | None, category: str | None, client: dict[str, str]
    ) -> JSONResponse:
        started = time.perf_counter()
        arm = holder.search
        if arm is None:
            metrics.errors.labels("search", "503").inc()
            raise HTTPException(
                503,
                f"no '{settings.search.model_name}' champion is loaded: run the search_retrain "
                "DAG (or `shopml search ...`) to register one",
            )
        affinity: dict[str, float] = {}
        user = pseudonym(user_id) if user_id is not None else None
        if user is not None and (rec := holder.for_user(user)) is not None:
            affinity = arm.engine.affinity(rec.engine.purchases(user))
        result = arm.engine.search(q, k, category, affinity or None)
        for stage, seconds in result.stages.items():
            metrics.stage.labels(f"search_{stage}").observe(seconds)
        for reason in (result.fallback or "").split(","):
            if reason:
                metrics.fallbacks.labels(reason, "search").inc()
        elapsed = time.perf_counter() - started
        metrics.latency.labels("search", "champion").observe(elapsed)
        said = {"q": q[: privacy.log_query_chars]} if privacy.log_query_chars else {}
        log.info("search", extra={
            "q_chars": len(q), **said, "user_id": user, "k": k, "model_version": arm.version,
            "fallback": result.fallback, "ms": round(elapsed * 1000, 2),
            "candidates": result.candidates, **client,
            "stages_ms": {s: round(v * 1000, 2) for s, v in result.stages.items()}})  # fmt: skip
        return JSONResponse({
            "query": q, "normalized_query": result.query, "corrected": result.corrected,
            "model_version": arm.version, "arm": "champion",
            "fallback": result.fallback is not None, "fallback_reason": result.fallback,
            "personalized": bool(affinity), "facets": result.facets,
            "items": [{"item_id": i, "score": sc, "category": arm.engine.category_of(i)}
                      for i, sc in result.items],
        })  # fmt: skip

    events_cfg = settings.events
    try:
        token: str | None = load_token(settings)
        no_token = ""
    except MissingToken as exc:  # the rest of the service still serves
        token, no_token = None, str(exc)
    app.state.stream = stream_of(settings)  # an attribute: tests swap in a failing one
    earliest = datetime.fromisoformat(S.MIN_EVENT_TIME).replace(tzinfo=UTC)

    def authorized(authorization: str | None = Header(None)) -> None:
        """``Authorization: Bearer <events token>``, checked before the body is judged."""
        if token is None:
            metrics.errors.labels("events", "503").inc()
            raise HTTPException(503, no_token)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            metrics.errors.labels("events", "401").inc()
            raise HTTPException(
                401, "POST /events needs 'Authorization: Bearer <token>' with the events token",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    @app.post(
        "/events",
        status_code=202,
        response_model=EventsAccepted,
        responses=_errors(400, 401, 413, 422, 429, 503),
        dependencies=[Depends(authorized)],
    )
    async def events_endpoint(batch: EventBatch = Body(...)) -> JSONResponse:
        """Append a batch of events to the stream: all of it, or none with a 422 that names
        each bad event."""
        now = datetime.now(UTC)
        latest = now + timedelta(seconds=events_cfg.max_future_s)
        problems: list[str] = []
        if len(batch.events) > events_cfg.max_batch:
            problems.append(f"events: {len(batch.events)} events, over events.max_batch "
                            f"({events_cfg.max_batch}); send smaller batches")  # fmt: skip
        for i, e in enumerate(batch.events):
            if e.timestamp < earliest:
                problems.append(f"events.{i}.timestamp: before {S.MIN_EVENT_TIME} UTC")
            elif e.timestamp > latest:
                problems.append(
                    f"events.{i}.timestamp: {e.timestamp.isoformat()} is later than now + "
                    f"{events_cfg.max_future_s:g} s (events.max_future_s): a clock is wrong"
                )
        if problems:
            metrics.errors.labels("events", "422").inc()
            metrics.events.labels("refused").inc(len(batch.events))
            return JSONResponse(status_code=422, content={"detail": problems})
        return await compute("events", append_events, batch)

    def append_events(batch: EventBatch) -> JSONResponse:
        rows = [
            {
                S.USER_ID: pseudonym(e.user_id),
                S.ITEM_ID: e.item_id,
                S.EVENT_TYPE: e.event_type,
                S.TIMESTAMP: round(e.timestamp.timestamp() * 1_000_000),  # epoch microseconds
                S.SESSION_ID: e.session_id,
                S.QUERY: e.query,
            }
            for e in batch.events
        ]
        try:
            entry = app.state.stream.append(rows)
        except Exception as exc:  # redis.ConnectionError, OSError: nothing was appended
            metrics.errors.labels("events", "503").inc()
            metrics.events.labels("unavailable").inc(len(rows))
            log.warning("events_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise HTTPException(
                503, f"the event stream is unavailable ({type(exc).__name__}); nothing was "
                "appended: send the batch again", headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        metrics.events.labels("accepted").inc(len(rows))
        log.info("events", extra={"accepted": len(rows), "entry_id": entry})
        return JSONResponse(status_code=202, content={"accepted": len(rows), "entry_id": entry})

    return app


def serving_app() -> FastAPI:
    """The app as ``shopml serve`` runs it, also the factory each ``--workers`` process calls:
    JSON logs, single-threaded kernels, settings from the environment."""
    configure_json_logging()
    single_threaded_kernels()
    return create_app(load_settings())


def single_threaded_kernels() -> None:
    """One thread per torch and faiss call, for the serving process.

    A request ranks ~200 rows: splitting that across cores gains nothing, and when the cores
    are busy each step waits for its second thread (measured: sequential requests at p50
    44 ms instead of 1.6 ms beside other work). Concurrency comes from requests instead.
    """
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def _endpoint_of(method: str, path: str) -> str:
    """The ``endpoint`` label of a request."""
    if path.startswith("/items/"):
        return "similar"
    if path.startswith("/search"):
        return "search"
    if path.startswith("/events"):
        return "events"
    if not path.startswith("/recommendations"):
        return "other"
    return "recommendations_batch" if method == "POST" else "recommendations"
