#!/usr/bin/env bash
# The whole test suite: setup, control-plane binaries, lint, types, import contracts, Dockerfile lint,
# then pytest (unit, conformance, integration against a real kube-apiserver and etcd).
# Extra arguments go to pytest (e.g. hack/test.sh -k webhook).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
step() { echo; echo "=== $*" >&2; }

step "control-plane binaries (built once per version, cached outside the clone)"
LORA_AUTOSCALER_KUBE_BIN="$(hack/build-control-plane.sh | tail -n 1)"
export LORA_AUTOSCALER_KUBE_BIN

step "ruff"
.venv/bin/ruff check .
step "mypy"
.venv/bin/mypy .
step "import contracts (lint-imports)"
.venv/bin/lint-imports
step "hadolint Dockerfile"
.venv/bin/hadolint Dockerfile

step "pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
