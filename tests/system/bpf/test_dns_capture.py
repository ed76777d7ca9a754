"""The DNS capture in the kernel (bpf/dns.c, bpf/members.c, connect.c), in a fresh
network namespace with a member and a non-member cgroup.

A member's queries to any resolver on port 53 -- unconnected UDP (sendto),
connected UDP (glibc's way) and TCP -- reach the DNS proxy's address instead, and
the replies seem to come from the resolver that was asked. A non-member's queries
are not touched, nor a member's while the capture is off.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnode.bpf.cgroups import cgroup2_mount, cgroup_id
from meshnode.bpf.loader import MeshBpf
from meshnode.core.constants import DNS_PROXY_PORT
from tests.support.bpf import ebpf_missing, in_netns, remove_cgroup, unique

pytestmark = pytest.mark.root

RESOLVER = "127.0.0.53"  # what the workloads ask (systemd-resolved's stub address)


@pytest.fixture(scope="module", autouse=True)
def _require_ebpf() -> None:
    reason = ebpf_missing()
    if reason:
        pytest.skip(reason)


class Responder:
    """UDP and TCP on host:port in the netns; answers `<name>:<what it got>`."""

    def __init__(self, netns: str, host: str, port: int, name: str) -> None:
        self.name = name.encode()
        with in_netns(netns):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((host, port))
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind((host, port))
            self.tcp.listen(16)
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(512)
            except (TimeoutError, OSError):
                continue
            self.udp.sendto(self.name + b":" + data, peer)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.sendall(self.name + b":" + conn.recv(512))

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if mode == "tcp":
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect((host, port))
            s.sendall(b"q")
            data, peer = s.recv(512), s.getpeername()
        else:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(3)
            if mode == "connected":
                s.connect((host, port))
                s.send(b"q")
            else:
                s.sendto(b"q", (host, port))
            data, peer = s.recvfrom(512)
        print(json.dumps({"answer": data.decode(), "from": [peer[0], peer[1]]}))
    except OSError as exc:
        print(json.dumps({"error": str(exc)}))
    """
)


def ask(netns: str, cgroup: Path, mode: str, host: str = RESOLVER) -> dict[str, Any]:
    procs = cgroup / "cgroup.procs"
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", CLIENT, mode, host, "53"],
        preexec_fn=lambda: procs.write_text("0"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@dataclass
class Env:
    netns: str
    member: Path
    other: Path
    mesh: MeshBpf


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    netns = unique("mn-dns")
    parent = cgroup2_mount() / unique("mn-dns")
    pin_dir = Path("/sys/fs/bpf") / unique("mn-dns")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    mesh = MeshBpf(pin_dir)
    responders: list[Responder] = []
    member, other = parent / "member", parent / "other"
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        for path in (parent, member, other):
            path.mkdir()
        responders.append(Responder(netns, "127.0.0.1", DNS_PROXY_PORT, "proxy"))
        responders.append(Responder(netns, RESOLVER, 53, "resolver"))
        mesh.load()
        mesh.attach(parent)
        mesh.sync_workloads({cgroup_id(member): 7})
        mesh.capture_dns(True)
        yield Env(netns, member, other, mesh)
    finally:
        for r in responders:
            r.close()
        mesh.close()
        for path in (member, other, parent):
            if path.exists():
                remove_cgroup(path)
        subprocess.run(["ip", "netns", "del", netns], check=True)


@pytest.mark.parametrize("mode", ["sendto", "connected", "tcp"])
def test_a_members_dns_goes_to_the_proxy_and_seems_to_come_back_from_its_resolver(
    env: Env, mode: str
) -> None:
    got = ask(env.netns, env.member, mode)
    assert got.get("answer") == "proxy:q", got
    if mode != "tcp":  # UDP: the reply's source is rewritten to the resolver asked
        assert got["from"] == [RESOLVER, 53], got


@pytest.mark.parametrize("mode", ["sendto", "connected", "tcp"])
def test_a_non_members_dns_is_not_touched(env: Env, mode: str) -> None:
    got = ask(env.netns, env.other, mode)
    assert got.get("answer") == "resolver:q", got
    assert got["from"] == [RESOLVER, 53], got


def test_a_members_v4_mapped_query_on_an_ipv6_socket_is_captured_too(env: Env) -> None:
    got = ask(env.netns, env.member, "sendto", f"::ffff:{RESOLVER}")
    assert got.get("answer") == "proxy:q", got
    assert got["from"] == [f"::ffff:{RESOLVER}", 53], got


def test_with_the_capture_off_a_members_dns_is_not_touched(env: Env) -> None:
    env.mesh.capture_dns(False)
    try:
        for mode in ("sendto", "connected", "tcp"):
            got = ask(env.netns, env.member, mode)
            assert got.get("answer") == "resolver:q", (mode, got)
    finally:
        env.mesh.capture_dns(True)
