"""Prometheus metrics and structured (JSON) logs of the service.

One :class:`Metrics` per app, on its own registry, so several apps in one process (tests)
never collide. With ``shopml serve --workers N`` the processes share a multiprocess directory
and ``/metrics`` adds up every worker's values. Names follow Prometheus conventions
(``_seconds``, ``_total``).
"""

from __future__ import annotations

import json
import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
CANDIDATE_BUCKETS = (0, 10, 25, 50, 100, 150, 200, 300, 500, 1000)


MULTIPROCESS_ENV = "SHOPML_METRICS_MULTIPROCESS"


def use_multiprocess_metrics(directory: str) -> None:
    """Before the workers start: their metric values go to files in ``directory``.

    This builds the environment uvicorn's worker processes inherit (the only way to reach
    them), hence the one write of ``os.environ`` outside a subprocess's own env dict.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.environ[MULTIPROCESS_ENV] = "1"


def _in_process_values() -> None:
    """Keep this service's metric values in process memory.

    Importing Feast's metrics module sets ``PROMETHEUS_MULTIPROC_DIR`` (for its own Gunicorn
    feature server); prometheus_client then backs every metric created afterwards by files
    keyed by name, so two apps in one process (tests) start from each other's counts. The
    service runs one process per pod and scales by replicas, so in-memory values are exact.
    """
    from prometheus_client import values

    values.ValueClass = values.MutexValue


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = os.environ.get(MULTIPROCESS_ENV) == "1"
        if not self.multiprocess:
            _in_process_values()
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "shopml_request_seconds", "Request latency by endpoint and A/B arm",
            ["endpoint", "arm"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage = Histogram(
            "shopml_stage_seconds", "Time in each serving stage (features, retrieval, filter, "
            "ranking) per user answered", ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.candidates = Histogram(
            "shopml_candidates", "Candidates per source for one user, and how many were ranked",
            ["source"], buckets=CANDIDATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.ann_memo = Counter(
            "shopml_ann_memo_total", "Users answered from the memo: the whole answer "
            "(answer), the ANN candidates, ranked anew (hit), or computed afresh (miss)",
            ["result"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "shopml_fallbacks_total", "Answers served by the popularity fallback, by reason",
            ["reason", "arm"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "shopml_errors_total", "Requests answered with an error status",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.model_version = Gauge(
            "shopml_model_version", "Registry version served under each alias",
            ["alias"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.model_info = Gauge(
            "shopml_model_info", "Size in bytes of each served model part, labelled by the "
            "model (alias and part) and the format it runs in (torch, torch_int8, onnx, "
            "onnx_int8)", ["model", "format"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.reloads = Counter(
            "shopml_model_reloads_total", "Model loads by alias and outcome (loaded, failed: "
            "tried again later; registry_unreachable: the alias check itself failed)",
            ["alias", "outcome"], registry=r,
        )  # fmt: skip
        self.events = Counter(
            "shopml_events_total", "Events of POST /events by outcome (accepted: appended to "
            "the stream; refused: in a batch answered 4xx; unavailable: the stream did not "
            "answer, nothing appended)", ["outcome"], registry=r,
        )  # fmt: skip
        self.feature_refreshes = Counter(
            "shopml_item_feature_refreshes_total", "Bulk item-feature reads from Feast",
            ["outcome"], registry=r,
        )  # fmt: skip

    def exposition(self) -> bytes:
        if self.multiprocess:  # every worker's values, added up
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``extra``."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Route the ``serving`` loggers to stderr as JSON lines (``shopml serve`` calls this)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("serving")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
