"""``meshnode bench --soak DURATION``: bounded churn through the mesh.

Two wrk clients on node1 run at once for DURATION against nginx on node2
through both ztunnels: one opens a new connection per request
(``Connection: close``), the other keeps a few connections alive. Meanwhile
node1's and node2's ztunnels (with their worker processes) are sampled: RSS and
open file descriptors. The report gives the slope of each after a warm-up
(least squares, per minute), the failed requests and the slowest request.
The decisions (parsing, slopes, the summary) are plain functions, tested
without a lab; ``run_soak`` is the shell around them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from meshnode.bench import procs, report

MIN_SECONDS, MAX_SECONDS = 10.0, 4 * 3600.0
SAMPLE_EVERY = 2.0  # seconds between RSS / fd samples
CLOSE_CONNS, KEEPALIVE_CONNS = 8, 4


class SoakError(ValueError):
    pass


def parse_duration(text: str) -> float:
    """``"20s"``, ``"5m"``, ``"1h"`` or plain seconds -> seconds, within bounds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*", text)
    if not m:
        raise SoakError(
            f"soak duration {text!r}: use seconds, or a number with s, m or h (e.g. 20s, 10m)"
        )
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise SoakError(
            f"soak duration {text!r} is outside {MIN_SECONDS:.0f}s...{MAX_SECONDS / 3600:.0f}h"
        )
    return seconds


def wrk_max_us(text: str) -> float | None:
    """The Max column of wrk's thread-stats Latency line (the slowest request)."""
    m = re.search(r"^\s*Latency\s+\S+\s+\S+\s+([0-9.]+\w+)", text, re.M)
    return report.duration_us(m.group(1)) if m else None


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var


def warmup_seconds(duration: float) -> float:
    """The part of the run left out of the slopes: a fifth, 10 s to 2 min."""
    return min(120.0, max(10.0, duration / 5))


@dataclass
class Sample:
    t: float  # seconds since the start
    rss_mb: float  # all ztunnel processes of node1 and node2
    fds: int


@dataclass
class SoakResult:
    duration_s: float
    warmup_s: float
    samples: list[Sample] = field(default_factory=list)
    requests: int = 0
    failed: int = 0
    slowest_ms: float | None = None
    clients: dict[str, Any] = field(default_factory=dict)

    def slopes(self) -> tuple[float | None, float | None]:
        after = [s for s in self.samples if s.t >= self.warmup_s]
        return (
            slope_per_minute([(s.t, s.rss_mb) for s in after]),
            slope_per_minute([(s.t, float(s.fds)) for s in after]),
        )

    def as_dict(self) -> dict[str, Any]:
        rss, fds = self.slopes()
        doc = asdict(self)
        doc["rss_slope_mb_per_min"] = rss
        doc["fd_slope_per_min"] = fds
        return doc

    def render(self) -> str:
        rss, fds = self.slopes()
        rss0 = self.samples[0].rss_mb if self.samples else None
        rss1 = self.samples[-1].rss_mb if self.samples else None
        fd0 = float(self.samples[0].fds) if self.samples else None
        fd1 = float(self.samples[-1].fds) if self.samples else None

        def f(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        lines = [
            f"soak: {self.duration_s:.0f}s of churn (wrk -c{CLOSE_CONNS} Connection: close + "
            f"wrk -c{KEEPALIVE_CONNS} keep-alive) through node1 -> node2",
            f"  requests {self.requests}, failed {self.failed}, slowest "
            f"{f(self.slowest_ms, '.1f')} ms",
            f"  ztunnel RSS {f(rss0, '.1f')} -> {f(rss1, '.1f')} MB, open fds "
            f"{f(fd0, '.0f')} -> {f(fd1, '.0f')}"
            f" ({len(self.samples)} samples)",
            f"  after {self.warmup_s:.0f}s of warm-up: RSS {f(rss, '+.3f')} MB/min, "
            f"fds {f(fds, '+.2f')}/min",
        ]
        return "\n".join(lines)


def sample(pids: list[int]) -> tuple[float, int]:
    rss = 0.0
    fds = 0
    for pid in pids:
        rss += procs.status_mb(pid, "VmRSS") or 0.0
        with contextlib.suppress(OSError):  # the process just ended
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def run_soak(bench: Any, duration: float) -> SoakResult:
    """Build the bench lab (meshnode path only), churn for ``duration``
    seconds while sampling, take the lab down. ``bench`` is a runner.Bench."""
    result = SoakResult(duration_s=duration, warmup_s=warmup_seconds(duration))
    old = bench._trap_signals()
    ok = False
    try:
        bench.setup()
        specs = bench.path_specs()
        bench.check_paths(specs)
        (spec,) = [s for s in specs if s.name == "meshnode"]
        d = max(1, round(duration))
        clients = {
            "close": [
                "wrk",
                "-t1",
                f"-c{CLOSE_CONNS}",
                f"-d{d}s",
                "--latency",
                "--timeout",
                "10s",
                "-H",
                "Connection: close",
                spec.url,
            ],
            "keepalive": [
                "wrk",
                "-t1",
                f"-c{KEEPALIVE_CONNS}",
                f"-d{d}s",
                "--latency",
                "--timeout",
                "10s",
                spec.url,
            ],
        }
        outputs: dict[str, str] = {}

        def client(name: str, argv: list[str]) -> None:
            out = bench.workdir / f"soak-{name}.out"
            script = f"exec timeout -k 5 {d + 30} {shlex.join(argv)} > {shlex.quote(str(out))} 2>&1"
            bench.lab.exec(spec.node, ["sh", "-c", script], workload=spec.workload)
            try:
                outputs[name] = out.read_text(errors="replace")
            except OSError:
                outputs[name] = ""

        threads = [
            threading.Thread(target=client, args=(n, a), daemon=True) for n, a in clients.items()
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        bench.log(f"soak: {d}s, sampling the ztunnels every {SAMPLE_EVERY:.0f}s")
        next_log = t0 + 60
        while any(t.is_alive() for t in threads):
            pids = procs.with_children(bench.ztunnel_pids("node1", "node2"))
            rss, fds = sample(pids)
            now = time.monotonic()
            result.samples.append(Sample(round(now - t0, 2), round(rss, 2), fds))
            if now >= next_log:
                bench.log(f"  {now - t0:.0f}s: ztunnel RSS {rss:.1f} MB, {fds} fds")
                next_log += 60
            for t in threads:
                t.join(timeout=SAMPLE_EVERY / len(threads))
            if time.monotonic() - t0 > d + 60:
                raise SoakError("the soak clients did not finish within a minute of their time")
        for name, text in outputs.items():
            try:
                res = report.parse_wrk(text)
            except report.ParseError as exc:
                raise SoakError(f"soak client {name}: {exc}") from None
            slowest = wrk_max_us(text)
            result.clients[name] = {
                "requests": res.requests,
                "errors": res.errors,
                "rps": res.rps,
                "p99_us": res.p99_us,
                "max_us": slowest,
            }
            result.requests += res.requests
            result.failed += res.errors
            if slowest is not None:
                ms = slowest / 1000.0
                result.slowest_ms = ms if result.slowest_ms is None else max(result.slowest_ms, ms)
        ok = True
    finally:
        bench._ignore_signals()
        try:
            bench.teardown(keep_logs=not ok)
        finally:
            bench._restore_signals(old)
    return result
