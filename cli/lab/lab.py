"""`meshnode lab`: a mesh on one machine. Network namespaces are the nodes, a
bridge in a namespace of its own is the network between them, and each node
runs its own node agent (which runs its own ztunnel), exactly as on a VM.

All nodes share one kernel, so each node's BPF programs attach at the node's
own parent cgroup (``<cgroup2>/meshnode-<lab>/<node>``), under which its
workloads' cgroups live; the agent and ztunnel sit in ``<node>/system``, which
is not a workload, so their own connections are never captured.
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
from typing import Any

from meshnode.cli.lab import host
from meshnode.core.errors import MeshnodeError

SUBNET = ipaddress.ip_network("198.18.0.0/24")  # RFC 2544 benchmarking range, lab-only
VIP_RANGE = ipaddress.ip_network("240.0.0.0/4")
TRUST_DOMAIN = "cluster.local"
BPFFS = Path("/sys/fs/bpf")


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
    resources: list[dict[str, Any]] = field(default_factory=list)  # policies, as applied
    ztunnel_workers: int = 1


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
            resources=doc.get("resources", []),
            ztunnel_workers=doc.get("ztunnel_workers", 1),
        )

    def save(self, st: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=1))
        tmp.replace(self.state_file)

    # -- up -----------------------------------------------------------------------------

    def up(self, nodes: int, log: Any = print, workers: int = 1) -> LabState:
        """Start `nodes` nodes. `workers`: ztunnel worker processes per node (the
        lab's nodes share this machine's cores, so one each by default)."""
        host.require_root()
        if not 1 <= nodes <= 50:
            raise LabError("--nodes must be between 1 and 50")
        if self.exists() or host.netns_exists(self.fabric):
            raise LabError(f"lab {self.name!r} is already up (or half up); run `meshnode lab down`")
        from meshnode.controlplane.ca import CertificateAuthority

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = LabState(name=self.name, version=1, ztunnel_workers=workers)
        self.save(st)  # from here on, `lab down` can clean up whatever follows
        ca = CertificateAuthority.create(TRUST_DOMAIN)
        ca.save(self.dir / "ca")
        host.netns_add(self.fabric)
        host.make_bridge(self.fabric)
        cg_root = self.cgroup_root()
        host.cgroup_make(cg_root)
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
            host.cgroup_make(Path(rec.cgroup) / "system")
            self.node_dir(name).mkdir(parents=True, exist_ok=True)
            st.nodes[name] = rec
            self.save(st)
        self._write_configs(st)
        for rec in st.nodes.values():
            proc = host.spawn(
                rec.netns,
                Path(rec.cgroup) / "system",
                [
                    sys.executable,
                    "-m",
                    "meshnode.cli.main",
                    "agent",
                    "run",
                    "--config",
                    str(self.node_dir(rec.name) / "node.json"),
                ],
                log_path=self.node_dir(rec.name) / "agent.log",
            )
            rec.agent_pid = proc.pid
            self.save(st)
        self._wait_applied(st, timeout=90)
        for rec in st.nodes.values():
            log(f"node {rec.name}: {rec.ip} ({rec.zone}), agent pid {rec.agent_pid}")
        return st

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
        """Run cmd as workload `name` of `service`, listening on `port`. The
        service's VIP port is the first workload's port unless `service_port`
        says otherwise; later workloads may listen on other ports."""
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
        svc = st.services.get(service)
        if svc is None:
            svc = ServiceRec(service, namespace, self._next_vip(st), service_port or port)
            st.services[service] = svc
        elif service_port and svc.port != service_port:
            raise LabError(f"service {service} is on port {svc.port}, not {service_port}")
        if any(w.node == node and w.port == port for w in st.workloads.values()):
            raise LabError(f"port {port} on {node} is taken by another workload")
        rec_node = st.nodes[node]
        cgroup = Path(rec_node.cgroup) / f"wl-{name}"
        host.cgroup_make(cgroup)
        wl = WorkloadRec(
            name, node, service, namespace, port, str(cgroup), list(cmd), version=version
        )
        st.workloads[name] = wl
        st.version += 1
        self.save(st)
        # Mesh it first, so its very first connection is already captured.
        self._write_configs(st)
        self._reload_agents(st)
        proc = host.spawn(
            rec_node.netns, cgroup, cmd, log_path=self.node_dir(node) / f"workload-{name}.log"
        )
        wl.pid = proc.pid
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
        host.cgroup_remove_tree(Path(wl.cgroup))
        if not any(w.service == wl.service for w in st.workloads.values()):
            st.services.pop(wl.service, None)
        st.version += 1
        self.save(st)
        self._write_configs(st)
        self._reload_agents(st)

    def apply(self, text: str, source: str) -> list[str]:
        """Apply policy resources (YAML): validated whole, then pushed to every
        node. Returns what changed ("created"/"configured" per resource)."""
        from meshnode.core.resources import parse_documents, resources_to_json

        resources = parse_documents(text, source)  # raises ResourceError, changes nothing
        st = self.load()
        current = {_res_key(r): r for r in st.resources}
        out = []
        for doc in resources_to_json(resources):
            key = _res_key(doc)
            verb = "configured" if key in current else "created"
            if current.get(key) == doc:
                verb = "unchanged"
            current[key] = doc
            out.append(f"{doc['kind']}/{key[2]} {verb}")
        st.resources = list(current.values())
        st.version += 1
        self.save(st)
        self._write_configs(st)
        self._reload_agents(st)
        return out

    def delete_resource(self, kind: str, name: str, namespace: str = "default") -> None:
        st = self.load()
        keep = [r for r in st.resources if _res_key(r) != (kind, namespace, name)]
        if len(keep) == len(st.resources):
            raise LabError(f"no {kind} {namespace}/{name}")
        st.resources = keep
        st.version += 1
        self.save(st)
        self._write_configs(st)
        self._reload_agents(st)

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

    def _next_vip(self, st: LabState) -> str:
        used = {s.vip for s in st.services.values()}
        for i in range(1, 1 << 16):
            vip = str(VIP_RANGE.network_address + i)
            if vip not in used:
                return vip
        raise LabError("VIP range exhausted")

    # -- config for the agents --------------------------------------------------------------

    def _services_doc(self, st: LabState) -> list[dict[str, Any]]:
        out = []
        for svc in st.services.values():
            eps = []
            for w in st.workloads.values():
                if w.service != svc.name:
                    continue
                node = st.nodes[w.node]
                eps.append(
                    {
                        "workload": w.name,
                        "namespace": w.namespace,
                        "service_account": w.service,
                        "node": node.name,
                        "node_ip": node.ip,
                        "address": node.ip,
                        "zone": node.zone,
                        "port": w.port,
                        "service_port": svc.port,
                        "version": w.version,
                    }
                )
            out.append(
                {
                    "name": svc.name,
                    "namespace": svc.namespace,
                    "vip": svc.vip,
                    "ports": [{"port": svc.port, "target_port": svc.port}],
                    "endpoints": eps,
                }
            )
        return out

    def _write_configs(self, st: LabState) -> None:
        services = self._services_doc(st)
        for rec in st.nodes.values():
            doc = {
                "version": st.version,
                "node": {"name": rec.name, "ip": rec.ip, "zone": rec.zone},
                "trust_domain": TRUST_DOMAIN,
                "cgroup_parent": rec.cgroup,
                "state_dir": str(self.node_dir(rec.name) / "state"),
                "bpf_pin_dir": str(self.pin_root() / rec.name),
                "ca_dir": str(self.dir / "ca"),
                "workloads": [
                    {
                        "name": w.name,
                        "namespace": w.namespace,
                        "service_account": w.service,
                        "service": w.service,
                        "port": w.port,
                        "cgroup": w.cgroup,
                    }
                    for w in st.workloads.values()
                    if w.node == rec.name
                ],
                "services": services,
                "resources": st.resources,
                "ztunnel_args": ["--workers", str(st.ztunnel_workers)],
            }
            path = self.node_dir(rec.name) / "node.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)

    def agent_status(self, node: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(
                (self.node_dir(node) / "state" / "agent-status.json").read_text()
            )
            return data
        except (OSError, ValueError):
            return None

    def _reload_agents(self, st: LabState) -> None:
        for rec in st.nodes.values():
            if rec.agent_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rec.agent_pid, signal.SIGHUP)
        self._wait_applied(st, timeout=30)

    def _wait_applied(self, st: LabState, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(st.nodes)
        while pending and time.monotonic() < deadline:
            for node in list(pending):
                status = self.agent_status(node)
                if status and status.get("ready") and status.get("version", 0) >= st.version:
                    pending.discard(node)
                rec = st.nodes[node]
                if rec.agent_pid and not _alive(rec.agent_pid):
                    raise LabError(
                        f"the agent of {node} exited; see "
                        f"{self.node_dir(node) / 'agent.log'}:\n"
                        + _tail(self.node_dir(node) / "agent.log")
                    )
            time.sleep(0.05)
        if pending:
            raise LabError(
                f"nodes {', '.join(sorted(pending))} did not apply config version "
                f"{st.version} within {timeout:.0f}s; see their agent.log in {self.dir}"
            )

    # -- status and down ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.load()
        from meshnode.bpf.loader import MeshBpf

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
                    "agent_pid": rec.agent_pid,
                    "agent_alive": bool(rec.agent_pid and _alive(rec.agent_pid)),
                    "ready": agent.get("ready", False),
                    "config_version": agent.get("version"),
                    "bpf_programs": progs,
                }
            )
        return {
            "lab": self.name,
            "version": st.version,
            "nodes": nodes,
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": s.vip,
                    "port": s.port,
                    "endpoints": [
                        f"{w.name}@{w.node}" for w in st.workloads.values() if w.service == s.name
                    ],
                }
                for s in st.services.values()
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

    def down(self, log: Any = print) -> None:
        """Remove everything the lab made. Works on a half-built lab too."""
        try:
            st: LabState | None = self.load()
        except (LabError, ValueError, KeyError):
            st = None
        if st is not None:
            # Agents first: they stop their ztunnel and detach their BPF programs.
            for rec in st.nodes.values():
                if rec.agent_pid and _alive(rec.agent_pid):
                    os.kill(rec.agent_pid, signal.SIGTERM)
            deadline = time.monotonic() + 25
            for rec in st.nodes.values():
                while rec.agent_pid and _alive(rec.agent_pid) and time.monotonic() < deadline:
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


def _res_key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata", {})
    return (doc["kind"], meta.get("namespace", "default"), meta["name"])


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
