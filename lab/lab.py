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

With ``--zones Z`` (2..4) the lab is a multi-zone mesh (docs/multizone.md): a
WAN namespace with the global control plane on its bridge, and per zone a
namespace with the zone's bridge, its control plane (enrolled with the global)
and a leg on the WAN; that namespace is the zone's router. Each zone's last
node runs the zone ingress. Nodes reach their own zone directly and other zones
only at their ingress (``_route_zones`` has the addresses, routes and filter).
"""

from __future__ import annotations

import contextlib
import functools
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

from meshnode.core.constants import CONTROLPLANE_METRICS_PORT, INGRESS_PORT, METRICS_PORT
from meshnode.core.errors import MeshnodeError
from meshnode.lab import host
from meshnode.nodeagent.report import REPORT_INTERVAL_ENV

if TYPE_CHECKING:
    from collections.abc import Callable

    from meshnode.core.cpclient import ApiClient

SUBNET = ipaddress.ip_network("198.18.0.0/24")  # RFC 2544 benchmarking range, lab-only
CP_IP = str(SUBNET.network_address + 1)  # the control plane, on the fabric's bridge
CP_PORT = 15012
# Multi-zone (also in 198.18.0.0/15): zone k (1-based) is 198.18.k.0/24, its router
# and control plane at .1; the WAN between the zones' routers is 198.18.200.0/24,
# the global control plane at .1 and zone k's router at .(10 + k).
WAN = ipaddress.ip_network("198.18.200.0/24")
GLOBAL_IP = str(WAN.network_address + 1)
MAX_ZONES = 4
GLOBAL = "global"  # how the lab names the global control plane (cp="global")
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
    # Multi-zone: the service's VIP in each zone (each zone allocates its own);
    # `vip` is then the first zone's.
    vips: dict[str, str] = field(default_factory=dict)


@dataclass
class ZoneRec:
    """One zone of a multi-zone lab: its network namespace holds the zone's bridge,
    its control plane (on the bridge, at `cp_ip`) and a leg on the WAN (`wan_ip`),
    and routes between them (the zone's router)."""

    name: str
    netns: str
    subnet: str
    cp_ip: str
    wan_ip: str
    ingress_node: str
    ingress_ip: str
    cp_pid: int | None = None

    @property
    def ingress(self) -> str:
        return f"{self.ingress_ip}:{INGRESS_PORT}"


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
    # Multi-zone: the zones by name (empty: one control plane, as before); cp_pid
    # is then the global control plane's.
    zones: dict[str, ZoneRec] = field(default_factory=dict)


def zone_name(k: int) -> str:
    """The lab's k-th zone (1-based): zone-a, zone-b, ..."""
    return f"zone-{'abcdefghijklmnopqrstuvwxyz'[k - 1]}"


def zone_subnet(k: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"198.18.{k}.0/24")


def _zone_index(zone: str) -> int:
    """zone-a -> 1, zone-b -> 2, ... (the lab's own zone names only)."""
    letter = zone.removeprefix("zone-")
    if len(letter) != 1 or not "a" <= letter <= "z" or not zone.startswith("zone-"):
        raise LabError(f"{zone!r} is not a zone of a lab (zone-a, zone-b, ...)")
    return ord(letter) - ord("a") + 1


def _zone_cp_ip(zone: str) -> str:
    return str(zone_subnet(_zone_index(zone)).network_address + 1)


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
            zones={k: ZoneRec(**v) for k, v in doc.get("zones", {}).items()},
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

    # A control plane of the lab is named by `cp`: "" (the one of a single-zone
    # lab), "global" or a zone's name (multi-zone).

    @property
    def wan(self) -> str:
        """Multi-zone: the network namespace of the WAN and the global control plane."""
        return f"{self.name}-wan"

    def zone_netns(self, zone: str) -> str:
        return f"{self.name}-{zone}"

    def cp_dir_of(self, cp: str) -> Path:
        return self.cp_dir if not cp else self.dir / f"cp-{cp}"

    def cp_url_of(self, cp: str) -> str:
        if not cp:
            return self.cp_url
        if cp == GLOBAL:
            return f"https://{GLOBAL_IP}:{CP_PORT}"
        return f"https://{_zone_cp_ip(cp)}:{CP_PORT}"

    def _main_cp(self) -> str:
        """The control plane policies go to: the only one, or the global one."""
        return GLOBAL if self.cp_dir_of(GLOBAL).is_dir() else ""

    def admin(self, cp: str | None = None) -> ApiClient:
        """The lab's admin client: the control plane's root-only admin socket (by
        default the lab's only control plane, or its global one)."""
        from meshnode.core import api
        from meshnode.core.cpclient import ApiClient

        cp = self._main_cp() if cp is None else cp
        return ApiClient(
            self.cp_url_of(cp),
            b"",
            unix_socket=str(self.cp_dir_of(cp) / api.ADMIN_SOCKET_FILE),
            timeout=30,
        )

    def _call(
        self, method: str, path: str, body: Any = None, *, cp: str | None = None, **kw: Any
    ) -> Any:
        from meshnode.core.cpclient import ClientError

        cp = self._main_cp() if cp is None else cp
        try:
            return self.admin(cp).call(method, path, body, **kw)
        except ClientError as exc:
            which = "" if not cp else f" ({cp})"
            raise LabError(
                f"the lab's control plane{which} refused {method} {path}: {exc.message}"
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
        zones: int = 1,
    ) -> LabState:
        """A control plane, then `nodes` nodes enrolled with it, each with its agent
        and ztunnel. `workers`: ztunnel worker processes per node (the lab's nodes
        share this machine's cores, so one each by default). `progress` gets one
        line per step done: ``[3/8] node1: enrolled (1.2 s)``. With `zones` > 1, a
        multi-zone lab of `nodes` nodes per zone (:meth:`_up_zones`)."""
        if not 1 <= zones <= MAX_ZONES:
            raise LabError(f"--zones must be between 1 and {MAX_ZONES}")
        if zones > 1:
            return self._up_zones(zones, nodes, log, workers, dns_upstreams, progress)
        step = _stepper(3 * nodes + 2, progress)
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

    def _up_zones(
        self,
        zones: int,
        nodes: int,
        log: Any,
        workers: int,
        dns_upstreams: tuple[str, ...],
        progress: Callable[[str], None] | None,
    ) -> LabState:
        """The multi-zone lab: the WAN and the global control plane, then per zone
        its router namespace and its `nodes` nodes (node1.. across zones), the
        routes and filters, each zone's control plane (enrolled with a zone token
        from the global), and the nodes enrolled with their zone's control plane."""
        step = _stepper(3 * zones * nodes + zones + 3, progress)
        host.require_root()
        if shutil.which("iptables") is None:
            raise LabError(
                "`iptables` is missing: a multi-zone lab's zone routers filter what crosses "
                "the WAN with it; install it (apt-get install iptables)"
            )
        if nodes < 1 or zones * nodes > 50:
            raise LabError("--nodes (per zone) must be at least 1, and 50 nodes in all at most")
        if self.exists() or host.netns_exists(self.fabric) or host.netns_exists(self.wan):
            raise LabError(f"lab {self.name!r} is already up (or half up); run `meshnode lab down`")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = LabState(
            name=self.name,
            version=1,
            ztunnel_workers=workers,
            dns_upstreams=list(dns_upstreams),
        )
        cg_root = self.cgroup_root()
        members: dict[str, list[NodeRec]] = {}
        for k in range(1, zones + 1):
            zone, subnet = zone_name(k), zone_subnet(k)
            members[zone] = []
            for i in range((k - 1) * nodes + 1, k * nodes + 1):
                name = f"node{i}"
                ip = str(subnet.network_address + 10 + i)
                members[zone].append(
                    NodeRec(name, ip, self.netns(name), str(cg_root / name), zone=zone)
                )
            ingress = members[zone][-1]
            st.zones[zone] = ZoneRec(
                name=zone,
                netns=self.zone_netns(zone),
                subnet=str(subnet),
                cp_ip=str(subnet.network_address + 1),
                wan_ip=str(WAN.network_address + 10 + k),
                ingress_node=ingress.name,
                ingress_ip=ingress.ip,
            )
        self.save(st)  # from here on, `lab down` can clean up whatever follows
        host.netns_add(self.wan)
        host.make_bridge(self.wan)
        host.bridge_address(self.wan, f"{GLOBAL_IP}/{WAN.prefixlen}")
        host.cgroup_make(cg_root)
        st.cp_pid = self._start_cp(GLOBAL)
        self.save(st)
        step(f"global control plane: answering at {self.cp_url_of(GLOBAL)}")
        for zrec in st.zones.values():
            host.netns_add(zrec.netns)
            host.make_bridge(zrec.netns)
            prefix = ipaddress.ip_network(zrec.subnet).prefixlen
            host.bridge_address(zrec.netns, f"{zrec.cp_ip}/{prefix}")
            wan_leg = f"{zrec.wan_ip}/{WAN.prefixlen}"
            host.plug_node(self.wan, zrec.netns, f"veth-{zrec.name}", wan_leg, peer="wan0")
            host.enable_forwarding(zrec.netns)
            for rec in members[zrec.name]:
                host.netns_add(rec.netns)
                host.plug_node(zrec.netns, rec.netns, f"veth-{rec.name}", f"{rec.ip}/{prefix}")
                for part in ("system/agent", "system/ztunnel"):
                    host.cgroup_make(self.node_cgroup(rec, part))
                self.node_dir(rec.name).mkdir(parents=True, exist_ok=True)
                st.nodes[rec.name] = rec
                self.save(st)
                step(f"{rec.name}: namespace {rec.netns} at {rec.ip} ({zrec.name})")
        self._route_zones(st)
        step(f"routes: {', '.join(f'{z.name} {z.subnet}' for z in st.zones.values())}, WAN {WAN}")
        for zrec in st.zones.values():
            token = self._call(
                "POST", "/v1/admin/tokens", {"zone_controlplane": zrec.name}, cp=GLOBAL
            )["token"]
            zrec.cp_pid = self._start_cp(zrec.name, zrec, token=str(token))
            self.save(st)
            step(f"{zrec.name}: control plane answering at {self.cp_url_of(zrec.name)}")
        for rec in st.nodes.values():
            self._enroll(rec, cp=rec.zone)
            step(f"{rec.name}: enrolled with {rec.zone}")
        for rec in st.nodes.values():
            self._start_node(st, rec)
            self.save(st)
            step(f"{rec.name}: agent and ztunnel started")
        self._sync(st, timeout=90)
        step(f"all {len(st.nodes)} nodes at their zone control plane's revision")
        for zrec in st.zones.values():
            log(
                f"zone {zrec.name}: {zrec.subnet}, control plane {self.cp_url_of(zrec.name)} "
                f"(pid {zrec.cp_pid}), ingress {zrec.ingress_node} at {zrec.ingress}"
            )
        for rec in st.nodes.values():
            log(
                f"node {rec.name}: {rec.ip} ({rec.zone}), enrolled as "
                f"spiffe://{TRUST_DOMAIN}/node/{rec.name}, agent pid {rec.agent_pid}, "
                f"ztunnel pid {rec.ztunnel_pid}"
            )
        log(f"global control plane {self.cp_url_of(GLOBAL)} (pid {st.cp_pid}), WAN {WAN}")
        return st

    def _route_zones(self, st: LabState) -> None:
        """Who reaches what across zones.

        - A node reaches its own zone on its bridge (connected), and each other
          zone's ingress address (/32) via its zone's router; the ingress node also
          reaches the other zones' subnets via the router (its replies to callers
          there). Nothing reaches the WAN: no node has a route to it.
        - A router reaches the other zones' subnets via their routers' WAN legs.
        - Its filter (iptables FORWARD, in the router's namespace: stateful, so
          replies pass): from the WAN into the zone only new connections to the
          zone's ingress (TCP :15443); from the zone onto the WAN only new
          connections to another zone's ingress; replies of those; nothing else.
          And (INPUT) nothing new from the WAN to the router itself: its zone
          control plane connects out to the global one, nobody connects in.
          Routes alone cannot do that: a reply from another zone's ingress to a
          caller here needs the route back, and that route would carry a new
          connection to any node here just as well.
        Traffic inside a zone (bridged) and the zone control plane's own traffic
        (to the global, from this namespace) do not cross the FORWARD chain.
        """
        zones = list(st.zones.values())
        port = str(INGRESS_PORT)
        for zrec in zones:
            others = [z for z in zones if z is not zrec]
            for other in others:
                host.add_route(zrec.netns, other.subnet, other.wan_ip)
            ipt = functools.partial(host.iptables, zrec.netns, "-A", "FORWARD")
            new_tcp = ["-p", "tcp", "--dport", port, "-m", "conntrack", "--ctstate", "NEW"]
            ipt("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            inbound, outbound = ["-i", "wan0", "-o", "br0"], ["-i", "br0", "-o", "wan0"]
            ipt(*inbound, "-d", f"{zrec.ingress_ip}/32", *new_tcp, "-j", "ACCEPT")
            for other in others:
                ipt(*outbound, "-d", f"{other.ingress_ip}/32", *new_tcp, "-j", "ACCEPT")
            for leg in ("-i", "-o"):
                ipt(leg, "wan0", "-j", "REJECT", "--reject-with", "icmp-admin-prohibited")
            # The router itself (the zone control plane) takes nothing new from the
            # WAN: it connects out, to the global control plane.
            inbox = functools.partial(host.iptables, zrec.netns, "-A", "INPUT", "-i", "wan0")
            inbox("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            inbox("-j", "REJECT", "--reject-with", "icmp-admin-prohibited")
            for rec in st.nodes.values():
                if rec.zone != zrec.name:
                    continue
                for other in others:
                    host.add_route(rec.netns, f"{other.ingress_ip}/32", zrec.cp_ip)
                    if rec.name == zrec.ingress_node:
                        host.add_route(rec.netns, other.subnet, zrec.cp_ip)

    def _cp_rec(self, st: LabState, zone: str | None) -> tuple[str, ZoneRec | None]:
        """The control plane `zone` names (None: the lab's only, or its global one)."""
        if zone is None or (zone == GLOBAL and st.zones):
            return (GLOBAL if st.zones else ""), None
        if zone == GLOBAL:
            raise LabError(f"lab {self.name} has one control plane, no global one")
        if zone not in st.zones:
            zones = ", ".join(st.zones) or "none: it has one control plane"
            raise LabError(f"lab {self.name} has no zone {zone!r}; its zones: {zones}")
        return zone, st.zones[zone]

    def stop_controlplane(self, zone: str | None = None, kill: bool = False) -> None:
        """Stop the control plane (SIGTERM, then SIGKILL after 10 s; `kill`: SIGKILL
        at once, a crash); the nodes go on from what they hold. Multi-zone: the
        global one, or `zone`'s."""
        st = self.load()
        _, zrec = self._cp_rec(st, zone)
        pid = zrec.cp_pid if zrec is not None else st.cp_pid
        if pid and (kill or not _ended(pid, signal.SIGTERM)):
            _ended(pid, signal.SIGKILL)
        if zrec is not None:
            zrec.cp_pid = None
        else:
            st.cp_pid = None
        self.save(st)

    def start_controlplane(self, zone: str | None = None) -> None:
        """Start the control plane again (same data dir, same address). Multi-zone:
        the global one, or `zone`'s (enrolled already: no token)."""
        st = self.load()
        cp, zrec = self._cp_rec(st, zone)
        pid = zrec.cp_pid if zrec is not None else st.cp_pid
        if pid and _alive(pid):
            return
        if not cp:
            st.cp_pid = self._start_controlplane(self.cgroup_root() / "controlplane")
        elif zrec is None:
            st.cp_pid = self._start_cp(GLOBAL)
        else:
            zrec.cp_pid = self._start_cp(cp, zrec)
        self.save(st)

    def _start_controlplane(self, cgroup: Path) -> int:
        """`meshnode controlplane run` on the fabric's bridge, until it answers."""
        return self._spawn_cp("", self.fabric, CP_IP, cgroup, [])

    def _start_cp(self, cp: str, zrec: ZoneRec | None = None, token: str = "") -> int:
        """A multi-zone lab's control plane: the global one on the WAN, or zone
        `zrec`'s on its bridge (with `token` on its first start)."""
        cgroup = self.cgroup_root() / f"cp-{cp}"
        if zrec is None:
            return self._spawn_cp(GLOBAL, self.wan, GLOBAL_IP, cgroup, ["--mode", "global"])
        args = ["--mode", "zone", "--zone", cp, "--global", self.cp_url_of(GLOBAL)]
        args += ["--zone-ingress", zrec.ingress]
        # The token in the environment, not on a command line anyone can read.
        env = {"MESHNODE_GLOBAL_TOKEN": token} if token else {}
        return self._spawn_cp(cp, zrec.netns, zrec.cp_ip, cgroup, args, env)

    def _spawn_cp(
        self,
        cp: str,
        netns: str,
        ip: str,
        cgroup: Path,
        args: list[str],
        env: dict[str, str] | None = None,
    ) -> int:
        """`meshnode controlplane run` in `netns` on `ip`, until its admin socket answers."""
        data_dir = self.cp_dir_of(cp)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        host.cgroup_make(cgroup)
        log_path = self.dir / ("controlplane.log" if not cp else f"controlplane-{cp}.log")
        what = "the lab's control plane" if not cp else f"the lab's {cp} control plane"
        proc = host.spawn(
            netns,
            cgroup,
            [
                *_MESHNODE,
                "controlplane",
                "run",
                "--listen",
                f"{ip}:{CP_PORT}",
                "--advertise",
                ip,
                "--data-dir",
                str(data_dir),
                # Prometheus metrics on the fabric, where a scraper in the lab's
                # network (a node, or the fabric's namespace) reaches them.
                "--metrics-listen",
                f"{ip}:{CONTROLPLANE_METRICS_PORT}",
                *args,
            ],
            log_path=log_path,
            env={**os.environ, **env} if env else None,
        )
        from meshnode.core.cpclient import ClientError

        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise LabError(f"{what} exited:\n{_tail(log_path)}")
            try:
                self.admin(cp).call("GET", "/v1/admin/nodes", timeout=2)
                return proc.pid
            except ClientError:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{what} did not answer within 30 s:\n{_tail(log_path)}"
                    ) from None
                time.sleep(0.1)

    def _enroll(self, rec: NodeRec, cp: str = "") -> None:
        """A join token from the control plane (multi-zone: `cp`, the node's zone's),
        then `meshnode enroll` on the node, from the node's own address (which the
        control plane then fixes)."""
        token = self._call("POST", "/v1/admin/tokens", {"node": rec.name, "zone": rec.zone}, cp=cp)
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
                self.cp_url_of(cp),
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
                *self._ingress_args(st, rec),
            ],
            log_path=state / "ztunnel.log",
        )
        rec.ztunnel_pid = ztunnel.pid

    @staticmethod
    def _ingress_args(st: LabState, rec: NodeRec) -> list[str]:
        """Multi-zone: the zone's ingress node runs the ingress beside its proxy."""
        zrec = st.zones.get(rec.zone)
        if zrec is None or zrec.ingress_node != rec.name:
            return []
        return ["--ingress-listen", f"0.0.0.0:{INGRESS_PORT}"]

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
        svc = self._services(st).get(service_key(service, namespace))
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
            self._grant(st, node, namespace, service)
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
        self._sync(st, timeout=30)
        proc = host.spawn(
            rec_node.netns, cgroup, cmd, log_path=self.node_dir(node) / f"workload-{name}.log"
        )
        wl.pid = proc.pid
        st.services = self._services(st)
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
        self.save(st)
        self._sync(st, timeout=30)
        st.services = self._services(st)
        self.save(st)

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
        self._sync(st, timeout=30, revision=int(out["revision"]))
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
        self._sync(st, timeout=30)

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

    def _grant(self, st: LabState, node: str, namespace: str, service: str) -> None:
        """An IdentityGrant letting `node` host ``<namespace>/<service>``. Multi-zone:
        at the global control plane, naming the node's zone (which lets the zone's
        nodes host it and the zone publish it to the others), taken by the zone
        before the node registers a workload of it."""
        if not st.zones:
            grant = f"lab-{node}-{namespace}-{service}"[:63].rstrip("-")
            doc = (
                f"kind: IdentityGrant\nmetadata: {{name: {grant}}}\n"
                f"spec: {{nodes: [{node}], identities: [{namespace}/{service}]}}\n"
            )
            self._call("POST", "/v1/admin/resources", doc.encode(), content_type="application/yaml")
            return
        zone = st.nodes[node].zone
        grant = f"lab-{zone}-{namespace}-{service}"[:63].rstrip("-")
        doc = (
            f"kind: IdentityGrant\nmetadata: {{name: {grant}}}\n"
            f"spec: {{zones: [{zone}], identities: [{namespace}/{service}]}}\n"
        )
        out = self._call(
            "POST", "/v1/admin/resources", doc.encode(), cp=GLOBAL, content_type="application/yaml"
        )
        self._wait_zones_took(st, [zone], int(out["revision"]), time.monotonic() + 30)

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

    def _services(self, st: LabState | None = None) -> dict[str, ServiceRec]:
        """The services and VIPs the control plane allocated, by service_key().
        Multi-zone: each zone's VIP of each service (``vips``)."""
        if st is None or not st.zones:
            out = {}
            for doc in self._call("GET", "/v1/admin/services")["items"]:
                key = service_key(doc["name"], doc["namespace"])
                out[key] = ServiceRec(
                    doc["name"], doc["namespace"], doc["vip"], doc["ports"][0]["port"]
                )
            return out
        zoned: dict[str, ServiceRec] = {}
        for zone in st.zones:
            for doc in self._call("GET", "/v1/admin/services", cp=zone)["items"]:
                key = service_key(doc["name"], doc["namespace"])
                rec = zoned.setdefault(
                    key,
                    ServiceRec(doc["name"], doc["namespace"], doc["vip"], doc["ports"][0]["port"]),
                )
                rec.vips[zone] = doc["vip"]
        return zoned

    def _sync(self, st: LabState, timeout: float, revision: int | None = None) -> None:
        """Until every node has what its control plane has (single: `revision`, by
        default the control plane's; multi-zone: :meth:`_wait_zones`)."""
        if not st.zones:
            self._wait_synced(st, self._revision() if revision is None else revision, timeout)
        else:
            self._wait_zones(st, timeout, revision)

    def _remote_views(self, st: LabState) -> dict[str, dict[str, dict[str, int]]]:
        """What each zone should list of the other zones' services, from the lab's
        workloads: zone -> service key -> other zone -> endpoints."""
        running: dict[str, dict[str, int]] = {}  # service key -> zone -> endpoints
        for wl in st.workloads.values():
            by_zone = running.setdefault(service_key(wl.service, wl.namespace), {})
            zone = st.nodes[wl.node].zone
            by_zone[zone] = by_zone.get(zone, 0) + 1
        views: dict[str, dict[str, dict[str, int]]] = {}
        for zone in st.zones:
            view = views.setdefault(zone, {})
            for key, by_zone in running.items():
                others = {z: n for z, n in by_zone.items() if z != zone}
                if others:
                    view[key] = others
        return views

    def _zone_remote(self, zone: str) -> dict[str, dict[str, int]]:
        """What `zone`'s control plane lists of other zones' services."""
        view: dict[str, dict[str, int]] = {}
        for doc in self._call("GET", "/v1/admin/services", cp=zone)["items"]:
            for entry in doc.get("remote") or ():
                by_zone = view.setdefault(service_key(doc["name"], doc["namespace"]), {})
                by_zone[entry["zone"]] = by_zone.get(entry["zone"], 0) + int(entry["endpoints"])
        return view

    def _wait_zones(self, st: LabState, timeout: float, revision: int | None = None) -> None:
        """Multi-zone: until (1) every zone lists the other zones' services as the
        lab's workloads say (each zone published its own through the global, each
        took the others'), (2) every zone control plane took the global's revision
        (`revision`, or the global's current one if newer: policies and grants),
        then (3) every node has what its zone control plane has (its revision, or
        the same services and policies) and gave it to its ztunnel."""
        deadline = time.monotonic() + timeout
        want = self._remote_views(st)
        pending, got = set(st.zones), {}
        while pending:
            for zone in sorted(pending):
                got[zone] = self._zone_remote(zone)
                if got[zone] == want[zone]:
                    pending.discard(zone)
            if pending and time.monotonic() > deadline:
                zone = min(pending)
                raise LabError(
                    f"zone {zone} does not list the other zones' services as the lab runs them "
                    f"within {timeout:.0f}s (wanted {want[zone]}, it lists {got[zone]}); see "
                    f"the control planes' logs in {self.dir}"
                )
            if pending:
                time.sleep(0.05)
        latest = int(self._call("GET", "/v1/admin/zones", cp=GLOBAL)["revision"])
        self._wait_zones_took(st, list(st.zones), max(latest, revision or 0), deadline)
        # A node is told of a revision that changed nothing of its own (a zone's
        # internal rows: the global revision it took) only with the watch's next
        # heartbeat (30 s); so a node also counts as synced when its slice holds
        # what its zone's control plane has now.
        revisions, views = {}, {}
        for zone in st.zones:
            services = self._call("GET", "/v1/admin/services", cp=zone)
            resources = self._call("GET", "/v1/admin/resources", cp=zone)["items"]
            revisions[zone] = int(services["revision"])
            views[zone] = _slice_view(
                services["items"], [r for r in resources if r.get("kind") != "IdentityGrant"]
            )

        def synced(node: str, status: dict[str, Any]) -> bool:
            zone = st.nodes[node].zone
            if status.get("cp_revision", 0) >= revisions[zone]:
                return True
            try:
                held = json.loads((self.node_dir(node) / "state" / "cp-slice.json").read_text())
            except (OSError, ValueError):
                return False
            return _slice_view(held.get("services", []), held.get("resources", [])) == views[zone]

        self._wait_nodes(
            st,
            synced,
            max(deadline - time.monotonic(), 0.1),
            "what their zone control plane has (revision "
            + ", ".join(f"{z} {r}" for z, r in revisions.items())
            + ")",
        )

    def _wait_zones_took(
        self, st: LabState, zones: list[str], revision: int, deadline: float
    ) -> None:
        """Until each of `zones`' control planes took the global's `revision`."""
        pending: dict[str, Any] = dict.fromkeys(zones)
        while pending:
            for zone in sorted(pending):
                sync = self._call("GET", "/v1/admin/zones", cp=zone).get("sync") or {}
                pending[zone] = sync.get("revision")
                if int(sync.get("revision", -1)) >= revision:
                    del pending[zone]
            if pending and time.monotonic() > deadline:
                zone, took = min(pending.items())
                raise LabError(
                    f"zone {zone}'s control plane did not take the global control plane's "
                    f"revision {revision} in time (it has {took}); see "
                    f"{self.dir / f'controlplane-{zone}.log'}"
                )
            if pending:
                time.sleep(0.05)

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
        self._wait_nodes(
            st,
            lambda node, status: status.get("cp_revision", 0) >= revision,
            timeout,
            f"control-plane revision {revision}",
        )

    def _wait_nodes(
        self,
        st: LabState,
        synced: Callable[[str, dict[str, Any]], bool],
        timeout: float,
        what_revision: str,
    ) -> None:
        """Until each node's agent is `synced` (given the node and its status) and
        gave it to its ztunnel (or one of them died: then say so, with its log)."""
        deadline = time.monotonic() + timeout
        pending = set(st.nodes)
        while pending and time.monotonic() < deadline:
            for node in list(pending):
                status = self.agent_status(node) or {}
                if (
                    status.get("ready")
                    and synced(node, status)
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
                f"nodes {', '.join(sorted(pending))} did not apply {what_revision} "
                f"within {timeout:.0f}s; see their agent.log in {self.dir}"
            )

    # -- status and down ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.load()
        from meshnode.bpf.loader import MeshBpf

        zones: list[dict[str, Any]] = []
        if st.zones:
            cp, zones, registered, services = self._zones_status(st)
        else:
            cp = {
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
            **({"zones": zones} if st.zones else {}),
            "nodes": nodes,
            "services": [_service_status(s, zoned=bool(st.zones)) for s in services],
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

    def _zones_status(
        self, st: LabState
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
        """Multi-zone: the global control plane, each zone (its control plane, the
        global revision it took, its sync, its ingress), the nodes the zones list and
        every zone's services (each with the zone it is listed in)."""
        cp: dict[str, Any] = {
            "url": self.cp_url_of(GLOBAL),
            "pid": st.cp_pid,
            "alive": bool(st.cp_pid and _alive(st.cp_pid)),
        }
        at_global: dict[str, Any] = {}
        try:
            listed = self._call("GET", "/v1/admin/zones", cp=GLOBAL)
            cp["revision"] = listed["revision"]
            at_global = {z["zone"]: z for z in listed["items"]}
        except LabError as exc:
            cp["error"] = str(exc)
        zones, registered, services = [], {}, []
        for zrec in st.zones.values():
            known = at_global.get(zrec.name) or {}
            zone: dict[str, Any] = {
                "name": zrec.name,
                "url": self.cp_url_of(zrec.name),
                "pid": zrec.cp_pid,
                "alive": bool(zrec.cp_pid and _alive(zrec.cp_pid)),
                "subnet": zrec.subnet,
                "router_wan_ip": zrec.wan_ip,
                "ingress_node": zrec.ingress_node,
                "ingress": zrec.ingress,
                # What the global holds of the zone (when it answers).
                "published_services": known.get("services"),
                "published_at": known.get("last_sync"),
            }
            try:
                mine = self._call("GET", "/v1/admin/zones", cp=zrec.name)
                sync, link = mine.get("sync") or {}, mine.get("status") or {}
                zone["revision"] = mine["revision"]
                zone["global_revision"] = sync.get("revision")
                zone["synced_at"] = sync.get("synced_at")
                zone["connected"] = bool(link.get("connected"))
                if link.get("last_error"):
                    zone["sync_error"] = link["last_error"]
                listed = self._call("GET", "/v1/admin/nodes", cp=zrec.name)
                registered.update({n["name"]: n for n in listed["items"]})
                for doc in self._call("GET", "/v1/admin/services", cp=zrec.name)["items"]:
                    services.append({**doc, "zone": zrec.name})
            except LabError as exc:
                zone["error"] = str(exc)
            zones.append(zone)
        return cp, zones, registered, services

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
                [z.cp_pid for z in st.zones.values()],
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
        names = {self.fabric, self.wan}
        if st is not None:
            names |= {rec.netns for rec in st.nodes.values()}
            names |= {z.netns for z in st.zones.values()}
        if Path("/run/netns").is_dir():
            pattern = re.compile(rf"{re.escape(self.name)}-(node\d+|zone-[a-z])")
            names |= {p.name for p in Path("/run/netns").iterdir() if pattern.fullmatch(p.name)}
        for ns in sorted(names):
            host.netns_delete(ns)
        shutil.rmtree(self.pin_root(), ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"lab {self.name} removed")


def _service_status(doc: dict[str, Any], zoned: bool) -> dict[str, Any]:
    """A service as `lab status` shows it; multi-zone: with the zone that lists it
    and its entries for other zones (their ingress and how many endpoints)."""
    out = {
        "name": doc["name"],
        "namespace": doc["namespace"],
        "vip": doc["vip"],
        "port": doc["ports"][0]["port"],
        "endpoints": [f"{e['workload']}@{e['node']}" for e in doc["endpoints"]],
    }
    if zoned:
        out["zone"] = doc["zone"]
        out["remote"] = [
            {
                "zone": r["zone"],
                "ingress": f"{r['ingress_ip']}:{r['ingress_port']}",
                "endpoints": r["endpoints"],
            }
            for r in doc.get("remote") or ()
        ]
    return out


def _slice_view(services: list[Any], resources: list[Any]) -> tuple[frozenset[str], ...]:
    """What a node's slice says of services and policies, comparable with what a
    control plane lists (order and key order aside)."""

    def canon(doc: Any) -> str:
        if isinstance(doc, dict):
            doc = {
                k: sorted(json.dumps(e, sort_keys=True) for e in v)
                if k in ("endpoints", "remote") and isinstance(v, list)
                else v
                for k, v in doc.items()
            }
        return json.dumps(doc, sort_keys=True)

    return frozenset(map(canon, services)), frozenset(map(canon, resources))


def _stepper(total: int, progress: Callable[[str], None] | None) -> Callable[[str], None]:
    """`step(what)`: one progress line per step done, ``[3/8] node1: enrolled (1.2 s)``."""
    done, last = 0, time.monotonic()

    def step(what: str) -> None:
        nonlocal done, last
        done, now = done + 1, time.monotonic()
        if progress is not None:
            progress(f"[{done}/{total}] {what} ({now - last:.1f} s)")
        last = now

    return step


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
