"""Fault scenarios: each runs real parts under load with the invariant checker on, and returns a Tally.

Shared by the test command (`test/reliability/test_faults.py`, modest counts) and by
`hack/reliability_figures.py` (the full counts, written to docs/reliability.md). Every scenario is bounded
in time (each wait has a deadline) and stops everything it started.

The workload is always a Deployment of simulated vLLM pods, one LoRAAutoscaler, two leader-elected
controller processes (3 s lease, 2 s renew deadline, 0.5 s retry), the router following the route table,
and steady completions through the router for adapters that stay in the spec.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    WEBHOOK_TEST_LABEL,
    ControllerPair,
    Load,
    Router,
    Webhook,
    apply,
    autoscaler,
    free_port,
    get_json,
    placements,
    post,
    ready_pods,
    sim_call,
    vllm_deployment,
    wait_ready,
    webhook_configurations,
)
from invariants import InvariantChecker, Tally

from common.kube import KubeClient
from localkube.controlplane import ControlPlane
from localkube.kubelet import TestKubelet
from localkube.wait import wait_until

log = logging.getLogger(__name__)

APP = "llm"
NAME = "a"


@dataclass
class Env:
    """Where a scenario runs: a control plane, an empty namespace with its kubelet, a directory for logs."""

    cp: ControlPlane
    namespace: str
    kubelet: TestKubelet
    work: Path


@dataclass
class Stack:
    """The running parts of a scenario."""

    kube: KubeClient
    checker: InvariantChecker
    controllers: ControllerPair
    router: Router
    load: Load


def _injected(status: int, body: bytes) -> bool:
    return status >= 500 and b"simulated engine failure" in body


@contextlib.contextmanager
def stack(env: Env, scenario: str, adapters: Sequence[tuple[str, int]], *, replicas: int, max_loras: int,
          load_adapters: Sequence[str], sim_args: str = "", drain_timeout: int = 5, rate: float = 8.0,
          settle_timeout: float = 60.0) -> Iterator[Stack]:
    """Deployment, autoscaler, two controllers, router, checker and load; all stopped on the way out.

    Yields once the first placement has settled with load flowing; on the way out stops the load, reads
    the router's stale-route count into the tally, and stops the checker (its final counter read).
    """
    cp, ns = env.cp, env.namespace
    kube = KubeClient(cp.api_client())
    apply(cp, vllm_deployment(APP, ns, replicas, max_loras=max_loras, sim_args=sim_args))
    wait_ready(cp, ns, APP, replicas)
    checker = InvariantChecker(kube, ns, NAME, pod_labels={"app": APP}, scenario=scenario)
    controllers = ControllerPair(cp, kube, ns, env.work)
    router: Router | None = None
    load: Load | None = None
    try:
        controllers.start()
        apply(cp, autoscaler(NAME, ns, APP, adapters, max_loras=max_loras, drain_timeout=drain_timeout))
        checker.start()
        router = Router(cp, ns, NAME, env.work).start()
        if not checker.settle(settle_timeout):
            raise AssertionError(f"{scenario}: the first placement did not settle: {checker.violations}\n"
                                 f"{controllers.logs()}")
        load = Load(router.url, load_adapters, checker.request, rate=rate, expected=_injected).start()
        yield Stack(kube, checker, controllers, router, load)
    finally:
        if load is not None:
            load.stop()
            for at, adapter, status, text in load.failures[:20]:
                log.info("failed request at %.2f for %s: %s %s", at, adapter, status, text)
        if router is not None:
            with contextlib.suppress(Exception):
                stale = int(router.metric("lora_router_errors_total", kind="stale_route"))
                if stale:
                    checker.violation("model_not_found", f"the router met {stale} stale route(s): a pod answered "
                                                         f"'model does not exist' to routed traffic")
            router.stop()
        checker.stop()
        controllers.stop()
        kube.api_client.close()


def _phases(checker: InvariantChecker) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in checker.placements.list():
        phase = (p.get("status") or {}).get("phase") or "Pending"
        if (p.get("spec") or {}).get("retire"):
            phase = f"{phase}(retiring)"
        out[phase] = out.get(phase, 0) + 1
    return out


def _settle(s: Stack, timeout: float = 60.0) -> None:
    s.checker.settle(timeout)


# ---- 1. the controller killed --------------------------------------------------------------------------


def _in_progress(checker: InvariantChecker) -> dict[str, int]:
    return {p: n for p, n in _phases(checker).items() if not p.startswith("Loaded") or "retiring" in p}


def controller_kills(env: Env, kills: int = 8, seed: int = 7) -> Tally:
    """SIGKILL the leading controller at random moments while loads and drains run; a standby takes over.

    Each round changes the spec so that work starts: an extra adapter with two replicas is added (two
    loads, about a second each) or removed again (two drains and unloads). The kill waits until the checker
    sees that work under way, then a random 0-0.8 s more, kills the leader (SIGKILL: no lease release) and
    starts a new standby. The placement phases seen at each kill are noted. Then the system must settle with
    nothing lost or duplicated and every adapter at its minimum.
    """
    rng = random.Random(seed)
    base = [("lora-1", 1), ("lora-2", 1), ("lora-3", 1), ("lora-4", 1)]
    adapters = [a for a, _ in base]
    with stack(env, "controller SIGKILL", base, replicas=3, max_loras=2, load_adapters=adapters,
               sim_args="--sim-load-time 1.0", drain_timeout=3) as s:
        hit: Counter[str] = Counter()
        for i in range(kills):
            extra = f"extra-{i // 2}"
            if i % 2 == 0:
                s.checker.adapter_returns(extra)
                spec = [*base, (extra, 2)]
            else:  # once its copies serve, so that the kill meets drains and unloads
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda x=extra: len(s.checker.routable().get(x, ())) == 2,  # type: ignore[misc]
                               timeout=20, what=f"{extra} routable on two pods")
                s.checker.adapter_leaves(extra)
                spec = list(base)
            apply(env.cp, autoscaler(NAME, env.namespace, APP, spec, max_loras=2, drain_timeout=3))
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: _in_progress(s.checker), timeout=5, what="the change's work under way")
            time.sleep(rng.uniform(0.0, 0.8))  # on purpose: a random moment into that work
            busy = _in_progress(s.checker)
            hit.update(busy.keys() or ["nothing in progress"])
            killed = s.controllers.kill_leader()
            s.checker.fault("controller SIGKILL", f"{killed} killed; in progress: {busy}")
            s.controllers.wait_leader(30)
        s.checker.tally.notes.append("placement phases in progress at the kills (kills per phase): " + ", ".join(
            f"{phase} {n}" for phase, n in sorted(hit.items())))
        if kills % 2:
            s.checker.adapter_leaves(f"extra-{kills // 2}")
        apply(env.cp, autoscaler(NAME, env.namespace, APP, base, max_loras=2, drain_timeout=3))
        _settle(s, 90)
    return s.checker.tally


# ---- 2. the API server restarted ----------------------------------------------------------------------


def apiserver_restarts(env: Env) -> Tally:
    """Restart kube-apiserver twice under load: once plainly, once right after the Deployment grew by two.

    Informers (controller, router, kubelet, checker) must recover; the pods added by the scale-up must get
    adapters; nothing placed before may be lost.
    """
    base = [("lora-1", 1), ("lora-2", 1), ("lora-3", 1), ("lora-4", 1)]
    adapters = [a for a, _ in base]
    with stack(env, "API server restart", base, replicas=3, max_loras=2, load_adapters=adapters) as s:
        s.checker.fault("kube-apiserver restart", "2 s down")
        env.cp.restart_apiserver(downtime=2.0)
        _settle(s, 90)
        env.cp.kubectl("scale", "deployment", APP, "-n", env.namespace, "--replicas=5")
        s.checker.fault("kube-apiserver restart", "during a scale-up from 3 to 5 pods, 1 s down")
        env.cp.restart_apiserver(downtime=1.0)
        wait_ready(env.cp, env.namespace, APP, 5, timeout=90)
        _settle(s, 90)

        def every_pod_serves() -> bool:
            pods = {p["metadata"]["name"] for p in ready_pods(env.cp, env.namespace, APP)}
            loaded = {p["spec"]["podName"] for p in placements(env.cp, env.namespace)
                      if (p.get("status") or {}).get("phase") == "Loaded" and not p["spec"].get("retire")}
            return pods <= loaded

        try:
            wait_until(every_pod_serves, timeout=60, what="every pod of the scale-up holding an adapter")
        except TimeoutError as exc:
            s.checker.violation("scale-up", str(exc))
    return s.checker.tally


# ---- 3. simulators misbehaving -------------------------------------------------------------------------


def _holders(cp: ControlPlane, ns: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in placements(cp, ns):
        if (p.get("status") or {}).get("phase") == "Loaded" and not p["spec"].get("retire"):
            out.setdefault(p["spec"]["adapter"], set()).add(p["spec"]["podName"])
    return out


def _pod_ips(cp: ControlPlane, ns: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in ready_pods(cp, ns, APP)}


def _faults(ip: str, body: dict[str, Any] | None) -> None:
    status, answer = sim_call(ip, "POST" if body is not None else "DELETE", "/sim/faults", body)
    assert status == 200, answer


def simulator_faults(env: Env) -> Tally:
    """Simulators that fail loads, load slowly, answer 5xx, crash (forgetting their adapters), and a pod that
    vanishes in the middle of a drain. Adapters under load have two replicas, so one pod's trouble never
    leaves them without a routable one."""
    cp, ns = env.cp, env.namespace
    stable = [("lora-1", 2), ("lora-2", 2), ("lora-3", 2)]
    spec: list[tuple[str, int]] = list(stable)

    def set_spec(adapters: list[tuple[str, int]]) -> None:
        spec[:] = adapters
        apply(cp, autoscaler(NAME, ns, APP, adapters, max_loras=3, drain_timeout=5))

    with stack(env, "simulator faults", stable, replicas=4, max_loras=3,
               load_adapters=[a for a, _ in stable]) as s:
        ips = _pod_ips(cp, ns)
        names = sorted(ips)
        # (a) loads fail on three pods out of four: a new adapter ends on the fourth, the others go Failed
        for name in names[:3]:
            _faults(ips[name], {"load_failures": 1000})
            s.checker.fault("load failures", f"every load fails on {name}")
        s.checker.adapter_returns("lora-4")
        set_spec([*stable, ("lora-4", 1)])
        wait_until(lambda: _holders(cp, ns).get("lora-4") == {names[3]}, timeout=60,
                   what=f"lora-4 loaded on the one pod whose loads work ({names[3]})")
        for name in names[:3]:
            _faults(ips[name], None)
        _settle(s)
        # (b) slow loads: a new adapter is not routed anywhere until its load has finished
        for name in names:
            _faults(ips[name], {"load_delay": 2.0})
        s.checker.fault("slow loads", "every load takes 2 s more")
        s.checker.adapter_returns("lora-5")
        set_spec([*spec, ("lora-5", 1)])

        def loading() -> bool:
            return any(p["spec"]["adapter"] == "lora-5" and (p.get("status") or {}).get("phase") == "Loading"
                       for p in placements(cp, ns))

        wait_until(loading, timeout=30, what="lora-5 loading (slowly)")
        started = time.monotonic()
        status, body = post(s.router.url, "/v1/completions",
                            json.dumps({"model": "lora-5", "prompt": "hi", "max_tokens": 2}).encode())
        s.checker.request(status == 200, f"{status}: {body[:90]!r}")
        s.checker.tally.notes.append(f"a request for an adapter still loading slowly waited "
                                     f"{time.monotonic() - started:.1f}s in the router and got {status}")
        for name in names:
            _faults(ips[name], None)
        _settle(s)
        # (c) 5xx answers from one pod for a few seconds
        victim = names[0]
        _faults(ips[victim], {"error_rate": 0.5, "error_status": 500})
        s.checker.fault("5xx answers", f"{victim} answers half its completions with 500 for 4 s")
        time.sleep(4.0)  # on purpose: the fault lasts this long under load
        _faults(ips[victim], None)
        # (d) crashes: the simulator exits and comes back without its runtime-loaded adapters
        for adapter in ("lora-4", "lora-5"):
            s.checker.adapter_leaves(adapter)
        set_spec(list(stable))
        _settle(s)
        for victim in (names[1], names[2]):
            ip = _pod_ips(cp, ns)[victim]
            restarts = _restart_count(cp, ns, victim)
            with contextlib.suppress(OSError):
                sim_call(ip, "POST", "/sim/crash", timeout=2)
            s.checker.fault("simulator crash", f"{victim} crashed and forgot its adapters")
            wait_until(lambda v=victim, r=restarts: _restart_count(cp, ns, v) > r, timeout=30,  # type: ignore[misc]
                       what=f"{victim} restarted")
            _settle(s, 60)
        # (e) a pod vanishes in the middle of a drain
        _vanish_mid_drain(env, s, set_spec, stable)
        _settle(s, 90)
    return s.checker.tally


def _restart_count(cp: ControlPlane, ns: str, pod: str) -> int:
    got = get_json(cp, "pod", pod, "-n", ns)
    return sum(c.get("restartCount", 0) for c in (got.get("status") or {}).get("containerStatuses") or [])


def _vanish_mid_drain(env: Env, s: Stack, set_spec: Callable[[list[tuple[str, int]]], None],
                      stable: list[tuple[str, int]]) -> None:
    """An adapter outside the load (lora-6, two copies, each busy with a long request) is removed from the
    spec; while its copies drain, one of their pods is deleted."""
    cp, ns = env.cp, env.namespace
    s.checker.adapter_returns("lora-6")
    set_spec([*stable, ("lora-6", 2)])
    wait_until(lambda: len(_holders(cp, ns).get("lora-6", ())) == 2, timeout=60, what="lora-6 on two pods")
    _settle(s)
    holders = sorted(_holders(cp, ns)["lora-6"])
    ips = _pod_ips(cp, ns)
    stop = threading.Event()

    def long_request(ip: str) -> None:  # keeps lora-6 running on the pod, so its drain waits
        while not stop.is_set():
            status, _ = post(f"http://{ip}:8000", "/v1/completions", json.dumps(
                {"model": "lora-6", "prompt": "hi", "max_tokens": 300, "ignore_eos": True}).encode(), timeout=10)
            if status != 200:
                return

    threads = [threading.Thread(target=long_request, args=(ips[h],), daemon=True) for h in holders]
    for t in threads:
        t.start()
    try:
        s.checker.adapter_leaves("lora-6")
        set_spec(list(stable))

        def draining() -> dict[str, Any] | None:
            for p in placements(cp, ns):
                if p["spec"]["adapter"] == "lora-6" and (p.get("status") or {}).get("phase") == "Draining":
                    return p
            return None

        p = wait_until(draining, timeout=20, what="a placement of lora-6 draining")
        pod = p["spec"]["podName"]
        cp.kubectl("delete", "pod", pod, "-n", ns, "--grace-period=0", "--force", "--wait=false")
        s.checker.fault("pod vanished mid-drain", f"{pod} deleted while draining lora-6")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    wait_until(lambda: not any(p["spec"]["adapter"] == "lora-6" for p in placements(cp, ns)), timeout=30,
               what="lora-6's placements gone (the vanished pod's without a call, the other unloaded)")
    wait_ready(cp, ns, APP, 4, timeout=60)


# ---- 4. the webhook down ------------------------------------------------------------------------------


@dataclass
class WebhookFindings:
    """What the API server answered while the webhook was down (the test asserts on these)."""

    mutate_down_create: str = ""  # a LoRAAutoscaler created with the mutating webhook unreachable
    stored_defaults: dict[str, Any] | None = None
    validate_down_create: tuple[int, str] = (0, "")
    validate_down_update: tuple[int, str] = (0, "")
    placement_create: tuple[int, str] = (0, "")
    other_resources: dict[str, tuple[int, str]] | None = None
    outside_scope_create: tuple[int, str] = (0, "")
    update_after_return: tuple[int, str] = (0, "")


def webhook_down(env: Env, findings: WebhookFindings | None = None) -> Tally:
    """The shipped webhook configurations (narrowed to this namespace) with the webhook unreachable.

    The mutating webhook points at a port nobody serves from the start (it fails open: creates still work,
    with the CRD's defaults); the validating webhook serves until it is killed (then LoRAAutoscaler creates
    and updates fail closed with the API server's message, LoRAPlacements are still written by the
    controller, and nothing else is blocked). Load and the checker run throughout, and a scale-up while the
    webhook is down must still get its adapters.
    """
    cp, ns = env.cp, env.namespace
    f = findings if findings is not None else WebhookFindings()
    token = f"r{ns[-6:]}"
    name = f"lora-autoscaler-webhook-reliability-{token}"
    system = f"whsys-{token}"
    outside = f"outside-{token}"
    cp.kubectl("create", "namespace", system)
    cp.kubectl("create", "namespace", outside)
    port = free_port()
    configurations = webhook_configurations(name, token, mutate_port=free_port(), validate_port=port)
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": configurations}))
    hook = Webhook(cp, env.work, port=port, configuration=name, ca_namespace=system).start()
    try:
        cp.kubectl("label", "namespace", ns, f"{WEBHOOK_TEST_LABEL}={token}")
        probe = autoscaler("probe", ns, APP, [("lora-1", 1)])

        def intercepted() -> bool:  # a valid object passes the schema, so the validating webhook sees it
            before = hook.admissions()
            cp.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
            return hook.admissions() > before

        wait_until(intercepted, timeout=60, what="the API server calling the webhook for the namespace", interval=0.5)
        base = [("lora-1", 1), ("lora-2", 1)]
        minimal = {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
                   "metadata": {"name": "probe", "namespace": ns},
                   "spec": {"scaleTargetRef": {"kind": "Deployment", "name": APP},
                            "adapters": [{"name": "lora-9", "source": "/adapters/lora-9"}]}}
        done = cp.kubectl("create", "-f", "-", input=json.dumps(minimal), check=False)
        f.mutate_down_create = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            f.stored_defaults = get_json(cp, "loraautoscaler", "probe", "-n", ns)
            cp.kubectl("delete", "loraautoscaler", "probe", "-n", ns, "--wait=false")
        with stack(env, "webhook down", base, replicas=2, max_loras=2, load_adapters=["lora-1", "lora-2"]) as s:
            s.checker.fault("mutating webhook unreachable", "from the start")
            hook.proc.kill()
            s.checker.fault("validating webhook down", "SIGKILL")
            other = autoscaler("other", ns, APP, [("lora-1", 1)])
            done = cp.kubectl("create", "-f", "-", input=json.dumps(other), check=False)
            f.validate_down_create = (done.returncode, done.stderr.strip())
            changed = autoscaler(NAME, ns, APP, [*base, ("lora-3", 1)], max_loras=2, drain_timeout=5)
            done = cp.kubectl("apply", "-f", "-", input=json.dumps(changed), check=False)
            f.validate_down_update = (done.returncode, done.stderr.strip())
            results: dict[str, tuple[int, str]] = {}
            done = cp.kubectl("create", "configmap", "plain", "-n", ns, "--from-literal=a=b", check=False)
            results["configmap"] = (done.returncode, done.stderr.strip())
            done = cp.kubectl("scale", "deployment", APP, "-n", ns, "--replicas=3", check=False)
            results["deployment scale"] = (done.returncode, done.stderr.strip())
            f.other_resources = results
            done = cp.kubectl("create", "-f", "-", input=json.dumps(autoscaler("other", outside, APP, [("lora-1", 1)])),
                              check=False)
            f.outside_scope_create = (done.returncode, done.stderr.strip())
            placement = {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAPlacement",
                         "metadata": {"name": "by-hand", "namespace": ns},
                         "spec": {"autoscaler": "x", "adapter": "lora-1", "source": "/adapters/lora-1",
                                  "podName": "p", "podUid": "u"}}
            done = cp.kubectl("create", "-f", "-", input=json.dumps(placement), check=False)
            f.placement_create = (done.returncode, done.stderr.strip())
            cp.kubectl("delete", "loraplacement", "by-hand", "-n", ns, "--ignore-not-found", "--wait=false",
                       check=False)
            wait_ready(cp, ns, APP, 3, timeout=60)
            _settle(s, 60)

            def new_pod_filled() -> bool:
                loaded = {p["spec"]["podName"] for p in placements(cp, ns)
                          if (p.get("status") or {}).get("phase") == "Loaded"}
                return {p["metadata"]["name"] for p in ready_pods(cp, ns, APP)} <= loaded

            try:
                wait_until(new_pod_filled, timeout=30, what="the pod added while the webhook was down serving")
            except TimeoutError as exc:
                s.checker.violation("scale-up", str(exc))
            hook = Webhook(cp, env.work, port=port, configuration=name, ca_namespace=system).start()
            s.checker.fault("webhook back", "restarted")
            wait_until(intercepted, timeout=60, what="the API server calling the webhook again", interval=0.5)
            done = cp.kubectl("apply", "-f", "-", input=json.dumps(changed), check=False)
            f.update_after_return = (done.returncode, done.stderr.strip())
            _settle(s, 60)
    finally:
        hook.stop()
        cp.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False)
        cp.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found", check=False)
        for extra in (system, outside):
            cp.kubectl("delete", "namespace", extra, "--wait=false", check=False)
    return s.checker.tally
