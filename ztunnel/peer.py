"""Who is on the other end of my connection? -- answered only to the workload
that holds the connection.

A workload that accepts a meshed connection sees it come from the delivery
address (127.0.0.6), not from the client. It may ask ztunnel for the client's
proven identity on the peer socket (a Unix socket, ``peer.sock`` next to the
snapshot by default)::

    GET /v1/peer?local=<its own address:port>&remote=<127.0.0.6:port>

The answer is keyed by the connection's full 4-tuple, and given only when the
asking process (SO_PEERCRED: the kernel's word, not the client's) belongs to the
workload the connection was delivered to: its cgroup, or an ancestor of it, is
that workload's in the agent's membership map. Any other process gets 403 (not
a mesh workload) or 404 (no such connection *of yours*: the same answer whether
or not another workload has one, so it learns nothing). Nothing is answered for
an address alone; the old ``/peer?addr=`` on the loopback admin port is gone.

The parsing and decisions here are pure; :class:`PeerServer` is the I/O shell.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from meshnode.core.errors import MeshnodeError

log = logging.getLogger("meshnode.ztunnel.peer")

__all__ = [
    "PATH",
    "ConnKey",
    "PeerIndex",
    "PeerQueryError",
    "PeerServer",
    "ancestors",
    "cgroup_of_pid_text",
    "parse_query",
    "workload_of_pid_in",
    "workload_of_pid_via",
]

PATH = "/v1/peer"
MAX_CGROUP_DEPTH = 16  # as the BPF programs (MN_MAX_CGROUP_DEPTH)


class PeerQueryError(ValueError):
    """A malformed question; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class ConnKey:
    """A delivered connection as the workload sees it: its own end (local)
    and ztunnel's end (remote, the delivery address)."""

    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int


def _endpoint(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise PeerQueryError(f"{what}={value!r}: expected IP:PORT")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise PeerQueryError(f"{what}={value!r}: {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    n = int(port)
    if not 0 < n <= 0xFFFF:
        raise PeerQueryError(f"{what}={value!r}: port out of range 1-65535")
    return str(ip), n


def parse_query(query: str) -> ConnKey:
    """``local=IP:PORT&remote=IP:PORT`` -> the connection's key."""
    params = parse_qs(query, keep_blank_values=True)
    for name in ("local", "remote"):
        if len(params.get(name, [])) != 1:
            raise PeerQueryError(f"give {name}=IP:PORT exactly once")
    lip, lport = _endpoint(params["local"][0], "local")
    rip, rport = _endpoint(params["remote"][0], "remote")
    return ConnKey(lip, lport, rip, rport)


def cgroup_of_pid_text(text: str) -> str:
    """The cgroup v2 path in a /proc/<pid>/cgroup file (the ``0::/path`` line)."""
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "" and path.startswith("/"):
            return path
    raise PeerQueryError("the process is not in a cgroup v2 hierarchy")


def ancestors(path: str) -> Iterator[str]:
    """The cgroup itself, then its ancestors (deepest first), up to the
    depth the BPF programs look; the root itself is never a workload."""
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), max(0, len(parts) - MAX_CGROUP_DEPTH), -1):
        yield "/" + "/".join(parts[:depth])


@dataclass(frozen=True, slots=True)
class PeerRecord:
    identity: str  # the client's proven SPIFFE ID
    workload_id: int  # the local workload the connection was delivered to


class PeerIndex:
    """Open delivered connections, by full 4-tuple."""

    def __init__(self) -> None:
        self._by_key: dict[ConnKey, PeerRecord] = {}

    def add(self, key: ConnKey, identity: str, workload_id: int) -> None:
        self._by_key[key] = PeerRecord(identity, workload_id)

    def discard(self, key: ConnKey) -> None:
        self._by_key.pop(key, None)

    def __len__(self) -> int:
        return len(self._by_key)

    def answer(self, key: ConnKey, workload_id: int) -> tuple[int, dict[str, Any]]:
        """(status, body) for workload `workload_id` asking about `key`."""
        rec = self._by_key.get(key)
        if rec is None or rec.workload_id != workload_id:
            return 404, {"error": f"no meshed connection {_show(key)} of your workload"}
        return 200, {
            "local": f"{key.local_ip}:{key.local_port}",
            "remote": f"{key.remote_ip}:{key.remote_port}",
            "identity": rec.identity,
        }


def _show(key: ConnKey) -> str:
    return f"{key.local_ip}:{key.local_port} <- {key.remote_ip}:{key.remote_port}"


# -- I/O ------------------------------------------------------------------------------

Lookup = Callable[[ConnKey, int], Awaitable[tuple[int, dict[str, Any]]]]
WorkloadOfPid = Callable[[int], int | None]


def peer_pid(request: web.BaseRequest) -> int | None:
    """The pid of the process at the other end of the request's Unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", raw)
    return pid if pid > 0 else None


def workload_of_pid_via(
    cgroup_root: Path, members: Callable[[list[int]], int | None]
) -> WorkloadOfPid:
    """The workload of a pid: its cgroup (from /proc) and ancestors, as ids,
    looked up in the membership map (`members`)."""

    def of(pid: int) -> int | None:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return None
        ids: list[int] = []
        for path in ancestors(cgroup_of_pid_text(text)):
            try:
                ids.append(os.stat(cgroup_root / path.lstrip("/")).st_ino)
            except OSError:
                continue
        return members(ids) if ids else None

    return of


def workload_of_pid_in(pin_dir: str | None, pid: int) -> int | None:
    """The mesh workload `pid` belongs to, from the agent's pinned membership
    map in `pin_dir` (opened per question: they are rare, and a restarted agent
    re-pins the map)."""
    if pin_dir is None:
        return None
    from meshnode.bpf.cgroups import cgroup2_mount
    from meshnode.bpf.pinned import MembershipTable

    table = MembershipTable.open(pin_dir)
    try:
        return workload_of_pid_via(cgroup2_mount(), table.workload_of)(pid)
    finally:
        table.close()


class PeerServer:
    """Serves :data:`PATH` on a Unix socket that any local process may open."""

    def __init__(self, workload_of_pid: WorkloadOfPid, lookup: Lookup) -> None:
        self._workload_of_pid = workload_of_pid
        self._lookup = lookup
        self._runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        status, body = await self._answer(request)
        return web.Response(
            status=status, text=json.dumps(body) + "\n", content_type="application/json"
        )

    async def _answer(self, request: web.BaseRequest) -> tuple[int, dict[str, Any]]:
        if request.method != "GET":
            return 405, {"error": "only GET"}
        if request.path != PATH:
            return 404, {
                "error": f"unknown path {request.path}; ask GET {PATH}?local=IP:PORT&remote=IP:PORT"
            }
        try:
            key = parse_query(request.query_string)
        except PeerQueryError as exc:
            return 400, {"error": str(exc)}
        pid = peer_pid(request)
        try:
            workload = self._workload_of_pid(pid) if pid is not None else None
        except (PeerQueryError, OSError, MeshnodeError) as exc:
            log.debug("peer query from pid %s: %s", pid, exc)
            workload = None
        if workload is None:
            return 403, {
                "error": "only a mesh workload may ask, and only about its own "
                "connections: this process is not in a meshed cgroup"
            }
        return await self._lookup(key, workload)

    async def listen(self, path: str) -> None:
        self._runner = web.ServerRunner(
            web.Server(
                self._handle,
                access_log=None,
                keepalive_timeout=5.0,
                max_line_size=4096,
                max_field_size=4096,
            ),
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await web.UnixSite(self._runner, path).start()
        # Any local process may ask; each is answered only about its own connections.
        os.chmod(path, 0o666)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
