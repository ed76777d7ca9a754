"""The change log as nodes read it: what ``GET /v1/node/config?since=R`` answers,
encoded once and shared by every node that asks the same question. Pure.

A :class:`Feed` keeps the change-log tail (revisions after `floor`). Each entry is
encoded to JSON once. The answer for "since R" is the last change of every key
after R, oldest first: the part every node shares (services, endpoints, resources)
is computed once per (R, revision) and cached until the next commit; the part only
one node sees (its own workloads) comes from a per-node index. So when one
endpoint changes, ten thousand watchers cost ten thousand byte joins, not ten
thousand slice builds.

Nodes of a release before endpoint-level changes do not ask with ``endpoints=1``;
their answers carry the whole current service document instead of each endpoint
change.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshnode.controlplane.registry import NODE_KINDS, Change

__all__ = ["Feed"]

# Kinds that make every node (or the named one) take a full slice instead.
_FULL_KINDS = frozenset({"ca", "revoked"})
# Shared answers kept for one revision (one per since, kind of node and view).
MAX_CACHED_ANSWERS = 4096
# Revisions between two sweeps of the per-node lists (a sweep visits every node).
SWEEP_EVERY = 256


@dataclass(slots=True)
class _Entry:
    seq: int  # position in the whole log, for a stable order
    change: Change
    encoded: bytes | None = None

    def wire(self) -> bytes:
        if self.encoded is None:
            self.encoded = json.dumps(self.change.wire(), separators=(",", ":")).encode()
        return self.encoded


@dataclass(slots=True)
class _Shared:
    """The answer's part common to every node, for one `since`."""

    full: bool  # a change in range sends every node a full slice
    entries: list[_Entry]  # the last change per key, oldest first
    wires: list[bytes] | None = None  # their encodings, made for the first node asking


class Feed:
    """The change log after `floor`, up to `revision`."""

    def __init__(self, floor: int = 0, revision: int = 0) -> None:
        self._start(floor, revision)

    def _start(self, floor: int, revision: int) -> None:
        self.floor = floor
        self.revision = revision
        self._entries: list[_Entry] = []
        self._revisions: list[int] = []  # parallel to _entries, for bisect
        self._per_node: dict[str, list[_Entry]] = {}  # entries that name a node
        self._seq = 0
        self._swept = floor  # the per-node lists hold nothing older than this
        self._shared: dict[tuple[int, bool, frozenset[str] | None], _Shared] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self, floor: int, revision: int, changes: Sequence[Change]) -> None:
        """Start again from a fresh read of the log."""
        self._start(floor, floor)
        self.extend(changes, revision)

    def extend(self, changes: Sequence[Change], revision: int) -> None:
        """Append the changes of the revisions after ours, up to `revision`."""
        for change in changes:
            if change.revision <= self.revision:
                continue  # already here (a read that overlapped ours)
            entry = _Entry(self._seq, change)
            self._seq += 1
            self._entries.append(entry)
            self._revisions.append(change.revision)
            for node in change.nodes or ():
                self._per_node.setdefault(node, []).append(entry)
        self.revision = max(self.revision, revision)
        self._shared.clear()

    def trim(self, floor: int) -> None:
        """Forget the revisions up to `floor` (nodes older than that get full slices)."""
        if floor <= self.floor:
            return
        cut = bisect.bisect_right(self._revisions, floor)
        del self._entries[:cut]
        del self._revisions[:cut]
        self.floor = floor
        if floor >= self._swept + SWEEP_EVERY:  # answer() stops at `since` anyway
            for node in list(self._per_node):
                kept = [e for e in self._per_node[node] if e.change.revision > floor]
                if kept:
                    self._per_node[node] = kept
                else:
                    del self._per_node[node]
            self._swept = floor
        self._shared.clear()

    def answer(
        self,
        node: str,
        since: int,
        endpoints: bool = True,
        service_json: Callable[[str], bytes | None] | None = None,
        view: frozenset[str] | None = None,
        view_changed: int = 0,
    ) -> list[bytes] | None:
        """`node`'s slice changes after revision `since`, encoded, one per key (the
        last wins), oldest first; or None when a full slice must be sent instead:
        `since` is older than the log keeps, newer than the current revision, the
        node's own record, the revocations or the trust bundle changed.

        Without `endpoints` (a node of an older release), endpoint changes become the
        service's whole current document, from `service_json(<ns>/<name>)`. With a
        `view` (namespaces), only services and endpoints of those; a view that
        changed (at revision `view_changed`) after `since` needs a full slice."""
        if since < self.floor or since > self.revision:
            return None
        if view is not None and view_changed > since:
            return None
        shared = self._shared_since(since, endpoints, service_json, view)
        if shared.full:
            return None
        mine: dict[str, _Entry] = {}
        for entry in reversed(self._per_node.get(node, ())):
            c = entry.change
            if c.revision <= since:
                break
            if c.kind == "node" and c.key == node:
                return None
            if c.kind in NODE_KINDS:
                mine.setdefault(f"{c.kind}\0{c.key}", entry)
        if not mine:  # the common case: the list every such node is given (do not change it)
            if shared.wires is None:
                shared.wires = [e.wire() for e in shared.entries]
            return shared.wires
        merged = sorted([*shared.entries, *mine.values()], key=lambda e: e.seq)
        return [e.wire() for e in merged]

    def _shared_since(
        self,
        since: int,
        endpoints: bool,
        service_json: Callable[[str], bytes | None] | None,
        view: frozenset[str] | None,
    ) -> _Shared:
        cached = self._shared.get((since, endpoints, view))
        if cached is not None:
            return cached
        if len(self._shared) >= MAX_CACHED_ANSWERS:
            self._shared.clear()
        start = bisect.bisect_right(self._revisions, since)
        last: dict[str, _Entry | None] = {}
        full = False
        for entry in self._entries[start:]:
            c = entry.change
            if c.nodes is not None:
                continue  # a node's own (or nobody's): see answer()
            if c.kind in _FULL_KINDS:
                full = True
                break
            if c.kind not in NODE_KINDS:
                continue
            scoped = view is not None and c.kind in ("service", "endpoint")
            if scoped and c.key.split("/", 1)[0] not in view:  # type: ignore[operator]
                continue
            if c.kind == "endpoint" and not endpoints:
                service = "/".join(c.key.split("/", 2)[:2])
                key = f"service\0{service}"
                last.pop(key, None)
                last[key] = _current_service(entry.seq, service, service_json)
                continue
            key = f"{c.kind}\0{c.key}"
            last.pop(key, None)
            last[key] = entry  # re-insert: order by last change
        shared = _Shared(full, [] if full else [e for e in last.values() if e is not None])
        self._shared[(since, endpoints, view)] = shared
        return shared


def _current_service(
    seq: int, service: str, service_json: Callable[[str], bytes | None] | None
) -> _Entry | None:
    """A put of the service's whole current document (None: it is gone, and its
    delete is in the log after this)."""
    doc = service_json(service) if service_json is not None else None
    if doc is None:
        return None
    entry = _Entry(seq, Change(0, "put", "service", service, None, None))
    entry.encoded = b'{"op":"put","kind":"service","key":' + json.dumps(service).encode()
    entry.encoded += b',"value":' + doc + b"}"
    return entry
