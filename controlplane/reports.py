"""The nodes' latest health reports, in memory (docs/protocol.md, "Node reports").

Pure bookkeeping, time passed in: the API handler puts what a node sent, the
admin listing reads it back. Each control-plane replica keeps the reports it
received itself; after a restart a node shows "no report yet" until its next
report, and is never dropped from the node list for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshnode.core.contracts.report import MIN_REPORT_INTERVAL, NodeReport

__all__ = ["STALE_AFTER", "ReportBook", "Received"]

STALE_AFTER = 90.0  # seconds without a report before a node is stale


@dataclass(frozen=True, slots=True)
class Received:
    report: NodeReport
    at: float  # unix seconds the control plane received it
    # (source, destination) -> connections/s since the previous report (empty on the first)
    rates: dict[tuple[str, str], float] = field(default_factory=dict)


def _connections(report: NodeReport) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for e in report.edges:
        key = (e.source, e.destination)
        out[key] = out.get(key, 0) + e.connections
    return out


class ReportBook:
    """The latest report of each node, and when it came."""

    def __init__(self, min_interval: float = MIN_REPORT_INTERVAL) -> None:
        self._latest: dict[str, Received] = {}
        self.min_interval = min_interval

    def retry_after(self, node: str, now: float) -> float:
        """0 when a report from `node` is welcome now; else the seconds until it
        is (one accepted report per ``min_interval`` per node)."""
        last = self._latest.get(node)
        if last is None:
            return 0.0
        wait = last.at + self.min_interval - now
        return wait if wait > 0 else 0.0

    def put(self, node: str, report: NodeReport, now: float) -> None:
        prev = self._latest.get(node)
        rates: dict[tuple[str, str], float] = {}
        if prev is not None and now > prev.at:
            elapsed = now - prev.at
            before = _connections(prev.report)
            for key, count in _connections(report).items():
                old = before.get(key, 0)
                # A counter that went down: ztunnel restarted and counts from 0.
                delta = count - old if count >= old else count
                rates[key] = delta / elapsed
        self._latest[node] = Received(report, now, rates)

    def get(self, node: str) -> Received | None:
        return self._latest.get(node)

    def stale(self, node: str, now: float) -> bool:
        """True when there is no report from `node`, or the last is older than
        STALE_AFTER seconds."""
        last = self._latest.get(node)
        return last is None or not math.isfinite(now - last.at) or now - last.at > STALE_AFTER

    def all(self) -> dict[str, Received]:
        return dict(self._latest)

    def forget(self, node: str) -> None:
        """A deleted node's report goes with it."""
        self._latest.pop(node, None)

    def keep_only(self, nodes: set[str] | frozenset[str]) -> None:
        """Forget the reports of nodes no longer registered (deleted through
        another replica)."""
        for name in [n for n in self._latest if n not in nodes]:
            del self._latest[name]
