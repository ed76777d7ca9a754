"""The node config watch: a long poll on the state cache (docs/protocol.md).

``GET /v1/node/config?since=R&wait=S`` answers at once with the changes after R
(or the full slice), or sleeps on the cache's condition until a commit, shutdown,
or S seconds (at most MAX_WAIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from meshnode.controlplane import registry as reg
from meshnode.core import api
from meshnode.core.errors import ApiError

from .handlers import Handlers
from .messages import Request, Response, json_response

__all__ = ["MAX_WAIT", "Watch"]

MAX_WAIT = api.NODE_CONFIG_MAX_WAIT


class Watch(Handlers):
    """The long-poll handler, mixed into :class:`~.app.ControlPlane`."""

    _stopping: bool

    async def get_node_config(self, req: Request, node: str) -> Response:
        try:
            since = int(req.arg("since")) if req.arg("since") is not None else None  # type: ignore[arg-type]
            wait = min(float(req.arg("wait") or 0), MAX_WAIT)
        except ValueError:
            raise ApiError(
                400, "since must be an integer revision and wait a number of seconds"
            ) from None
        deadline = time.monotonic() + max(wait, 0.0)
        cache = self.cache
        while True:
            if node not in cache.registry.nodes:
                raise ApiError(403, f"node {node} was removed from the registry; enroll again")
            changes = (
                None
                if since is None
                else reg.changes_since(cache.log, cache.floor, since, node, cache.revision)
            )
            if changes is None:
                return json_response(200, self._full_slice(node))
            if changes:
                return json_response(
                    200, {"revision": cache.revision, "full": False, "changes": changes}
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                if since == cache.revision or wait > 0:
                    return json_response(200, {"revision": cache.revision, "unchanged": True})
                return json_response(
                    200, {"revision": cache.revision, "full": False, "changes": []}
                )
            await self._wait_change(cache.revision, remaining)

    async def _wait_change(self, seen: int, timeout: float) -> None:
        """Sleep until the cached revision moves past `seen`, shutdown, or `timeout`."""
        cache = self.cache
        async with cache.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    cache.changed.wait_for(lambda: cache.revision != seen or self._stopping),
                    timeout,
                )

    def _full_slice(self, node: str) -> dict[str, Any]:
        c = self.cache
        return reg.node_slice(
            c.registry,
            node,
            c.revision,
            self.config.trust_domain,
            self._ca().trust_bundle_pem().decode(),
        )
