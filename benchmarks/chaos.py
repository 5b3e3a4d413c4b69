"""Chaos benchmark: the service under load while its dependencies fail, then a soak.

    python -m benchmarks.chaos                        # every fault, then a 10-minute soak
    python -m benchmarks.chaos --soak-minutes 1 --items 2000 --users 500   # a quick look

Production profile, loopback only, bounded in time. It starts its **own** Redis (append-only
file, so a restart keeps the online store, as a Redis with persistence does) and its own
PostgreSQL cluster (``initdb`` in ``var/chaos/``) on free ports, never touching the machine's
shared servers, and removes both at the end. The service reaches PostgreSQL (the MLflow
registry and the Feast registry) through a TCP relay in this process, so the registry can be
made unreachable for the service alone while this script still moves aliases directly.

It builds a synthetic deployment through the production backends (``serving.synthetic``:
Feast features in Redis, three registered versions in MLflow on PostgreSQL), starts ``shopml
serve --workers 2`` (aliases checked every 2 s) and drives ``GET /recommendations`` at
``--rate`` (300) requests/s with the open-loop generator of ``benchmarks.serving``, reading
every answer's model version and whether it was personalised. Each fault gets its own load
run, its windows cut by wall-clock marks:

* **redis**: Redis is stopped for 20 s, then started again;
* **registry**: PostgreSQL becomes unreachable for the service, the champion alias is moved
  while it is, and it becomes reachable 20 s later;
* **swap**: the champion alias is moved to another version mid-load;
* **worker**: one of the two worker processes is killed (SIGKILL); uvicorn starts a new one;
* **soak**: ``--soak-minutes`` (10) at the same rate; RSS, open file descriptors and threads
  of the server processes sampled every 10 s.

It prints one table (fault, window, requests, 5xx, requests without an answer, fallbacks by
reason from ``/metrics``, p50/p99 during and after) with what each fault must show, and the
soak's figures, and writes everything to ``var/benchmarks/chaos.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.loadgen import WARMUP_S
from benchmarks.measure import Samples, label_values, percentiles, scrape, total
from benchmarks.serving import free_port, start_server, stop_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "var" / "chaos"
OUT = ROOT / "var" / "benchmarks"
RELOAD_S = 2.0  # the service's alias check interval in this benchmark
PG_USER = "postgres"


# --- the servers this benchmark owns -------------------------------------------------------------
def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name) or name


class Postgres:
    """A throwaway PostgreSQL cluster on ``port`` (trust authentication, loopback)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data = root / "data"

    def start(self) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        if not self.data.exists():
            initdb = [_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", PG_USER]
            subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options,
                                     "-l", str(self.root / "log"), "-w", "start"]),
                       check=True, capture_output=True)  # fmt: skip
        for db in ("mlflow", "feast"):
            subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", PG_USER, db], check=True, capture_output=True)  # fmt: skip
        return self

    def stop(self) -> None:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast",
                                     "-w", "stop"]), capture_output=True)  # fmt: skip


class Redis:
    """A Redis of its own on ``port``, persisted to an append-only file in ``root``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> Redis:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
               str(self.root), "--appendonly", "yes", "--appendfsync", "always",
               "--save", ""]  # fmt: skip
        log = (self.root / "log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), _socket(self.port) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start on {self.port}: {self.root / 'log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            self.proc.wait(timeout=20)


def _socket(port: int):
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=1)
    s.settimeout(1)
    return s


class Relay:
    """A TCP relay ``listen -> target`` on its own thread; ``cut()`` closes every relayed
    connection and refuses new ones until ``restore()`` (an unreachable server, as a network
    partition makes it, for the clients of the relay only)."""

    def __init__(self, listen: int, target: int) -> None:
        self.listen, self.target = listen, target
        self.loop = asyncio.new_event_loop()
        self.open = threading.Event()
        self.open.set()
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(timeout=10)

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.listen)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open.is_set():
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def cut(self) -> None:
        self.open.clear()

        def close_all() -> None:
            for w in list(self.writers):
                w.transport.abort()

        self.loop.call_soon_threadsafe(close_all)

    def restore(self) -> None:
        self.open.set()


# --- one load run with marks ---------------------------------------------------------------------
@dataclass
class Run:
    """A load run: its requests, the wall-clock marks of what happened, /metrics at each."""

    name: str
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    wall_t0: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)  # name -> wall clock
    metrics: dict[str, Samples] = field(default_factory=dict)  # mark -> /metrics then
    notes: dict[str, object] = field(default_factory=dict)

    def at(self, mark: str) -> float:
        """A mark in the generator's schedule (seconds from its start)."""
        return self.marks[mark] - self.wall_t0

    def window(self, start: str | None, end: str | None) -> np.ndarray:
        due = self.rows[:, 0]
        lo = self.at(start) if start else WARMUP_S
        hi = self.at(end) if end else np.inf
        return self.rows[(due >= lo) & (due < hi)]


class Load:
    """``benchmarks.loadgen`` in its own process for ``seconds`` at ``rate``."""

    def __init__(self, base: str, users: Path, rate: int, seconds: float, name: str) -> None:
        self.run = Run(name)
        self.out = OUT / "chaos-load" / f"{name}.json"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", base, "--rate", str(rate),
               "--duration", str(seconds), "--unknown-share", "0", "--read-answers",
               "--users-file", str(users), "--out", str(self.out)]  # fmt: skip
        self.base = base
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        self.started = time.time()

    def mark(self, name: str) -> None:
        self.run.marks[name] = time.time()
        self.run.metrics[name] = scrape(self.base)

    def sleep_until(self, seconds: float) -> None:
        """Until ``seconds`` after the generator's schedule starts (about 0.5 s after launch)."""
        time.sleep(max(0.0, self.started + WARMUP_S + seconds - time.time()))

    def finish(self) -> Run:
        if self.proc.wait() != 0 or not self.out.exists():
            raise RuntimeError(f"the load generator failed ({self.proc.returncode})")
        self.mark("end")
        data = json.loads(self.out.read_text())
        self.run.rows = np.array(data["rows"], dtype=float).reshape(-1, 7)
        self.run.wall_t0 = data["wall_t0"]
        return self.run


def stats(rows: np.ndarray) -> dict[str, object]:
    """Requests, 5xx, requests without an answer, and latency of the 200s (from due time)."""
    status, latency = rows[:, 3], rows[:, 1]
    ok = status == 200
    return {
        "requests": int(len(rows)),
        "5xx": int(((status >= 500) & (status < 600)).sum()),
        "no_answer": int((status == 0).sum()),
        "other_errors": int(((status != 200) & (status != 0) & (status < 500)).sum()),
        "latency_ms": percentiles(latency[ok]) if ok.any() else None,
        "personalised_share": float((rows[ok, 6] == 1).mean()) if ok.any() else None,
    }


def fallbacks(before: Samples, after: Samples) -> dict[str, int]:
    """Fallback answers by reason between two scrapes of ``/metrics``."""
    out = {}
    for reason in sorted(label_values(after, "shopml_fallbacks_total", "reason")):
        n = total(after, "shopml_fallbacks_total", reason=reason) - total(
            before, "shopml_fallbacks_total", reason=reason
        )
        if n:
            out[reason] = int(n)
    return out


def reloads(before: Samples, after: Samples, outcome: str) -> int:
    name = "shopml_model_reloads_total"
    return int(total(after, name, outcome=outcome) - total(before, name, outcome=outcome))


# --- the faults ----------------------------------------------------------------------------------
def fault_redis(env: Env, args: argparse.Namespace) -> Run:
    """Redis stopped for 20 s, then started again (same data, same port)."""
    load = Load(env.base, env.users, args.rate, 60, "redis")
    load.mark("start")
    load.sleep_until(15)
    load.mark("fault")
    env.redis.stop()
    load.sleep_until(35)
    env.redis.start()
    load.mark("recovered")
    run = load.finish()
    back = run.at("recovered")
    after = run.rows[(run.rows[:, 0] >= back) & (run.rows[:, 6] == 1)]
    run.notes["personalised_again_after_s"] = float(after[0, 0] - back) if len(after) else None
    return run


def fault_registry(env: Env, args: argparse.Namespace) -> Run:
    """The registry (PostgreSQL) unreachable for the service while the champion moves."""
    load = Load(env.base, env.users, args.rate, 60, "registry")
    load.mark("start")
    load.sleep_until(10)
    env.relay.cut()
    load.mark("fault")
    time.sleep(2)
    env.set_champion(env.versions[2])  # a reload is due while the service cannot read
    load.sleep_until(32)
    env.relay.restore()
    load.mark("recovered")
    run = load.finish()
    new = float(env.versions[2])
    first = run.rows[run.rows[:, 5] == new]
    run.notes["old_version_until_recovered"] = bool(
        (run.window(None, "recovered")[:, 5] != new).all()
    )
    run.notes["new_version_after_s"] = (
        float(first[0, 0] - run.at("recovered")) if len(first) else None
    )
    m = run.metrics
    run.notes["failed_alias_checks"] = reloads(m["fault"], m["recovered"], "registry_unreachable")
    run.notes["failed_loads"] = reloads(m["fault"], m["recovered"], "failed")
    return run


def fault_swap(env: Env, args: argparse.Namespace) -> Run:
    """The champion alias moved mid-load (the registry reachable)."""
    old, new = env.versions[2], env.versions[1]
    load = Load(env.base, env.users, args.rate, 40, "swap")
    load.mark("start")
    load.sleep_until(15)
    env.set_champion(new)
    load.mark("fault")
    load.sleep_until(27)
    load.mark("recovered")
    run = load.finish()
    versions = run.rows[run.rows[:, 3] == 200, 5]
    run.notes["answers_by_version"] = {
        str(int(v)): int((versions == v).sum()) for v in np.unique(versions)
    }
    run.notes["answers_by_another_version"] = int(
        (~np.isin(versions, [float(old), float(new)])).sum()
    )
    moved = run.rows[run.rows[:, 5] == float(new)]
    last_old = run.rows[run.rows[:, 5] == float(old)]
    run.notes["new_version_after_s"] = float(moved[0, 0] - run.at("fault")) if len(moved) else None
    run.notes["last_old_answer_after_s"] = (
        float(last_old[-1, 0] - run.at("fault")) if len(last_old) else None
    )
    return run


def fault_worker(env: Env, args: argparse.Namespace) -> Run:
    """One of the two worker processes killed; uvicorn starts another."""
    load = Load(env.base, env.users, args.rate, 60, "worker")
    load.mark("start")
    load.sleep_until(15)
    victim = env.workers()[0]
    victim.send_signal(signal.SIGKILL)
    load.mark("fault")
    counts, replaced, started = [], None, env.started_workers()
    while time.time() < load.run.marks["fault"] + 40:
        counts.append(total(scrape(env.base), "shopml_request_seconds_count"))
        if replaced is None and env.started_workers() > started:
            replaced = time.time() - load.run.marks["fault"]
        time.sleep(0.5)
    load.mark("recovered")
    run = load.finish()
    run.notes["killed_pid"] = victim.pid
    run.notes["two_workers_again_after_s"] = replaced
    run.notes["metrics_monotonic"] = bool(np.all(np.diff(counts) >= 0))
    counted = total(run.metrics["end"], "shopml_request_seconds_count") - total(
        run.metrics["start"], "shopml_request_seconds_count"
    )
    run.notes["metrics_counted_vs_answered"] = [
        int(counted),
        int((run.window("start", "end")[:, 3] == 200).sum()),
    ]
    return run


def soak(env: Env, args: argparse.Namespace) -> dict[str, object]:
    """``--soak-minutes`` at the rate; resources of the server processes every 10 s."""
    seconds = args.soak_minutes * 60
    load = Load(env.base, env.users, args.rate, seconds, "soak")
    load.mark("start")
    samples = []
    while load.proc.poll() is None:
        procs = [env.server_proc(), *env.workers()]
        samples.append({
            "t": time.time(),
            "rss_mb": sum(p.memory_info().rss for p in procs) / 2**20,
            "fds": sum(p.num_fds() for p in procs),
            "threads": sum(p.num_threads() for p in procs),
            "pids": [p.pid for p in procs],
        })  # fmt: skip
        time.sleep(10)
    run = load.finish()
    warm = args.soak_warmup_s
    rows = run.rows[run.rows[:, 0] >= WARMUP_S]
    after_warm = [s for s in samples if s["t"] - run.wall_t0 >= warm]
    first = rows[(rows[:, 0] >= warm) & (rows[:, 0] < warm + 60)]
    last = rows[rows[:, 0] >= rows[-1, 0] - 60]
    p99 = [stats(first)["latency_ms"]["p99"], stats(last)["latency_ms"]["p99"]]
    begin, end = after_warm[:3], after_warm[-3:]

    def mean(key: str, part: list[dict]) -> float:
        return float(np.mean([s[key] for s in part]))

    return {
        "minutes": args.soak_minutes,
        "warmup_s": warm,
        **stats(rows),
        "rss_mb": [mean("rss_mb", begin), mean("rss_mb", end)],
        "rss_growth": mean("rss_mb", end) / mean("rss_mb", begin) - 1,
        "fds": [after_warm[0]["fds"], max(s["fds"] for s in after_warm), after_warm[-1]["fds"]],
        "threads": [
            after_warm[0]["threads"],
            max(s["threads"] for s in after_warm),
            after_warm[-1]["threads"],
        ],  # fmt: skip
        "same_processes": len({tuple(s["pids"]) for s in after_warm}) == 1,
        "p99_first_last_minute_ms": p99,
        "p99_ratio": p99[1] / p99[0],
        "samples": samples,
    }


# --- the environment -----------------------------------------------------------------------------
@dataclass
class Env:
    """The servers, the deployment and the running service of one benchmark."""

    redis: Redis
    postgres: Postgres
    relay: Relay
    base: str
    users: Path
    versions: list[str]
    settings: object
    server: subprocess.Popen | None = None

    def set_champion(self, version: str) -> None:
        from training import registry

        registry.set_alias(self.settings, registry.CHAMPION, version)

    def server_proc(self):
        import psutil

        return psutil.Process(self.server.pid)

    def started_workers(self) -> int:
        """Workers that finished starting (uvicorn logs each lifespan's end), ever."""
        return (
            (WORK / "serve.log").read_text(errors="replace").count("Application startup complete")
        )

    def workers(self) -> list:
        """The uvicorn worker processes (children of ``shopml serve``, not its helpers)."""
        return [c for c in self.server_proc().children()
                if "resource_tracker" not in " ".join(c.cmdline())]  # fmt: skip


def profile_env(pg_port: int, redis_port: int, home: Path) -> dict[str, str]:
    """The production profile on this benchmark's servers (PostgreSQL at ``pg_port``)."""
    pg = f"{PG_USER}@127.0.0.1:{pg_port}"
    return {
        "SHOPML_HOME": str(home),
        "SHOPML_PROFILE": "production",
        "SHOPML_MLFLOW_TRACKING_URI": f"postgresql://{pg}/mlflow",
        "SHOPML_MLFLOW_ARTIFACT_ROOT": (home / "mlflow-artifacts").as_uri(),
        "SHOPML_FEAST__REGISTRY": f"postgresql+psycopg2://{pg}/feast",
        "SHOPML_FEAST__REDIS_CONNECTION": f"127.0.0.1:{redis_port}",
        "SHOPML_FEAST__PROJECT": "chaos",
        "SHOPML_SERVING__RELOAD_INTERVAL_S": str(RELOAD_S),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def build(args: argparse.Namespace) -> Env:
    """Servers up, the deployment built (three versions), the service started."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    pg_port, redis_port, relay_port, http_port = (free_port() for _ in range(4))
    postgres = Postgres(WORK / "postgres", pg_port).start()
    redis = Redis(WORK / "redis", redis_port).start()
    relay = Relay(relay_port, pg_port)
    home = WORK / "home"
    key = secrets.token_hex(32)
    # this process (the operator) reaches PostgreSQL directly; the service through the relay
    os.environ.update({**profile_env(pg_port, redis_port, home), "SHOPML_PRIVACY__KEY": key})
    from serving.synthetic import deploy, register_version
    from shopml.config import load_settings

    settings = load_settings()
    print(f"chaos: building the deployment ({args.items} items, {args.users} users) ...",
          flush=True)  # fmt: skip
    dep = deploy(settings, n_users=args.users, n_items=args.items, n_categories=20,
                 per_user=20, dim=64, ranker_format="onnx")  # fmt: skip
    versions = [dep.version] + [
        register_version(
            settings, dep.catalog, dep.purchases, 64, seed, alias=None, ranker_format="onnx"
        )  # fmt: skip
        for seed in (1, 2)
    ]
    users = WORK / "users.txt"
    users.write_text("\n".join(dep.user_ids) + "\n")
    base = f"http://127.0.0.1:{http_port}"
    env = Env(redis, postgres, relay, base, users, versions, settings)
    service = profile_env(relay_port, redis_port, home)
    env.server = start_server(http_port, WORK / "serve.log", service, workers=2, home=home)
    wait_ready(env.server, base, WORK / "serve.log", timeout=600)
    while env.started_workers() < 2:  # /readyz answered from one: wait for the second
        time.sleep(0.5)
    return env


# --- output --------------------------------------------------------------------------------------
EXPECT = {
    "redis": "no 5xx; fallbacks while down; personalised again soon after",
    "registry": "old version until the registry is back, failures counted, then the new one",
    "swap": "no failed request; only the old and the new version answer",
    "worker": "the other worker serves; /metrics monotonic",
}


def table(runs: list[Run]) -> str:
    head = ["fault", "window (s)", "requests", "5xx", "no answer", "fallbacks during",
            "p50/p99 ms during", "p50/p99 ms after", "what it shows"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for run in runs:
        during, after = run.window("fault", "recovered"), run.window("recovered", None)
        d, a, whole = stats(during), stats(after), stats(run.window(None, None))

        def lat(s: dict) -> str:
            ms = s["latency_ms"]
            return f"{ms['p50']:.1f} / {ms['p99']:.1f}" if ms else "-"

        reasons = fallbacks(run.metrics["fault"], run.metrics["recovered"])
        notes = "; ".join(f"{k} {_fmt(v)}" for k, v in run.notes.items() if k != "killed_pid")
        lines.append("| " + " | ".join([
            run.name, f"{run.at('fault'):.0f}-{run.at('recovered'):.0f}",
            str(whole["requests"]), str(whole["5xx"]), str(whole["no_answer"]),
            ", ".join(f"{r} {n}" for r, n in reasons.items()) or "0",
            lat(d), lat(a), notes,
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    return json.dumps(v) if isinstance(v, dict | list) else str(v)


def soak_lines(s: dict) -> str:
    p = s["p99_first_last_minute_ms"]
    return "\n".join([
        f"soak: {s['minutes']} min at the rate, {s['requests']} requests, {s['5xx']} 5xx, "
        f"{s['no_answer']} without an answer, p50/p99 {s['latency_ms']['p50']:.1f} / "
        f"{s['latency_ms']['p99']:.1f} ms",
        f"  RSS after warm-up ({s['warmup_s']} s) {s['rss_mb'][0]:.0f} MB -> "
        f"{s['rss_mb'][1]:.0f} MB ({100 * s['rss_growth']:+.1f}%; target < +5%)",
        f"  open fds first/max/last {s['fds']}, threads first/max/last {s['threads']}, "
        f"same processes throughout: {s['same_processes']}",
        f"  p99 first minute {p[0]:.1f} ms, last minute {p[1]:.1f} ms "
        f"({s['p99_ratio']:.2f}x; target <= 1.5x)",
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=300)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--soak-warmup-s", type=float, default=60.0)
    p.add_argument("--faults", default="redis,registry,swap,worker",
                   help="comma-separated, in order (the soak runs after them)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faults = {"redis": fault_redis, "registry": fault_registry, "swap": fault_swap,
              "worker": fault_worker}  # fmt: skip
    env = None
    try:
        env = build(args)
        runs = []
        for name in args.faults.split(","):
            print(f"chaos: {name} ...", flush=True)
            runs.append(faults[name](env, args))
        print(f"chaos: soak, {args.soak_minutes} min ...", flush=True)
        soaked = soak(env, args) if args.soak_minutes > 0 else None
    finally:
        if env is not None and env.server is not None:
            stop_server(env.server)
        if env is not None:
            env.redis.stop()
            env.postgres.stop()
    report = table(runs)
    print("\n" + report)
    for run in runs:
        print(f"  {run.name}: expected: {EXPECT[run.name]}")
    if soaked:
        print("\n" + soak_lines(soaked))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "chaos.json").write_text(json.dumps({
        "args": vars(args),
        "faults": [{"name": r.name, "marks": {k: v - r.wall_t0 for k, v in r.marks.items()},
                    "during": stats(r.window("fault", "recovered")),
                    "after": stats(r.window("recovered", None)),
                    "fallbacks_during": fallbacks(r.metrics["fault"], r.metrics["recovered"]),
                    "notes": r.notes} for r in runs],
        "soak": soaked,
        "table": report,
    }, indent=2, default=str))  # fmt: skip
    print(f"\nwritten: {OUT / 'chaos.json'}")


if __name__ == "__main__":
    main()
