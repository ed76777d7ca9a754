"""ztunnel with several worker processes. Python runs one thread of bytecode at
a time, so one process uses one core; a node proxy must use them all. Each
worker binds the outbound and inbound listeners with SO_REUSEPORT and the
kernel spreads new connections over them. The supervisor (this module) starts
and restarts the workers, passes SIGHUP on, drains them on SIGTERM, and serves
the admin, readiness and metrics endpoints for all of them, asking each worker
over its private Unix socket and merging the answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from meshnode.core import sdnotify
from meshnode.core.contracts.report import ZTUNNEL_REPORT_PATH
from meshnode.ztunnel.admin import AdminServer, Response, get_unix, json_response
from meshnode.ztunnel.config import ZtunnelConfig
from meshnode.ztunnel.control import ControlError, ControlServer, ControlState, write_snapshot
from meshnode.ztunnel.metrics import parse_exposition
from meshnode.ztunnel.peer import PATH as PEER_PATH
from meshnode.ztunnel.peer import ConnKey, PeerServer, workload_of_pid_in

log = logging.getLogger("meshnode.ztunnel.supervisor")


def _hostport(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class Worker:
    def __init__(self, index: int, config: ZtunnelConfig, socket_path: str) -> None:
        self.index = index
        self.config = config
        self.socket = socket_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_start = 0.0

    def command(self) -> list[str]:
        c = self.config
        return [
            sys.executable,
            "-m",
            "meshnode.cli.main",
            "ztunnel",
            "run",
            "--snapshot",
            str(c.snapshot),
            "--outbound",
            _hostport(c.outbound),
            "--inbound",
            _hostport(c.inbound),
            "--connect-timeout",
            str(c.connect_timeout),
            "--drain-timeout",
            str(c.drain_timeout),
            "--retire-timeout",
            str(c.retire_timeout),
            "--dns",
            _hostport(c.dns) if c.dns else "off",
            *(arg for up in c.dns_upstreams for arg in ("--dns-upstream", _hostport(up))),
            *(("--ingress-listen", _hostport(c.ingress)) if c.ingress else ()),
            "--workers",
            "1",
            "--admin-socket",
            self.socket,
        ]

    def start(self) -> None:
        # The worker logs to our stdout/stderr: one stream per node proxy. It
        # must not outlive us (a SIGKILLed supervisor would leave it listening).
        # Only the supervisor talks to systemd (NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _read_doc(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# An upgrade re-executes the supervisor in place (same PID, so systemd sees no
# restart). The new image learns from these which workers it inherited (still its
# children) and which generation it is, so its own workers' sockets do not collide.
RETIRE_ENV = "MESHNODE_ZTUNNEL_RETIRE"
GENERATION_ENV = "MESHNODE_ZTUNNEL_GENERATION"


def inherited(environ: dict[str, str]) -> tuple[int, list[int]]:
    """(generation, worker pids to retire) from the environment an upgrade left."""
    try:
        generation = int(environ.get(GENERATION_ENV, "0"))
        pids = [int(p) for p in environ.get(RETIRE_ENV, "").split(",") if p]
    except ValueError:
        return 0, []
    return max(generation, 0), [p for p in pids if p > 1]


def worker_socket(run_dir: Path, generation: int, index: int) -> str:
    suffix = f"-g{generation}" if generation else ""
    return str(run_dir / f"ztunnel-worker-{index}{suffix}.sock")


class Supervisor:
    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config
        self._run_dir = Path(config.snapshot).parent
        self.generation, self._retiring = inherited(dict(os.environ))
        os.environ.pop(RETIRE_ENV, None)
        os.environ.pop(GENERATION_ENV, None)
        self.workers = [
            Worker(i, config, worker_socket(self._run_dir, self.generation, i))
            for i in range(config.workers)
        ]
        self._stopping: asyncio.Event | None = None
        self._upgrade = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGUSR2, self._request_upgrade)
        for w in self.workers:
            w.start()
        cfg = self.config
        admin = AdminServer(self._route)
        await admin.listen_tcp({cfg.admin, cfg.readiness})
        await admin.listen_tcp({cfg.metrics}, only="/metrics")
        peer = PeerServer(self._workload_of_pid, self._peer_lookup)
        await peer.listen(cfg.peer_path)
        control = ControlServer(
            cfg.control_path, ControlState(_read_doc(cfg.snapshot)), self._apply_doc
        )
        await control.start()
        log.info(
            "ztunnel supervisor: %d workers sharing %s and %s",
            len(self.workers),
            _hostport(cfg.outbound),
            _hostport(cfg.inbound),
        )
        loop.create_task(self._notify_when_ready())
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.5)
            self._supervise()
        control.close()
        await admin.close()
        await peer.close()
        if self._upgrade:
            try:
                self._reexec()  # does not return
            except OSError as exc:
                log.error(
                    "upgrade failed: cannot re-execute %s (%s); stopping, so that systemd "
                    "restarts ztunnel from the installed code",
                    sys.executable,
                    exc.strerror or exc,
                )
                await self._stop_workers()
                raise SystemExit(1) from None
        sdnotify.notify("STOPPING=1")
        await self._stop_workers()

    def _request_upgrade(self) -> None:
        log.info("upgrade asked (SIGUSR2): re-executing the supervisor from the installed code")
        self._upgrade = True
        if self._stopping is not None:
            self._stopping.set()

    def _reexec(self) -> None:
        """Replace this process's image with the installed meshnode (same PID, same
        command line). Our workers go on serving meanwhile; the new image starts
        new workers, and retires these once the new ones are ready."""
        # Workers still retiring from an earlier upgrade go along: the new image
        # reaps them too (a second SIGUSR2 to a retiring worker changes nothing).
        pids = [w.proc.pid for w in self.workers if w.proc is not None and w.alive()]
        pids += self._retiring
        env = dict(
            os.environ,
            **{RETIRE_ENV: ",".join(map(str, pids)), GENERATION_ENV: str(self.generation + 1)},
        )
        logging.shutdown()
        argv = list(sys.orig_argv)
        os.execve(sys.executable, argv, env)

    def _workload_of_pid(self, pid: int) -> int | None:
        doc = _read_doc(self.config.snapshot) or {}
        pin_dir = doc.get("bpf_pin_dir")
        return workload_of_pid_in(pin_dir if isinstance(pin_dir, str) else None, pid)

    async def _peer_lookup(self, key: ConnKey, workload: int) -> tuple[int, dict[str, Any]]:
        """The worker that delivered the connection knows it; the asker's
        workload (checked here) goes along, so a worker answers only for it."""
        query = urlencode(
            {
                "local": f"{key.local_ip}:{key.local_port}",
                "remote": f"{key.remote_ip}:{key.remote_port}",
                "workload": str(workload),
            }
        )
        answers = await self._ask_all(f"{PEER_PATH}?{query}")
        for a in answers:
            if a is not None and a[0] == 200:
                return 200, json.loads(a[1])
        return 404, {
            "error": f"no meshed connection {key.local_ip}:{key.local_port} <- "
            f"{key.remote_ip}:{key.remote_port} of your workload"
        }

    async def _versions(self) -> list[int | None]:
        out: list[int | None] = []
        for a in await self._ask_all("/config_dump"):
            try:
                out.append(int(json.loads(a[1])["state"]["version"]) if a and a[0] == 200 else None)
            except (ValueError, KeyError):
                out.append(None)
        return out

    async def _notify_when_ready(self) -> None:
        while not self._stopping or not self._stopping.is_set():
            if all(v is not None for v in await self._versions()):
                sdnotify.notify("READY=1", f"STATUS={len(self.workers)} workers serving")
                self._retire_inherited()
                return
            await asyncio.sleep(0.1)

    def _retire_inherited(self) -> None:
        """Our workers serve: the workers of the image before the upgrade stop
        taking connections and finish the ones they have."""
        for pid in self._retiring:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)
        if self._retiring:
            log.info(
                "upgrade: %d new workers serving; %d old workers retire (pids %s)",
                len(self.workers),
                len(self._retiring),
                ", ".join(map(str, self._retiring)),
            )

    def _reap_retiring(self) -> None:
        for pid in list(self._retiring):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._retiring.remove(pid)
                log.info(
                    "retired worker %d exited (status %d)", pid, os.waitstatus_to_exitcode(status)
                )
        if not self._retiring:
            for old in self._run_dir.glob("ztunnel-worker-*.sock"):
                if str(old) not in {w.socket for w in self.workers}:
                    with contextlib.suppress(OSError):
                        old.unlink()

    async def _apply_doc(self, version: int, doc: dict[str, Any]) -> None:
        write_snapshot(str(self.config.snapshot), doc)
        self._forward(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            versions = await self._versions()
            if all(v is not None and v >= version for v in versions):
                return
            await asyncio.sleep(0.05)
        raise ControlError(f"not every worker loaded version {version} within 10s")

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.alive():
                assert w.proc is not None
                w.proc.send_signal(sig)

    def _supervise(self) -> None:
        if self._retiring:
            self._reap_retiring()
        now = time.monotonic()
        for w in self.workers:
            if w.alive() or now < w.next_start:
                continue
            code = w.proc.returncode if w.proc else None
            w.restarts += 1
            delay = min(30.0, 0.5 * 2 ** min(w.restarts, 6))
            w.next_start = now + delay
            log.error(
                "ztunnel worker %d exited (status %s); restarting it (restart %d)",
                w.index,
                code,
                w.restarts,
            )
            w.start()

    async def _stop_workers(self) -> None:
        self._forward(signal.SIGTERM)
        for pid in self._retiring:  # still finishing an upgrade: they stop too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + 5
        for w in self.workers:
            while w.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.alive():
                assert w.proc is not None
                log.error("ztunnel worker %d did not stop; killing it", w.index)
                w.proc.kill()
        log.info("ztunnel stopped")

    # -- admin: ask every worker, merge ------------------------------------------------

    async def _ask_all(self, target: str) -> list[tuple[int, bytes] | None]:
        async def ask(w: Worker) -> tuple[int, bytes] | None:
            try:
                return await get_unix(w.socket, target, timeout=3)
            except (OSError, TimeoutError):
                return None

        return list(await asyncio.gather(*(ask(w) for w in self.workers)))

    async def _route(self, method: str, target: str) -> Response:
        path = urlsplit(target).path
        if method != "GET":
            return json_response(405, {"error": "only GET"})
        answers = await self._ask_all(target)
        if path == "/healthz/ready":
            ready = all(a is not None and a[0] == 200 for a in answers)
            return json_response(
                200 if ready else 503,
                {"ready": ready, "workers": [bool(a and a[0] == 200) for a in answers]},
            )
        if path == "/metrics":
            texts = [a[1].decode() for a in answers if a is not None and a[0] == 200]
            return 200, "text/plain; version=0.0.4", merge_metrics(texts).encode()
        if path == "/config_dump":
            dumps = [json.loads(a[1]) for a in answers if a is not None and a[0] == 200]
            if len(dumps) < len(self.workers):
                return json_response(503, {"error": "not every ztunnel worker answered"})
            merged = dict(dumps[0])
            # The version every worker has: what the agent waits for.
            merged["state"] = dict(dumps[0]["state"])
            merged["state"]["version"] = min(d["state"]["version"] for d in dumps)
            # Each worker balances on its own view; show all, tagged.
            merged["endpoints"] = [
                dict(e, worker=i) for i, d in enumerate(dumps) for e in d.get("endpoints", [])
            ]
            merged["pool"] = {k: sum(d["pool"][k] for d in dumps) for k in dumps[0]["pool"]}
            merged["active_connections"] = sum(d["active_connections"] for d in dumps)
            merged["workers"] = len(dumps)
            merged["config"] = dict(dumps[0]["config"], workers=self.config.workers)
            return json_response(200, merged)
        if path == ZTUNNEL_REPORT_PATH:  # the node's health report: every worker's view, merged
            docs = [json.loads(a[1]) for a in answers if a is not None and a[0] == 200]
            if len(docs) < len(self.workers):
                return json_response(503, {"error": "not every ztunnel worker answered"})
            return json_response(200, merge_reports(docs))
        for a in answers:  # the rest: the first worker that knows
            if a is not None and a[0] == 200:
                return 200, "application/json", a[1]
        first = next((a for a in answers if a is not None), None)
        if first is None:
            return json_response(503, {"error": "no worker answered"})
        return first[0], "application/json", first[1]


def merge_reports(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``/report`` answers as one: an endpoint is ejected if any
    worker ejected it (the slowest EWMA wins); edges' counters add up."""
    endpoints: dict[tuple[str, str], dict[str, Any]] = {}
    edges: dict[tuple[str, str, bool], dict[str, Any]] = {}
    for doc in docs:
        for e in doc.get("endpoints", []):
            seen = endpoints.setdefault((e["service"], e["address"]), dict(e))
            seen["ejected"] = seen["ejected"] or e["ejected"]
            seen["ewma_ms"] = max(seen["ewma_ms"], e["ewma_ms"])
        for e in doc.get("edges", []):
            key = (e["source"], e["destination"], e["mtls"])
            if key not in edges:
                edges[key] = dict(e)
                continue
            for k in ("connections", "bytes_sent", "bytes_received"):
                edges[key][k] += e[k]
    return {"endpoints": list(endpoints.values()), "edges": list(edges.values())}


def merge_metrics(texts: list[str]) -> str:
    """Sum the same series across workers (counters, gauges and histogram
    buckets all add up: each worker counts its own connections)."""
    meta: OrderedDict[str, list[str]] = OrderedDict()
    values: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], float] = OrderedDict()
    family_of: dict[str, str] = {}
    for text in texts:
        current = ""
        for line in text.splitlines():
            if line.startswith("# HELP "):
                current = line.split(" ", 3)[2]
                meta.setdefault(current, [])
                if len(meta[current]) < 2:
                    meta[current].append(line)
            elif line.startswith("# TYPE ") and len(meta.get(current, [])) < 2:
                meta[current].append(line)
        for sample in parse_exposition(text):
            key = (sample.name, tuple(sample.labels.items()))
            values[key] = values.get(key, 0.0) + sample.value
            family_of.setdefault(sample.name, _family(sample.name, meta))
    out: list[str] = []
    for fam, lines in meta.items():
        out.extend(lines)
        for (name, labels), v in values.items():
            if family_of.get(name) == fam:
                body = ",".join(f'{k}="{_esc(val)}"' for k, val in labels)
                out.append(f"{name}{{{body}}} {_num(v)}" if body else f"{name} {_num(v)}")
    return "\n".join(out) + "\n"


def _family(name: str, meta: dict[str, Any]) -> str:
    if name in meta:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in meta:
            return name[: -len(suffix)]
    return name


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)
