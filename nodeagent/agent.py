"""The node agent: loads the BPF programs and keeps their maps equal to the
node's workloads and the mesh's services, keeps the workloads' certificates
fresh, and hands ztunnel versioned snapshots over its control socket.

One mode: an enrolled node (`meshnode enroll`; the lab enrolls its nodes the
same way). Its config is the control plane's slice, watched and kept on disk,
plus the local workload registry (``EnrolledSource``). ztunnel is its own
process (the meshnode-ztunnel unit), so restarting the agent never touches a
live connection.

Signals: SIGHUP re-reads the config; SIGTERM stops, leaving the BPF programs
and ztunnel running, so traffic keeps flowing while the agent restarts."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from meshnode.core import sdnotify
from meshnode.core.constants import (
    ADMIN_PORT,
    DELIVERY_ADDRESS,
    DNS_PROXY_PORT,
    HBONE_PORT,
    INGRESS_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    READY_PORT,
)
from meshnode.core.contracts.report import EndpointHealth, NodeReport, TrafficEdge
from meshnode.core.errors import MeshnodeError
from meshnode.core.fsutil import write_file_atomic
from meshnode.nodeagent.certs import CaClient, CertFiles, CertManager
from meshnode.nodeagent.config import NodeConfig, NodeConfigError
from meshnode.nodeagent.report import (
    REPORT_INTERVAL_ENV,
    Reporter,
    build_report,
    cert_not_after,
    report_interval,
)
from meshnode.nodeagent.snapshot import (
    assign_workload_ids,
    capture_destinations,
    node_resources,
    strict_ports,
    ztunnel_snapshot,
)
from meshnode.nodeagent.ztunnel_link import ZtunnelAdmin, ZtunnelLink

log = logging.getLogger("meshnode.nodeagent")

# The proxy's listeners: only the proxy's cgroup may bind them (and 127.0.0.6).
PROXY_PORTS = frozenset(
    {OUTBOUND_PORT, HBONE_PORT, ADMIN_PORT, METRICS_PORT, READY_PORT, DNS_PROXY_PORT, INGRESS_PORT}
)
RENEW_CHECK_EVERY = 30.0  # at the latest; earlier when a certificate's half-life comes


class AgentError(MeshnodeError):
    pass


class ConfigSource(Protocol):
    """Where the agent's config comes from: an enrolled node's control plane and
    local registry (EnrolledSource); tests substitute a fake."""

    def load(self) -> NodeConfig: ...
    def ca(self, cfg: NodeConfig) -> CaClient: ...
    def start(self, wake: threading.Event) -> None: ...
    def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


TCP_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def _migrate_queued_connections() -> None:
    """When a ztunnel worker closes its listener (an upgrade retires it, or it
    stops), connections queued on it and not accepted yet move to another worker
    of the same SO_REUSEPORT group instead of being reset (Linux 5.14+)."""
    try:
        if TCP_MIGRATE_REQ.read_text().strip() != "1":
            TCP_MIGRATE_REQ.write_text("1")
            log.info("net.ipv4.tcp_migrate_req=1: a closing proxy listener hands its queue on")
    except OSError as exc:
        log.warning(
            "cannot set net.ipv4.tcp_migrate_req (%s): connections queued on a ztunnel "
            "worker that closes its listener, as in an upgrade, are reset",
            exc.strerror or exc,
        )


class EnrolledSource:
    """An enrolled node: the control plane's slice + the local workloads."""

    def __init__(self, config_dir: Path) -> None:
        from meshnode.bpf.cgroups import cgroup2_mount
        from meshnode.nodeagent.enrolled import CpClient, SliceStore, load_enrollment

        self.e = load_enrollment(config_dir)
        self.e.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.client = CpClient(self.e)
        self.slice = SliceStore(self.e.state_dir / "cp-slice.json")
        if self.slice.load():
            log.info("last control-plane slice loaded: revision %d", self.slice.revision)
        self.cgroup_root = cgroup2_mount()
        self.version = self._load_version()
        self.watcher: Any = None
        self.problems: list[str] = []
        # Workloads the control plane refused (no grant, over the limit): name ->
        # its message. Reported in the status (`meshnode workload add` shows it).
        self.refused: dict[str, str] = {}

    def _load_version(self) -> int:
        try:
            return int(
                json.loads((self.e.state_dir / "agent-status.json").read_text()).get("version", 0)
            )
        except (OSError, ValueError):
            return 0

    def load(self) -> NodeConfig:
        from meshnode.nodeagent.enrolled import load_workloads, node_config_from

        workloads = load_workloads(self.e.files.workloads)
        self._update_trust_bundle()
        self._reconcile_registrations(workloads)
        cfg, self.problems = node_config_from(
            self.e, self.slice.doc, workloads, self.cgroup_root, self.e.bpf_pin_dir
        )
        self.problems += [f"the control plane refused {n}: {m}" for n, m in self.refused.items()]
        for p in self.problems:
            log.warning("%s", p)
        # ztunnel versions must grow with every change, local ones included.
        self.version += 1
        cfg.version = self.version
        return cfg

    def _update_trust_bundle(self) -> None:
        """The control plane's slice carries the trust bundle: during a root
        rotation it holds both roots, then only the new one."""
        bundle = self.slice.doc.get("trust_bundle")
        if not isinstance(bundle, str) or not bundle.strip():
            return
        data = bundle.encode()
        try:
            current = self.e.files.bundle.read_bytes()
        except OSError:
            current = b""
        if data != current:
            write_file_atomic(self.e.files.bundle, data, 0o644)
            log.info(
                "trust bundle updated from the control plane (%d roots)",
                bundle.count("BEGIN CERTIFICATE"),
            )
        self.client.last_bundle = data

    def _reconcile_registrations(self, workloads: list[Any]) -> None:
        """Local registry -> control plane: register what is missing or
        different, remove what is gone. Best effort: the control plane may be
        away; the next reload (or watch answer) tries again."""
        from meshnode.nodeagent.enrolled import ControlPlaneError

        if self.watcher is not None and self.watcher.reachable is False:
            return
        known = {w["name"]: w for w in self.slice.doc.get("workloads", [])}
        local = {w.name for w in workloads}
        self.refused = {n: m for n, m in self.refused.items() if n in local}
        try:
            for w in workloads:
                k = known.get(w.name)
                want = {
                    "name": w.name,
                    "namespace": w.namespace,
                    "service": w.service,
                    "port": w.port,
                    "version": w.version,
                }
                if k is None or any(k.get(f) != v for f, v in want.items()):
                    try:
                        self.client.register_workload(w)
                    except ControlPlaneError as exc:
                        if not 400 <= exc.status < 500:
                            raise  # away or failing: try them all again later
                        # Refused for this workload (not granted, over the limit):
                        # say so and go on with the others.
                        if self.refused.get(w.name) != str(exc):
                            log.error("the control plane refused workload %s: %s", w.name, exc)
                        self.refused[w.name] = str(exc)
                        continue
                    self.refused.pop(w.name, None)
                    log.info("workload %s registered with the control plane", w.name)
            for name in known:
                if name not in local:
                    self.client.delete_workload(name)
                    log.info("workload %s removed from the control plane", name)
        except ControlPlaneError as exc:
            log.warning("cannot register workloads with the control plane yet: %s", exc)

    def ca(self, cfg: NodeConfig) -> CaClient:
        return self.client

    def renewal_due(self) -> float:
        return CertManager.renewal_due(CertFiles(self.e.files.cert, self.e.files.key))

    def renew_node_certificate(self) -> None:
        """The node's own certificate, at half-life: a new key made here, a
        CSR, the control plane signs (authenticated by the current cert)."""
        from meshnode.core.pki import generate_private_key, write_private_key
        from meshnode.nodeagent.enroll import make_node_csr
        from meshnode.nodeagent.enrolled import ControlPlaneError

        if time.time() < self.renewal_due():
            return
        key = generate_private_key()
        try:
            doc = self.client.request(
                "POST",
                "/v1/node/renew",
                {"csr": make_node_csr(key, self.e.trust_domain, self.e.name).decode()},
            )
        except ControlPlaneError as exc:
            log.warning("node certificate not renewed yet: %s", exc)
            return
        write_private_key(self.e.files.key, key)
        write_file_atomic(self.e.files.cert, str(doc["certificate"]).encode(), 0o644)
        log.info("node certificate renewed")

    def start(self, wake: threading.Event) -> None:
        from meshnode.nodeagent.enrolled import CpWatcher

        def changed() -> None:
            self.reload_requested = True
            wake.set()

        self.reload_requested = False
        self.watcher = CpWatcher(self.client, self.slice, changed)
        self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop.set()

    def status(self) -> dict[str, Any]:
        w = self.watcher
        return {
            "node": self.e.name,
            "control_planes": list(self.e.control_planes),
            "cp_reachable": None if w is None else w.reachable,
            "cp_error": "" if w is None else w.last_error,
            "cp_last_contact": 0 if w is None else w.last_contact,
            "cp_revision": self.slice.revision,
            "problems": self.problems,
            "refused": dict(self.refused),
        }


class Agent:
    def __init__(self, source: ConfigSource) -> None:
        self.source = source
        self.cfg = source.load()
        self.certs = CertManager(self.cfg.state_dir / "certs", source.ca(self.cfg))
        self.ids: dict[str, int] = self._load_ids()
        self.bpf: Any = None
        self.link = ZtunnelLink(str(self.cfg.state_dir / "ztunnel.sock"))
        self.pushed_version = 0
        self._kernel: tuple[dict[int, int], set[tuple[int, int]]] = ({}, set())
        self._guarded: int | None = None  # cgroup id the bind guard lets bind
        self.kernel_problems: list[str] = []  # full BPF maps
        self._guard_problem = ""
        self._wake = threading.Event()
        self._reload = False
        self._stop = False
        self.reporter: Reporter | None = None
        self.ztunnel_admin = ZtunnelAdmin()

    # -- paths -----------------------------------------------------------------

    @property
    def snapshot_path(self) -> Path:
        return self.cfg.state_dir / "ztunnel-snapshot.json"

    @property
    def status_path(self) -> Path:
        return self.cfg.state_dir / "agent-status.json"

    def _load_ids(self) -> dict[str, int]:
        try:
            data = json.loads((self.cfg.state_dir / "workload-ids.json").read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError):
            return {}

    # -- applying config ---------------------------------------------------------

    def apply(self, cfg: NodeConfig) -> None:

        self.ids = assign_workload_ids(self.ids, [w.name for w in cfg.workloads])
        write_file_atomic(cfg.state_dir / "workload-ids.json", json.dumps(self.ids).encode(), 0o644)
        certs: dict[str, CertFiles] = {}
        for w in cfg.workloads:
            try:
                certs[w.name] = self.certs.ensure(w.identity(cfg.trust_domain))
            except Exception as exc:  # CA unreachable or refusing: keep the old cert
                files = self.certs.files(w.identity(cfg.trust_domain))
                if files.cert.exists():
                    certs[w.name] = files
                log.error("certificate for workload %s not renewed: %s", w.name, exc)
        bundle = self.certs.bundle_path()
        snap = ztunnel_snapshot(cfg, self.ids, certs, str(bundle))
        members, strict = self._kernel_view(cfg, log_missing=True)
        # Order matters for live traffic: ztunnel must know a workload before the
        # kernel starts sending it that workload's connections.
        write_file_atomic(self.snapshot_path, json.dumps(snap, indent=1).encode(), 0o644)
        self.push(snap)
        dests = capture_destinations(cfg)
        self.kernel_problems = []
        self._sync_map(self.bpf.sync_destinations, dests)
        self._sync_map(self.bpf.sync_workloads, members)
        self._sync_map(self.bpf.sync_strict, strict)
        self._kernel = (members, strict)
        self.cfg = cfg
        log.info(
            "config version %d applied: %d workloads, %d services, %d capture "
            "destinations, %d STRICT ports",
            cfg.version,
            len(cfg.workloads),
            len(cfg.services),
            len(dests),
            len(strict),
        )

    def _sync_map(self, sync: Any, wanted: Any) -> None:
        """One map sync; a full map is an error in the log and in `meshnode
        status`, and the map keeps its previous set (MapFullError writes
        nothing), never half of the new one."""
        from meshnode.bpf.errors import MapFullError

        try:
            sync(wanted)
        except MapFullError as exc:
            log.error("%s", exc)
            self.kernel_problems.append(str(exc))

    def _kernel_view(
        self, cfg: NodeConfig, log_missing: bool = False
    ) -> tuple[dict[int, int], set[tuple[int, int]]]:
        """Membership (cgroup id -> workload id) and STRICT (cgroup id, port)
        as the kernel should see them now. Cgroup ids change whenever a cgroup
        is re-created -- a systemd unit restarting -- so this is re-read often."""
        from meshnode.bpf.cgroups import cgroup_id

        members: dict[int, int] = {}
        cgroup_ids: dict[str, int] = {}
        for w in cfg.workloads:
            try:
                cgroup_ids[w.name] = cgroup_id(Path(w.cgroup))
            except OSError as exc:
                if log_missing:
                    log.error(
                        "workload %s: cgroup %s is not usable (%s); its connections are "
                        "not meshed until it exists",
                        w.name,
                        w.cgroup,
                        exc.strerror,
                    )
                continue
            members[cgroup_ids[w.name]] = self.ids[w.name]
        strict = {
            (cgroup_ids[name], port)
            for name, port in strict_ports(cfg, node_resources(cfg))
            if name in cgroup_ids
        }
        return members, strict

    def follow_cgroups(self) -> None:
        """A workload's cgroup re-created (unit restarted) or appearing late
        (unit started after us): update the kernel's maps at once."""
        members, strict = self._kernel_view(self.cfg)
        if (members, strict) != self._kernel:
            self.kernel_problems = []
            self._sync_map(self.bpf.sync_workloads, members)
            self._sync_map(self.bpf.sync_strict, strict)
            self._kernel = (members, strict)
            log.info("workload cgroups changed; BPF maps updated (%d meshed)", len(members))

    # -- the bind guard: nothing local poses as the proxy ------------------------------

    def proxy_cgroup(self) -> str:
        """The proxy's cgroup, relative to the cgroup2 mount: the node config's
        choice, else our own (a ztunnel we run as our child shares it)."""
        from meshnode.bpf.cgroups import cgroup_of

        return (self.cfg.proxy_cgroup or cgroup_of()).strip("/")

    def guard_proxy(self) -> None:
        """Only the proxy's cgroup may bind the delivery address and the proxy's
        ports; everyone else's bind() fails with EPERM (bpf/bind.c). Followed
        every few seconds: if the cgroup is re-created it gets a new id."""
        from meshnode.bpf.cgroups import cgroup2_mount, cgroup_id
        from meshnode.bpf.errors import BpfError

        try:
            path = self.proxy_cgroup()
            cg = cgroup_id(cgroup2_mount() / path)
        except BpfError as exc:
            problem = (
                f"bind guard not switched on: {exc}; start the proxy "
                "(meshnode-ztunnel) so that its cgroup exists"
            )
            if problem != self._guard_problem:
                log.warning("%s", problem)
                self._guard_problem = problem
            return
        if cg == self._guarded:
            return
        self.bpf.guard_proxy([cg], PROXY_PORTS)
        self._guarded, self._guard_problem = cg, ""
        log.info(
            "bind guard on: only cgroup %s may bind %s and ports %s",
            path,
            DELIVERY_ADDRESS,
            ", ".join(str(p) for p in sorted(PROXY_PORTS)),
        )

    def push(self, snap: dict[str, Any]) -> bool:
        ok, why = self.link.push_snapshot(snap)
        if ok:
            self.pushed_version = snap["version"]
        else:
            log.warning(
                "config version %d not pushed to ztunnel: %s (it loads the snapshot "
                "file when it starts)",
                snap["version"],
                why,
            )
        return ok

    def next_renewal(self) -> float:
        """Epoch seconds of the next half-life among this node's certificates."""
        times = [
            self.certs.renewal_due(self.certs.files(w.identity(self.cfg.trust_domain)))
            for w in self.cfg.workloads
        ]
        if isinstance(self.source, EnrolledSource):
            times.append(self.source.renewal_due())
        return min(times, default=time.time() + RENEW_CHECK_EVERY)

    def renew_certificates(self) -> None:
        if isinstance(self.source, EnrolledSource):
            self.source.renew_node_certificate()
        due = [
            w
            for w in self.cfg.workloads
            if self.certs.needs_renewal(self.certs.files(w.identity(self.cfg.trust_domain)))
        ]
        if due:
            log.info("renewing certificates of %s", ", ".join(w.name for w in due))
            self.cfg.version = self._next_version()
            self.apply(self.cfg)
            self.write_status()

    def _next_version(self) -> int:
        if isinstance(self.source, EnrolledSource):
            self.source.version += 1
            return self.source.version
        return self.cfg.version + 1

    def write_status(self, ready: bool = True) -> None:
        status = {
            "ready": ready,
            "version": self.cfg.version,
            "pushed_version": self.pushed_version,
            "pid": os.getpid(),
            "workload_ids": self.ids,
            "workloads": [w.name for w in self.cfg.workloads],
            "cgroup_parent": self.cfg.cgroup_parent,
            "bpf_pin_dir": self.cfg.bpf_pin_dir,
            "bind_guard": {
                "on": self._guarded is not None,
                "cgroup_id": self._guarded,
                "problem": self._guard_problem or None,
            },
            "updated": time.time(),
            **self.source.status(),
        }
        status["problems"] = [*status.get("problems", []), *self.kernel_problems]
        write_file_atomic(self.status_path, json.dumps(status).encode(), 0o644)

    # -- lifecycle -------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    def run(self) -> None:
        from meshnode.bpf.loader import MeshBpf

        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.bpf = MeshBpf(Path(self.cfg.bpf_pin_dir))
        self.bpf.load()
        _migrate_queued_connections()
        # New programs first, with their maps filled, then the ones a previous agent
        # left: never a moment in which a workload's connect goes uncaptured (a
        # restart, an upgrade). Meanwhile both run; the old ones redirect first and
        # ours leave an already redirected connection alone.
        self.bpf.attach(Path(self.cfg.cgroup_parent))
        detach = True
        try:
            self.guard_proxy()
            self.bpf.capture_dns(self.cfg.dns_capture)
            self.apply(self.cfg)
            stale = self.bpf.detach_stale(Path(self.cfg.cgroup_parent))
            log.info(
                "BPF programs attached at %s%s",
                self.cfg.cgroup_parent,
                f" (replaced {len(stale)} left by a previous agent)" if stale else "",
            )
            log.info(
                "mesh workloads' DNS %s",
                f"goes to the mesh DNS proxy on 127.0.0.1:{DNS_PROXY_PORT}"
                if self.cfg.dns_capture
                else "is not captured (dns_capture off)",
            )
            self.source.start(self._wake)
            self.write_status()
            self._start_reporter()
            sdnotify.notify("READY=1", f"STATUS=config version {self.cfg.version}")
            log.info("node %s ready (config version %d)", self.cfg.name, self.cfg.version)
            last_status = last_cgroups = last_problems = time.monotonic()
            renew_at = min(self.next_renewal(), time.time() + RENEW_CHECK_EVERY)
            while not self._stop:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                if getattr(self.source, "reload_requested", False):
                    self.source.reload_requested = False  # type: ignore[attr-defined]
                    self._reload = True
                if self._reload and not self._stop:
                    self._reload = False
                    self._reload_config()
                now = time.monotonic()
                if now - last_cgroups >= 2:
                    last_cgroups = now
                    self.follow_cgroups()
                    self.guard_proxy()
                if getattr(self.source, "problems", None) and now - last_problems >= 5:
                    # e.g. a systemd unit that was not running yet: resolve again.
                    last_problems = now
                    self._reload = True
                    self._wake.set()
                if self.pushed_version < self.cfg.version and self.push(
                    json.loads(self.snapshot_path.read_text())
                ):
                    # ztunnel (its own unit) was away or late; it has the config now.
                    self.write_status()
                if time.time() >= renew_at:
                    self.renew_certificates()
                    # Not before a second from now: a CA that keeps refusing
                    # must not turn this loop into a busy one.
                    renew_at = max(
                        min(self.next_renewal(), time.time() + RENEW_CHECK_EVERY), time.time() + 1.0
                    )
                if time.monotonic() - last_status > 5:
                    last_status = time.monotonic()
                    self.write_status()
            detach = False  # a stop or restart: traffic keeps flowing meanwhile
        finally:
            sdnotify.notify("STOPPING=1")
            if self.reporter is not None:
                self.reporter.stop.set()
            self.source.stop()
            self.write_status(ready=False)
            if detach:
                self.bpf.detach()
                log.info("node agent stopped; BPF programs detached")
            else:
                log.info(
                    "node agent stopped; BPF programs and ztunnel left running, so "
                    "traffic keeps flowing"
                )

    # -- the health report to the control plane (report.py) ---------------------------------

    def _start_reporter(self) -> None:
        """An enrolled node reports to its control plane every report_interval()
        seconds, on a client of its own (the watch keeps its connection)."""
        if not isinstance(self.source, EnrolledSource):
            return
        interval = report_interval()
        if interval <= 0:
            log.info("no health reports to the control plane (%s=0)", REPORT_INTERVAL_ENV)
            return
        from meshnode.nodeagent.enrolled import CpClient

        self.reporter = Reporter(CpClient(self.source.e), self.gather_report, interval)
        self.reporter.start()

    def gather_report(self) -> NodeReport:
        """What this node says about itself now (the ztunnel part empty while
        ztunnel is away: it then reports not ready)."""
        from meshnode.bpf.loader import MeshBpf

        assert isinstance(self.source, EnrolledSource)
        src = self.source
        ztunnel_ready = self.ztunnel_admin.ready()
        endpoints: list[EndpointHealth] = []
        edges: list[TrafficEdge] = []
        try:
            endpoints, edges = self.ztunnel_admin.report()
        except (OSError, ValueError) as exc:
            log.debug("no endpoint health from ztunnel for the report: %s", exc)
            ztunnel_ready = False
        try:
            programs = [p["name"] for p in MeshBpf.attached_programs(Path(self.cfg.cgroup_parent))]
        except Exception as exc:  # noqa: BLE001 - the report shows what it can
            log.debug("cannot list the attached BPF programs for the report: %s", exc)
            programs = []
        current = src.slice.slice
        return build_report(
            node=src.e.name,
            agent_ready=not self._stop,
            ztunnel_ready=ztunnel_ready,
            config_revision=current.revision if current is not None else 0,
            cert_not_after=cert_not_after(src.e.files.cert),
            bpf_programs=programs,
            endpoints=endpoints,
            edges=edges,
        )

    def _reload_config(self) -> None:
        try:
            cfg = self.source.load()
        except (NodeConfigError, OSError, ValueError) as exc:
            log.error("config not reloaded, keeping version %d: %s", self.cfg.version, exc)
            return
        self.apply(cfg)
        self.write_status()
