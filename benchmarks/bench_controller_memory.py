"""Memory of the controller's pod informer with 10,000 pods, slimmed against the stock transforms.

Starts a local control plane, creates N pods shaped like a real vLLM fleet's (labels, owner, a vLLM
container with flags and env, a kubelet-like status), then lists and watches them three ways, one after
the other in this process, and prints the Python heap each cache holds (tracemalloc) per pod and as
ratios:

- ``slim``: the controller's transform (``controller.pods.slim_pod``, interned strings);
- ``default``: the informer's default transform (managedFields dropped);
- ``raw``: objects exactly as received.

Usage: ``python benchmarks/bench_controller_memory.py [--pods 10000] [--workers 8]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.informer import Informer, strip_managed_fields
from common.kube import CONFIGMAPS, NAMESPACES, PODS, KubeClient
from controller.pods import slim_pod, view
from localkube.controlplane import ControlPlane

NAMESPACE = "bench-memory"


def pod(i: int, owner_uid: str = "5b0f9e8e-1111-4d5c-9a53-0123456789ab") -> dict[str, Any]:
    name = f"vllm-llama-7f9c8d6b5-{i:05d}"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "vllm-llama", "pod-template-hash": "7f9c8d6b5",
                       "app.kubernetes.io/component": "inference", "model": "llama-3-8b"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                            "kubectl.kubernetes.io/restartedAt": "2026-11-27T10:00:00Z"},
            # The owner must exist or garbage collection deletes the pods; a ConfigMap stands in for the
            # ReplicaSet (a real one would manage, and delete, these pods).
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "vllm-llama-7f9c8d6b5",
                                 "uid": owner_uid, "controller": True, "blockOwnerDeletion": True}],
        },
        # no nodeName: without a kubelet heartbeat, pods bound to unknown nodes are marked not ready
        "spec": {
            "containers": [{
                "name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                "command": ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"],
                "args": ["--port=8000", "--served-model-name=llama", "--enable-lora", "--max-loras=4",
                         "--max-cpu-loras=8", "--max-lora-rank=16", "--gpu-memory-utilization=0.9"],
                "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"},
                        {"name": "HF_HOME", "value": "/models/cache"}],
                "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
                "resources": {"limits": {"nvidia.com/gpu": "1", "memory": "48Gi"},
                              "requests": {"cpu": "4", "memory": "32Gi"}},
                "volumeMounts": [{"name": "models", "mountPath": "/models"}],
            }],
            "volumes": [{"name": "models", "emptyDir": {}}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def status(i: int) -> dict[str, Any]:
    t = "2026-11-27T10:00:00Z"
    return {
        "phase": "Running", "podIP": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", "hostIP": "10.0.0.1",
        "podIPs": [{"ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"}], "startTime": t, "qosClass": "Burstable",
        "conditions": [{"type": c, "status": "True", "lastTransitionTime": t, "lastProbeTime": None}
                       for c in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                 "PodScheduled")],
        "containerStatuses": [{"name": "vllm", "ready": True, "started": True, "restartCount": i % 3,
                               "image": "vllm/vllm-openai:v0.32.0", "imageID": "docker.io/vllm/vllm-openai@sha256:"
                               + "0" * 64, "containerID": f"containerd://{i:064d}",
                               "state": {"running": {"startedAt": t}}, "lastState": {}}],
    }


def populate(kube: KubeClient, count: int, workers: int) -> float:
    if kube.get_or_none(NAMESPACES, NAMESPACE) is None:
        kube.create(NAMESPACES, {"metadata": {"name": NAMESPACE}})
    owner = kube.create(CONFIGMAPS, {"metadata": {"name": "vllm-llama-7f9c8d6b5"}}, NAMESPACE)
    owner_uid = owner["metadata"]["uid"]

    def one(i: int) -> None:
        kube.create(PODS, pod(i, owner_uid), NAMESPACE)
        kube.patch_status(PODS, pod(i)["metadata"]["name"], status(i), NAMESPACE)

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        for n, _ in enumerate(pool.map(one, range(count)), 1):
            if n % 1000 == 0:
                print(f"  {n} pods created ({n / (time.monotonic() - t0):.0f}/s)", file=sys.stderr)
    return time.monotonic() - t0


def measure(kube: KubeClient, transform: Callable[[dict[str, Any]], dict[str, Any]] | None, count: int) -> int:
    """Heap bytes held by one synced pod informer."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    inf = Informer(kube, PODS, NAMESPACE, transform=transform, name="bench-pods")
    inf.start()
    if not inf.wait_for_sync(300):
        raise TimeoutError("the informer did not sync")
    if len(inf) != count:
        raise AssertionError(f"the informer holds {len(inf)} pods, expected {count}")
    ready = sum(1 for o in inf.list() if view(o).serving)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    inf.stop()
    tracemalloc.stop()
    if ready != count:
        raise AssertionError(f"{ready} of {count} pods read as serving through this transform")
    del inf
    gc.collect()
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    with ControlPlane() as cp:
        api = cp.api_client()
        kube = KubeClient(api, timeout=(5.0, 120.0))
        seconds = populate(kube, args.pods, args.workers)
        print(f"created {args.pods} pods in {seconds:.1f}s", file=sys.stderr)
        results = {name: measure(kube, fn, args.pods)
                   for name, fn in (("slim", slim_pod), ("default", strip_managed_fields), ("raw", None))}
        api.close()
    n = args.pods
    print(f"pod informer heap with {n} pods (tracemalloc, this process):")
    for name, held in results.items():
        print(f"  {name:8s} {held / 2**20:8.1f} MiB  {held / n:8.0f} B/pod")
    print(f"ratio default/slim: {results['default'] / results['slim']:.1f}x")
    print(f"ratio raw/slim:     {results['raw'] / results['slim']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
