"""The Helm chart (helm/shopml) and the Airflow chart values, checked offline.

The chart is rendered with `helm template` for the default and the production-like values
(helm/shopml/ci/production-values.yaml), linted with `helm lint --strict`, and every rendered
object is validated against Kubernetes' own schemas (the `kubernetes-validate` package). helm
comes from `scripts/fetch_tools.sh` (cached outside the clone) or $SHOPML_HELM.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "shopml"
PRODUCTION = CHART / "ci" / "production-values.yaml"
AIRFLOW_VALUES = REPO / "helm" / "airflow-values.yaml"
RELEASE = "shopml"
NAMESPACE = "shopml"
UID = 10001
VALUE_SETS = {"default": None, "production": PRODUCTION}
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas shipped.
K8S_OLDEST = "1.30.0"

Doc = dict[str, Any]


# --- helpers ----------------------------------------------------------------------------------
def helm_binary() -> str:
    """helm from $SHOPML_HELM or fetch_tools.sh's cache; a missing helm fails the test."""
    explicit = os.environ.get("SHOPML_HELM")
    if explicit:
        candidate = Path(explicit)
    else:
        cache = os.environ.get("SHOPML_TOOLS_DIR") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "shopml", "tools"
        )
        candidate = Path(cache) / "helm"
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        pytest.fail(
            f"helm not found at {candidate}: run `bash scripts/fetch_tools.sh` (it caches helm "
            "outside the clone) or set SHOPML_HELM to a helm binary",
            pytrace=False,
        )
    return str(candidate)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


def value_args(values: Path | None, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-f", str(values)] if values else []
    for s in sets:
        args += ["--set", s]
    return args


@functools.cache
def render(values: Path | None = None, sets: tuple[str, ...] = ()) -> tuple[Doc, ...]:
    proc = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *value_args(values, sets)
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_specs(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    """Every pod spec the chart runs: workloads, plus the Spark executor pod template."""
    specs = {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }
    spark = find(docs, "ConfigMap", f"{RELEASE}-spark")["data"]
    if "executor-pod-template.yaml" in spark:
        specs["spark-executor"] = yaml.safe_load(spark["executor-pod-template.yaml"])["spec"]
    return specs


def container(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    (c,) = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def profile(docs: tuple[Doc, ...]) -> dict[str, str]:
    return find(docs, "ConfigMap", f"{RELEASE}-profile")["data"]


def spark_defaults(docs: tuple[Doc, ...]) -> dict[str, str]:
    text = find(docs, "ConfigMap", f"{RELEASE}-spark")["data"]["spark-defaults.conf"]
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip())
    return {k: v.strip() for k, v in pairs}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- lint and schema validation of the rendered objects -----------------------------------------
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(values):
    proc = helm("lint", "--strict", str(CHART), *value_args(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


EXPECTED_OBJECTS = {
    ("ConfigMap", "shopml-profile"),
    ("ConfigMap", "shopml-spark"),
    ("ServiceAccount", "shopml"),
    ("ServiceAccount", "shopml-spark"),
    ("Role", "shopml-spark"),
    ("RoleBinding", "shopml-spark"),
    ("Deployment", "shopml-serving"),
    ("Deployment", "shopml-stream"),
    ("Service", "shopml-serving"),
    ("HorizontalPodAutoscaler", "shopml-serving"),
    ("PodDisruptionBudget", "shopml-serving"),
    ("Deployment", "shopml-mlflow"),
    ("Service", "shopml-mlflow"),
    ("Deployment", "shopml-feast"),
    ("Service", "shopml-feast"),
    ("NetworkPolicy", "shopml-serving"),
    ("NetworkPolicy", "shopml-mlflow-clients"),
}


def test_default_values_render_the_platform():
    objects = {(d["kind"], d["metadata"]["name"]) for d in render()}
    # No training Job without a date; the state PVC is created by the chart.
    assert objects == EXPECTED_OBJECTS | {("PersistentVolumeClaim", "shopml-state")}


def test_production_values_render_the_platform_and_a_training_job():
    objects = {(d["kind"], d["metadata"]["name"]) for d in render(PRODUCTION)}
    # The lake is an existing claim: no PVC rendered.
    assert objects == EXPECTED_OBJECTS | {("Job", "shopml-train-2025-12-31")}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_objects_match_the_kubernetes_schema(values):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: run scripts/setup.sh", pytrace=False)

    docs = list(render(values))
    executor = find(render(values), "ConfigMap", f"{RELEASE}-spark")["data"]
    docs.append(yaml.safe_load(executor["executor-pod-template.yaml"]))
    errors = []
    for version in (K8S_OLDEST, kubernetes_validate.latest_version()):
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = "/".join(map(str, e.path))
                errors.append(f"k8s {version} {doc['kind']} {where}: {e.message}")
    assert not errors, "\n".join(errors)


# --- security -----------------------------------------------------------------------------------
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_pod_is_non_root_and_hardened(values):
    for where, spec in pod_specs(render(values)).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] == UID, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["privileged"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: /tmp is not an emptyDir"
            if where != "spark-executor":  # Spark sets the executors' resources
                assert c["resources"]["requests"]["memory"], where
                assert c["resources"]["limits"]["memory"], where


CREDENTIAL_IN_URI = re.compile(r"[a-z0-9+.-]+://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
SECRET_LIKE_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY$", re.IGNORECASE)


def _strings(node: Any):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_no_secret_is_rendered_in_plain_text(values):
    docs = render(values)
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not render Secrets"
    for s in _strings(list(docs)):
        assert not CREDENTIAL_IN_URI.search(s), f"credentials in a URI: {s!r}"
        if "password=" in s:
            assert "password=$(" in s, f"literal password in {s!r}"
    for where, spec in pod_specs(docs).items():
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_LIKE_NAME.search(e["name"]):
                    assert "valueFrom" in e and "value" not in e, f"{where}: {e['name']} literal"
    for key in profile(docs):
        assert not SECRET_LIKE_NAME.search(key), f"secret-like key {key} in the ConfigMap"


def test_passwords_come_from_the_referenced_secrets():
    docs = render(PRODUCTION)
    prod = load_yaml(PRODUCTION)
    for kind, name in [
        ("Deployment", "shopml-serving"),
        ("Deployment", "shopml-mlflow"),
        ("Deployment", "shopml-feast"),
        ("Job", "shopml-train-2025-12-31"),
    ]:
        env = env_of(container(docs, kind, name))
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": prod["postgres"]["existingSecret"],
            "key": prod["postgres"]["passwordKey"],
        }
        assert env["SHOPML_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": prod["redis"]["existingSecret"],
            "key": prod["redis"]["passwordKey"],
        }
        # Kubernetes expands $(VAR) only from variables defined before it.
        names = list(env)
        assert names.index("SHOPML_REDIS_PASSWORD") < names.index("SHOPML_FEAST__REDIS_CONNECTION")
        conn = env["SHOPML_FEAST__REDIS_CONNECTION"]["value"]
        assert conn == (
            "redis-master.data.svc.cluster.local:6379,db=0,ssl=true,"
            "password=$(SHOPML_REDIS_PASSWORD)"
        )
        assert env["SHOPML_FEAST_REDIS"]["value"] == "$(SHOPML_FEAST__REDIS_CONNECTION)"
        # the user-id key (shopml.privacy) of every pod that lands or serves: the Secret's
        assert env["SHOPML_PRIVACY__KEY"] == {
            "name": "SHOPML_PRIVACY__KEY",
            "valueFrom": {"secretKeyRef": {"name": "shopml-user-id-key", "key": "key"}},
        }
    # Without secrets (default values) nothing references one.
    env = env_of(container(render(), "Deployment", "shopml-serving"))
    assert "PGPASSWORD" not in env and "password=" not in env["SHOPML_FEAST__REDIS_CONNECTION"]


# --- the profile ---------------------------------------------------------------------------------
# Variables ShopML's engines read directly (shopml.config.service_environment), not Settings.
SERVICE_ENV = {
    "SHOPML_FEAST_PROJECT", "SHOPML_FEAST_REGISTRY", "SHOPML_FEAST_REDIS",
    "SHOPML_FEAST_OFFLINE_STORE",
}  # fmt: skip


def _settings_field(key: str):
    """The Settings field a SHOPML_* variable sets (prefix SHOPML_, nesting with __)."""
    from shopml.config import Settings

    model: Any = Settings
    parts = key.removeprefix("SHOPML_").lower().split("__")
    for i, part in enumerate(parts):
        assert part in model.model_fields, f"{key}: no Settings field {'.'.join(parts[: i + 1])}"
        model = model.model_fields[part].annotation
    return model


def test_profile_configmap_configures_shopml_settings(monkeypatch):
    from shopml.config import Profile, Settings

    docs = render(PRODUCTION)
    data = profile(docs)
    for key in data:
        if key.startswith("SHOPML_") and key not in SERVICE_ENV:
            _settings_field(key)
    serving = container(docs, "Deployment", "shopml-serving")
    literal_env = {k: e["value"] for k, e in env_of(serving).items() if "value" in e}
    for key in literal_env:
        if key.startswith("SHOPML_") and key not in SERVICE_ENV | {"SHOPML_REDIS_PASSWORD"}:
            _settings_field(key)
    for key in list(os.environ):
        if key.startswith("SHOPML_"):
            monkeypatch.delenv(key)
    for key, value in {**data, **literal_env}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.profile is Profile.PRODUCTION
    assert settings.tracking_uri == f"http://shopml-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert settings.artifact_root == "mlflow-artifacts:/shopml"
    assert settings.feast.online_store == "redis"
    assert settings.feast.offline_store == "spark"
    assert json.loads(data["SHOPML_FEAST_OFFLINE_STORE"]) == {"type": "spark"}
    assert settings.feast_registry.startswith("postgresql+psycopg2://shopml@shopml-db.")
    assert settings.spark.master == "k8s://https://kubernetes.default.svc:443"
    assert settings.train.workers == load_yaml(PRODUCTION)["training"]["workers"]
    assert str(settings.home) == "/var/lib/shopml"


def test_profile_is_what_airflow_reads():
    """airflow-values.yaml points Airflow's pods at the objects this chart names."""
    docs = render()
    airflow = load_yaml(AIRFLOW_VALUES)
    env_from = yaml.safe_load(airflow["extraEnvFrom"])
    assert {"configMapRef": {"name": f"{RELEASE}-profile"}} in env_from
    volumes = {v["name"]: v for v in airflow["volumes"]}
    assert volumes["shopml-state"]["persistentVolumeClaim"]["claimName"] == "shopml-state"
    find(docs, "PersistentVolumeClaim", "shopml-state")
    assert volumes["shopml-spark"]["configMap"]["name"] == f"{RELEASE}-spark"
    mounts = {m["name"]: m["mountPath"] for m in airflow["volumeMounts"]}
    assert mounts["shopml-state"] == profile(docs)["SHOPML_HOME"]
    extra_env = {e["name"]: e for e in yaml.safe_load(airflow["extraEnv"])}
    assert extra_env["SPARK_CONF_DIR"]["value"] == mounts["shopml-spark"]
    conn = extra_env["SHOPML_FEAST__REDIS_CONNECTION"]["value"]
    chart_conn = env_of(container(docs, "Deployment", "shopml-serving"))
    assert conn.split(",password=")[0] == chart_conn["SHOPML_FEAST__REDIS_CONNECTION"]["value"]
    secret_env = {s["envName"]: s for s in airflow["secret"]}
    assert set(secret_env) == {"PGPASSWORD", "SHOPML_REDIS_PASSWORD", "SHOPML_PRIVACY__KEY"}
    prod = load_yaml(PRODUCTION)
    serving_key = env_of(container(docs, "Deployment", "shopml-serving"))["SHOPML_PRIVACY__KEY"]
    assert (
        secret_env["SHOPML_PRIVACY__KEY"]["secretName"]
        == (serving_key["valueFrom"]["secretKeyRef"]["name"])
    )  # the DAG's land and serving hash user ids with the same key
    assert (
        secret_env["SHOPML_PRIVACY__KEY"]["secretKey"]
        == (serving_key["valueFrom"]["secretKeyRef"]["key"])
    )
    assert secret_env["PGPASSWORD"]["secretName"] == prod["postgres"]["existingSecret"]
    assert secret_env["SHOPML_REDIS_PASSWORD"]["secretName"] == prod["redis"]["existingSecret"]
    # The Airflow release's task pods run Spark drivers: bound to the Spark Role.
    binding = find(docs, "RoleBinding", "shopml-spark")
    assert {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": NAMESPACE} in (
        binding["subjects"]
    )


def test_airflow_values_use_the_shopml_image_and_no_plain_secrets():
    airflow = load_yaml(AIRFLOW_VALUES)
    chart_values = load_yaml(CHART / "values.yaml")
    assert airflow["images"]["airflow"]["repository"] == chart_values["image"]["repository"]
    assert airflow["defaultAirflowRepository"] == chart_values["image"]["repository"]
    pinned = re.search(r"^apache-airflow==([\d.]+)$", (REPO / "requirements.in").read_text(), re.M)
    assert pinned and airflow["airflowVersion"] == pinned.group(1)
    assert airflow["executor"] in ("KubernetesExecutor", "LocalExecutor")
    assert airflow["uid"] == UID
    assert airflow["dags"]["mountPath"] == airflow["config"]["core"]["dags_folder"]
    assert airflow["dags"]["mountPath"] == "/opt/shopml/dags"
    assert not airflow["dags"]["gitSync"]["enabled"]
    assert not airflow["dags"]["persistence"]["enabled"]
    assert airflow["postgresql"]["enabled"] is False
    assert airflow["data"]["metadataSecretName"]
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert airflow[key], key
    text = AIRFLOW_VALUES.read_text()
    assert not CREDENTIAL_IN_URI.search(text.replace("<pw>", ""))
    for key in ("pass", "password", "fernetKey", "apiSecretKey", "jwtSecret"):
        assert not re.search(rf"^\s*{key}:\s*\S", text, re.M), f"plain {key} in airflow values"


# --- components ------------------------------------------------------------------------------
def _cli_params(command: str) -> set[str]:
    import typer

    from cli.main import app

    click_app = typer.main.get_command(app)
    return {opt for p in click_app.commands[command].params for opt in p.opts}


def _probe(c: Doc, kind: str) -> tuple[str, str]:
    get = c[kind]["httpGet"]
    return get["path"], get["port"]


def test_serving_deployment_probes_service_hpa_and_pdb():
    docs = render(PRODUCTION)
    deploy = find(docs, "Deployment", "shopml-serving")
    c = container(docs, "Deployment", "shopml-serving")
    assert c["command"] == ["shopml", "serve"]
    assert c["args"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert {"--host", "--port"} <= _cli_params("serve")
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert _probe(c, "livenessProbe") == ("/healthz", "http")
    assert _probe(c, "readinessProbe") == ("/readyz", "http")
    assert _probe(c, "startupProbe") == ("/healthz", "http")
    # The HPA owns the replica count.
    assert "replicas" not in deploy["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()

    svc = find(docs, "Service", "shopml-serving")
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"][0]["targetPort"] == "http"

    hpa = find(docs, "HorizontalPodAutoscaler", "shopml-serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "shopml-serving",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert c["resources"]["requests"]["cpu"]

    pdb = find(docs, "PodDisruptionBudget", "shopml-serving")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1


def test_serving_config_reaches_the_services_settings_and_pods_are_scraped(monkeypatch, tmp_path):
    values = tmp_path / "ab.yaml"  # a file: `--set` would pass 0.2 as a string
    values.write_text("serving:\n  config:\n    challengerShare: 0.2\n    maxCandidates: 300\n")
    docs = render(values)
    env = {
        k: e["value"]
        for k, e in env_of(container(docs, "Deployment", "shopml-serving")).items()
        if k.startswith("SHOPML_SERVING__")
    }
    assert env == {
        "SHOPML_SERVING__MAX_CANDIDATES": "300",
        "SHOPML_SERVING__THREADS": "1",
        "SHOPML_SERVING__CHALLENGER_SHARE": "0.2",
        "SHOPML_SERVING__RELOAD_INTERVAL_S": "30",
        "SHOPML_SERVING__ITEM_FEATURE_REFRESH_S": "300",
    }
    from shopml.config import load_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    serving = load_settings().serving  # the names and values the service parses
    assert (serving.max_candidates, serving.challenger_share, serving.threads) == (300, 0.2, 1)
    assert (serving.reload_interval_s, serving.item_feature_refresh_s) == (30, 300)
    meta = find(docs, "Deployment", "shopml-serving")["spec"]["template"]["metadata"]
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    assert meta["annotations"]["prometheus.io/port"] == "8000"
    off = render(None, ("serving.metrics.scrapeAnnotations=false",))
    meta = find(off, "Deployment", "shopml-serving")["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in meta.get("annotations", {})


def test_serving_without_autoscaling_sets_replicas():
    docs = render(None, ("serving.autoscaling.enabled=false", "serving.replicaCount=3"))
    assert find(docs, "Deployment", "shopml-serving")["spec"]["replicas"] == 3
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]


def _package_file(package: str, *parts: str) -> str:
    """Source of an installed package's file, read without importing it (imports are slow)."""
    spec = importlib.util.find_spec(package)
    assert spec and spec.origin, f"{package} is not installed"
    return Path(spec.origin).parent.joinpath(*parts).read_text()


def test_mlflow_server_uses_postgres_without_password_and_allows_its_service_names():
    docs = render(PRODUCTION)
    c = container(docs, "Deployment", "shopml-mlflow")
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    assert args[args.index("--artifacts-destination") + 1] == "/var/lib/shopml/mlflow/artifacts"
    assert "--serve-artifacts" in args
    env = env_of(c)
    store = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert store == (
        "postgresql+psycopg2://shopml@shopml-db.data.svc.cluster.local:5432/mlflow?sslmode=require"
    )
    assert "PGPASSWORD" in env
    # The tracking URI every client uses must pass mlflow's Host-header check.
    tracking = profile(docs)["SHOPML_MLFLOW_TRACKING_URI"]
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert tracking.removeprefix("http://") in allowed
    assert "mlflow.shop.example.com" in allowed and "shopml-mlflow:5000" in allowed
    # mlflow reads these options from those variables (checked in its source, not imported).
    cli = _package_file("mlflow", "cli", "__init__.py") + _package_file(
        "mlflow", "utils", "cli_args.py"
    )
    for needle in (
        'envvar="MLFLOW_BACKEND_STORE_URI"',
        'envvar="MLFLOW_SERVER_ALLOWED_HOSTS"',
        '"--artifacts-destination"',
        '"--serve-artifacts/--no-serve-artifacts"',
        '"--workers"',
    ):
        assert needle in cli, needle
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["state"] == "/var/lib/shopml"
    assert _probe(c, "livenessProbe") == ("/health", "http")


def test_feast_server_serves_the_production_feature_repo():
    docs = render(PRODUCTION)
    c = container(docs, "Deployment", "shopml-feast")
    assert c["command"] == ["feast"]
    args = c["args"]
    repo_dir = args[args.index("--chdir") + 1]
    store_yaml = args[args.index("--feature-store-yaml") + 1]
    assert repo_dir == "/opt/shopml/feature_repo"
    local_yaml = REPO / Path(store_yaml).relative_to("/opt/shopml")
    assert local_yaml.name == "feature_store.production.yaml" and local_yaml.is_file()
    assert args[args.index("serve") + 1 :][:4] == ["--host", "0.0.0.0", "--port", "6566"]
    feast_cli = _package_file("feast", "cli", "cli.py") + _package_file("feast", "cli", "serve.py")
    for option in ("--chdir", "--feature-store-yaml", "--registry_ttl_sec", "--workers"):
        assert f'"{option}"' in feast_cli, option
    # Every ${VAR} of the store config is set in the pod.
    available = set(profile(docs)) | set(env_of(c))
    wanted = set(re.findall(r"\$\{(\w+)\}", local_yaml.read_text()))
    assert wanted and wanted <= available, wanted - available
    assert _probe(c, "readinessProbe") == ("/health", "http")


def test_training_job_requests_gpus_on_selected_nodes():
    docs = render(PRODUCTION)
    job = find(docs, "Job", "shopml-train-2025-12-31")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["shopml", "train"] and c["args"] == ["--ds", "2025-12-31"]
    assert "--ds" in _cli_params("train")
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    env = env_of(c)
    assert env["SHOPML_TRAIN__WORKERS"]["value"] == "4"
    assert env["SHOPML_TRAIN__EPOCHS"]["value"] == "20"
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert "nodeAffinity" in spec["affinity"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "shopml-lake"
    assert job["spec"]["backoffLimit"] == 0


def test_cpu_training_job_requests_no_gpu():
    docs = render(None, ("training.enabled=true", "training.ds=2025-12-31"))
    c = container(docs, "Job", "shopml-train-2025-12-31")
    assert not [r for r in c["resources"]["requests"] if "gpu" in r]
    assert not [r for r in c["resources"]["limits"] if "gpu" in r]
    assert env_of(c)["CUDA_VISIBLE_DEVICES"]["value"] == ""


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("training.enabled=true",), "training.ds"),
        (
            (
                "training.enabled=true",
                "training.ds=2025-12-31",
                "training.gpus=2",
                "training.workers=4",
            ),
            "must not exceed training.gpus",
        ),
        (("mlflow.enabled=false",), "shopml.mlflowTrackingUri"),
        (("serving.resources.requests.cpu=null",), "serving.resources.requests.cpu"),
    ],
    ids=["training-without-ds", "more-workers-than-gpus", "no-tracking-server", "hpa-no-cpu"],
)
def test_inconsistent_values_fail_with_a_message(sets, message):
    proc = helm("template", RELEASE, str(CHART), *value_args(None, sets))
    assert proc.returncode != 0
    assert message in proc.stderr


def test_spark_defaults_submit_executors_to_this_namespace():
    docs = render(PRODUCTION)
    conf = spark_defaults(docs)
    assert conf["spark.master"] == profile(docs)["SHOPML_SPARK__MASTER"]
    assert conf["spark.kubernetes.namespace"] == NAMESPACE
    serving_image = container(docs, "Deployment", "shopml-serving")["image"]
    assert conf["spark.kubernetes.container.image"] == serving_image
    assert conf["spark.kubernetes.authenticate.executor.serviceAccountName"] == "shopml-spark"
    assert (conf["spark.executor.instances"], conf["spark.executor.memory"]) == ("8", "8g")
    assert conf["spark.executor.cores"] == "4"
    assert conf["spark.dynamicAllocation.enabled"] == "false"
    template = conf["spark.kubernetes.executor.podTemplateFile"]
    assert template == "/opt/shopml/spark-conf/executor-pod-template.yaml"
    claim = "spark.kubernetes.executor.volumes.persistentVolumeClaim.state"
    assert conf[f"{claim}.options.claimName"] == "shopml-lake"
    assert conf[f"{claim}.mount.path"] == "/var/lib/shopml"
    executor = yaml.safe_load(find(docs, "ConfigMap", "shopml-spark")["data"][Path(template).name])
    assert (
        executor["spec"]["containers"][0]["name"]
        == conf["spark.kubernetes.executor.podTemplateContainerName"]
    )
    role = find(docs, "Role", "shopml-spark")
    pods = [r for r in role["rules"] if "pods" in r["resources"]]
    assert pods and {"create", "delete", "watch"} <= set(pods[0]["verbs"])


def test_without_persistence_state_is_an_empty_dir():
    docs = render(None, ("persistence.enabled=false", "spark.master=local[*]"))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    volumes = find(docs, "Deployment", "shopml-mlflow")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "state", "emptyDir": {}} in volumes


def test_spark_outside_kubernetes_needs_no_rbac():
    docs = render(None, ("spark.master=spark://spark-master:7077",))
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert "spark.kubernetes.namespace" not in spark_defaults(docs)


# --- values.schema.json -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "unknownKey=1",
        "serving.typo=1",
        "serving.replicaCount=two",
        "serving.autoscaling.enabled=yes",
        "securityContext.runAsUser=0",
        "serving.resources.requests.cpu=lots",
        "postgres.sslmode=sometimes",
        "training.ds=31/12/2025",
        "serving.config.challengerShare=1.5",
        "serving.config.maxCandidates=0",
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(override):
    proc = helm("template", RELEASE, str(CHART), "--set", override)
    assert proc.returncode != 0, f"--set {override} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr or (
        "schema" in proc.stderr
    ), proc.stderr


def test_lint_rejects_an_unknown_key():
    proc = helm("lint", "--strict", str(CHART), "--set", "serving.replicas=2")
    assert proc.returncode != 0
    assert "replicas" in proc.stdout + proc.stderr


def _resolve(schema: Doc, node: Doc) -> Doc:
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/definitions/")
        node = {**schema["definitions"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _walk_schema(schema: Doc, node: Doc, where: str):
    node = _resolve(schema, node)
    yield where, node
    for key, child in node.get("properties", {}).items():
        yield from _walk_schema(schema, child, f"{where}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk_schema(schema, node["additionalProperties"], f"{where}.*")
    if isinstance(node.get("items"), dict):
        yield from _walk_schema(schema, node["items"], f"{where}[]")


def test_schema_types_and_describes_everything_and_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for name, definition in schema["definitions"].items():
        list(_walk_schema(schema, definition, f"#/definitions/{name}"))
    for where, node in _walk_schema(schema, schema, "values"):
        assert "type" in node, f"{where} has no type"
        assert node.get("description"), f"{where} has no description"
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if "object" in types:
            extra = node.get("additionalProperties")
            # Closed (false), or a map whose values are typed (labels, resources, env maps).
            assert extra is False or (isinstance(extra, dict) and "type" in extra), where


def _schema_at(schema: Doc, path: list[str]) -> Doc | None:
    """The schema of the value at `path`, or None below a typed map (free-form keys)."""
    node = _resolve(schema, schema)
    for key in path:
        if key in node.get("properties", {}):
            node = _resolve(schema, node["properties"][key])
        elif isinstance(node.get("additionalProperties"), dict):
            return None
        else:
            raise AssertionError(f"{'.'.join(path)} is not in values.schema.json")
    return node


def test_every_value_is_in_the_schema_and_commented():
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    previous = ""
    settings = 0
    for line in lines:
        match = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):(\s|$)", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = [k for _, k in stack] + [key]
            stack.append((indent, key))
            parent = _schema_at(schema, path[:-1])
            # Keys of typed maps (resources.requests, nodeSelector, ...) are data, not settings.
            if parent is not None and key in parent.get("properties", {}):
                settings += 1
                assert previous.lstrip().startswith("#"), f"{'.'.join(path)} has no comment"
            elif parent is not None:
                _schema_at(schema, path)  # raises unless the parent is a typed map
        if line.strip():
            previous = line
    assert settings > 100


def test_every_schema_property_is_a_default_value():
    """No dead schema entries: each documented setting has a default in values.yaml."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = load_yaml(CHART / "values.yaml")

    def check(node: Doc, value: Any, where: str) -> None:
        if "$ref" in node:  # shared Kubernetes shapes (affinity, probes...) may be partial
            return
        if not isinstance(value, dict) or node.get("additionalProperties") is not False:
            return
        for key, child in node["properties"].items():
            if key == "global":  # reserved by Helm
                continue
            assert key in value, f"{where}.{key} is in the schema but not in values.yaml"
            check(child, value[key], f"{where}.{key}")

    check(schema, values, "values")


def test_network_policies_admit_only_the_ingress_to_serving_and_shopml_to_its_servers(tmp_path):
    docs = render()
    serving = find(docs, "NetworkPolicy", f"{RELEASE}-serving")["spec"]
    assert (
        serving["podSelector"]["matchLabels"]
        == find(docs, "Deployment", f"{RELEASE}-serving")["spec"]["selector"]["matchLabels"]
    )
    (rule,) = serving["ingress"]
    assert [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for p in rule["from"]] == ["ingress-nginx", "monitoring"]  # fmt: skip
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]

    mlflow = find(docs, "NetworkPolicy", f"{RELEASE}-mlflow-clients")["spec"]
    assert (
        mlflow["podSelector"]["matchLabels"]
        == find(docs, "Deployment", f"{RELEASE}-mlflow")["spec"]["selector"]["matchLabels"]
    )
    shopml, airflow = (p["podSelector"]["matchLabels"] for p in mlflow["ingress"][0]["from"])
    assert airflow == {"tier": "airflow"}
    # every ShopML pod that talks to MLflow, Redis or PostgreSQL carries the admitted labels
    for name in pod_specs(docs):
        kind, _, obj = name.partition("/")
        if kind in ("Deployment", "Job"):
            labels = find(docs, kind, obj)["spec"]["template"]["metadata"]["labels"]
            assert shopml.items() <= labels.items(), name
    # Redis and PostgreSQL run elsewhere by default: no policy; named pods get one on their port
    servers = ("redis-clients", "postgres-clients")
    assert not [d for d in docs if d["metadata"]["name"].endswith(servers)]
    values = tmp_path / "np.yaml"
    values.write_text("networkPolicy:\n  redisPodLabels: {app: redis}\n"
                      "  postgresPodLabels: {app: postgresql}\n")  # fmt: skip
    docs = render(values)
    redis = find(docs, "NetworkPolicy", f"{RELEASE}-redis-clients")["spec"]
    assert redis["podSelector"]["matchLabels"] == {"app": "redis"}
    assert redis["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    postgres = find(docs, "NetworkPolicy", f"{RELEASE}-postgres-clients")["spec"]
    assert postgres["ingress"][0]["ports"] == [{"port": 5432, "protocol": "TCP"}]
    off = render(None, ("networkPolicy.enabled=false",))
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]


def test_the_streaming_job_runs_once_with_its_checkpoints_on_the_state_volume(monkeypatch):
    """One `shopml stream` pod (Recreate: a checkpoint has one writer), the event stream on
    the chart's Redis, the events token only where POST /events is served."""
    from shopml.config import load_settings
    from shopml.stream import redis_url

    docs = render(PRODUCTION)
    deploy = find(docs, "Deployment", "shopml-stream")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    c = container(docs, "Deployment", "shopml-stream")
    assert c["command"] == ["shopml", "stream"]
    assert "--once" in _cli_params("stream")  # the command exists (the pod runs it without)
    state = deploy["spec"]["template"]["spec"]["volumes"]
    assert any("persistentVolumeClaim" in v for v in state)
    assert any(m["name"] == "state" for m in c["volumeMounts"])
    env = env_of(c)
    assert env["SHOPML_SPARK__MASTER"]["value"] == "local[2]"
    assert "SHOPML_EVENTS__TOKEN" not in env
    serving = env_of(container(docs, "Deployment", "shopml-serving"))
    assert serving["SHOPML_EVENTS__TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "shopml-events-token", "key": "token"}  # fmt: skip
    # the profile reaches the settings: a Redis Stream on the configured key
    data = profile(docs)
    for name in ("SHOPML_EVENTS__BACKEND", "SHOPML_EVENTS__STREAM_NAME"):
        monkeypatch.setenv(name, data[name])
    # the stream is on the online store's Redis, with the password the kubelet put in
    conn = env["SHOPML_FEAST__REDIS_CONNECTION"]["value"]
    monkeypatch.setenv("SHOPML_FEAST__REDIS_CONNECTION",
                       conn.replace("$(SHOPML_REDIS_PASSWORD)", "p@ss:w/rd"))  # fmt: skip
    settings = load_settings()
    assert (settings.events.backend, settings.events.stream_name) == ("redis", "shopml:events")
    host = "redis-master.data.svc.cluster.local"
    assert redis_url(settings) == f"rediss://:p%40ss%3Aw%2Frd@{host}:6379/0"
    off = render(PRODUCTION, ("stream.enabled=false",))
    assert not [d for d in off if d["metadata"]["name"] == "shopml-stream"]
