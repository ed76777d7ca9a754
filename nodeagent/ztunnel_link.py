"""The agent's end of the control channel to ztunnel (docs/protocol.md):
one JSON line out, one JSON line back."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from meshnode.core.contracts import CONTROL_PROTOCOL_VERSION as PROTOCOL_VERSION

log = logging.getLogger("meshnode.nodeagent.ztunnel")



class ZtunnelLink:
    def __init__(self, path: str) -> None:
        self.path = path

    def send(self, msg: dict[str, Any], timeout: float = 10.0) -> tuple[bool, str]:
        """(True, "") on ack; (False, why) on nack or when ztunnel is unreachable."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.path)
                s.sendall(json.dumps({"v": PROTOCOL_VERSION, **msg}).encode() + b"\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except OSError as exc:
            return False, f"ztunnel not reachable on {self.path}: {exc.strerror or exc}"
        try:
            answer = json.loads(reply)
        except ValueError:
            return False, f"ztunnel answered something that is not JSON: {reply[:100]!r}"
        if answer.get("type") == "ack":
            return True, ""
        return False, f"ztunnel refused the change: {answer.get('error', answer)}"

    def push_snapshot(self, doc: dict[str, Any], timeout: float = 10.0) -> tuple[bool, str]:
        return self.send({"type": "snapshot", "version": doc["version"], "state": doc}, timeout)
