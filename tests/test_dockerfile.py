"""The platform image's Dockerfile, checked statically (no Docker engine needed).

It must stay consistent with what the rest of the repository pins and refers to: the torch
version of scripts/setup.sh, the Horovod build script, the paths and commands the Helm chart
and the Airflow values use, the non-root uid, and the .dockerignore.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "helm" / "shopml"
AIRFLOW_VALUES = REPO / "helm" / "airflow-values.yaml"
UID = 10001


@dataclass
class Instruction:
    stage: str  # name (or index) of the build stage it belongs to; "" before the first FROM
    keyword: str
    args: str
    heredoc: str | None = None


@cache
def instructions() -> tuple[Instruction, ...]:
    """The Dockerfile's instructions: continuations joined, heredoc bodies attached."""
    lines = DOCKERFILE.read_text().splitlines()
    out: list[Instruction] = []
    stage, i = "", 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        body = None
        if marker := re.search(r"<<-?[\"']?(\w+)[\"']?", args):
            end = lines.index(marker.group(1), i)
            body = "\n".join(lines[i:end]) + "\n"
            i = end + 1
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(out))
        out.append(Instruction(stage, keyword, args.strip(), body))
    return tuple(out)


def of(keyword: str, stage: str | None = None) -> list[Instruction]:
    return [
        ins
        for ins in instructions()
        if ins.keyword == keyword and (stage is None or ins.stage == stage)
    ]


def arg_default(name: str) -> str:
    for ins in of("ARG"):
        key, _, value = ins.args.partition("=")
        if key == name:
            return value
    raise AssertionError(f"no ARG {name}")


def run_text(stage: str) -> str:
    return "\n".join(ins.args for ins in of("RUN", stage))


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for ins in of("ENV", "runtime"):
        for token in shlex.split(ins.args):
            key, _, value = token.partition("=")
            values[key] = value
    return values


def copies() -> list[tuple[list[str], str, Instruction]]:
    """(sources, absolute destination, instruction) of each COPY from the build context."""
    out = []
    workdir = {"": "/"}
    for ins in instructions():
        if ins.keyword == "WORKDIR":
            workdir[ins.stage] = ins.args
        if ins.keyword != "COPY" or ins.heredoc is not None:
            continue
        tokens = [t for t in shlex.split(ins.args) if not t.startswith("--")]
        if "--from=" in ins.args:
            continue
        *sources, dest = tokens
        base = PurePosixPath(workdir.get(ins.stage, "/"))
        out.append((sources, str(base / dest), ins))
    return out


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def airflow_values() -> dict:
    return yaml.safe_load(AIRFLOW_VALUES.read_text())


# --- base image and user ------------------------------------------------------------------------
def test_base_image_is_a_pinned_python_3_11_bookworm():
    base = arg_default("PYTHON_IMAGE")
    # Pinned to the Python minor version and Debian release (optionally to a digest); never
    # a floating tag such as `latest` or `3`.
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert arg_default("BUILDER_IMAGE") == "${PYTHON_IMAGE}"
    froms = [ins.args for ins in of("FROM")]
    assert froms == ["${BUILDER_IMAGE} AS builder", "${PYTHON_IMAGE} AS runtime"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.12"
    # The venv copied from the builder is the image's Python; its path names the version.
    assert env()["SPARK_HOME"] == "/opt/venv/lib/python3.11/site-packages/pyspark"


def test_runs_as_a_numeric_non_root_user_matching_the_chart():
    users = of("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].stage == "runtime"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) == UID and int(gid) == UID
    assert f"--uid {UID}" in run_text("runtime") and f"--gid {UID}" in run_text("runtime")
    security = chart_values()["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == UID
    assert airflow_values()["uid"] == UID


# --- build inputs ---------------------------------------------------------------------------------
def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    parts = PurePosixPath(path.rstrip("/")).parts
    return any(
        fnmatch.fnmatch(path.rstrip("/"), pattern.removeprefix("**/"))
        or any(fnmatch.fnmatch(part, pattern.removeprefix("**/")) for part in parts)
        for pattern in dockerignore()
    )


def test_every_copy_source_exists_in_the_repository_and_the_build_context():
    found = copies()
    assert len(found) >= 8
    for sources, _, _ in found:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    heredocs = [ins for ins in of("COPY") if ins.heredoc is not None]
    assert heredocs, "the entrypoint is written by a heredoc COPY"
    assert DOCKERFILE.read_text().startswith("# syntax=docker/dockerfile:1.")


def test_dockerignore_keeps_state_environments_and_vcs_out():
    patterns = set(dockerignore())
    assert {".venv", "var", ".git"} <= patterns
    for path in (".venv/bin/python", "var/lake/raw", ".git/HEAD", "shopml/__pycache__/x.pyc"):
        assert ignored(path), path


def test_torch_is_pinned_like_scripts_setup():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    (pinned,) = set(re.findall(r"torch==([\d.]+)", setup))
    assert arg_default("TORCH_VERSION") == pinned
    registry = (REPO / "training" / "registry.py").read_text()
    assert f'"torch=={pinned}"' in registry  # what logged models declare
    assert arg_default("TORCH_VARIANT") == "cpu"
    assert arg_default("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    builder = run_text("builder")
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in builder
    # torch before the lock, as setup.sh does (the lock does not resolve torch).
    assert builder.index("torch==") < builder.index("requirements.lock")
    assert "-r requirements.lock" in builder


def test_horovod_is_built_by_the_project_script_with_an_nccl_switch():
    builder = run_text("builder")
    assert "bash scripts/build_horovod.sh /opt/venv/bin/python" in builder
    assert (["scripts/build_horovod.sh"], "/src/scripts", of("COPY", "builder")[1]) in copies()
    assert arg_default("HOROVOD_GPU_OPERATIONS") == ""
    # The script never sets HOROVOD_GPU_OPERATIONS itself (the caller's value reaches
    # Horovod's build) and keys its wheel cache on it (a NCCL wheel is not the CPU one).
    script = (REPO / "scripts" / "build_horovod.sh").read_text()
    assert not re.search(r"(export\s+)?HOROVOD_GPU_OPERATIONS=", script)
    assert 'TAG="torch${TORCH_VERSION}${HOROVOD_GPU_OPERATIONS:+' in script
    assert "unset HOROVOD_GPU_OPERATIONS" in builder  # empty means a CPU (Gloo) build


def test_system_packages():
    builder_apt = run_text("builder")
    for package in ("g++", "cmake"):
        assert re.search(rf"apt-get install .*\s{re.escape(package)}(\s|$)", builder_apt)
    runtime_apt = run_text("runtime")
    for package in ("openjdk-17-jre-headless", "tini", "procps"):
        assert re.search(rf"apt-get install .*\s{re.escape(package)}(\s|$)", runtime_apt)
    assert "rm -rf /var/lib/apt/lists/*" in builder_apt and "rm -rf /var/lib/apt/lists/*" in (
        runtime_apt
    )


def test_project_is_installed_from_the_source_tree_at_opt_shopml():
    workdirs = [ins.args for ins in of("WORKDIR", "runtime")]
    assert workdirs == ["/opt/shopml"]
    runtime = run_text("runtime")
    # Editable, as scripts/setup.sh: shopml locates feature_repo/ next to its package.
    assert "--no-deps -e ." in runtime
    destinations = {dest.rstrip("/") for _, dest, _ in copies()}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for pattern in packages:
        package = pattern.rstrip("*")
        assert f"/opt/shopml/{package}" in destinations, package
    for path in ("pyproject.toml", "README.md"):  # the build backend reads both
        assert any(path in sources for sources, _, _ in copies()), path


# --- what the chart and the Airflow values rely on ---------------------------------------------
def chart_texts() -> str:
    templates = sorted((CHART / "templates").glob("*"))
    return "\n".join(p.read_text() for p in [*templates, AIRFLOW_VALUES])


def test_paths_the_chart_uses_exist_in_the_image():
    destinations = {dest.rstrip("/") for _, dest, _ in copies()}
    texts = chart_texts()
    mount_paths = set(re.findall(r"mountPath:\s*(/\S+)", texts))
    mount_paths |= set(re.findall(r"\$confDir := \"(/\S+)\"", texts))
    referenced = set(re.findall(r"/opt/shopml/[A-Za-z0-9_.\-/]+", texts))
    assert {"/opt/shopml/feature_repo", "/opt/shopml/dags"} <= {
        "/".join(p.split("/")[:4]) for p in referenced
    }
    for path in referenced:
        top = "/".join(path.split("/")[:4])
        if top in destinations:
            local = REPO / PurePosixPath(path).relative_to("/opt/shopml")
            assert local.exists(), f"{path}: not in the repository copied there"
        else:
            assert top in mount_paths, f"{path}: neither copied into the image nor mounted"


def test_commands_the_chart_runs_are_installed_console_scripts():
    commands = set(re.findall(r'command: \["([\w-]+)"', chart_texts()))
    assert commands == {"shopml", "mlflow", "feast"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    lock = (REPO / "requirements.lock").read_text()
    for command in commands - set(scripts):
        assert command in installed, f"{command}: no console script in the environment"
        dist = installed[command].dist
        assert dist is not None
        assert re.search(rf"^{re.escape(dist.name)}(\[.*\])?==", lock, re.M | re.I), dist.name


def test_environment_matches_the_chart_and_airflow_values():
    variables = env()
    assert variables["SHOPML_HOME"] == chart_values()["shopml"]["home"]
    airflow = airflow_values()
    assert variables["AIRFLOW__CORE__DAGS_FOLDER"] == airflow["dags"]["mountPath"]
    assert variables["AIRFLOW_HOME"] == "/opt/airflow"  # the official chart's airflowHome
    assert variables["PATH"].startswith("/opt/venv/bin:")
    runtime = run_text("runtime")
    assert f"chown -R {UID}:{UID} /var/lib/shopml /opt/airflow" in runtime


# --- entrypoint -----------------------------------------------------------------------------------
def entrypoint_script() -> tuple[str, str]:
    (ins,) = [i for i in of("COPY", "runtime") if i.heredoc is not None]
    return shlex.split(ins.args)[-1], ins.heredoc or ""


def test_entrypoint_is_tini_with_the_dispatch_script():
    (entry,) = of("ENTRYPOINT")
    path, _ = entrypoint_script()
    assert json.loads(entry.args) == ["/usr/bin/tini", "--", path]
    assert "--chmod=0755" in [i for i in of("COPY", "runtime") if i.heredoc][0].args
    (cmd,) = of("CMD")
    assert json.loads(cmd.args)[0] == "shopml"


@pytest.fixture
def entrypoint(tmp_path):
    _, body = entrypoint_script()
    script = tmp_path / "shopml-entrypoint"
    script.write_text(body)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    java = fake_bin / "java"
    java.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    java.chmod(0o755)
    return script, fake_bin


def test_entrypoint_runs_any_command(entrypoint):
    script, _ = entrypoint
    out = subprocess.run(
        ["bash", str(script), "bash", "-c", "echo ran $0", "airflow"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "ran airflow\n"


def test_entrypoint_starts_a_spark_executor(entrypoint):
    """What Spark-on-Kubernetes passes an executor pod: the argument `executor` and env."""
    script, fake_bin = entrypoint
    spark_env = {
        "SPARK_HOME": "/opt/venv/lib/python3.11/site-packages/pyspark",
        "SPARK_EXECUTOR_MEMORY": "4g",
        "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@10.0.0.5:7078",
        "SPARK_EXECUTOR_ID": "3",
        "SPARK_EXECUTOR_CORES": "2",
        "SPARK_APPLICATION_ID": "spark-app-1",
        "SPARK_EXECUTOR_POD_IP": "10.0.0.9",
        "SPARK_RESOURCE_PROFILE_ID": "0",
        "SPARK_EXECUTOR_POD_NAME": "shopml-exec-3",
        "SPARK_JAVA_OPT_1": "-Dspark.b=2",
        "SPARK_JAVA_OPT_0": "-Dspark.a=1",
    }
    out = subprocess.run(
        ["bash", str(script), "executor"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{fake_bin}:{os.environ['PATH']}", **spark_env},
    )
    args = out.stdout.splitlines()
    assert args[:4] == ["-Dspark.a=1", "-Dspark.b=2", "-Xms4g", "-Xmx4g"]
    assert args[args.index("-cp") + 1] == f"{spark_env['SPARK_HOME']}/jars/*"
    backend = "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"
    assert args[args.index("-cp") + 2] == backend
    rest = args[args.index(backend) + 1 :]
    options = dict(zip(rest[::2], rest[1::2], strict=True))
    assert options == {
        "--driver-url": spark_env["SPARK_DRIVER_URL"],
        "--executor-id": "3",
        "--cores": "2",
        "--app-id": "spark-app-1",
        "--hostname": "10.0.0.9",
        "--resourceProfileId": "0",
        "--podName": "shopml-exec-3",
    }
    # The class ships in pyspark's jars, which SPARK_HOME points at in the image.
    spec = importlib.util.find_spec("pyspark")
    assert spec and spec.origin
    jars = sorted((Path(spec.origin).parent / "jars").glob("spark-kubernetes_*.jar"))
    assert jars, "pyspark has no spark-kubernetes jar"
    with zipfile.ZipFile(jars[0]) as jar:
        assert backend.replace(".", "/") + ".class" in jar.namelist()
