"""Prometheus metrics in the text exposition format, without a client library.

Counters, gauges and histograms in a :class:`Registry` that renders them; a
strict reader of the format (:func:`parse_exposition`); and the process's own
resident memory and CPU time (:class:`ProcessMetrics`, Prometheus' standard
``process_*`` names). Pure bookkeeping: the component records, its HTTP shell
renders. The node proxy (ztunnel/metrics.py) and the control plane
(controlplane/metrics.py) each build their registry from these.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "LabelValues",
    "Metric",
    "ProcessMetrics",
    "Registry",
    "Sample",
    "parse_exposition",
    "parse_proc_stat",
]

LabelValues = tuple[str, ...]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


@dataclass
class _Family:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    label_names: tuple[str, ...]


class Counter:
    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        self.family = _Family(name, help, "counter", tuple(label_names))
        self.values: dict[LabelValues, float] = {}

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, labels: LabelValues = ()) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        f = self.family
        for labels, value in self.values.items():
            yield f"{f.name}{_labels(f.label_names, labels)} {_num(value)}"


class Gauge(Counter):
    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help, label_names)
        self.family.kind = "gauge"

    def set(self, labels: LabelValues, value: float) -> None:
        self.values[labels] = value

    def dec(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        self.inc(labels, -amount)

    def replace(self, values: dict[LabelValues, float]) -> None:
        self.values = dict(values)


class Histogram:
    def __init__(
        self, name: str, help: str, buckets: Sequence[float], label_names: Sequence[str] = ()
    ) -> None:
        self.family = _Family(name, help, "histogram", tuple(label_names))
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, labels: LabelValues = ()) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        # Buckets are cumulative: every bucket whose bound is >= value counts it.
        for i in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> Iterable[str]:
        f = self.family
        for labels, s in self.series.items():
            for i, bound in enumerate(self.buckets):
                le = 'le="' + _num(bound) + '"'
                yield f"{f.name}_bucket{_labels(f.label_names, labels, le)} {_num(s[i])}"
            inf = 'le="+Inf"'
            yield f"{f.name}_bucket{_labels(f.label_names, labels, inf)} {_num(s[-1])}"
            yield f"{f.name}_sum{_labels(f.label_names, labels)} {_num(s[-2])}"
            yield f"{f.name}_count{_labels(f.label_names, labels)} {_num(s[-1])}"


Metric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    """The metrics of one process, rendered in the order they were added. A
    collector (:meth:`on_render`) updates values that are read, not counted
    (memory, sizes), just before each render."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self.collectors: list[Callable[[], None]] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def on_render(self, collect: Callable[[], None]) -> None:
        self.collectors.append(collect)

    def names(self) -> set[str]:
        """Every family name (a histogram's, without _bucket/_sum/_count)."""
        return {m.family.name for m in self.metrics}

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for m in self.metrics:
            f = m.family
            lines.append(f"# HELP {f.name} {f.help}")
            lines.append(f"# TYPE {f.name} {f.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


# -- the process's own resources ------------------------------------------------------


def parse_proc_stat(stat: str, page_size: int, ticks_per_second: int) -> tuple[float, float]:
    """(CPU seconds, user + system; resident bytes) from the text of
    /proc/<pid>/stat (proc(5): utime and stime are fields 14 and 15 in clock
    ticks, rss field 24 in pages). ValueError on text that is not one."""
    try:
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
        utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    except (IndexError, ValueError):
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}") from None
    return (utime + stime) / ticks_per_second, float(rss * page_size)


class ProcessMetrics:
    """``process_resident_memory_bytes`` and ``process_cpu_seconds_total`` of
    this process, read from /proc/self/stat at each render (Linux only: on
    another system, or if /proc is not mounted, the two stay absent)."""

    STAT = "/proc/self/stat"

    def __init__(self, registry: Registry) -> None:
        self.rss = registry.add(
            Gauge("process_resident_memory_bytes", "Resident memory size in bytes")
        )
        self.cpu = registry.add(
            Counter("process_cpu_seconds_total", "User and system CPU time spent in seconds")
        )
        registry.on_render(self.refresh)

    def refresh(self) -> None:
        try:
            with open(self.STAT) as f:
                text = f.read()
            cpu, rss = parse_proc_stat(text, os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError):
            return
        self.rss.set((), rss)
        self.cpu.values[()] = cpu  # the kernel keeps the total; the counter mirrors it


# -- reading the format -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """A strict reader of the text format (for tests and `meshnode` tools):
    raises ValueError on any line it cannot parse."""
    out: list[Sample] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        name_end = len(line)
        for i, ch in enumerate(line):
            if ch in "{ ":
                name_end = i
                break
        name = line[:name_end]
        rest = line[name_end:]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            close = rest.index("}")
            body = rest[1:close]
            rest = rest[close + 1 :]
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq]
                if body[eq + 1] != '"':
                    raise ValueError(f"line {n}: label {key} not quoted")
                j = eq + 2
                val = []
                while body[j] != '"':
                    if body[j] == "\\":
                        j += 1
                        val.append({"n": "\n"}.get(body[j], body[j]))
                    else:
                        val.append(body[j])
                    j += 1
                labels[key] = "".join(val)
                i = j + 1
                if i < len(body) and body[i] == ",":
                    i += 1
        value_text = rest.strip().split(" ")[0]
        if not name or not value_text:
            raise ValueError(f"line {n}: cannot parse {line!r}")
        out.append(Sample(name, labels, float(value_text)))
    return out
