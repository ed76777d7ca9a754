"""One JSON line per finished connection. Lines are buffered and written
every 200 ms (and at shutdown), not one write syscall each: under connection
churn that syscall was a visible share of a proxy's CPU."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

FLUSH_EVERY = 0.2


class AccessLog:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self._lines: list[str] = []

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"ts": round(time.time(), 3), **{k: v for k, v in fields.items() if v is not None}}
        self._lines.append(json.dumps(record, separators=(",", ":"), default=str))
        if len(self._lines) >= 1000:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full log must never take traffic down


access_log = AccessLog()


def log_connection(**fields: Any) -> None:
    access_log.write(fields)
