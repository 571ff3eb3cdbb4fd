"""The router's parsers: request bodies, route-table EndpointSlices, static route files, vLLM metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.labels import (
    ADAPTER_LABEL,
    AUTOSCALER_LABEL,
    BASE_MODEL_ANNOTATION,
    MODEL_ANNOTATION,
    ROLE_LABEL,
    TIER_LABEL,
)
from router.proxy import BadRequest, extract_model
from router.routes import Holder, RouteError, RouteTable, load_static_routes, parse_endpoint_slice
from router.scrape import parse_vllm_metrics

# --- request bodies ----------------------------------------------------------------------------------------


def test_extract_model_reads_the_model_field() -> None:
    assert extract_model(b'{"model": "lora-1", "prompt": "hi", "max_tokens": 3}') == "lora-1"
    assert extract_model('{"model": "l\u00f6ra"}'.encode()) == "l\u00f6ra"


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        (b"", "empty", None),
        (b"{not json", "not valid JSON", None),
        (b"[1, 2]", "JSON object", None),
        (b'{"prompt": "x"}', "no 'model'", "model"),
        (b'{"model": 3}', "non-empty string", "model"),
        (b'{"model": ""}', "non-empty string", "model"),
    ],
)
def test_extract_model_says_what_is_wrong(body: bytes, fragment: str, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        extract_model(body)
    assert fragment in str(info.value)
    assert info.value.param == param


# --- EndpointSlices ----------------------------------------------------------------------------------------


def make_slice(
    model: str,
    endpoints: list[tuple[str, str, bool | None]],
    *,
    tier: str = "preferred",
    role: str = "adapter",
    name: str | None = None,
    port: int = 8000,
    namespace: str = "ns",
) -> dict[str, Any]:
    """An EndpointSlice as the controller publishes it (endpoints: ip, pod name, ready)."""
    annotations = {MODEL_ANNOTATION: model}
    if role == "base":
        annotations[BASE_MODEL_ANNOTATION] = model
    eps = []
    for ip, pod, ready in endpoints:
        ep: dict[str, Any] = {"addresses": [ip], "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}}
        if ready is not None:
            ep["conditions"] = {"ready": ready}
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"demo-{model}-{tier}",
            "namespace": namespace,
            "labels": {
                ADAPTER_LABEL: model,
                AUTOSCALER_LABEL: "demo",
                ROLE_LABEL: role,
                TIER_LABEL: "base" if role == "base" else tier,
            },
            "annotations": annotations,
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": eps,
    }


def test_slice_keeps_ready_endpoints_with_pod_names() -> None:
    info = parse_endpoint_slice(
        make_slice(
            "lora-1", [("10.0.0.1", "vllm-0", True), ("10.0.0.2", "vllm-1", False), ("10.0.0.3", "vllm-2", None)]
        )
    )
    assert info.model == "lora-1"
    assert info.tier == "preferred"
    assert [(h.address, h.pod) for h in info.holders] == [("10.0.0.1:8000", "vllm-0"), ("10.0.0.3:8000", "vllm-2")]


def test_slice_model_comes_from_the_annotation_not_the_sanitised_label() -> None:
    obj = make_slice("Org/Adapter_1", [("10.0.0.1", "p", True)])
    obj["metadata"]["labels"][ADAPTER_LABEL] = "org-adapter-1"
    assert parse_endpoint_slice(obj).model == "Org/Adapter_1"


def test_base_slice_and_ipv6() -> None:
    obj = make_slice("tiny", [("fd00::1", "vllm-0", True)], role="base")
    info = parse_endpoint_slice(obj)
    assert info.role == "base"
    assert info.holders == (Holder("[fd00::1]:8000", "vllm-0", "base"),)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda o: o["metadata"].pop("annotations") and o["metadata"]["labels"].pop(ADAPTER_LABEL), "names no model"),
        (lambda o: o["metadata"]["labels"].__setitem__(TIER_LABEL, "gold"), "not preferred or fallback"),
        (lambda o: o.__setitem__("ports", []), "has no ports"),
        (lambda o: o.__setitem__("ports", [{"name": "a", "port": 1}, {"name": "b", "port": 2}]), "none is named"),
        (lambda o: o["endpoints"][0].__setitem__("addresses", []), "no addresses"),
        (lambda o: o["endpoints"][0].__setitem__("addresses", ["not-an-ip"]), "not an IP"),
    ],
)
def test_bad_slices_are_refused_with_a_reason(mutate: Any, fragment: str) -> None:
    obj = make_slice("lora-1", [("10.0.0.1", "p", True)])
    mutate(obj)
    with pytest.raises(RouteError, match=fragment):
        parse_endpoint_slice(obj)


def test_table_merges_slices_by_tier_and_forgets_deleted_ones() -> None:
    table = RouteTable()
    changes: list[int] = []
    table.add_listener(lambda: changes.append(table.version))
    pref = make_slice("lora-1", [("10.0.0.1", "a", True)], tier="preferred")
    fall = make_slice("lora-1", [("10.0.0.2", "b", True), ("10.0.0.1", "a", True)], tier="fallback")
    table.apply_slice(pref)
    table.apply_slice(fall)
    route = table.lookup("lora-1")
    assert route is not None
    assert [h.address for h in route.preferred] == ["10.0.0.1:8000"]
    assert [h.address for h in route.fallback] == ["10.0.0.2:8000"]  # a pod listed twice stays preferred
    # The preferred slice loses its endpoint; the route changes at once (pod a is still a fallback).
    table.apply_slice(make_slice("lora-1", [], tier="preferred"))
    route = table.lookup("lora-1")
    assert route is not None and [(h.pod, h.tier) for h in route.holders] == [("b", "fallback"), ("a", "fallback")]
    table.delete_slice(fall)
    table.delete_slice(pref)
    assert table.lookup("lora-1") is None
    assert len(changes) == 5


def test_empty_slice_keeps_the_model_known() -> None:
    table = RouteTable()
    table.apply_slice(make_slice("lora-1", []))
    route = table.lookup("lora-1")
    assert route is not None and route.holders == ()


def test_set_route_replaces_only_its_own_entries() -> None:
    table = RouteTable()
    table.apply_slice(make_slice("lora-1", [("10.0.0.9", "k", True)], tier="fallback"))
    table.set_route("lora-1", ["127.0.0.1:1"])
    table.set_route("lora-1", ["127.0.0.1:2"])
    route = table.lookup("lora-1")
    assert route is not None
    assert [h.address for h in route.preferred] == ["127.0.0.1:2"]
    assert [h.address for h in route.fallback] == ["10.0.0.9:8000"]
    table.remove_model("lora-1")
    assert table.models() == []


# --- static route files ------------------------------------------------------------------------------------


def test_static_routes_yaml_and_json(tmp_path: Path) -> None:
    y = tmp_path / "routes.yaml"
    y.write_text(
        "models:\n"
        "  tiny: {base: true, pods: ['127.0.0.1:8001', '127.0.0.2:8001']}\n"
        "  lora-1:\n"
        "    preferred: ['127.0.0.1:8001']\n"
        "    fallback: [{address: '127.0.0.2:8001', pod: vllm-1}]\n"
    )
    table = RouteTable()
    table.replace(load_static_routes(y))
    base = table.lookup("tiny")
    lora = table.lookup("lora-1")
    assert base is not None and base.is_base and len(base.holders) == 2
    assert lora is not None and not lora.is_base
    assert lora.fallback == (Holder("127.0.0.2:8001", "vllm-1", "fallback"),)
    j = tmp_path / "slices.json"
    j.write_text(json.dumps({"kind": "List", "items": [make_slice("lora-2", [("10.1.1.1", "p", True)])]}))
    table.replace(load_static_routes(j))
    assert table.models() == ["lora-2"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models: {a: {preferred: ['nohost']}}", "not host:port"),
        ("models: {a: {preferred: [3]}}", "each holder"),
        ("models: {a: {prefered: []}}", "unknown keys"),
        ("[1, 2]", "expected a mapping"),
        ("models: [: x", "neither JSON nor YAML"),
    ],
)
def test_static_routes_errors(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RouteError, match=fragment):
        load_static_routes(p)


# --- vLLM metrics ------------------------------------------------------------------------------------------

# Lines as measured on vLLM 0.32 (see the project's vLLM notes), plus a second engine.
METRICS = "\n".join(
    [
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1",waiting_lora_adapters="lora-1"} 1.7957724363150744e+09',  # noqa: E501
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1,lora-0",waiting_lora_adapters="lora-1,lora-0"} 1.795772437827656e+09',  # noqa: E501
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7957724274294972e+09',  # noqa: E501
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 1.0',
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 2.0',
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0',
        'vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0',
        'vllm:num_requests_running{engine="0",model_name="tiny"} 4.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25',
        'vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5',
        'vllm:num_requests_waiting_total{engine="0"} 99',
    ]
)


def test_metrics_take_the_newest_lora_series_and_sum_engines() -> None:
    m = parse_vllm_metrics(METRICS)
    assert m.running_adapters == {"lora-1", "lora-0"}
    assert m.waiting_adapters == {"lora-1", "lora-0"}
    assert m.max_loras == 2
    assert m.waiting == 4.0  # both engines, and not the unrelated _total series
    assert m.deferred == 2.0
    assert m.running == 4.0
    assert m.kv_usage == 0.5


def test_metrics_fall_back_to_the_old_kv_name_and_ignore_stale_lists_when_idle() -> None:
    text = (
        'vllm:gpu_cache_usage_perc{model_name="tiny"} 0.75\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",waiting_lora_adapters="a"} 5\n'
        'vllm:num_requests_running{model_name="tiny"} 0\n'
        "vllm:num_requests_waiting garbage\n"
    )
    m = parse_vllm_metrics(text)
    assert m.kv_usage == 0.75
    assert m.max_loras == 4
    assert m.running_adapters == frozenset()  # nothing runs: an old series' list is history


def test_metrics_labels_with_escapes() -> None:
    text = 'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a\\"b,c",waiting_lora_adapters=""} 2\n'
    text += "vllm:num_requests_running 1\n"
    assert parse_vllm_metrics(text).running_adapters == {'a"b', "c"}


def test_metrics_without_samples() -> None:
    m = parse_vllm_metrics("# HELP vllm:lora_requests_info x\n# TYPE vllm:lora_requests_info gauge\n")
    assert m.max_loras is None and m.running_adapters == frozenset() and m.waiting == 0
    assert m.samples == 0  # the scraper counts such a page as a failed scrape, not as an idle pod
    assert parse_vllm_metrics("<html>502 Bad Gateway</html>").samples == 0
    assert parse_vllm_metrics(METRICS).samples > 0


def test_the_scraper_reports_unknown_for_pods_that_fail_or_answer_with_something_else() -> None:
    """A page without vLLM's series counts as a failed scrape: after three, the pod's state is unknown."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from router.scrape import PodMetrics, Scraper

    pages = {"good": METRICS, "html": "<html>502 Bad Gateway</html>"}

    async def body() -> dict[str, list[PodMetrics | None]]:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=pages[request.headers["X-Page"]])

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stored: dict[str, list[PodMetrics | None]] = {"good": [], "html": []}
        try:
            async with aiohttp.ClientSession() as session:
                for page in pages:
                    def store(_addr: str, m: PodMetrics | None, page: str = page) -> None:
                        stored[page].append(m)

                    scraper = Scraper(session, lambda: {f"127.0.0.1:{port}": "p"}, store,
                                      headers={"X-Page": page}, max_failures=3)
                    for _ in range(4):
                        await scraper.scrape_once()
        finally:
            await runner.cleanup()
        return stored

    stored = asyncio.run(body())
    assert len(stored["good"]) == 4 and all(m is not None and m.waiting == 4.0 for m in stored["good"])
    assert stored["html"] == [None, None]  # nothing for the first two failures, then unknown
