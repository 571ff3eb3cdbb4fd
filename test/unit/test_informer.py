"""The informer against a small HTTP server speaking the API server's list and watch protocol.

The real API server is used in test/integration; this server exists for what the real one cannot be made
to do on demand: expire a resourceVersion (410, as an HTTP status and as an ERROR event), go silent
mid-stream, fail with 500s, or drop every watch at once.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s_client

from common.informer import Backoff, Informer, namespace_index, wait_for_cache_sync
from common.kube import PODS, ApiError, KubeClient

NS = "demo"


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pod(name: str, rv: int, *, ns: str = NS, uid: str | None = None, labels: dict[str, str] | None = None) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid or f"uid-{name}",
            "resourceVersion": str(rv),
            "labels": labels or {},
            "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"containers": [{"name": "c", "image": "vllm"}]},
    }


class FakeApi:
    """Objects, an event log with resourceVersions, compaction, and knobs for failure modes."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[str, dict] = {}
        self.log: list[tuple[int, str, dict]] = []
        self.compacted = 0  # watches from a resourceVersion below this get 410
        self.gone_as_event = False  # 410 as an ERROR event in a 200 stream rather than an HTTP status
        self.watch_fail_500 = 0  # answer the next N watches with 500
        self.silent_watches = 0  # the next N watches send headers and then nothing at all
        self.generation = 0  # bumping it drops every open watch abruptly
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.active_watches = 0
        self.shutting_down = False

    # --- mutations, as a client of the real API would cause them
    def _next(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, name: str, *, labels: dict[str, str] | None = None, uid: str | None = None) -> dict:
        with self.cond:
            rv = self._next()
            obj = pod(name, rv, labels=labels, uid=uid)
            etype = "MODIFIED" if name in self.objects and uid is None else "ADDED"
            self.objects[name] = obj
            self.log.append((rv, etype, obj))
            self.cond.notify_all()
            return obj

    def delete(self, name: str) -> None:
        with self.cond:
            obj = dict(self.objects.pop(name))
            rv = self._next()
            obj["metadata"] = {**obj["metadata"], "resourceVersion": str(rv)}
            self.log.append((rv, "DELETED", obj))
            self.cond.notify_all()

    def bookmark(self) -> None:
        with self.cond:
            rv = self._next()
            self.log.append(
                (rv, "BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}})
            )
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget history: any watch from before now gets 410."""
        with self.cond:
            self.compacted = self.rv
            self.cond.notify_all()

    def drop_watches(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.requests if k == kind)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeApi

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path != f"/api/v1/namespaces/{NS}/pods":
            self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": "no such path"})
            return
        if q.get("watch") == ["true"]:
            self.api.requests.append(("watch", q))
            self._watch(q)
        else:
            self.api.requests.append(("list", q))
            self._list(q)

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _list(self, q: dict[str, list[str]]) -> None:
        api = self.api
        limit = int(q.get("limit", ["0"])[0])
        with api.cond:
            if "continue" in q:
                rv, offset = (int(x) for x in q["continue"][0].split(":"))
                snapshot = sorted(api.objects)  # fine for a test: the continue stays consistent if nothing changes
            else:
                rv, offset = api.rv, 0
                snapshot = sorted(api.objects)
            names = snapshot[offset : offset + limit] if limit else snapshot[offset:]
            items = [{k: v for k, v in api.objects[n].items() if k not in ("kind", "apiVersion")} for n in names]
            more = limit and offset + limit < len(snapshot)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if more:
            meta["continue"] = f"{rv}:{offset + limit}"
        self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, q: dict[str, list[str]]) -> None:
        api = self.api
        start_rv = int(q.get("resourceVersion", ["0"])[0] or 0)
        timeout = float(q.get("timeoutSeconds", ["60"])[0])
        with api.cond:
            if api.watch_fail_500 > 0:
                api.watch_fail_500 -= 1
                fail: str | None = "500"
            elif start_rv < api.compacted:
                fail = "gone"
            else:
                fail = None
            silent = api.silent_watches > 0
            if silent:
                api.silent_watches -= 1
            generation = api.generation
        if fail == "500":
            self._json(500, {"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd is sad"})
            return
        if fail == "gone" and not api.gone_as_event:
            self._json(410, {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if fail == "gone":
            status = {"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired", "message": "too old"}
            self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
            self._chunk(b"")
            return
        deadline = time.monotonic() + timeout
        cursor = start_rv
        with api.cond:
            api.active_watches += 1
        try:
            while True:
                with api.cond:
                    while True:
                        if api.generation != generation or api.shutting_down:
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)  # abrupt, like a dying server
                            return
                        pending = [] if silent else [e for e in api.log if e[0] > cursor]
                        left = deadline - time.monotonic()
                        if pending or left <= 0:
                            break
                        api.cond.wait(min(left, 0.2))
                if not pending:
                    self._chunk(b"")  # the server-side timeout: a clean end of the stream
                    return
                for rv, etype, obj in pending:
                    body = {"type": etype, "object": {"kind": "Pod", "apiVersion": "v1", **obj}}
                    self._chunk(json.dumps(body).encode() + b"\n")
                    cursor = rv
        except OSError:
            return
        finally:
            with api.cond:
                api.active_watches -= 1


@pytest.fixture
def fake() -> Iterator[tuple[FakeApi, KubeClient]]:
    api = FakeApi()
    handler = type("BoundHandler", (Handler,), {"api": api})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    conf = k8s_client.Configuration()
    conf.host = f"http://127.0.0.1:{server.server_address[1]}"
    kube = KubeClient(k8s_client.ApiClient(conf), timeout=(2.0, 5.0))
    try:
        yield api, kube
    finally:
        with api.cond:
            api.shutting_down = True
            api.cond.notify_all()
        server.shutdown()
        server.server_close()


class Recorder:
    """Handler calls in order, as (kind, name, resourceVersion)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    @staticmethod
    def _id(obj: dict) -> tuple[str, str]:
        return obj["metadata"]["name"], obj["metadata"].get("resourceVersion", "")

    def add(self, obj: dict) -> None:
        with self.lock:
            self.calls.append(("add", *self._id(obj)))

    def update(self, old: dict, new: dict) -> None:
        with self.lock:
            self.calls.append(("update", *self._id(new)))

    def delete(self, obj: dict) -> None:
        with self.lock:
            self.calls.append(("delete", *self._id(obj)))

    def kinds(self, name: str) -> list[str]:
        with self.lock:
            return [k for k, n, _ in self.calls if n == name]

    def snapshot(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return list(self.calls)


FAST = Backoff(initial=0.02, factor=2.0, cap=0.2, jitter=0.1)


def make(kube: KubeClient, **kw: Any) -> Informer:
    kw.setdefault("backoff", FAST)
    return Informer(kube, PODS, NS, **kw)


def test_paginated_list_syncs_the_store_with_managed_fields_stripped(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    for i in range(7):
        api.put(f"p{i}")
    inf = make(kube, page_size=3)
    rec = Recorder()
    inf.add_handler(rec.add, rec.update, rec.delete)
    assert not inf.has_synced()
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        assert wait_for_cache_sync([inf], 1)
        assert sorted(o["metadata"]["name"] for o in inf.list()) == [f"p{i}" for i in range(7)]
        lists = [q for k, q in api.requests if k == "list"]
        assert len(lists) == 3 and all(q["limit"] == ["3"] for q in lists), "three pages of three"
        obj = inf.get(f"{NS}/p0")
        assert obj is not None
        assert "managedFields" not in obj["metadata"]
        assert obj["kind"] == "Pod" and obj["apiVersion"] == "v1", "list items get their type filled in"
        assert [k for k, _, _ in rec.snapshot()] == ["add"] * 7
        wait_until(lambda: api.count("watch") >= 1, what="the watch")
        watch_q = next(q for k, q in api.requests if k == "watch")
        assert watch_q["resourceVersion"] == [str(api.rv)]
        assert watch_q["allowWatchBookmarks"] == ["true"]
        assert 300 <= int(watch_q["timeoutSeconds"][0]) <= 600
    finally:
        inf.stop()


def test_transform_none_keeps_objects_as_received(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("p0")
    inf = make(kube, transform=None)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        obj = inf.get(f"{NS}/p0")
        assert obj is not None and obj["metadata"]["managedFields"]
    finally:
        inf.stop()


def test_watch_events_reach_store_indexes_and_handlers_in_order(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("a", labels={"app": "x"})
    inf = make(kube)
    inf.add_index("app", lambda o: [o["metadata"].get("labels", {}).get("app", "")])
    inf.add_index("ns", namespace_index)
    rec = Recorder()
    inf.add_handler(rec.add, rec.update, rec.delete)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        wait_until(lambda: api.active_watches == 1, what="the watch")
        api.put("b", labels={"app": "x"})
        api.put("a", labels={"app": "y"})
        api.delete("b")
        api.bookmark()
        wait_until(lambda: inf.resource_version == str(api.rv), what="the bookmark")
        assert rec.snapshot() == [
            ("add", "a", "101"),
            ("add", "b", "102"),
            ("update", "a", "103"),
            ("delete", "b", "104"),
        ]
        assert inf.keys() == [f"{NS}/a"]
        assert [o["metadata"]["name"] for o in inf.by_index("app", "y")] == ["a"]
        assert inf.by_index("app", "x") == [], "an update must move the object out of its old index value"
        assert len(inf.by_index("ns", NS)) == 1
        watched = inf.get(f"{NS}/a")
        assert watched is not None and "managedFields" not in watched["metadata"]
        assert api.count("list") == 1, "no relist when nothing went wrong"
    finally:
        inf.stop()


@pytest.mark.parametrize("as_event", [False, True], ids=["http-410", "error-event-410"])
def test_410_relists_and_synthesizes_deletes_and_adds(fake: tuple[FakeApi, KubeClient], as_event: bool) -> None:
    api, kube = fake
    for name in ("keep", "gone", "changed"):
        api.put(name)
    api.gone_as_event = as_event
    inf = make(kube)
    rec = Recorder()
    inf.add_handler(rec.add, rec.update, rec.delete)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        wait_until(lambda: api.active_watches == 1, what="the watch")
        # Changes the informer must not see as events: the watch is cut first and history is compacted.
        with api.cond:
            api.generation += 1
            api.silent_watches = 0
            api.cond.notify_all()
        wait_until(lambda: api.active_watches == 0, what="the watch to drop")
        with api.cond:
            api.watch_fail_500 = 1  # hold the next watch off briefly so the changes land in between
        api.delete("gone")
        api.put("changed")
        api.put("new")
        api.compact()
        wait_until(lambda: "gone" in inf.relist_reasons, what="a relist on 410")
        wait_until(lambda: inf.get(f"{NS}/new") is not None, what="the relisted store")
        assert inf.get(f"{NS}/gone") is None, "replace semantics: objects missing from the new list are deleted"
        assert rec.kinds("gone") == ["add", "delete"]
        assert rec.kinds("changed") == ["add", "update"]
        assert rec.kinds("new") == ["add"]
        assert rec.kinds("keep") == ["add"], "an unchanged object gets no spurious update on relist"
        assert api.count("list") == 2
        from prometheus_client import REGISTRY

        relists = REGISTRY.get_sample_value("lora_informer_relists_total", {"name": inf.name, "reason": "gone"})
        assert (relists or 0) >= 1
        assert REGISTRY.get_sample_value("lora_informer_objects", {"name": inf.name}) == len(inf) == 3
        # And it goes back to watching from the new list's resourceVersion.
        wait_until(lambda: api.active_watches == 1, what="the new watch")
        api.put("after")
        wait_until(lambda: inf.get(f"{NS}/after") is not None, what="an event after the relist")
    finally:
        inf.stop()


def test_uid_change_across_a_relist_is_a_delete_then_an_add(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("p", uid="one")
    inf = make(kube)
    rec = Recorder()
    inf.add_handler(rec.add, rec.update, rec.delete)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        wait_until(lambda: api.active_watches == 1, what="the watch")
        with api.cond:
            api.watch_fail_500 = 1
            api.generation += 1
            api.cond.notify_all()
        wait_until(lambda: api.active_watches == 0, what="the watch to drop")
        with api.cond:  # deleted and re-created, history lost
            api.objects["p"] = pod("p", api._next(), uid="two")
        api.compact()
        wait_until(lambda: (inf.get(f"{NS}/p") or {}).get("metadata", {}).get("uid") == "two", what="the relist")
        assert rec.kinds("p") == ["add", "delete", "add"]
    finally:
        inf.stop()


def test_dropped_watch_resumes_from_last_resource_version_without_relisting(
    fake: tuple[FakeApi, KubeClient],
) -> None:
    api, kube = fake
    api.put("a")
    inf = make(kube)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        wait_until(lambda: api.active_watches == 1, what="the watch")
        api.put("b")
        wait_until(lambda: inf.get(f"{NS}/b") is not None, what="b")
        api.drop_watches()
        api.put("c")  # lands while no watch is open; must still be delivered by the resumed watch
        wait_until(lambda: inf.get(f"{NS}/c") is not None, what="c after the drop")
        watches = [q for k, q in api.requests if k == "watch"]
        assert len(watches) >= 2
        assert watches[1]["resourceVersion"] == ["102"], "resume from the last event seen, not from the list"
        assert api.count("list") == 1
    finally:
        inf.stop()


def test_a_silent_stream_is_noticed_by_the_idle_timeout(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("a")
    api.silent_watches = 1
    inf = make(kube, idle_timeout=0.5)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        api.put("b")  # the silent watch never delivers this
        wait_until(lambda: inf.get(f"{NS}/b") is not None, timeout=10, what="b via a fresh watch")
        assert api.count("watch") >= 2
        assert api.count("list") == 1
        assert isinstance(inf.last_error, ApiError) and inf.last_error.status == 0
    finally:
        inf.stop()


def test_server_errors_back_off_then_recover(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("a")
    api.watch_fail_500 = 3
    inf = make(kube, backoff=Backoff(initial=0.1, factor=2.0, cap=1.0, jitter=0.0), relist_after_failures=10)
    started = time.monotonic()
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        wait_until(lambda: api.active_watches == 1, what="a watch after the failures")
        elapsed = time.monotonic() - started
        assert elapsed >= 0.1 + 0.2 + 0.4 - 0.05, f"three failures must back off 0.1+0.2+0.4s, took {elapsed:.2f}s"
        assert isinstance(inf.last_error, ApiError) and inf.last_error.status == 500
        assert inf.last_error.reason == "InternalError" and inf.last_error.message == "etcd is sad"
    finally:
        inf.stop()


def test_repeated_failures_force_a_relist(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("a")
    api.watch_fail_500 = 3
    inf = make(kube, relist_after_failures=2)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        wait_until(lambda: api.active_watches == 1, what="a watch")
        assert "failures" in inf.relist_reasons
        assert api.count("list") >= 2
    finally:
        inf.stop()


def test_stop_is_prompt_while_a_watch_is_open(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.put("a")
    inf = make(kube)
    inf.start()
    assert inf.wait_for_sync(5)
    wait_until(lambda: api.active_watches == 1, what="the watch")
    started = time.monotonic()
    inf.stop(timeout=5)
    assert time.monotonic() - started < 1.0
    assert inf._thread is not None and not inf._thread.is_alive()


def test_stop_is_prompt_during_backoff(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    api.watch_fail_500 = 100
    inf = make(kube, backoff=Backoff(initial=30.0, cap=30.0, jitter=0.0))
    inf.start()
    assert inf.wait_for_sync(5)
    wait_until(lambda: api.count("watch") >= 1, what="the failing watch")
    started = time.monotonic()
    inf.stop(timeout=5)
    assert time.monotonic() - started < 1.0


def test_handler_added_after_sync_replays_and_a_failing_handler_does_not_stop_others(
    fake: tuple[FakeApi, KubeClient],
) -> None:
    api, kube = fake
    api.put("a")
    inf = make(kube)

    def broken(obj: dict) -> None:
        raise RuntimeError("handler bug")

    inf.add_handler(on_add=broken)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        rec = Recorder()
        inf.add_handler(rec.add, rec.update, rec.delete)
        assert rec.kinds("a") == ["add"], "a late handler first hears of what is already stored"
        wait_until(lambda: api.active_watches == 1, what="the watch")
        api.put("b")
        wait_until(lambda: rec.kinds("b") == ["add"], what="b reaches the second handler despite the first failing")
    finally:
        inf.stop()


def test_index_added_after_sync_covers_existing_objects(fake: tuple[FakeApi, KubeClient]) -> None:
    api, kube = fake
    for i, app in zip(range(4), itertools.cycle(["x", "y"]), strict=False):
        api.put(f"p{i}", labels={"app": app})
    inf = make(kube)
    inf.start()
    try:
        assert inf.wait_for_sync(5)
        inf.add_index("app", lambda o: [o["metadata"]["labels"]["app"]])
        assert sorted(o["metadata"]["name"] for o in inf.by_index("app", "x")) == ["p0", "p2"]
        with pytest.raises(KeyError):
            inf.by_index("missing", "x")
        with pytest.raises(ValueError, match="already exists"):
            inf.add_index("app", lambda o: [])
    finally:
        inf.stop()


def test_bad_arguments_are_rejected_clearly(fake: tuple[FakeApi, KubeClient]) -> None:
    _, kube = fake
    with pytest.raises(ValueError, match="watch_timeout"):
        Informer(kube, PODS, NS, watch_timeout=(0, 10))
    with pytest.raises(ValueError, match="idle_timeout"):
        Informer(kube, PODS, NS, idle_timeout=0)
    inf = make(kube)
    inf.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            inf.start()
    finally:
        inf.stop()


def test_keep_fields_keeps_only_what_is_named_plus_identity() -> None:
    from common.informer import keep_fields

    obj = pod("p", 7, labels={"app": "x"})
    obj.update(kind="Pod", apiVersion="v1", status={"podIP": "10.0.0.1", "phase": "Running", "qosClass": "Burstable"})
    slim = keep_fields({"metadata": {"labels": True}, "status": {"podIP": True, "conditions": True}})(obj)
    assert slim == {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": "p", "namespace": NS, "uid": "uid-p", "resourceVersion": "7", "labels": {"app": "x"}},
        "status": {"podIP": "10.0.0.1"},
    }
    assert keep_fields({"spec": False})(obj).get("spec") is None
