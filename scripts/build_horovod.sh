#!/usr/bin/env bash
# Build (or reuse) a Horovod 0.28.1 wheel that works with PyTorch 2.x, then install it.
#
# Why: Horovod 0.28.1 is the last release and its published sdist compiles its torch
# extension as C++14, which PyTorch 2.x headers reject. We rebuild it as C++17 with Gloo
# for CPU collectives (NCCL is added by the production image, see helm/ and Dockerfile).
# The build takes ~15 minutes on 2 cores, so the wheel is cached outside the clone
# (SHOPML_WHEEL_CACHE, default ~/.cache/shopml/wheels) and reused by fresh clones and CI.
#
# Usage: scripts/build_horovod.sh [PYTHON]   (PYTHON defaults to .venv/bin/python)
set -euo pipefail

PY="${1:-.venv/bin/python}"
VERSION=0.28.1
CACHE="${SHOPML_WHEEL_CACHE:-$HOME/.cache/shopml/wheels}"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
# The wheel links against one torch ABI: key the cache on the torch version too.
TAG="torch${TORCH_VERSION}${HOROVOD_GPU_OPERATIONS:+-${HOROVOD_GPU_OPERATIONS,,}}"  # a NCCL build is another wheel
mkdir -p "$CACHE/$TAG"

if "$PY" -c "import horovod.torch" 2>/dev/null; then
  echo "horovod: already installed in $("$PY" -c 'import sys; print(sys.prefix)')"
  exit 0
fi

wheel="$(ls "$CACHE/$TAG"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel" ]]; then
  echo "horovod: no cached wheel in $CACHE/$TAG, building from source (~15 min on 2 cores)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
  tar -xzf "$work"/horovod-"$VERSION".tar.gz -C "$work"
  src="$work/horovod-$VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
  # System cmake 3.25: pip's cmake 4 refuses Horovod's old cmake_minimum_required.
  PATH="/usr/bin:$PATH" \
  CMAKE_POLICY_VERSION_MINIMUM=3.5 \
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO \
  MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$CACHE/$TAG" "$src"
  wheel="$(ls "$CACHE/$TAG"/horovod-"$VERSION"-*.whl | head -n1)"
fi
echo "horovod: installing $wheel"
"$PY" -m pip install --quiet --no-deps "$wheel"
"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'horovod built without Gloo'; import horovod; print('horovod', horovod.__version__, 'gloo ok')"
