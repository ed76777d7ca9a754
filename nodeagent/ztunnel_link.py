"""The agent's end of the control channel to ztunnel (docs/protocol.md):
one JSON line out, one JSON line back, both typed by meshnode.core.contracts."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from meshnode.core.contracts import (
    Ack,
    ContractError,
    ControlMessage,
    Snapshot,
    SnapshotMessage,
    parse_control_reply,
)

log = logging.getLogger("meshnode.nodeagent.ztunnel")


class ZtunnelLink:
    def __init__(self, path: str) -> None:
        self.path = path

    def send(self, message: ControlMessage, timeout: float = 10.0) -> tuple[bool, str]:
        """(True, "") on ack; (False, why) on nack or when ztunnel is unreachable."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.path)
                s.sendall(json.dumps(message.to_json()).encode() + b"\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except OSError as exc:
            return False, f"ztunnel not reachable on {self.path}: {exc.strerror or exc}"
        try:
            answer = parse_control_reply(json.loads(reply))
        except ValueError as exc:  # not JSON, or not a reply (ContractError)
            return False, f"ztunnel answered something unexpected ({exc}): {reply[:100]!r}"
        if isinstance(answer, Ack):
            if answer.version != message.version:
                return False, (
                    f"ztunnel acknowledged version {answer.version}, not {message.version}"
                )
            return True, ""
        return False, f"ztunnel refused the change: {answer.error}"

    def push_snapshot(
        self, snap: Snapshot | dict[str, Any], timeout: float = 10.0
    ) -> tuple[bool, str]:
        """Send a whole snapshot (a typed one, or its JSON as written to disk)."""
        if not isinstance(snap, Snapshot):
            try:
                snap = Snapshot.from_json(snap)
            except ContractError as exc:
                return False, f"the snapshot is not valid, not sent: {exc}"
        return self.send(SnapshotMessage(snap.version, snap), timeout)
