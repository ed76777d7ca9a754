"""Nodes with a real systemd: containers booted with systemd-nspawn from one shared,
read-only Debian 12 rootfs (scripts/build-rootfs.sh), each in a network namespace
plugged into a test bridge with the lab's plumbing.

    with Cluster("198.18.1.0/24") as cluster:
        n1, n2 = cluster.boot("n1"), cluster.boot("n2")
        n1.wait_for_system(); n2.wait_for_system()
        n1.run(["ip", "-br", "addr"])                    # nsenter into the node
        n1.run(["python3", "-c", "..."], service=True)   # as a unit of the node's systemd

What each node gets (and why):
- `--volatile=overlay`: a tmpfs overlay on the shared rootfs; nothing reaches the disk.
- `--register=no --keep-unit`: no machined, no host systemd needed. systemd-nspawn is
  started inside a cgroup of ours (<cgroup2>/mnspawn/<tag>/<node>), so the node's
  cgroup namespace root -- where the agent attaches, the "per-node parent" on a
  shared kernel -- is <that>/payload on the host, never the host's root.
- `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`: the node sees a pure cgroup v2 tree at
  /sys/fs/cgroup, as on a stock Debian 12 VM (the host here is hybrid).
- `--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN` on top of nspawn's default set
  (which has CAP_SYS_ADMIN), and `--system-call-filter=bpf`: nspawn's seccomp filter
  refuses bpf(2) whatever the capabilities (bcc then fails with "Failed to compile
  BPF module").
- The repository (and so its .venv) read-only at the same path as on the host; the
  venv's python is a link to /usr/bin/python3, which the rootfs has (same Debian).
  /lib/modules and /usr/src read-only: bcc compiles at run time.
- /sys/fs/bpf: not bound from the host. The node mounts its own bpffs instance there
  (meshnode's loader does it on first use), so pins never collide between nodes.

`Node.run` enters the node with nsenter (all of its namespaces, and a cgroup inside
it) -- with the host's capabilities and no seccomp. `Node.run(..., service=True)`
runs the command as a transient unit of the node's systemd instead, with exactly
the privileges a service in the node has.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from meshnode.bpf.cgroups import cgroup2_mount
from meshnode.lab import host
from tests.support import REPO

BUILD_ROOTFS = REPO / "scripts" / "build-rootfs.sh"
DEFAULT_ROOTFS = Path(os.environ.get("MESHNODE_ROOTFS", "/var/cache/meshnode/rootfs"))
ROOTFS_MARKER = ".meshnode-rootfs-ok"
NETNS_PREFIX = "mnspawn-"

NSPAWN_CAPABILITIES = "CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN"
NSPAWN_SYSCALLS = "bpf"


class NspawnError(Exception):
    pass


def missing() -> str | None:
    """Why nspawn nodes cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces, cgroups)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/setup.sh --test installs it)"
    try:
        cgroup2_mount()
    except Exception as exc:
        return f"no cgroup v2: {exc}"
    return None


def ensure_rootfs(rootfs: Path = DEFAULT_ROOTFS, timeout: float = 900) -> Path:
    """Build the rootfs unless it is there already (scripts/build-rootfs.sh decides)."""
    proc = subprocess.run(
        ["bash", str(BUILD_ROOTFS), str(rootfs)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 or not (rootfs / ROOTFS_MARKER).exists():
        raise NspawnError(
            f"cannot build the rootfs at {rootfs}: {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return rootfs


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


class Node:
    def __init__(
        self, name: str, netns: str, ip: str, cgroup: Path, log: Path, proc: subprocess.Popen[bytes]
    ) -> None:
        self.name = name
        self.netns = netns
        self.ip = ip
        self.cgroup = cgroup  # on the host; the node's own root is cgroup / "payload"
        self.log = log
        self.proc = proc
        self.leader = 0  # the node's init (systemd), as a host pid

    @property
    def root_cgroup(self) -> Path:
        """The host path of the node's cgroup v2 root (what the node sees as /sys/fs/cgroup)."""
        return self.cgroup / "payload"

    def _find_leader(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NspawnError(
                    f"systemd-nspawn for {self.name} exited with "
                    f"{self.proc.returncode}:\n{self.console_tail()}"
                )
            for child in _children(self.proc.pid):
                with contextlib.suppress(OSError):
                    # The child in a new pid namespace, once it exec'ed the node's init
                    # (before that its mount namespace still shows the host's root).
                    if os.readlink(f"/proc/{child}/ns/pid") != os.readlink(
                        "/proc/self/ns/pid"
                    ) and Path(f"/proc/{child}/comm").read_text().strip() in ("systemd", "init"):
                        return child
            time.sleep(0.02)
        raise NspawnError(
            f"node {self.name}: no init process after {timeout:.0f}s:\n{self.console_tail()}"
        )

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def nsenter(self) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--"]

    def run(
        self,
        cmd: Sequence[str],
        *,
        service: bool = False,
        check: bool = False,
        timeout: float = 120,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd in the node. service=True: as a transient unit of the node's systemd
        (its capabilities, seccomp filter and cgroup), output piped back."""
        if service:
            setenv = [f"--setenv={k}={v}" for k, v in (env or {}).items()]
            argv = [
                *self.nsenter(),
                "systemd-run",
                "--wait",
                "--pipe",
                "--quiet",
                "--collect",
                "--service-type=exec",
                *setenv,
                "--",
                *cmd,
            ]
            preexec = None
            run_env = None
        else:
            argv = [*self.nsenter(), *cmd]
            exec_cg = self.root_cgroup / "mnspawn-exec"
            exec_cg.mkdir(exist_ok=True)
            procs = str(exec_cg / "cgroup.procs")

            def preexec() -> None:
                with open(procs, "w") as f:
                    f.write("0")

            run_env = {
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8",
                **(env or {}),
            }
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input if input is not None else "",
            preexec_fn=preexec,
            env=run_env,
        )
        if check and proc.returncode != 0:
            raise NspawnError(
                f"`{' '.join(cmd)}` in {self.name} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def wait_for_system(self, timeout: float = 60) -> str:
        """systemctl is-system-running --wait, bounded: 'running' or 'degraded' (anything
        else raises, with the failed units and the console)."""
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = state or "timeout"
                break
            try:
                # Before the node's systemd listens on its private socket, systemctl
                # fails at once with nothing on stdout: try again.
                proc = self.run(["systemctl", "is-system-running", "--wait"], timeout=remaining)
                state = proc.stdout.strip()
            except subprocess.TimeoutExpired:
                state = "timeout"
                break
            if state and state != "offline":  # offline: PID 1 not answering yet
                break
            time.sleep(0.1)
        if state not in ("running", "degraded"):
            failed = self.run(["systemctl", "--failed", "--no-legend"], timeout=10).stdout
            raise NspawnError(
                f"node {self.name} did not boot: {state}\nfailed units:\n"
                f"{failed}\nconsole:\n{self.console_tail()}"
            )
        return state

    def poweroff(self, timeout: float = 30) -> None:
        """Clean shutdown (nspawn turns SIGTERM into a halt request to the node's
        systemd); after `timeout`, kill everything in the node's cgroup."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_all()
                self.proc.kill()
                self.proc.wait(10)
        self._kill_all()  # anything that escaped (there should be nothing)
        host.cgroup_remove_tree(self.cgroup)
        with contextlib.suppress(FileNotFoundError, OSError):
            shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name)

    def _kill_all(self) -> None:
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and host.cgroup_pids(self.cgroup):
                time.sleep(0.05)
        else:
            host.cgroup_kill_all(self.cgroup, grace=1.0)


class Cluster:
    """Nodes on one test subnet: a fabric namespace with a bridge, one namespace per
    node, all named mnspawn-<tag>-*. close() (or the with-block) removes everything."""

    def __init__(
        self,
        subnet: str = "198.18.1.0/24",
        rootfs: Path = DEFAULT_ROOTFS,
        tag: str | None = None,
        unified: bool = True,
    ) -> None:
        self.subnet = ipaddress.ip_network(subnet)
        self.rootfs = rootfs
        self.tag = tag or secrets.token_hex(2)
        self.unified = unified
        self.fabric = f"{NETNS_PREFIX}{self.tag}-fab"
        self.cgroup = cgroup2_mount() / "mnspawn" / self.tag
        self.workdir = Path(tempfile.mkdtemp(prefix=f"mnspawn-{self.tag}-"))
        self.nodes: dict[str, Node] = {}
        self._hosts = self.subnet.hosts()
        self.gateway = str(next(self._hosts))  # .1: kept for a host-side address
        self._netns: list[str] = []
        self._names: set[str] = set()
        self._bridge_ip = False
        self._pids: list[int] = []  # every nspawn and node init started, for leftovers()
        try:
            host.netns_add(self.fabric)
            self._netns.append(self.fabric)
            host.make_bridge(self.fabric)
        except BaseException:
            self.close()
            raise

    def host_side(self) -> str:
        """Give the fabric's bridge the subnet's first address (self.gateway) and return
        the fabric namespace: run a server there (nsenter --net=/run/netns/<it>) and
        every node reaches it, while the host's own network never sees the subnet."""
        if not self._bridge_ip:
            host.bridge_address(self.fabric, f"{self.gateway}/{self.subnet.prefixlen}")
            self._bridge_ip = True
        return self.fabric

    def netns(self, node: str) -> str:
        return f"{NETNS_PREFIX}{self.tag}-{node}"

    def boot(
        self,
        name: str,
        extra_args: Sequence[str] = (),
        timeout: float = 30,
        checkout: bool = True,
    ) -> Node:
        """Start a node and return once its init runs (wait_for_system() for the rest).
        checkout=False: the repository is not bound in (a node that installs the
        package and nothing else)."""
        if name in self.nodes:
            raise NspawnError(f"node {name} exists already")
        netns = self.netns(name)
        host.netns_add(netns)
        self._netns.append(netns)
        ip = str(next(self._hosts))
        port = f"mns{self.tag}{name}"[:15]
        host.plug_node(self.fabric, netns, port, f"{ip}/{self.subnet.prefixlen}")
        cgroup = self.cgroup / name
        host.cgroup_make(cgroup)
        log = self.workdir / f"{name}.console"
        argv = [
            "systemd-nspawn",
            "-D",
            str(self.rootfs),
            "--volatile=overlay",
            "--register=no",
            "--keep-unit",
            "-M",
            name,
            f"--network-namespace-path=/run/netns/{netns}",
            f"--capability={NSPAWN_CAPABILITIES}",
            f"--system-call-filter={NSPAWN_SYSCALLS}",
            *([f"--bind-ro={REPO}"] if checkout else []),
            "--bind-ro=/lib/modules",
            "--bind-ro=/usr/src",
            *extra_args,
            "-b",
        ]
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1" if self.unified else "0",
        }
        procs = str(cgroup / "cgroup.procs")

        def enter_cgroup() -> None:
            with open(procs, "w") as f:
                f.write("0")

        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=enter_cgroup,
                env=env,
                start_new_session=True,
            )
        node = Node(name, netns, ip, cgroup, log, proc)
        self.nodes[name] = node
        self._names.add(name)
        self._pids.append(proc.pid)
        node.leader = node._find_leader(timeout)
        self._pids.append(node.leader)
        return node

    def close(self) -> None:
        problems = []
        for node in self.nodes.values():
            try:
                node.poweroff()
            except Exception as exc:  # keep going: leave nothing behind
                problems.append(f"{node.name}: {exc}")
        self.nodes.clear()
        for ns in reversed(self._netns):
            host.netns_delete(ns)
        self._netns.clear()
        host.cgroup_remove_tree(self.cgroup)
        with contextlib.suppress(OSError):
            self.cgroup.parent.rmdir()  # <cgroup2>/mnspawn, once no other cluster uses it
        shutil.rmtree(self.workdir, ignore_errors=True)
        if problems:
            raise NspawnError("cleanup problems: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        """What close() should have removed and is still there."""
        found = (
            [
                f"netns {ns}"
                for ns in os.listdir("/run/netns")
                if ns.startswith(f"{NETNS_PREFIX}{self.tag}-")
            ]
            if Path("/run/netns").is_dir()
            else []
        )
        if self.cgroup.exists():
            found.append(f"cgroup {self.cgroup}")
        if self.workdir.exists():
            found.append(f"dir {self.workdir}")
        for pid in self._pids:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(f"process {pid}")
        if Path("/run/systemd/nspawn/propagate").is_dir():
            found += [
                f"/run/systemd/nspawn/propagate/{n}"
                for n in os.listdir("/run/systemd/nspawn/propagate")
                if n in self._names
            ]
        return found

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
