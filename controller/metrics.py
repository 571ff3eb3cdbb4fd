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

# Autoscaling: the load signal, the policy's decisions and the hand-over to pod autoscaling.
SIGNAL_SECONDS = Histogram(
    "lora_autoscaler_load_signal_duration_seconds", "Duration of one collect of the load signal", ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SIGNAL_ERRORS = Counter("lora_autoscaler_load_signal_errors_total",
                        "Failed parts of a load signal collect (a pod, the router, Prometheus)", ["source"])
ADAPTER_LOAD = Gauge("lora_autoscaler_adapter_load", "The load signal: outstanding requests per replica",
                     ["namespace", "autoscaler", "adapter"])
ADAPTER_DESIRED = Gauge("lora_autoscaler_adapter_desired_replicas", "Replicas the policy wants for an adapter",
                        ["namespace", "autoscaler", "adapter"])
SCALE_EVENTS = Counter("lora_autoscaler_scale_events_total", "Changes of an adapter's desired replicas",
                       ["namespace", "autoscaler", "direction"])
NEEDED_REPLICAS = Gauge("lora_autoscaler_needed_replicas",
                        "More pods the adapters need: every replica is full and adapters wait (0: none)",
                        ["namespace", "autoscaler"])
SATURATED = Gauge("lora_autoscaler_saturated", "1 while every replica is full and adapters still need room",
                  ["namespace", "autoscaler"])
HANDOVERS = Counter("lora_autoscaler_handovers_total", "Writes of the hand-over to pod autoscaling",
                    ["mode", "action"])


def forget_autoscaler(namespace: str, autoscaler: str, adapters: list[str] | None = None) -> None:
    """Drop an autoscaler's series (it was deleted), so dashboards do not show it forever."""
    for gauge in (NEEDED_REPLICAS, SATURATED):
        try:
            gauge.remove(namespace, autoscaler)
        except KeyError:
            pass
    forget_adapters(namespace, autoscaler, adapters or [])


def forget_adapters(namespace: str, autoscaler: str, adapters: list[str]) -> None:
    """Drop the series of adapters that left an autoscaler's spec."""
    for adapter in adapters:
        for gauge in (ADAPTER_LOAD, ADAPTER_DESIRED):
            try:
                gauge.remove(namespace, autoscaler, adapter)
            except KeyError:
                pass
