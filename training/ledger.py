"""The promotion ledger: every gate decision and every rollback, append-only, kept in MLflow.

Why: the registry's ``champion`` alias says which version serves, not how it got there.
Each decision (time, logical date, challenger and champion versions before/after, the gate's
numbers with CIs, segments, reason, actor) is one run of the experiment ``shopml-promotions``,
so it is readable in the MLflow UI and with ``shopml ledger``, survives in both profiles with
no new store, and is never rewritten (entries are only ever added).

Why a lock: MLflow's alias writes are last-writer-wins. Two runs promoting at once could
each read champion v3, each judge itself better than v3, and the slower one would silently
replace the faster. Every alias move therefore happens under :func:`alias_lock` (a PostgreSQL
advisory lock when the tracking store is PostgreSQL, a file lock beside the SQLite store
otherwise), and a promotion re-reads the champion under the lock: if it is no longer the
version the challenger was evaluated against, the alias does not move.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from shopml.config import Settings

EXPERIMENT = "shopml-promotions"
# pg_advisory_lock takes a bigint: a fixed key for "ShopML alias moves" (any constant works)
_PG_LOCK_KEY = 0x5350_4D4C  # "SPML"


@dataclass
class Entry:
    """One line of the ledger."""

    action: str  # "gate" or "rollback"
    model: str
    champion_before: str | None
    champion_after: str | None
    reason: str
    ds: str = ""
    challenger: str | None = None
    promoted: bool = False
    actor: str = ""
    time: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""  # the ledger entry's own MLflow run

    def line(self) -> str:
        moved = f"{self.champion_before or '-'} -> {self.champion_after or '-'}"
        return (f"{self.time}  {self.action:<8} ds={self.ds or '-':<10} "
                f"challenger={self.challenger or '-':<4} champion {moved:<9} "
                f"by {self.actor}: {self.reason}")  # fmt: skip


def actor() -> str:
    """Who moved the alias: the Airflow run when inside a task, else the OS user."""
    if run := os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        return f"airflow:{os.environ.get('AIRFLOW_CTX_DAG_ID', '?')}/{run}"
    return os.environ.get("SHOPML_ACTOR") or getpass.getuser()


@contextlib.contextmanager
def alias_lock(settings: Settings, timeout: float = 600.0) -> Iterator[None]:
    """Hold the one lock under which ``champion`` moves (module docstring: why)."""
    uri = settings.tracking_uri
    if uri.startswith("postgresql"):
        import psycopg2

        dsn = "postgresql://" + uri.split("://", 1)[1]  # SQLAlchemy driver suffix dropped
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = %s", (f"{int(timeout * 1000)}ms",))
                cur.execute("SELECT pg_advisory_lock(%s)", (_PG_LOCK_KEY,))
            yield
        finally:
            with contextlib.suppress(Exception), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK_KEY,))
            conn.close()
        return
    path = settings.paths.mlflow / "champion-alias.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as busy:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another run holds {path} (alias moves are serialised)"
                    ) from busy
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record(settings: Settings, entry: Entry) -> Entry:
    """Append ``entry`` (one finished run of the ledger experiment); returns it with its time,
    actor and run id filled in."""
    from mlflow import MlflowClient

    from training.registry import use_tracking

    use_tracking(settings)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(EXPERIMENT, artifact_location=settings.artifact_root)
    )
    entry.time = entry.time or datetime.now(UTC).isoformat(timespec="seconds")
    entry.actor = entry.actor or actor()
    name = f"{entry.action}-{entry.ds or entry.time[:10]}-{entry.champion_after or 'none'}"
    fields = {k: v for k, v in asdict(entry).items() if k not in ("metrics", "run_id")}
    tags = {f"ledger.{k}": "" if v is None else str(v) for k, v in fields.items()}
    tags["mlflow.note.content"] = entry.reason
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    for key, value in entry.metrics.items():
        client.log_metric(run.info.run_id, key, float(value))
    client.set_terminated(run.info.run_id)
    entry.run_id = run.info.run_id
    return entry


def entries(settings: Settings, model: str | None = None) -> list[Entry]:
    """The ledger, oldest first (optionally one registered model's)."""
    from mlflow import MlflowClient

    from training.registry import use_tracking

    use_tracking(settings)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=50_000)  # fmt: skip
    out = []
    for run in runs:
        tags = {k.removeprefix("ledger."): v for k, v in run.data.tags.items()
                if k.startswith("ledger.")}  # fmt: skip
        if model and tags.get("model") != model:
            continue
        out.append(
            Entry(
                action=tags["action"],
                model=tags["model"],
                champion_before=tags.get("champion_before") or None,
                champion_after=tags.get("champion_after") or None,
                reason=tags.get("reason", ""),
                ds=tags.get("ds", ""),
                challenger=tags.get("challenger") or None,
                promoted=tags.get("promoted") == "True",
                actor=tags.get("actor", ""),
                time=tags.get("time", ""),
                metrics=dict(run.data.metrics),
                run_id=run.info.run_id,
            )
        )
    return out


def rollback(settings: Settings, to: str | None = None, reason: str = "") -> Entry:
    """Move ``champion`` back: to ``to``, or to the champion before the current one came in
    (from the ledger). Recorded like every alias move; the versions themselves stay."""
    from training import registry

    with alias_lock(settings):
        current = registry.champion_version(settings)
        if to is None:
            arrivals = [
                e
                for e in entries(settings, settings.model_name)
                if e.champion_after == current and e.champion_before not in (None, current)
            ]
            if not arrivals:
                raise ValueError(
                    f"the ledger has no champion before v{current}: name one with --to VERSION"
                )
            to = arrivals[-1].champion_before
        assert to is not None
        if not registry.version_exists(settings, to):
            raise ValueError(f"version {to} of {settings.model_name} does not exist")
        registry.set_champion(settings, to)
        return record(
            settings,
            Entry(
                action="rollback",
                model=settings.model_name,
                champion_before=current,
                champion_after=to,
                promoted=False,
                reason=reason or f"rolled back from v{current} to v{to}",
            ),
        )


def as_json(items: list[Entry]) -> str:
    return json.dumps([asdict(e) for e in items], indent=2, default=str)


def metrics_of(numbers: dict[str, Any]) -> dict[str, float]:
    """The gate's numbers that are plain floats (what the ledger logs as metrics)."""
    return {k: float(v) for k, v in numbers.items() if isinstance(v, int | float)}
