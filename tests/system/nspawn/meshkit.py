"""What the nspawn mesh tests share: a control plane on the host side of the test
subnet (the fabric namespace), the admin CLI against it, and helpers to run things
in a node's units and to wait for them."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.nspawn import REPO, Node, NspawnError, ensure_rootfs, missing

# The host's meshnode (the checkout's .venv): it runs the control plane and the admin
# CLI. Nodes run their own: the package's /usr/bin/meshnode.
HOST_MESHNODE = str(REPO / ".venv" / "bin" / "meshnode")
NODE_MESHNODE = "/usr/bin/meshnode"


def rootfs_or_skip(what: str) -> Path:
    """The nodes' root filesystem, built if needed; or skip, saying why, where
    nspawn nodes cannot run."""
    why = missing()
    if why is not None:
        print(f"{what} skipped: {why}")
        pytest.skip(why)
    try:
        return ensure_rootfs()
    except (NspawnError, OSError) as exc:
        pytest.skip(f"the nspawn rootfs cannot be built: {exc}")


def apt(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """apt-get -y in the node (no network there: only local .deb files install)."""
    return node.run(
        ["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", *args],
        timeout=300,
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )


def host_ns(fabric: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{fabric}", "--"]


def start_cp(
    ns: list[str],
    data: Path,
    gateway: str,
    port: int,
    extra: tuple[str, ...] = (),
    host: str = "0.0.0.0",
) -> subprocess.Popen[bytes]:
    """A control plane on the fabric (all its addresses by default); returns once it answers."""
    proc = subprocess.Popen(
        [
            *ns,
            HOST_MESHNODE,
            "controlplane",
            "run",
            "--listen",
            f"{host}:{port}",
            "--data-dir",
            str(data),
            "--advertise",
            gateway,
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(data / "cp.log", "ab"),  # noqa: SIM115
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("control plane exited:\n" + (data / "cp.log").read_text())
        probe = subprocess.run(
            [*ns, "curl", "-sk", "--max-time", "1", f"https://127.0.0.1:{port}/v1/trust-bundle"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and "trust_bundle" in probe.stdout:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("control plane did not come up")


def admin(ns: list[str], data: Path, *args: str, input: str | None = None) -> str:
    proc = subprocess.run(
        [*ns, HOST_MESHNODE, *args, "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        input=input,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def join_token(ns: list[str], data: Path, node: str, identities: list[str], port: int) -> str:
    flags = [f for ident in identities for f in ("--identity", ident)]
    out = admin(
        ns, data, "token", "create", "--node", node, *flags, "--cp", f"https://127.0.0.1:{port}"
    )
    return next(w for w in out.split() if w.startswith("mn1."))


def journal(node: Node, lines: int = 80) -> str:
    return node.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-n",
            str(lines),
            "-u",
            "meshnode-agent",
            "-u",
            "meshnode-ztunnel",
        ]
    ).stdout


def in_unit(
    node: Node, unit: str, cmd: list[str], timeout: float = 60, background: bool = False
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run cmd inside the cgroup of a systemd unit of the node (so its
    connections are that workload's)."""
    script = f'echo $$ > /sys/fs/cgroup/system.slice/{unit}/cgroup.procs && exec "$@"'
    argv = [*node.nsenter(), "sh", "-c", script, "sh", *cmd]
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, check, timeout: float = 60, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def node_status(node: Node, meshnode: str = NODE_MESHNODE) -> dict[str, Any]:
    out = node.run([meshnode, "status", "-o", "json"]).stdout
    return json.loads(out) if out.strip().startswith("{") else {}


def vip(node: Node, service: str, meshnode: str = NODE_MESHNODE) -> str:
    def find() -> str | None:
        svcs = node_status(node, meshnode).get("services", [])
        return next((s["vip"] for s in svcs if s["name"] == service), None)

    return str(wait_for(f"service {service} on {node.name}", find, timeout=30))
