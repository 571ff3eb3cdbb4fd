"""The simulator accepts vLLM's own command line, so a pod spec written for vLLM starts it unchanged."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vllmsim.__main__ import main
from vllmsim.config import ConfigError, LoraModule, parse_args, split_unknown

REPO = Path(__file__).resolve().parents[2]


def test_vllm_serve_style_with_positional_model_and_lora_flags() -> None:
    cfg = parse_args(
        [
            "serve",
            "meta-llama/Llama-3.1-8B",
            "--port",
            "8123",
            "--host",
            "127.0.0.1",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "8",
            "--max-lora-rank",
            "32",
            "--max-num-seqs",
            "64",
            "--served-model-name",
            "llama",
            "llama-alias",
            "--disable-log-stats",
        ],
        environ={},
    )
    assert cfg.model == "meta-llama/Llama-3.1-8B"
    assert (cfg.port, cfg.host) == (8123, "127.0.0.1")
    assert cfg.enable_lora and cfg.max_loras == 2 and cfg.max_cpu_loras == 8 and cfg.max_lora_rank == 32
    assert cfg.max_num_seqs == 64
    assert cfg.served_names == ["llama", "llama-alias"]
    assert cfg.base_name == "llama"
    assert cfg.disable_log_stats


def test_model_flag_and_defaults() -> None:
    cfg = parse_args(["--model", "tiny"], environ={})
    assert cfg.model == "tiny" and cfg.base_name == "tiny"
    assert cfg.port == 8000 and cfg.host == "0.0.0.0"
    assert cfg.max_loras == 1 and cfg.cpu_lora_slots == 1 and cfg.max_lora_rank == 16
    assert cfg.max_num_seqs == 256
    assert not cfg.allow_runtime_lora_updating
    assert cfg.api_keys == []


def test_model_given_twice_differently_is_refused() -> None:
    with pytest.raises(ConfigError, match="model given twice"):
        parse_args(["a", "--model", "b"], environ={})
    assert parse_args(["a", "--model", "a"], environ={}).model == "a"


def test_unknown_vllm_flags_are_ignored_with_their_values() -> None:
    cfg = parse_args(
        [
            "serve",
            "--trust-remote-code",
            "tiny",
            "--dtype",
            "half",
            "--gpu-memory-utilization=0.9",
            "--enforce-eager",
            "-tp",
            "2",
            "--tensor-parallel-size",
            "2",
            "--enable-lora",
            "--max-loras",
            "3",
        ],
        environ={},
    )
    assert cfg.model == "tiny"
    assert cfg.enable_lora and cfg.max_loras == 3
    assert "--dtype" in cfg.ignored_flags and "half" in cfg.ignored_flags
    assert "--gpu-memory-utilization=0.9" in cfg.ignored_flags
    assert "-tp" in cfg.ignored_flags


def test_split_unknown_keeps_known_flags_in_order() -> None:
    kept, ignored = split_unknown(["m", "--port", "1", "--kv-cache-dtype", "fp8", "--foo"], {"--port"})
    assert kept == ["m", "--port", "1"]
    assert ignored == ["--kv-cache-dtype", "fp8", "--foo"]


def test_lora_modules_name_path_and_json_forms() -> None:
    cfg = parse_args(
        [
            "tiny",
            "--enable-lora",
            "--lora-modules",
            "a=/adapters/a",
            '{"name": "b", "path": "/adapters/b", "base_model_name": "tiny"}',
            "--lora-modules",
            "c=s3://bucket/c",
        ],
        environ={},
    )
    assert cfg.lora_modules == [
        LoraModule("a", "/adapters/a"),
        LoraModule("b", "/adapters/b"),
        LoraModule("c", "s3://bucket/c"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tiny", "--enable-lora", "--lora-modules", "nopath"], "expected name=path"),
        (["tiny", "--enable-lora", "--lora-modules", "{bad json"], "invalid JSON"),
        (["tiny", "--enable-lora", "--lora-modules", '{"name": "x"}'], "needs string 'name' and 'path'"),
        (["tiny", "--lora-modules", "a=/a"], "needs --enable-lora"),
        (["tiny", "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
        (["tiny", "--max-num-seqs", "0"], "max_num_seqs"),
        (["tiny", "--sim-time-scale", "0"], "time-scale"),
        (["tiny", "--sim-error-rate", "1.5"], "error-rate must be between 0 and 1"),
        (["tiny", "--port", "notaport"], "invalid command line"),
    ],
)
def test_bad_command_lines_get_specific_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv, environ={})


def test_env_vars_runtime_updating_and_api_key() -> None:
    assert parse_args(["t"], environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}).allow_runtime_lora_updating
    assert parse_args(["t"], environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}).allow_runtime_lora_updating
    assert not parse_args(["t"], environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"}).allow_runtime_lora_updating
    assert not parse_args(["t"], environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "yes"}).allow_runtime_lora_updating
    assert parse_args(["t"], environ={"VLLM_API_KEY": "k1"}).api_keys == ["k1"]
    assert parse_args(["t", "--api-key", "k2"], environ={"VLLM_API_KEY": "k1"}).api_keys == ["k2"]


def test_sim_flags() -> None:
    cfg = parse_args(
        [
            "t",
            "--sim-step-time",
            "0.02",
            "--sim-per-seq-step-time",
            "0.001",
            "--sim-prefill-time-per-token",
            "0.0005",
            "--sim-load-time",
            "2",
            "--sim-time-scale",
            "50",
            "--sim-check-paths",
            "--sim-fail-loads",
            "3",
            "--sim-error-rate",
            "0.25",
            "--sim-crash-after-requests",
            "10",
        ],
        environ={},
    )
    assert (cfg.step_time, cfg.per_seq_step_time, cfg.prefill_time_per_token) == (0.02, 0.001, 0.0005)
    assert (cfg.load_time, cfg.time_scale, cfg.check_paths) == (2.0, 50.0, True)
    assert cfg.faults.load_failures == 3 and cfg.faults.error_rate == 0.25
    assert cfg.faults.crash_after_requests == 10


def test_main_exits_2_with_the_reason_on_a_bad_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "1"]) == 2
    assert "max_cpu_loras (1) must be >= max_loras (4)" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, deadline: float) -> int:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except (urllib.error.URLError, ConnectionError) as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} not up: {last}")


def _start(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "vllmsim", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_process_starts_from_a_vllm_command_line_and_stops_on_sigterm() -> None:
    port = _free_port()
    proc = _start(
        ["serve", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "half", "--enable-lora",
         "--max-loras", "2", "--lora-modules", "a=/adapters/a"],
        {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
    )  # fmt: skip
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/health", time.monotonic() + 20) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            body = r.read().decode()
        assert '"id":"a"' in body and '"parent":"tiny"' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_injected_crash_exits_the_process_non_zero() -> None:
    port = _free_port()
    proc = _start(["tiny", "--host", "127.0.0.1", "--port", str(port), "--sim-crash-exit-code", "3"])
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", time.monotonic() + 20)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/sim/faults", data=b'{"crash": true}', method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        assert proc.wait(timeout=10) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_startup_lora_modules_are_validated_like_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text('{"r": 64}')
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["tiny", "--port", "0", "--enable-lora", "--lora-modules"]
    assert main([*base, f"w={wide}"]) == 2
    assert "LoRA rank 64 is greater than max_lora_rank 16" in capsys.readouterr().err
    assert main([*base, f"e={empty}"]) == 2
    assert "No adapter found" in capsys.readouterr().err
    assert main([*base, "tiny=/adapters/x"]) == 2
    assert "conflicts with a served base model" in capsys.readouterr().err
