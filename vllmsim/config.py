"""Simulator settings and the vLLM-compatible command line.

The simulator must start from a pod spec written for real vLLM, so it accepts ``vllm serve MODEL [flags]``,
understands the flags that change behaviour it models, and ignores (with a debug log) every other vLLM flag.
Simulator-only settings carry a ``--sim-`` prefix so they can never clash with a vLLM flag.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson

log = logging.getLogger("vllmsim")

DEFAULT_MODEL = "facebook/opt-125m"


class ConfigError(ValueError):
    """A setting that real vLLM would refuse at start-up (the process exits with this message)."""


@dataclass
class LoraModule:
    """One ``--lora-modules`` entry: an adapter loaded at start-up (it survives restarts, unlike runtime loads)."""

    name: str
    path: str


@dataclass
class FaultSettings:
    """Injected faults; settable by flags at start and through ``POST /sim/faults`` at run time."""

    load_failures: int = 0
    """The next N load calls fail with 500."""
    load_failures_by_adapter: dict[str, int] = field(default_factory=dict)
    """Per adapter name: its next N load calls fail with 500."""
    load_delay: float = 0.0
    """Extra (simulated) seconds added to every load call."""
    error_rate: float = 0.0
    """Fraction of inference requests answered with ``error_status`` (deterministic, seeded)."""
    error_count: int = 0
    """The next N inference requests are answered with ``error_status``."""
    error_status: int = 500
    crash_after_requests: int = 0
    """Crash when this many more inference requests have arrived (0 = never)."""
    crash_exit_code: int = 1
    unhealthy: bool = False
    """``GET /health`` answers 503 while set."""

    def to_dict(self) -> dict[str, object]:
        """JSON view for ``GET /sim/faults``."""
        return {
            "load_failures": self.load_failures,
            "load_failures_by_adapter": dict(self.load_failures_by_adapter),
            "load_delay": self.load_delay,
            "error_rate": self.error_rate,
            "error_count": self.error_count,
            "error_status": self.error_status,
            "crash_after_requests": self.crash_after_requests,
            "crash_exit_code": self.crash_exit_code,
            "unhealthy": self.unhealthy,
        }

    def update(self, data: Mapping[str, object]) -> None:
        """Apply a partial JSON update; reject unknown keys and bad types with a specific message."""
        for key, value in data.items():
            if key == "crash":
                continue  # handled by the server: an immediate crash, not a setting
            if key not in _FAULT_TYPES:
                raise ValueError(f"unknown fault setting {key!r}; known: {sorted(_FAULT_TYPES)}")
            kind = _FAULT_TYPES[key]
            if kind is dict:
                if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in value.items()
                ):
                    raise ValueError(f"{key} must be an object of adapter name -> non-negative integer")
                self.load_failures_by_adapter = {str(k): int(v) for k, v in value.items()}
            elif kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
                setattr(self, key, value)
            elif kind is int:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative integer")
                setattr(self, key, value)
            else:
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                if key == "error_rate" and value > 1:
                    raise ValueError("error_rate must be between 0 and 1")
                setattr(self, key, float(value))
        if not 400 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP error status (400-599)")


_FAULT_TYPES: dict[str, type] = {
    "load_failures": int,
    "load_failures_by_adapter": dict,
    "load_delay": float,
    "error_rate": float,
    "error_count": int,
    "error_status": int,
    "crash_after_requests": int,
    "crash_exit_code": int,
    "unhealthy": bool,
}


@dataclass
class SimConfig:
    """Everything one simulated vLLM replica needs; built from the command line or directly in Python."""

    model: str = DEFAULT_MODEL
    served_model_names: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    enable_lora: bool = False
    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    lora_modules: list[LoraModule] = field(default_factory=list)
    max_num_seqs: int = 256
    max_model_len: int | None = None
    api_keys: list[str] = field(default_factory=list)
    disable_log_stats: bool = False
    allow_runtime_lora_updating: bool = False
    # simulator-only
    step_time: float = 0.005
    per_seq_step_time: float = 0.0001
    prefill_time_per_token: float = 0.00002
    load_time: float = 0.02
    time_scale: float = 1.0
    kv_cache_tokens: int = 262144
    check_paths: bool = False
    log_requests: bool = False
    max_events: int = 100_000
    seed: int = 0
    faults: FaultSettings = field(default_factory=FaultSettings)
    ignored_flags: list[str] = field(default_factory=list)

    @property
    def base_name(self) -> str:
        """The first served name: metrics and adapter parents use it."""
        return self.served_model_names[0] if self.served_model_names else self.model

    @property
    def served_names(self) -> list[str]:
        """Every name a client may send as ``model`` for the base model."""
        return list(self.served_model_names) if self.served_model_names else [self.model]

    @property
    def cpu_lora_slots(self) -> int:
        """``--max-cpu-loras`` defaults to ``--max-loras`` as in vLLM."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def validate(self) -> None:
        """Refuse what real vLLM refuses at start-up, plus nonsense simulator settings."""
        if self.max_loras < 1:
            raise ConfigError(f"max_loras ({self.max_loras}) must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank ({self.max_lora_rank}) must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs ({self.max_num_seqs}) must be >= 1")
        if self.lora_modules and not self.enable_lora:
            raise ConfigError("--lora-modules needs --enable-lora")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if self.time_scale <= 0:
            raise ConfigError("--sim-time-scale must be > 0")
        for name in ("step_time", "per_seq_step_time", "prefill_time_per_token", "load_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--sim-{name.replace('_', '-')} must be >= 0")
        if self.kv_cache_tokens < 1:
            raise ConfigError("--sim-kv-cache-tokens must be >= 1")


def env_flag(value: str | None) -> bool:
    """vLLM's reading of boolean env vars such as VLLM_ALLOW_RUNTIME_LORA_UPDATING: ``1`` or ``true``."""
    return value is not None and value.strip().lower() in ("1", "true")


# vLLM flags that take no value: an unknown flag is assumed to take one value unless it is listed here,
# so that ``--trust-remote-code MODEL`` keeps MODEL as the positional model.
_BOOLEAN_VLLM_FLAGS = frozenset(
    [
        "--async-scheduling",
        "--disable-async-output-proc",
        "--disable-cascade-attn",
        "--disable-custom-all-reduce",
        "--disable-fastapi-docs",
        "--disable-frontend-multiprocessing",
        "--disable-log-requests",
        "--disable-sliding-window",
        "--disable-uvicorn-access-log",
        "--enable-auto-tool-choice",
        "--enable-chunked-prefill",
        "--enable-dbo",
        "--enable-eplb",
        "--enable-expert-parallel",
        "--enable-force-include-usage",
        "--enable-log-outputs",
        "--enable-log-requests",
        "--enable-lora-bias",
        "--enable-mm-embeds",
        "--enable-prefix-caching",
        "--enable-prompt-embeds",
        "--enable-prompt-tokens-details",
        "--enable-request-id-headers",
        "--enable-server-load-tracking",
        "--enable-sleep-mode",
        "--enable-tokenizer-info-endpoint",
        "--enforce-eager",
        "--fully-sharded-loras",
        "--headless",
        "--no-enable-chunked-prefill",
        "--no-enable-lora",
        "--no-enable-prefix-caching",
        "--no-trust-remote-code",
        "--return-tokens-as-token-ids",
        "--skip-tokenizer-init",
        "--trust-remote-code",
        "--use-v2-block-manager",
    ]
)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-sim",
        description="A vLLM replica simulator: vLLM's OpenAI API, runtime LoRA API and metrics, "
        "with a modelled engine instead of a GPU.",
        allow_abbrev=False,
    )
    p.add_argument("positional_model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", nargs="+", action="extend", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--lora-modules", nargs="+", action="extend", default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--api-key", nargs="+", action="extend", default=None)
    p.add_argument("--disable-log-stats", action="store_true")
    s = p.add_argument_group("simulator-only settings")
    s.add_argument("--sim-step-time", type=float, default=0.005, help="base seconds per engine step")
    s.add_argument(
        "--sim-per-seq-step-time", type=float, default=0.0001, help="extra seconds per running request per step"
    )
    s.add_argument(
        "--sim-prefill-time-per-token", type=float, default=0.00002, help="seconds per prompt token prefilled"
    )
    s.add_argument("--sim-load-time", type=float, default=0.02, help="seconds to load one adapter")
    s.add_argument(
        "--sim-time-scale",
        type=float,
        default=1.0,
        help="run this many times faster than real time (all modelled durations are divided by it)",
    )
    s.add_argument("--sim-kv-cache-tokens", type=int, default=262144, help="KV cache capacity in tokens")
    s.add_argument(
        "--sim-check-paths",
        action="store_true",
        help="refuse adapter paths that do not exist on disk (default: accept them as symbolic sources)",
    )
    s.add_argument("--sim-log-requests", action="store_true", help="log each request in /sim/events")
    s.add_argument("--sim-max-events", type=int, default=100_000, help="bound of the /sim/events log")
    s.add_argument("--sim-seed", type=int, default=0, help="seed of the injected error draw")
    s.add_argument("--sim-fail-loads", type=int, default=0, help="the first N load calls fail with 500")
    s.add_argument("--sim-load-delay", type=float, default=0.0, help="extra seconds added to every load")
    s.add_argument("--sim-error-rate", type=float, default=0.0, help="fraction of requests answered 5xx")
    s.add_argument("--sim-error-count", type=int, default=0, help="the first N requests are answered 5xx")
    s.add_argument("--sim-error-status", type=int, default=500, help="status of injected errors")
    s.add_argument(
        "--sim-crash-after-requests", type=int, default=0, help="exit (non-zero) when the Nth request arrives"
    )
    s.add_argument("--sim-crash-exit-code", type=int, default=1)
    s.add_argument("--log-level", default="info", help="simulator log level (debug shows ignored flags)")
    return p


_PARSER_CACHE: list[argparse.ArgumentParser] = []


def _parser() -> argparse.ArgumentParser:
    if not _PARSER_CACHE:
        _PARSER_CACHE.append(_build_parser())
    return _PARSER_CACHE[0]


def _known_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(o for o in action.option_strings if o.startswith("--"))
    return flags


def split_unknown(argv: Sequence[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Separate the flags this simulator knows from the vLLM flags it ignores.

    An unknown ``--flag`` takes the next token as its value unless the flag is a known vLLM boolean or the next
    token is itself a flag; ``--flag=value`` is always one token.
    """
    kept: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and tok != "--":
            name = tok.split("=", 1)[0]
            if name in known:
                kept.append(tok)  # argparse consumes its values from the following tokens
                i += 1
                continue
            ignored.append(tok)
            i += 1
            # a value follows unless the flag is a boolean or the next token is a flag
            if "=" not in tok and name not in _BOOLEAN_VLLM_FLAGS and i < len(argv) and not argv[i].startswith("-"):
                ignored.append(argv[i])
                i += 1
            continue
        if tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            # short options (vLLM has -tp, -pp, -O ...): ignore with their value
            ignored.append(tok)
            i += 1
            if i < len(argv) and not argv[i].startswith("-"):
                ignored.append(argv[i])
                i += 1
            continue
        kept.append(tok)
        i += 1
    return kept, ignored


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def parse_lora_modules(values: Sequence[str]) -> list[LoraModule]:
    """Parse ``name=path`` and vLLM's JSON form ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    out: list[LoraModule] = []
    for raw in values:
        text = raw.strip()
        if text.startswith("{"):
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(f"--lora-modules: invalid JSON {raw!r}: {exc}") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("name"), str)
                or not isinstance(obj.get("path"), str)
            ):
                raise ConfigError(f"--lora-modules: JSON form needs string 'name' and 'path': {raw!r}")
            out.append(LoraModule(obj["name"], obj["path"]))
            continue
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora-modules: expected name=path or JSON, got {raw!r}")
        out.append(LoraModule(name, path))
    return out


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> SimConfig:
    """Build a validated SimConfig from a vLLM-style command line (raises ConfigError on bad input)."""
    env = os.environ if environ is None else environ
    args_in = list(argv)
    if args_in and args_in[0] == "serve":
        args_in = args_in[1:]
    parser = _parser()
    kept, ignored = split_unknown(args_in, _known_flags(parser))
    try:
        ns, extra = parser.parse_known_args(kept)
    except SystemExit as exc:  # argparse already printed the reason (or the help: exit 0)
        if exc.code == 0:
            raise
        raise ConfigError(f"invalid command line: {' '.join(args_in)}") from exc
    if extra:
        ignored.extend(extra)
    if ignored:
        log.debug("ignoring vLLM flags the simulator does not model: %s", " ".join(ignored))
    if ns.positional_model and ns.model and ns.positional_model != ns.model:
        raise ConfigError(f"model given twice: {ns.positional_model!r} and --model {ns.model!r}")
    model = ns.positional_model or ns.model or DEFAULT_MODEL
    api_keys = list(ns.api_key or [])
    if not api_keys and env.get("VLLM_API_KEY"):
        api_keys = [env["VLLM_API_KEY"]]
    faults = FaultSettings(
        load_failures=ns.sim_fail_loads,
        load_delay=ns.sim_load_delay,
        error_rate=ns.sim_error_rate,
        error_count=ns.sim_error_count,
        error_status=ns.sim_error_status,
        crash_after_requests=ns.sim_crash_after_requests,
        crash_exit_code=ns.sim_crash_exit_code,
    )
    try:
        faults.update({})  # range checks
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= ns.sim_error_rate <= 1:
        raise ConfigError("--sim-error-rate must be between 0 and 1")
    cfg = SimConfig(
        model=model,
        served_model_names=list(ns.served_model_name or []),
        host=ns.host or "0.0.0.0",
        port=ns.port,
        enable_lora=ns.enable_lora,
        max_loras=ns.max_loras,
        max_cpu_loras=ns.max_cpu_loras,
        max_lora_rank=ns.max_lora_rank,
        lora_modules=parse_lora_modules(ns.lora_modules or []),
        max_num_seqs=ns.max_num_seqs,
        max_model_len=ns.max_model_len,
        api_keys=api_keys,
        disable_log_stats=ns.disable_log_stats,
        allow_runtime_lora_updating=env_flag(env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")),
        step_time=ns.sim_step_time,
        per_seq_step_time=ns.sim_per_seq_step_time,
        prefill_time_per_token=ns.sim_prefill_time_per_token,
        load_time=ns.sim_load_time,
        time_scale=ns.sim_time_scale,
        kv_cache_tokens=ns.sim_kv_cache_tokens,
        check_paths=ns.sim_check_paths,
        log_requests=ns.sim_log_requests,
        max_events=ns.sim_max_events,
        seed=ns.sim_seed,
        faults=faults,
        ignored_flags=ignored,
    )
    cfg.validate()
    return cfg


def log_level(argv: Sequence[str]) -> str:
    """The ``--log-level`` value, read before full parsing so that parse-time debug logs show."""
    for i, tok in enumerate(argv):
        if tok.startswith("--log-level="):
            return tok.split("=", 1)[1]
        if tok == "--log-level" and i + 1 < len(argv):
            return argv[i + 1]
    return "info"
