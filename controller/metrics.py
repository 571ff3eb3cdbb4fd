"""The controller's Prometheus metrics (queue depth and latency come from ``common.workqueue``).

Families are module-level so that several controllers in one process (tests) share them instead of
clashing in the default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PLACEMENTS = Gauge("lora_controller_placements", "LoRAPlacements by phase (the leader's view)", ["phase"])
LOAD_SECONDS = Histogram(
    "lora_controller_load_duration_seconds", "Duration of one adapter load call to vLLM", ["outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LOAD_FAILURES = Counter("lora_controller_load_failures_total", "Failed adapter loads by reason", ["reason"])
UNLOADS = Counter("lora_controller_unloads_total", "Adapter unloads by outcome", ["outcome"])
ADAPTERS_LOST = Counter("lora_controller_adapters_lost_total", "Adapters found missing on a pod and reloaded")
RECONCILE_SECONDS = Histogram(
    "lora_controller_reconcile_duration_seconds", "Duration of one reconcile", ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("lora_controller_reconcile_errors_total", "Reconciles that failed", ["kind"])
WRITES = Counter("lora_controller_api_writes_total", "Writes to the API server by resource and verb",
                 ["resource", "verb"])
LEADER = Gauge("lora_controller_is_leader", "1 while this replica holds the lease")
AUDITS = Counter("lora_controller_pod_audits_total", "Checks of a pod's /v1/models by outcome", ["outcome"])
