"""``GET /metrics`` in vLLM's names, labels and number format (Prometheus text exposition).

Rendered by hand rather than through prometheus_client so that many simulators can live in one process
without sharing a registry, and so the timestamp-valued ``vllm:lora_requests_info`` can keep every label set
it ever saw, as vLLM's does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .engine import Histogram

if TYPE_CHECKING:
    from .server import Simulator


def go_float(value: float) -> str:
    """Format a number as prometheus_client does (``4.0``, ``1.7957724363150744e+09``)."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def escape(value: str) -> str:
    """Escape a label value."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _histogram(out: list[str], name: str, help_: str, h: Histogram, labels: str) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} histogram")
    cum = 0
    for bound, n in zip(h.buckets, h.counts, strict=True):
        cum += n
        out.append(f'{name}_bucket{{{labels},le="{go_float(bound)}"}} {go_float(cum)}')
    out.append(f'{name}_bucket{{{labels},le="+Inf"}} {go_float(h.count)}')
    out.append(f"{name}_count{{{labels}}} {go_float(h.count)}")
    out.append(f"{name}_sum{{{labels}}} {go_float(h.total)}")


def render(sim: Simulator) -> str:
    """The whole exposition; empty of ``vllm:`` series under ``--disable-log-stats``, as in vLLM."""
    cfg = sim.config
    if cfg.disable_log_stats:
        return ""
    eng = sim.state.engine
    labels = f'engine="0",model_name="{escape(cfg.base_name)}"'
    out: list[str] = []
    if cfg.enable_lora:
        out.append("# HELP vllm:lora_requests_info Running stats on lora requests.")
        out.append("# TYPE vllm:lora_requests_info gauge")
        max_lora = str(cfg.max_loras)
        for key, t in eng.lora_info.items():
            v = escape(key)
            out.append(
                f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{v}",'
                f'waiting_lora_adapters="{v}"}} {go_float(sim.wall_of(t))}'
            )
    out.append("# HELP vllm:num_requests_running Number of requests in model execution batches.")
    out.append("# TYPE vllm:num_requests_running gauge")
    out.append(f"vllm:num_requests_running{{{labels}}} {go_float(len(eng.running))}")
    out.append("# HELP vllm:num_requests_waiting Number of requests waiting to be processed.")
    out.append("# TYPE vllm:num_requests_waiting gauge")
    out.append(f"vllm:num_requests_waiting{{{labels}}} {go_float(len(eng.waiting))}")
    out.append(
        "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: "
        "'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints "
        "(LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting."
    )
    out.append("# TYPE vllm:num_requests_waiting_by_reason gauge")
    deferred = min(eng.num_deferred, len(eng.waiting))
    capacity = len(eng.waiting) - deferred
    out.append(f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} {go_float(capacity)}')
    out.append(f'vllm:num_requests_waiting_by_reason{{{labels},reason="deferred"}} {go_float(deferred)}')
    out.append("# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.")
    out.append("# TYPE vllm:kv_cache_usage_perc gauge")
    out.append(f"vllm:kv_cache_usage_perc{{{labels}}} {go_float(eng.kv_usage())}")
    st = eng.stats
    out.append("# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.")
    out.append("# TYPE vllm:num_preemptions_total counter")
    out.append(f"vllm:num_preemptions_total{{{labels}}} 0.0")
    out.append("# HELP vllm:prompt_tokens_total Number of prefill tokens processed.")
    out.append("# TYPE vllm:prompt_tokens_total counter")
    out.append(f"vllm:prompt_tokens_total{{{labels}}} {go_float(st.prompt_tokens)}")
    out.append("# HELP vllm:generation_tokens_total Number of generation tokens processed.")
    out.append("# TYPE vllm:generation_tokens_total counter")
    out.append(f"vllm:generation_tokens_total{{{labels}}} {go_float(st.generation_tokens)}")
    out.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    out.append("# TYPE vllm:request_success_total counter")
    for reason, n in st.success_by_reason.items():
        out.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {go_float(n)}')
    _histogram(out, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", st.ttft, labels)
    _histogram(out, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", st.e2e, labels)
    _histogram(
        out,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        st.queue_time,
        labels,
    )
    out.append("")
    return "\n".join(out)
