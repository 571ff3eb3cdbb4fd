"""OpenAI-style error bodies, so clients of the router see the same shape of error as from vLLM itself."""

from __future__ import annotations

import orjson

# The OpenAI "type" for each status the router itself produces.
_TYPES: dict[int, str] = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestEntityTooLarge",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param, "code": status}}
    )


def sse_error_event(status: int, message: str) -> bytes:
    """An error as a server-sent event, the way vLLM ends a stream that failed after it started."""
    return b"data: " + error_body(status, message) + b"\n\ndata: [DONE]\n\n"
