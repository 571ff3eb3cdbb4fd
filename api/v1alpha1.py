"""The ``loraautoscaler.io/v1alpha1`` API: ``LoRAAutoscaler`` and ``LoRAPlacement``.

These dataclasses are the one source of the API. ``hack/gen_crds.py`` derives ``config/crd/`` from them,
the webhook validates against the same schema, and the controller reads objects into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Self

from api.schema import prop

GROUP = "loraautoscaler.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

AUTOSCALER_KIND = "LoRAAutoscaler"
AUTOSCALER_PLURAL = "loraautoscalers"
PLACEMENT_KIND = "LoRAPlacement"
PLACEMENT_PLURAL = "loraplacements"

# vLLM accepts any string as a model name, but adapter names also become label values, Service names and
# route keys, so they are held to the DNS-1123 label rules (lower case, digits, '-', at most 63).
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ADAPTER_NAME_MAX = 63
# Where a source may point. vLLM itself takes a local path or a Hugging Face repository id; other schemes
# are fetched by a resolver on the pod (vLLM's LoRA resolver plugins) and passed through unchanged.
SOURCE_SCHEMES = ("file://", "hf://", "s3://", "gs://", "oci://", "http://", "https://")
SOURCE_PATTERN = r"^(/|file://|hf://|s3://|gs://|oci://|https?://)\S+$"

KIND_PATTERN = r"^[A-Z][A-Za-z0-9]*$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
API_VERSION_PATTERN = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?v[0-9]+((alpha|beta)[0-9]+)?$"

MAX_LORAS_LIMIT = 256  # far above any vLLM deployment seen; a typo (4000) is caught
MAX_WINDOW_SECONDS = 86_400
MAX_TIMEOUT_SECONDS = 3_600
MAX_THRESHOLD = 1_000_000.0

PlacementMode = Literal["strict", "preferred"]
MetricSource = Literal["combined", "router", "vllm", "waitingLoraAdapters", "prometheus"]
PodAutoscalingMode = Literal["Off", "HPA", "ScaleTarget"]
PlacementPhase = Literal["Pending", "Loading", "Loaded", "Draining", "Unloading", "Failed"]
PLACEMENT_PHASES: tuple[str, ...] = ("Pending", "Loading", "Loaded", "Draining", "Unloading", "Failed")


@dataclass
class CrossVersionObjectReference:
    """The workload that runs vLLM: any object with a scale subresource."""

    kind: str = prop(description="Kind of the target, e.g. Deployment, StatefulSet, Playground.", min_length=1,
                     max_length=63, pattern=KIND_PATTERN)
    name: str = prop(description="Name of the target in the autoscaler's namespace.", min_length=1,
                     max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    api_version: str = prop(
        "apps/v1", description="API version of the target, e.g. apps/v1 or inference.llmaz.io/v1alpha1.",
        max_length=253, pattern=API_VERSION_PATTERN,
    )


@dataclass
class LabelSelectorRequirement:
    """One expression of a label selector."""

    key: str = prop(description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = prop(description="How the key is matched.")
    values: list[str] | None = prop(None, description="Values for In and NotIn.")

    __cel_rules__ = [
        ("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
         "values must be non-empty for In and NotIn, and absent for Exists and DoesNotExist"),
    ]


@dataclass
class LabelSelector:
    """A Kubernetes label selector."""

    match_labels: dict[str, str] | None = prop(None, description="Labels that must all match.")
    match_expressions: list[LabelSelectorRequirement] | None = prop(
        None, description="Expressions that must all hold."
    )


@dataclass
class SecretKeySelector:
    """A key of a Secret in the autoscaler's namespace."""

    name: str = prop(description="Name of the Secret.", min_length=1)
    key: str = prop("api-key", description="Key within the Secret.")


@dataclass
class VLLMEndpoint:
    """How the controller reaches vLLM's runtime API on each pod, and the pod's LoRA limits."""

    port: int = prop(8000, description="Port of vLLM's OpenAI-compatible server on the pod.", minimum=1,
                     maximum=65535)
    scheme: Literal["http", "https"] = prop("http", description="Scheme of vLLM's server.")
    api_key_secret_ref: SecretKeySelector | None = prop(
        None, description="Secret holding vLLM's --api-key; sent as a bearer token and never logged."
    )
    max_loras_per_replica: int = prop(
        4, description="vLLM's --max-loras: distinct adapters one replica batches at once.", minimum=1,
        maximum=MAX_LORAS_LIMIT,
    )
    max_cpu_loras_per_replica: int | None = prop(
        None,
        description="vLLM's --max-cpu-loras: adapters a replica keeps cached. In preferred mode adapters stay "
        "resident on up to this many per replica. Defaults to maxLorasPerReplica.",
        minimum=1, maximum=MAX_LORAS_LIMIT,
    )
    load_timeout_seconds: int = prop(30, description="Timeout of one load or unload call.", minimum=1,
                                     maximum=MAX_TIMEOUT_SECONDS)
    max_load_attempts: int = prop(5, description="Load attempts on one pod before the placement is Failed "
                                  "and the adapter goes to another pod.", minimum=1, maximum=100)

    __cel_rules__ = [
        (
            "!has(self.maxCpuLorasPerReplica) || self.maxCpuLorasPerReplica >= self.maxLorasPerReplica",
            "vllm.maxCpuLorasPerReplica must be at least vllm.maxLorasPerReplica (vLLM refuses to start otherwise)",
        )
    ]


@dataclass
class AdapterSpec:
    """One LoRA adapter: the model name clients send, where vLLM loads it from, and its replica bounds."""

    name: str = prop(description="The model name clients send; unique within the autoscaler.",
                     pattern=ADAPTER_NAME_PATTERN, max_length=ADAPTER_NAME_MAX)
    source: str = prop(description="What vLLM loads: an absolute path on the pod, file://, hf://org/repo, or "
                       "a scheme a resolver on the pod understands (s3://, gs://, oci://, http(s)://).",
                       pattern=SOURCE_PATTERN, max_length=2048)
    min_replicas: int = prop(1, description="Replicas this adapter always has; at least 1 so that it is never "
                             "left without a replica.", minimum=1, maximum=10_000)
    max_replicas: int | None = prop(None, description="Upper bound for autoscaling; unset means all replicas.",
                                    minimum=1, maximum=10_000)

    __cel_rules__ = [
        ("!has(self.maxReplicas) || self.maxReplicas >= self.minReplicas",
         "maxReplicas must be at least minReplicas"),
        ("self.name != 'base'", "the adapter name 'base' is reserved: the route table's Service for the base model "
         "is <autoscaler>-base"),
    ]


@dataclass
class ScaleUpPolicy:
    """When an adapter gains a replica."""

    threshold: float = prop(4.0, description="Load per replica (outstanding requests) above which the adapter "
                            "is hot.", minimum=0, maximum=MAX_THRESHOLD)
    window_seconds: int = prop(3, description="How long the load must stay above the threshold.", minimum=0,
                               maximum=MAX_WINDOW_SECONDS)
    load_window_seconds: int | None = prop(
        None, description="How long the load must have stayed above the threshold, since it crossed it, "
        "before a replica that needs an adapter load (no warm copy to promote: always in strict mode) is "
        "added; later ones follow at windowSeconds while the load stays above. Unset: windowSeconds. A "
        "longer window keeps brief spikes, such as an adapter starved for a while by the LoRA budget, from "
        "costing loads, while promotions stay fast.", minimum=0, maximum=MAX_WINDOW_SECONDS)

    __cel_rules__ = [
        ("!has(self.loadWindowSeconds) || self.loadWindowSeconds >= self.windowSeconds",
         "scaleUp.loadWindowSeconds must be at least scaleUp.windowSeconds"),
    ]


@dataclass
class ScaleDownPolicy:
    """When an adapter gives a replica back."""

    threshold: float = prop(1.0, description="Load per replica below which the adapter is cold.", minimum=0,
                            maximum=MAX_THRESHOLD)
    window_seconds: int = prop(60, description="How long the load must stay below the threshold.", minimum=0,
                               maximum=MAX_WINDOW_SECONDS)
    drain_timeout_seconds: int = prop(30, description="Longest wait for in-flight requests before the unload.",
                                      minimum=0, maximum=MAX_TIMEOUT_SECONDS)


@dataclass
class PrometheusSource:
    """A Prometheus server that already scrapes vLLM."""

    url: str = prop(description="Base URL of the Prometheus HTTP API.", pattern=r"^https?://\S+$")


@dataclass
class MetricSpec:
    """Where the per-adapter load signal comes from."""

    source: MetricSource = prop("combined", description="combined (router counts plus the vLLM scrape, so "
                                "adapters starved by the LoRA budget are seen), router, vllm, "
                                "waitingLoraAdapters (the vLLM metric's adapter lists only), or prometheus.")
    router_url: str | None = prop(None, description="Base URL of the router's metrics (e.g. "
                                  "http://lora-router.lora-system:9090).", pattern=r"^https?://\S+$")
    prometheus: PrometheusSource | None = prop(None, description="Required when source is prometheus.")
    max_age_seconds: int = prop(10, description="Older samples are ignored as stale.", minimum=1,
                                maximum=MAX_WINDOW_SECONDS)

    __cel_rules__ = [
        ("self.source != 'prometheus' || has(self.prometheus)",
         "scaling.metric.prometheus is required when source is prometheus"),
    ]


@dataclass
class ScalingSpec:
    """The load signal and the hysteresis around it."""

    metric: MetricSpec = prop(default_factory=MetricSpec, description="The load signal.")
    sync_period_milliseconds: int = prop(1000, description="How often load is read and decisions are made.",
                                         minimum=100, maximum=600_000)
    scale_up: ScaleUpPolicy = prop(default_factory=ScaleUpPolicy, description="When to add a replica.")
    scale_down: ScaleDownPolicy = prop(default_factory=ScaleDownPolicy, description="When to remove one.")

    __cel_rules__ = [
        ("self.scaleDown.threshold < self.scaleUp.threshold",
         "scaleDown.threshold must be strictly below scaleUp.threshold (hysteresis)"),
        ("self.scaleDown.windowSeconds >= self.scaleUp.windowSeconds",
         "scaleDown.windowSeconds must be at least scaleUp.windowSeconds (hysteresis)"),
    ]


@dataclass
class PodAutoscalingSpec:
    """What to do when every replica is full and adapters still need room."""

    mode: PodAutoscalingMode = prop("Off", description="Off: only report the need; HPA: raise the named "
                                    "HPA's minReplicas within its maxReplicas; ScaleTarget: scale the target "
                                    "through its scale subresource within maxReplicas.")
    hpa_name: str | None = prop(None, description="The HPA to raise, required in HPA mode.", max_length=253,
                                pattern=DNS_SUBDOMAIN_PATTERN)
    max_replicas: int | None = prop(None, description="Upper bound for ScaleTarget mode.", minimum=1,
                                    maximum=10_000)

    __cel_rules__ = [
        ("self.mode != 'HPA' || has(self.hpaName)", "podAutoscaling.hpaName is required when mode is HPA"),
        ("self.mode != 'ScaleTarget' || has(self.maxReplicas)",
         "podAutoscaling.maxReplicas is required when mode is ScaleTarget"),
    ]


@dataclass
class LoRAAutoscalerSpec:
    """Which workload serves the adapters, the adapters, and how they scale."""

    scale_target_ref: CrossVersionObjectReference = prop(description="The workload that runs vLLM.")
    adapters: list[AdapterSpec] = prop(description="The adapters to place and scale.", max_items=1000,
                                       x_kubernetes_list_type="map", x_kubernetes_list_map_keys=["name"])
    pod_selector: LabelSelector | None = prop(None, description="Narrows the target's pods to those serving "
                                              "the API (e.g. leader pods of a multi-host group).")
    vllm: VLLMEndpoint = prop(default_factory=VLLMEndpoint, description="How to reach vLLM on each pod.")
    placement_mode: PlacementMode = prop("preferred", description="preferred (default, see "
                                         "docs/autoscaling.md): adapters stay resident on up to "
                                         "maxCpuLorasPerReplica per replica; the route table marks preferred "
                                         "holders and routers spill over. strict: at most maxLorasPerReplica "
                                         "adapters per replica, requests only to holders.")
    scaling: ScalingSpec = prop(default_factory=ScalingSpec, description="Load signal and hysteresis.")
    pod_autoscaling: PodAutoscalingSpec = prop(default_factory=PodAutoscalingSpec,
                                               description="The hand-over to pod autoscaling.")

    __cel_rules__ = [
        ("self.scaleTargetRef == oldSelf.scaleTargetRef",
         "scaleTargetRef is immutable; create a new LoRAAutoscaler for another target"),
    ]


@dataclass
class Condition:
    """A standard Kubernetes condition."""

    type: str = prop(description="Ready, Progressing, Saturated or Degraded.")
    status: Literal["True", "False", "Unknown"] = prop(description="Whether the condition holds.")
    reason: str = prop("", description="One CamelCase word.")
    message: str = prop("", description="What happened, for people.")
    last_transition_time: str | None = prop(None, description="When the status last changed.",
                                            format="date-time")
    observed_generation: int | None = prop(None, description="The generation this was computed for.",
                                           format="int64")


@dataclass
class AdapterStatus:
    """Where one adapter stands."""

    name: str = prop(description="The adapter.")
    desired_replicas: int = prop(0, description="Replicas the autoscaler wants.")
    loaded_replicas: int = prop(0, description="Replicas where it is loaded.")
    routable_replicas: int = prop(0, description="Replicas in its route table (loaded, not draining).")
    pods: list[str] = prop(default_factory=list, description="Pods in its route table.")
    load: float | None = prop(None, description="The last load signal (outstanding requests per replica).")
    last_scale_time: str | None = prop(None, description="When it last gained or lost a replica.",
                                       format="date-time")


@dataclass
class LoRAAutoscalerStatus:
    """What the controller observed and did."""

    observed_generation: int | None = prop(None, description="The generation last acted on.", format="int64")
    replicas: int = prop(0, description="Ready pods of the target that serve the API.")
    adapter_count: int = prop(0, description="Adapters in the spec.")
    ready_adapters: int = prop(0, description="Adapters with at least one routable replica.")
    saturated: bool = prop(False, description="Every replica is full and adapters still need room.")
    needed_replicas: int = prop(0, description="How many more pods the adapters need.")
    recommendation: str | None = prop(None, description="Advice, e.g. raising --max-loras.")
    adapters: list[AdapterStatus] = prop(default_factory=list, description="Per adapter.")
    conditions: list[Condition] = prop(default_factory=list, description="Ready, Progressing, Saturated, "
                                       "Degraded.", x_kubernetes_list_type="map",
                                       x_kubernetes_list_map_keys=["type"])


@dataclass
class LoRAPlacementSpec:
    """One adapter on one pod: written by the controller, read by people and gateways."""

    autoscaler: str = prop(description="The owning LoRAAutoscaler.")
    adapter: str = prop(description="The adapter's name.", pattern=ADAPTER_NAME_PATTERN,
                        max_length=ADAPTER_NAME_MAX)
    source: str = prop(description="The source it is loaded from.")
    pod_name: str = prop(description="The pod.")
    pod_uid: str = prop(description="The pod's UID; a replaced pod with the same name is another pod.")
    preferred: bool = prop(True, description="In preferred mode: a preferred holder rather than a fallback.")
    retire: bool = prop(False, description="Set to drain and unload; the object is deleted afterwards.")


@dataclass
class LoRAPlacementStatus:
    """The adapter's life on the pod."""

    phase: PlacementPhase = prop("Pending", description="Pending, Loading, Loaded, Draining, Unloading, "
                                 "Failed.")
    attempts: int = prop(0, description="Load attempts so far.")
    last_error: str | None = prop(None, description="The last error.")
    permanent: bool = prop(False, description="The last error is one retrying cannot fix.")
    next_attempt_time: str | None = prop(None, description="When the next attempt is due.", format="date-time")
    loaded_time: str | None = prop(None, description="When the load succeeded.", format="date-time")
    drain_start_time: str | None = prop(None, description="When the drain began.", format="date-time")
    pod_ip: str | None = prop(None, description="The pod's IP when loaded.")
    pod_restart_count: int | None = prop(None, description="The pod's restarts when loaded; a change means "
                                         "vLLM forgot the adapter.")
    observed_generation: int | None = prop(None, description="The generation last acted on.", format="int64")


def printer_columns(kind: str) -> list[dict[str, Any]]:
    """What ``kubectl get`` shows first: the questions users ask before any other."""
    if kind == AUTOSCALER_KIND:
        return [
            {"name": "Target", "type": "string", "jsonPath": ".spec.scaleTargetRef.name"},
            {"name": "Adapters", "type": "integer", "jsonPath": ".status.adapterCount"},
            {"name": "Ready-Adapters", "type": "integer", "jsonPath": ".status.readyAdapters"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Saturated", "type": "boolean", "jsonPath": ".status.saturated"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]
    return [
        {"name": "Adapter", "type": "string", "jsonPath": ".spec.adapter"},
        {"name": "Pod", "type": "string", "jsonPath": ".spec.podName"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Preferred", "type": "boolean", "jsonPath": ".spec.preferred", "priority": 1},
        {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts"},
        {"name": "Error", "type": "string", "jsonPath": ".status.lastError", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


class _Resource:
    """Shared by the whole-object types: metadata as the API server sends it, typed spec and status."""

    metadata: dict[str, Any]

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Self:
        """Read an object from the API server (or a manifest); absent fields take their defaults."""
        from typing import get_type_hints

        from api.schema import from_dict

        hints = get_type_hints(cls)
        return cls(  # type: ignore[call-arg]
            metadata=dict(obj.get("metadata") or {}),
            spec=from_dict(hints["spec"], obj.get("spec")),
            status=from_dict(hints["status"], obj.get("status")),
        )

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))


@dataclass
class LoRAAutoscaler(_Resource):
    """A whole LoRAAutoscaler object."""

    metadata: dict[str, Any]
    spec: LoRAAutoscalerSpec
    status: LoRAAutoscalerStatus


@dataclass
class LoRAPlacement(_Resource):
    """A whole LoRAPlacement object."""

    metadata: dict[str, Any]
    spec: LoRAPlacementSpec
    status: LoRAPlacementStatus
