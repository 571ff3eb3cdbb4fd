"""One test per fact of "vLLM behaviour, as measured" (vLLM 0.32, CPU build, runtime LoRA updating on).

Runs against an in-process simulator by default and against a real vLLM when VLLM_URL is set (see conftest).
Assertions match on the stable substrings the file names, not on whole messages with paths.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from vllmsim.promtext import Sample, adapter_list, newest_lora_info, value
from vllmsim.testing import InFlight, Response, Target


def _err(r: Response) -> dict[str, Any]:
    """The OpenAI-style error object, checking its envelope."""
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    return err


def need_adapter(vllm: Target) -> str:
    """The loadable adapter path, or skip."""
    if vllm.adapter_path is None:
        pytest.skip("needs VLLM_ADAPTER_PATH: a LoRA adapter the server can load")
    return vllm.adapter_path


def need_max_loras(vllm: Target, wanted: int) -> None:
    """Skip unless the server runs with this --max-loras (the facts were measured with 2)."""
    if vllm.max_loras is None:
        pytest.skip("needs VLLM_MAX_LORAS: the server's --max-loras")
    if vllm.max_loras != wanted:
        pytest.skip(f"fact measured with --max-loras {wanted}, server has {vllm.max_loras}")


# ---- Runtime adapter API ---------------------------------------------------------------------------------


def test_load_answers_200_with_a_plain_text_success_line(vllm: Target) -> None:
    name = vllm.unique()
    r = vllm.load(name, need_adapter(vllm))
    assert r.status == 200
    assert r.text == f"Success: LoRA adapter '{name}' added successfully."


def test_loading_the_same_name_again_is_400_already_loaded(vllm: Target) -> None:
    name = vllm.unique()
    path = need_adapter(vllm)
    assert vllm.load(name, path).status == 200
    r = vllm.load(name, path)
    assert r.status == 400
    err = _err(r)
    assert err["type"] == "InvalidUserInput"
    assert err["code"] == 400
    assert err["param"] is None
    assert "already been loaded" in err["message"]
    assert "load_inplace" in err["message"]


def test_load_inplace_with_another_path_succeeds_and_models_shows_the_new_root(vllm: Target) -> None:
    path = need_adapter(vllm)
    if vllm.alt_adapter_path is None:
        pytest.skip("needs VLLM_ADAPTER_PATH_ALT: a second adapter path for the in-place reload")
    name = vllm.unique()
    assert vllm.load(name, path).status == 200
    r = vllm.load(name, vllm.alt_adapter_path, load_inplace=True)
    assert r.status == 200
    cards = {m["id"]: m for m in vllm.get("/v1/models").json()["data"]}
    assert cards[name]["root"] == vllm.alt_adapter_path


def test_missing_path_is_404_no_adapter_found(vllm: Target) -> None:
    name = vllm.unique()
    r = vllm.load(name, f"/nonexistent/{name}")
    assert r.status == 404
    err = _err(r)
    assert err["type"] == "NotFoundError"
    assert err["code"] == 404
    assert f"Loading lora {name} failed" in err["message"]
    assert "No adapter found" in err["message"]


def test_body_without_lora_path_is_400_bad_request_naming_the_field(vllm: Target) -> None:
    r = vllm.post("/v1/load_lora_adapter", {"lora_name": vllm.unique()})
    assert r.status == 400
    err = _err(r)
    assert err["type"] == "Bad Request"
    assert err["param"] == "body.lora_path"


def test_body_not_json_is_400_json_decode_error(vllm: Target) -> None:
    r = vllm.post("/v1/load_lora_adapter", raw=b"{not json")
    assert r.status == 400
    err = _err(r)
    assert err["type"] == "Bad Request"
    assert "JSON decode error" in err["message"]


def test_unload_answers_200_with_a_plain_text_success_line(vllm: Target) -> None:
    name = vllm.unique()
    assert vllm.load(name, need_adapter(vllm)).status == 200
    r = vllm.post("/v1/unload_lora_adapter", {"lora_name": name})
    assert r.status == 200
    assert r.text == f"Success: LoRA adapter '{name}' removed successfully."
    vllm.loaded.remove(name)
    ids = [m["id"] for m in vllm.get("/v1/models").json()["data"]]
    assert name not in ids


def test_unload_of_an_unknown_name_is_404_cannot_be_found(vllm: Target) -> None:
    r = vllm.post("/v1/unload_lora_adapter", {"lora_name": "nope-never-loaded"})
    assert r.status == 404
    err = _err(r)
    assert err == {
        "message": "The lora adapter 'nope-never-loaded' cannot be found.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


def test_models_lists_the_base_with_null_parent_and_adapters_with_parent_and_root(vllm: Target) -> None:
    path = need_adapter(vllm)
    name = vllm.unique()
    assert vllm.load(name, path).status == 200
    r = vllm.get("/v1/models")
    assert r.status == 200
    body = r.json()
    assert body["object"] == "list"
    cards = {m["id"]: m for m in body["data"]}
    assert cards[vllm.base]["parent"] is None
    assert cards[name]["parent"] == vllm.base
    assert cards[name]["root"] == path
    assert cards[name]["object"] == "model"


def test_completion_for_an_adapter_not_loaded_is_404_does_not_exist(vllm: Target) -> None:
    r = vllm.post("/v1/completions", {"model": "lora-never-loaded", "prompt": "hi", "max_tokens": 2})
    assert r.status == 404
    err = _err(r)
    assert err["type"] == "NotFoundError"
    assert err["param"] == "model"
    assert err["code"] == 404
    assert err["message"].startswith("The model `lora-never-loaded` does not exist.")
    assert vllm.base in err["message"]  # "Valid aliases: <base>."


def test_health_is_200_with_an_empty_body(vllm: Target) -> None:
    r = vllm.get("/health")
    assert r.status == 200
    assert r.body == b""


def test_more_adapters_can_be_loaded_than_max_loras(vllm: Target) -> None:
    path = need_adapter(vllm)
    if vllm.max_loras is None:
        pytest.skip("needs VLLM_MAX_LORAS: the server's --max-loras")
    names = [vllm.unique() for _ in range(vllm.max_loras + 2)]
    for n in names:
        assert vllm.load(n, path).status == 200
    ids = {m["id"] for m in vllm.get("/v1/models").json()["data"]}
    assert set(names) <= ids


# ---- Metrics ---------------------------------------------------------------------------------------------


def _lora_series(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.name == "vllm:lora_requests_info"]


def test_no_lora_requests_info_samples_before_the_first_request(vllm: Target) -> None:
    r = vllm.get("/metrics")
    assert r.status == 200
    assert "# HELP vllm:lora_requests_info Running stats on lora requests." in r.text
    assert "# TYPE vllm:lora_requests_info gauge" in r.text
    series = _lora_series(vllm.metrics())
    if series and not vllm.is_sim:
        pytest.skip("the real server has served requests already: start it fresh to check this fact")
    assert series == []


def test_lora_requests_info_is_a_timestamp_per_label_set_and_old_series_linger(
    vllm: Target, inflight: InFlight
) -> None:
    path = need_adapter(vllm)
    a, b = vllm.unique("a"), vllm.unique("b")
    assert vllm.load(a, path).status == 200
    assert vllm.load(b, path).status == 200
    inflight.send_in_order([a])
    vllm.wait_until(lambda: _newest_lists(vllm) == [a], f"{a} running")
    inflight.send_in_order([b])
    vllm.wait_until(lambda: sorted(_newest_lists(vllm)) == sorted([a, b]), f"{a} and {b} running")
    samples = vllm.metrics()
    series = _lora_series(samples)
    labels = {s.labels["running_lora_adapters"]: s.value for s in series}
    assert a in labels  # the older label set is still there
    newest = newest_lora_info(samples)
    assert newest is not None
    assert labels[a] < newest.value  # ... with its older time
    assert abs(newest.value - time.time()) < 60  # the value is a Unix time
    assert newest.labels["max_lora"] == str(vllm.max_loras) if vllm.max_loras else True


def _newest_lists(vllm: Target) -> list[str]:
    newest = newest_lora_info(vllm.metrics())
    return adapter_list(newest.labels["running_lora_adapters"]) if newest else []


def test_the_two_adapter_lists_carry_the_same_names_without_counts(vllm: Target, inflight: InFlight) -> None:
    path = need_adapter(vllm)
    a = vllm.unique("a")
    assert vllm.load(a, path).status == 200
    inflight.send_in_order([a, a, a])
    vllm.wait_until(lambda: _newest_lists(vllm) == [a], f"{a} running")
    for s in _lora_series(vllm.metrics()):
        assert s.labels["running_lora_adapters"] == s.labels["waiting_lora_adapters"]
        assert adapter_list(s.labels["running_lora_adapters"]).count(a) <= 1  # names only, no counts


def test_adapters_starved_by_the_lora_budget_are_in_neither_list_and_counted_deferred(
    vllm: Target, inflight: InFlight
) -> None:
    """4 long requests for lora-0 and lora-1, 2 for lora-2, --max-loras 2: lora-2 absent, deferred == 2."""
    need_max_loras(vllm, 2)
    path = need_adapter(vllm)
    l0, l1, l2 = vllm.unique("l0"), vllm.unique("l1"), vllm.unique("l2")
    for n in (l0, l1, l2):
        assert vllm.load(n, path).status == 200
    inflight.send_in_order([l0, l0, l1, l1, l2, l2])
    vllm.wait_until(lambda: vllm.running_waiting() == (4.0, 2.0), "4 running and 2 waiting")
    m = vllm.metrics()
    assert value(m, "vllm:num_requests_waiting_by_reason", reason="deferred") == 2.0
    assert value(m, "vllm:num_requests_waiting_by_reason", reason="capacity") == 0.0
    newest = newest_lora_info(m)
    assert newest is not None
    running = adapter_list(newest.labels["running_lora_adapters"])
    waiting = adapter_list(newest.labels["waiting_lora_adapters"])
    assert sorted(running) == sorted([l0, l1])
    assert l2 not in running and l2 not in waiting


def test_four_adapters_on_max_loras_two_run_eight_and_defer_four(vllm: Target, inflight: InFlight) -> None:
    need_max_loras(vllm, 2)
    path = need_adapter(vllm)
    names = [vllm.unique(f"l{i}") for i in range(4)]
    for n in names:
        assert vllm.load(n, path).status == 200
    plan = [names[0]] * 4 + [names[1]] * 4 + [names[2]] * 2 + [names[3]] * 2
    inflight.send_in_order(plan)
    vllm.wait_until(lambda: vllm.running_waiting() == (8.0, 4.0), "8 running and 4 waiting")
    m = vllm.metrics()
    assert value(m, "vllm:num_requests_waiting_by_reason", reason="deferred") == 4.0
    newest = newest_lora_info(m)
    assert newest is not None
    assert sorted(adapter_list(newest.labels["running_lora_adapters"])) == sorted(names[:2])


def test_waiting_by_reason_sums_to_waiting(vllm: Target, inflight: InFlight) -> None:
    need_max_loras(vllm, 2)
    path = need_adapter(vllm)
    names = [vllm.unique(f"l{i}") for i in range(3)]
    for n in names:
        assert vllm.load(n, path).status == 200
    inflight.send_in_order([names[0], names[1], names[2]])
    vllm.wait_until(lambda: vllm.running_waiting() == (2.0, 1.0), "2 running and 1 waiting")
    m = vllm.metrics()
    total = value(m, "vllm:num_requests_waiting")
    parts = [s.value for s in m if s.name == "vllm:num_requests_waiting_by_reason"]
    assert sorted(s.labels["reason"] for s in m if s.name == "vllm:num_requests_waiting_by_reason") == [
        "capacity",
        "deferred",
    ]
    assert sum(parts) == total


def test_after_the_last_request_the_newest_series_has_empty_lists(vllm: Target, inflight: InFlight) -> None:
    path = need_adapter(vllm)
    a = vllm.unique("a")
    assert vllm.load(a, path).status == 200
    r = vllm.post("/v1/completions", {"model": a, "prompt": "hi", "max_tokens": 3})
    assert r.status == 200
    vllm.wait_until(lambda: _newest_lists(vllm) == [], "the newest series to empty")
    newest = newest_lora_info(vllm.metrics())
    assert newest is not None
    assert newest.labels["running_lora_adapters"] == ""
    assert newest.labels["waiting_lora_adapters"] == ""


def test_kv_cache_usage_perc_is_exposed_under_its_new_name(vllm: Target) -> None:
    m = vllm.metrics()
    v = value(m, "vllm:kv_cache_usage_perc", model_name=vllm.base)
    assert v is not None
    assert 0.0 <= v <= 1.0


def test_requests_through_an_adapter_are_counted_under_the_base_model_name(vllm: Target) -> None:
    path = need_adapter(vllm)
    a = vllm.unique("a")
    assert vllm.load(a, path).status == 200
    before = value(vllm.metrics(), "vllm:request_success_total", model_name=vllm.base, finished_reason="length")
    r = vllm.post("/v1/completions", {"model": a, "prompt": "hi", "max_tokens": 2, "ignore_eos": True})
    assert r.status == 200

    def counted() -> bool:
        after = value(vllm.metrics(), "vllm:request_success_total", model_name=vllm.base, finished_reason="length")
        return after is not None and after >= (before or 0.0) + 1

    vllm.wait_until(counted, "the success counter to count the adapter request")
    m = vllm.metrics()
    for s in m:
        if s.name.startswith("vllm:") and "model_name" in s.labels:
            assert s.labels["model_name"] != a
            assert not any(v == a for k, v in s.labels.items() if k not in ("running_lora_adapters",))
    names = {s.name for s in m}
    for family in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert f"{family}_count" in names
        assert (value(m, f"{family}_count", model_name=vllm.base) or 0) >= 1


def test_disable_log_stats_removes_every_vllm_metric(vllm: Target, variant: Callable[..., Target]) -> None:
    if not vllm.is_sim:
        pytest.skip("needs a second real server started with --disable-log-stats")
    quiet = variant(disable_log_stats=True)
    assert quiet.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status == 200
    r = quiet.get("/metrics")
    assert r.status == 200
    assert "vllm:" not in r.text


def test_without_runtime_lora_updating_the_load_routes_do_not_exist(
    vllm: Target, variant: Callable[..., Target]
) -> None:
    if not vllm.is_sim:
        pytest.skip("needs a second real server started without VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    off = variant(allow_runtime_lora_updating=False)
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = off.post(route, {"lora_name": "x", "lora_path": "/x"})
        assert r.status == 404
        assert r.json() == {"detail": "Not Found"}


def test_rank_above_max_lora_rank_is_500_with_the_rank_message(vllm: Target) -> None:
    if vllm.high_rank_path is None:
        pytest.skip("needs VLLM_ADAPTER_PATH_HIGH_RANK: an adapter whose rank exceeds --max-lora-rank")
    r = vllm.load(vllm.unique(), vllm.high_rank_path)
    assert r.status == 500
    assert "is greater than max_lora_rank" in _err(r)["message"]
    if vllm.is_sim:
        assert "LoRA rank 32 is greater than max_lora_rank 8" in _err(r)["message"]


def test_a_name_equal_to_the_served_base_model_is_refused_400(vllm: Target) -> None:
    r = vllm.load(vllm.base, need_adapter(vllm))
    assert r.status == 400
    assert "conflicts with a served base model" in _err(r)["message"]


def test_loading_beyond_max_cpu_loras_is_not_an_error(vllm: Target) -> None:
    path = need_adapter(vllm)
    if vllm.max_cpu_loras is None:
        pytest.skip("needs VLLM_MAX_CPU_LORAS: the server's --max-cpu-loras")
    names = [vllm.unique() for _ in range(vllm.max_cpu_loras + 1)]
    for n in names:
        assert vllm.load(n, path).status == 200
    # the evicted one is reloaded from its path on its next request
    r = vllm.post("/v1/completions", {"model": names[0], "prompt": "hi", "max_tokens": 2})
    assert r.status == 200


# ---- Responses and streams -------------------------------------------------------------------------------


def _sse(text: str) -> list[str]:
    """The data payloads of a server-sent event stream, checking the framing on the way."""
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for ev in events[:-1]:
        assert ev.startswith("data: "), ev
        assert "\n" not in ev
        payloads.append(ev[len("data: ") :])
    return payloads


def test_streamed_completion_is_sse_json_chunks_ending_done(vllm: Target) -> None:
    path = need_adapter(vllm)
    a = vllm.unique("a")
    assert vllm.load(a, path).status == 200
    r = vllm.post("/v1/completions", {"model": a, "prompt": "hi", "max_tokens": 4, "stream": True, "ignore_eos": True})
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = _sse(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks
    for c in chunks:
        assert c["id"].startswith("cmpl-")
        assert c["object"] == "text_completion"
        assert c["model"] == a
        assert isinstance(c["created"], int)
        choice = c["choices"][0]
        assert choice["index"] == 0
        assert {"text", "logprobs", "finish_reason", "stop_reason"} <= set(choice)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "system_fingerprint" in chunks[-1]


def test_streamed_chat_starts_with_the_assistant_role_then_content_deltas(vllm: Target) -> None:
    if not vllm.chat:
        pytest.skip("needs VLLM_CHAT=1: a model with a chat template (vLLM refuses chat without one)")
    r = vllm.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "ignore_eos": True},
    )
    assert r.status == 200
    payloads = _sse(r.text)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["id"].startswith("chatcmpl-")
    for c in chunks[1:]:
        assert set(c["choices"][0]["delta"]) == {"content"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_plain_completion_shape_echoes_the_adapter_name_with_usage(vllm: Target) -> None:
    path = need_adapter(vllm)
    a = vllm.unique("a")
    assert vllm.load(a, path).status == 200
    r = vllm.post("/v1/completions", {"model": a, "prompt": "hi there", "max_tokens": 3, "ignore_eos": True})
    assert r.status == 200
    body = r.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == a
    choice = body["choices"][0]
    assert choice["index"] == 0 and isinstance(choice["text"], str)
    assert choice["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 3
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_plain_chat_shape(vllm: Target) -> None:
    if not vllm.chat:
        pytest.skip("needs VLLM_CHAT=1: a model with a chat template (vLLM refuses chat without one)")
    r = vllm.post(
        "/v1/chat/completions",
        {"model": vllm.base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True},
    )
    assert r.status == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == vllm.base
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert body["usage"]["completion_tokens"] == 3
