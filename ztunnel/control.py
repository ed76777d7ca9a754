"""The agent -> ztunnel control channel: a Unix socket (0600) carrying JSON
lines, versioned (see docs/protocol.md). The agent sends a whole snapshot or
an add/delete of one workload or service; ztunnel answers ack once the change
is live, or nack with the reason (and keeps its previous state).

The message logic (`ControlState`) is pure: it keeps the current snapshot
document and turns messages into the next document or an error. The server
part only reads lines and calls ``apply``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from meshnode.core.contracts import (
    Ack,
    AddMessage,
    ContractError,
    DeleteMessage,
    Nack,
    Snapshot,
    SnapshotWorkload,
    parse_control_message,
)
from meshnode.core.errors import MeshnodeError
from meshnode.ztunnel.state import StateError, index_snapshot

log = logging.getLogger("meshnode.ztunnel.control")

MAX_LINE = 16 << 20  # a snapshot of a large mesh is a few MB at most


class ControlError(MeshnodeError, ValueError):
    pass


class ControlState:
    """The snapshot document as built by the messages so far."""

    def __init__(self, doc: dict[str, Any] | None = None) -> None:
        self.doc = doc

    def next_doc(self, msg: Any) -> tuple[int, dict[str, Any]]:
        """The document after `msg`, validated; raises ControlError."""
        try:
            message = parse_control_message(msg)
            if isinstance(message, AddMessage | DeleteMessage):
                if self.doc is None:
                    raise ControlError(f"{message.to_json()['type']} before any snapshot")
                snap = _patch(Snapshot.from_json(self.doc), message)
            else:
                snap = message.state
            index_snapshot(snap)  # what the proxy will do with it: must not fail
        except (ContractError, StateError) as exc:
            raise ControlError(str(exc)) from None
        return message.version, snap.to_json()


def _patch(snap: Snapshot, msg: AddMessage | DeleteMessage) -> Snapshot:
    """`snap` with one workload (key: name) or service (key: namespace/name)
    added, replaced or deleted, at the message's version."""
    kind = msg.kind
    if kind == "workload":
        workloads = [w for w in snap.workloads if w.name != _key(msg)]
        if isinstance(msg, DeleteMessage) and len(workloads) == len(snap.workloads):
            raise ControlError(f"delete: no workload {msg.key!r}")
        if isinstance(msg, AddMessage) and isinstance(msg.value, SnapshotWorkload):
            workloads.append(msg.value)
        return replace(snap, version=msg.version, workloads=tuple(workloads))
    services = [s for s in snap.services if s.key != _key(msg)]
    if isinstance(msg, DeleteMessage) and len(services) == len(snap.services):
        raise ControlError(f"delete: no service {msg.key!r}")
    if isinstance(msg, AddMessage) and not isinstance(msg.value, SnapshotWorkload):
        services.append(msg.value)
    return replace(snap, version=msg.version, services=tuple(services))


def _key(msg: AddMessage | DeleteMessage) -> str:
    if isinstance(msg, DeleteMessage):
        return msg.key
    return msg.value.name if isinstance(msg.value, SnapshotWorkload) else msg.value.key


class ControlServer:
    def __init__(
        self,
        path: str,
        state: ControlState,
        apply: Callable[[int, dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.path = path
        self.state = state
        self._apply = apply
        self._lock = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await self._handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except ValueError:
            return Nack(None, "not a JSON line").to_json()
        async with self._lock:  # one change at a time, in order
            try:
                version, doc = self.state.next_doc(msg)
                await self._apply(version, doc)
            except ControlError as exc:
                log.error("control message refused, state unchanged: %s", exc)
                sent = msg.get("version") if isinstance(msg, dict) else None
                ok = isinstance(sent, int) and not isinstance(sent, bool)
                return Nack(sent if ok else None, str(exc)).to_json()
            self.state.doc = doc
            return Ack(version).to_json()


def write_snapshot(path: str, doc: dict[str, Any]) -> None:
    """Atomically, so a ztunnel starting meanwhile reads the old or the new."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
