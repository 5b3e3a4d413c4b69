"""The event stream: batches of accepted events, durable, in arrival order.

``POST /events`` (serving) appends one entry per accepted batch; the streaming job's Spark
source (``spark_jobs.stream_source``) reads entries after an offset. Two backends hold the
same entries under the same ids, ``<milliseconds>-<sequence>`` (Redis Stream ids):

* ``redis`` (production): a Redis Stream, ``XADD`` to append (one entry per batch, so a
  batch is applied whole or not at all) and ``XRANGE`` to read.
* ``file`` (embedded): a directory with one JSON file per entry, named by its id, written
  to a temporary name and renamed into place (atomic), ids made under an exclusive lock so
  that several service processes append in one order.

An entry's events are canonical events whose user ids are already pseudonyms
(``shopml.privacy``): the raw id never reaches the stream. Timestamps are epoch
microseconds (UTC).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from shopml.config import Settings
from shopml.secret import load_secret

START = "0-0"  # before every entry (Redis' smallest id)
_READ_CHUNK = 500
TOKEN_ENV = "SHOPML_EVENTS__TOKEN"


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"1733000000000-3"`` -> ``(1733000000000, 3)``: ids compare as these tuples."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class EventStream(Protocol):
    """What the service, the Spark source and the tests need of a stream."""

    def append(self, events: list[dict[str, object]]) -> str:
        """Append one entry holding ``events``; its id."""
        ...

    def last_id(self) -> str | None:
        """The newest entry's id, None when the stream is empty."""
        ...

    def read(self, after: str, upto: str | None = None) -> Iterator[tuple[str, list[dict]]]:
        """Entries with ``after < id <= upto`` (``upto`` None: to the end), oldest first."""
        ...


@dataclass
class RedisStream:
    """A Redis Stream at ``key`` (production)."""

    url: str
    key: str

    def __post_init__(self) -> None:
        import redis

        self.client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def append(self, events: list[dict[str, object]]) -> str:
        entry = self.client.xadd(self.key, {"events": json.dumps(events)})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def last_id(self) -> str | None:
        last = self.client.xrevrange(self.key, count=1)
        return last[0][0].decode() if last else None

    def read(self, after: str, upto: str | None = None) -> Iterator[tuple[str, list[dict]]]:
        lower = after
        while True:
            chunk = self.client.xrange(self.key, min=f"({lower}", max=upto or "+",
                                       count=_READ_CHUNK)  # fmt: skip
            for raw_id, fields in chunk:
                yield raw_id.decode(), json.loads(fields[b"events"])
            if len(chunk) < _READ_CHUNK:
                return
            lower = chunk[-1][0].decode()


@dataclass
class FileStream:
    """A directory of entries, ``<ms>-<seq>.json`` (embedded)."""

    root: Path

    def _ids(self) -> list[str]:
        if not self.root.exists():
            return []
        ids = [p.name[:-5] for p in self.root.iterdir() if p.name.endswith(".json")]
        return sorted(ids, key=parse_id)

    def append(self, events: list[dict[str, object]]) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one id order across the service's processes
            lock.seek(0)
            last = parse_id(lock.read().strip() or START)
            now = time.time_ns() // 1_000_000
            entry = f"{now}-0" if now > last[0] else f"{last[0]}-{last[1] + 1}"
            tmp = self.root / f".{entry}.tmp"
            tmp.write_text(json.dumps(events))
            os.replace(tmp, self.root / f"{entry}.json")
            lock.seek(0)
            lock.truncate()
            lock.write(entry)
            lock.flush()
        return entry

    def last_id(self) -> str | None:
        ids = self._ids()
        return ids[-1] if ids else None

    def read(self, after: str, upto: str | None = None) -> Iterator[tuple[str, list[dict]]]:
        lo, hi = parse_id(after), parse_id(upto) if upto else None
        for entry in self._ids():
            key = parse_id(entry)
            if key <= lo:
                continue
            if hi is not None and key > hi:
                return
            yield entry, json.loads((self.root / f"{entry}.json").read_text())


def redis_url(settings: Settings) -> str:
    """``events.redis_url``, else the Feast online store's Redis as a redis-py URL (Feast's
    connection string is ``host:port[,db=N][,ssl=true][,password=...]``)."""
    if settings.events.redis_url:
        return settings.events.redis_url
    address, *options = settings.feast.redis_connection.split(",")
    opts = dict(o.split("=", 1) for o in options if "=" in o)
    scheme = "rediss" if opts.get("ssl", "").lower() == "true" else "redis"
    auth = f":{quote(opts['password'], safe='')}@" if opts.get("password") else ""
    return f"{scheme}://{auth}{address}/{opts.get('db', '0')}"


def stream_options(settings: Settings) -> dict[str, str]:
    """The stream's address as plain strings: what a Spark data source receives as options
    (its reader runs in other processes and rebuilds the stream with :func:`open_stream`)."""
    ev = settings.events
    if ev.backend == "redis":
        return {"backend": "redis", "url": redis_url(settings), "key": ev.stream_name}
    return {"backend": "file", "path": str(settings.paths.event_stream)}


def open_stream(options: dict[str, str]) -> EventStream:
    if options["backend"] == "redis":
        return RedisStream(options["url"], options["key"])
    return FileStream(Path(options["path"]))


def stream_of(settings: Settings) -> EventStream:
    return open_stream(stream_options(settings))


class MissingToken(RuntimeError):
    """``POST /events`` has no token to check (production without the Secret)."""


def token_path(settings: Settings) -> Path:
    return settings.events.token_file or settings.paths.home / "secrets" / "events.token"


def load_token(settings: Settings) -> str:
    """The bearer token of ``POST /events``: the setting, else the token file, else (embedded
    only) a new random one, as with the user-id key (``shopml.secret``)."""
    return load_secret(
        settings, settings.events.token, settings.events.token_file, token_path(settings),
        env=TOKEN_ENV, what="token for POST /events", helm_value="events.existingSecret",
        error=MissingToken,
    )  # fmt: skip
