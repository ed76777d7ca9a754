"""`meshnode bench --controlplane`: N simulated nodes against one real control plane.

A real `meshnode controlplane run` (SQLite, or PostgreSQL with --db) is started on
loopback. Each simulated node is real where the control plane can tell: a join
token made through the admin API, its own P-256 key and CSR, enrollment over TLS
with the pinned bundle, its node certificate as client certificate for every
later call, W registered workloads (granted by one IdentityGrant for the zone),
one workload certificate, and a watcher (`GET /v1/node/config`, streamed) that
keeps the slice up to date as an agent does. The nodes run in several worker
processes (one asyncio loop each), so that the load generator is not the
bottleneck; the report says when it was.

Measured: enroll rate; registration rate per tenth of the workloads (flat or
not); the full sync of every watcher (time, bytes per node); how long a policy
change and a single-endpoint change take to reach every watcher (p50/p99/max,
bytes per node); the control plane's peak RSS and CPU seconds.

The pure parts (percentiles, rates, the table) are functions of numbers; the
rest is process and socket plumbing, bounded by a deadline per phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from meshnode.bench import procs as proc_stats
from meshnode.core import api
from meshnode.core.errors import MeshnodeError

__all__ = [
    "SimError",
    "SimOptions",
    "percentile",
    "last_vs_first",
    "rate_per_tenth",
    "render",
    "run_simulation",
]

ZONE = "sim"
NAMESPACE = "sim"
CONCURRENCY = 32  # requests in flight per worker process during the bulk phases
WATCH_WAIT = 30  # seconds between the control plane's heartbeats on a watch stream


class SimError(MeshnodeError):
    pass


@dataclass(frozen=True, slots=True)
class SimOptions:
    nodes: int
    workloads: int = 10
    procs: int = 0  # 0: one per core
    db: str | None = None  # None: SQLite in the temporary data dir
    phase_timeout: float = 600.0
    # Node i's workloads live in namespace sim<i mod namespaces>; with node_view
    # "namespace" each node is sent only its namespace's services.
    namespaces: int = 1
    node_view: str = "mesh"


def namespace_of(index: int, namespaces: int) -> str:
    """The namespace of simulated node `index`'s workloads."""
    return NAMESPACE if namespaces <= 1 else f"{NAMESPACE}{index % namespaces}"


# --- pure ----------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def rate_per_tenth(start: float, done: Sequence[float]) -> list[float]:
    """Completions per second in each tenth of the completions (in completion
    order), from `start`: flat when the cost per operation does not grow."""
    times = sorted(done)
    n = len(times)
    if n < 10:
        return [n / max(times[-1] - start, 1e-9)] if times else []
    out = []
    prev_t, prev_i = start, 0
    for k in range(1, 11):
        i = k * n // 10
        t = times[i - 1]
        out.append((i - prev_i) / max(t - prev_t, 1e-9))
        prev_t, prev_i = t, i
    return out


def last_vs_first(rates: Sequence[float]) -> float:
    """The last tenth's rate over the first's: 1.0 is flat, 0.8 is 20% slower."""
    if len(rates) < 2 or rates[0] <= 0:
        return math.nan
    return rates[-1] / rates[0]


def render(result: dict[str, Any]) -> str:
    """The issue's table, and the details, as text."""
    r = result
    lines = [
        f"control plane at scale: {r['nodes']} nodes x {r['workloads']} workloads, "
        f"{r['store']}, {r['procs']} load-generator processes, "
        f"{r.get('namespaces', 1)} namespace(s), node view {r.get('node_view', 'mesh')}",
        "",
        "| nodes | enroll | registering | full sync of all watchers | policy change "
        "p50/p99/max | one endpoint change p50/p99/max | CP RSS | CP CPU |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['nodes']} | {r['enroll_rate']:.0f}/s | {r['registered']} in "
        f"{r['register_seconds']:.1f} s ({r['register_rate']:.0f}/s) | "
        f"{r['sync_seconds']:.1f} s, {r['sync_bytes_per_node'] / 1e6:.2f} MB/node | "
        f"{_ms(r['policy'])} | {_ms(r['endpoint'])}, {r['endpoint']['bytes_per_node']:.0f} B/node "
        f"| {r['cp_rss_mb']:.0f} MB | {r['cp_cpu_seconds']:.1f} s |",
        "",
        "registration rate per tenth of the workloads (/s): "
        + ", ".join(f"{x:.0f}" for x in r["register_rate_per_tenth"])
        + f"  (last tenth / first: {r['register_last_vs_first']:.2f})",
        f"policy change: {r['policy']['bytes_per_node']:.0f} B per node; "
        f"reached {r['policy']['reached']}/{r['nodes']} watchers",
        f"endpoint change: reached {r['endpoint']['reached']} watchers"
        + (" (of its namespace)" if r.get("node_view") == "namespace" else ""),
        f"after a control-plane restart: every watcher caught up in {_ms(r['restart'])} "
        f"(p50/p99/max from the restart), {r['restart']['bytes_per_node']:.0f} B per node; "
        f"reached {r['restart']['reached']}/{r['nodes']}",
        f"load generator CPU {r['loadgen_cpu_seconds']:.1f} s vs control plane "
        f"{r['cp_cpu_seconds']:.1f} s"
        + (
            "  <- the load generator used more CPU than the control plane: on this "
            "machine it, not the control plane, may be the limit"
            if r["loadgen_cpu_seconds"] > r["cp_cpu_seconds"]
            else ""
        ),
    ]
    return "\n".join(lines)


def _ms(p: dict[str, Any]) -> str:
    return f"{p['p50'] * 1000:.0f}/{p['p99'] * 1000:.0f}/{p['max'] * 1000:.0f} ms"


def propagation(applied: float, seen: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """`seen`: (when, bytes) per watcher that saw the change."""
    delays = [t - applied for t, _ in seen]
    return {
        "p50": percentile(delays, 50),
        "p99": percentile(delays, 99),
        "max": max(delays) if delays else math.nan,
        "reached": len(seen),
        "bytes_per_node": (sum(b for _, b in seen) / len(seen)) if seen else 0.0,
    }


# --- the control plane ---------------------------------------------------------------


@dataclass
class _ControlPlane:
    data: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def admin(self) -> Any:
        from meshnode.core.cpclient import ApiClient

        return ApiClient(self.url, b"", unix_socket=str(self.data / api.ADMIN_SOCKET_FILE))

    def rss_peak_mb(self) -> float:
        peak = proc_stats.status_mb(self.proc.pid, "VmHWM")
        return math.nan if peak is None else peak

    def cpu_seconds(self) -> float:
        return proc_stats.cpu_seconds([self.proc.pid])

    def sockets(self) -> int:
        """Sockets the control plane holds open (its listeners and connections)."""
        count = 0
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{self.proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    count += os.readlink(fd.path).startswith("socket:")
        return count

    def wait_parked(self, watchers: int, limit: float = 300.0) -> float:
        """Wait until the control plane holds a connection per watcher, then until
        it is idle; the seconds waited (at most about `limit`)."""
        start = time.monotonic()
        while self.sockets() < watchers and time.monotonic() - start < limit:
            time.sleep(0.5)
        self.settle()
        return time.monotonic() - start

    def settle(self, limit: float = 120.0) -> float:
        """Wait until the control plane is idle (under 10% of a core over half a
        second), at most `limit` seconds; the seconds waited."""
        start = time.monotonic()
        last = self.cpu_seconds()
        while time.monotonic() - start < limit:
            time.sleep(0.5)
            now = self.cpu_seconds()
            if now - last < 0.05:
                break
            last = now
        return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_controlplane(opts: SimOptions, data: Path, port: int = 0) -> _ControlPlane:
    port = port or _free_port()
    # Every simulated node comes from 127.0.0.1: a node holds up to two connections
    # (its watch and one request), plus the enrollment connections of each worker.
    cap = str(4 * opts.nodes + 256)
    cmd = [
        sys.executable, "-m", "meshnode.cli.main", "controlplane", "run",
        "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
        "--max-connections-per-peer", cap, "--max-connections", cap,
        "--max-workloads-per-node", str(opts.workloads + 1), "--log-level", "warning",
        "--node-view", opts.node_view,
    ]  # fmt: skip
    if opts.db:
        cmd += ["--db", opts.db]
    log = open(data.parent / "controlplane.log", "ab")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    cp = _ControlPlane(data, port, proc)
    from meshnode.core.cpclient import ClientError

    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise SimError(
                "the control plane exited:\n" + (data.parent / "controlplane.log").read_text()
            )
        try:
            cp.admin().call("GET", "/v1/admin/nodes", timeout=2)
            return cp
        except ClientError:
            if time.monotonic() > deadline:
                raise SimError("the control plane did not answer within 60 s") from None
            time.sleep(0.1)


# --- the simulated nodes (worker processes) -------------------------------------------


@dataclass
class _Node:
    name: str
    token: str
    address: str
    dir: Path
    namespace: str = NAMESPACE
    session: Any = None  # the watch's kept-alive connection (as the agent keeps it)
    requests: Any = None  # other calls, each on a fresh connection (as the agent makes them)
    revision: int = 0
    seen: dict[int, tuple[float, int]] = field(default_factory=dict)  # revision -> (t, bytes)


async def _request(
    session: Any, method: str, url: str, body: Any = None, timeout: float = 60
) -> tuple[int, Any, int]:
    import aiohttp

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    async with session.request(
        method, url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else {}, len(raw)


async def _worker(conn: Connection, url: str, bundle: bytes, nodes: list[_Node], w: int) -> None:
    import aiohttp

    from meshnode.core.cpclient import tls_context
    from meshnode.core.fsutil import write_file_atomic
    from meshnode.core.identity import SpiffeId
    from meshnode.core.pki import generate_private_key, make_csr, make_node_csr, write_private_key

    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(CONCURRENCY)
    anon = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls_context(bundle), limit=CONCURRENCY)
    )
    watchers: list[asyncio.Task[None]] = []

    async def enroll(node: _Node) -> float:
        async with limit:
            key = generate_private_key()
            csr = make_node_csr(key, None, node.name).decode()
            body = {"token": node.token, "name": node.name, "zone": ZONE, "csr": csr}
            status, doc, _ = await _request(anon, "POST", f"{url}/v1/enroll", body)
            if status != 200:
                raise SimError(f"enrolling {node.name}: HTTP {status} {doc.get('error')}")
            node.dir.mkdir(parents=True, exist_ok=True)
            write_private_key(node.dir / "key.pem", key)
            write_file_atomic(node.dir / "cert.pem", doc["certificate"].encode(), 0o600)
            ctx = tls_context(
                bundle, cert_file=str(node.dir / "cert.pem"), key_file=str(node.dir / "key.pem")
            )
            node.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
            node.requests = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)
            )
            return time.time()

    async def register(node: _Node, i: int, version: str = "") -> tuple[float, int]:
        async with limit:
            body = {
                "name": f"w{i}",
                "namespace": node.namespace,
                "service": f"svc{i}",
                "port": 8000 + i,
            }
            if version:
                body["version"] = version
            status, doc, _ = await _request(node.requests, "POST", f"{url}/v1/node/workloads", body)
            if status != 200:
                raise SimError(f"registering {node.name}/w{i}: HTTP {status} {doc.get('error')}")
            return time.time(), int(doc["revision"])

    async def certificate(node: _Node) -> None:
        async with limit:
            ident = SpiffeId("cluster.local", node.namespace, "svc0")
            body = {
                "csr": make_csr(generate_private_key(), ident).decode(),
                "namespace": node.namespace,
                "service_account": "svc0",
            }
            status, doc, _ = await _request(
                node.requests, "POST", f"{url}/v1/node/certificates", body
            )
            if status != 200:
                raise SimError(f"certificate for {node.name}: HTTP {status} {doc.get('error')}")

    async def full_sync(node: _Node) -> tuple[float, int]:
        async with limit:
            status, doc, size = await _request(node.session, "GET", f"{url}/v1/node/config")
            if status != 200:
                raise SimError(f"sync of {node.name}: HTTP {status} {doc.get('error')}")
            node.revision = int(doc["revision"])
            return time.time(), size

    async def watch(node: _Node) -> None:
        """The agent's watch (nodeagent/enrolled.py): a stream on the kept
        connection, each answer a line, asked again from the revision it holds
        when the stream ends or breaks."""
        from meshnode.core.contracts import AnswerLines

        backoff = api.WATCH_BACKOFF_FIRST
        while True:
            path = f"/v1/node/config?since={node.revision}&wait={WATCH_WAIT}&endpoints=1&stream=1"
            timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_WAIT + 15)
            try:
                async with node.session.get(url + path, timeout=timeout) as resp:
                    if resp.status != 200:
                        await resp.read()
                        raise aiohttp.ClientError(f"HTTP {resp.status}")
                    lines = AnswerLines()
                    async for data in resp.content.iter_any():
                        for line in lines.feed(data):
                            take(node, line)
                    for line in lines.end():
                        take(node, line)
            except (aiohttp.ClientError, TimeoutError, OSError):
                # The agent's back-off: 1 s doubling to 15 s, jittered, so a
                # restarted control plane is not hit in one wave.
                pause, backoff = api.backoff_step(backoff)
                await asyncio.sleep(pause)
                continue
            backoff = api.WATCH_BACKOFF_FIRST

    def take(node: _Node, line: bytes) -> None:
        doc = json.loads(line)
        revision = int(doc["revision"])
        if doc.get("unchanged"):  # nothing for it: watch from there
            node.revision = max(node.revision, revision)
            return
        node.revision = revision
        node.seen[revision] = (time.time(), len(line))

    def seen_since(revision: int, concerned: list[_Node]) -> list[tuple[float, int]]:
        out = []
        for node in concerned:
            hits = [v for r, v in node.seen.items() if r >= revision]
            if hits:
                out.append(min(hits))
        return out

    async def handle(cmd: str, arg: Any) -> Any:
        if cmd == "ping":
            return True
        if cmd == "enroll":
            return await asyncio.gather(*(enroll(n) for n in nodes))
        if cmd == "register":
            done = await asyncio.gather(*(register(n, i) for n in nodes for i in range(w)))
            await asyncio.gather(*(certificate(n) for n in nodes))
            return [t for t, _ in done]
        if cmd == "sync":
            synced = await asyncio.gather(*(full_sync(n) for n in nodes))
            watchers.extend(asyncio.ensure_future(watch(n)) for n in nodes)
            return synced
        if cmd == "seen":  # (revision, deadline, namespace): every watcher (of it) saw it
            revision, deadline, namespace = arg
            concerned = [n for n in nodes if namespace is None or n.namespace == namespace]
            while time.time() < deadline and len(seen_since(revision, concerned)) < len(concerned):
                await asyncio.sleep(0.05)
            return seen_since(revision, concerned)
        if cmd == "change-endpoint":
            return (await register(nodes[0], 0, version="v2"))[1]
        raise SimError(f"unknown command {cmd}")

    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    try:
        while True:
            cmd, arg = await inbox.get()
            if cmd == "stop":
                break
            try:
                reply: tuple[str, Any] = ("ok", await handle(cmd, arg))
            except Exception as exc:  # one line back to the main process
                reply = ("error", f"{type(exc).__name__}: {exc}")
            # The event loop made the pipe non-blocking for its reader; a large reply
            # (a time per workload) must not fail with EAGAIN half-way.
            os.set_blocking(conn.fileno(), True)
            conn.send(reply)
    finally:
        loop.remove_reader(conn.fileno())
        for t in watchers:
            t.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for n in nodes:
            for session in (n.session, n.requests):
                if session is not None:
                    await session.close()
        await anon.close()


def _worker_main(conn: Connection, url: str, bundle: bytes, nodes: list[_Node], w: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_worker(conn, url, bundle, nodes, w))


@dataclass
class _Workers:
    procs: list[Any]
    conns: list[Connection]

    def call(
        self, cmd: str, arg: Any = None, timeout: float = 600, only: int | None = None
    ) -> list[Any]:
        targets = range(len(self.conns)) if only is None else [only]
        for i in targets:
            self.conns[i].send((cmd, arg))
        out = []
        for i in targets:
            if not self.conns[i].poll(timeout):
                raise SimError(f"worker {i} did not finish {cmd!r} within {timeout:.0f} s")
            try:
                status, value = self.conns[i].recv()
            except (OSError, EOFError) as exc:
                raise SimError(
                    f"worker {i} died during {cmd!r} ({exc}); see its error above"
                ) from None
            if status != "ok":
                raise SimError(f"worker {i}, {cmd}: {value}")
            out.append(value)
        return out

    def stop(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("stop", None))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()

    def cpu_seconds(self) -> float:
        return proc_stats.cpu_seconds(p.pid for p in self.procs if p.pid)


# --- the run --------------------------------------------------------------------------


def _flat(parts: list[Any]) -> list[Any]:
    return [x for part in parts for x in part]


def _apply_policy(admin: Any, name: str) -> int:
    """Apply a policy every node is sent (it matches nothing); the new revision."""
    doc = (
        f"kind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: sim}}\n"
        "spec:\n  action: DENY\n  rules: [{from: {namespaces: [nowhere]}}]\n"
    )
    answer = admin.call(
        "POST", "/v1/admin/resources", doc.encode(), content_type="application/yaml"
    )
    return int(answer["revision"])


def run_simulation(opts: SimOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything, the control plane and temporary files removed at the end."""
    if opts.nodes < 1 or opts.workloads < 1:
        raise SimError("--nodes and --workloads must be at least 1")
    procs = opts.procs or os.cpu_count() or 1
    procs = max(1, min(procs, opts.nodes))
    tmp = Path(
        tempfile.mkdtemp(prefix="mncpsim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    data = tmp / "cp"
    data.mkdir(mode=0o700)
    cp: _ControlPlane | None = None
    workers: _Workers | None = None
    try:
        cp = _start_controlplane(opts, data)
        admin = cp.admin()
        identities = ", ".join(
            sorted({f"{namespace_of(i, opts.namespaces)}/*" for i in range(opts.nodes)})
        )
        admin.call(
            "POST",
            "/v1/admin/resources",
            f"kind: IdentityGrant\nmetadata: {{name: sim}}\n"
            f"spec: {{zones: [{ZONE}], identities: [{identities}]}}\n".encode(),
            content_type="application/yaml",
        )
        nodes = []
        for i in range(opts.nodes):
            name = f"sim{i}"
            address = f"198.18.{i // 250}.{i % 250 + 1}"
            token = admin.call(
                "POST", "/v1/admin/tokens", {"node": name, "zone": ZONE, "address": address}
            )["token"]
            namespace = namespace_of(i, opts.namespaces)
            nodes.append(_Node(name, token, address, tmp / "nodes" / name, namespace))
        bundle = (data / "trust-bundle.pem").read_bytes()
        ctx = multiprocessing.get_context("spawn")
        plist, conns = [], []
        for k in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main, args=(child, cp.url, bundle, nodes[k::procs], opts.workloads)
            )
            p.start()
            plist.append(p)
            conns.append(parent)
        workers = _Workers(plist, conns)
        t = opts.phase_timeout
        workers.call("ping", timeout=120)  # every worker up: phases are timed from here
        store = "PostgreSQL" if opts.db else "SQLite"
        log(f"{opts.nodes} nodes in {procs} processes against {cp.url} ({store})")

        start = time.time()
        enrolled = [x for part in workers.call("enroll", timeout=t) for x in part]
        enroll_rate = len(enrolled) / max(max(enrolled) - start, 1e-9)
        log(f"enrolled {len(enrolled)} nodes ({enroll_rate:.0f}/s)")

        start = time.time()
        registered = [x for part in workers.call("register", timeout=t) for x in part]
        reg_seconds = max(registered) - start
        tenths = rate_per_tenth(start, registered)
        log(f"registered {len(registered)} workloads in {reg_seconds:.1f} s")

        start = time.time()
        synced = [x for part in workers.call("sync", timeout=t) for x in part]
        sync_seconds = max(s for s, _ in synced) - start
        sync_bytes = sum(b for _, b in synced) / len(synced)
        log(f"full sync of {len(synced)} watchers in {sync_seconds:.1f} s")
        # Every watcher parked in its stream: a full slice closes its connection,
        # so the fleet reconnects (a TLS handshake each) before it is quiet.
        settled = cp.wait_parked(opts.nodes)
        log(f"every watcher parked and the control plane idle {settled:.1f} s after the sync")

        applied = time.time()
        rev = _apply_policy(admin, "sim-policy")
        seen = _flat(workers.call("seen", (rev, time.time() + 60, None), timeout=90))
        policy = propagation(applied, seen)
        log(f"policy change reached {policy['reached']} watchers")
        cp.settle()

        # With namespace views, only the nodes of the changed workload's namespace
        # are sent the change (the others are not waited for).
        changed_ns = namespace_of(0, opts.namespaces) if opts.node_view == "namespace" else None
        applied = time.time()
        rev2 = workers.call("change-endpoint", None, timeout=60, only=0)[0]
        seen = _flat(workers.call("seen", (rev2, time.time() + 60, changed_ns), timeout=90))
        endpoint = propagation(applied, seen)
        log(f"endpoint change reached {endpoint['reached']} watchers")
        rss, cpu = cp.rss_peak_mb(), cp.cpu_seconds()

        # A restart: every watcher loses its connection, backs off (jittered) and
        # comes back with the revision it holds; the log survives in the store, so
        # they catch up with changes, not full slices. Measured: from the restart
        # to every watcher holding a change made right after it.
        restarted = time.time()
        cp.proc.terminate()
        cp.proc.wait(30)
        cp = _start_controlplane(opts, data, port=cp.port)
        admin = cp.admin()
        rev3 = _apply_policy(admin, "sim-restart")
        seen = _flat(workers.call("seen", (rev3, time.time() + 120, None), timeout=150))
        restart = propagation(restarted, seen)
        log(f"after a restart, {restart['reached']} watchers caught up")

        return {
            "nodes": opts.nodes,
            "workloads": opts.workloads,
            "procs": procs,
            "store": "PostgreSQL" if opts.db else "SQLite",
            "enroll_rate": enroll_rate,
            "registered": len(registered),
            "register_seconds": reg_seconds,
            "register_rate": len(registered) / max(reg_seconds, 1e-9),
            "register_rate_per_tenth": tenths,
            "register_last_vs_first": last_vs_first(tenths),
            "sync_seconds": sync_seconds,
            "sync_bytes_per_node": sync_bytes,
            "policy": policy,
            "endpoint": endpoint,
            "restart": restart,
            "namespaces": opts.namespaces,
            "node_view": opts.node_view,
            "cp_rss_mb": max(rss, cp.rss_peak_mb()),
            "cp_cpu_seconds": cpu + cp.cpu_seconds(),
            "loadgen_cpu_seconds": workers.cpu_seconds(),
            "options": asdict(opts),
        }
    finally:
        if workers is not None:
            workers.stop()
        if cp is not None and cp.proc.poll() is None:
            cp.proc.terminate()
            try:
                cp.proc.wait(15)
            except subprocess.TimeoutExpired:
                cp.proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
