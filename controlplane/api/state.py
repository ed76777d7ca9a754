"""What this replica knows of the store: a read-side registry, the change feed and
the CA set.

:class:`StateCache` catches up whenever the store signals a commit (ours, or
another replica's via NOTIFY) and at least every second. It reads only the change
log after its revision and applies it to its own :class:`~..registry.Registry`
(which derives the same endpoints the writer did), so a commit costs what it
changed, however large the mesh. It reads the whole registry only at start and
when it fell behind what the log keeps. Long-poll watchers sleep on its condition,
so one commit costs one read of the database however many nodes watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshnode.controlplane.ca import RotatingCA
from meshnode.controlplane.feed import Feed
from meshnode.controlplane.registry import Registry
from meshnode.controlplane.store import KEEP_REVISIONS, CARow, StateRead, Store, rotating_ca

__all__ = ["StateCache", "Wakeup"]

log = logging.getLogger("meshnode.controlplane")


class Wakeup:
    """Wakes every waiter in one turn of the event loop. (An asyncio.Condition hands
    its lock to its waiters one by one, a loop turn each: ten thousand long polls
    took many seconds to wake after one commit.)"""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self, timeout: float) -> None:
        """Until the next :meth:`notify_all`, or `timeout` seconds."""
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._future)

    def notify_all(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None


class StateCache:
    """The registry at `revision`, the change feed after its floor, and the CA set."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.revision = -1
        self.registry = Registry()
        self.feed = Feed()
        self.ca: RotatingCA | None = None
        self._ca_rows: list[CARow] = []
        self._lock = asyncio.Lock()
        self.changed = Wakeup()
        self.on_ca_change: Callable[[], None] = lambda: None

    @property
    def floor(self) -> int:
        return self.feed.floor

    async def refresh(self) -> None:
        """Catch up with the store (cheap when nothing changed: one SELECT)."""
        async with self._lock:
            current = await asyncio.to_thread(self._store.revision)
            if current == self.revision:
                return
            state: StateRead | None = None
            if self.revision >= 0 and not self.registry.broken:
                state = await asyncio.to_thread(self._store.read_changes, self.revision)
                if state.floor > self.revision:
                    state = None  # the log no longer reaches back to us
                else:
                    try:
                        self.registry.follow(state.changes, state.revision)
                    except Exception as exc:  # noqa: BLE001 - load it whole instead
                        log.warning("state: cannot follow the change log (%s); loading it", exc)
                        state = None
                    else:
                        self.feed.extend(state.changes, state.revision)
            if state is None:
                state = await asyncio.to_thread(self._store.read_state)
                assert state.registry is not None
                self.registry = state.registry
                self.registry.views_changed_in(state.changes)
                self.feed.reset(state.floor, state.revision, state.changes)
            self.feed.trim(max(state.floor, state.revision - KEEP_REVISIONS))
            self.revision = state.revision
            if state.ca and state.ca != self._ca_rows:
                self._ca_rows = state.ca
                self.ca = rotating_ca(state.ca)
                self.on_ca_change()
        self.changed.notify_all()
