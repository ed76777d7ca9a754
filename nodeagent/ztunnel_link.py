"""The agent's end of the control channel to ztunnel (docs/protocol.md):
one JSON line out, one JSON line back, both typed by meshnode.core.contracts;
and its reader of ztunnel's admin endpoints (:class:`ZtunnelAdmin`)."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from typing import Any

from meshnode.core.constants import ADMIN_PORT, READY_PORT
from meshnode.core.contracts import (
    Ack,
    ContractError,
    ControlMessage,
    Snapshot,
    SnapshotMessage,
    parse_control_reply,
)
from meshnode.core.contracts.report import ZTUNNEL_REPORT_PATH, EndpointHealth, TrafficEdge

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


class ZtunnelAdmin:
    """ztunnel's admin endpoints on loopback (readiness, the health report's
    ztunnel part), as the node agent reads them for its report to the control
    plane. Never through an HTTP proxy from the environment."""

    def __init__(
        self,
        admin: tuple[str, int] = ("127.0.0.1", ADMIN_PORT),
        readiness: tuple[str, int] = ("127.0.0.1", READY_PORT),
        timeout: float = 3.0,
    ) -> None:
        self.admin, self.readiness, self.timeout = admin, readiness, timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _get(self, where: tuple[str, int], path: str) -> tuple[int, bytes]:
        url = f"http://{where[0]}:{where[1]}{path}"
        try:
            with self._opener.open(url, timeout=self.timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except (OSError, ValueError) as exc:  # URLError is an OSError
            raise OSError(f"ztunnel's admin endpoint {url} is not reachable: {exc}") from None

    def ready(self) -> bool:
        try:
            return self._get(self.readiness, "/healthz/ready")[0] == 200
        except OSError:
            return False

    def report(self) -> tuple[list[EndpointHealth], list[TrafficEdge]]:
        """The endpoints as ztunnel's balancer sees them and its traffic edges.
        OSError when ztunnel is away; ContractError when the answer is not one."""
        status, body = self._get(self.admin, ZTUNNEL_REPORT_PATH)
        if status != 200:
            raise OSError(f"ztunnel's /report answered HTTP {status}")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ContractError(f"ztunnel's /report is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ContractError("ztunnel's /report is not a JSON object")
        endpoints = [
            EndpointHealth.from_dict(e, f"ztunnel report.endpoints[{i}]")
            for i, e in enumerate(_list(doc.get("endpoints")))
        ]
        edges = [
            TrafficEdge.from_dict(e, f"ztunnel report.edges[{i}]")
            for i, e in enumerate(_list(doc.get("edges")))
        ]
        return endpoints, edges


def _list(value: object) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ContractError(f"ztunnel's /report holds {type(value).__name__}, not a list")
    return value
