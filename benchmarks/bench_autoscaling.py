#!/usr/bin/env python3
"""Placement and routing policies on the same trace, in the same run, over a simulated vLLM fleet.

Not a test: it prints measurements and their ratios against the baselines measured in the same run, and
writes plots. Everything real except the GPUs: the local control plane (etcd, kube-apiserver,
kube-controller-manager), the test kubelet running one vLLM simulator per pod on its pod network, the
controller and the router as subprocesses, requests streamed through the router.

    .venv/bin/python benchmarks/bench_autoscaling.py            # the primary cell, every policy
    .venv/bin/python benchmarks/bench_autoscaling.py --quick    # a few minutes, for development
    .venv/bin/python benchmarks/bench_autoscaling.py --policies P3b,P4p --duration 300
    .venv/bin/python benchmarks/bench_autoscaling.py --cell guard-zipf1.5-85 --policies P3,P4p

Policies (as in /work/shared/reference/placement-study.md):

- P1   static even dispatch (the controller, scaling off), least outstanding among holders;
- P2   every adapter on every replica (``--lora-modules``), least outstanding;
- P3   every adapter everywhere, the Gateway API Inference Extension's scoring, weights 1:1:1;
- P3b  the same with LoRA-affinity weight 3;
- P4   the autoscaler in ``strict`` mode, the router's ``lora-aware`` strategy;
- P4p  the autoscaler in ``preferred`` mode, ``lora-aware``; its pods' ``--max-cpu-loras`` has room for every
  adapter (``--cpu-loras``).
  The autoscaler policies' router holds a request whose holders are all saturated for it until one is not
  (``--hold-for-slot``, 60 simulated s by default);
- P4d  the study's "soft placement": P4p's placement with the Inference Extension's scoring (LoRA weight 3)
  plus a bonus of 1 for preferred holders (not in the default run; ``--policies P4d``).

Primary cell: 8 replicas, ``--max-num-seqs`` 32, ``--max-loras`` 4, 32 adapters, Zipf 1.0 popularity, the
hot set re-drawn every 60-120 s, 85 % of the fleet's token capacity. Guard cells (``--cell``): 32 adapters
at Zipf 1.5 and 60 % or 85 % load; 128 adapters with ``--max-loras`` 8 at Zipf 1.0 and 60 % or Zipf 1.5 and
85 %. There the autoscaler must stay within 1.05x of P3's end-to-end p99 and P3's TTFT p99 + 1 s.
Engine: 20 ms a step plus 0.5 ms per running request, 64-192 output tokens a request, adapter loads 100 ms.
Poisson arrivals from a seeded generator, the same for every policy. ``--time-scale F`` runs the simulators
F times faster than real time and scales every timing of the controller (sync period, windows, drain
timeout, audit) and of the router (scrape interval) by the same factor; latencies are reported in simulated
seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.kube import LORA_AUTOSCALERS, PODS, KubeClient  # noqa: E402
from controller.signals import parse_vllm_metrics  # noqa: E402
from localkube.binaries import find_binaries  # noqa: E402
from localkube.controlplane import ControlPlane, free_port  # noqa: E402
from localkube.kubelet import TestKubelet  # noqa: E402
from localkube.podspec import SIM_ARGS_ANNOTATION  # noqa: E402
from localkube.process import ManagedProcess  # noqa: E402
from localkube.wait import wait_until  # noqa: E402

BASE = "tiny"
AUTOSCALER = "bench"
PROMPT = "Summarise the quarterly report in one sentence please."

# Targets from the placement study for the autoscaler against each baseline (TTFT p99, E2E p99 ratios).
TARGETS = {"P1": (1 / 10, 1 / 5), "P2": (1 / 5, 1 / 4), "P3": (1 / 2.5, 1 / 2), "P3b": (0.85, 0.95)}
# Guard cells (the study's): where load-driven placement is not expected to win, it must not lose much.
GUARD_E2E_RATIO, GUARD_TTFT_SLACK = 1.05, 1.0  # E2E p99 <= 1.05 x P3's, TTFT p99 <= P3's + 1 s
#: Named cells: the primary one and the study's guard cells (``--cell``).
CELLS: dict[str, dict[str, Any]] = {
    "primary": {},
    "guard-zipf1.5-60": {"zipf": 1.5, "load": 0.60},
    "guard-zipf1.5-85": {"zipf": 1.5, "load": 0.85},
    "guard-128-zipf1.0-60": {"adapters": 128, "max_loras": 8, "zipf": 1.0, "load": 0.60},
    "guard-128-zipf1.5-85": {"adapters": 128, "max_loras": 8, "zipf": 1.5, "load": 0.85},
}


@dataclass(frozen=True)
class Policy:
    key: str
    title: str
    router: tuple[str, ...]
    controller: str | None = None  # None, "static", "strict", "preferred"
    everywhere: bool = False


POLICIES: dict[str, Policy] = {
    "P1": Policy("P1", "static even dispatch, least outstanding", ("--strategy", "least-outstanding"), "static"),
    "P2": Policy("P2", "every adapter everywhere, least outstanding", ("--strategy", "least-outstanding"),
                 everywhere=True),
    "P3": Policy("P3", "everywhere, Inference Extension scoring 1:1:1", ("--strategy", "gie", "--lora-weight", "1"),
                 everywhere=True),
    "P3b": Policy("P3b", "everywhere, Inference Extension scoring, LoRA weight 3",
                  ("--strategy", "gie", "--lora-weight", "3"), everywhere=True),
    "P4": Policy("P4", "autoscaler, strict placement, lora-aware router", ("--strategy", "lora-aware"), "strict"),
    "P4p": Policy("P4p", "autoscaler, preferred placement, lora-aware router", ("--strategy", "lora-aware"),
                  "preferred"),
    "P4d": Policy("P4d", "autoscaler, preferred placement, Inference Extension scoring (LoRA 3) + preferred bonus 1",
                  ("--strategy", "gie", "--lora-weight", "3", "--preferred-bonus", "1"), "preferred"),
}

DEFAULT_POLICIES = ("P1", "P2", "P3", "P3b", "P4", "P4p")
"""What the acceptance asks for; P4d is there to compare with the placement study."""


@dataclass(frozen=True)
class Cell:
    replicas: int = 8
    adapters: int = 32
    max_loras: int = 4
    max_num_seqs: int = 32
    zipf: float = 1.0
    load: float = 0.85
    duration: float = 480.0  # simulated seconds of arrivals
    shift_min: float = 60.0
    shift_max: float = 120.0
    tokens_min: int = 64
    tokens_max: int = 192
    step: float = 0.02
    per_seq: float = 0.0005
    load_time: float = 0.1
    time_scale: float = 1.0
    seed: int = 7
    move_after: float | None = None  # the autoscaler's router: --move-deferred-after, simulated seconds
    slot_cost: float | None = None  # the autoscaler's router: lora-aware --slot-cost
    hold_for_slot: float = 60.0  # the autoscaler's router: --hold-for-slot, simulated seconds (0: off)
    up_threshold: float = 8.0
    down_threshold: float = 2.0
    up_window: float = 2.0
    load_window: float | None = None
    """scaleUp.loadWindowSeconds, simulated s; None: unset (the scale-up window applies to loads too)."""
    down_window: float = 30.0
    drain_seconds: float = 120.0  # simulated seconds to wait for requests after the last arrival
    cpu_loras: int = 0  # preferred mode's --max-cpu-loras; 0: every adapter (at most 256), at least max_loras

    @property
    def names(self) -> list[str]:
        return [f"lora-{i}" for i in range(1, self.adapters + 1)]

    def resident_loras(self) -> int:
        """``--max-cpu-loras`` of the preferred mode's pods: by default every adapter, as P2 and P3 have it
        (host memory is cheap next to batch slots, and no copy is ever loaded after the first fill)."""
        return self.cpu_loras or min(256, max(self.max_loras, self.adapters))

    def capacity_rps(self) -> float:
        """Requests per simulated second the fleet serves with every batch full and no LoRA budget."""
        mean_tokens = (self.tokens_min + self.tokens_max) / 2
        step = self.step + self.per_seq * self.max_num_seqs
        return self.replicas * self.max_num_seqs / (mean_tokens * step)


# --- the trace (pure, seeded) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    t: float  # simulated seconds from the start
    adapter: str
    tokens: int


def make_trace(cell: Cell) -> tuple[list[Arrival], list[tuple[float, list[str]]]]:
    """Poisson arrivals with Zipf popularity over a ranking that is re-drawn every shift_min..shift_max."""
    rng = random.Random(cell.seed)
    names = cell.names
    weights = [1.0 / (r + 1) ** cell.zipf for r in range(len(names))]
    total = sum(weights)
    cum = list(_accumulate([w / total for w in weights]))
    shifts: list[tuple[float, list[str]]] = []
    t = 0.0
    while t < cell.duration:
        shifts.append((t, rng.sample(names, len(names))))
        t += rng.uniform(cell.shift_min, cell.shift_max)
    rate = cell.load * cell.capacity_rps()
    out: list[Arrival] = []
    t, seg = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= cell.duration:
            break
        while seg + 1 < len(shifts) and shifts[seg + 1][0] <= t:
            seg += 1
        rank = _bisect(cum, rng.random())
        out.append(Arrival(t, shifts[seg][1][rank], rng.randint(cell.tokens_min, cell.tokens_max)))
    return out, shifts


def _accumulate(xs: Sequence[float]) -> Iterator[float]:
    s = 0.0
    for x in xs:
        s += x
        yield s


def _bisect(cum: Sequence[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


# --- results --------------------------------------------------------------------------------------------


@dataclass
class Record:
    t: float
    adapter: str
    tokens: int
    status: int = 0
    ttft: float | None = None  # simulated seconds
    e2e: float | None = None
    error: str = ""


@dataclass
class Result:
    policy: str
    records: list[Record] = field(default_factory=list)
    deferred_share: float = 0.0
    loads: int = 0
    reloads: int = 0
    sim_minutes: float = 0.0
    censored: int = 0
    moves: int = 0
    """Requests the router moved off a pod that deferred them."""
    adapter_events: list[list[Any]] = field(default_factory=list)
    """[simulated s since the trace started, pod, load/unload/evict, adapter] for every change of a cache."""

    def ok(self) -> list[Record]:
        return [r for r in self.records if r.status == 200 and r.e2e is not None]

    def quantile(self, what: str, q: float) -> float:
        """Quantile over the requests that completed (failures are counted apart: see ``failed_share``)."""
        return _quantile([v for r in self.ok() if (v := getattr(r, what)) is not None], q)

    def failed_share(self) -> float:
        return sum(1 for r in self.records if r.status != 200) / len(self.records) if self.records else 0.0

    def throughput(self, duration: float) -> float:
        """Output tokens per simulated second of requests that finished within the trace window."""
        return sum(r.tokens for r in self.ok() if r.t + (r.e2e or 0) <= duration) / duration

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            if r.status != 200:
                key = f"{r.status} {r.error[:60]}".strip()
                out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1])[:5])

    def summary(self, duration: float) -> dict[str, float]:
        return {
            "ttft_p50": self.quantile("ttft", 0.5), "ttft_p99": self.quantile("ttft", 0.99),
            "e2e_p50": self.quantile("e2e", 0.5), "e2e_p99": self.quantile("e2e", 0.99),
            "throughput": self.throughput(duration),
            "deferred": self.deferred_share,
            "loads_per_min": self.loads / self.sim_minutes if self.sim_minutes else 0.0,
            "reloads_per_min": self.reloads / self.sim_minutes if self.sim_minutes else 0.0,
            "failed": float(sum(1 for r in self.records if r.status != 200)),
            "failed_share": self.failed_share(),
            "unfinished": float(self.censored),
            "requests": float(len(self.records)),
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    i = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[i]


# --- one policy on the fleet ----------------------------------------------------------------------------


def deployment(cell: Cell, namespace: str, policy: Policy) -> dict[str, Any]:
    cpu_loras = cell.max_loras
    if policy.everywhere:
        cpu_loras = cell.adapters
    elif policy.controller == "preferred":
        cpu_loras = cell.resident_loras()
    flags = ["--enable-lora", "--max-loras", str(cell.max_loras), "--max-cpu-loras", str(cpu_loras),
             "--max-num-seqs", str(cell.max_num_seqs)]
    if policy.everywhere:
        flags += ["--lora-modules", *(f"{a}=/adapters/{a}" for a in cell.names)]
    sim = (f"--sim-step-time {cell.step} --sim-per-seq-step-time {cell.per_seq} --sim-prefill-time-per-token 0 "
           f"--sim-load-time {cell.load_time} --sim-time-scale {cell.time_scale}")
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "llm", "namespace": namespace},
        "spec": {
            "replicas": cell.replicas,
            "selector": {"matchLabels": {"app": "llm"}},
            "template": {"metadata": {"labels": {"app": "llm"}, "annotations": {SIM_ARGS_ANNOTATION: sim}},
                         "spec": {"containers": [{
                             "name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                             "command": ["vllm", "serve", BASE, *flags],
                             "ports": [{"name": "http", "containerPort": 8000}],
                             "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"}],
                         }]}},
        },
    }


CONTROLLER_LOG_LEVEL = os.environ.get("BENCH_CONTROLLER_LOG_LEVEL", "WARNING")
"""INFO logs every placement and retirement (in the run's log directory), to see where loads come from."""


def scaled(cell: Cell) -> dict[str, Any]:
    """The controller's timings in real time: simulated timings divided by the time scale."""
    f = cell.time_scale
    up = max(1, round(cell.up_window / f))
    return {"sync_ms": max(100, round(1000 / f)), "up_window": up,
            "load_window": None if cell.load_window is None else max(up, round(cell.load_window / f)),
            "down_window": max(up, round(cell.down_window / f)), "drain": max(1, round(30 / f)),
            "max_age": max(1, round(10 / f)), "audit": 3.0 / f, "scrape": 0.3 / f,
            "move_after": None if cell.move_after is None else cell.move_after / f,
            "hold_for_slot": cell.hold_for_slot / f}


def autoscaler(cell: Cell, namespace: str, policy: Policy, router_metrics: str) -> dict[str, Any]:
    s = scaled(cell)
    static = policy.controller == "static"
    vllm: dict[str, Any] = {"port": 8000, "maxLorasPerReplica": cell.max_loras}
    if policy.controller == "preferred":
        vllm["maxCpuLorasPerReplica"] = cell.resident_loras()
    return {
        "apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
        "metadata": {"name": AUTOSCALER, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
            "vllm": vllm,
            "placementMode": "preferred" if policy.controller == "preferred" else "strict",
            "adapters": [{"name": a, "source": f"/adapters/{a}"} for a in cell.names],
            "scaling": {
                "syncPeriodMilliseconds": s["sync_ms"],
                "metric": {"source": "combined", "routerUrl": router_metrics, "maxAgeSeconds": s["max_age"]},
                # static dispatch: thresholds no load reaches, so the even dispatch never changes
                "scaleUp": {"threshold": 1_000_000 if static else cell.up_threshold,
                            "windowSeconds": s["up_window"],
                            **({} if s["load_window"] is None else {"loadWindowSeconds": s["load_window"]})},
                "scaleDown": {"threshold": 0 if static else cell.down_threshold,
                              "windowSeconds": s["down_window"], "drainTimeoutSeconds": s["drain"]},
            },
        },
    }


def _env(cp: ControlPlane) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(KUBECONFIG=str(cp.kubeconfig), PYTHONUNBUFFERED="1")
    return env


def _get_text(url: str, timeout: float = 3.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def _get(url: str, timeout: float = 3.0) -> Any:
    return json.loads(_get_text(url, timeout))


def ready_pods(kube: KubeClient, namespace: str) -> dict[str, str]:
    items, _ = kube.list_all(PODS, namespace, label_selector="app=llm")
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in items
            if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])}


class Fleet:
    """One policy's namespace: pods, controller, router; torn down by ``close``."""

    def __init__(self, cp: ControlPlane, cell: Cell, policy: Policy, work: Path, say: Any) -> None:
        self.cp, self.cell, self.policy, self.work, self.say = cp, cell, policy, work, say
        self.namespace = f"bench-{policy.key.lower()}-{uuid.uuid4().hex[:5]}"
        self.api = cp.api_client()
        self.kube = KubeClient(self.api)
        self.kubelet: TestKubelet | None = None
        self.procs: list[ManagedProcess] = []
        self.pods: dict[str, str] = {}
        self.router_port = free_port()
        self.metrics_port = free_port()
        while self.metrics_port == self.router_port:
            self.metrics_port = free_port()

    def _spawn(self, name: str, *argv: str) -> ManagedProcess:
        proc = ManagedProcess(name, [sys.executable, "-m", *argv], self.work / f"{self.policy.key}-{name}.log",
                              env=_env(self.cp), cwd=REPO)
        self.procs.append(proc)
        proc.start()
        return proc

    def start(self) -> None:
        cell, policy, ns = self.cell, self.policy, self.namespace
        self.cp.kubectl("create", "namespace", ns)
        self.kubelet = TestKubelet(self.api, node_name=f"node-{ns}", namespace=ns)
        self.kubelet.start()
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(deployment(cell, ns, policy)))
        def all_ready() -> dict[str, str] | None:
            found = ready_pods(self.kube, ns)
            return found if len(found) == cell.replicas else None

        self.pods = wait_until(all_ready, timeout=180, what=f"{cell.replicas} simulator pods ready")
        s = scaled(cell)
        router_args = ["router", "--host", "127.0.0.1", "--port", str(self.router_port), "--metrics-port",
                       str(self.metrics_port), "--scrape-interval", f"{s['scrape']:.3f}", "--max-loras",
                       str(cell.max_loras), "--queue-timeout", "3600", "--first-byte-timeout", "3600",
                       "--total-timeout", "7200", "--log-level", "warning", *policy.router]
        if s["move_after"] and policy.controller in ("strict", "preferred"):
            router_args += ["--move-deferred-after", f"{s['move_after']:.3f}"]
        if s["hold_for_slot"] and policy.controller in ("strict", "preferred"):
            router_args += ["--hold-for-slot", f"{s['hold_for_slot']:.3f}"]
        if cell.slot_cost is not None and "lora-aware" in policy.router:
            router_args += ["--slot-cost", f"{cell.slot_cost:g}"]
        if policy.controller is None:
            routes = {"models": {BASE: {"base": True, "pods": [f"{ip}:8000" for ip in self.pods.values()]}}}
            for a in cell.names:
                routes["models"][a] = {"preferred": [{"address": f"{ip}:8000", "pod": name}
                                                     for name, ip in self.pods.items()]}
            path = self.work / f"{policy.key}-routes.json"
            path.write_text(json.dumps(routes))
            router_args += ["--routes-file", str(path)]
        else:
            self._spawn("controller", "controller", "--namespace", ns, "--no-leader-elect", "--metrics-port", "-1",
                        "--audit-period", f"{s['audit']:.2f}", "--log-level", CONTROLLER_LOG_LEVEL)
            self.cp.kubectl("apply", "-f", "-", input=json.dumps(
                autoscaler(cell, ns, policy, f"http://127.0.0.1:{self.metrics_port}")))

            def placed() -> bool:
                st = (self.kube.get(LORA_AUTOSCALERS, AUTOSCALER, ns).get("status") or {})
                return st.get("readyAdapters") == cell.adapters

            wait_until(placed, timeout=180, what="every adapter routable")
            # Let the first placement settle (preferred mode fills spare resident slots one a pod per sync),
            # so that loads per minute measure what the trace causes, not the fleet's first fill: in preferred
            # mode every resident slot is taken (or every adapter is on every pod), in strict mode the
            # copies stop changing.
            counts: list[int] = []
            full = (min(cell.resident_loras(), cell.adapters) * cell.replicas
                    if policy.controller == "preferred" else 0)

            def settled() -> bool:
                st = (self.kube.get(LORA_AUTOSCALERS, AUTOSCALER, ns).get("status") or {})
                progressing = next((c["status"] for c in st.get("conditions") or [] if c["type"] == "Progressing"),
                                   "True")
                counts.append(sum(a.get("loadedReplicas", 0) for a in st.get("adapters") or []))
                return (progressing == "False" and counts[-1] >= full and len(counts) >= 4
                        and len(set(counts[-4:])) == 1)

            # One fallback copy a pod per sync, and a sync over 100+ adapters on two cores takes a few periods.
            fill_syncs = full / cell.replicas
            wait_until(settled, timeout=180 + 5 * fill_syncs * s["sync_ms"] / 1000, what="the first placement settled",
                       interval=1.0)
            router_args += ["--namespace", ns, "--autoscaler", AUTOSCALER]
        router = self._spawn("router", *router_args)

        def up() -> bool:
            if not router.alive():
                raise RuntimeError(f"the router exited: {router.log_tail(10)}")
            load = _get(f"http://127.0.0.1:{self.metrics_port}/router/load")
            return sum(1 for m in load["models"].values() if m.get("routable") and not m.get("base")) == cell.adapters

        wait_until(up, timeout=60, what="the router routing every adapter")

    def router_moves(self) -> int:
        """Requests the router moved off pods that deferred them (``--move-deferred-after``)."""
        text = _get_text(f"http://127.0.0.1:{self.metrics_port}/metrics")
        return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("lora_router_deferred_moves_total{")))

    def counters(self) -> tuple[int, int]:
        loads = reloads = 0
        for ip in self.pods.values():
            c = _get(f"http://{ip}:8000/sim/events?since=1000000000000")["counters"]
            loads += int(c.get("loads_ok", 0))
            reloads += int(c.get("adapter_reloads", 0))
        return loads, reloads

    def adapter_events(self, since: float, f: float) -> list[list[Any]]:
        """The pods' adapter loads, unloads and cache evictions after wall time ``since``, oldest first."""
        out: list[list[Any]] = []
        for pod, ip in self.pods.items():
            for ev in _get(f"http://{ip}:8000/sim/events")["events"]:
                if ev["kind"] in ("load", "unload", "evict") and ev["time"] >= since and ev.get("status", 200) == 200:
                    out.append([round((ev["time"] - since) * f, 3), pod, ev["kind"], ev["adapter"]])
        return sorted(out)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        if self.kubelet is not None:
            with contextlib.suppress(Exception):
                self.kubelet.stop()
        with contextlib.suppress(Exception):
            self.cp.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)
        self.api.close()


async def drive(fleet: Fleet, trace: list[Arrival], cell: Cell) -> Result:
    """Send the trace through the router; sample the pods' deferred and outstanding counts meanwhile."""
    f = cell.time_scale
    result = Result(fleet.policy.key, [Record(a.t, a.adapter, a.tokens) for a in trace])
    url = f"http://127.0.0.1:{fleet.router_port}/v1/completions"
    sums = {"deferred": 0.0, "outstanding": 0.0}
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(rec: Record) -> None:
            body = {"model": rec.adapter, "prompt": PROMPT, "max_tokens": rec.tokens, "stream": True}
            sent = time.monotonic()
            try:
                async with session.post(url, json=body) as resp:
                    rec.status = resp.status
                    first = None
                    async for _chunk in resp.content.iter_any():
                        if first is None:
                            first = time.monotonic()
                    end = time.monotonic()
                    if resp.status == 200 and first is not None:
                        rec.ttft = (first - sent) * f
                        rec.e2e = (end - sent) * f
            except asyncio.CancelledError:
                rec.status, rec.e2e, rec.error = -1, (time.monotonic() - sent) * f, "unfinished"
                raise
            except Exception as exc:
                rec.status, rec.error = 0, repr(exc)[:200]

        async def sample() -> None:
            while not stop.is_set():
                async def scrape(ip: str) -> None:
                    try:
                        async with session.get(f"http://{ip}:8000/metrics",
                                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
                            s = parse_vllm_metrics(await resp.text(), time.time())
                        sums["deferred"] += s.deferred
                        sums["outstanding"] += s.running + s.waiting
                    except Exception:
                        pass

                await asyncio.gather(*(scrape(ip) for ip in fleet.pods.values()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        sampler = asyncio.create_task(sample())
        start = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for rec in result.records:
            delay = start + rec.t / f - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rec)))
        _done, pending = await asyncio.wait(tasks, timeout=cell.drain_seconds / f) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.censored = len(pending)
        stop.set()
        await sampler
        result.sim_minutes = (time.monotonic() - start) * f / 60
    result.deferred_share = sums["deferred"] / sums["outstanding"] if sums["outstanding"] else 0.0
    return result


def run_policy(fleet: Fleet, trace: list[Arrival]) -> Result:
    cell, policy, say = fleet.cell, fleet.policy, fleet.say
    try:
        started = time.monotonic()
        fleet.start()
        say(f"{policy.key}: fleet up in {time.monotonic() - started:.0f}s ({policy.title}); "
            f"{len(trace)} requests over {cell.duration:.0f} simulated s")
        loads0, reloads0 = fleet.counters()
        since = time.time()
        result = asyncio.run(drive(fleet, trace, cell))
        loads1, reloads1 = fleet.counters()
        result.loads, result.reloads = loads1 - loads0, reloads1 - reloads0
        result.moves = fleet.router_moves()
        result.adapter_events = fleet.adapter_events(since, cell.time_scale)
        return result
    finally:
        fleet.close()


# --- output ---------------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def report(results: dict[str, Result], cell: Cell) -> str:
    lines = []
    sums = {k: r.summary(cell.duration) for k, r in results.items()}
    head = ("policy", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "tok/s", "deferred", "loads/min",
            "reloads/min", "failed %")
    lines.append(" | ".join(f"{h:>11}" for h in head))
    for k, s in sums.items():
        row = (k, s["ttft_p50"], s["ttft_p99"], s["e2e_p50"], s["e2e_p99"], s["throughput"], s["deferred"],
               s["loads_per_min"], s["reloads_per_min"], 100 * s["failed_share"])
        lines.append(" | ".join(f"{(c if isinstance(c, str) else fmt(c)):>11}" for c in row))
    lines.append("(latency quantiles over completed requests; failed % counts errors and requests still unfinished "
                 "when the drain time ran out: a policy that fails more than 1 % has a longer tail than shown)")
    for mine in ("P4", "P4p", "P4d"):
        if mine not in sums:
            continue
        m = sums[mine]
        lines.append("")
        lines.append(f"{mine} against each baseline (ratio = {mine} / baseline; target in brackets):")
        for base in ("P1", "P2", "P3", "P3b"):
            if base not in sums:
                continue
            b = sums[base]
            t_ttft, t_e2e = TARGETS[base]

            def ratio(a: float, z: float) -> str:
                return fmt(a / z) if z and not math.isinf(z) else "-"

            ok_ttft = b["ttft_p99"] and m["ttft_p99"] / b["ttft_p99"] <= t_ttft
            ok_e2e = b["e2e_p99"] and m["e2e_p99"] / b["e2e_p99"] <= t_e2e
            ok_tp = m["throughput"] >= b["throughput"] * 0.99
            caveat = f" (baseline failed {100 * b['failed_share']:.1f} %)" if b["failed_share"] > 0.01 else ""
            lines.append(
                f"  vs {base:>3}{caveat}: TTFT p50 {ratio(m['ttft_p50'], b['ttft_p50'])}, TTFT p99 "
                f"{ratio(m['ttft_p99'], b['ttft_p99'])} [<= {t_ttft:.2g}] {'ok' if ok_ttft else 'MISS'}, "
                f"E2E p50 {ratio(m['e2e_p50'], b['e2e_p50'])}, E2E p99 {ratio(m['e2e_p99'], b['e2e_p99'])} "
                f"[<= {t_e2e:.2g}] {'ok' if ok_e2e else 'MISS'}, throughput {ratio(m['throughput'], b['throughput'])}"
                f" [>= 1] {'ok' if ok_tp else 'MISS'}")
        if results[mine].moves:
            lines.append(f"  the router moved {results[mine].moves} requests off pods that deferred them")
        lines.append(f"  loads per minute across the fleet: {fmt(m['loads_per_min'])} API loads + "
                     f"{fmt(m['reloads_per_min'])} cache reloads [<= 10 loads] "
                     f"{'ok' if m['loads_per_min'] <= 10 else 'MISS'}")
        if "P3" in sums:
            p3 = sums["P3"]
            ok_e2e = m["e2e_p99"] <= GUARD_E2E_RATIO * p3["e2e_p99"]
            ok_ttft = m["ttft_p99"] <= p3["ttft_p99"] + GUARD_TTFT_SLACK
            lines.append(f"  guard rule (what a guard cell asks): E2E p99 {fmt(m['e2e_p99'])} s [<= {GUARD_E2E_RATIO}"
                         f" x P3 = {fmt(GUARD_E2E_RATIO * p3['e2e_p99'])}] {'ok' if ok_e2e else 'MISS'}, TTFT p99 "
                         f"{fmt(m['ttft_p99'])} s [<= P3 + {GUARD_TTFT_SLACK:g} s = "
                         f"{fmt(p3['ttft_p99'] + GUARD_TTFT_SLACK)}] {'ok' if ok_ttft else 'MISS'}")
    return "\n".join(lines)


def plots(results: dict[str, Result], cell: Cell, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for what, label in (("ttft", "time to first token (simulated s)"), ("e2e", "end to end (simulated s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, r in results.items():
            values = sorted(getattr(x, what) for x in r.ok() if getattr(x, what) is not None)
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.plot(values, ys, label=f"{k}: {POLICIES[k].title}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0.5, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{cell.replicas} replicas, {cell.adapters} adapters, max-loras {cell.max_loras}, "
                     f"Zipf {cell.zipf}, load {cell.load:.0%}")
        path = out / f"{what}_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = list(results)
    sums = {k: results[k].summary(cell.duration) for k in keys}
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [sums[k]["ttft_p99"] for k in keys], width=0.4, label="TTFT p99")
    ax.bar([x + 0.2 for x in xs], [sums[k]["e2e_p99"] for k in keys], width=0.4, label="E2E p99")
    ax.set_xticks(list(xs), keys)
    ax.set_yscale("log")
    ax.set_ylabel("simulated seconds")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    path = out / "p99.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# --- main -----------------------------------------------------------------------------------------------


def save(r: Result, path: Path) -> None:
    path.write_text(json.dumps({
        "deferred_share": r.deferred_share, "loads": r.loads, "reloads": r.reloads, "sim_minutes": r.sim_minutes,
        "censored": r.censored, "moves": r.moves, "adapter_events": r.adapter_events,
        "records": [[x.t, x.adapter, x.tokens, x.status, x.ttft, x.e2e, x.error] for x in r.records]}))


def load(path: Path, key: str) -> Result:
    d = json.loads(path.read_text())
    return Result(key, [Record(*row) for row in d["records"]], d["deferred_share"], d["loads"], d["reloads"],
                  d["sim_minutes"], d["censored"], d.get("moves", 0), d.get("adapter_events", []))


def _without(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return _without_out(out)


def _without_out(args: list[str]) -> list[str]:
    """The parent passes its own --out to every child."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="4 replicas, 16 adapters, 90 simulated s at 2x speed")
    p.add_argument("--cell", choices=sorted(CELLS), default="primary",
                   help="the primary cell or one of the placement study's guard cells")
    p.add_argument("--adapters", type=int, help="number of adapters")
    p.add_argument("--max-loras", type=int, help="vLLM's --max-loras of every replica")
    p.add_argument("--cpu-loras", type=int, help="vLLM's --max-cpu-loras of the preferred mode's replicas "
                   "(default: room for every adapter twice across the fleet, at least 2 x --max-loras)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated subset of " + ",".join(POLICIES))
    p.add_argument("--duration", type=float, help="simulated seconds of arrivals")
    p.add_argument("--time-scale", type=float, help="simulators this many times faster than real time")
    p.add_argument("--load", type=float, help="fraction of the fleet's token capacity (default 0.85)")
    p.add_argument("--zipf", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--up-threshold", type=float, help="autoscaler scaleUp.threshold (outstanding per replica)")
    p.add_argument("--down-threshold", type=float, help="autoscaler scaleDown.threshold")
    p.add_argument("--up-window", type=float, help="scale-up window, simulated seconds")
    p.add_argument("--down-window", type=float, help="scale-down window, simulated seconds")
    p.add_argument("--load-window", type=float, help="scale-up window when the replica needs a load, simulated s")
    p.add_argument("--move-after", type=float, help="the autoscaler policies' router moves a request waiting this "
                   "long for a LoRA slot (--move-deferred-after), simulated seconds")
    p.add_argument("--hold-for-slot", type=float, help="the autoscaler policies' router holds a request whose "
                   "holders are all saturated for it up to this long for the first to free (--hold-for-slot), "
                   "simulated seconds; default 60, 0: off")
    p.add_argument("--slot-cost", type=float, help="the lora-aware router's --slot-cost (P4, P4p)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench_autoscaling")
    p.add_argument("--one", choices=sorted(POLICIES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.policies.split(",") if k.strip()]
    unknown = [k for k in keys if k not in POLICIES]
    if unknown:
        print(f"unknown policies {unknown}; known: {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    cell = Cell(**CELLS[args.cell])
    if args.quick:
        cell = Cell(replicas=4, adapters=16, duration=90.0, shift_min=30.0, shift_max=45.0, time_scale=2.0,
                    step=0.04, per_seq=0.001, down_window=20.0, drain_seconds=60.0)
    overrides = {k: v for k, v in (("duration", args.duration), ("time_scale", args.time_scale),
                                   ("load", args.load), ("zipf", args.zipf), ("seed", args.seed),
                                   ("up_threshold", args.up_threshold), ("down_threshold", args.down_threshold),
                                   ("up_window", args.up_window), ("down_window", args.down_window),
                                   ("load_window", args.load_window),
                                   ("adapters", args.adapters), ("max_loras", args.max_loras),
                                   ("cpu_loras", args.cpu_loras), ("move_after", args.move_after),
                                   ("slot_cost", args.slot_cost), ("hold_for_slot", args.hold_for_slot))
                 if v is not None}
    if overrides:
        cell = Cell(**{**asdict(cell), **overrides})
    if cell.time_scale <= 0 or cell.duration <= 0 or not 0 < cell.load <= 2:
        print("--time-scale and --duration must be positive and --load in (0, 2]", file=sys.stderr)
        return 2
    if cell.hold_for_slot < 0:
        print("--hold-for-slot must be 0 (off) or positive", file=sys.stderr)
        return 2
    if cell.adapters < 1 or not 1 <= cell.max_loras <= 256 or not (cell.cpu_loras == 0 or
                                                                    cell.max_loras <= cell.cpu_loras <= 256):
        print("--adapters must be at least 1, --max-loras within 1-256 and --cpu-loras within --max-loras-256",
              file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-autoscaling-"))
    trace, shifts = make_trace(cell)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    s = scaled(cell)
    say(f"cell: {cell.replicas} replicas, --max-num-seqs {cell.max_num_seqs}, --max-loras {cell.max_loras}, "
        f"{cell.adapters} adapters, Zipf {cell.zipf}, hot set re-drawn every {cell.shift_min:.0f}-"
        f"{cell.shift_max:.0f} s ({len(shifts)} sets), load {cell.load:.0%} = {len(trace) / cell.duration:.1f} "
        f"requests/s of {cell.tokens_min}-{cell.tokens_max} tokens; autoscaler thresholds {cell.up_threshold:g}/"
        f"{cell.down_threshold:g} outstanding per replica, windows {cell.up_window:g}/{cell.down_window:g} s "
        f"{'' if cell.load_window is None else f'(up with a load {cell.load_window:g} s)'}; "
        f"preferred mode's --max-cpu-loras {cell.resident_loras()}; autoscaler router --hold-for-slot "
        f"{cell.hold_for_slot:g} s (cell {args.cell})")
    say(f"time: simulators {cell.time_scale:g}x faster than real time; controller sync {s['sync_ms']} ms, "
        f"windows {s['up_window']}/{s['down_window']} s, audit {s['audit']:.2f} s, router scrape "
        f"{s['scrape']:.3f} s (real; every timing scaled by the same factor). Latencies in simulated seconds.")
    if args.one:  # a child: one policy on its own control plane, its records to a file
        cp = ControlPlane(bin_dir=find_binaries())
        cp.start()
        try:
            cp.kubectl("apply", "-k", str(REPO / "config" / "crd"))
            cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                       "crd/loraautoscalers.loraautoscaler.io", "crd/loraplacements.loraautoscaler.io")
            started = time.monotonic()
            r = run_policy(Fleet(cp, cell, POLICIES[args.one], work, say), trace)
        finally:
            cp.stop()
        save(r, out / f"part-{args.one}.json")
        sm = r.summary(cell.duration)
        say(f"{args.one}: done in {time.monotonic() - started:.0f}s: TTFT p99 {fmt(sm['ttft_p99'])} s, E2E p99 "
            f"{fmt(sm['e2e_p99'])} s, {int(sm['failed'])} failed of {int(sm['requests'])}, {r.censored} "
            f"unfinished; errors {r.errors()}")
        return 0
    # Each policy runs in a process of its own (its own control plane, fleet and client), one after the
    # other on the same trace: a policy that overloads its fleet leaves nothing behind for the next.
    results: dict[str, Result] = {}
    forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    forward = _without(forward, "--policies")
    for k in keys:
        part = out / f"part-{k}.json"
        part.unlink(missing_ok=True)
        for attempt in (1, 2):
            done = subprocess.run([sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), *forward,
                                   "--one", k, "--out", str(out)], check=False)
            if done.returncode == 0 and part.exists():
                results[k] = load(part, k)
                break
            say(f"{k}: the run exited with {done.returncode} (attempt {attempt})")
        else:
            say(f"{k}: no result; left out of the comparison")
    print()
    print(f"Results (simulated seconds; the simulators ran {cell.time_scale:g}x faster than real time, and so "
          "did every timing of the controller and router):")
    text = report(results, cell)
    print(text)
    if not results:
        return 1
    (out / "results.json").write_text(json.dumps({
        "cell": asdict(cell), "summary": {k: r.summary(cell.duration) for k, r in results.items()},
        "censored": {k: r.censored for k, r in results.items()},
        "errors": {k: r.errors() for k, r in results.items()},
    }, indent=1, default=str))
    for k, r in results.items():
        (out / f"records-{k}.json").write_text(json.dumps(
            [[round(x.t, 3), x.adapter, x.tokens, x.status, x.ttft, x.e2e] for x in r.records]))
    (out / "report.txt").write_text(text + "\n")
    for path in plots(results, cell, out):
        say(f"wrote {path}")
    say(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
