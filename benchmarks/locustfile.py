"""Locust users for ``benchmarks/serving.py``: GET /recommendations/{user_id}?k=K.

Run by ``python -m benchmarks.serving``, which starts locust headless from its own virtual
environment (outside the repository, so the project's locked dependencies stay untouched)
with ``-u N -r N`` for a target of N requests/s: each user asks once per second
(``constant_throughput(1)``), so the target rate holds as long as a request takes less than
a second. This file imports only locust and the standard library (the locust venv has
nothing else). It is configured through the environment, not locust's CLI:

* ``BENCH_USERS_FILE``: known user ids, one per line (written with the deployment),
* ``BENCH_UNKNOWN_SHARE``: share of requests for never-seen users (the cold-start fallback),
* ``BENCH_K``: items per answer,
* ``BENCH_RAW_OUT``: where every request is written as ``start,latency_ms,status`` CSV, plus
  the times spawning completed and the test stopped, so the benchmark computes exact
  percentiles over the steady window itself (locust's own percentiles are rounded to whole
  milliseconds and include the ramp-up).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from locust import FastHttpUser, constant_throughput, events, task

USERS = Path(os.environ["BENCH_USERS_FILE"]).read_text().split()
UNKNOWN_SHARE = float(os.environ.get("BENCH_UNKNOWN_SHARE", "0.05"))
K = int(os.environ.get("BENCH_K", "10"))
RAW_OUT = Path(os.environ["BENCH_RAW_OUT"])

_rows: list[tuple[float, float, int]] = []  # (start epoch s, latency ms, status; 0 = no answer)
_marks: dict[str, float] = {}


@events.request.add_listener
def _record(response_time: float, response, exception, start_time: float | None = None, **_):
    status = getattr(response, "status_code", 0) or 0
    if exception is not None and status == 200:
        status = 0  # a body that could not be read: not a success
    _rows.append((start_time or time.time() - response_time / 1000, response_time, status))


@events.spawning_complete.add_listener
def _spawned(user_count: int, **_) -> None:
    _marks["spawned"] = time.time()


@events.test_stop.add_listener
def _stopped(**_) -> None:
    _marks.setdefault("stopped", time.time())


@events.quitting.add_listener
def _write(**_) -> None:
    lines = [f"# spawned={_marks.get('spawned', 0.0)} stopped={_marks.get('stopped', 0.0)}"]
    lines += [f"{s:.6f},{ms:.3f},{code}" for s, ms, code in _rows]
    RAW_OUT.write_text("\n".join(lines) + "\n")


class Shopper(FastHttpUser):
    """One shopper asking for recommendations once a second, whatever the answer took."""

    wait_time = constant_throughput(1)

    @task
    def recommendations(self) -> None:
        if random.random() < UNKNOWN_SHARE:
            user, name = f"new-user-{random.randrange(10**9)}", "/recommendations/[unknown]"
        else:
            user, name = random.choice(USERS), "/recommendations/[known]"
        self.client.get(f"/recommendations/{user}?k={K}", name=name)
