"""The service's guards against abusive clients (``serving.guards``) on a small app: body
limits declared and streamed, and the per-client token bucket."""

from __future__ import annotations

import pytest
from fastapi import Body, FastAPI
from fastapi.testclient import TestClient

from serving.guards import BodyLimit, RateLimit, TokenBuckets


def _app(max_bytes: int = 100, rate: float = 0.0, burst: int = 1) -> tuple[FastAPI, list]:
    refused: list[tuple[str, int]] = []
    app = FastAPI()

    @app.post("/echo")
    def echo(payload: dict = Body(...)) -> dict:
        return payload

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    def count(scope, status: int) -> None:
        refused.append((scope["path"], status))

    app.add_middleware(BodyLimit, max_bytes=max_bytes, count=count)
    if rate:
        app.add_middleware(RateLimit, rate=rate, burst=burst, count=count)
    return app, refused


def test_a_body_over_the_limit_is_a_413_declared_or_streamed():
    app, refused = _app(max_bytes=100)
    client = TestClient(app)
    assert client.post("/echo", json={"a": "x" * 50}).json() == {"a": "x" * 50}

    declared = client.post("/echo", json={"a": "x" * 200})
    assert declared.status_code == 413
    assert "over the limit of 100 bytes" in declared.json()["detail"][0]

    def chunks():  # no Content-Length: the body arrives in pieces
        yield b'{"a": "'
        for _ in range(30):
            yield b"xxxxxxxxxx"
        yield b'"}'

    streamed = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert "max_body_bytes" in streamed.json()["detail"][0]
    assert refused == [("/echo", 413), ("/echo", 413)]


def test_token_buckets_allow_the_burst_then_the_rate():
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)  # empty: the next token in 1/rate s
    assert buckets.take("b") == 0  # every client has its own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0 and buckets.take("a") > 0
    now[0] += 100  # refills up to the burst, no more
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_a_client_over_its_rate_gets_429_with_retry_after_and_probes_pass():
    app, refused = _app(rate=0.01, burst=2)
    client = TestClient(app)
    codes = [client.post("/echo", json={}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = client.post("/echo", json={})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "rate_limit_per_s" in limited.json()["detail"][0]
    assert all(client.get("/healthz").status_code == 200 for _ in range(5))
    assert refused == [("/echo", 429), ("/echo", 429)]


def test_the_rate_limit_is_off_by_default():
    from shopml.config import ServingConfig

    assert ServingConfig().rate_limit_per_s == 0
    app, _ = _app()  # built as create_app builds it with the default: no RateLimit
    client = TestClient(app)
    assert all(client.post("/echo", json={}).status_code == 200 for _ in range(50))
