"""The systemd units `meshnode enroll` installs, as text (so the installed package
carries them), rendered with this node's paths.

Hardening leaves each service only what it needs:
- ztunnel: listens (15001, 15008, admin on loopback), reads the BPF map the agent
  pins under /sys/fs/bpf (CAP_BPF, CAP_SYS_ADMIN), writes its snapshot in the state
  directory. Everything else read-only; no kernel tunables, modules or logs.
- agent: compiles BPF with bcc at start (reads /lib/modules and /usr/src, writes
  /tmp: a private one), loads and attaches programs at the cgroup parent and pins
  maps (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_PERFMON), writes the config and
  state directories, the bpffs and the cgroup tree. So no ProtectControlGroups, no
  ProtectKernelModules (it hides /lib/modules from bcc) and no ProtectKernelTunables
  (it leaves /sys/fs/bpf read-only whatever ReadWritePaths= says).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from meshnode.core.errors import MeshnodeError
from meshnode.core.fsutil import write_file_atomic
from meshnode.nodeagent.config import PROXY_SLICE

__all__ = [
    "AGENT_UNIT",
    "BPFFS_UNIT",
    "CONTROLPLANE_UNIT",
    "PACKAGED_UNIT_DIR",
    "UNIT_NAMES",
    "UnitError",
    "ZTUNNEL_UNIT",
    "UnitPaths",
    "meshnode_executable",
    "install_units",
    "render_package_units",
    "render_units",
    "start_units",
    "systemd_missing",
]

ZTUNNEL_UNIT = "meshnode-ztunnel.service"
AGENT_UNIT = "meshnode-agent.service"
BPFFS_UNIT = "meshnode-bpffs.service"
CONTROLPLANE_UNIT = "meshnode-controlplane.service"
UNIT_NAMES = (ZTUNNEL_UNIT, AGENT_UNIT)  # the services enable/start
# Where the Debian package puts its units (scripts/build-deb.sh).
PACKAGED_UNIT_DIR = Path("/lib/systemd/system")


# bpffs at /sys/fs/bpf in the node's own mount namespace, by a oneshot unit both
# services require. A Debian VM's systemd mounts it at boot (then this does nothing); a
# container's does not. Left to the agent, the mount would land in the agent's private
# namespace (ProtectSystem=) and ztunnel would never see the pinned maps. Neither
# ExecStartPre=+ (it runs in the unit's namespace too) nor a sys-fs-bpf.mount unit
# (systemd refuses mount units for API file systems) can do it.
_BPFFS_TEMPLATE = """\
# Rendered by meshnode (nodeagent/units.py): shipped by the package, or written by
# `meshnode enroll` when meshnode runs from elsewhere; `enroll --force` rewrites it.
[Unit]
Description=meshnode: bpffs at /sys/fs/bpf (where systemd did not mount it)
DefaultDependencies=no
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=700 bpf /sys/fs/bpf'
"""

_ZTUNNEL_TEMPLATE = """\
# Rendered by meshnode (nodeagent/units.py): shipped by the package, or written by
# `meshnode enroll` when meshnode runs from elsewhere; `enroll --force` rewrites it.
[Unit]
Description=meshnode node proxy (ztunnel)
After=network-online.target meshnode-bpffs.service
Wants=network-online.target
Requires=meshnode-bpffs.service

[Service]
Type=notify
NotifyAccess=main
# This node's own options, e.g. the zone ingress of a multi-zone mesh
# (docs/multizone.md): MESHNODE_ZTUNNEL_OPTS="--ingress-listen 0.0.0.0:15443"
EnvironmentFile=-/etc/default/meshnode-ztunnel
ExecStart={meshnode} ztunnel run --snapshot {snapshot} --workers 0 \\
    --peer-socket /run/meshnode/peer.sock $MESHNODE_ZTUNNEL_OPTS
# An upgrade in place (the package's postinst): the supervisor re-executes the
# installed code under the same PID; new workers take new connections while the
# old ones finish theirs (--retire-timeout).
ExecReload=/bin/kill -USR2 $MAINPID
# Its own slice: the agent's bind guard lets only this cgroup bind 127.0.0.6 and
# the proxy's ports, and a slice keeps its cgroup (and id) across restarts.
Slice={proxy_slice}
# On a fresh node READY waits for the agent's first snapshot, which comes after
# bcc compiled the programs (the agent's own start timeout): as long.
TimeoutStartSec=600
# The state directory is 0700; workloads of any user reach the peer socket here
# (it answers each only about its own connections, see ztunnel/peer.py).
RuntimeDirectory=meshnode
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=restart
Restart=on-failure
RestartSec=1
LimitNOFILE=1048576
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state_dir} -/sys/fs/bpf
ProtectHome={protect_home}
PrivateTmp={private_tmp}
# Leaves /sys/fs/bpf read-only despite ReadWritePaths= (systemd 252); ztunnel only
# opens the agent's pins (BPF_OBJ_GET) and works on the maps through fds: enough.
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_BPF CAP_SYS_ADMIN

[Install]
WantedBy=multi-user.target
"""

_AGENT_TEMPLATE = """\
# Rendered by meshnode (nodeagent/units.py): shipped by the package, or written by
# `meshnode enroll` when meshnode runs from elsewhere; `enroll --force` rewrites it.
[Unit]
Description=meshnode node agent
# Not After= ztunnel: on a fresh node ztunnel reports READY only once the agent has
# sent it a first snapshot, so ordering the agent after it would stall both until
# ztunnel's start timeout. They start together; the agent (re)connects to its socket.
Wants=network-online.target meshnode-ztunnel.service {proxy_slice}
After=network-online.target meshnode-bpffs.service {proxy_slice}
Requires=meshnode-bpffs.service

[Service]
Type=notify
NotifyAccess=main
ExecStart={meshnode} agent run --enrolled {config_dir}
Restart=on-failure
RestartSec=2
# bcc compiles the programs at start: give it time on a slow node (on a software-
# emulated VM under load it took over five minutes).
TimeoutStartSec=600
LimitNOFILE=65536
LimitMEMLOCK=infinity
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state_dir} {config_dir} -/sys/fs/bpf -/sys/fs/cgroup
ProtectHome={protect_home}
PrivateTmp={private_tmp}
# No ProtectKernelTunables=: it makes /sys/fs/bpf read-only and ReadWritePaths= cannot
# undo that (systemd 252), so the agent could not pin its maps.
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=CAP_BPF CAP_SYS_ADMIN CAP_NET_ADMIN CAP_PERFMON

[Install]
WantedBy=multi-user.target
"""

# Shipped by the package only, disabled: `systemctl enable --now` it on the control
# plane's host. Its flags (--listen, --advertise, --db, ...) come from
# /etc/default/meshnode-controlplane; `meshnode controlplane run --help` lists them.
_CONTROLPLANE_TEMPLATE = """\
# Rendered by meshnode (nodeagent/units.py), shipped by the package. Flags: put
# MESHNODE_CP_ARGS="--advertise ADDR ..." in /etc/default/meshnode-controlplane.
[Unit]
Description=meshnode control plane
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
EnvironmentFile=-/etc/default/meshnode-controlplane
ExecStart={meshnode} controlplane run --data-dir /var/lib/meshnode-cp $MESHNODE_CP_ARGS
Restart=on-failure
RestartSec=2
StateDirectory=meshnode-cp
StateDirectoryMode=0700
LimitNOFILE=1048576
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
CapabilityBoundingSet=CAP_NET_BIND_SERVICE

[Install]
WantedBy=multi-user.target
"""

# ProtectHome=yes would hide an executable installed under these.
_HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))


@dataclass(frozen=True, slots=True)
class UnitPaths:
    meshnode: Path  # the `meshnode` executable
    config_dir: Path
    state_dir: Path
    source: Path | None = None  # where the package's code lives, if not next to `meshnode`


def package_source() -> Path:
    """Where this meshnode's code is (an editable install runs from its checkout)."""
    import meshnode

    return Path(meshnode.__file__).resolve().parent.parent


def meshnode_executable() -> Path:
    """The `meshnode` script of the environment running now: <venv>/bin/meshnode next
    to sys.executable (not resolved: the venv's python links to /usr/bin/python3)."""
    candidates = [Path(sys.prefix) / "bin" / "meshnode", Path(sys.executable).parent / "meshnode"]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path.absolute()
    found = shutil.which("meshnode")
    if found:
        return Path(found).absolute()
    return candidates[0].absolute()


def _code_paths(paths: UnitPaths) -> tuple[Path, ...]:
    """What the services must be able to see: the executable, the package's
    code, config and state."""
    extra = (paths.source,) if paths.source is not None else ()
    return (paths.meshnode, *extra, paths.config_dir, paths.state_dir)


# PrivateTmp=yes would hide an installation under these.
_TMP_TREES = (Path("/tmp"), Path("/var/tmp"))


def _private_tmp(paths: UnitPaths) -> str:
    for path in _code_paths(paths):
        p = path.absolute()
        if any(p == tree or tree in p.parents for tree in _TMP_TREES):
            return "no"
    return "yes"


def _protect_home(paths: UnitPaths) -> str:
    for path in _code_paths(paths):
        p = path.absolute()
        if any(p == tree or tree in p.parents for tree in _HOME_TREES):
            return "read-only"
    return "yes"


def _check_path(path: Path) -> str:
    text = str(path.absolute())
    if any(c.isspace() for c in text) or any(c in text for c in "\"'\\$%;"):
        raise ValueError(
            f"path {text!r} contains spaces or characters systemd would interpret; use a plain path"
        )
    return text


def render_units(paths: UnitPaths) -> dict[str, str]:
    """unit file name -> content."""
    values = {
        "meshnode": _check_path(paths.meshnode),
        "config_dir": _check_path(paths.config_dir),
        "state_dir": _check_path(paths.state_dir),
        "snapshot": _check_path(paths.state_dir / "ztunnel-snapshot.json"),
        "protect_home": _protect_home(paths),
        "private_tmp": _private_tmp(paths),
        "proxy_slice": PROXY_SLICE,
    }
    return {
        ZTUNNEL_UNIT: _ZTUNNEL_TEMPLATE.format(**values),
        AGENT_UNIT: _AGENT_TEMPLATE.format(**values),
        BPFFS_UNIT: _BPFFS_TEMPLATE,
    }


def render_package_units(meshnode: Path) -> dict[str, str]:
    """What the Debian package ships: the node's units for the default directories
    (the ones `meshnode enroll` would write for them, byte for byte), and the
    control plane's."""
    units = render_units(UnitPaths(meshnode, Path("/etc/meshnode"), Path("/var/lib/meshnode")))
    units[CONTROLPLANE_UNIT] = _CONTROLPLANE_TEMPLATE.format(meshnode=_check_path(meshnode))
    return units


# --- installing and starting ----------------------------------------------------------


class UnitError(MeshnodeError):
    """systemctl failed; the message carries its output."""


def systemd_missing() -> str | None:
    """Why units cannot be started here, or None when systemd runs this machine."""
    if shutil.which("systemctl") is None:
        return "systemctl is not installed"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not the init system (no /run/systemd/system)"
    return None


def install_units(
    unit_dir: Path, units: dict[str, str], packaged_dir: Path = PACKAGED_UNIT_DIR
) -> list[Path]:
    """Write the unit files (0644, atomically). Returns the paths in effect. A unit
    the installed package already ships with the same text is left to the package
    (and a copy an earlier enroll wrote is removed), so that removing the package
    removes it."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in units.items():
        path = unit_dir / name
        packaged = packaged_dir / name
        try:
            same = packaged.read_text() == text
        except OSError:
            same = False
        if same:
            path.unlink(missing_ok=True)
            written.append(packaged)
            continue
        write_file_atomic(path, text.encode(), 0o644)
        written.append(path)
    return written


# Longer than the units' own start timeouts (TimeoutStartSec), so that systemd
# reports a start that takes too long before we give up on waiting for it.
SYSTEMCTL_TIMEOUT = 660.0


def _systemctl(*args: str) -> None:
    try:
        proc = subprocess.run(
            ["systemctl", *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise UnitError(
            f"`systemctl {' '.join(args)}` did not finish within {SYSTEMCTL_TIMEOUT:.0f}s; "
            "the units may still be starting (the agent compiles its BPF programs at "
            "start): see `systemctl status meshnode-agent meshnode-ztunnel`"
        ) from None
    if proc.returncode != 0:
        out = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise UnitError(f"`systemctl {' '.join(args)}` failed: {out}")


def start_units(restart: bool = False) -> None:
    """daemon-reload, then enable and start both services; `restart` also restarts them
    when they were running already (a re-enrollment must load the new files)."""
    _systemctl("daemon-reload")
    if restart:
        _systemctl("enable", *UNIT_NAMES)
        _systemctl("restart", *UNIT_NAMES)  # starts them too when they were stopped
    else:
        _systemctl("enable", "--now", *UNIT_NAMES)
