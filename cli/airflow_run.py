"""Run the nightly DAG for one logical date through a real Airflow scheduler, and say how it went.

Why not ``airflow dags test``: it runs every task inside one process, records the logical
date as the run's start (a demo on 2025-12-31 shows a duration of almost a year) and writes
no task logs the UI can show. Here the same components as in production do the work: an
API server (UI, REST and the execution API the task runners talk to), a scheduler with the
LocalExecutor (one process per task try, as on Kubernetes one pod per task) and a DAG
processor, all on this machine's ``AIRFLOW_HOME``. The run is triggered the way a person does
it in the UI (REST, with the Params as ``conf``), so the UI then shows its real start, end,
duration and every task's log (files under ``$AIRFLOW_HOME/logs/dag_id=…/run_id=…/``).

The services start with ``SHOPML_SCHEDULE=none`` (the DAG is manual-only there): unpausing it
to run one date must not switch nightly runs on. A rerun of a date replaces its earlier run.

    python -m cli.airflow_run --ds 2025-12-31 [--conf '{"max_users": 100}'] [--keep]
    python -m cli.airflow_run --port 8080      # only the UI over the state (`make airflow-ui`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

DAG_ID = "nightly_retrain"
SERVICES = ("api-server", "scheduler", "dag-processor")
FINISHED = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunResult:
    run_id: str
    state: str
    start_date: str
    end_date: str
    seconds: float
    tasks: list[dict]

    def table(self) -> str:
        lines = [f"{'task':<20} {'state':<10} {'seconds':>8}"]
        for t in self.tasks:
            lines.append(f"{t['task_id']:<20} {t['state'] or '-':<10} {t['duration'] or 0:>8.1f}")
        return "\n".join(lines)


class Airflow:
    """The three services on one ``AIRFLOW_HOME``, and a REST client as the UI uses it."""

    def __init__(self, env: Mapping[str, str], port: int | None = None, home: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = Path(home or env["AIRFLOW_HOME"])
        self.env = {
            **env,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__PORT": str(self.port),
            # one shared signing secret, so the tokens the scheduler gives its task runners
            # are accepted by the API server (fresh for every start of the services)
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # loopback only, one user: the UI opens without a login (SimpleAuthManager)
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "SHOPML_SCHEDULE": "none",
        }
        self.procs: list[subprocess.Popen] = []
        self._client: httpx.Client | None = None

    # --- services -----------------------------------------------------------------------------
    def start(self, timeout: float = 240) -> Airflow:
        bin_dir = Path(sys.executable).parent
        airflow = str(bin_dir / "airflow") if (bin_dir / "airflow").exists() else "airflow"
        subprocess.run([airflow, "db", "migrate"], env=self.env, check=True,
                       capture_output=True)  # fmt: skip
        logs = self.home / "logs" / "services"
        logs.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            args = [airflow, name]
            if name == "api-server":
                args += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
            self.procs.append(
                subprocess.Popen(
                    args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(logs)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Airflow's API server did not answer on {self.url}; see {logs}")
            time.sleep(2)
        token = httpx.get(f"{self.url}/auth/token", timeout=30).json()["access_token"]
        self._client = httpx.Client(
            base_url=f"{self.url}/api/v2",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        return self

    def _check_alive(self, logs: Path) -> None:
        for name, proc in zip(SERVICES, self.procs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}; see "
                                   f"{logs / (name + '.log')}")  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
        if self._client:
            self._client.close()

    def __enter__(self) -> Airflow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- REST, as the UI does it ----------------------------------------------------------------
    @property
    def api(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("start() the services first")
        return self._client

    def wait_for_dag(self, dag_id: str = DAG_ID, timeout: float = 300) -> None:
        """Until the DAG processor has parsed and serialised the DAG file."""
        deadline = time.monotonic() + timeout
        while self.api.get(f"/dags/{dag_id}").status_code != 200:
            self._check_alive(self.home / "logs" / "services")
            if time.monotonic() > deadline:
                raise TimeoutError(f"DAG {dag_id} was not parsed; see the dag-processor log")
            time.sleep(3)

    def run(
        self, ds: str, conf: Mapping[str, object], dag_id: str = DAG_ID, timeout: float = 3600
    ) -> RunResult:
        """Trigger ``dag_id`` for logical date ``ds`` with ``conf`` and wait for it to finish."""
        self.wait_for_dag(dag_id)
        logical = f"{ds}T00:00:00Z"
        runs = self.api.get(
            f"/dags/{dag_id}/dagRuns",
            params={"logical_date_gte": logical, "logical_date_lte": logical},
        )
        for old in runs.raise_for_status().json()["dag_runs"]:  # a rerun replaces the date's run
            self.api.delete(f"/dags/{dag_id}/dagRuns/{old['dag_run_id']}").raise_for_status()
        self.api.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        created = self.api.post(
            f"/dags/{dag_id}/dagRuns", json={"logical_date": logical, "conf": dict(conf)}
        )
        run_id = created.raise_for_status().json()["dag_run_id"]
        deadline = time.monotonic() + timeout
        while (run := self.api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json())[
            "state"
        ] not in FINISHED:
            self._check_alive(self.home / "logs" / "services")
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run['state']} after {timeout:.0f} s")
            time.sleep(5)
        tis = self.api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()
        tasks = sorted(tis["task_instances"], key=lambda t: t.get("start_date") or "~")
        return RunResult(run_id, run["state"], run["start_date"], run["end_date"],
                         float(run.get("duration") or 0.0), tasks)  # fmt: skip

    def failures(self, result: RunResult, tail: int = 3000, dag_id: str = DAG_ID) -> str:
        """The end of every failed task's log (what to read when a run fails)."""
        failed = [t["task_id"] for t in result.tasks if t["state"] == "failed"]
        return "\n".join(f"--- {task} ---\n"
                         + log_text(self.task_log(result.run_id, task, dag_id))[-tail:]
                         for task in failed)  # fmt: skip

    def task_log(self, run_id: str, task_id: str, dag_id: str = DAG_ID) -> Path:
        """The newest attempt's log file of a task (JSON lines, as the UI reads them)."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return sorted(folder.glob("attempt=*.log"))[-1]


def log_text(log: Path) -> str:
    """A task log as a person reads it in the UI: each record's message, and the exception
    (type and message) of a failed try."""
    out = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        out.append(str(record.get("event", "")))
        for err in record.get("error_detail") or []:
            out.append(f"{err.get('exc_type')}: {err.get('exc_value')}")
    return "\n".join(out)


def printed_lines(log: Path) -> Iterator[str]:
    """What the task printed (its stdout), from the structured log file."""
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("logger") == "task.stdout":
                yield str(record.get("event", ""))


def _serve_forever() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ds", help="logical date, YYYY-MM-DD (none: only serve the UI)")
    parser.add_argument("--conf", default="{}", help="the run's Params as JSON")
    parser.add_argument("--dag", default=DAG_ID, help="nightly_retrain or search_retrain")
    parser.add_argument("--port", type=int, default=None, help="API server/UI port")
    parser.add_argument("--keep", action="store_true", help="leave the UI running afterwards")
    parser.add_argument("--show", nargs="*", default=["evaluate", "promote"],
                        help="tasks whose printed output to repeat here")  # fmt: skip
    args = parser.parse_args(argv)
    # a SIGTERM (a closed terminal, `timeout`, a container stop) stops the services too: they
    # run in their own sessions and would otherwise outlive this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    airflow = Airflow(os.environ, port=args.port).start()
    try:
        if not args.ds:
            print(f"airflow: the UI is on {airflow.url} (Ctrl-C stops it)", flush=True)
            _serve_forever()
            return 0
        print(f"airflow: UI and API on {airflow.url}; running {args.dag} for {args.ds}", flush=True)
        result = airflow.run(args.ds, json.loads(args.conf), dag_id=args.dag)
        for task in args.show:
            with contextlib.suppress(IndexError, FileNotFoundError):
                print("\n".join(printed_lines(airflow.task_log(result.run_id, task, args.dag))))
        print(result.table())
        print(f"DagRun {result.run_id}: state={result.state}, {result.seconds:.0f} s "
              f"({result.start_date} -> {result.end_date}); task logs: "
              f"{airflow.home / 'logs' / f'dag_id={args.dag}'}")  # fmt: skip
        if args.keep:
            print(f"airflow: the UI stays up on {airflow.url} (Ctrl-C stops it)", flush=True)
            _serve_forever()
        return 0 if result.state == "success" else 1
    finally:
        airflow.stop()


if __name__ == "__main__":
    raise SystemExit(main())
