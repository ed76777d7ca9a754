"""The node config watch: a long poll on the state cache (docs/protocol.md).

``GET /v1/node/config?since=R&wait=S&endpoints=1`` answers at once with the
changes after R (or the full slice), or sleeps on the cache's condition until a
commit, shutdown, or S seconds (at most MAX_WAIT). Answers are compact JSON joined
from encodings the feed and the registry made once for every node (feed.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from meshnode.controlplane.registry import Registry
from meshnode.core import api
from meshnode.core.errors import ApiError

from .handlers import Handlers
from .messages import Request, Response

__all__ = ["MAX_WAIT", "Watch"]

MAX_WAIT = api.NODE_CONFIG_MAX_WAIT


class Watch(Handlers):
    """The long-poll handler, mixed into :class:`~.app.ControlPlane`."""

    _stopping: bool
    _full_slots: asyncio.Semaphore | None = None
    _full_syncing: set[str] | None = None  # nodes whose full slice is being written now

    async def get_node_config(self, req: Request, node: str) -> Response:
        try:
            since = int(req.arg("since")) if req.arg("since") is not None else None  # type: ignore[arg-type]
            wait = min(float(req.arg("wait") or 0), MAX_WAIT)
        except ValueError:
            raise ApiError(
                400, "since must be an integer revision and wait a number of seconds"
            ) from None
        endpoints = req.arg("endpoints") == "1"
        deadline = time.monotonic() + max(wait, 0.0)
        cache = self.cache
        while True:
            registry = cache.registry
            if node not in registry.nodes:
                raise ApiError(403, f"node {node} was removed from the registry; enroll again")
            view = self._view(registry, node)
            changes = (
                None
                if since is None
                else cache.feed.answer(
                    node,
                    since,
                    endpoints,
                    None if endpoints else _service_json(registry),
                    view,
                    registry.view_changed.get(node, 0),
                )
            )
            if changes is None:
                return self._full_slice(node)
            if changes:
                return Response(200, _delta(cache.revision, changes))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                if since == cache.revision or wait > 0:
                    return Response(200, b'{"revision":%d,"unchanged":true}' % cache.revision)
                return Response(200, _delta(cache.revision, []))
            await self._wait_change(cache.revision, remaining)

    async def _wait_change(self, seen: int, timeout: float) -> None:
        """Sleep until the cached revision moves past `seen`, shutdown, or `timeout`."""
        cache = self.cache
        if cache.revision == seen and not self._stopping:
            await cache.changed.wait(timeout)

    def _view(self, registry: Registry, node: str) -> frozenset[str] | None:
        """The namespaces `node` sees (``--node-view namespace``), or None: all."""
        if self.config.node_view != "namespace":
            return None
        return registry.view(node, self.config.shared_namespaces)

    def _full_slice(self, node: str) -> Response:
        """The node's full slice, written from the registry's shared pieces; at most
        `max_full_syncs` are written at once (after a restart, the fleet's full
        syncs go out paced, first come first served)."""
        if self._full_syncing is None:
            self._full_syncing = set()
        c = self.cache
        parts = c.registry.slice_parts(
            node,
            c.revision,
            self.config.trust_domain,
            self._ca().trust_bundle_pem().decode(),
            self._view(c.registry, node),
        )
        if self._full_slots is None:
            self._full_slots = asyncio.Semaphore(self.config.max_full_syncs)
        return Response(
            200, b"", chunks=parts, slots=self._full_slots, owner=(self._full_syncing, node)
        )


def _delta(revision: int, changes: list[bytes]) -> bytes:
    return b'{"revision":%d,"full":false,"changes":[%b]}' % (revision, b",".join(changes))


def _service_json(registry: Registry) -> Callable[[str], bytes | None]:
    """The current document of service ``<ns>/<name>`` (None: it is gone)."""

    def current(key: str) -> bytes | None:
        ns, name = key.split("/", 1)
        return registry.service_json((ns, name)) if (ns, name) in registry.services else None

    return current
