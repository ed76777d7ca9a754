"""What this replica knows of the store: registry, change-log tail and CA set.

:class:`StateCache` is refreshed whenever the store signals a commit (ours, or
another replica's via NOTIFY) and at least every second. Long-poll watchers sleep
on its condition, so one commit costs one read of the database however many nodes
watch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshnode.controlplane.ca import RotatingCA
from meshnode.controlplane.registry import Change, Registry
from meshnode.controlplane.store import KEEP_REVISIONS, CARow, Store, rotating_ca

__all__ = ["StateCache"]


class StateCache:
    """The registry at `revision`, the change log after `floor`, and the CA set."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.revision = -1
        self.floor = 0
        self.registry = Registry()
        self.log: list[Change] = []
        self.ca: RotatingCA | None = None
        self._ca_rows: list[CARow] = []
        self._lock = asyncio.Lock()
        self.changed = asyncio.Condition()
        self.on_ca_change: Callable[[], None] = lambda: None

    async def refresh(self) -> None:
        """Catch up with the store (cheap when nothing changed: one SELECT)."""
        async with self._lock:
            current = await asyncio.to_thread(self._store.revision)
            if current == self.revision:
                return
            after = None if self.revision < 0 else self.revision
            state = await asyncio.to_thread(self._store.read_state, after)
            if after is None or state.floor > self.revision:
                self.log = state.changes
                self.floor = state.floor
            else:
                self.log.extend(state.changes)
            cut = state.revision - KEEP_REVISIONS
            if cut > self.floor:
                self.log = [c for c in self.log if c.revision > cut]
                self.floor = cut
            self.registry = state.registry
            self.revision = state.revision
            if state.ca and state.ca != self._ca_rows:
                self._ca_rows = state.ca
                self.ca = rotating_ca(state.ca)
                self.on_ca_change()
        async with self.changed:
            self.changed.notify_all()
