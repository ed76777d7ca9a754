"""`meshnode lab`: a mesh on one machine. Network namespaces are the nodes, a
bridge in a namespace of its own is the network between them. On that bridge
runs a real control plane (`meshnode controlplane run`, SQLite); each node is
enrolled with a join token by `meshnode enroll`, runs its own agent and its own
ztunnel, and meshes workloads with `meshnode workload add`, exactly as a VM
does. Identities are granted with IdentityGrants, services and VIPs come from
the control plane, policies go through its admin API (the root-only socket).

All nodes share one kernel, so each node's BPF programs attach at the node's
own parent cgroup (``<cgroup2>/meshnode-<lab>/<node>``), under which its
workloads' cgroups live; the agent and ztunnel sit in ``<node>/system/agent``
and ``<node>/system/ztunnel`` (the proxy's cgroup for the bind guard), which are
not workloads, so their own connections are never captured.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshnode.core.constants import CONTROLPLANE_METRICS_PORT, METRICS_PORT
from meshnode.core.errors import MeshnodeError
from meshnode.lab import host
from meshnode.nodeagent.report import REPORT_INTERVAL_ENV

if TYPE_CHECKING:
    from collections.abc import Callable

    from meshnode.core.cpclient import ApiClient

SUBNET = ipaddress.ip_network("198.18.0.0/24")  # RFC 2544 benchmarking range, lab-only
CP_IP = str(SUBNET.network_address + 1)  # the control plane, on the fabric's bridge
CP_PORT = 15012
TRUST_DOMAIN = "cluster.local"
BPFFS = Path("/sys/fs/bpf")
_MESHNODE = [sys.executable, "-m", "meshnode.cli.main"]
# Seconds between the nodes' health reports to the control plane (the agent's
# MESHNODE_REPORT_INTERVAL; one set in the environment wins).
LAB_REPORT_INTERVAL = 2.0


class LabError(MeshnodeError):
    pass


@dataclass
class NodeRec:
    name: str
    ip: str
    netns: str
    cgroup: str
    zone: str
    agent_pid: int | None = None
    ztunnel_pid: int | None = None


@dataclass
class ServiceRec:
    name: str
    namespace: str
    vip: str
    port: int


@dataclass
class WorkloadRec:
    name: str
    node: str
    service: str
    namespace: str
    port: int
    cgroup: str
    cmd: list[str]
    pid: int | None = None
    version: str = ""


@dataclass
class LabState:
    name: str
    version: int = 0
    nodes: dict[str, NodeRec] = field(default_factory=dict)
    services: dict[str, ServiceRec] = field(default_factory=dict)
    workloads: dict[str, WorkloadRec] = field(default_factory=dict)
    ztunnel_workers: int = 1
    cp_pid: int | None = None
    # Where the nodes' mesh DNS forwards other names (HOST:PORT); empty: the
    # resolvers of the host's /etc/resolv.conf.
    dns_upstreams: list[str] = field(default_factory=list)


def lab_name() -> str:
    return os.environ.get("MESHNODE_LAB", "mnlab")


class Lab:
    def __init__(self, name: str | None = None) -> None:
        self.name = name or lab_name()
        self.dir = Path(os.environ.get("MESHNODE_LAB_DIR", "/run/meshnode")) / f"lab-{self.name}"
        self.state_file = self.dir / "lab.json"

    # -- names and paths ------------------------------------------------------------

    @property
    def fabric(self) -> str:
        return f"{self.name}-fabric"

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def cgroup_root(self) -> Path:
        from meshnode.bpf.cgroups import cgroup2_mount

        return cgroup2_mount() / f"meshnode-{self.name}"

    def pin_root(self) -> Path:
        return BPFFS / f"meshnode-{self.name}"

    def node_dir(self, node: str) -> Path:
        return self.dir / node

    # -- state ------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.state_file.exists()

    def load(self) -> LabState:
        if not self.exists():
            raise LabError(f"no lab {self.name!r} is up; start one with `meshnode lab up`")
        doc = json.loads(self.state_file.read_text())
        return LabState(
            name=doc["name"],
            version=doc["version"],
            nodes={k: NodeRec(**v) for k, v in doc["nodes"].items()},
            services={k: ServiceRec(**v) for k, v in doc["services"].items()},
            workloads={k: WorkloadRec(**v) for k, v in doc["workloads"].items()},
            ztunnel_workers=doc.get("ztunnel_workers", 1),
            cp_pid=doc.get("cp_pid"),
            dns_upstreams=list(doc.get("dns_upstreams", [])),
        )

    def save(self, st: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=1))
        tmp.replace(self.state_file)

    @property
    def cp_dir(self) -> Path:
        return self.dir / "cp"

    @property
    def cp_url(self) -> str:
        return f"https://{CP_IP}:{CP_PORT}"

    def admin(self) -> ApiClient:
        """The lab's admin client: the control plane's root-only admin socket."""
        from meshnode.core import api
        from meshnode.core.cpclient import ApiClient

        return ApiClient(
            self.cp_url, b"", unix_socket=str(self.cp_dir / api.ADMIN_SOCKET_FILE), timeout=30
        )

    def _call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        from meshnode.core.cpclient import ClientError

        try:
            return self.admin().call(method, path, body, **kw)
        except ClientError as exc:
            raise LabError(
                f"the lab's control plane refused {method} {path}: {exc.message}"
            ) from None

    def node_cgroup(self, node: NodeRec, part: str) -> Path:
        """``system/agent``, ``system/ztunnel`` or ``system`` (lab exec)."""
        return Path(node.cgroup) / part

    # -- up -----------------------------------------------------------------------------

    def up(
        self,
        nodes: int,
        log: Any = print,
        workers: int = 1,
        dns_upstreams: tuple[str, ...] = (),
        progress: Callable[[str], None] | None = None,
    ) -> LabState:
        """A control plane, then `nodes` nodes enrolled with it, each with its agent
        and ztunnel. `workers`: ztunnel worker processes per node (the lab's nodes
        share this machine's cores, so one each by default). `progress` gets one
        line per step done: ``[3/8] node1: enrolled (1.2 s)``."""
        done, total, last = 0, 3 * nodes + 2, time.monotonic()

        def step(what: str) -> None:
            nonlocal done, last
            done, now = done + 1, time.monotonic()
            if progress is not None:
                progress(f"[{done}/{total}] {what} ({now - last:.1f} s)")
            last = now

        host.require_root()
        if not 1 <= nodes <= 50:
            raise LabError("--nodes must be between 1 and 50")
        if self.exists() or host.netns_exists(self.fabric):
            raise LabError(f"lab {self.name!r} is already up (or half up); run `meshnode lab down`")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = LabState(
            name=self.name,
            version=1,
            ztunnel_workers=workers,
            dns_upstreams=list(dns_upstreams),
        )
        self.save(st)  # from here on, `lab down` can clean up whatever follows
        host.netns_add(self.fabric)
        host.make_bridge(self.fabric)
        host.bridge_address(self.fabric, f"{CP_IP}/{SUBNET.prefixlen}")
        cg_root = self.cgroup_root()
        host.cgroup_make(cg_root)
        st.cp_pid = self._start_controlplane(cg_root / "controlplane")
        self.save(st)
        step(f"control plane: answering at {self.cp_url}")
        for i in range(1, nodes + 1):
            name = f"node{i}"
            ip = str(SUBNET.network_address + 10 + i)
            rec = NodeRec(
                name=name,
                ip=ip,
                netns=self.netns(name),
                cgroup=str(cg_root / name),
                zone=f"zone-{'ab'[(i - 1) % 2]}",
            )
            host.netns_add(rec.netns)
            host.plug_node(self.fabric, rec.netns, f"veth-{name}", f"{ip}/{SUBNET.prefixlen}")
            for part in ("system/agent", "system/ztunnel"):
                host.cgroup_make(self.node_cgroup(rec, part))
            self.node_dir(name).mkdir(parents=True, exist_ok=True)
            st.nodes[name] = rec
            self.save(st)
            step(f"{name}: namespace {rec.netns} at {ip}")
        for rec in st.nodes.values():
            self._enroll(rec)
            step(f"{rec.name}: enrolled")
        for rec in st.nodes.values():
            self._start_node(st, rec)
            self.save(st)
            step(f"{rec.name}: agent and ztunnel started")
        self._wait_synced(st, self._revision(), timeout=90)
        step(f"all {nodes} nodes at the control plane's revision")
        for rec in st.nodes.values():
            log(
                f"node {rec.name}: {rec.ip} ({rec.zone}), enrolled as "
                f"spiffe://{TRUST_DOMAIN}/node/{rec.name}, agent pid {rec.agent_pid}, "
                f"ztunnel pid {rec.ztunnel_pid}"
            )
        return st

    def stop_controlplane(self) -> None:
        """Stop the control plane (SIGTERM, then SIGKILL after 10 s); the nodes go
        on from what they hold."""
        st = self.load()
        if st.cp_pid and not _ended(st.cp_pid, signal.SIGTERM):
            _ended(st.cp_pid, signal.SIGKILL)
        st.cp_pid = None
        self.save(st)

    def start_controlplane(self) -> None:
        """Start the control plane again (same data dir, same address)."""
        st = self.load()
        if st.cp_pid and _alive(st.cp_pid):
            return
        st.cp_pid = self._start_controlplane(self.cgroup_root() / "controlplane")
        self.save(st)

    def _start_controlplane(self, cgroup: Path) -> int:
        """`meshnode controlplane run` on the fabric's bridge, until it answers."""
        self.cp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        host.cgroup_make(cgroup)
        log_path = self.dir / "controlplane.log"
        proc = host.spawn(
            self.fabric,
            cgroup,
            [
                *_MESHNODE,
                "controlplane",
                "run",
                "--listen",
                f"{CP_IP}:{CP_PORT}",
                "--advertise",
                CP_IP,
                "--data-dir",
                str(self.cp_dir),
                # Prometheus metrics on the fabric, where a scraper in the lab's
                # network (a node, or the fabric's namespace) reaches them.
                "--metrics-listen",
                f"{CP_IP}:{CONTROLPLANE_METRICS_PORT}",
            ],
            log_path=log_path,
        )
        from meshnode.core.cpclient import ClientError

        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise LabError(f"the lab's control plane exited:\n{_tail(log_path)}")
            try:
                self.admin().call("GET", "/v1/admin/nodes", timeout=2)
                return proc.pid
            except ClientError:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"the lab's control plane did not answer within 30 s:\n{_tail(log_path)}"
                    ) from None
                time.sleep(0.1)

    def _enroll(self, rec: NodeRec) -> None:
        """A join token from the control plane, then `meshnode enroll` on the node,
        from the node's own address (which the control plane then fixes)."""
        token = self._call("POST", "/v1/admin/tokens", {"node": rec.name, "zone": rec.zone})
        cgroup_mount = self.cgroup_root().parent
        proxy = self.node_cgroup(rec, "system/ztunnel").relative_to(cgroup_mount)
        log_path = self.node_dir(rec.name) / "enroll.log"
        proc = host.spawn(
            rec.netns,
            self.node_cgroup(rec, "system/agent"),
            [
                *_MESHNODE,
                "enroll",
                "--cp",
                self.cp_url,
                "--token",
                token["token"],
                "--name",
                rec.name,
                "--zone",
                rec.zone,
                "--no-start",
                "--config-dir",
                str(self.node_dir(rec.name) / "etc"),
                "--state-dir",
                str(self.node_dir(rec.name) / "state"),
                "--cgroup-parent",
                rec.cgroup,
                "--proxy-cgroup",
                str(proxy),
                "--bpf-pin-dir",
                str(self.pin_root() / rec.name),
            ],
            log_path=log_path,
        )
        if proc.wait(timeout=120) != 0:
            raise LabError(f"enrolling {rec.name} failed:\n{_tail(log_path)}")

    def _start_node(self, st: LabState, rec: NodeRec) -> None:
        """The node's ztunnel (in its own cgroup, the proxy's) and its agent, as
        the meshnode-ztunnel and meshnode-agent units run them."""
        self._start_ztunnel(st, rec)
        agent = host.spawn(
            rec.netns,
            self.node_cgroup(rec, "system/agent"),
            [*_MESHNODE, "agent", "run", "--enrolled", str(self.node_dir(rec.name) / "etc")],
            log_path=self.node_dir(rec.name) / "agent.log",
            # Health reports every few seconds, not every 30: a test sees them soon.
            env={REPORT_INTERVAL_ENV: str(LAB_REPORT_INTERVAL), **os.environ},
        )
        rec.agent_pid = agent.pid

    def _start_ztunnel(self, st: LabState, rec: NodeRec) -> None:
        state = self.node_dir(rec.name) / "state"
        ztunnel = host.spawn(
            rec.netns,
            self.node_cgroup(rec, "system/ztunnel"),
            [
                *_MESHNODE,
                "ztunnel",
                "run",
                "--snapshot",
                str(state / "ztunnel-snapshot.json"),
                "--workers",
                str(st.ztunnel_workers),
                "--peer-socket",
                str(state / "peer.sock"),
                # /metrics on the node's lab address too (and on its loopback), for
                # a Prometheus on the lab's network (docs/observability.md).
                "--metrics",
                f"0.0.0.0:{METRICS_PORT}",
                *(arg for up in st.dns_upstreams for arg in ("--dns-upstream", up)),
            ],
            log_path=state / "ztunnel.log",
        )
        rec.ztunnel_pid = ztunnel.pid

    def restart_ztunnel(self, node: str) -> int:
        """Kill the node's ztunnel and start it again, as systemd restarts the
        meshnode-ztunnel unit after a crash; returns the new pid. The agent gives
        the new one its config (it loads the snapshot file at start)."""
        st = self.load()
        rec = st.nodes.get(node)
        if rec is None:
            raise LabError(f"no node {node!r}; nodes are: {', '.join(st.nodes)}")
        if rec.ztunnel_pid:
            _ended(rec.ztunnel_pid, signal.SIGKILL)
        host.cgroup_kill_all(self.node_cgroup(rec, "system/ztunnel"), grace=0.5)  # workers
        self._start_ztunnel(st, rec)
        self.save(st)
        assert rec.ztunnel_pid is not None
        return rec.ztunnel_pid

    # -- workloads ------------------------------------------------------------------------

    def add_workload(
        self,
        node: str,
        name: str,
        service: str,
        port: int,
        cmd: list[str],
        namespace: str = "default",
        wait_listening: float = 10.0,
        version: str = "",
        service_port: int | None = None,
    ) -> WorkloadRec:
        """Run cmd as workload `name` of `service`, listening on `port`: granted its
        identity, registered by `meshnode workload add` on the node, then started.
        The service's VIP port is the first workload's port (`service_port` only
        checks that); later workloads may listen on other ports."""
        st = self.load()
        if node not in st.nodes:
            raise LabError(f"no node {node!r}; nodes are: {', '.join(st.nodes)}")
        if name in st.workloads:
            raise LabError(f"workload {name!r} exists already (on {st.workloads[name].node})")
        if not cmd:
            raise LabError("give the workload's command after `--`")
        from meshnode.core.identity import IdentityError, SpiffeId

        try:
            SpiffeId(TRUST_DOMAIN, namespace, service)
        except IdentityError as exc:
            raise LabError(f"service name: {exc}") from None
        if not name.replace("-", "").isalnum():
            raise LabError(f"workload name {name!r}: use letters, digits and '-'")
        svc = self._services().get(service_key(service, namespace))
        if svc is not None and service_port and svc.port != service_port:
            raise LabError(f"service {service} is on port {svc.port}, not {service_port}")
        if svc is None and service_port and service_port != port:
            raise LabError(
                f"service {service} does not exist yet: its first workload sets its port "
                f"({port}), so --service-port {service_port} cannot hold"
            )
        if any(w.node == node and w.port == port for w in st.workloads.values()):
            raise LabError(f"port {port} on {node} is taken by another workload")
        rec_node = st.nodes[node]
        cgroup = Path(rec_node.cgroup) / f"wl-{name}"
        host.cgroup_make(cgroup)
        # The operator's grant first: the control plane refuses anything else.
        argv = ["workload", "add", name, "--service", service, "--port", str(port)]
        argv += ["--namespace", namespace, "--cgroup", str(cgroup)]
        argv += ["--version", version] if version else []
        try:
            self._grant(node, namespace, service)
            self._on_node(rec_node, argv)
        except LabError:
            host.cgroup_remove_tree(cgroup)  # nothing half-made stays behind
            raise
        wl = WorkloadRec(
            name, node, service, namespace, port, str(cgroup), list(cmd), version=version
        )
        st.workloads[name] = wl
        st.version += 1
        self.save(st)
        # Meshed everywhere first, so its very first connection is already captured.
        self._wait_synced(st, self._revision(), timeout=30)
        proc = host.spawn(
            rec_node.netns, cgroup, cmd, log_path=self.node_dir(node) / f"workload-{name}.log"
        )
        wl.pid = proc.pid
        st.services = self._services()
        self.save(st)
        deadline = time.monotonic() + wait_listening
        while wait_listening and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(
                    f"workload {name} exited with status {proc.returncode}; see "
                    f"{self.node_dir(node) / f'workload-{name}.log'}"
                )
            if host.listening(rec_node.netns, port):
                break
            time.sleep(0.05)
        return wl

    def remove_workload(self, name: str) -> None:
        st = self.load()
        wl = st.workloads.pop(name, None)
        if wl is None:
            raise LabError(f"no workload {name!r}")
        host.cgroup_kill_all(Path(wl.cgroup))
        self._on_node(st.nodes[wl.node], ["workload", "rm", name])
        host.cgroup_remove_tree(Path(wl.cgroup))
        st.version += 1
        st.services = self._services()
        self.save(st)
        self._wait_synced(st, self._revision(), timeout=30)

    def apply(self, text: str, source: str) -> list[str]:
        """Apply policy resources (YAML) through the control plane: validated whole
        (here, then by the control plane), then every node has them. Returns what
        changed ("created"/"configured" per resource)."""
        from meshnode.core.resources import parse_documents

        parse_documents(text, source)  # raises ResourceError, changes nothing
        st = self.load()
        out = self._call(
            "POST",
            "/v1/admin/resources",
            text.encode(),
            content_type="application/yaml",
        )
        st.version += 1
        self.save(st)
        self._wait_synced(st, int(out["revision"]), timeout=30)
        return list(out["results"])

    def delete_resource(self, kind: str, name: str, namespace: str = "default") -> None:
        from urllib.parse import quote

        st = self.load()
        path = f"/v1/admin/resources/{quote(kind)}/{quote(namespace)}/{quote(name)}"
        from meshnode.core.cpclient import ClientError

        try:
            self.admin().call("DELETE", path)
        except ClientError as exc:
            if exc.status == 404:
                raise LabError(f"no {kind} {namespace}/{name}") from None
            raise LabError(f"deleting {kind} {namespace}/{name}: {exc.message}") from None
        st.version += 1
        self.save(st)
        self._wait_synced(st, self._revision(), timeout=30)

    def exec(self, node: str, cmd: list[str], workload: str | None = None) -> int:
        st = self.load()
        if node not in st.nodes:
            raise LabError(f"no node {node!r}; nodes are: {', '.join(st.nodes)}")
        rec = st.nodes[node]
        if workload is not None:
            wl = st.workloads.get(workload)
            if wl is None or wl.node != node:
                raise LabError(f"no workload {workload!r} on {node}")
            cgroup = Path(wl.cgroup)
        else:
            cgroup = Path(rec.cgroup) / "system"
        proc = host.spawn(rec.netns, cgroup, cmd, detach=False)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()

    # -- through the control plane ----------------------------------------------------------

    def _grant(self, node: str, namespace: str, service: str) -> None:
        """An IdentityGrant letting `node` host ``<namespace>/<service>``."""
        grant = f"lab-{node}-{namespace}-{service}"[:63].rstrip("-")
        doc = (
            f"kind: IdentityGrant\nmetadata: {{name: {grant}}}\n"
            f"spec: {{nodes: [{node}], identities: [{namespace}/{service}]}}\n"
        )
        self._call("POST", "/v1/admin/resources", doc.encode(), content_type="application/yaml")

    def _on_node(self, rec: NodeRec, argv: list[str]) -> None:
        """A `meshnode` command on the node, as an operator there would run it."""
        proc = host.run(
            [
                *host.nsenter_prefix(rec.netns),
                *_MESHNODE,
                *argv,
                "--config-dir",
                str(self.node_dir(rec.name) / "etc"),
            ],
            check=False,
        )
        if proc.returncode != 0:
            raise LabError(
                f"`meshnode {' '.join(argv[:3])}` on {rec.name} failed: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )

    def _revision(self) -> int:
        return int(self._call("GET", "/v1/admin/nodes")["revision"])

    def _services(self) -> dict[str, ServiceRec]:
        """The services and VIPs the control plane allocated, by service_key()."""
        out = {}
        for doc in self._call("GET", "/v1/admin/services")["items"]:
            key = service_key(doc["name"], doc["namespace"])
            out[key] = ServiceRec(
                doc["name"], doc["namespace"], doc["vip"], doc["ports"][0]["port"]
            )
        return out

    def agent_status(self, node: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(
                (self.node_dir(node) / "state" / "agent-status.json").read_text()
            )
            return data
        except (OSError, ValueError):
            return None

    def _wait_synced(self, st: LabState, revision: int, timeout: float) -> None:
        """Until every node's agent has the control plane's `revision` and gave it
        to its ztunnel (or one of them died: then say so, with its log)."""
        deadline = time.monotonic() + timeout
        pending = set(st.nodes)
        while pending and time.monotonic() < deadline:
            for node in list(pending):
                status = self.agent_status(node) or {}
                if (
                    status.get("ready")
                    and status.get("cp_revision", 0) >= revision
                    and status.get("pushed_version", 0) >= status.get("version", 1)
                ):
                    pending.discard(node)
                rec = st.nodes[node]
                for what, pid, logf in (
                    ("agent", rec.agent_pid, self.node_dir(node) / "agent.log"),
                    ("ztunnel", rec.ztunnel_pid, self.node_dir(node) / "state" / "ztunnel.log"),
                ):
                    if pid and not _alive(pid):
                        raise LabError(f"the {what} of {node} exited; see {logf}:\n{_tail(logf)}")
            if pending:
                time.sleep(0.05)
        if pending:
            raise LabError(
                f"nodes {', '.join(sorted(pending))} did not apply control-plane revision "
                f"{revision} within {timeout:.0f}s; see their agent.log in {self.dir}"
            )

    # -- status and down ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.load()
        from meshnode.bpf.loader import MeshBpf

        cp: dict[str, Any] = {
            "url": self.cp_url,
            "pid": st.cp_pid,
            "alive": bool(st.cp_pid and _alive(st.cp_pid)),
        }
        try:
            listed = self._call("GET", "/v1/admin/nodes")
            cp["revision"] = listed["revision"]
            registered = {n["name"]: n for n in listed["items"]}
            services = self._call("GET", "/v1/admin/services")["items"]
        except LabError as exc:
            cp["error"] = str(exc)
            registered, services = {}, []
        nodes = []
        for rec in st.nodes.values():
            try:
                progs = MeshBpf.attached_programs(Path(rec.cgroup))
            except Exception as exc:  # status must show what it can
                progs = [{"error": str(exc)}]
            agent = self.agent_status(rec.name) or {}
            nodes.append(
                {
                    "name": rec.name,
                    "ip": rec.ip,
                    "zone": rec.zone,
                    "enrollment": self._enrollment(rec, registered.get(rec.name)),
                    "agent_pid": rec.agent_pid,
                    "agent_alive": bool(rec.agent_pid and _alive(rec.agent_pid)),
                    "ztunnel_pid": rec.ztunnel_pid,
                    "ztunnel_alive": bool(rec.ztunnel_pid and _alive(rec.ztunnel_pid)),
                    "ready": agent.get("ready", False),
                    "config_version": agent.get("version"),
                    "cp_revision": agent.get("cp_revision"),
                    "bpf_programs": progs,
                }
            )
        return {
            "lab": self.name,
            "version": st.version,
            "controlplane": cp,
            "nodes": nodes,
            "services": [
                {
                    "name": s["name"],
                    "namespace": s["namespace"],
                    "vip": s["vip"],
                    "port": s["ports"][0]["port"],
                    "endpoints": [f"{e['workload']}@{e['node']}" for e in s["endpoints"]],
                }
                for s in services
            ],
            "workloads": [
                {
                    "name": w.name,
                    "node": w.node,
                    "service": w.service,
                    "port": w.port,
                    "pid": w.pid,
                    "alive": bool(w.pid and _alive(w.pid)),
                    "identity": f"spiffe://{TRUST_DOMAIN}/ns/{w.namespace}/sa/{w.service}",
                }
                for w in st.workloads.values()
            ],
        }

    def _enrollment(self, rec: NodeRec, registered: dict[str, Any] | None) -> dict[str, Any]:
        """What the node's own certificate says, and what the control plane lists."""
        from cryptography import x509

        out: dict[str, Any] = {"registered": registered is not None}
        if registered is not None:
            out["address"] = registered.get("ip")
        try:
            cert = x509.load_pem_x509_certificate(
                (self.node_dir(rec.name) / "etc" / "node.pem").read_bytes()
            )
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            out["spiffe_id"] = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
            out["cert_expires"] = cert.not_valid_after_utc.isoformat(timespec="seconds")
        except (OSError, ValueError, IndexError, x509.ExtensionNotFound) as exc:
            out["error"] = f"no node certificate: {exc}"
        return out

    def down(self, log: Any = print) -> None:
        """Remove everything the lab made. Works on a half-built lab too."""
        try:
            st: LabState | None = self.load()
        except (LabError, ValueError, KeyError, TypeError):
            st = None
        if st is not None:
            # Agents first (they leave their ztunnel and BPF programs as a node's
            # agent does when it restarts), then ztunnels, then the control plane.
            groups = [
                [r.agent_pid for r in st.nodes.values()],
                [r.ztunnel_pid for r in st.nodes.values()],
                [st.cp_pid],
            ]
            for pids in groups:
                alive = [p for p in pids if p and _alive(p)]
                for pid in alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 25
                while any(_alive(p) for p in alive) and time.monotonic() < deadline:
                    time.sleep(0.05)
        with contextlib.suppress(LabError, OSError):
            cg_root = self.cgroup_root()
            host.cgroup_kill_all(cg_root)
            host.cgroup_remove_tree(cg_root)
        names = {self.fabric}
        if st is not None:
            names |= {rec.netns for rec in st.nodes.values()}
        if Path("/run/netns").is_dir():
            pattern = re.compile(rf"{re.escape(self.name)}-node\d+")
            names |= {p.name for p in Path("/run/netns").iterdir() if pattern.fullmatch(p.name)}
        for ns in sorted(names):
            host.netns_delete(ns)
        shutil.rmtree(self.pin_root(), ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"lab {self.name} removed")


def service_key(name: str, namespace: str) -> str:
    """How LabState.services names a service: ``api`` in namespace default,
    ``<namespace>/<name>`` elsewhere."""
    return name if namespace == "default" else f"{namespace}/{name}"


def _ended(pid: int, sig: int, wait: float = 10.0) -> bool:
    """Send `sig` to `pid` (if it lives) and wait up to `wait` s for it to go;
    True once it is gone."""
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
