"""The node's health report to the control plane (docs/protocol.md, "Node
reports"): every ``MESHNODE_REPORT_INTERVAL`` seconds (default 30) the agent
gathers its readiness, the applied slice revision, its certificate's expiry,
the BPF programs attached at its cgroup and, from the local ztunnel, endpoint
health and traffic edges, and posts them on its node channel.

:func:`build_report` is the pure part (bounded with :func:`fit`); :class:`Reporter`
is the thread around it. Reporting never disturbs the agent: a failure is
logged once when the state changes (not every interval), and the next interval
tries again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from meshnode import __version__
from meshnode.core import api
from meshnode.core.contracts.report import (
    MIN_REPORT_INTERVAL,
    EndpointHealth,
    NodeReport,
    TrafficEdge,
    fit,
)

log = logging.getLogger("meshnode.nodeagent.report")

__all__ = [
    "DEFAULT_REPORT_INTERVAL",
    "REPORT_INTERVAL_ENV",
    "Reporter",
    "build_report",
    "cert_not_after",
    "report_interval",
]

REPORT_INTERVAL_ENV = "MESHNODE_REPORT_INTERVAL"
DEFAULT_REPORT_INTERVAL = 30.0
# Never more often than this: the control plane takes one per MIN_REPORT_INTERVAL.
SHORTEST_INTERVAL = 2 * MIN_REPORT_INTERVAL


def report_interval(environ: dict[str, str] | os._Environ[str] | None = None) -> float:
    """Seconds between reports, from ``MESHNODE_REPORT_INTERVAL`` (0: no reports);
    a value that is not a number is refused with a warning, the default kept."""
    env = os.environ if environ is None else environ
    text = env.get(REPORT_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_REPORT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value != value or value < 0 or value == float("inf"):  # NaN, negative, inf
        log.warning(
            "%s=%r is not a number of seconds; reporting every %gs",
            REPORT_INTERVAL_ENV,
            text,
            DEFAULT_REPORT_INTERVAL,
        )
        return DEFAULT_REPORT_INTERVAL
    if value == 0:
        return 0.0
    return max(value, SHORTEST_INTERVAL)


def build_report(
    *,
    node: str,
    agent_ready: bool,
    ztunnel_ready: bool,
    config_revision: int,
    cert_not_after: float,
    bpf_programs: Sequence[str],
    endpoints: Sequence[EndpointHealth],
    edges: Sequence[TrafficEdge],
    agent_version: str = __version__,
) -> NodeReport:
    """The report, within its bounds (the least useful entries dropped)."""
    return fit(
        NodeReport(
            node=node,
            agent_ready=agent_ready,
            ztunnel_ready=ztunnel_ready,
            config_revision=max(config_revision, 0),
            cert_not_after=max(cert_not_after, 0.0),
            bpf_programs=tuple(sorted(set(bpf_programs))),
            endpoints=tuple(endpoints),
            edges=tuple(edges),
            agent_version=agent_version,
        )
    )


_expiry_cache: dict[Path, tuple[float, float]] = {}


def cert_not_after(path: Path) -> float:
    """The expiry (unix seconds) of the PEM certificate at `path`; 0 if unreadable.
    Parsed again only when the file changes (renewal)."""
    from cryptography import x509

    try:
        mtime = path.stat().st_mtime
        hit = _expiry_cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return 0.0
    expiry = cert.not_valid_after_utc.timestamp()
    _expiry_cache[path] = (mtime, expiry)
    return expiry


class Poster(Protocol):
    def request(self, method: str, path: str, body: Any = None) -> Any: ...


class Reporter(threading.Thread):
    """Posts ``gather()`` every `interval` seconds (the first soon after start,
    each wait jittered by up to a tenth, so a fleet does not report in step)."""

    def __init__(
        self,
        client: Poster,
        gather: Callable[[], NodeReport],
        interval: float,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name="cp-report", daemon=True)
        self.client = client
        self.gather = gather
        self.interval = interval
        self.stop = threading.Event()
        self.state = ""  # "ok" or what failed last; logged when it changes
        self.sent = 0
        self.last_error = ""
        self._rng = rng or random.Random()

    def run(self) -> None:
        wait = min(self.interval, 1.0)
        while not self.stop.wait(wait):
            self.report_once()
            wait = self.interval * self._rng.uniform(0.9, 1.0)
        close = getattr(self.client, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):  # closing is best effort
                close()

    def report_once(self) -> bool:
        """One report: gathered, posted. True if the control plane took it."""
        from meshnode.core.errors import MeshnodeError

        try:
            report = self.gather()
            self.client.request("POST", api.NODE_REPORT, report.to_dict())
        except (MeshnodeError, OSError, ValueError) as exc:
            status = getattr(exc, "status", 0)
            kind = f"status {status}" if status else type(exc).__name__
            self.last_error = str(exc)
            self._note(
                kind, f"node report not accepted: {exc}; trying again every {self.interval:g}s"
            )
            return False
        except Exception as exc:  # a bug in gathering must not stop the agent
            self.last_error = str(exc)
            self._note("bug", f"node report failed unexpectedly: {type(exc).__name__}: {exc}")
            return False
        self.sent += 1
        self.last_error = ""
        self._note("ok", "node reports reach the control plane")
        return True

    def _note(self, state: str, message: str) -> None:
        if state == self.state:
            return
        if state == "ok":
            log.info("%s", message)
        else:
            log.warning("%s", message)
        self.state = state
