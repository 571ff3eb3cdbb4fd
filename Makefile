.PHONY: demo test generate lint setup control-plane

# Runs the local demo: control plane, simulated vLLM fleet, webhook, controller, router, a skewed load.
demo:
	hack/demo.sh

# Runs the whole suite (lint, types, unit, conformance, integration).
test:
	hack/test.sh

# Regenerates config/crd/ and docs/api.md from api/.
generate: setup
	.venv/bin/python hack/gen_crds.py
	.venv/bin/python hack/gen_api_docs.py

lint: setup
	.venv/bin/ruff check . && .venv/bin/mypy . && .venv/bin/lint-imports

setup:
	hack/setup.sh

control-plane:
	hack/build-control-plane.sh
