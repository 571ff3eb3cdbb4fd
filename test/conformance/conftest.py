"""Fixtures of the conformance suite: one target vLLM, simulated in-process by default or real via env vars.

Against a real vLLM set ``VLLM_URL`` (e.g. ``http://127.0.0.1:8000``) and, as available:
``VLLM_MODEL`` (served base name; default: the first model without a parent in /v1/models),
``VLLM_ADAPTER_PATH`` (a loadable adapter, as the server sees it), ``VLLM_ADAPTER_PATH_ALT`` (a second one, for
in-place reload), ``VLLM_ADAPTER_PATH_HIGH_RANK`` (rank above --max-lora-rank), ``VLLM_MAX_LORAS`` and
``VLLM_MAX_CPU_LORAS`` (the server's settings), ``VLLM_API_KEY``, ``VLLM_CHAT=1`` (the model has a chat
template). The server must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
Tests that need what is not given are skipped with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vllmsim import SimConfig
from vllmsim.background import BackgroundSimulator
from vllmsim.testing import InFlight, Target

SIM_CONFIG = SimConfig(
    model="tiny",
    host="127.0.0.1",
    port=0,
    enable_lora=True,
    max_loras=2,
    max_cpu_loras=8,
    max_lora_rank=8,
    allow_runtime_lora_updating=True,
    check_paths=True,  # like real vLLM: a missing path is an error
    time_scale=20.0,
)


def _adapter_dir(root: Path, name: str, rank: int) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes(b"")
    return str(d)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be an integer, got {raw!r}") from None


def _real_target() -> Target:
    url = os.environ["VLLM_URL"].rstrip("/")
    t = Target(url=url, base="", is_sim=False, api_key=os.environ.get("VLLM_API_KEY"))
    base = os.environ.get("VLLM_MODEL")
    if not base:
        r = t.get("/v1/models")
        if r.status != 200:
            raise pytest.UsageError(f"VLLM_URL {url}: GET /v1/models answered {r.status}")
        base = next(m["id"] for m in r.json()["data"] if m.get("parent") is None)
    t.base = base
    t.adapter_path = os.environ.get("VLLM_ADAPTER_PATH")
    t.alt_adapter_path = os.environ.get("VLLM_ADAPTER_PATH_ALT")
    t.high_rank_path = os.environ.get("VLLM_ADAPTER_PATH_HIGH_RANK")
    t.max_loras = _env_int("VLLM_MAX_LORAS")
    t.max_cpu_loras = _env_int("VLLM_MAX_CPU_LORAS")
    t.chat = os.environ.get("VLLM_CHAT", "") in ("1", "true", "True")
    return t


@pytest.fixture
def vllm(tmp_path: Path) -> Iterator[Target]:
    """The target: a fresh in-process simulator per test, or the real vLLM named by VLLM_URL."""
    if os.environ.get("VLLM_URL"):
        t = _real_target()
        try:
            yield t
        finally:
            t.cleanup()
        return
    with BackgroundSimulator(SIM_CONFIG) as sim:
        t = Target(
            url=sim.url,
            base="tiny",
            is_sim=True,
            adapter_path=_adapter_dir(tmp_path, "lora-a", 8),
            alt_adapter_path=_adapter_dir(tmp_path, "lora-b", 8),
            high_rank_path=_adapter_dir(tmp_path, "lora-wide", 32),
            max_loras=SIM_CONFIG.max_loras,
            max_cpu_loras=SIM_CONFIG.max_cpu_loras,
            chat=True,
            sim=sim,
        )
        try:
            yield t
        finally:
            t.cleanup()


@pytest.fixture
def variant(tmp_path: Path) -> Iterator[Callable[..., Target]]:
    """A simulator started with other settings (for facts that need a differently started server)."""
    sims: list[BackgroundSimulator] = []

    def make(**overrides: Any) -> Target:
        sim = BackgroundSimulator(replace(SIM_CONFIG, **overrides)).start()
        sims.append(sim)
        return Target(url=sim.url, base=sim.config.base_name, is_sim=True, sim=sim)

    try:
        yield make
    finally:
        for s in sims:
            s.stop()


@pytest.fixture
def inflight(vllm: Target) -> Iterator[InFlight]:
    """Long requests closed at teardown, then the server drained (bounded)."""
    f = InFlight(vllm)
    try:
        yield f
    finally:
        f.close()
        try:
            vllm.wait_until(lambda: sum(vllm.running_waiting()) == 0, "the server to drain", 60)
        except AssertionError:
            pass
