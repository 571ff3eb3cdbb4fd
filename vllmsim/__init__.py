"""A vLLM replica simulator: vLLM's HTTP behaviour (OpenAI routes, runtime LoRA API, metrics) over a modelled
engine, at the cost of a few megabytes, for tests, demos and benchmarks of the LoRA autoscaler."""

from .config import ConfigError, FaultSettings, LoraModule, SimConfig, parse_args
from .engine import Engine, EngineParams, Request
from .server import Simulator

__all__ = [
    "ConfigError",
    "Engine",
    "EngineParams",
    "FaultSettings",
    "LoraModule",
    "Request",
    "SimConfig",
    "Simulator",
    "parse_args",
]
