"""`meshnode bench --dns`: the mesh DNS proxy against dnsmasq, on loopback.

Both answer the same service names from memory: meshnode's DNS proxy
(ztunnel/dns.py) in a process of its own, set up as a ztunnel worker runs it
(uvloop, the node's answerer, metrics and per-source rate limiter), and dnsmasq
(C; every name a --host-record). Measured side by side in one run:

- mesh answers per second: dnsperf (an independent load tool) for `--duration`
  seconds against each, cycling through the names;
- latency: one query at a time from one client (the same client for both, so
  the difference is what the proxy adds), p50 and p99;
- the forwarding path: names only dnsmasq knows, through the proxy (which
  forwards them to dnsmasq) against dnsmasq directly.

Everything listens on 127.0.0.1 and stops by itself: dnsperf runs for a fixed
time, the latency loop sends a fixed count, the processes are killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnode.core.errors import MeshnodeError

__all__ = ["DnsBenchError", "DnsBenchOptions", "render", "run_dns_bench", "serve"]

DOMAIN = "mesh"
EXTERNAL = "ext{}.bench.example"


class DnsBenchError(MeshnodeError):
    pass


@dataclass(frozen=True, slots=True)
class DnsBenchOptions:
    services: int = 100
    duration: float = 5.0
    clients: int = 8  # dnsperf -c
    latency_queries: int = 2000


def mesh_name(i: int) -> str:
    return f"svc{i}.default.{DOMAIN}"


def vip(i: int) -> str:
    return f"240.0.{i // 250}.{i % 250 + 1}"


def serve(port: int, upstream_port: int, services: int) -> None:
    """The proxy process: the DNS proxy of a ztunnel worker, on 127.0.0.1:port."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    from meshnode.ztunnel.dns import DnsAnswerer, DnsMetrics, DnsProxy, MeshNames, RateLimiter
    from meshnode.ztunnel.metrics import Registry

    names = MeshNames.build(DOMAIN, ((f"svc{i}", "default", vip(i)) for i in range(services)))
    answerer = DnsAnswerer(names)
    upstreams = [("127.0.0.1", upstream_port)]

    async def main() -> None:
        proxy = DnsProxy(lambda: answerer, lambda: upstreams, DnsMetrics(Registry()), RateLimiter())
        await proxy.start("127.0.0.1", port)
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        proxy.close()
        await proxy.wait_closed()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dnsperf(
    port: int, queries: Path, opts: DnsBenchOptions, clients: int = 0, in_flight: int = 64
) -> dict[str, float]:
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
         "-l", str(opts.duration), "-c", str(clients or opts.clients), "-T", "1",
         "-q", str(in_flight)],
        capture_output=True, text=True, timeout=opts.duration + 60,
    )  # fmt: skip
    if out.returncode != 0:
        raise DnsBenchError(f"dnsperf failed: {out.stderr.strip() or out.stdout.strip()}")
    return parse_dnsperf(out.stdout)


def parse_dnsperf(text: str) -> dict[str, float]:
    """dnsperf's summary: queries per second, completed and lost (fractions)."""

    def number(label: str) -> float:
        m = re.search(rf"{label}:\s+([0-9.]+)", text)
        if m is None:
            raise DnsBenchError(f"dnsperf printed no {label!r}:\n{text}")
        return float(m.group(1))

    sent = number("Queries sent")
    return {
        "qps": number("Queries per second"),
        "avg_latency_us": number(r"Average Latency \(s\)") * 1e6,
        "completed": number("Queries completed") / sent if sent else 0.0,
        "lost": number("Queries lost") / sent if sent else 0.0,
        "noerror": _rcode_count(text, "NOERROR") / sent if sent else 0.0,
    }


def _rcode_count(text: str, rcode: str) -> float:
    m = re.search(rf"{rcode}\s+([0-9]+)", text)
    return float(m.group(1)) if m else 0.0


def _latency(port: int, names: list[str], count: int) -> dict[str, float]:
    """One query at a time, `count` of them: p50 and p99 in microseconds, and the
    share answered NOERROR with an answer. The queries are made once by dnspython;
    the loop only sends and receives."""
    import dns.message

    wires = [dns.message.make_query(n, "A").to_wire() for n in names]
    samples = []
    good = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        s.settimeout(2.0)
        for i in range(count):
            q = wires[i % len(wires)]
            t0 = time.perf_counter_ns()
            s.send(q)
            try:
                reply = s.recv(4096)
            except TimeoutError:
                continue
            samples.append((time.perf_counter_ns() - t0) / 1000)
            if reply[:2] == q[:2] and reply[3] & 0x0F == 0 and reply[6:8] != b"\0\0":
                good += 1
    samples.sort()
    if not samples:
        raise DnsBenchError(f"no answer at all from 127.0.0.1:{port}")
    return {
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "answered": good / count,
    }


def run_dns_bench(opts: DnsBenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            raise DnsBenchError(
                f"{tool} is not installed (scripts/setup.sh --test installs dnsperf and "
                "dnsmasq-base)"
            )
    tmp = Path(tempfile.mkdtemp(prefix="mndnsbench-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        mesh = [mesh_name(i) for i in range(opts.services)]
        external = [EXTERNAL.format(i) for i in range(opts.services)]
        (tmp / "mesh.txt").write_text("".join(f"{n} A\n" for n in mesh))
        (tmp / "external.txt").write_text("".join(f"{n} A\n" for n in external))
        records = [f"--host-record={n},{vip(i)}" for i, n in enumerate(mesh)]
        records += [f"--host-record={n},192.0.2.{i % 250 + 1}" for i, n in enumerate(external)]
        dnsmasq_port, proxy_port = _free_port(), _free_port()
        conf = tmp / "dnsmasq.conf"
        conf.write_text("\n".join(r.removeprefix("--") for r in records) + "\n")
        procs.append(
            subprocess.Popen(
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-daemon",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    f"--port={dnsmasq_port}",
                    f"--conf-file={conf}",
                    "--user=root",
                    "--cache-size=10000",
                    "--log-facility=-",
                    "--quiet-dhcp",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
        proxy = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from meshnode.bench.dnsbench import serve; "
             "serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))",
             str(proxy_port), str(dnsmasq_port), str(opts.services)],
            stdout=subprocess.PIPE, stderr=(tmp / "proxy.log").open("w"), text=True,
        )  # fmt: skip
        procs.append(proxy)
        assert proxy.stdout is not None
        if proxy.stdout.readline().strip() != "ready":
            raise DnsBenchError(f"the DNS proxy did not start: {_tail(tmp / 'proxy.log')}")
        time.sleep(0.3)
        for p, name in zip(procs, ("dnsmasq", "proxy"), strict=True):
            if p.poll() is not None:
                raise DnsBenchError(f"{name} exited: {_tail(tmp / f'{name}.log')}")
        cores = os.cpu_count() or 1
        log(
            f"mesh DNS bench: {opts.services} names, dnsperf -c {opts.clients} for "
            f"{opts.duration:.0f} s each, {opts.latency_queries} one-at-a-time queries for "
            f"latency; {cores} cores shared by server and load"
        )
        result: dict[str, Any] = {"options": vars_of(opts), "cores": cores}
        for label, port, qfile, names in (
            ("mesh_proxy", proxy_port, "mesh.txt", mesh),
            ("mesh_dnsmasq", dnsmasq_port, "mesh.txt", mesh),
            ("forwarded_proxy", proxy_port, "external.txt", external),
            ("direct_dnsmasq", dnsmasq_port, "external.txt", external),
        ):
            _latency(port, names, 200)  # warm both (the proxy's answer cache too)
            load = _dnsperf(port, tmp / qfile, opts)
            lat = _latency(port, names, opts.latency_queries)
            # dnsperf's own latency with one query in flight: a second, C-side opinion.
            one = _dnsperf(port, tmp / qfile, opts, clients=1, in_flight=1)
            result[label] = {**load, **lat, "serial_avg_us": one["avg_latency_us"]}
            log(
                f"{label}: {load['qps']:.0f} answers/s ({load['lost']:.1%} lost), "
                f"p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us"
            )
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return "(no log)"


def vars_of(opts: DnsBenchOptions) -> dict[str, Any]:
    return {f: getattr(opts, f) for f in opts.__dataclass_fields__}


def render(r: dict[str, Any]) -> str:
    """The side-by-side table, with ratios and the issue's targets."""
    m, d = r["mesh_proxy"], r["mesh_dnsmasq"]
    f, u = r["forwarded_proxy"], r["direct_dnsmasq"]
    rows = [
        "| path | answers/s (dnsperf) | p50 / p99 (one at a time) | dnsperf avg, 1 in flight |",
        "|---|---|---|---|",
        *(
            f"| {name} | {x['qps']:,.0f} | {x['p50_us']:.0f} / {x['p99_us']:.0f} us | "
            f"{x['serial_avg_us']:.0f} us |"
            for name, x in (
                ("mesh names, meshnode DNS proxy", m),
                ("mesh names, dnsmasq (C, from memory)", d),
                ("other names, through the proxy to dnsmasq", f),
                ("other names, dnsmasq directly", u),
            )
        ),
    ]
    ratio = m["qps"] / d["qps"] if d["qps"] else float("nan")
    lines = [
        *rows,
        "",
        f"mesh answers: meshnode / dnsmasq {ratio:.2f}x; the proxy adds "
        f"{m['p50_us'] - d['p50_us']:+.0f} us at p50 over dnsmasq's path "
        f"({m['serial_avg_us'] - d['serial_avg_us']:+.0f} us by dnsperf's average)",
        f"forwarding adds {f['p50_us'] - u['p50_us']:+.0f} us at p50 over asking the "
        "upstream directly",
        f"target >= 20,000 mesh answers/s per proxy process: {m['qps']:,.0f} "
        f"({'met' if m['qps'] >= 20000 else 'SHORT'}); p50 <= 100 us for mesh names: "
        f"{m['p50_us']:.0f} us ({'met' if m['p50_us'] <= 100 else 'SHORT'}; the client's "
        f"own round trip is in it: {d['p50_us']:.0f} us against dnsmasq)",
    ]
    return "\n".join(lines)
