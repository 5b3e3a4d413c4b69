"""What ``benchmarks.serving`` measures around one load step: ``/metrics`` deltas (stage
shares, candidates), CPU per process, and the generator's per-request record."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STAGES = ("features", "retrieval", "filter", "ranking")


def percentiles(ms: np.ndarray) -> dict[str, float]:
    """p50/p95/p99 and mean in milliseconds (NaN when there is nothing to measure)."""
    if len(ms) == 0:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean())}


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


def scrape_all(bases: list[str]) -> Samples:
    """The samples of several replicas added up: right for the counters and histograms that
    ``stage_breakdown`` reads (a gauge would not add up)."""
    merged: Samples = {}
    for base in bases:
        for key, value in scrape(base).items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (e.g. over arms)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(lab)[label] for (n, lab) in samples if n == name and label in dict(lab)}


@dataclass
class CpuMark:
    """CPU seconds so far: the server, finished children (the load generator), the machine."""

    server: float
    children: float
    machine_busy: float
    wall: float

    @classmethod
    def now(cls, *server_pids: int) -> CpuMark:
        """``server``: of every server process (replicas) and their children (workers)."""
        import psutil

        tick = os.sysconf("SC_CLK_TCK")
        server = 0.0
        for pid in server_pids:
            root = psutil.Process(pid)  # with --workers: the supervisor and its workers
            for proc in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    server += times.user + times.system
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
    memo_hits = delta("shopml_ann_memo_total", result="hit") + delta(
        "shopml_ann_memo_total", result="answer"
    )
    memo_asked = memo_hits + delta("shopml_ann_memo_total", result="miss")
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
        "ann_memo_hit_share": memo_hits / memo_asked if memo_asked else float("nan"),
    }


def summarize_load(path: Path, duration: float) -> dict[str, object]:
    """Throughput, errors and latency of the requests due in the measured window.

    Achieved throughput is answers (any status) over the time from the window's start to the
    last of those answers (at least ``duration``): a server that falls behind finishes late,
    and that lowers it. Latencies are of the 200s, from each request's due time.
    """
    data = json.loads(path.read_text())
    rows = np.array(data["rows"], dtype=float).reshape(-1, 7)
    due, latency, service, status, lag = rows.T[:5]
    window = due >= data["warmup_s"]
    answered, ok = window & (status > 0), window & (status == 200)
    last = float((due + latency / 1000)[answered].max()) if answered.any() else 0.0
    seconds = max(last - data["warmup_s"], duration)
    codes, counts = np.unique(status[window].astype(int), return_counts=True)
    return {
        "requests": int(window.sum()),
        "achieved_rps": float(answered.sum() / seconds),
        "errors": int((window & (status != 200)).sum()),
        "status_codes": {
            ("no answer" if c == 0 else str(c)): int(n) for c, n in zip(codes, counts, strict=True)
        },
        "latency_ms": percentiles(latency[ok]),
        "service_ms": percentiles(service[ok]),  # from the actual send, for comparison
        "dispatch_lag_ms": percentiles(lag[window]),  # how late the generator itself was
        "connections": data["connections"],
    }
