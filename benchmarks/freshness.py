"""Freshness: an accepted event -> the online store -> the next answer, under load.

On the serving benchmark's synthetic deployment (``benchmarks.serving``: 100k items, 20k
users; built once and reused), this starts ``shopml serve`` and the streaming job
(``shopml stream``, its checkpoint fresh), drives ``--rate`` recommendation requests a second
(``benchmarks.loadgen``, open loop) and, at the same time, ``--events`` events a second
through ``POST /events``, one event per request, each for another user and for an item of
that user's current answer. For each event it measures, from the moment the 202 came back:

* ``visible``: until the user's ``session_features`` row in the Feast online store holds the
  item (polled every 20 ms, in this process);
* ``reflected``: until the service's answer for the user no longer holds the item (the
  session's items leave the answer, so this is the first answer that knows the event;
  asked every 20 ms once the feature is visible, for every ``--reflect-every``-th event,
  so that the asking does not become a load of its own).

Reported with the latency of the recommendation load, measured in the same run first alone
(the same server and load, no events and no streaming job: the peer) and then beside the
events and the job, and the ratio of their p99s. Targets (issue 15): visible p95
<= 2 s at 100 events/s beside 300 requests/s.

``python -m benchmarks.freshness [--events 100 --rate 300 --duration 30]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.measure import percentiles, summarize_load
from benchmarks.serving import (
    HOME,
    OUT,
    READY_TIMEOUT_S,
    ROOT,
    USERS_FILE,
    deployment_params,
    ensure_deployment,
    free_port,
    start_server,
    stop_server,
    wait_ready,
)

POLL_S = 0.02
GIVE_UP_S = 30.0


def _get(url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def start_stream(log: Path, env: dict[str, str]) -> subprocess.Popen:
    shopml = Path(sys.executable).with_name("shopml")
    with log.open("wb") as sink:
        return subprocess.Popen(
            [str(shopml), "stream"], env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=ROOT,
        )  # fmt: skip


def loadgen(base: str, rate: int, duration: float, out: Path) -> subprocess.Popen:
    """``benchmarks.loadgen`` (open loop, its own process) on the deployment's users."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen", "--url", base, "--rate", str(rate),
         "--duration", str(duration), "--users-file", str(USERS_FILE), "--out", str(out)],
        cwd=ROOT,
    )  # fmt: skip


def drive(base: str, rate: int, duration: float, out: Path) -> dict[str, object]:
    """One load step to its end, summarized (``benchmarks.measure.summarize_load``)."""
    loadgen(base, rate, duration, out).wait()
    return summarize_load(out, duration)


class Probe:
    """One event: sent, then watched until visible in the store and gone from the answer."""

    def __init__(self, raw: str, user: str, item: str) -> None:
        self.raw, self.user, self.item = raw, user, item
        self.accepted = self.visible = self.reflected = float("nan")


def _waiting(probes: list[Probe], stage: str) -> list[Probe]:
    """Sent probes that have not reached ``stage`` ("visible", "reflected") and are not yet
    given up on."""
    now = time.perf_counter()
    return [p for p in probes if not math.isnan(p.accepted) and math.isnan(getattr(p, stage))
            and now - p.accepted < GIVE_UP_S]  # fmt: skip


def watch_visible(probes: list[Probe], store, done: threading.Event) -> None:
    """Until ``done`` is set and no sent probe is left waiting (or given up on): one batched
    online-store read of every sent, not yet visible probe, every ``POLL_S``."""
    from shopml import schema as S

    refs = [f"session_features:{S.SESSION_ITEMS}"]
    while True:
        waiting = _waiting(probes, "visible")
        if done.is_set() and not waiting:
            return
        if waiting:
            rows = [{S.USER_ID: p.user} for p in waiting]
            got = store.get_online_features(features=refs, entity_rows=rows).to_dict()
            seen = time.perf_counter()
            for p, items in zip(waiting, got[S.SESSION_ITEMS], strict=True):
                if items and p.item in items:
                    p.visible = seen
        time.sleep(POLL_S)


def watch_reflected(probes: list[Probe], base: str, done: threading.Event) -> None:
    """The same for the answers: each visible, not yet reflected probe's user is asked for
    recommendations every ``POLL_S`` until the item has left the answer."""
    while True:
        live = _waiting(probes, "reflected")
        if done.is_set() and not live:
            return
        for p in live:
            if not math.isnan(p.visible):
                answer = _get(f"{base}/recommendations/{p.raw}?k=10")
                if p.item not in [i["item_id"] for i in answer["items"]]:
                    p.reflected = time.perf_counter()
        time.sleep(POLL_S)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--rate", type=int, default=300, help="recommendation requests a second")
    p.add_argument("--events", type=int, default=100, help="events a second (POST /events)")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument(
        "--reflect-every",
        type=int,
        default=10,
        help="ask the service about every n-th event (each is asked every 20 ms)",
    )
    p.add_argument(
        "--stream-master",
        default="local[1]",
        help="the streaming job's Spark master: one core leaves one to the service",
    )
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()

    from shopml.config import load_settings
    from shopml.feast_store import open_store
    from shopml.privacy import Pseudonymizer

    marker = ensure_deployment(deployment_params(args.items, args.users), args.rebuild)
    settings = load_settings(home=HOME)
    store = open_store(settings)
    pseudonym = Pseudonymizer.of(settings)
    for stale in (settings.paths.event_stream, settings.paths.stream_checkpoints):
        subprocess.run(["rm", "-rf", str(stale)], check=True)  # every run starts afresh
    out = OUT / "freshness"
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    env = {**os.environ, "SHOPML_HOME": str(HOME), "SHOPML_EVENTS__TOKEN": token,
           "SHOPML_SPARK__MASTER": args.stream_master, "PYTHONUNBUFFERED": "1"}  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, out / "server.log", {"SHOPML_EVENTS__TOKEN": token})
    stream = None
    try:
        ready_s = wait_ready(server, base, out / "server.log", READY_TIMEOUT_S)
        # the peer, in the same run: the same load on the same server, no events, no job
        alone = drive(base, args.rate, args.duration, out / "load-alone.json")
        stream = start_stream(out / "stream.log", env)
        users = USERS_FILE.read_text().split()
        rng = random.Random(0)
        chosen = rng.sample(users, int(args.events * args.duration) + 1)
        probes = []
        for raw in chosen:  # an item of each user's answer now (it must leave the answer)
            first = _get(f"{base}/recommendations/{raw}?k=10")["items"]
            probes.append(Probe(raw, pseudonym(raw), first[0]["item_id"]))
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def send(probe: Probe) -> None:
            event = {"user_id": probe.raw, "item_id": probe.item, "event_type": "cart",
                     "timestamp": time.time()}  # fmt: skip
            _get(f"{base}/events", auth, json.dumps({"events": [event]}).encode())
            probe.accepted = time.perf_counter()

        # the streaming job is up once the first event is visible
        started = time.perf_counter()
        send(probes[0])
        first = threading.Event()
        first.set()
        watch_visible([probes[0]], store, first)
        stream_ready_s = time.perf_counter() - started
        probes = probes[1:]
        asked = probes[:: args.reflect_every]  # a sample: the asking must not become load

        load_out = out / "load.json"
        load = loadgen(base, args.rate, args.duration, load_out)
        done = threading.Event()
        watchers = [
            threading.Thread(target=watch_visible, args=(probes, store, done)),
            threading.Thread(target=watch_reflected, args=(asked, base, done)),
        ]
        for w in watchers:
            w.start()
        t0 = time.perf_counter() + 2.0  # the load generator's warm-up
        for i, probe in enumerate(probes):
            delay = t0 + i / args.events - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            send(probe)
        done.set()
        for w in watchers:
            w.join()
        load.wait()
        loaded = summarize_load(load_out, args.duration)
    finally:
        stop_server(server)
        if stream is not None:
            stop_server(stream)
    visible = np.array([(p.visible - p.accepted) * 1000 for p in probes])
    reflected = np.array([(p.reflected - p.accepted) * 1000 for p in asked])
    result = {
        "deployment": marker,
        "events_per_s": args.events,
        "requests_per_s": args.rate,
        "duration_s": args.duration,
        "server_ready_s": round(ready_s, 1),
        "stream_first_event_s": round(stream_ready_s, 1),
        "events": len(probes),
        "never_visible": int(np.isnan(visible).sum()),
        "reflected_asked": len(asked),
        "never_reflected": int(np.isnan(reflected).sum()),
        "visible_ms": percentiles(visible[~np.isnan(visible)]),
        "reflected_ms": percentiles(reflected[~np.isnan(reflected)]),
        "load": loaded,
        "load_alone": alone,
        "p99_ratio_to_alone": loaded["latency_ms"]["p99"] / alone["latency_ms"]["p99"],
        "trigger": settings.events.trigger,
        "stream_master": args.stream_master,
    }
    (out / "freshness.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "deployment"}, indent=2,
                     default=str))  # fmt: skip
    print(f"\nwritten {out / 'freshness.json'}")


if __name__ == "__main__":
    main()
