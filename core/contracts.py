"""The wire contracts between meshnode's components, defined once.

- the ztunnel snapshot (agent -> ztunnel), schema ``SNAPSHOT_SCHEMA``;
- the control messages on ztunnel's Unix socket (agent <-> ztunnel), version
  ``CONTROL_PROTOCOL_VERSION``.

docs/protocol.md describes them and points here.
"""

from __future__ import annotations

__all__ = ["CONTROL_PROTOCOL_VERSION", "SNAPSHOT_SCHEMA"]

SNAPSHOT_SCHEMA = 1
CONTROL_PROTOCOL_VERSION = 1
