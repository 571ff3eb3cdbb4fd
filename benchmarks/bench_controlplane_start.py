"""How long the local control plane takes to become ready, and how long the test kubelet takes to make pods Ready.

Run: `.venv/bin/python benchmarks/bench_controlplane_start.py [--runs 3] [--pods 5]`

Prints, per run, the start-up time of the control plane (certificates, etcd, kube-apiserver /readyz,
kube-controller-manager /healthz, the default service account) and the time from creating a Deployment
of N vLLM-style pods to N Ready pods whose simulators answer, each as a ratio of its budget (30 s for the
control plane, 10 s for the pods) measured in the same run. A ratio above 1 means over budget.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from typing import Any

from localkube.controlplane import ControlPlane
from localkube.kubelet import TestKubelet
from localkube.wait import wait_until

CONTROL_PLANE_BUDGET = 30.0
PODS_BUDGET = 10.0


def _deployment(replicas: int) -> dict[str, Any]:
    container = {
        "name": "vllm",
        "image": "vllm/vllm-openai",
        "command": ["vllm", "serve", "base", "--enable-lora", "--max-loras", "2"],
        "ports": [{"containerPort": 8000}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "bench"}},
            "template": {"metadata": {"labels": {"app": "bench"}}, "spec": {"containers": [container]}},
        },
    }


def _answering(cp: ControlPlane, count: int) -> bool:
    items = json.loads(cp.kubectl("get", "pods", "-l", "app=bench", "-o", "json").stdout)["items"]
    ready = [
        p
        for p in items
        if any(c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions", []))
    ]
    if len(ready) != count:
        return False
    for pod in ready:
        conn = http.client.HTTPConnection(pod["status"]["podIP"], 8000, timeout=2)
        try:
            conn.request("GET", "/v1/models")
            if conn.getresponse().status != 200:
                return False
        finally:
            conn.close()
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pods", type=int, default=5)
    args = parser.parse_args()
    starts: list[float] = []
    pods: list[float] = []
    for run in range(1, args.runs + 1):
        with ControlPlane() as cp:
            assert cp.startup_seconds is not None
            starts.append(cp.startup_seconds)
            client = cp.api_client()
            with TestKubelet(client, namespace="default"):
                t0 = time.monotonic()
                cp.kubectl("apply", "-f", "-", input=json.dumps(_deployment(args.pods)))
                wait_until(lambda: _answering(cp, args.pods), timeout=60, what=f"{args.pods} pods answering")
                pods.append(time.monotonic() - t0)
            client.close()
        print(
            f"run {run}: control plane {starts[-1]:.2f}s ({starts[-1] / CONTROL_PLANE_BUDGET:.2f} of budget), "
            f"{args.pods} pods Ready and answering {pods[-1]:.2f}s ({pods[-1] / PODS_BUDGET:.2f} of budget)"
        )
    print(
        f"median: control plane {statistics.median(starts):.2f}s "
        f"(ratio to {CONTROL_PLANE_BUDGET:.0f}s budget {statistics.median(starts) / CONTROL_PLANE_BUDGET:.2f}); "
        f"pods {statistics.median(pods):.2f}s (ratio to {PODS_BUDGET:.0f}s budget "
        f"{statistics.median(pods) / PODS_BUDGET:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
