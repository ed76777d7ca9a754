"""The lab's host plumbing: network namespaces joined by veth pairs to a bridge
(inside a namespace of its own, so nothing touches the host's network), made
over netlink with pyroute2; cgroups for nodes and workloads; and processes
started inside both (nsenter, so they see the host's cgroup and bpf mounts)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from meshnode.core.errors import MeshnodeError


class HostError(MeshnodeError):
    pass


def run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HostError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError("the lab creates network namespaces and cgroups: run it as root")
    for tool in ("nsenter", "ss"):
        if shutil.which(tool) is None:
            raise HostError(f"`{tool}` is missing; run scripts/setup.sh")


# -- network namespaces (netlink, through pyroute2) ------------------------------------


@contextlib.contextmanager
def _netlink(netns: str, what: str) -> Iterator[Any]:
    """A netlink socket inside `netns`; a netlink error names what was being done.

    The socket is opened in this thread after setns() (pyroute2's pushns), then
    the thread goes back: a socket stays in the namespace it was made in. Not
    pyroute2's NetNS, which forks a helper per use: a forked copy of a caller
    that traps SIGTERM (meshnode bench) would run the caller's handler when
    pyroute2 stops it, and carry on as the caller."""
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns
    from pyroute2.netlink.exceptions import NetlinkError

    pr_netns.pushns(netns)
    try:
        ipr = IPRoute()
    finally:
        pr_netns.popns()
    try:
        with ipr:
            yield ipr
    except NetlinkError as exc:
        raise HostError(f"{what} in network namespace {netns} failed: {exc}") from None


def _index(ns: Any, ifname: str) -> int:
    found = ns.link_lookup(ifname=ifname)
    if not found:
        raise HostError(f"no interface {ifname}")
    return int(found[0])


def _cidr(ip_cidr: str) -> tuple[str, int]:
    address, _, prefix = ip_cidr.partition("/")
    return address, int(prefix or 32)


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_add(name: str) -> None:
    from pyroute2 import netns

    if netns_exists(name):
        raise HostError(f"network namespace {name} already exists; run `meshnode lab down` first")
    # pyroute2 makes it in a forked child; with SIGINT/SIGTERM blocked meanwhile,
    # that copy of us never runs our signal handlers (it exits when done).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        netns.create(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    with _netlink(name, "bringing lo up") as ns:
        ns.link("set", index=_index(ns, "lo"), state="up")


def netns_delete(name: str) -> None:
    from pyroute2 import netns

    if netns_exists(name):
        with contextlib.suppress(OSError):
            netns.remove(name)  # an unmount and an unlink, in this process


def make_bridge(fabric: str, bridge: str = "br0") -> None:
    with _netlink(fabric, f"creating bridge {bridge}") as ns:
        ns.link("add", ifname=bridge, kind="bridge")
        ns.link("set", index=_index(ns, bridge), state="up")


def bridge_address(fabric: str, ip_cidr: str, bridge: str = "br0") -> None:
    """An address on the fabric's bridge: where the lab's control plane listens."""
    address, prefix = _cidr(ip_cidr)
    with _netlink(fabric, f"adding {ip_cidr} to {bridge}") as ns:
        ns.addr("add", index=_index(ns, bridge), address=address, prefixlen=prefix)


def plug_node(
    fabric: str,
    node_ns: str,
    port_name: str,
    ip_cidr: str,
    bridge: str = "br0",
    peer: str = "eth0",
) -> None:
    """veth: ``port_name`` on the fabric's bridge <-> ``peer`` (``eth0``) in the node."""
    with _netlink(fabric, f"plugging {node_ns} into {bridge}") as ns:
        ns.link("add", ifname=port_name, kind="veth", peer={"ifname": peer, "net_ns_fd": node_ns})
        ns.link("set", index=_index(ns, port_name), master=_index(ns, bridge), state="up")
    address, prefix = _cidr(ip_cidr)
    with _netlink(node_ns, f"addressing {peer} ({ip_cidr})") as ns:
        link = _index(ns, peer)
        ns.addr("add", index=link, address=address, prefixlen=prefix)
        ns.link("set", index=link, state="up")


def add_route(netns: str, dst_cidr: str, gateway: str) -> None:
    """A route in `netns`: `dst_cidr` via `gateway` (on a directly connected subnet)."""
    with _netlink(netns, f"adding the route {dst_cidr} via {gateway}") as ns:
        ns.route("add", dst=dst_cidr, gateway=gateway)


def enable_forwarding(netns: str) -> None:
    """net.ipv4.ip_forward=1 in `netns` only: the file is opened from this thread
    after setns(), and /proc/sys/net is the namespace of the thread that opens it
    (the host's own setting stays as it is)."""
    from pyroute2 import netns as pr_netns

    pr_netns.pushns(netns)
    try:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    except OSError as exc:
        raise HostError(f"enabling IPv4 forwarding in network namespace {netns}: {exc}") from None
    finally:
        pr_netns.popns()


def iptables(netns: str, *rule: str) -> None:
    """``iptables RULE...`` inside `netns` (its own tables: nothing of the host's)."""
    if shutil.which("iptables") is None:
        raise HostError("`iptables` is missing (a multi-zone lab filters its routers); install it")
    run([*nsenter_prefix(netns), "iptables", "-w", *rule])


def nsenter_prefix(netns: str) -> list[str]:
    # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup
    # and bpf filesystems the agent needs.
    return ["nsenter", f"--net=/run/netns/{netns}", "--"]


# -- cgroups ------------------------------------------------------------------------


def cgroup_make(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    if not path.is_dir():
        return pids
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def cgroup_kill_all(path: Path, grace: float = 3.0) -> None:
    """SIGTERM everything in the subtree, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = cgroup_pids(path)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and cgroup_pids(path):
            time.sleep(0.05)


def cgroup_remove_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted(
        (p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    ):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def spawn(
    netns: str,
    cgroup: Path,
    cmd: Sequence[str],
    log_path: Path | None = None,
    detach: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` inside the node's network namespace and the cgroup."""
    procs = cgroup / "cgroup.procs"

    def enter_cgroup() -> None:
        with open(procs, "w") as f:
            f.write("0")

    out: int | IO[bytes] = subprocess.DEVNULL
    logf = None
    if log_path is not None:
        logf = open(log_path, "ab")  # noqa: SIM115 (handed to the child)
        out = logf
    try:
        return subprocess.Popen(
            [*nsenter_prefix(netns), *cmd],
            preexec_fn=enter_cgroup,
            stdin=subprocess.DEVNULL if detach else None,
            stdout=out if detach else None,
            stderr=subprocess.STDOUT if detach else None,
            start_new_session=detach,
            env=env,
        )
    finally:
        if logf is not None:
            logf.close()


def listening(netns: str, port: int) -> bool:
    proc = run([*nsenter_prefix(netns), "ss", "-Hltn", f"sport = :{port}"], check=False)
    return bool(proc.stdout.strip())
