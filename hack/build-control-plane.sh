#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from the Go modules of one pinned
# Kubernetes release into a cache folder outside the clone, keyed by version.
#
# Why a wrapper module: k8s.io/kubernetes points its staging modules (k8s.io/api, ...) at v0.0.0 with
# replace lines that Go ignores in a dependency, so `go install k8s.io/kubernetes/cmd/...@v1.X.Y` is
# refused. A tiny module of our own requires k8s.io/kubernetes and replaces each staging module with the
# matching v0.X.Y. etcd gets its own wrapper so its dependency graph never constrains Kubernetes'.
#
# Environment:
#   KUBE_VERSION           Kubernetes release (default below)
#   ETCD_VERSION           etcd release (default below)
#   LORA_AUTOSCALER_CACHE  cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/lora-autoscaler)
#
# Prints the folder holding the binaries on its last line of stdout.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.13}"
CACHE_ROOT="${LORA_AUTOSCALER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-autoscaler}"
BIN_DIR="$CACHE_ROOT/control-plane/kube-$KUBE_VERSION-etcd-$ETCD_VERSION"
WORK_DIR="$CACHE_ROOT/build"

log() { echo "[build-control-plane] $*" >&2; }
step=""
trap 'rc=$?; if [ $rc -ne 0 ]; then log "FAILED at step: ${step:-unknown} (exit $rc). See the messages above; re-run to resume (finished binaries are kept)."; fi' EXIT

need() { command -v "$1" >/dev/null 2>&1 || { log "FAILED: '$1' is not on PATH; $2"; exit 1; }; }
need go "install Go 1.24 or newer"

minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
staging_version="v0.${KUBE_VERSION#v1.}"

staging_modules=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api cri-client
  csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
  kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
  pod-security-admission sample-apiserver sample-cli-plugin sample-controller)
if [ "$minor" -ge 36 ]; then staging_modules+=(cri-streaming streaming); fi

mkdir -p "$BIN_DIR"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

all_present() {
  for b in etcd kube-apiserver kube-controller-manager kubectl; do [ -x "$BIN_DIR/$b" ] || return 1; done
}
if all_present; then
  log "cached: Kubernetes $KUBE_VERSION and etcd $ETCD_VERSION in $BIN_DIR"
  echo "$BIN_DIR"; exit 0
fi

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"

# --- Kubernetes -------------------------------------------------------------------------------
kube_mod="$WORK_DIR/kube-$KUBE_VERSION"
step="write the Kubernetes wrapper module"
mkdir -p "$kube_mod"
{
  echo "module lora-autoscaler.local/kube-build"
  echo
  echo "go 1.24"
  echo
  echo "require k8s.io/kubernetes $KUBE_VERSION"
  echo
  echo "replace ("
  for m in "${staging_modules[@]}"; do echo "	k8s.io/$m => k8s.io/$m $staging_version"; done
  echo ")"
} > "$kube_mod/go.mod"
cat > "$kube_mod/tools.go" <<GO
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
step="resolve Kubernetes $KUBE_VERSION modules (go mod tidy; the first run downloads several hundred MB)"
log "$step"
(cd "$kube_mod" && go mod tidy)
for cmd in kube-apiserver kube-controller-manager kubectl; do
  if [ -x "$BIN_DIR/$cmd" ]; then log "have $cmd"; continue; fi
  step="compile $cmd $KUBE_VERSION"
  log "$step (several minutes on 2 cores the first time)"
  (cd "$kube_mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
  mv "$BIN_DIR/$cmd.tmp" "$BIN_DIR/$cmd"
done

# --- etcd -------------------------------------------------------------------------------------
if [ ! -x "$BIN_DIR/etcd" ]; then
  etcd_mod="$WORK_DIR/etcd-$ETCD_VERSION"
  step="write the etcd wrapper module"
  mkdir -p "$etcd_mod"
  printf 'module lora-autoscaler.local/etcd-build\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$etcd_mod/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$etcd_mod/tools.go"
  step="resolve etcd $ETCD_VERSION modules"
  log "$step"
  (cd "$etcd_mod" && go mod tidy)
  step="compile etcd $ETCD_VERSION"
  log "$step"
  (cd "$etcd_mod" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
fi

step="check the binaries"
"$BIN_DIR/kubectl" version --client >&2
"$BIN_DIR/etcd" --version >&2
log "done: binaries in $BIN_DIR"
echo "$BIN_DIR"
