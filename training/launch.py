"""Start distributed training with ``horovodrun`` (the DAG's train task calls this)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shopml.config import Settings, TrainConfig, service_environment


def horovodrun_command(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """``horovodrun -np N -H localhost:N --gloo python -m training.train ...``.

    On a cluster the same ``python -m training.train`` is the worker command of a Kubernetes
    Job (see helm/), with NCCL instead of Gloo.
    """
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    return [
        horovodrun,
        "-np",
        str(cfg.workers),
        "-H",
        f"localhost:{cfg.workers}",
        "--gloo",
        sys.executable,
        "-m",
        "training.train",
        "--run-dir",
        str(run_dir),
        "--config",
        cfg.model_dump_json(),
    ]


def train_distributed(settings: Settings, run_dir: Path, mlflow_run_id: str | None) -> Path:
    """Run the workers to completion; raise with their output when they fail."""
    env = {**os.environ, **service_environment(settings), "PYTHONUNBUFFERED": "1"}
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        horovodrun_command(run_dir, settings.train), env=env, capture_output=True, text=True
    )
    print(proc.stdout[-5000:])
    if proc.returncode != 0:
        raise RuntimeError(f"horovodrun failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")
    return run_dir / "model.pt"
