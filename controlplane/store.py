"""Durable control-plane state: one interface, SQLite (embedded) or PostgreSQL (HA).

Every mutation is one transaction that locks the ``meta`` row (``SELECT ... FOR
UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), brings the store's in-memory
:class:`~registry.Registry` up to the stored revision (from the change log, when
another replica wrote since), runs the change on it, writes the rows it changed and
its change-log entries, and bumps the global revision. So a write costs what it
changes, two control planes on one PostgreSQL serialize their writes, and a UNIQUE
constraint on ``services.vip`` backs up the VIP allocation. A write that fails
after the registry changed makes the next one load the registry again.

Other replicas learn about commits from ``NOTIFY meshnode_revision`` (sent inside
the transaction, delivered on commit); :meth:`Store.wait_for_change` blocks on it
with a timeout, and the caller re-reads the revision after every wake-up, so a lost
notification costs at most one timeout. SQLite has an in-process condition instead
(several processes on one SQLite file are not supported).

The store is blocking (call it from a thread); one connection per store, guarded by
a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives import hashes, serialization

from meshnode.controlplane.ca import CertificateAuthority, RotatingCA
from meshnode.controlplane.registry import (
    Change,
    NodeRecord,
    Registry,
    RevokedRecord,
    RowChanges,
    ServiceRecord,
    WorkloadRecord,
)
from meshnode.controlplane.tokens import (
    ZONE_TOKEN_NODE,
    TokenRecord,
    enrollment_address,
    verify_token,
)
from meshnode.core.errors import MeshnodeError
from meshnode.core.pki import root_pin
from meshnode.core.token import JoinToken

__all__ = [
    "KEEP_REVISIONS",
    "SCHEMA",
    "CARow",
    "StateRead",
    "Store",
    "StoreError",
    "open_store",
]

log = logging.getLogger("meshnode.controlplane")

T = TypeVar("T")
KEEP_REVISIONS = 1000  # the change log keeps this many revisions; older nodes get a full slice
NOTIFY_CHANNEL = "meshnode_revision"

# (table, column, definition): columns added after a release; initialize() adds
# them to an older store, so an upgrade keeps its data.
MIGRATIONS = (
    ("tokens", "identities", "TEXT NOT NULL DEFAULT ''"),
    ("tokens", "address", "TEXT NOT NULL DEFAULT ''"),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL,
    log_floor BIGINT NOT NULL
);
INSERT INTO meta (id, revision, log_floor) VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS ca (
    pin TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    root_cert TEXT NOT NULL,
    root_key TEXT NOT NULL,
    intermediate_cert TEXT NOT NULL,
    intermediate_key TEXT NOT NULL,
    retire_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS admin_tokens (
    sha256 TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    node TEXT NOT NULL,
    zone TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    used_at DOUBLE PRECISION,
    used_by TEXT NOT NULL DEFAULT '',
    identities TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    zone TEXT NOT NULL,
    ip TEXT NOT NULL,
    revision BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS workloads (
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    service TEXT NOT NULL,
    service_account TEXT NOT NULL,
    port INTEGER NOT NULL,
    version TEXT NOT NULL,
    revision BIGINT NOT NULL,
    PRIMARY KEY (node, name)
);
CREATE TABLE IF NOT EXISTS services (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    vip TEXT NOT NULL UNIQUE,
    port INTEGER NOT NULL,
    revision BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    revision BIGINT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS revoked_nodes (
    node TEXT PRIMARY KEY,
    issued_before DOUBLE PRECISION NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    revision BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    revision BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    op TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    nodes TEXT,
    PRIMARY KEY (revision, seq)
);
"""


class StoreError(MeshnodeError):
    """The database cannot be used; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class CARow:
    pin: str
    revision: int
    root_cert: str
    root_key: str
    intermediate_cert: str
    intermediate_key: str
    retire_at: float | None


@dataclass(frozen=True, slots=True)
class StateRead:
    """One consistent read at `revision`: the change log after a revision, the CA
    rows, and (for a full read) the whole registry."""

    revision: int
    floor: int
    registry: Registry | None
    changes: list[Change]
    ca: list[CARow]


class _Tx(Protocol):
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class _Backend(Protocol):
    lock_suffix: str

    def transaction(self, write: bool) -> contextlib.AbstractContextManager[_Tx]: ...
    def notify(self, tx: _Tx, revision: int) -> None: ...
    def committed(self, revision: int) -> None: ...
    def wait_for_change(self, timeout: float) -> None: ...
    def close(self) -> None: ...


# --- backends -----------------------------------------------------------------------


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())


class _SqliteBackend:
    lock_suffix = ""  # BEGIN IMMEDIATE already holds the write lock

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from None
        with contextlib.suppress(OSError):
            path.chmod(0o600)  # it holds the CA keys
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._seen = 0

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_Tx]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def notify(self, tx: _Tx, revision: int) -> None:
        pass

    def committed(self, revision: int) -> None:
        with self._changed:
            self._seen = max(self._seen, revision)
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        with self._changed:
            seen = self._seen
            self._changed.wait_for(lambda: self._seen != seen, timeout)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        self.committed(self._seen + 1)


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._conn.execute(sql.replace("?", "%s"), tuple(params))
        return list(cur.fetchall()) if cur.description is not None else []


class _PostgresBackend:
    lock_suffix = " FOR UPDATE"

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "PostgreSQL storage needs psycopg, which is not installed: install "
                "meshnode's controlplane extra (pip install 'meshnode[controlplane]')"
            ) from None

        self._psycopg = psycopg
        self._dsn = dsn
        self._lock = threading.Lock()
        self._conn: Any = None
        self._listener: Any = None
        self._closed = False
        with self._lock:
            self._connect()  # fail at start-up with a clear message

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
            except self._psycopg.Error as exc:
                raise StoreError(
                    f"cannot connect to PostgreSQL ({_redact(self._dsn)}): {exc}".strip()
                ) from None
        return self._conn

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_Tx]:
        with self._lock:
            conn = self._connect()
            try:
                conn.execute(
                    "BEGIN ISOLATION LEVEL READ COMMITTED"
                    if write
                    else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
                )
                try:
                    yield _PgTx(conn)
                except BaseException:
                    if not conn.closed:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except self._psycopg.OperationalError as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                raise StoreError(f"PostgreSQL connection failed: {exc}") from None

    def notify(self, tx: _Tx, revision: int) -> None:
        tx.rows("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(revision)))

    def committed(self, revision: int) -> None:
        pass  # NOTIFY reaches this process's listener too

    def wait_for_change(self, timeout: float) -> None:
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=10
                )
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except self._psycopg.Error:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    self._listener.close()
            self._listener = None
            if not self._closed:
                time.sleep(timeout)  # the caller re-reads the revision anyway

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._conn is not None:
                self._conn.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()


def _redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    if "://" in dsn and "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return dsn


def open_store(url: str) -> Store:
    """``sqlite:///abs/path.db``, ``sqlite:relative.db`` or ``postgresql://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        backend: _Backend = _PostgresBackend(url)
    elif url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]  # sqlite:///var/lib/x.db -> /var/lib/x.db
        if not path:
            raise StoreError(f"no file in database URL {url!r}: use sqlite:///path/to/cp.db")
        backend = _SqliteBackend(Path(path))
    else:
        raise StoreError(
            f"unsupported database URL {url!r}: use sqlite:///path/to/cp.db or "
            "postgresql://user:password@host/dbname"
        )
    store = Store(backend)
    store.initialize()
    return store


# --- the store ----------------------------------------------------------------------


class Store:
    def __init__(self, backend: _Backend) -> None:
        self._b = backend
        self.is_postgres = isinstance(backend, _PostgresBackend)
        # The writer's registry, at the revision it last wrote or read (None: load it).
        self._writer: Registry | None = None

    def initialize(self) -> None:
        with self._b.transaction(write=True) as tx:
            if self.is_postgres:  # two replicas starting at once must not race on DDL
                tx.rows("SELECT pg_advisory_xact_lock(7426518)")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    tx.rows(statement)
            for table, column, ddl in MIGRATIONS:  # columns added since a store was made
                if column not in self._columns(tx, table):
                    tx.rows(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")

    def _columns(self, tx: _Tx, table: str) -> set[str]:
        if self.is_postgres:
            rows = tx.rows(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?",
                (table,),
            )
            return {r[0] for r in rows}
        return {r[1] for r in tx.rows(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        self._b.close()

    def wait_for_change(self, timeout: float) -> None:
        """Block until another commit may have happened, or `timeout` seconds."""
        self._b.wait_for_change(timeout)

    # -- reads ------------------------------------------------------------------------

    def revision(self) -> int:
        with self._b.transaction(write=False) as tx:
            return int(tx.rows("SELECT revision FROM meta WHERE id = 1")[0][0])

    def read_state(self) -> StateRead:
        """The whole registry, the change log it keeps, and the CA rows."""
        with self._b.transaction(write=False) as tx:
            revision, floor = _meta(tx)
            registry = _load_registry(tx, revision)
            return StateRead(revision, floor, registry, _load_changes(tx, floor), _load_ca(tx))

    def read_changes(self, after: int) -> StateRead:
        """The change log after revision `after` (from the floor, if it keeps no more),
        and the CA rows; no registry."""
        with self._b.transaction(write=False) as tx:
            revision, floor = _meta(tx)
            changes = _load_changes(tx, max(after, floor))
            return StateRead(revision, floor, None, changes, _load_ca(tx))

    def registry(self) -> Registry:
        registry = self.read_state().registry
        assert registry is not None
        return registry

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self._b.transaction(write=False) as tx:
            return _load_token(tx, token_id)

    def admin_token_hashes(self) -> set[str]:
        with self._b.transaction(write=False) as tx:
            return {r[0] for r in tx.rows("SELECT sha256 FROM admin_tokens")}

    def ca_rows(self) -> list[CARow]:
        with self._b.transaction(write=False) as tx:
            return _load_ca(tx)

    # -- mutations --------------------------------------------------------------------

    def mutate(
        self,
        fn: Callable[[_Tx, Registry, int], T],
        extra: Sequence[tuple[str, str, str]] = (),
    ) -> tuple[int, T]:
        """Run `fn(tx, registry, new_revision) -> result` in one write transaction; `fn`
        changes the registry with its methods. Persist the rows that changed, log the
        changes plus `extra` (op, kind, key) entries for every node, bump the
        revision. Exceptions roll everything back."""
        committed = False
        new = -1
        try:
            with self._b.transaction(write=True) as tx:
                row = tx.rows(
                    "SELECT revision, log_floor FROM meta WHERE id = 1" + self._b.lock_suffix
                )
                revision, floor = int(row[0][0]), int(row[0][1])
                new = revision + 1
                reg = self._writer_at(tx, revision, floor)
                changes, result = reg.run(new, lambda r: fn(tx, r, new))
                changes += [Change(new, op, kind, key, None, None) for op, kind, key in extra]
                _write_rows(tx, reg.last_rows, new)
                _insert_changes(tx, changes)
                new_floor = max(floor, new - KEEP_REVISIONS)
                if new_floor > floor:
                    tx.rows("DELETE FROM changes WHERE revision <= ?", (new_floor,))
                tx.rows(
                    "UPDATE meta SET revision = ?, log_floor = ? WHERE id = 1", (new, new_floor)
                )
                self._b.notify(tx, new)
            committed = True
        finally:
            writer = self._writer
            ahead = writer is not None and (writer.broken or 0 < new <= writer.revision)
            if not committed and ahead:
                self._writer = None  # ahead of (or apart from) the store: load it again
        self._b.committed(new)
        return new, result

    def _writer_at(self, tx: _Tx, revision: int, floor: int) -> Registry:
        """The writer's registry at the stored `revision`: as it is, caught up from the
        change log (another replica wrote), or loaded (first write, or too far behind)."""
        reg = self._writer
        if reg is not None and reg.revision == revision:
            return reg
        if reg is not None and not reg.broken and floor <= reg.revision < revision:
            try:
                reg.follow(_load_changes(tx, reg.revision), revision)
                return reg
            except Exception as exc:  # noqa: BLE001 - any mismatch: load it whole
                log.warning("registry: cannot follow the change log (%s); loading it again", exc)
        reg = self._writer = _load_registry(tx, revision)
        return reg

    def create_token(self, record: TokenRecord) -> int:
        def fn(tx: _Tx, reg: Registry, rev: int) -> None:
            tx.rows(
                "INSERT INTO tokens (id, secret_sha256, node, zone, created_at, expires_at, "
                "identities, address) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.secret_sha256,
                    record.node,
                    record.zone,
                    record.created_at,
                    record.expires_at,
                    " ".join(record.identities),
                    record.address,
                ),
            )

        return self.mutate(fn)[0]

    def check_token(
        self, token: JoinToken, name: str, zone: str, claimed: str, now: float, peer: str = ""
    ) -> None:
        """Raise TokenError unless `token` would let node `name` enroll now (read
        only: the control plane checks before it signs anything)."""
        with self._b.transaction(write=False) as tx:
            record = _load_token(tx, token.id)
        verify_token(record, token, name, zone, now)
        assert record is not None  # verify_token refused a missing one
        enrollment_address(record, claimed, peer or claimed)

    def enroll(
        self, token: JoinToken, name: str, zone: str, claimed: str, now: float, peer: str = ""
    ) -> tuple[int, NodeRecord]:
        """Consume `token` and register node `name` at the address it gets (the token's,
        else `peer`, the address the enrollment came from), with the token's identities
        as its grant; or raise TokenError changing nothing."""

        def fn(tx: _Tx, reg: Registry, rev: int) -> NodeRecord:
            lock = self._b.lock_suffix
            record = _load_token(tx, token.id, lock)
            node_zone = verify_token(record, token, name, zone, now)
            assert record is not None  # verify_token refused a missing one
            address = enrollment_address(record, claimed, peer or claimed)
            tx.rows(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE id = ?", (now, name, token.id)
            )
            node = NodeRecord(name, node_zone, address)
            reg.put_node(node)
            reg.set_token_grant(name, record.identities)
            return node

        return self.mutate(fn)

    def check_zone_token(self, token: JoinToken, zone: str, now: float) -> str:
        """(Global) The zone `token` would enroll a zone control plane for (read
        only, before anything is signed); TokenError otherwise."""
        with self._b.transaction(write=False) as tx:
            record = _load_token(tx, token.id)
        return verify_token(record, token, ZONE_TOKEN_NODE, zone, now)

    def enroll_zone(
        self, token: JoinToken, zone: str, now: float, intermediate: str, keep: int
    ) -> tuple[int, str]:
        """(Global) Consume `token` and enroll the zone it names with the
        `intermediate` CA certificate issued to it (keeping its last `keep`); or
        raise TokenError changing nothing. (revision, zone)."""

        def fn(tx: _Tx, reg: Registry, rev: int) -> str:
            record = _load_token(tx, token.id, self._b.lock_suffix)
            granted = verify_token(record, token, ZONE_TOKEN_NODE, zone, now)
            tx.rows(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE id = ?",
                (now, f"zone {granted}", token.id),
            )
            reg.enroll_zone(granted, now, intermediate, keep)
            return granted

        return self.mutate(fn)

    def add_admin_token_hash(self, sha256: str, now: float) -> None:
        with self._b.transaction(write=True) as tx:
            tx.rows(
                "INSERT INTO admin_tokens (sha256, created_at) VALUES (?, ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                (sha256, now),
            )

    def ensure_ca(self, create: Callable[[], CertificateAuthority]) -> RotatingCA:
        """The stored CAs; on first start, `create()` one and store it (once, even
        when two replicas start together)."""
        rows = self.ca_rows()
        if rows:
            return rotating_ca(rows)

        def fn(tx: _Tx, reg: Registry, rev: int) -> RotatingCA:
            existing = _load_ca(tx)
            if existing:
                return rotating_ca(existing)
            ca = create()
            _insert_ca(tx, ca, rev, None)
            return RotatingCA([(ca, None)])

        return self.mutate(fn, extra=[("put", "ca", "bundle")])[1]

    def rotate_ca(self, rotate: Callable[[RotatingCA], RotatingCA]) -> RotatingCA:
        """Replace the CA set by `rotate(current)`: update retirement times, add new ones."""

        def fn(tx: _Tx, reg: Registry, rev: int) -> RotatingCA:
            current = rotating_ca(_load_ca(tx))
            new = rotate(current)
            # A row is one (root, intermediate): found by its intermediate, so a zone's
            # new intermediate under the same root is a row of its own.
            rows = {inter: pin for pin, inter in tx.rows("SELECT pin, intermediate_cert FROM ca")}
            keep: set[str] = set()
            for ca, retire in new.entries:
                retire_ts = retire.timestamp() if retire is not None else None
                pin = rows.get(ca.to_pem()["intermediate_cert"].decode())
                if pin is not None:
                    tx.rows("UPDATE ca SET retire_at = ? WHERE pin = ?", (retire_ts, pin))
                else:
                    pin = _insert_ca(tx, ca, rev, retire_ts, taken=set(rows.values()) | keep)
                keep.add(pin)
            for (pin,) in tx.rows("SELECT pin FROM ca"):
                if pin not in keep:
                    tx.rows("DELETE FROM ca WHERE pin = ?", (pin,))
            return new

        return self.mutate(fn, extra=[("put", "ca", "bundle")])[1]


def rotating_ca(rows: Sequence[CARow]) -> RotatingCA:
    entries = []
    for r in rows:
        ca = CertificateAuthority.from_pem(
            r.root_cert.encode(),
            r.root_key.encode(),
            r.intermediate_cert.encode(),
            r.intermediate_key.encode(),
        )
        retire = datetime.fromtimestamp(r.retire_at, UTC) if r.retire_at is not None else None
        entries.append((ca, retire))
    return RotatingCA(entries)


# --- rows <-> values ------------------------------------------------------------------


def _der(ca: CertificateAuthority) -> bytes:
    return ca.root_certificate.public_bytes(serialization.Encoding.DER)


def _insert_ca(
    tx: _Tx,
    ca: CertificateAuthority,
    rev: int,
    retire_at: float | None,
    taken: set[str] | frozenset[str] = frozenset(),
) -> str:
    """Store `ca`; its key is its root's pin, or (a second intermediate under that
    root) the pin and the intermediate's fingerprint. The key it got."""
    pem = ca.to_pem()
    pin = root_pin(_der(ca))
    if pin in taken:
        inter = ca.intermediate_certificate.fingerprint(hashes.SHA256()).hex()
        pin = f"{pin}:{inter[:16]}"
    tx.rows(
        "INSERT INTO ca (pin, revision, root_cert, root_key, intermediate_cert, "
        "intermediate_key, retire_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            pin,
            rev,
            pem["root_cert"].decode(),
            pem["root_key"].decode(),
            pem["intermediate_cert"].decode(),
            pem["intermediate_key"].decode(),
            retire_at,
        ),
    )
    return pin


def _load_ca(tx: _Tx) -> list[CARow]:
    rows = tx.rows(
        "SELECT pin, revision, root_cert, root_key, intermediate_cert, intermediate_key, "
        "retire_at FROM ca ORDER BY revision, pin"
    )
    return [CARow(r[0], int(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]


def _load_token(tx: _Tx, token_id: str, lock: str = "") -> TokenRecord | None:
    rows = tx.rows(
        "SELECT id, secret_sha256, node, zone, created_at, expires_at, used_at, used_by, "
        "identities, address FROM tokens WHERE id = ?" + lock,
        (token_id,),
    )
    if not rows:
        return None
    r = rows[0]
    return TokenRecord(
        r[0],
        r[1],
        r[2],
        r[3],
        float(r[4]),
        float(r[5]),
        None if r[6] is None else float(r[6]),
        r[7],
        tuple(r[8].split()),
        r[9],
    )


def _meta(tx: _Tx) -> tuple[int, int]:
    revision, floor = tx.rows("SELECT revision, log_floor FROM meta WHERE id = 1")[0]
    return int(revision), int(floor)


def _load_registry(tx: _Tx, revision: int) -> Registry:
    return Registry.load(
        revision,
        (NodeRecord(r[0], r[1], r[2]) for r in tx.rows("SELECT name, zone, ip FROM nodes")),
        (
            WorkloadRecord(r[0], r[1], r[2], r[3], r[4], int(r[5]), r[6])
            for r in tx.rows(
                "SELECT node, name, namespace, service, service_account, port, version "
                "FROM workloads"
            )
        ),
        (
            ServiceRecord(r[0], r[1], r[2], int(r[3]))
            for r in tx.rows("SELECT namespace, name, vip, port FROM services")
        ),
        (json.loads(r[0]) for r in tx.rows("SELECT body FROM resources")),
        (
            RevokedRecord(r[0], float(r[1]), float(r[2]))
            for r in tx.rows("SELECT node, issued_before, until FROM revoked_nodes")
        ),
    )


def _load_changes(tx: _Tx, after: int) -> list[Change]:
    rows = tx.rows(
        "SELECT revision, op, kind, key, value, nodes FROM changes WHERE revision > ? "
        "ORDER BY revision, seq",
        (after,),
    )
    return [
        Change(
            int(r[0]),
            r[1],
            r[2],
            r[3],
            None if r[4] is None else json.loads(r[4]),
            None if r[5] is None else tuple(json.loads(r[5])),
        )
        for r in rows
    ]


def _insert_changes(tx: _Tx, changes: Sequence[Change]) -> None:
    for seq, c in enumerate(changes):
        tx.rows(
            "INSERT INTO changes (revision, seq, op, kind, key, value, nodes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                c.revision,
                seq,
                c.op,
                c.kind,
                c.key,
                None if c.value is None else json.dumps(c.value, sort_keys=True),
                None if c.nodes is None else json.dumps(list(c.nodes)),
            ),
        )


def _write_rows(tx: _Tx, rows: RowChanges, rev: int) -> None:
    """Write the rows one change made: deletes first, so a VIP freed here may be
    taken again in the same transaction."""
    for key, svc in rows.services.items():
        if svc is None:
            tx.rows("DELETE FROM services WHERE namespace = ? AND name = ?", key)
    for wkey, wl in rows.workloads.items():
        if wl is None:
            tx.rows("DELETE FROM workloads WHERE node = ? AND name = ?", wkey)
    for name, node in rows.nodes.items():
        if node is None:
            tx.rows("DELETE FROM nodes WHERE name = ?", (name,))
    for rkey, doc in rows.resources.items():
        if doc is None:
            tx.rows("DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ?", rkey)
    for name, rv in rows.revoked.items():
        if rv is None:
            tx.rows("DELETE FROM revoked_nodes WHERE node = ?", (name,))
        else:
            tx.rows(
                "INSERT INTO revoked_nodes (node, issued_before, until, revision) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (node) DO UPDATE SET "
                "issued_before = excluded.issued_before, until = excluded.until, "
                "revision = excluded.revision",
                (rv.node, rv.issued_before, rv.until, rev),
            )
    for node in rows.nodes.values():
        if node is not None:
            tx.rows(
                "INSERT INTO nodes (name, zone, ip, revision) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET zone = excluded.zone, ip = excluded.ip, "
                "revision = excluded.revision",
                (node.name, node.zone, node.ip, rev),
            )
    for svc in rows.services.values():
        if svc is not None:
            tx.rows(
                "INSERT INTO services (namespace, name, vip, port, revision) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (namespace, name) DO UPDATE SET vip = excluded.vip, "
                "port = excluded.port, revision = excluded.revision",
                (svc.namespace, svc.name, svc.vip, svc.port, rev),
            )
    for w in rows.workloads.values():
        if w is not None:
            tx.rows(
                "INSERT INTO workloads (node, name, namespace, service, service_account, port, "
                "version, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (node, name) DO UPDATE SET namespace = excluded.namespace, "
                "service = excluded.service, service_account = excluded.service_account, "
                "port = excluded.port, version = excluded.version, revision = excluded.revision",
                (w.node, w.name, w.namespace, w.service, w.service_account, w.port, w.version, rev),
            )
    for rkey, doc in rows.resources.items():
        if doc is not None:
            tx.rows(
                "INSERT INTO resources (kind, namespace, name, body, revision) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, namespace, name) DO UPDATE SET "
                "body = excluded.body, revision = excluded.revision",
                (*rkey, json.dumps(doc), rev),
            )
