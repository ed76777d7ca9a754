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
import copy
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from meshnode.core.contracts import CONTROL_PROTOCOL_VERSION as PROTOCOL_VERSION
from meshnode.core.errors import MeshnodeError
from meshnode.ztunnel.state import StateError, parse_snapshot

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
        if not isinstance(msg, dict):
            raise ControlError("a message must be a JSON object")
        if msg.get("v") != PROTOCOL_VERSION:
            raise ControlError(f"protocol version {msg.get('v')!r} is not {PROTOCOL_VERSION}")
        version = msg.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ControlError("version must be an integer")
        kind = msg.get("type")
        if kind == "snapshot":
            doc = msg.get("state")
            if not isinstance(doc, dict):
                raise ControlError("snapshot without a state object")
            doc = dict(doc, version=version)
        elif kind in ("add", "delete"):
            if self.doc is None:
                raise ControlError(f"{kind} before any snapshot")
            doc = copy.deepcopy(self.doc)
            doc["version"] = version
            _patch(doc, kind, msg)
        else:
            raise ControlError(f"unknown message type {kind!r}")
        try:
            parse_snapshot(doc)
        except StateError as exc:
            raise ControlError(str(exc)) from None
        return version, doc


def _patch(doc: dict[str, Any], op: str, msg: dict[str, Any]) -> None:
    what = msg.get("kind")
    if what == "workload":
        items, key_of = doc.setdefault("workloads", []), (lambda w: w.get("name"))
    elif what == "service":
        items = doc.setdefault("services", [])

        def key_of(s: dict[str, Any]) -> str:
            return f"{s.get('namespace', 'default')}/{s.get('name')}"
    else:
        raise ControlError(f"unknown kind {what!r} (workload or service)")
    if op == "add":
        value = msg.get("value")
        if not isinstance(value, dict):
            raise ControlError("add without a value object")
        key = key_of(value)
        items[:] = [x for x in items if key_of(x) != key] + [value]
    else:
        key = msg.get("key")
        before = len(items)
        items[:] = [x for x in items if key_of(x) != key]
        if len(items) == before:
            raise ControlError(f"delete: no {what} {key!r}")


class ControlServer:
    def __init__(self, path: str, state: ControlState,
                 apply: Callable[[int, dict[str, Any]], Awaitable[None]]) -> None:
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
            return {"v": PROTOCOL_VERSION, "type": "nack", "version": None,
                    "error": "not a JSON line"}
        async with self._lock:  # one change at a time, in order
            try:
                version, doc = self.state.next_doc(msg)
                await self._apply(version, doc)
            except ControlError as exc:
                log.error("control message refused, state unchanged: %s", exc)
                return {"v": PROTOCOL_VERSION, "type": "nack",
                        "version": msg.get("version") if isinstance(msg, dict) else None,
                        "error": str(exc)}
            self.state.doc = doc
            return {"v": PROTOCOL_VERSION, "type": "ack", "version": version}


def write_snapshot(path: str, doc: dict[str, Any]) -> None:
    """Atomically, so a ztunnel starting meanwhile reads the old or the new."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
