"""The control plane's own Prometheus metrics, and the plain-HTTP listener that
serves them (docs/observability.md).

The API listener asks every caller for a node certificate or a token, which a
Prometheus server has neither of, so ``/metrics`` is served on a listener of its
own: plain HTTP, GET ``/metrics`` and nothing else, off unless
``--metrics-listen`` is given, and meant for loopback or a monitoring network.
What it shows is counts, latencies and a revision number: no names of nodes or
workloads, no tokens, no keys.

The registry is pure bookkeeping (core/metrics.py); the app records requests and
watchers as they happen, and the state gauges are read from the cache at scrape.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterator

from aiohttp import web

from meshnode.controlplane.registry import Registry as MeshRegistry
from meshnode.core.metrics import CONTENT_TYPE, Gauge, Histogram, ProcessMetrics, Registry

__all__ = [
    "REQUEST_BUCKETS",
    "ControlPlaneMetrics",
    "parse_metrics_listen",
]

log = logging.getLogger("meshnode.controlplane")

# API latency; a long poll of the node config waits up to a minute, hence the tail.
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
WATCH_KINDS = ("stream", "long_poll")


def parse_metrics_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IP, IPv6 in brackets) -> (host, port); ValueError says why not."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port) if sep and port.isdigit() else -1
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError(
            f"--metrics-listen {text!r}: expected IP:PORT, e.g. 127.0.0.1:15091 (an "
            "address on a monitoring network if Prometheus runs elsewhere)"
        )
    return host, number


class ControlPlaneMetrics:
    """Every metric the control plane exports."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(
            Histogram(
                "meshnode_controlplane_request_duration_seconds",
                "API requests by route (the path template), method and status: time "
                "from the request head to the answer's start (a long poll's wait "
                "included; a stream's or a full slice's body not)",
                REQUEST_BUCKETS,
                ("method", "route", "status"),
            )
        )
        self.watchers = r.add(
            Gauge(
                "meshnode_controlplane_watchers",
                "Node config watches open now: streams, and long polls waiting",
                ("kind",),
            )
        )
        for kind in WATCH_KINDS:
            self.watchers.set((kind,), 0)
        self.revision = r.add(
            Gauge(
                "meshnode_controlplane_store_revision",
                "The store revision this replica's state cache holds",
            )
        )
        self.nodes = r.add(Gauge("meshnode_controlplane_nodes", "Enrolled nodes"))
        self.workloads = r.add(Gauge("meshnode_controlplane_workloads", "Registered workloads"))
        self.services = r.add(Gauge("meshnode_controlplane_services", "Services"))
        self.process = ProcessMetrics(r)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None  # where the listener is bound

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.observe(seconds, (method, route, str(status)))

    @contextlib.contextmanager
    def watching(self, kind: str) -> Iterator[None]:
        """Counts a watch of `kind` open while the block runs."""
        self.watchers.inc((kind,))
        try:
            yield
        finally:
            self.watchers.dec((kind,))

    def observe_state(self, revision: int, registry: MeshRegistry) -> None:
        self.revision.set((), revision)
        self.nodes.set((), len(registry.nodes))
        self.workloads.set((), len(registry.workloads))
        self.services.set((), len(registry.services))

    def render(self) -> str:
        return self.registry.render()

    # -- the listener (a thin shell) --------------------------------------------------

    async def serve(self, host: str, port: int, refresh: Callable[[], None]) -> tuple[str, int]:
        """Serve GET /metrics in plain HTTP on host:port until :meth:`close`;
        `refresh` updates the state gauges before each scrape. Returns the bound
        address (port 0: the one the kernel chose)."""

        async def metrics(request: web.Request) -> web.Response:
            refresh()
            return web.Response(body=self.render().encode(), headers={"Content-Type": CONTENT_TYPE})

        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=15, shutdown_timeout=1)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        log.info("metrics on http://%s:%d/metrics (plain HTTP, no auth)", *self.address)
        return self.address

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
