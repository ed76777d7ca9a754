"""One JSON line per finished connection, on the ``meshnode.access`` logger."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

access_log = logging.getLogger("meshnode.access")


def log_connection(**fields: Any) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    record = {"ts": round(time.time(), 3), **{k: v for k, v in fields.items() if v is not None}}
    access_log.info(json.dumps(record, separators=(",", ":"), default=str))
