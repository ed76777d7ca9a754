"""The benchmark's pure logic: parsing tool output, medians, ratios, target
verdicts and table rendering. No processes, no files: driven by text and
numbers, so `tests/unit/bench/test_report.py` checks it with captured outputs."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.core.errors import MeshnodeError

# -- what is measured ------------------------------------------------------------------

PATHS: tuple[str, ...] = (
    "direct",
    "meshnode",
    "haproxy-mtls",
    "stunnel-mtls",
    "central-lb",
    "meshnode-same-node",
)
BASELINE = "direct"
SIDECAR = "haproxy-mtls"

WORKLOADS: tuple[str, ...] = ("iperf3", "ka", "close", "lat")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:.0f}"


METRICS: tuple[Metric, ...] = (
    Metric("iperf3_gbps", "iperf3 single stream", "Gbit/s", True, "{:.2f}"),
    Metric("ka_rps", "keep-alive req/s (wrk -t2 -c16)", "req/s", True),
    Metric("close_rps", "Connection: close req/s (wrk -t2 -c16)", "req/s", True),
    Metric("lat_p50_us", "p50 latency at 1 connection", "us", False),
    Metric("lat_p99_us", "p99 latency at 1 connection", "us", False),
    Metric("added_p50_us", "added p50 latency vs direct", "us", False),
    Metric("added_p99_us", "added p99 latency vs direct", "us", False),
    Metric("proxy_cpu_s", "proxy CPU seconds (all four workloads)", "s", False, "{:.1f}"),
    Metric("ka_cpu_us_per_req", "proxy CPU per keep-alive request", "us", False, "{:.1f}"),
    Metric(
        "close_cpu_us_per_req", "proxy CPU per Connection: close request", "us", False, "{:.1f}"
    ),
    Metric("proxy_rss_mb", "proxy peak RSS (sum of VmHWM)", "MB", False, "{:.1f}"),
)
METRIC_KEYS: tuple[str, ...] = tuple(m.key for m in METRICS)
# Measured per repetition; the others are derived from the medians.
SAMPLED_KEYS: tuple[str, ...] = tuple(k for k in METRIC_KEYS if not k.startswith("added_"))


def metric(key: str) -> Metric:
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(key)


class ParseError(MeshnodeError, ValueError):
    """A tool's output is not what the parser expects; the message shows why."""


# -- wrk --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p75_us: float
    p90_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def duration_us(text: str) -> float:
    """wrk's '812.00us', '1.23ms', '2.01s' -> microseconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s|m|h)\s*", text)
    if not m:
        raise ParseError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output (the latency distribution is required)."""
    req = re.search(r"^\s*(\d+) requests in ([0-9.]+\w+),", text, re.M)
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    if not req or not rps:
        raise ParseError(
            "no 'N requests in' / 'Requests/sec:' lines in wrk output:\n" + text[-600:]
        )
    pct: dict[str, float] = {}
    for p in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{p}(?:\.0+)?%\s+([0-9.]+\w+)\s*$", text, re.M)
        if not m:
            raise ParseError(f"no {p}% line in wrk output (was --latency given?):\n" + text[-600:])
        pct[p] = duration_us(m.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = sum(int(x) for x in sock.groups()) if sock else 0
    non = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    return WrkResult(
        requests=int(req.group(1)),
        seconds=duration_us(req.group(2)) / 1e6,
        rps=float(rps.group(1)),
        p50_us=pct["50"],
        p75_us=pct["75"],
        p90_us=pct["90"],
        p99_us=pct["99"],
        socket_errors=socket_errors,
        non_2xx=int(non.group(1)) if non else 0,
    )


# -- iperf3 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IperfResult:
    gbps: float  # as received by the server
    sender_gbps: float
    retransmits: int


def parse_iperf3(text: str) -> IperfResult:
    """Parse `iperf3 -c ... -J` output."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ParseError("iperf3 output is not JSON:\n" + text[-600:]) from None
    if not isinstance(doc, dict):
        raise ParseError("iperf3 output is not a JSON object")
    if doc.get("error"):
        raise ParseError(f"iperf3 failed: {doc['error']}")
    try:
        end = doc["end"]
        recv = float(end["sum_received"]["bits_per_second"])
        sent = float(end["sum_sent"]["bits_per_second"])
        retr = int(end["sum_sent"].get("retransmits", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"iperf3 JSON lacks end.sum_received/sum_sent: {exc}") from None
    return IperfResult(gbps=recv / 1e9, sender_gbps=sent / 1e9, retransmits=retr)


# -- /proc -------------------------------------------------------------------------------


def proc_stat_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat."""
    # The command name is in parentheses and may contain spaces or ')'.
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def proc_stat_ppid(stat_text: str) -> int:
    return int(stat_text[stat_text.rindex(")") + 2 :].split()[1])


def proc_status_kb(status_text: str, field: str) -> int | None:
    """A 'kB' field (VmHWM, VmRSS, ...) of /proc/PID/status, or None."""
    m = re.search(rf"^{re.escape(field)}:\s*(\d+)\s*kB", status_text, re.M)
    return int(m.group(1)) if m else None


def descendants(ppids: Mapping[int, int], roots: Iterable[int]) -> list[int]:
    """The roots and every process below them, from a pid -> ppid table."""
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = list(roots)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


# -- aggregation ------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def per_request_us(cpu_s: float, requests: int) -> float:
    return cpu_s * 1e6 / requests if requests > 0 else 0.0


def summarize(
    samples: Mapping[str, Mapping[str, Sequence[float | None]]], baseline: str = BASELINE
) -> dict[str, dict[str, float | None]]:
    """Per path: the median of every sampled metric, then the added latency
    (median p50/p99 minus the baseline's median)."""
    out: dict[str, dict[str, float | None]] = {}
    for path, per_metric in samples.items():
        out[path] = {k: median(per_metric.get(k, [])) for k in SAMPLED_KEYS}
    base = out.get(baseline, {})
    for row in out.values():
        for q in ("p50", "p99"):
            v, b = row.get(f"lat_{q}_us"), base.get(f"lat_{q}_us")
            row[f"added_{q}_us"] = v - b if v is not None and b is not None else None
    return {p: {k: out[p].get(k) for k in METRIC_KEYS} for p in out}


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def ratios(
    summary: Mapping[str, Mapping[str, float | None]], baseline: str
) -> dict[str, dict[str, float | None]]:
    """Every path's metric divided by the baseline path's (None where undefined)."""
    base = summary.get(baseline)
    return {
        path: {k: ratio(row.get(k), base.get(k) if base else None) for k in METRIC_KEYS}
        for path, row in summary.items()
    }


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (None for fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx


def sidecar_estimate_mb(one_sidecar_mb: float, count: int = 100) -> float:
    """`count` sidecars, estimated as `count` times the RSS of one."""
    return one_sidecar_mb * count


# -- targets -------------------------------------------------------------------------------

PASS = "PASS"
FALL_SHORT = "FALL SHORT"
NOT_MEASURED = "NOT MEASURED"


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    verdict: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "measured": self.measured, "verdict": self.verdict}


def _get(summary: Mapping[str, Mapping[str, float | None]], path: str, key: str) -> float | None:
    row = summary.get(path)
    return row.get(key) if row else None


def _ratio_target(
    name: str, num: float | None, den: float | None, threshold: float, unit_fmt: str = "{:.0f}"
) -> Target:
    r = ratio(num, den)
    if r is None or num is None or den is None:
        return Target(name, "-", NOT_MEASURED)
    measured = f"{r:.2f}x ({unit_fmt.format(num)} vs {unit_fmt.format(den)})"
    return Target(name, measured, PASS if r >= threshold else FALL_SHORT)


def targets(
    summary: Mapping[str, Mapping[str, float | None]],
    memory: Mapping[str, Any] | None = None,
    ztunnel_peak_rss_mb: float | None = None,
) -> list[Target]:
    """The issue's targets, each with its measured value and PASS / FALL SHORT."""
    out = [
        _ratio_target(
            "keep-alive req/s: meshnode >= 1.1x haproxy-mtls",
            _get(summary, "meshnode", "ka_rps"),
            _get(summary, SIDECAR, "ka_rps"),
            1.1,
        ),
    ]
    m50, h50 = _get(summary, "meshnode", "added_p50_us"), _get(summary, SIDECAR, "added_p50_us")
    name = "added p50 latency (1 connection): meshnode <= haproxy-mtls"
    if m50 is None or h50 is None:
        out.append(Target(name, "-", NOT_MEASURED))
    else:
        out.append(
            Target(name, f"{m50:.0f} us vs {h50:.0f} us", PASS if m50 <= h50 else FALL_SHORT)
        )
    out.append(
        _ratio_target(
            "iperf3: meshnode >= 1.0x haproxy-mtls",
            _get(summary, "meshnode", "iperf3_gbps"),
            _get(summary, SIDECAR, "iperf3_gbps"),
            1.0,
            "{:.2f} Gbit/s",
        )
    )
    out.append(
        _ratio_target(
            "Connection: close req/s: meshnode >= 5x haproxy-mtls",
            _get(summary, "meshnode", "close_rps"),
            _get(summary, SIDECAR, "close_rps"),
            5.0,
        )
    )
    out.append(
        _ratio_target(
            "same-node keep-alive req/s >= 0.8x direct",
            _get(summary, "meshnode-same-node", "ka_rps"),
            _get(summary, BASELINE, "ka_rps"),
            0.8,
        )
    )
    name = "ztunnel RSS <= 64 MB under connection churn"
    peaks = [v for v in (ztunnel_peak_rss_mb, (memory or {}).get("peak_rss_mb")) if v is not None]
    if not peaks:
        out.append(Target(name, "-", NOT_MEASURED))
    else:
        peak = max(peaks)
        out.append(
            Target(
                name,
                f"{peak:.1f} MB (peak VmHWM of any ztunnel)",
                PASS if peak <= 64.0 else FALL_SHORT,
            )
        )
    name = "ztunnel RSS grows <= 0.1 MB per added workload"
    s = (memory or {}).get("slope_mb_per_workload")
    if s is None:
        out.append(Target(name, "-", NOT_MEASURED))
    else:
        out.append(
            Target(
                name, f"{s:.3f} MB/workload (1 -> 100 workloads)", PASS if s <= 0.1 else FALL_SHORT
            )
        )
    return out


# -- rendering -------------------------------------------------------------------------------


def fmt_value(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.endswith("_rps") and abs(value) >= 10000:
        return f"{value / 1000:.1f}k"
    return metric(key).fmt.format(value)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


ABS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("iperf3_gbps", "iperf3 Gbit/s"),
    ("ka_rps", "keep-alive req/s"),
    ("close_rps", "conn-close req/s"),
    ("lat_p50_us", "p50 us"),
    ("lat_p99_us", "p99 us"),
    ("added_p50_us", "added p50 us"),
    ("added_p99_us", "added p99 us"),
    ("proxy_cpu_s", "proxy CPU s"),
    ("ka_cpu_us_per_req", "CPU us/req ka"),
    ("close_cpu_us_per_req", "CPU us/req close"),
    ("proxy_rss_mb", "proxy RSS MB"),
)
RATIO_COLUMNS: tuple[tuple[str, str], ...] = (
    ("iperf3_gbps", "iperf3"),
    ("ka_rps", "keep-alive"),
    ("close_rps", "conn-close"),
    ("lat_p50_us", "p50"),
)


def render_table(summary: Mapping[str, Mapping[str, float | None]]) -> str:
    """Absolute numbers (medians), one row per path, in PATHS order."""
    paths = [p for p in PATHS if p in summary] + [p for p in summary if p not in PATHS]
    rows = [[p, *(fmt_value(k, summary[p].get(k)) for k, _ in ABS_COLUMNS)] for p in paths]
    return _table(["path", *(h for _, h in ABS_COLUMNS)], rows)


def render_ratio_table(summary: Mapping[str, Mapping[str, float | None]]) -> str:
    """Each path vs direct and vs haproxy-mtls (value / baseline's value)."""
    vs_direct = ratios(summary, BASELINE)
    vs_sidecar = ratios(summary, SIDECAR)
    paths = [p for p in PATHS if p in summary] + [p for p in summary if p not in PATHS]
    header = ["path"]
    for _, h in RATIO_COLUMNS:
        header += [f"{h} / direct", f"{h} / haproxy"]
    rows = []
    for p in paths:
        row = [p]
        for k, _ in RATIO_COLUMNS:
            row += [fmt_ratio(vs_direct[p][k]), fmt_ratio(vs_sidecar[p][k])]
        rows.append(row)
    return _table(header, rows)


def render_targets(tgts: Sequence[Target]) -> str:
    return _table(
        ["target", "measured", "verdict"], [[t.name, t.measured, t.verdict] for t in tgts]
    )


def render_memory(memory: Mapping[str, Any]) -> str:
    rows = [
        [str(p["workloads"]), f"{p['rss_mb']:.1f}", f"{p['hwm_mb']:.1f}"]
        for p in memory.get("points", [])
    ]
    text = _table(
        ["workloads on the node", "ztunnel RSS MB (after churn)", "ztunnel VmHWM MB"], rows
    )
    s = memory.get("slope_mb_per_workload")
    text += f"\nper-workload slope (least squares): {'-' if s is None else f'{s:.3f}'} MB"
    est, one = memory.get("sidecars_100_estimate_mb"), memory.get("haproxy_sidecar_rss_mb")
    if est is not None and one is not None:
        text += (
            f"\n100 sidecars (ESTIMATE = 100 x {one:.1f} MB, the VmHWM of one HAProxy "
            f"process of the haproxy-mtls pair): {est:.0f} MB"
        )
    return text


def render_report(
    summary: Mapping[str, Mapping[str, float | None]],
    tgts: Sequence[Target],
    memory: Mapping[str, Any] | None,
) -> str:
    parts: list[str] = []
    if summary:
        parts += [
            "Medians (absolute):",
            render_table(summary),
            "",
            "Ratios (this path's value / the other path's value):",
            render_ratio_table(summary),
            "",
        ]
    if memory:
        parts += ["Memory (ztunnel on one node):", render_memory(memory), ""]
    parts += ["Targets:", render_targets(tgts)]
    return "\n".join(parts)
