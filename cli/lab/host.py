"""The lab's host plumbing: network namespaces joined by veth pairs to a bridge
(inside a namespace of its own, so nothing touches the host's network),
cgroups for nodes and workloads, and processes started inside both."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

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
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            raise HostError(f"`{tool}` is missing; run scripts/setup.sh")


# -- network namespaces -----------------------------------------------------------


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_add(name: str) -> None:
    if netns_exists(name):
        raise HostError(f"network namespace {name} already exists; run `meshnode lab down` first")
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_delete(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "delete", name], check=False)


def make_bridge(fabric: str, bridge: str = "br0") -> None:
    run(["ip", "-n", fabric, "link", "add", bridge, "type", "bridge"])
    run(["ip", "-n", fabric, "link", "set", bridge, "up"])


def bridge_address(fabric: str, ip_cidr: str, bridge: str = "br0") -> None:
    """An address on the fabric's bridge: where the lab's control plane listens."""
    run(["ip", "-n", fabric, "addr", "add", ip_cidr, "dev", bridge])


def plug_node(fabric: str, node_ns: str, port_name: str, ip_cidr: str, bridge: str = "br0") -> None:
    """veth: ``port_name`` on the fabric's bridge <-> ``eth0`` in the node."""
    run(
        [
            "ip",
            "-n",
            fabric,
            "link",
            "add",
            port_name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            node_ns,
        ]
    )
    run(["ip", "-n", fabric, "link", "set", port_name, "master", bridge, "up"])
    run(["ip", "-n", node_ns, "addr", "add", ip_cidr, "dev", "eth0"])
    run(["ip", "-n", node_ns, "link", "set", "eth0", "up"])


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
