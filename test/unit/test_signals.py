# ruff: noqa: E501
"""The load signal's parsing and estimates, on the lines real vLLM prints (shared/vllm-behaviour.md)."""

from __future__ import annotations

import json

import pytest

from controller.signals import (
    CombinedSource,
    LoadSnapshot,
    MetricsFormatError,
    PodSample,
    PodTarget,
    VLLMScrapeSource,
    WaitingLoraAdaptersSource,
    estimate_from_vllm,
    parse_router_load,
    parse_vllm_metrics,
)

# Copied from a real vLLM 0.32 with 4 long requests for lora-0 and lora-1 and 2 requests for lora-2,
# --max-loras 2: lora-2 is starved and appears in neither list.
REAL_SAMPLE = """\
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1",waiting_lora_adapters="lora-1"} 1.7957724363150744e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1,lora-0",waiting_lora_adapters="lora-1,lora-0"} 1.795772437827656e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7957724274294972e+09
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0
"""
NOW = 1.795772438e9


def test_newest_series_wins_and_counts_are_read():
    sample = parse_vllm_metrics(REAL_SAMPLE, NOW)
    assert sample.running_adapters == {"lora-0", "lora-1"}
    assert sample.waiting_adapters == {"lora-0", "lora-1"}
    assert sample.max_lora == 2
    assert (sample.running, sample.waiting, sample.deferred) == (4.0, 2.0, 2.0)
    assert sample.kv_usage == 0.0
    assert sample.lists_age is not None and sample.lists_age < 1


def test_stale_lists_are_ignored():
    sample = parse_vllm_metrics(REAL_SAMPLE, NOW + 60, max_age=10)
    assert sample.running_adapters == frozenset()
    assert sample.lists_age is not None and sample.lists_age > 50


def test_no_samples_before_first_request():
    text = "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n"
    sample = parse_vllm_metrics(text, NOW)
    assert sample.running_adapters == frozenset() and sample.lists_age is None


def test_old_kv_metric_name_is_a_fallback():
    text = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse_vllm_metrics(text, NOW).kv_usage == 0.5


@pytest.mark.parametrize("bad", ['vllm:num_requests_running{engine="0" 4\n', "{{{\n", 'x{a="b"} notanumber\n'])
def test_malformed_text_is_a_clear_error(bad):
    with pytest.raises(MetricsFormatError, match="malformed"):
        parse_vllm_metrics(bad, NOW)


def test_starved_adapter_gets_the_deferred_requests():
    target = PodTarget("pod-a", "127.0.0.2:8000", frozenset({"lora-0", "lora-1", "lora-2"}))
    estimate = estimate_from_vllm(target, parse_vllm_metrics(REAL_SAMPLE, NOW))
    assert estimate["lora-2"] == pytest.approx(2.0)  # the 2 deferred requests
    assert estimate["lora-0"] == pytest.approx(2.0) and estimate["lora-1"] == pytest.approx(2.0)


def test_waiting_lists_alone_cannot_see_the_starved_adapter():
    target = PodTarget("pod-a", "127.0.0.2:8000", frozenset({"lora-0", "lora-1", "lora-2"}))
    source = WaitingLoraAdaptersSource(lambda _address: REAL_SAMPLE)
    try:
        snap = source.collect([target], NOW)
    finally:
        source.close()
    assert snap.outstanding["lora-2"]["pod-a"] == 0.0
    assert snap.outstanding["lora-0"]["pod-a"] == pytest.approx(3.0)


def test_one_unreachable_pod_does_not_blind_the_others():
    def fetch(address: str) -> str:
        if address.startswith("127.0.0.3"):
            raise ConnectionError("refused")
        return REAL_SAMPLE

    source = VLLMScrapeSource(fetch)
    try:
        snap = source.collect(
            [PodTarget("a", "127.0.0.2:8000", frozenset({"lora-0"})), PodTarget("b", "127.0.0.3:8000", frozenset())],
            NOW,
        )
    finally:
        source.close()
    assert "a" in snap.pods and "b" not in snap.pods
    assert len(snap.errors) == 1 and "refused" in snap.errors[0]


def test_per_replica_divides_by_routable_holders():
    snap = LoadSnapshot({"x": {"a": 6.0, "b": 2.0}})
    assert snap.per_replica("x", ["a", "b"]) == 4.0
    assert snap.per_replica("unknown", ["a"]) is None


def test_router_load_parsing_and_combination():
    body = json.dumps({"adapters": {"x": {"queued": 1, "pods": {"a": {"in_flight": 3, "queued": 0}}}}}).encode()
    assert parse_router_load(body) == {"x": {"a": 3.0, "<router-queue>": 1.0}}
    with pytest.raises(ValueError):
        parse_router_load(b"[]")

    class Fixed:
        def __init__(self, name: str, snap: LoadSnapshot) -> None:
            self.name, self._snap = name, snap

        def collect(self, targets, now):
            return self._snap

    vllm = Fixed("vllm", LoadSnapshot({"x": {"a": 1.0}, "y": {"a": 5.0}}, {"a": PodSample()}))
    router = Fixed("router", LoadSnapshot({"x": {"a": 3.0}}))
    snap = CombinedSource(router, vllm).collect([], NOW)
    assert snap.outstanding == {"x": {"a": 3.0}, "y": {"a": 5.0}}
    down = Fixed("router", LoadSnapshot(errors=("down",)))
    assert CombinedSource(down, vllm).collect([], NOW).outstanding["x"] == {"a": 1.0}
