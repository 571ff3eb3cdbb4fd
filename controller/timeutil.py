"""RFC 3339 times as Kubernetes writes them, and back; the decision code gets ``now`` as a number."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(ts: float) -> str:
    """Seconds since the epoch -> ``2026-01-02T03:04:05Z`` (the precision of Kubernetes' metav1.Time)."""
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(ts: float) -> str:
    """With microseconds, for fields where ordering within a second matters."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 string -> seconds since the epoch; None or garbage -> None (never raises)."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
