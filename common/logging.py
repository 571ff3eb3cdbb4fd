"""One logging set-up for every component: plain text for people, JSON lines for log pipelines.

Why shared: the controller, router and webhook run side by side in one cluster, and their logs are read
together; the same fields in the same shape make that possible.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any `extra=` fields, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(
    level: str | int | None = None, *, json_format: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure the root logger: level from the argument or LOG_LEVEL, JSON from it or LOG_FORMAT=json.

    Quietens urllib3's per-connection chatter, which at DEBUG drowns everything else.
    """
    level = level if level is not None else os.environ.get("LOG_LEVEL", "INFO")
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}")
        level = resolved
    if json_format is None:
        json_format = os.environ.get("LOG_FORMAT", "").lower() == "json"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(max(level, logging.INFO))
