"""The benchmark run: builds a fresh 3-node lab, starts the servers and the
comparison proxies, runs every workload on every path, and takes it all down.

Topology (node IPs 198.18.0.11-13, the lab's private subnet):
- node2: nginx workload `web` (:8080, service `web`), iperf3 workload `iperf`
  (:5201, service `iperf`); the server halves of the HAProxy and stunnel pairs;
  two plain nginx backends (:8081, :8082) for the central load balancer.
- node1: the client. A workload `client` (its cgroup is meshed) for the meshnode
  paths; outside any workload for the others. The client halves of the pairs on
  127.0.0.1. For the same-node path: nginx workload `web-local` (:8090) and
  iperf3 workload `iperf-local` (:5202).
- node3: the central HAProxy load balancer; the memory sub-benchmark's node.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from meshnode.bench import configs, procs, report
from meshnode.core.errors import MeshnodeError

LAB_NAME = "mnbench"
WORKDIR = Path("/dev/shm/meshnode-bench")  # tmpfs: nginx serves from memory
FILE_NAME = "1k.bin"
FILE_SIZE = 1024
TD = "cluster.local"

WEB_PORT, IPERF_PORT = 8080, 5201
LOCAL_WEB_PORT, LOCAL_IPERF_PORT = 8090, 5202
LB_BACKEND_PORTS = (8081, 8082)
HAPROXY_PORTS = {"http": (20080, 20443), "iperf": (20201, 20444)}
STUNNEL_PORTS = {"http": (21080, 21443), "iperf": (21201, 21444)}
LB_HTTP_PORT, LB_IPERF_PORT = 22080, 22201
MEM_CLIENT_PORT, MEM_IDLE_BASE_PORT = 9200, 30000
MEMORY_STEPS = (1, 10, 100)

REQUIRED_TOOLS = {
    "direct": ("wrk", "iperf3", "nginx"),
    "meshnode": ("wrk", "iperf3", "nginx"),
    "haproxy-mtls": ("wrk", "iperf3", "nginx", "haproxy"),
    "stunnel-mtls": ("wrk", "iperf3", "nginx", "stunnel4"),
    "central-lb": ("wrk", "iperf3", "nginx", "haproxy"),
    "meshnode-same-node": ("wrk", "iperf3", "nginx"),
}


class BenchError(MeshnodeError):
    pass


def missing_tools(paths: list[str], memory: bool, profile: bool = False) -> list[str]:
    need: set[str] = {"py-spy"} if profile else set()
    for p in paths:
        need.update(REQUIRED_TOOLS[p])
    if memory:
        need.update(("wrk", "nginx", "haproxy"))
    return sorted(t for t in need if shutil.which(t) is None)


@dataclass
class PathSpec:
    name: str
    node: str
    workload: str | None
    url: str
    iperf_host: str
    iperf_port: int
    proxies: Callable[[], list[int]]  # root pids of the proxy processes on the path


@dataclass
class Options:
    paths: list[str]
    duration: float = 10.0
    repeat: int = 3
    memory: bool = True
    churn_seconds: float = 3.0
    ztunnel_workers: int = 1  # per node; all nodes share this machine's cores
    profile_dir: Path | None = None  # py-spy stacks of the meshnode proxies (ka phase)


@dataclass
class Bench:
    opts: Options
    log: Callable[[str], None] = print
    lab_name: str = LAB_NAME
    workdir: Path = WORKDIR
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pairs: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    _out_seq: int = 0

    def __post_init__(self) -> None:
        from meshnode.lab.lab import Lab

        self.lab = Lab(self.lab_name)
        self.nproc = os.cpu_count() or 1

    # -- the whole run ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Everything, lab down at the end whatever happens (Ctrl-C included)."""
        started = datetime.now(UTC).isoformat(timespec="seconds")
        load_before = os.getloadavg()
        ok = False
        old = self._trap_signals()
        try:
            self.setup()
            specs = self.path_specs()
            self.check_paths(specs)
            samples = self.measure(specs) if specs else {}
            zt_peak = self.ztunnel_peak_mb()
            memory = self.memory() if self.opts.memory else None
            ok = True
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            self._ignore_signals()
            try:
                self.teardown(keep_logs=not ok)
            finally:
                self._restore_signals(old)
        summary = report.summarize(samples) if samples else {}
        tgts = report.targets(summary, memory, zt_peak)
        return {
            "meta": self.meta(started, load_before),
            "paths": {
                p: {
                    "samples": samples[p],
                    "median": summary[p],
                    "ratio_vs_direct": report.ratios(summary, report.BASELINE)[p],
                    "ratio_vs_haproxy_mtls": report.ratios(summary, report.SIDECAR)[p],
                }
                for p in summary
            },
            "summary": summary,
            "ztunnel_peak_rss_mb": zt_peak,
            "memory": memory,
            "targets": [t.as_dict() for t in tgts],
            "failures": self.failures,
        }

    # Ctrl-C and SIGTERM end the run (the lab still comes down). Lab.exec turns a
    # KeyboardInterrupt into SIGINT for its child and returns, so remember it.
    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def _trap_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        with contextlib.suppress(ValueError):  # not the main thread: leave them be
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _ignore_signals(self) -> None:
        with contextlib.suppress(ValueError):
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    @staticmethod
    def _restore_signals(old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def meta(self, started: str, load_before: tuple[float, float, float]) -> dict[str, Any]:
        def version(cmd: list[str]) -> str:
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                return "?"
            text = (p.stdout + p.stderr).strip().splitlines()
            return next((ln for ln in text if any(c.isdigit() for c in ln)), "?")

        return {
            "started": started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": self.opts.duration,
            "repeat": self.opts.repeat,
            "paths": self.opts.paths,
            "cores": self.nproc,
            "kernel": platform.release(),
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "nginx": "worker_processes 1, 1 KB file on tmpfs, access_log off",
            "haproxy": f"nbthread {self.nproc}, TCP mode, TLS 1.3, mTLS, session reuse on",
            "tools": {
                "wrk": version(["wrk", "-v"]),
                "iperf3": version(["iperf3", "--version"]),
                "haproxy": version(["haproxy", "-v"]),
                "stunnel": version(["stunnel4", "-version"]),
                "nginx": version(["nginx", "-v"]),
            },
            "note": "one run on a shared 2-core machine; every process of the lab "
            "(clients, servers, proxies) shares the same cores",
        }

    # -- setup -------------------------------------------------------------------------------

    def node_ip(self, node: str) -> str:
        return self.lab.load().nodes[node].ip

    def vip(self, service: str) -> str:
        return self.lab.load().services[service].vip

    def setup(self) -> None:
        from meshnode.lab import host

        if self.lab.exists() or host.netns_exists(self.lab.fabric):
            self.log(f"removing a leftover lab {self.lab_name}")
            self.lab.down(log=self.log)
        shutil.rmtree(self.workdir, ignore_errors=True)
        www = self.workdir / "www"
        www.mkdir(parents=True)
        os.chmod(self.workdir, 0o755)
        os.chmod(www, 0o755)
        (www / FILE_NAME).write_bytes(bytes((i * 7 + 13) % 251 for i in range(FILE_SIZE)))
        os.chmod(www / FILE_NAME, 0o644)

        t0 = time.monotonic()
        self.log(
            f"lab {self.lab_name}: 3 nodes, {self.opts.ztunnel_workers} ztunnel worker(s) each"
        )
        self.lab.up(3, log=self.log, workers=self.opts.ztunnel_workers)
        for node in ("node1", "node2", "node3"):
            ns = self.lab.load().nodes[node].netns
            # Connection-per-request runs open ~100k connections: let the client
            # reuse TIME_WAIT ports (the same on every node, for every path).
            host.run(
                [
                    *host.nsenter_prefix(ns),
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=10240 65000",
                    "net.core.somaxconn=4096",
                ]
            )
        paths = set(self.opts.paths)
        self.add_workload("node2", "web", "web", WEB_PORT, self.nginx_cmd("web", WEB_PORT))
        self.add_workload("node2", "iperf", "iperf", IPERF_PORT, self.iperf_cmd(IPERF_PORT))
        if paths & {"meshnode", "meshnode-same-node"}:
            self.add_workload("node1", "client", "client", 9090, ["sleep", "infinity"], wait=0)
        if "meshnode-same-node" in paths:
            self.add_workload(
                "node1",
                "web-local",
                "web-local",
                LOCAL_WEB_PORT,
                self.nginx_cmd("web-local", LOCAL_WEB_PORT),
            )
            self.add_workload(
                "node1",
                "iperf-local",
                "iperf-local",
                LOCAL_IPERF_PORT,
                self.iperf_cmd(LOCAL_IPERF_PORT),
            )
        if paths & {"haproxy-mtls", "stunnel-mtls"} or self.opts.memory:
            self.mint_certs()
        if "haproxy-mtls" in paths or self.opts.memory:
            self.start_haproxy_pair()
        if "stunnel-mtls" in paths:
            self.start_stunnel_pair()
        if "central-lb" in paths:
            self.start_central_lb()
        self.log(f"setup done in {time.monotonic() - t0:.1f}s")

    def add_workload(
        self, node: str, name: str, service: str, port: int, cmd: list[str], wait: float = 15.0
    ) -> None:
        self.lab.add_workload(node, name, service, port, cmd, wait_listening=wait)
        if wait:
            self.wait_listening(node, port, f"workload {name}")

    def nginx_cmd(self, name: str, port: int) -> list[str]:
        conf = self.workdir / f"nginx-{name}.conf"
        conf.write_text(
            configs.nginx_conf(str(self.workdir), name, port, str(self.workdir / "www"))
        )
        return ["nginx", "-e", str(self.workdir / f"nginx-{name}.err"), "-c", str(conf)]

    @staticmethod
    def iperf_cmd(port: int) -> list[str]:
        return ["iperf3", "-s", "-p", str(port), "--rcv-timeout", "15000"]

    def spawn(self, node: str, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """A non-workload process in the node (its own cgroup, never captured)."""
        from meshnode.lab import host

        rec = self.lab.load().nodes[node]
        cgroup = Path(rec.cgroup) / "bench"
        host.cgroup_make(cgroup)
        proc = host.spawn(rec.netns, cgroup, cmd, log_path=self.workdir / f"{name}.log")
        self.background.append(proc)
        return proc

    def wait_listening(
        self, node: str, port: int, what: str, proc: Any = None, timeout: float = 15.0
    ) -> None:
        from meshnode.lab import host

        ns = self.lab.load().nodes[node].netns
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.listening(ns, port):
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(
            f"{what} is not listening on {node}:{port}; see the logs in "
            f"{self.workdir} and {self.lab.node_dir(node)}"
        )

    def mint_certs(self) -> None:
        """Two identities from a fresh CA (ECDSA P-256), for the sidecar pairs."""
        from meshnode.controlplane.ca import CertificateAuthority
        from meshnode.core.fsutil import write_file_atomic
        from meshnode.core.identity import SpiffeId
        from meshnode.core.pki import generate_private_key, make_csr, write_private_key

        d = self.workdir / "pki"
        d.mkdir(mode=0o700, exist_ok=True)
        ca = CertificateAuthority.create(TD)
        write_file_atomic(d / "root.pem", ca.trust_bundle_pem(), 0o644)
        for sa in ("client-sidecar", "server-sidecar"):
            key = generate_private_key()
            ident = SpiffeId(TD, "default", sa)
            chain = ca.issue_workload_certificate(make_csr(key, ident), ident)
            write_private_key(d / f"{sa}-key.pem", key)
            write_file_atomic(d / f"{sa}.pem", chain, 0o644)
            # HAProxy wants certificate chain and key in one file.
            write_file_atomic(
                d / f"{sa}-combined.pem", chain + (d / f"{sa}-key.pem").read_bytes(), 0o600
            )

    def _tunnels(self, ports: dict[str, tuple[int, int]]) -> list[configs.Tunnel]:
        return [
            configs.Tunnel("http", *ports["http"], f"127.0.0.1:{WEB_PORT}"),
            configs.Tunnel("iperf", *ports["iperf"], f"127.0.0.1:{IPERF_PORT}"),
        ]

    def start_haproxy_pair(self) -> None:
        if "haproxy-mtls" in self.pairs:
            return
        d, ip2 = self.workdir / "pki", self.node_ip("node2")
        tunnels = self._tunnels(HAPROXY_PORTS)
        srv = self.workdir / "haproxy-server.cfg"
        srv.write_text(
            configs.haproxy_server_conf(
                tunnels,
                ip2,
                str(d / "server-sidecar-combined.pem"),
                str(d / "root.pem"),
                self.nproc,
            )
        )
        cli = self.workdir / "haproxy-client.cfg"
        cli.write_text(
            configs.haproxy_client_conf(
                tunnels,
                ip2,
                str(d / "client-sidecar-combined.pem"),
                str(d / "root.pem"),
                self.nproc,
            )
        )
        p2 = self.spawn("node2", "haproxy-server", ["haproxy", "-db", "-f", str(srv)])
        p1 = self.spawn("node1", "haproxy-client", ["haproxy", "-db", "-f", str(cli)])
        for t in tunnels:
            self.wait_listening("node2", t.server_port, "haproxy (server side)", p2)
            self.wait_listening("node1", t.client_port, "haproxy (client side)", p1)
        self.pairs["haproxy-mtls"] = [p1, p2]

    def start_stunnel_pair(self) -> None:
        d, ip2 = self.workdir / "pki", self.node_ip("node2")
        tunnels = self._tunnels(STUNNEL_PORTS)
        srv = self.workdir / "stunnel-server.conf"
        srv.write_text(
            configs.stunnel_server_conf(
                tunnels,
                ip2,
                str(d / "server-sidecar.pem"),
                str(d / "server-sidecar-key.pem"),
                str(d / "root.pem"),
                str(self.workdir / "stunnel-server.out"),
            )
        )
        cli = self.workdir / "stunnel-client.conf"
        cli.write_text(
            configs.stunnel_client_conf(
                tunnels,
                ip2,
                str(d / "client-sidecar.pem"),
                str(d / "client-sidecar-key.pem"),
                str(d / "root.pem"),
                str(self.workdir / "stunnel-client.out"),
            )
        )
        p2 = self.spawn("node2", "stunnel-server", ["stunnel4", str(srv)])
        p1 = self.spawn("node1", "stunnel-client", ["stunnel4", str(cli)])
        for t in tunnels:
            self.wait_listening("node2", t.server_port, "stunnel (server side)", p2)
            self.wait_listening("node1", t.client_port, "stunnel (client side)", p1)
        self.pairs["stunnel-mtls"] = [p1, p2]

    def start_central_lb(self) -> None:
        ip2, ip3 = self.node_ip("node2"), self.node_ip("node3")
        for port in LB_BACKEND_PORTS:
            name = f"lb-backend-{port}"
            self.spawn("node2", name, self.nginx_cmd(name, port))
            self.wait_listening("node2", port, f"nginx {name}")
        cfg = self.workdir / "haproxy-lb.cfg"
        cfg.write_text(
            configs.haproxy_lb_conf(
                ip3,
                {
                    LB_HTTP_PORT: [f"{ip2}:{p}" for p in LB_BACKEND_PORTS],
                    # iperf3's control and data connections must reach the same server.
                    LB_IPERF_PORT: [f"{ip2}:{IPERF_PORT}"],
                },
                self.nproc,
            )
        )
        p = self.spawn("node3", "haproxy-lb", ["haproxy", "-db", "-f", str(cfg)])
        for port in (LB_HTTP_PORT, LB_IPERF_PORT):
            self.wait_listening("node3", port, "haproxy (central lb)", p)
        self.pairs["central-lb"] = [p]

    def ztunnel_pids(self, *nodes: str) -> list[int]:
        pids = []
        for node in nodes:
            pid = self.lab.load().nodes[node].ztunnel_pid
            if pid:
                pids.append(int(pid))
        return pids

    def path_specs(self) -> list[PathSpec]:
        ip2, ip3 = self.node_ip("node2"), self.node_ip("node3")
        specs: dict[str, PathSpec] = {}

        def pair(name: str) -> Callable[[], list[int]]:
            return lambda: [p.pid for p in self.pairs.get(name, [])]

        specs["direct"] = PathSpec(
            "direct",
            "node1",
            None,
            f"http://{ip2}:{WEB_PORT}/{FILE_NAME}",
            ip2,
            IPERF_PORT,
            lambda: [],
        )
        if "meshnode" in self.opts.paths:
            specs["meshnode"] = PathSpec(
                "meshnode",
                "node1",
                "client",
                f"http://{self.vip('web')}:{WEB_PORT}/{FILE_NAME}",
                self.vip("iperf"),
                IPERF_PORT,
                lambda: self.ztunnel_pids("node1", "node2"),
            )
        for name, ports in (("haproxy-mtls", HAPROXY_PORTS), ("stunnel-mtls", STUNNEL_PORTS)):
            if name in self.opts.paths:
                specs[name] = PathSpec(
                    name,
                    "node1",
                    None,
                    f"http://127.0.0.1:{ports['http'][0]}/{FILE_NAME}",
                    "127.0.0.1",
                    ports["iperf"][0],
                    pair(name),
                )
        if "central-lb" in self.opts.paths:
            specs["central-lb"] = PathSpec(
                "central-lb",
                "node1",
                None,
                f"http://{ip3}:{LB_HTTP_PORT}/{FILE_NAME}",
                ip3,
                LB_IPERF_PORT,
                pair("central-lb"),
            )
        if "meshnode-same-node" in self.opts.paths:
            specs["meshnode-same-node"] = PathSpec(
                "meshnode-same-node",
                "node1",
                "client",
                f"http://{self.vip('web-local')}:{LOCAL_WEB_PORT}/{FILE_NAME}",
                self.vip("iperf-local"),
                LOCAL_IPERF_PORT,
                lambda: self.ztunnel_pids("node1"),
            )
        return [specs[p] for p in report.PATHS if p in specs and p in self.opts.paths]

    # -- clients -------------------------------------------------------------------------------

    def client(
        self, node: str, workload: str | None, argv: list[str], limit: float
    ) -> tuple[int, str]:
        """Run a client command to completion (bounded by `limit` seconds) in the
        node (inside the workload's cgroup if one is named); its output."""
        self._out_seq += 1
        out = self.workdir / f"client-{self._out_seq}.out"
        script = f"exec timeout -k 5 {limit:.0f} {shlex.join(argv)} > {shlex.quote(str(out))} 2>&1"
        rc = self.lab.exec(node, ["sh", "-c", script], workload=workload)
        if self.interrupted:
            raise KeyboardInterrupt
        try:
            text = out.read_text(errors="replace")
        except OSError:
            text = ""
        out.unlink(missing_ok=True)
        return rc, text

    def check_paths(self, specs: list[PathSpec]) -> None:
        for s in specs:
            rc, text = self.client(
                s.node,
                s.workload,
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", s.url],
                20,
            )
            if rc != 0 or text.strip() != "200":
                raise BenchError(
                    f"path {s.name}: GET {s.url} from {s.node}"
                    f"{' workload ' + s.workload if s.workload else ''} failed "
                    f"(exit {rc}): {text.strip()[:300]}"
                )
        self.log("every path answers")

    def wrk(self, spec: PathSpec, threads: int, conns: int, close: bool) -> report.WrkResult:
        d = max(1, round(self.opts.duration))
        argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{d}s", "--latency"]
        if close:
            argv += ["-H", "Connection: close"]
        rc, text = self.client(spec.node, spec.workload, [*argv, spec.url], d + 30)
        try:
            res = report.parse_wrk(text)
        except report.ParseError as exc:
            raise BenchError(f"path {spec.name}: {' '.join(argv)} (exit {rc}): {exc}") from None
        if res.requests and res.errors > 0.01 * res.requests:
            self.log(
                f"  warning: {spec.name}: {res.errors} errors in {res.requests} requests "
                f"({' '.join(argv[1:])})"
            )
        return res

    def iperf(self, spec: PathSpec) -> report.IperfResult | None:
        """The iperf3 result, or None after three failed attempts (then the
        path's iperf3 sample is missing and the failures are in results.json)."""
        d = max(1, round(self.opts.duration))
        argv = [
            "iperf3",
            "-c",
            spec.iperf_host,
            "-p",
            str(spec.iperf_port),
            "-t",
            str(d),
            "-J",
            "--connect-timeout",
            "5000",
        ]
        last = ""
        for attempt in range(3):
            # A retry covers an iperf3 server still finishing the previous test (it
            # takes one at a time) and a test cut short by the path; each failure
            # is recorded in results.json.
            rc, text = self.client(spec.node, spec.workload, argv, d + 30)
            try:
                return report.parse_iperf3(text)
            except report.ParseError as exc:
                last = f"(exit {rc}): {exc}"
                self.failures.append(
                    {
                        "path": spec.name,
                        "attempt": attempt + 1,
                        "command": " ".join(argv),
                        "error": last,
                    }
                )
                self.log(f"  {spec.name}: iperf3 attempt {attempt + 1} failed {last}")
                time.sleep(1)
        self.log(f"  warning: {spec.name}: no iperf3 result this repetition")
        return None

    # -- measuring -------------------------------------------------------------------------------

    def measure(self, specs: list[PathSpec]) -> dict[str, dict[str, list[float | None]]]:
        samples: dict[str, dict[str, list[float | None]]] = {
            s.name: {k: [] for k in report.SAMPLED_KEYS} for s in specs
        }
        for rep in range(self.opts.repeat):
            for s in specs:  # interleaved, so a slow minute hurts every path alike
                t0 = time.monotonic()
                row = self.measure_path(s)
                for k, v in row.items():
                    samples[s.name][k].append(v)
                gbps = row["iperf3_gbps"]
                self.log(
                    f"  [{rep + 1}/{self.opts.repeat}] {s.name:<19} "
                    f"iperf3 {'-' if gbps is None else f'{gbps:.2f}'} Gbit/s, "
                    f"ka {row['ka_rps']:.0f}/s, "
                    f"close {row['close_rps']:.0f}/s, p50 {row['lat_p50_us']:.0f} us, "
                    f"p99 {row['lat_p99_us']:.0f} us, cpu {row['proxy_cpu_s']:.1f}s "
                    f"({time.monotonic() - t0:.0f}s)"
                )
        return samples

    @contextlib.contextmanager
    def profiling(self, s: PathSpec, phase: str) -> Any:
        """With --profile: py-spy samples each proxy process of a meshnode path
        while the block runs, written as collapsed stacks (one file per process
        and repetition)."""
        out = self.opts.profile_dir
        if out is None or not s.name.startswith("meshnode"):
            yield
            return
        out.mkdir(parents=True, exist_ok=True)
        d = max(1, round(self.opts.duration))
        spies = []
        for pid in procs.with_children(s.proxies()):
            n = len(list(out.glob(f"{s.name}-{phase}-*-{pid}.txt")))
            path = out / f"{s.name}-{phase}-{n + 1}-{pid}.txt"
            spies.append(
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(d),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        str(path),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        try:
            yield
        finally:
            for spy in spies:
                try:
                    spy.wait(timeout=d + 10)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()

    def measure_path(self, s: PathSpec) -> dict[str, float | None]:
        cpu: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            pids = procs.with_children(s.proxies())
            before = procs.cpu_seconds(pids)
            res = fn()
            cpu[name] = procs.cpu_seconds(pids) - before
            time.sleep(0.3)
            return res

        ip = timed("iperf3", lambda: self.iperf(s))
        with self.profiling(s, "ka"):
            ka = timed("ka", lambda: self.wrk(s, 2, 16, close=False))
        cl = timed("close", lambda: self.wrk(s, 2, 16, close=True))
        lat = timed("lat", lambda: self.wrk(s, 1, 1, close=False))
        rss = [procs.status_mb(p, "VmHWM") for p in procs.with_children(s.proxies())]
        return {
            "iperf3_gbps": ip.gbps if ip is not None else None,
            "ka_rps": ka.rps,
            "close_rps": cl.rps,
            "lat_p50_us": lat.p50_us,
            "lat_p99_us": lat.p99_us,
            "proxy_cpu_s": sum(cpu.values()),
            "ka_cpu_us_per_req": report.per_request_us(cpu["ka"], ka.requests),
            "close_cpu_us_per_req": report.per_request_us(cpu["close"], cl.requests),
            "proxy_rss_mb": sum(r for r in rss if r is not None),
        }

    def ztunnel_peak_mb(self) -> float | None:
        vals = [
            procs.status_mb(p, "VmHWM")
            for p in procs.with_children(self.ztunnel_pids("node1", "node2", "node3"))
        ]
        got = [v for v in vals if v is not None]
        return max(got) if got else None

    # -- memory ---------------------------------------------------------------------------------

    def churn(self, node: str, workload: str | None, url: str) -> None:
        d = max(1, round(self.opts.churn_seconds))
        rc, text = self.client(
            node, workload, ["wrk", "-t1", "-c8", f"-d{d}s", "-H", "Connection: close", url], d + 30
        )
        if "requests in" not in text:
            raise BenchError(f"churn against {url} failed (exit {rc}): {text[-300:]}")

    def memory(self) -> dict[str, Any]:
        """ztunnel RSS on node3 with 1, 10 and 100 workloads, each after a churn of
        connections through it; and one HAProxy sidecar's RSS for comparison."""
        self.log("memory: ztunnel on node3 with 1, 10, 100 workloads")
        url = f"http://{self.vip('web')}:{WEB_PORT}/{FILE_NAME}"
        self.add_workload(
            "node3", "mem-client", "mem-client", MEM_CLIENT_PORT, ["sleep", "infinity"], wait=0
        )
        count, points = 1, []
        for step in MEMORY_STEPS:
            t0 = time.monotonic()
            while count < step:
                name = f"idle-{count}"
                self.add_workload(
                    "node3", name, name, MEM_IDLE_BASE_PORT + count, ["sleep", "infinity"], wait=0
                )
                count += 1
            added = time.monotonic() - t0
            self.churn("node3", "mem-client", url)
            pids = procs.with_children(self.ztunnel_pids("node3"))
            rss = sum(procs.status_mb(p, "VmRSS") or 0.0 for p in pids)
            hwm = sum(procs.status_mb(p, "VmHWM") or 0.0 for p in pids)
            points.append({"workloads": step, "rss_mb": rss, "hwm_mb": hwm})
            self.log(
                f"  {step:>3} workloads: ztunnel RSS {rss:.1f} MB, VmHWM {hwm:.1f} MB "
                f"(adding took {added:.0f}s)"
            )
        # The sidecar comparison: the same churn through the HAProxy pair.
        self.start_haproxy_pair()
        self.churn("node1", None, f"http://127.0.0.1:{HAPROXY_PORTS['http'][0]}/{FILE_NAME}")
        one = max(procs.status_mb(p.pid, "VmHWM") or 0.0 for p in self.pairs["haproxy-mtls"])
        slope = report.slope([(p["workloads"], p["rss_mb"]) for p in points])
        return {
            "node": "node3",
            "points": points,
            "slope_mb_per_workload": slope,
            "peak_rss_mb": max(p["hwm_mb"] for p in points),
            "haproxy_sidecar_rss_mb": one,
            "sidecars_100_estimate_mb": report.sidecar_estimate_mb(one, 100),
            "sidecar_method": "ESTIMATE: 100 x the VmHWM of the larger of the two HAProxy "
            f"processes (nbthread {self.nproc}) of the haproxy-mtls pair after "
            "its runs and the same churn; not measured with 100 processes",
        }

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self, keep_logs: bool = False) -> None:
        for proc in self.background:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.background:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.background.clear()
        try:
            self.lab.down(log=self.log)
        finally:
            if keep_logs:
                self.log(f"logs of the servers and proxies kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
