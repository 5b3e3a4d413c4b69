"""Limits that hold against abusive or broken clients, as ASGI middleware in front of the app.

* :class:`BodyLimit`: a request body over ``serving.max_body_bytes`` is a 413 before the app
  reads it, whether the client declares its length (``Content-Length``) or streams it
  (chunked): the app never holds more than the limit of one request in memory.
* :class:`RateLimit`: ``serving.rate_limit_per_s`` requests a second per client (a token
  bucket of ``serving.rate_limit_burst`` tokens), then 429 with ``Retry-After``; off by default
  (0). The client is the connection's peer as uvicorn reports it, which behind a proxy is the
  ``X-Forwarded-For`` address when uvicorn trusts that proxy (``FORWARDED_ALLOW_IPS``). Each
  process counts its own clients: behind N replicas a client gets up to N times the rate.
  Probes and metrics are never limited.

Slow clients need no guard here: uvicorn reads requests on its event loop, and the compute
threads (``serving.app``) are taken only once a whole request has arrived, so a connection
that sends its headers a byte at a time holds a socket, not a thread (a test proves it).
Every refusal is JSON ``{"detail": [...]}`` like the app's own 4xx, and counted in
``shopml_errors_total``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Count = Callable[[Scope, int], None]  # (request scope, status) -> counted

UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_CLIENTS = 100_000  # rate-limit buckets kept (least recently seen dropped first)


async def refuse(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A JSON error answer, as the app's own (``{"detail": [one line per problem]}``)."""
    body = json.dumps({"detail": [detail]}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body over ``max_bytes``: declared (``Content-Length``) or streamed.

    A streamed body that passes the limit is answered with the 413 at once; the app then
    reads a disconnect, and whatever it answers to that is dropped."""

    def __init__(self, app: ASGIApp, max_bytes: int, count: Count) -> None:
        self.app, self.max_bytes, self.count = app, max_bytes, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {self.max_bytes} bytes (serving.max_body_bytes)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            self.count(scope, 413)
            await refuse(send, 413, message)
            return
        seen, started, answered = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, answered
            msg = await receive()
            if msg["type"] == "http.request" and not answered:
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes and not started:
                    answered = True
                    self.count(scope, 413)
                    await refuse(send, 413, message)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if answered:
                return  # the 413 went out; the app's answer to the disconnect is dropped
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        await self.app(scope, limited_receive, guarded_send)


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a token was taken; otherwise the seconds until the next one."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
        return wait


class RateLimit:
    """429 (with ``Retry-After``) for a client over its rate; probes and metrics pass."""

    def __init__(self, app: ASGIApp, rate: float, burst: int, count: Count) -> None:
        self.app, self.count = app, count
        self.buckets = TokenBuckets(rate, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.buckets.take(client[0] if client else "unknown")
        if wait == 0:
            await self.app(scope, receive, send)
            return
        self.count(scope, 429)
        retry = str(max(1, math.ceil(wait))).encode()
        await refuse(
            send,
            429,
            f"rate limit of {self.buckets.rate:g} requests/s per client reached "
            "(serving.rate_limit_per_s); retry after the Retry-After seconds",
            [(b"retry-after", retry)],
        )
