"""The open-loop load generator of ``benchmarks.serving``, run as its own process.

    python -m benchmarks.loadgen --url http://127.0.0.1:PORT --rate 300 --duration 30 ...

Request i is due at ``i / rate`` seconds and sent then, whatever earlier requests are doing (up
to ``MAX_CONNECTIONS`` at once); its latency is measured from that due time, so a slow server
cannot slow the schedule down and hide its own queue (no coordinated omission). See
``benchmarks/serving.py`` for why not locust.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

WARMUP_S = 2.0  # each rate runs this long before the measured --duration (connections open)
MAX_CONNECTIONS = 512  # the generator's connection pool: more waiting requests queue for one
REQUEST_TIMEOUT_S = 10.0  # a request without an answer by then counts as an error
IDLE_REUSE_S = 3.0  # an idle connection older than this is closed, not reused (uvicorn: 5 s)
SEED = 0


# --- the load generator (its own process) -------------------------------------------------------
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Connections:
    """Keep-alive connections to the server, at most ``limit`` at once (the rest wait).

    A connection idle for ``IDLE_REUSE_S`` or more is not reused: uvicorn closes idle ones
    after 5 s, and a request sent on a connection the server is closing gets no answer (that
    would be the generator's error, not the service's).
    """

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[Conn, float]] = []  # (connection, when it was last used)
        self.slots = asyncio.Semaphore(limit)
        self.opened = 0

    async def get(self) -> Conn:
        await self.slots.acquire()
        now = asyncio.get_running_loop().time()
        while self.idle:
            conn, used = self.idle.pop()
            if now - used < IDLE_REUSE_S and not conn[0].at_eof():
                return conn
            conn[1].close()
        try:
            conn = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            self.slots.release()
            raise
        self.opened += 1
        return conn

    def put(self, conn: Conn, reuse: bool) -> None:
        if reuse:
            self.idle.append((conn, asyncio.get_running_loop().time()))
        else:
            conn[1].close()
        self.slots.release()


async def fetch(pool: Connections, path: str, sent: list[float]) -> tuple[int, bytes]:
    """One GET over a pooled connection; the status code and body. Appends the send time to
    ``sent``."""
    conn = await pool.get()
    reuse = False
    try:
        reader, writer = conn
        sent.append(asyncio.get_running_loop().time())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {pool.host}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        fields = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
        body = await reader.readexactly(int(fields["content-length"]))
        reuse = fields.get("connection", "").strip() != "close"
        return int(head.split(" ", 2)[1]), body
    finally:
        pool.put(conn, reuse)


def inspect(status: int, body: bytes) -> tuple[float, float]:
    """(model version, 1 if personalised else 0) of a recommendation answer; -1 when unknown."""
    if status != 200:
        return -1.0, -1.0
    answer = json.loads(body)
    return float(answer.get("model_version") or -1), float(answer.get("fallback") is False)


async def drive(
    urls: list[str], rate: float, paths: list[str], read_answers: bool = False
) -> dict[str, object]:
    """Send ``paths[i]`` at ``i / rate`` s, each on time whatever the others are doing, to
    ``urls[i % len(urls)]``: several replicas get the requests in turn, as an ingress (nginx's
    round robin) spreads them over a Deployment's pods. Each row: due (s from the start),
    latency from due, latency from the send, status, dispatch lag, and with ``read_answers``
    the answer's model version and whether it was personalised (else -1, -1)."""
    pools = []
    for url in urls:
        host, port = url.removeprefix("http://").split(":")
        pools.append(Connections(host, int(port), MAX_CONNECTIONS))
    loop = asyncio.get_running_loop()
    rows: list[tuple[float, float, float, int, float, float, float]] = []

    async def one(due: float, path: str, pool: Connections) -> None:
        started, sent, body = loop.time(), [], b""
        try:
            status, body = await asyncio.wait_for(fetch(pool, path, sent), REQUEST_TIMEOUT_S)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            KeyError,
            ValueError,
        ):
            status = 0  # no (readable) answer
        done = loop.time()
        send = sent[0] if sent else done
        seen = inspect(status, body) if read_answers else (-1.0, -1.0)
        rows.append((due - t0, (done - due) * 1000, (done - send) * 1000, status,
                     (started - due) * 1000, *seen))  # fmt: skip

    t0 = loop.time() + 0.1
    wall_t0 = time.time() + (t0 - loop.time())  # the schedule's start on the wall clock
    tasks = []
    for i, path in enumerate(paths):
        due = t0 + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(one(due, path, pools[i % len(pools)])))
    await asyncio.gather(*tasks)
    return {
        "rows": sorted(rows),
        "connections": sum(pool.opened for pool in pools),
        "wall_t0": wall_t0,
    }


def loadgen_main(argv: list[str]) -> None:
    """drive one rate, write every request to ``--out`` (JSON)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    p.add_argument("--url", required=True, help="base URL; comma-separated: replicas in turn")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--unknown-share", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--read-answers",
        action="store_true",
        help="record each answer's model version and personalisation (benchmarks.chaos)",
    )
    p.add_argument("--explain", action="store_true", help="ask every answer's reasons")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--users-file", type=Path, help="known user ids, one a line")
    who.add_argument("--paths-file", type=Path, help="request paths (e.g. /search?q=...), "
                     "one a line, sent in a seeded random order")  # fmt: skip
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    n = int((WARMUP_S + args.duration) * args.rate)
    if args.paths_file:
        given = args.paths_file.read_text().split()
        paths = [rng.choice(given) for _ in range(n)]
    else:
        users = args.users_file.read_text().split()
        query = f"?k={args.k}" + ("&explain=true" if args.explain else "")
        paths = [
            f"/recommendations/new-user-{rng.randrange(10**9)}{query}"
            if rng.random() < args.unknown_share
            else f"/recommendations/{rng.choice(users)}{query}"
            for _ in range(n)
        ]
    result = asyncio.run(drive(args.url.split(","), args.rate, paths, args.read_answers))
    args.out.write_text(json.dumps({"rate": args.rate, "warmup_s": WARMUP_S, **result}))


if __name__ == "__main__":
    loadgen_main(sys.argv[1:])
