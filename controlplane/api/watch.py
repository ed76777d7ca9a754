"""The node config watch: a long poll, or a stream, on the state cache
(docs/protocol.md).

``GET /v1/node/config?since=R&wait=S&endpoints=1`` answers at once with the
changes after R (or the full slice), or sleeps on the cache's wakeup until a
commit, shutdown, or S seconds (at most MAX_WAIT). With ``stream=1`` the answer
does not end: each change goes out as one more line, and a line saying
``unchanged`` at least every S seconds (a heartbeat), so a change costs the
control plane one write per node instead of an answer and a new request. Answers
are compact JSON joined from encodings the feed and the registry made once for
every node (feed.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from cryptography import x509

from meshnode.controlplane.ca import RotatingCA
from meshnode.controlplane.metrics import ControlPlaneMetrics
from meshnode.controlplane.registry import Registry
from meshnode.core import api
from meshnode.core.errors import ApiError

from .auth import LeafVerifier, node_of_certificate
from .handlers import Handlers
from .messages import Request, Response

__all__ = ["MAX_WAIT", "Watch"]

MAX_WAIT = api.NODE_CONFIG_MAX_WAIT


class Watch(Handlers):
    """The long-poll handler, mixed into :class:`~.app.ControlPlane`."""

    _stopping: bool
    _verified: Callable[[RotatingCA], LeafVerifier]  # the app's remembered checks
    _full_slots: asyncio.Semaphore | None = None
    _full_syncing: set[str] | None = None  # nodes whose full slice is being written now
    _lines_at = -1  # the revision of the lines below
    _lines: dict[int, tuple[list[bytes], bytes]] = {}  # noqa: RUF012 - replaced, not changed
    _metrics: ControlPlaneMetrics | None = None

    @property
    def metrics(self) -> ControlPlaneMetrics:
        """The control plane's metrics (controlplane/metrics.py), made on first use."""
        if self._metrics is None:
            self._metrics = ControlPlaneMetrics()
        return self._metrics

    async def get_node_config(self, req: Request, node: str) -> Response:
        try:
            since = int(req.arg("since")) if req.arg("since") is not None else None  # type: ignore[arg-type]
            wait = min(float(req.arg("wait") or 0), MAX_WAIT)
        except ValueError:
            raise ApiError(
                400, "since must be an integer revision and wait a number of seconds"
            ) from None
        endpoints = req.arg("endpoints") == "1"
        stream = req.arg("stream") == "1"
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
                return self._full_slice(node)  # the node then streams from its revision
            if stream and since is not None:
                if self._stopping:
                    raise ApiError(503, "the control plane is shutting down; ask again shortly")
                beat = min(max(wait, 1.0), MAX_WAIT) if req.arg("wait") else MAX_WAIT / 2
                lines = self._stream(node, req.peer_cert, since, endpoints, beat)
                return Response(200, b"", content_type=api.NODE_CONFIG_STREAM_TYPE, lines=lines)
            if changes:
                return Response(200, _delta(cache.revision, changes))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                if since == cache.revision or wait > 0:
                    return Response(200, _unchanged(cache.revision))
                return Response(200, _delta(cache.revision, []))
            with self.metrics.watching("long_poll"):
                await self._wait_change(cache.revision, remaining)

    async def _stream(
        self, node: str, cert: x509.Certificate | None, since: int, endpoints: bool, beat: float
    ) -> AsyncIterator[bytes]:
        """The lines of a streamed watch: the changes after `since` at once (or
        ``unchanged``), then each change as it is committed, and ``unchanged`` after
        `beat` seconds of silence. It ends -- and the node asks again, to be told
        why or sent a full slice -- when the node needs a full slice, is deleted,
        or its certificate no longer passes (expired, or its CA retired), and on
        shutdown."""
        with self.metrics.watching("stream"):
            cache = self.cache
            ca, checked = cache.ca, time.monotonic()
            said = -beat  # when the last line went out
            seen_view: tuple[Registry, int] | None = None
            view: frozenset[str] | None = None
            while not self._stopping:
                registry = cache.registry
                now = time.monotonic()
                if node not in registry.nodes:
                    return
                if seen_view != (registry, registry.view_changed.get(node, 0)):
                    seen_view = (registry, registry.view_changed.get(node, 0))
                    view = self._view(registry, node)
                if cache.ca is not ca or now - checked >= beat:  # the node auth, again
                    ca, checked = cache.ca, now
                    try:
                        node_of_certificate(
                            cert,
                            self.config.trust_domain,
                            self._verified(self._ca()),
                            registry.nodes,
                        )
                    except ApiError:
                        return
                revision = cache.revision
                changes = cache.feed.answer(
                    node,
                    since,
                    endpoints,
                    None if endpoints else _service_json(registry),
                    view,
                    seen_view[1],
                )
                if changes is None:
                    return
                if changes:
                    since, said = revision, now
                    yield self._line(revision, changes)
                    continue
                # Nothing for this node up to `revision`: go on from there, so every
                # node asks the feed the same question; the heartbeat tells the node.
                since = revision
                if now - said >= beat:
                    said = now
                    yield _unchanged(revision) + b"\n"
                await self._wait_change(revision, max(said + beat - time.monotonic(), 0.01))

    def _line(self, revision: int, changes: list[bytes]) -> bytes:
        """The line of `changes` at `revision`, made once for every node given the
        same list (the feed's shared answer): one encoding for a fan-out."""
        if self._lines_at != revision:
            self._lines_at, self._lines = revision, {}
        made = self._lines.get(id(changes))
        if made is None or made[0] is not changes:
            made = (changes, _delta(revision, changes) + b"\n")
            if len(self._lines) < 1024:  # the lists are kept alive here: ids stay theirs
                self._lines[id(changes)] = made
        return made[1]

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


def _unchanged(revision: int) -> bytes:
    return b'{"revision":%d,"unchanged":true}' % revision


def _service_json(registry: Registry) -> Callable[[str], bytes | None]:
    """The current document of service ``<ns>/<name>`` (None: it is gone)."""

    def current(key: str) -> bytes | None:
        ns, name = key.split("/", 1)
        return registry.service_json((ns, name)) if (ns, name) in registry.services else None

    return current
