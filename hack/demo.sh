#!/usr/bin/env bash
# `make demo`: sets up the venv and the control-plane binaries (both cached), then runs the demo:
# a local control plane, a simulated vLLM fleet, the webhook, controller and router, and a skewed load.
# Arguments go to the demo, e.g. `hack/demo.sh --duration 60 --out /tmp/demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
LORA_AUTOSCALER_KUBE_BIN="$(hack/build-control-plane.sh | tail -n 1)"
export LORA_AUTOSCALER_KUBE_BIN
exec .venv/bin/python -m hack.demo "$@"
