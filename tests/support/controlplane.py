"""Helpers for the control-plane tests: a private PostgreSQL 15, a control plane
running in a background thread, and node-side helpers (enroll, node client).
Imported by tests/test_cp_*.py and test_controlplane_*.py; holds no tests itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshnode.controlplane.api import ControlPlane, ControlPlaneConfig
from meshnode.controlplane.store import Store, open_store
from meshnode.core.cpclient import ApiClient
from meshnode.core.identity import SpiffeId
from meshnode.core.pki import generate_private_key, make_csr, write_private_key

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_missing() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return (
            f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; apt-get install postgresql)"
        )
    if os.geteuid() != 0:
        return "starting a private PostgreSQL needs root (runuser -u postgres)"
    if shutil.which("runuser") is None:
        return "runuser is not installed"
    return None


class PostgresServer:
    """A throwaway PostgreSQL 15 in a temp dir, on a Unix socket there and a loopback port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meshnode-pg-"))
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()

    def _pg(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            timeout=timeout,
            capture_output=True,
            cwd=self.dir,
        )

    def start(self) -> None:
        self._pg(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self._pg(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    reason = postgres_missing()
    if reason is not None:
        print(f"skipping PostgreSQL tests: {reason}")
        pytest.skip(reason)
    server = PostgresServer()
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        server.stop()
        pytest.fail(f"cannot start PostgreSQL: {exc.stderr.decode(errors='replace')}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/cp.db"
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.new_database()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


# --- a control plane in a thread ------------------------------------------------------


class ThreadedControlPlane:
    """Runs a ControlPlane on its own event loop in a thread, for blocking tests."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        *,
        cert_ttl: float = 3600,
        **config: Any,
    ) -> None:
        """`config`: other ControlPlaneConfig fields (caps, timeouts, admin_socket)."""
        self.data_dir = data_dir
        self.config = ControlPlaneConfig(
            trust_domain="cluster.local",
            cert_ttl=timedelta(seconds=cert_ttl),
            data_dir=data_dir,
            **config,
        )
        self.cp = ControlPlane(store, self.config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ThreadedControlPlane:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.cp.start("127.0.0.1", 0), self.loop).result(30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.cp.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.cp.port}"

    def bundle(self) -> bytes:
        return (self.data_dir / "trust-bundle.pem").read_bytes()

    def admin(self, token: str | None = "") -> ApiClient:
        """An admin client over TLS with `token` ("" = the control plane's own admin
        token, None = none: no address is trusted, loopback included)."""
        if token == "":
            token = self.cp.admin_token
        return ApiClient(self.url, self.bundle(), admin_token=token)

    def local_admin(self) -> ApiClient:
        """An admin client on the root-only admin Unix socket."""
        return ApiClient(self.url, b"", unix_socket=str(self.config.admin_socket_path), timeout=10)


@dataclass
class EnrolledNode:
    name: str
    dir: Path
    key_path: Path
    cert_path: Path
    bundle: bytes
    response: dict[str, Any]

    def client(self, url: str) -> ApiClient:
        return ApiClient(
            url, self.bundle, cert_file=str(self.cert_path), key_file=str(self.key_path)
        )


def node_csr(directory: Path) -> tuple[Path, bytes]:
    """A node key (written 0600) and a CSR for it (identity names in a CSR are ignored)."""
    key = generate_private_key()
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "node-key.pem"
    write_private_key(key_path, key)
    return key_path, make_csr(key, SpiffeId("cluster.local", "ignored", "ignored"))


def enroll(
    url: str,
    bundle: bytes,
    token: str,
    name: str,
    directory: Path,
    zone: str = "",
    ip: str | None = None,
) -> tuple[int, Any, EnrolledNode | None]:
    key_path, csr = node_csr(directory)
    body: dict[str, Any] = {"token": token, "name": name, "csr": csr.decode()}
    if zone:
        body["zone"] = zone
    if ip:
        body["ip"] = ip
    status, data = ApiClient(url, bundle).request("POST", "/v1/enroll", body)
    if status != 200:
        return status, data, None
    cert_path = directory / "node-cert.pem"
    cert_path.write_text(data["certificate"])
    return (
        status,
        data,
        EnrolledNode(name, directory, key_path, cert_path, data["trust_bundle"].encode(), data),
    )


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
