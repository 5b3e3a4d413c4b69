"""Load benchmark of the recommendation service: latency, throughput and where server time goes.

    python -m benchmarks.serving                                   # 100k items, 20k users
    python -m benchmarks.serving --items 2000 --users 500 --duration 10   # a quick check
    python -m benchmarks.serving --rates 100,300,500 --duration 30 --unknown-share 0.05

What it does, in order:

1. builds a synthetic deployment (``serving.synthetic.deploy``: Feast features materialized in
   the SQLite online store, a registered MLflow champion with its faiss index, ranker and
   tables) in ``var/bench-serving/``, or reuses it when its marker JSON says it was built with
   the same parameters (``--rebuild`` forces a new one);
2. times Feast's online read of one user row in-process, alone, and compares it with Feast's
   published figure for its Python feature server;
3. starts ``shopml serve`` as a separate process on a free port and waits for ``/readyz``;
4. for each target rate drives ``GET /recommendations/{user_id}?k=10`` from a separate load
   generator (locust, headless), scrapes ``/metrics`` before and after, and reports achieved
   throughput, p50/p95/p99, errors, the share of the handler's time in each serving stage and
   the mean number of ranked candidates, plus the CPU used by the server, the load generator
   and the rest of the machine (other work on a small shared machine skews the numbers; this
   says how much);
5. prints one markdown table, the verdict on the p99 target at 300 requests/s, and writes
   everything to ``var/benchmarks/serving.json``; the server is always stopped at the end.

Why locust, and how: it is the standard tool, runs in its own virtual environment outside the
repository (``~/.cache/shopml/locust-venv``, created with the project's ``uv`` on first use), so
the locked dependencies are untouched, and it is a separate process from both the server and
this script. ``FastHttpUser`` (a gevent client, cheap per request) with
``constant_throughput(1)`` and N users gives N requests/s; a user waits only while its own
request is in flight, so the schedule slips (coordinated omission) only for requests slower
than one second, far beyond the latencies of interest. The load generator's own CPU is
measured and printed for each rate, so if it ever competes with the server for the machine's
cores that shows. Percentiles are exact: ``benchmarks/locustfile.py`` writes every request's
latency and status and this script computes them over the steady window (after all users are
spawned), since locust's own percentiles are rounded to whole milliseconds and include ramp-up.

What the stage shares mean: ``shopml_request_seconds`` is measured inside the handler, so the
shares (features, retrieval, filter, ranking; "other" is the rest of the handler) exclude HTTP
parsing, FastAPI validation, response serialization and the wait for a thread-pool thread.
The gap between the client's mean latency and the handler's mean shows those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "var" / "bench-serving"  # the deployment's SHOPML_HOME
OUT = ROOT / "var" / "benchmarks"
MARKER = HOME / "bench_deployment.json"
USERS_FILE = HOME / "bench_users.txt"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUST_VENV = Path.home() / ".cache" / "shopml" / "locust-venv"
LOCUST_VERSION = "2.47.0"

# Deployment shape besides --items/--users (part of the marker: change one, it rebuilds).
CATEGORIES = 50
PER_USER = 20  # purchases per user (half of them rebought favourites)
DIM = 64  # the two-tower's embedding size (TrainConfig's default)
SEED = 0

STAGES = ("features", "retrieval", "filter", "ranking")
FEAST_READS, FEAST_WARMUP = 2000, 200
# Feast's published single-row p99 for its Python feature server (the figure in the issue).
FEAST_PUBLISHED_P99_MS = 7.2
TARGET_RATE, TARGET_P99_MS = 300, 30.0
RAMP_S = 2  # locust runs this much longer than --duration: users spawn in the first second
READY_TIMEOUT_S = 900  # the server reads every item's features from Feast before it is ready


# --- the deployment ----------------------------------------------------------------------------
def deployment_params(items: int, users: int) -> dict[str, int]:
    """Everything ``deploy`` is called with: the marker compares these to decide reuse."""
    return {
        "n_items": items,
        "n_users": users,
        "n_categories": CATEGORIES,
        "per_user": PER_USER,
        "dim": DIM,
        "seed": SEED,
    }


def ensure_deployment(params: dict[str, int], rebuild: bool) -> dict[str, object]:
    """Reuse ``HOME`` when its marker matches ``params``; otherwise build it from scratch.

    Why from scratch: a second ``deploy`` into the same home would register a second version
    and re-materialize over old rows; a clean home is what a fresh environment looks like.
    The marker is written last, so an interrupted build is never reused.
    """
    os.environ["SHOPML_HOME"] = str(HOME)  # before any Settings is built
    if not rebuild and MARKER.exists() and USERS_FILE.exists():
        marker = json.loads(MARKER.read_text())
        if marker.get("params") == params:
            return {**marker, "reused": True}
    from serving.synthetic import deploy
    from shopml.config import load_settings

    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    print(f"building the synthetic deployment in {HOME} ({params}) ...", flush=True)
    started = time.perf_counter()
    dep = deploy(load_settings(), **params)
    seconds = round(time.perf_counter() - started, 1)
    USERS_FILE.write_text("\n".join(dep.user_ids) + "\n")
    marker = {
        "params": params,
        "version": dep.version,
        "users": len(dep.user_ids),
        "items": len(dep.item_ids),
        "build_seconds": seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    MARKER.write_text(json.dumps(marker, indent=2) + "\n")
    return {**marker, "reused": False}


# --- Feast alone ---------------------------------------------------------------------------------
def percentiles(ms: np.ndarray) -> dict[str, float]:
    """p50/p95/p99 and mean in milliseconds (NaN when there is nothing to measure)."""
    if len(ms) == 0:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean())}


def feast_latency(users: list[str], reads: int = FEAST_READS) -> dict[str, object]:
    """One-row ``get_online_features`` latency, in-process, with nothing else running.

    Why alone: the service's "features" stage is this call plus converting the answer; timing
    it without HTTP, threads or other requests tells how much of that stage is Feast itself.
    ``to_dict()`` (what the service also does) is timed separately.
    """
    from serving.features import USER_VIEW
    from shopml import schema as S
    from shopml.config import load_settings
    from shopml.feast_store import open_store

    store = open_store(load_settings())
    refs = [f"{USER_VIEW}:{f}" for f in S.USER_FEATURES]
    rng = random.Random(SEED)
    call, convert = np.empty(reads), np.empty(reads)
    for i in range(-FEAST_WARMUP, reads):
        row = [{S.USER_ID: rng.choice(users)}]
        t0 = time.perf_counter()
        response = store.get_online_features(features=refs, entity_rows=row)
        t1 = time.perf_counter()
        response.to_dict()
        t2 = time.perf_counter()
        if i >= 0:
            call[i], convert[i] = (t1 - t0) * 1000, (t2 - t1) * 1000
    return {
        "reads": reads,
        "features": len(refs),
        "get_online_features_ms": percentiles(call),
        "to_dict_ms": percentiles(convert),
        "with_to_dict_ms": percentiles(call + convert),
        "published_p99_ms": FEAST_PUBLISHED_P99_MS,
    }


# --- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, max_candidates: int, log: Path) -> subprocess.Popen:
    """``shopml serve`` in its own process group (so it can be stopped as a whole), logging to
    ``log`` (one JSON line per request: kept off the console)."""
    env = {
        **os.environ,
        "SHOPML_HOME": str(HOME),
        "PYTHONUNBUFFERED": "1",
        "SHOPML_SERVING__MAX_CANDIDATES": str(max_candidates),
    }
    shopml = Path(sys.executable).with_name("shopml")
    cmd = [str(shopml), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        return subprocess.Popen(
            cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> float:
    """Seconds until ``/readyz`` answers 200; fails early if the server process exits."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base}/readyz", timeout=2) as r,
        ):
            if r.status == 200:
                return time.perf_counter() - started
        time.sleep(0.5)
    raise TimeoutError(f"/readyz not 200 after {timeout:.0f}s (log: {log})")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down gracefully), SIGKILL after 20 s; its whole process group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- measurements around one step ---------------------------------------------------------------
Samples = dict[tuple[str, frozenset], float]


def scrape(base: str) -> Samples:
    """Every sample of ``/metrics``, keyed by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (e.g. over arms)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(lab)[label] for (n, lab) in samples if n == name and label in dict(lab)}


@dataclass
class CpuMark:
    """CPU seconds so far: the server process, finished children (locust), the whole machine."""

    server: float
    children: float
    machine_busy: float
    wall: float

    @classmethod
    def now(cls, server_pid: int) -> CpuMark:
        tick = os.sysconf("SC_CLK_TCK")
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        return cls(server, usage.ru_utime + usage.ru_stime, busy, time.perf_counter())


def stage_breakdown(before: Samples, after: Samples) -> dict[str, object]:
    """Per-stage share of the handler's time, mean ranked candidates, fallbacks by reason."""

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    handler_s = delta("shopml_request_seconds_sum", endpoint="recommendations")
    answered = delta("shopml_request_seconds_count", endpoint="recommendations")
    shares = {
        s: delta("shopml_stage_seconds_sum", stage=s) / handler_s if handler_s else 0.0
        for s in STAGES
    }
    ranked_n = delta("shopml_candidates_count", source="ranked")
    reasons = label_values(after, "shopml_fallbacks_total", "reason")
    return {
        "handler_requests": int(answered),
        "handler_mean_ms": 1000 * handler_s / answered if answered else float("nan"),
        "stage_share": shares,
        "other_share": 1.0 - sum(shares.values()) if handler_s else 0.0,
        "stage_mean_ms": {
            s: 1000
            * delta("shopml_stage_seconds_sum", stage=s)
            / max(delta("shopml_stage_seconds_count", stage=s), 1)
            for s in STAGES
        },
        "mean_ranked": delta("shopml_candidates_sum", source="ranked") / ranked_n
        if ranked_n
        else float("nan"),
        "fallbacks": {r: int(delta("shopml_fallbacks_total", reason=r)) for r in sorted(reasons)},
    }


def read_raw(path: Path) -> dict[str, object]:
    """Throughput, errors and exact percentiles over the steady window of one locust run."""
    lines = path.read_text().splitlines()
    marks = dict(kv.split("=") for kv in lines[0].lstrip("# ").split())
    spawned, stopped = float(marks["spawned"]), float(marks["stopped"])
    rows = np.array([[float(x) for x in ln.split(",")] for ln in lines[1:]]).reshape(-1, 3)
    start, ms, status = rows[:, 0], rows[:, 1], rows[:, 2].astype(int)
    window = (start >= spawned) & (start < stopped)
    ok = window & (status == 200)
    seconds = max(stopped - spawned, 1e-9)
    codes = {
        str(c): int(n) for c, n in zip(*np.unique(status[window], return_counts=True), strict=True)
    }
    return {
        "window_s": round(seconds, 2),
        "requests": int(window.sum()),
        "achieved_rps": float(window.sum() / seconds),
        "ok_rps": float(ok.sum() / seconds),
        "errors": int((window & (status != 200)).sum()),
        "status_codes": codes,
        "latency_ms": percentiles(ms[ok]),
    }


def locust_bin() -> Path:
    """locust in its own virtual environment, created with the project's ``uv`` if absent."""
    exe = LOCUST_VENV / "bin" / "locust"
    if not exe.exists():
        uv = Path(sys.executable).with_name("uv")
        print(f"installing locust=={LOCUST_VERSION} into {LOCUST_VENV} ...", flush=True)
        subprocess.run(
            [str(uv), "venv", "--python", sys.executable, str(LOCUST_VENV)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                str(uv),
                "pip",
                "install",
                "--python",
                str(LOCUST_VENV / "bin" / "python"),
                f"locust=={LOCUST_VERSION}",
            ],
            check=True,
            capture_output=True,
        )
    return exe


def run_step(
    base: str, server: subprocess.Popen, rate: int, args: argparse.Namespace
) -> dict[str, object]:
    """One target rate: metrics and CPU before, locust for ``--duration`` s, metrics after."""
    prefix = OUT / "serving-locust" / f"rate-{rate}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    raw = prefix.with_suffix(".raw.csv")
    raw.unlink(missing_ok=True)
    env = {
        **os.environ,
        "BENCH_USERS_FILE": str(USERS_FILE),
        "BENCH_RAW_OUT": str(raw),
        "BENCH_UNKNOWN_SHARE": str(args.unknown_share),
        "BENCH_K": str(args.k),
    }
    cmd = [
        str(locust_bin()),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(rate),
        "-r",
        str(rate),
        "-t",
        f"{args.duration + RAMP_S}s",
        "--host",
        base,
        "--csv",
        str(prefix),
        "--reset-stats",
        "--only-summary",
        "--stop-timeout",
        "5",
        "--loglevel",
        "WARNING",
    ]
    before, cpu0 = scrape(base), CpuMark.now(server.pid)
    with prefix.with_suffix(".log").open("wb") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    cpu1, after = CpuMark.now(server.pid), scrape(base)
    if not raw.exists():  # locust exits 1 when any request failed: that alone is a result
        tail = prefix.with_suffix(".log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust (exit {proc.returncode}) wrote no results:\n{tail}")
    wall = cpu1.wall - cpu0.wall
    server_cores = (cpu1.server - cpu0.server) / wall
    loadgen_cores = (cpu1.children - cpu0.children) / wall
    machine_cores = (cpu1.machine_busy - cpu0.machine_busy) / wall
    return {
        "target_rps": rate,
        **read_raw(raw),
        **stage_breakdown(before, after),
        "cpu_cores": {
            "server": server_cores,
            "load_generator": loadgen_cores,
            "rest_of_machine": max(machine_cores - server_cores - loadgen_cores, 0.0),
        },
    }


# --- output -------------------------------------------------------------------------------------
def markdown(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def tables(steps: list[dict]) -> str:
    """The main table, then the CPU/handler table that says how far the first can be trusted."""
    main = [
        [
            str(s["target_rps"]),
            f"{s['achieved_rps']:.1f}",
            *(f"{s['latency_ms'][p]:.1f}" for p in ("p50", "p95", "p99")),
            str(s["errors"]),
            *(f"{100 * s['stage_share'][st]:.1f}" for st in STAGES),
            f"{s['mean_ranked']:.1f}",
        ]
        for s in steps
    ]
    side = [
        [
            str(s["target_rps"]),
            f"{s['latency_ms']['mean']:.2f}",
            f"{s['handler_mean_ms']:.2f}",
            f"{100 * s['other_share']:.1f}",
            " / ".join(f"{s['stage_mean_ms'][st]:.2f}" for st in STAGES),
            ", ".join(f"{r} {n}" for r, n in s["fallbacks"].items() if n) or "0",
            f"{s['cpu_cores']['server']:.2f}",
            f"{s['cpu_cores']['load_generator']:.2f}",
            f"{s['cpu_cores']['rest_of_machine']:.2f}",
        ]
        for s in steps
    ]
    return (
        markdown(
            [
                "target rps",
                "achieved rps",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "errors",
                *(f"{st} %" for st in STAGES),
                "mean ranked candidates",
            ],
            main,
        )
        + "\n\n"
        + markdown(
            [
                "target rps",
                "client mean ms",
                "handler mean ms",
                "handler other %",
                "stage mean ms (feat/retr/filt/rank)",
                "fallbacks",
                "server CPU cores",
                "load-gen CPU cores",
                "rest of machine cores",
            ],
            side,
        )
    )


def verdict(steps: list[dict]) -> str:
    step = next((s for s in steps if s["target_rps"] == TARGET_RATE), None)
    if step is None:
        return f"target p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_RATE} rps: NOT MEASURED"
    p99 = step["latency_ms"]["p99"]
    met = p99 <= TARGET_P99_MS and step["errors"] == 0
    return (
        f"target p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_RATE} rps: "
        f"{'MET' if met else 'NOT MET'} (p99 {p99:.1f} ms, achieved "
        f"{step['achieved_rps']:.1f} rps, {step['errors']} errors)"
    )


def feast_line(f: dict) -> str:
    c, w = f["get_online_features_ms"], f["with_to_dict_ms"]
    return (
        f"Feast online read, 1 row x {f['features']} features, in-process SQLite, "
        f"{f['reads']} reads: p50 {c['p50']:.2f} / p95 {c['p95']:.2f} / p99 {c['p99']:.2f} "
        f"ms (with to_dict p99 {w['p99']:.2f} ms) vs Feast's published p99 "
        f"{FEAST_PUBLISHED_P99_MS} ms (Python feature server): "
        f"{c['p99'] / FEAST_PUBLISHED_P99_MS:.2f}x"
    )


# --- main ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000, help="catalog size")
    p.add_argument("--users", type=int, default=20_000, help="known users")
    p.add_argument("--rates", default="100,300,500", help="target requests/s, comma-separated")
    p.add_argument("--duration", type=int, default=30, help="seconds measured per rate")
    p.add_argument(
        "--unknown-share",
        type=float,
        default=0.05,
        help="share of requests for unknown users (cold-start fallback)",
    )
    p.add_argument("--k", type=int, default=10, help="items per answer")
    p.add_argument("--max-candidates", type=int, default=200, help="candidates ranked per user")
    p.add_argument("--rebuild", action="store_true", help="rebuild the deployment")
    args = p.parse_args()
    args.rate_list = [int(r) for r in args.rates.split(",") if r.strip()]
    if not 0 <= args.unknown_share <= 1:
        p.error("--unknown-share must be in [0, 1]")
    return args


def main() -> None:
    args = parse_args()
    # SIGTERM becomes SystemExit, so the `finally` below stops the server then too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    command = f"python -m benchmarks.serving {shlex.join(sys.argv[1:])}".strip()
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()
    print(f"command: {command}")
    print(
        f"machine: {cores} cores usable ({os.cpu_count()} online), load average "
        f"{' '.join(f'{x:.2f}' for x in load)} at start"
    )
    others = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("SHOPML_SERVING__") and k != "SHOPML_SERVING__MAX_CANDIDATES"
    }
    if others:
        print(f"note: serving settings from the environment apply to the server: {others}")

    dep = ensure_deployment(deployment_params(args.items, args.users), args.rebuild)
    print(
        f"deployment: {HOME} version {dep['version']}, {dep['items']} items, {dep['users']} "
        f"users; {'reused' if dep['reused'] else 'built'} "
        f"(build took {dep['build_seconds']:.0f}s)",
        flush=True,
    )
    users = USERS_FILE.read_text().split()

    feast = feast_latency(users)
    print(feast_line(feast), flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), OUT / "serving-server.log"
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, args.max_candidates, log)
    steps: list[dict] = []
    try:
        ready_s = wait_ready(server, base, log, READY_TIMEOUT_S)
        print(f"server ready on {base} after {ready_s:.0f}s (pid {server.pid}, log {log})")
        for rate in args.rate_list:
            print(f"driving {rate} requests/s for {args.duration}s ...", flush=True)
            steps.append(run_step(base, server, rate, args))
            time.sleep(2)  # let the last requests drain before the next step's baseline
    finally:
        stop_server(server)

    wall = time.perf_counter() - started
    print(
        f"\n## Serving load test: GET /recommendations/{{user}}?k={args.k}, "
        f"{dep['items']} items, {dep['users']} users, max_candidates {args.max_candidates}, "
        f"{100 * args.unknown_share:g}% unknown users, {args.duration}s per rate, "
        f"{cores} cores\n"
    )
    print(tables(steps))
    print(
        f"\nlatency: client side, successful requests in the steady window; stage %: share of "
        f"the handler's time (shopml_request_seconds)\n{feast_line(feast)}\n{verdict(steps)}"
    )
    print(
        f"wall time {wall:.0f}s (deployment build {dep['build_seconds']:.0f}s"
        f"{', reused' if dep['reused'] else ''}; server ready after {ready_s:.0f}s)"
    )
    result = {
        "command": command,
        "cores": cores,
        "load_average_at_start": load,
        "deployment": {**dep, "home": str(HOME)},
        "server_ready_s": ready_s,
        "k": args.k,
        "max_candidates": args.max_candidates,
        "unknown_share": args.unknown_share,
        "duration_s": args.duration,
        "load_generator": f"locust {LOCUST_VERSION} FastHttpUser, constant_throughput(1)",
        "feast": feast,
        "steps": steps,
        "verdict": verdict(steps),
        "wall_s": round(wall, 1),
    }
    (OUT / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / 'serving.json'}")


if __name__ == "__main__":
    main()
