"""The one launcher of the training loop: in process, or ``horovodrun`` with N workers.

``horovodrun -np N -H localhost:N --gloo python -m mlkit.loop SPEC OUT`` on one machine (Gloo
on CPU); on a cluster the same ``python -m mlkit.loop`` is the worker command of a Kubernetes
Job (see helm/), with NCCL instead of Gloo.

``elastic=True`` launches Horovod Elastic instead: ``--min-np 1 --max-np N`` and a host
discovery script, so a worker that dies is dropped and the others go on from the last
committed epoch (``mlkit.loop``). Horovod 0.28.1 blacklists the host of a failed worker and
stops once every host is blacklisted, so on one machine the N slots are listed as N hosts
(``localhost``, ``127.0.0.1``, …), one slot each.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from mlkit.loop import Curve, LoopConfig, Trainable, train_loop

ROOT = Path(__file__).resolve().parents[1]  # the source tree the workers import


def horovodrun_command(workers: int, spec: Path, out: Path) -> list[str]:
    """The command line that runs ``mlkit.loop`` on ``workers`` Gloo processes."""
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    return [
        horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
        sys.executable, "-m", "mlkit.loop", str(spec), str(out),
    ]  # fmt: skip


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3")


def elastic_command(workers: int, spec: Path, out: Path, discovery: Path) -> list[str]:
    """``horovodrun`` in elastic mode over ``workers`` one-slot loopback hosts."""
    if workers > len(LOOPBACK_NAMES):
        raise ValueError(f"elastic on one machine supports up to {len(LOOPBACK_NAMES)} workers")
    discovery.write_text("#!/bin/sh\n" + "".join(f"echo {h}:1\n" for h in LOOPBACK_NAMES[:workers]))
    discovery.chmod(0o755)
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    return [
        horovodrun, "-np", str(workers), "--min-np", "1", "--max-np", str(workers),
        "--host-discovery-script", str(discovery), "--gloo",
        sys.executable, "-m", "mlkit.loop", str(spec), str(out),
    ]  # fmt: skip


def worker_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: ours, the engines' settings (``extra``), the source tree."""
    env = {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def train(
    task: Trainable,
    cfg: LoopConfig,
    workers: int,
    env: dict[str, str] | None = None,
    elastic: bool = False,
) -> tuple[nn.Module, Curve]:
    """Train ``task``; returns rank 0's network and the loss curve.

    ``workers == 1`` runs the loop here (Horovod of size 1); more start ``horovodrun`` (elastic
    when asked), whose output is printed and, when it fails, raised with the end of its stderr.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 and not elastic:
        return train_loop(task, cfg)
    with tempfile.TemporaryDirectory(prefix="shopml-hvd-") as tmp:
        spec, out = Path(tmp) / "spec.pkl", Path(tmp) / "net.pt"
        with spec.open("wb") as f:
            pickle.dump((task, cfg), f)
        command = (
            elastic_command(workers, spec, out, Path(tmp) / "discover.sh")
            if elastic
            else horovodrun_command(workers, spec, out)
        )
        proc = subprocess.run(
            command,
            env=worker_environment(env),
            capture_output=True,
            text=True,
        )
        print(proc.stdout[-5000:])
        if proc.returncode != 0:
            raise RuntimeError(
                f"horovodrun failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
            )
        net, curve = torch.load(out, weights_only=False)
    return net, curve
