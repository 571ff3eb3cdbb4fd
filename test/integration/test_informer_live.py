"""The informer, the JSON client and the event recorder against the real kube-apiserver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from common.events import EventRecorder
from common.informer import Backoff, Informer
from common.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    LEASES,
    PODS,
    ApiError,
    KubeClient,
    Resource,
    object_key,
)
from localkube.controlplane import ControlPlane
from localkube.wait import wait_until

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.1, factor=2.0, cap=1.0, jitter=0.2)


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[KubeClient]:
    api = control_plane.api_client()
    try:
        yield KubeClient(api)
    finally:
        api.close()


class Seen:
    """Handler calls, thread-safe, by object name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []

    def add(self, obj: dict) -> None:
        with self.lock:
            self.calls.append(("add", obj["metadata"]["name"]))

    def update(self, old: dict, new: dict) -> None:
        with self.lock:
            self.calls.append(("update", new["metadata"]["name"]))

    def delete(self, obj: dict) -> None:
        with self.lock:
            self.calls.append(("delete", obj["metadata"]["name"]))

    def of(self, name: str) -> list[str]:
        with self.lock:
            return [k for k, n in self.calls if n == name]

    def added(self) -> set[str]:
        with self.lock:
            return {n for k, n in self.calls if k == "add"}


def cm(name: str, data: str = "1") -> dict:
    return {"metadata": {"name": name, "labels": {"app": "t"}}, "data": {"v": data}}


def test_json_client_crud_patch_kinds_and_errors(kube: KubeClient, namespace: str) -> None:
    created = kube.create(CONFIGMAPS, cm("a"), namespace)
    assert created["metadata"]["uid"] and created["kind"] == "ConfigMap"
    assert kube.get(CONFIGMAPS, "a", namespace)["data"] == {"v": "1"}
    merged = kube.patch(CONFIGMAPS, "a", {"data": {"w": "2"}}, namespace)
    assert merged["data"] == {"v": "1", "w": "2"}
    strategic = kube.patch(CONFIGMAPS, "a", {"metadata": {"labels": {"s": "y"}}}, namespace, patch_type="strategic")
    assert strategic["metadata"]["labels"] == {"app": "t", "s": "y"}
    jp = kube.patch(CONFIGMAPS, "a", [{"op": "replace", "path": "/data/v", "value": "3"}], namespace, patch_type="json")
    assert jp["data"]["v"] == "3"
    applied = kube.apply(CONFIGMAPS, {"metadata": {"name": "b", "namespace": namespace}, "data": {"x": "1"}})
    assert applied["data"] == {"x": "1"}
    assert any(m.get("operation") == "Apply" for m in applied["metadata"]["managedFields"])

    # Optimistic concurrency: a PUT with a stale resourceVersion is a conflict, not a silent overwrite.
    stale = dict(created, data={"v": "stale"})
    with pytest.raises(ApiError) as conflict:
        kube.replace(CONFIGMAPS, stale, namespace)
    assert conflict.value.status == 409 and conflict.value.conflict and not conflict.value.already_exists
    with pytest.raises(ApiError) as exists:
        kube.create(CONFIGMAPS, cm("a"), namespace)
    assert exists.value.already_exists and exists.value.reason == "AlreadyExists"
    with pytest.raises(ApiError) as missing:
        kube.get(CONFIGMAPS, "nope", namespace)
    assert missing.value.not_found and missing.value.reason == "NotFound" and "nope" in missing.value.message
    with pytest.raises(ApiError) as invalid:
        kube.create(CONFIGMAPS, cm("Not_A_Name"), namespace)
    assert invalid.value.status == 422 and invalid.value.reason == "Invalid"
    assert kube.get_or_none(CONFIGMAPS, "nope", namespace) is None

    items, rv = kube.list_all(CONFIGMAPS, namespace, label_selector="app=t", page_size=1)
    assert [i["metadata"]["name"] for i in items] == ["a"] and rv
    assert items[0]["kind"] == "ConfigMap" and items[0]["apiVersion"] == "v1"

    kube.delete(CONFIGMAPS, "a", namespace)
    assert kube.delete(CONFIGMAPS, "a", namespace, ignore_not_found=True) is None
    with pytest.raises(ValueError, match="namespaced"):
        kube.get(CONFIGMAPS, "a")

    # Discovery maps a scaleTargetRef's (apiVersion, kind) to its resource.
    assert kube.resource_for("apps/v1", "Deployment") == DEPLOYMENTS
    assert kube.resource_for("coordination.k8s.io/v1", "Lease") == LEASES
    assert kube.resource_for("rbac.authorization.k8s.io/v1", "Role") == Resource(
        "rbac.authorization.k8s.io", "v1", "roles", True, "Role"
    )
    with pytest.raises(ApiError, match="no resource of kind"):
        kube.resource_for("apps/v1", "Nonsense")


def test_scale_and_status_subresources(kube: KubeClient, namespace: str) -> None:
    deployment = {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
            },
        },
    }
    kube.create(DEPLOYMENTS, deployment, namespace)
    scale = kube.get_scale(DEPLOYMENTS, "web", namespace)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    kube.set_scale(DEPLOYMENTS, "web", 3, namespace)
    assert kube.get(DEPLOYMENTS, "web", namespace)["spec"]["replicas"] == 3
    with pytest.raises(ValueError, match="replicas"):
        kube.set_scale(DEPLOYMENTS, "web", -1, namespace)
    patched = kube.patch_status(DEPLOYMENTS, "web", {"observedGeneration": 42}, namespace)
    assert patched["status"]["observedGeneration"] == 42


def test_informer_syncs_and_sees_add_update_delete(kube: KubeClient, namespace: str) -> None:
    for i in range(5):
        kube.create(CONFIGMAPS, cm(f"pre-{i}"), namespace)
    inf = Informer(kube, CONFIGMAPS, namespace, label_selector="app=t", page_size=2, backoff=FAST)
    inf.add_index("data", lambda o: [o.get("data", {}).get("v", "")])
    seen = Seen()
    inf.add_handler(seen.add, seen.update, seen.delete)
    inf.start()
    try:
        assert inf.wait_for_sync(10)
        assert sorted(inf.keys()) == sorted(f"{namespace}/pre-{i}" for i in range(5))
        assert all("managedFields" not in o["metadata"] for o in inf.list())
        kube.create(CONFIGMAPS, cm("live"), namespace)
        wait_until(lambda: seen.of("live") == ["add"], timeout=10, what="the add event")
        kube.patch(CONFIGMAPS, "live", {"data": {"v": "2"}}, namespace)
        wait_until(lambda: seen.of("live") == ["add", "update"], timeout=10, what="the update event")
        assert [o["metadata"]["name"] for o in inf.by_index("data", "2")] == ["live"]
        kube.delete(CONFIGMAPS, "live", namespace)
        wait_until(lambda: seen.of("live") == ["add", "update", "delete"], timeout=10, what="the delete event")
        assert inf.get(f"{namespace}/live") is None
        # The label selector is honoured: an unlabelled object never enters the store.
        kube.create(CONFIGMAPS, {"metadata": {"name": "other"}}, namespace)
        kube.create(CONFIGMAPS, cm("marker"), namespace)
        wait_until(lambda: "marker" in seen.added(), timeout=10, what="the marker")
        assert "other" not in seen.added()
        assert inf.list_count == 1
        started = time.monotonic()
    finally:
        inf.stop()
    assert time.monotonic() - started < 2.0, "stop must not wait for the watch to time out"


def test_watch_from_a_too_old_resource_version_is_gone_and_the_informer_relists(
    control_plane: ControlPlane, kube: KubeClient, namespace: str
) -> None:
    # A restarted API server's watch cache starts at the current revision, so resourceVersion 1 is older
    # than anything it holds (a long-running cluster gets there by cache eviction and etcd compaction).
    control_plane.restart_apiserver()
    # The client-level fact: the API server answers such a watch with 410 (as an HTTP status or as an
    # ERROR event, depending on the path the request takes).
    code = None
    try:
        stream = kube.watch(CONFIGMAPS, namespace, resource_version="1", read_timeout=10)
        for event in stream:
            assert event["type"] == "ERROR"
            code = event["object"]["code"]
            break
        stream.close()
    except ApiError as exc:
        code = exc.status
    assert code == 410

    kube.create(CONFIGMAPS, cm("before"), namespace)
    inf = Informer(kube, CONFIGMAPS, namespace, backoff=FAST)
    seen = Seen()
    inf.add_handler(seen.add, seen.update, seen.delete)
    inf.start()
    try:
        assert inf.wait_for_sync(10)
        wait_until(lambda: inf.watch_count >= 1, timeout=10, what="the first watch")
        # Force the next watch to start from an expired resourceVersion, as after a long disconnection.
        # (Change nothing until the stream is closed: an event on it would move the resourceVersion on.)
        with inf._stream_lock:
            open_stream = inf._stream
        assert open_stream is not None
        inf._rv = "1"
        open_stream.close()
        kube.delete(CONFIGMAPS, "before", namespace)
        wait_until(lambda: "gone" in inf.relist_reasons, timeout=15, what="a relist after 410")
        wait_until(lambda: inf.get(f"{namespace}/before") is None, timeout=10, what="the relisted store")
        assert seen.of("before")[-1] == "delete"
        assert inf.list_count >= 2
        kube.create(CONFIGMAPS, cm("after"), namespace)
        wait_until(lambda: inf.get(f"{namespace}/after") is not None, timeout=10, what="events after the relist")
    finally:
        inf.stop()


def test_informer_recovers_after_apiserver_restart_without_missing_objects(
    control_plane: ControlPlane, kube: KubeClient, namespace: str
) -> None:
    inf = Informer(kube, CONFIGMAPS, namespace, backoff=FAST)
    seen = Seen()
    inf.add_handler(seen.add, seen.update, seen.delete)
    inf.start()
    created: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        """Create objects before, during (retrying) and after the restart."""
        i = 0
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            name = f"w-{i}"
            try:
                kube.create(CONFIGMAPS, cm(name), namespace, timeout=(1.0, 5.0))
            except ApiError as exc:
                if exc.already_exists:
                    created.append(name)
                    i += 1
                else:
                    stop.wait(0.1)
                continue
            created.append(name)
            i += 1
            stop.wait(0.05)

    t = threading.Thread(target=writer, daemon=True)
    try:
        assert inf.wait_for_sync(10)
        t.start()
        wait_until(lambda: len(created) >= 5, timeout=20, what="writes before the restart")
        control_plane.restart_apiserver(downtime=1.0)
        before_after = len(created)
        wait_until(lambda: len(created) >= before_after + 10, timeout=60, what="writes after the restart")
        stop.set()
        t.join(10)
        kube.delete(CONFIGMAPS, created[0], namespace)
        wait_until(lambda: inf.get(f"{namespace}/{created[0]}") is None, timeout=30, what="a delete after restart")
        server_items, _ = kube.list_all(CONFIGMAPS, namespace)
        server_keys = {object_key(o) for o in server_items}
        wait_until(lambda: set(inf.keys()) == server_keys, timeout=30, what="the store to match the server")
        missing = set(created) - seen.added()
        assert not missing, f"objects created around the restart never reached the handlers: {sorted(missing)}"
        assert inf.watch_count >= 2, "the watch must have been re-established"
    finally:
        stop.set()
        inf.stop()


def test_pod_informer_with_field_selector(kube: KubeClient, namespace: str) -> None:
    pod = {
        "metadata": {"name": "p1", "labels": {"app": "vllm"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
    }
    kube.create(PODS, pod, namespace)
    kube.create(PODS, dict(pod, metadata={"name": "p2"}), namespace)
    inf = Informer(kube, PODS, namespace, field_selector="metadata.name=p1", backoff=FAST)
    inf.start()
    try:
        assert inf.wait_for_sync(10)
        assert inf.keys() == [f"{namespace}/p1"]
        assert inf.get(f"{namespace}/p1")["kind"] == "Pod"  # type: ignore[index]
    finally:
        inf.stop()
        for name in ("p1", "p2"):
            kube.delete(PODS, name, namespace, grace_period_seconds=0, ignore_not_found=True)


def test_event_recorder_writes_and_aggregates_repeats(kube: KubeClient, namespace: str) -> None:
    obj = kube.create(CONFIGMAPS, cm("target"), namespace)
    events = Informer(kube, EVENTS, namespace, backoff=FAST)
    events.start()
    recorder = EventRecorder(kube, "lora-autoscaler-test", instance="test-1")
    try:
        assert events.wait_for_sync(10)
        for _ in range(5):
            recorder.normal(obj, "AdapterLoaded", "loaded lora-1 on pod-a")
        recorder.warning(obj, "LoadFailed", "x" * 5000)  # too long: truncated, not refused
        recorder.event({"kind": "Nothing"}, "Normal", "Bad", "no name")  # bad input: logged, not raised
        assert recorder.flush(15)

        def by_reason(reason: str) -> list[dict]:
            return [e for e in events.list() if e.get("reason") == reason]

        wait_until(lambda: len(by_reason("AdapterLoaded")) == 1 and by_reason("LoadFailed"), timeout=10, what="events")
        loaded = by_reason("AdapterLoaded")[0]
        assert loaded["regarding"]["uid"] == obj["metadata"]["uid"]
        assert loaded["regarding"]["kind"] == "ConfigMap"
        assert loaded["reportingController"] == "lora-autoscaler-test" and loaded["type"] == "Normal"
        count = (loaded.get("series") or {}).get("count", 1)
        if count < 5:  # the first write may have gone out before the repeats; the series catches up
            recorder.normal(obj, "AdapterLoaded", "loaded lora-1 on pod-a")
            assert recorder.flush(15)
            wait_until(
                lambda: (by_reason("AdapterLoaded")[0].get("series") or {}).get("count", 1) == 6,
                timeout=10,
                what="the series count",
            )
        assert len(by_reason("AdapterLoaded")) == 1, "repeats must update one Event, not create more"
        failed = by_reason("LoadFailed")[0]
        assert failed["type"] == "Warning" and len(failed["note"].encode()) <= 1024
        assert recorder.failed == 0 and recorder.dropped == 0
    finally:
        recorder.close()
        events.stop()
