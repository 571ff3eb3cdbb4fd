"""vLLM's runtime adapter API, as real vLLM answers it (see docs/vllm-facts.md).

Every call has a timeout and every answer is sorted into an outcome the lifecycle can act on: success
(including "already loaded" and "cannot be found" on unload), a transient failure worth retrying, or a
permanent one that retrying cannot fix and that must be said plainly in status. Matching uses stable
substrings, never whole messages: vLLM changed its wording (paths now read ``<path>``).
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import urllib3

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    OK = "ok"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class CallResult:
    """What one call to vLLM came to, with a message fit for status and Events."""

    outcome: Outcome
    message: str
    status: int | None = None
    reason: str = ""  # a CamelCase word for Events, e.g. RuntimeLoRAUpdatingOff

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True)
class PodModels:
    """What a pod's API server says it serves: the base model and the adapters with their sources."""

    base: str | None
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> root (its lora_path)


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(data.get("detail"), str):
            return data["detail"]
        if isinstance(data.get("message"), str):
            return data["message"]
    return body.decode("utf-8", "replace").strip()[:500]


def classify_load(status: int, body: bytes, pod: str) -> CallResult:
    """Sort an answer to ``POST /v1/load_lora_adapter`` into an outcome."""
    message = _error_message(body)
    lowered = message.lower()
    if 200 <= status < 300:
        return CallResult(Outcome.OK, message or "loaded", status)
    if "already been loaded" in lowered:
        return CallResult(Outcome.OK, "already loaded", status)
    if status == 404 and lowered in ("not found", ""):
        return CallResult(
            Outcome.PERMANENT,
            f"runtime LoRA updating is off on pod {pod}: its load route answers 404; start vLLM with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
            status,
            "RuntimeLoRAUpdatingOff",
        )
    if "greater than max_lora_rank" in lowered or "max_lora_rank" in lowered:
        return CallResult(Outcome.PERMANENT, f"adapter rank too large for pod {pod}: {message} (raise "
                          "--max-lora-rank)", status, "LoRARankTooLarge")
    if "conflicts with" in lowered and "base model" in lowered:
        return CallResult(Outcome.PERMANENT, f"adapter name clashes with the served base model: {message}",
                          status, "NameClashesWithBaseModel")
    if status == 404 or "no adapter found" in lowered:
        return CallResult(Outcome.PERMANENT, f"pod {pod} cannot see the adapter's source: {message}", status,
                          "SourceNotFound")
    if status in (400, 422):
        return CallResult(Outcome.PERMANENT, f"vLLM refused the load: {message}", status, "LoadRefused")
    if status in (401, 403):
        return CallResult(Outcome.PERMANENT, f"vLLM on pod {pod} refused the API key ({status}): check the "
                          "Secret in spec.vllm.apiKeySecretRef", status, "Unauthorized")
    return CallResult(Outcome.TRANSIENT, f"vLLM answered {status}: {message}", status, "LoadFailed")


def classify_unload(status: int, body: bytes, pod: str) -> CallResult:
    """Sort an answer to ``POST /v1/unload_lora_adapter``; an unknown name is already unloaded."""
    message = _error_message(body)
    lowered = message.lower()
    if 200 <= status < 300:
        return CallResult(Outcome.OK, message or "unloaded", status)
    if status == 404 and lowered in ("not found", ""):
        return CallResult(Outcome.PERMANENT, f"runtime LoRA updating is off on pod {pod}", status,
                          "RuntimeLoRAUpdatingOff")
    if "cannot be found" in lowered or status == 404:
        return CallResult(Outcome.OK, "not loaded", status)
    if status in (401, 403):
        return CallResult(Outcome.PERMANENT, f"vLLM on pod {pod} refused the API key ({status})", status,
                          "Unauthorized")
    return CallResult(Outcome.TRANSIENT, f"vLLM answered {status}: {message}", status, "UnloadFailed")


def parse_models(body: bytes) -> PodModels:
    """``GET /v1/models``: the base model has ``parent`` null; each adapter names its parent."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError("/v1/models did not answer a list under 'data'")
    base: str | None = None
    adapters: dict[str, str] = {}
    for entry in data["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        if entry.get("parent"):
            adapters[entry["id"]] = str(entry.get("root") or "")
        elif base is None:
            base = entry["id"]
    return PodModels(base, adapters)


class VLLMClient:
    """Calls one pod's vLLM server; one connection pool is shared across pods."""

    def __init__(self, *, timeout_seconds: float = 30.0, api_key: str | None = None, scheme: str = "http",
                 pool: urllib3.PoolManager | None = None) -> None:
        self._timeout = urllib3.Timeout(connect=min(5.0, timeout_seconds), read=timeout_seconds)
        self._pool = pool or urllib3.PoolManager(num_pools=256, maxsize=4, retries=False)
        self._api_key = api_key
        self._scheme = scheme

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _call(self, method: str, address: str, path: str, body: dict[str, Any] | None = None,
              timeout: urllib3.Timeout | None = None) -> tuple[int, bytes]:
        url = f"{self._scheme}://{address}{path}"
        response = self._pool.request(
            method, url, body=json.dumps(body).encode() if body is not None else None, headers=self._headers(),
            timeout=timeout or self._timeout, preload_content=True, redirect=False,
        )
        return response.status, response.data

    def load(self, address: str, pod: str, name: str, source: str, *, in_place: bool = False) -> CallResult:
        body: dict[str, Any] = {"lora_name": name, "lora_path": lora_path(source)}
        if in_place:
            body["load_inplace"] = True
        try:
            status, data = self._call("POST", address, "/v1/load_lora_adapter", body)
        except urllib3.exceptions.HTTPError as exc:
            return CallResult(Outcome.TRANSIENT, f"cannot reach vLLM on pod {pod} at {address}: {_short(exc)}",
                              None, "PodUnreachable")
        return classify_load(status, data, pod)

    def unload(self, address: str, pod: str, name: str) -> CallResult:
        try:
            status, data = self._call("POST", address, "/v1/unload_lora_adapter", {"lora_name": name})
        except urllib3.exceptions.HTTPError as exc:
            return CallResult(Outcome.TRANSIENT, f"cannot reach vLLM on pod {pod} at {address}: {_short(exc)}",
                              None, "PodUnreachable")
        return classify_unload(status, data, pod)

    def models(self, address: str) -> PodModels:
        """What the pod serves; raises on an unreachable pod or a malformed answer."""
        status, data = self._call("GET", address, "/v1/models", timeout=urllib3.Timeout(connect=2.0, read=5.0))
        if status != 200:
            raise ValueError(f"/v1/models answered {status}: {_error_message(data)}")
        return parse_models(data)

    def metrics(self, address: str, timeout: float = 2.0) -> str:
        """The pod's Prometheus text; raises on an unreachable pod or a non-200 answer."""
        status, data = self._call("GET", address, "/metrics", timeout=urllib3.Timeout(connect=1.0, read=timeout))
        if status != 200:
            raise ValueError(f"/metrics answered {status}")
        return data.decode("utf-8", "replace")


def lora_path(source: str) -> str:
    """What vLLM gets as ``lora_path``: a local path or a Hugging Face id as is, other schemes unchanged.

    ``file:///a/b`` -> ``/a/b``; ``hf://org/name`` -> ``org/name``; ``s3://...`` and others are passed through
    for a resolver on the pod.
    """
    if source.startswith("file://"):
        return source[len("file://"):]
    if source.startswith("hf://"):
        return source[len("hf://"):]
    return source


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
