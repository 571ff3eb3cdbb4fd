"""A small Prometheus text parser, so tests can read the simulator's (or a real vLLM's) ``/metrics``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    """One series value."""

    name: str
    labels: dict[str, str]
    value: float


def _unescape(v: str) -> str:
    return v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse(text: str) -> list[Sample]:
    """Every sample line of an exposition (comments skipped); raises ValueError on a malformed line."""
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"malformed metrics line: {line!r}")
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group(3) or "")}
        out.append(Sample(m.group(1), labels, float(m.group(4))))
    return out


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one series matching name and labels (None if absent)."""
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def newest_lora_info(samples: list[Sample]) -> Sample | None:
    """The current ``vllm:lora_requests_info`` series: the one with the largest (timestamp) value."""
    series = [s for s in samples if s.name == "vllm:lora_requests_info"]
    return max(series, key=lambda s: s.value) if series else None


def adapter_list(label_value: str) -> list[str]:
    """Split a comma-joined adapter list label ('' is the empty list)."""
    return [a for a in label_value.split(",") if a]
