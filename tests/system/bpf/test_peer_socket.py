"""The peer socket against the real membership map and real cgroups: only a
process inside the workload's cgroup (or a sub-cgroup of it) learns who its
connection is from. Another workload's process gets the same 404 as for no
connection at all, and a process outside the mesh gets 403. Needs root."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.bpf.cgroups import cgroup2_mount, cgroup_id
from meshnode.bpf.loader import MeshBpf
from meshnode.ztunnel.peer import ConnKey, PeerIndex, PeerServer, workload_of_pid_in
from tests.support.bpf import ebpf_missing, unique

WEB = "spiffe://cluster.local/ns/default/sa/web"
KEY = ConnKey("10.0.0.1", 8080, "127.0.0.6", 40000)

ASK = textwrap.dedent(
    """
    import asyncio, json, sys
    import aiohttp

    async def main():
        conn = aiohttp.UnixConnector(path=sys.argv[1])
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get("http://localhost/v1/peer?local=10.0.0.1:8080"
                             "&remote=127.0.0.6:40000") as r:
                print(json.dumps([r.status, await r.json()]))

    asyncio.run(main())
    """
)


@pytest.fixture(autouse=True)
def _require_ebpf() -> None:
    reason = ebpf_missing(tools=())
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cgroups() -> Iterator[dict[str, Path]]:
    root = cgroup2_mount() / unique("mn-peer")
    paths = {
        "web": root / "web",
        "web-sub": root / "web" / "sub",
        "ops": root / "ops",
        "outside": root / "outside",
    }
    for p in (root, *paths.values()):
        p.mkdir(exist_ok=True)
    try:
        yield paths
    finally:
        for p in (paths["web-sub"], paths["web"], paths["ops"], paths["outside"], root):
            for _ in range(100):
                try:
                    p.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path("/sys/fs/bpf") / unique("mn-peer")
    yield path
    for pin in path.glob("*"):
        pin.unlink()
    if path.exists():
        path.rmdir()


def ask_from(cgroup: Path, sock: str) -> tuple[int, dict[str, Any]]:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(
        [sys.executable, "-c", ASK, sock],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status, body = json.loads(out.stdout)
    return int(status), body


def test_only_the_workloads_own_processes_are_told(
    cgroups: dict[str, Path], pin_dir: Path, tmp_path: Path
) -> None:
    mesh = MeshBpf(pin_dir)
    mesh.load()
    mesh.attach(cgroups["web"].parent)  # attach() pins the maps, as the agent does
    try:
        mesh.sync_workloads({cgroup_id(cgroups["web"]): 5, cgroup_id(cgroups["ops"]): 6})
        index = PeerIndex()
        index.add(KEY, WEB, workload_id=5)

        async def lookup(key: ConnKey, wid: int) -> tuple[int, dict[str, Any]]:
            return index.answer(key, wid)

        sock = str(tmp_path / "peer.sock")
        loop = asyncio.new_event_loop()
        server = PeerServer(lambda pid: workload_of_pid_in(str(pin_dir), pid), lookup)
        loop.run_until_complete(server.listen(sock))
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            answers = {
                name: ask_from(cgroups[name], sock) for name in ("web", "web-sub", "ops", "outside")
            }
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
    finally:
        mesh.close()
    assert answers["web"] == (
        200,
        {"local": "10.0.0.1:8080", "remote": "127.0.0.6:40000", "identity": WEB},
    )
    assert answers["web-sub"] == answers["web"]  # a sub-cgroup is the workload too
    assert answers["ops"][0] == 404  # another workload: as if there were no connection
    assert answers["outside"][0] == 403  # not a mesh workload at all
