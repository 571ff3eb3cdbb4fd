"""The invariant checker itself: each promise it watches, broken on purpose, is caught with its reason.

Without this, a scenario that reports "no violation" could be a checker that never looks.
"""

from __future__ import annotations

import json

import pytest
from harness import APP_LABEL, apply, autoscaler, sim_call, vllm_deployment, wait_ready
from invariants import InvariantChecker
from scenarios import Env

from common.kube import KubeClient
from controller.manager import Controller, Options
from localkube.wait import wait_until

pytestmark = pytest.mark.integration


def test_the_checker_catches_every_kind_of_broken_promise(env: Env) -> None:
    cp, ns = env.cp, env.namespace
    apply(cp, vllm_deployment("llm", ns, 2))
    pods = wait_ready(cp, ns, "llm", 2)
    kube = KubeClient(cp.api_client())
    controller = Controller(kube, Options(namespace=ns, leader_election=False, audit_period=1.0, workers=2))
    controller.start()
    checker = InvariantChecker(kube, ns, "a", pod_labels={APP_LABEL: "llm"}, scenario="self-test")
    stopped = False
    try:
        apply(cp, autoscaler("a", ns, "llm", [("lora-1", 1), ("lora-2", 1)]))
        checker.start()
        assert checker.settle(60), checker.violations
        assert checker.violations == []
        ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
        holder = {a: next(iter(ps)) for a, ps in checker.routable().items()}
        other = {a: next(n for n in ips if n != holder[a]) for a in holder}

        # a request that meets a pod without its adapter
        status, _ = sim_call(ips[other["lora-2"]], "POST", "/v1/completions",
                             {"model": "lora-2", "prompt": "hi", "max_tokens": 1})
        assert status == 404
        wait_until(lambda: any(v.invariant == "model_not_found" for v in checker.violations), timeout=10,
                   what="the 'model does not exist' answer caught")

        # with the controller gone, an orphan copy and a lost adapter are seen when settling
        controller.stop()
        stopped = True
        body = {"lora_name": "lora-1", "lora_path": "/adapters/lora-1"}
        assert sim_call(ips[other["lora-1"]], "POST", "/v1/load_lora_adapter", body)[0] == 200
        assert sim_call(ips[holder["lora-2"]], "POST", "/v1/unload_lora_adapter", {"lora_name": "lora-2"})[0] == 200
        assert not checker.settle(3)
        assert checker.tally.placements_lost >= 1 and checker.tally.placements_duplicated >= 1
        reasons = "\n".join(v.reason for v in checker.violations)
        assert "does not hold lora-2" in reasons and "without a placement" in reasons, reasons

        # the only holder of lora-1 vanishes: no routable replica while another pod serves
        cp.kubectl("delete", "pod", holder["lora-1"], "-n", ns, "--grace-period=0", "--force", "--wait=false")
        wait_until(lambda: any(v.invariant == "routable" and "lora-1" in v.reason for v in checker.violations),
                   timeout=15, what="lora-1 without a routable replica caught")
        assert json.dumps([str(v) for v in checker.violations])  # every violation has a time and a reason
        assert all(v.at > 0 and v.reason for v in checker.violations)
    finally:
        checker.stop()
        if not stopped:
            controller.stop()
        kube.api_client.close()
