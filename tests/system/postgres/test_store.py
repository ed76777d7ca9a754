"""The store, on SQLite and on a real private PostgreSQL 15 (same tests, parametrized)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from meshnode.controlplane import registry as R
from meshnode.controlplane.ca import CertificateAuthority
from meshnode.controlplane.store import KEEP_REVISIONS, Store, open_store
from meshnode.controlplane.tokens import make_token
from meshnode.core.token import TokenError, parse_token

PIN = "cd" * 32


def _enrolled(store: Store, name: str = "node1", ip: str = "198.18.0.11") -> None:
    text, rec = make_token(name, "", 3600, PIN, time.time())
    store.create_token(rec)
    store.enroll(parse_token(text), name, "z1", ip, time.time())


def _put(store: Store, wl: R.WorkloadRecord) -> int:
    return store.mutate(lambda tx, r, rev: r.put_workload(wl))[0]


def test_every_mutation_bumps_revision_and_logs(store: Store) -> None:
    assert store.revision() == 0
    _enrolled(store)
    rev = store.revision()
    assert rev == 2  # token created, token used + node registered
    rev2 = _put(store, R.WorkloadRecord("node1", "web", "default", "web", "web", 8080))
    assert rev2 == rev + 1
    state = store.read_changes(after=rev)
    assert state.revision == rev2
    assert {(c.kind, c.key) for c in state.changes} == {
        ("workload", "web"),
        ("service", "default/web"),
    }
    assert store.registry().services[("default", "web")].vip == "240.0.0.1"


def test_failed_mutation_changes_nothing(store: Store) -> None:
    _enrolled(store)
    before = store.read_state()

    def bad(tx, reg, rev):  # type: ignore[no-untyped-def]
        reg.put_workload(R.WorkloadRecord("node1", "web", "default", "web", "web", 80))
        raise R.RegistryError("refused on purpose")

    with pytest.raises(R.RegistryError):
        store.mutate(bad)
    after = store.read_state()
    assert after.revision == before.revision
    assert before.registry is not None and after.registry is not None
    assert after.registry.rows() == before.registry.rows() and after.changes == before.changes
    # The writer's registry was half-changed: the next write loads it again and works.
    _put(store, R.WorkloadRecord("node1", "db", "default", "db", "db", 80))
    assert set(store.registry().services) == {("default", "db")}


def test_enroll_refusals_change_nothing(store: Store) -> None:
    text, rec = make_token("node1", "", 3600, PIN, time.time())
    store.create_token(rec)
    rev = store.revision()
    with pytest.raises(TokenError) as exc:
        store.enroll(parse_token(text), "node2", "", "10.0.0.1", time.time())
    assert exc.value.status == 403
    with pytest.raises(TokenError):
        store.enroll(parse_token(text), "node1", "", "10.0.0.1", time.time() + 7200)
    assert store.revision() == rev
    assert store.registry().nodes == {}
    got = store.get_token(rec.id)
    assert got is not None and got.used_at is None
    store.enroll(parse_token(text), "node1", "", "10.0.0.1", time.time())
    with pytest.raises(TokenError) as exc:
        store.enroll(parse_token(text), "node1", "", "10.0.0.1", time.time())
    assert exc.value.status == 401


def test_state_survives_reopen(store_url: str) -> None:
    s = open_store(store_url)
    ca = s.ensure_ca(lambda: CertificateAuthority.create("cluster.local"))
    _enrolled(s)
    _put(s, R.WorkloadRecord("node1", "web", "default", "web", "web", 8080))
    reg, rev = s.registry(), s.revision()
    s.close()
    s2 = open_store(store_url)
    try:
        assert s2.registry().rows() == reg.rows() and s2.revision() == rev
        again = s2.ensure_ca(lambda: pytest.fail("must not create a second CA"))  # type: ignore[arg-type,return-value]
        assert again.active.root_certificate == ca.active.root_certificate
    finally:
        s2.close()


def test_ca_rotation_is_stored(store: Store) -> None:
    ca = store.ensure_ca(lambda: CertificateAuthority.create("cluster.local"))
    rotated = store.rotate_ca(lambda c: c.rotate(timedelta(hours=1)))
    assert len(rotated.entries) == 2
    rows = store.ca_rows()
    assert len(rows) == 2 and rows[0].retire_at is not None and rows[1].retire_at is None
    from meshnode.controlplane.store import rotating_ca

    loaded = rotating_ca(rows)
    assert loaded.entries[0][0].root_certificate == ca.active.root_certificate
    assert loaded.active.root_certificate == rotated.active.root_certificate
    assert len(loaded.trusted()) == 2
    kinds = [(c.kind, c.key) for c in store.read_state().changes]
    assert kinds.count(("ca", "bundle")) == 2


def test_change_log_is_pruned(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import meshnode.controlplane.store as store_mod

    monkeypatch.setattr(store_mod, "KEEP_REVISIONS", 3)
    _enrolled(store)
    for i in range(6):
        _put(store, R.WorkloadRecord("node1", f"w{i}", "default", "web", "web", 8000 + i))
    state = store.read_state()
    assert state.floor == state.revision - 3
    assert min(c.revision for c in state.changes) > state.floor
    assert KEEP_REVISIONS >= 100


def test_wait_for_change_wakes_on_commit(store: Store) -> None:
    _enrolled(store)
    woke = threading.Event()
    start = threading.Event()

    def waiter() -> None:
        start.set()
        store.wait_for_change(10)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    start.wait()
    time.sleep(0.3)  # let the waiter block (and LISTEN)
    t0 = time.monotonic()
    _put(store, R.WorkloadRecord("node1", "web", "default", "web", "web", 8080))
    assert woke.wait(5)
    assert time.monotonic() - t0 < 2
    t.join()


def test_two_stores_allocate_distinct_vips(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writers on one database (two replicas on PostgreSQL): every service gets
    its own VIP and no write is lost. (SQLite: two connections in one process.)"""
    a, b = open_store(store_url), open_store(store_url)
    try:
        _enrolled(a)
        errors: list[BaseException] = []

        def writer(s: Store, prefix: str) -> None:
            try:
                for i in range(10):
                    _put(
                        s,
                        R.WorkloadRecord(
                            "node1", f"{prefix}{i}", "default", f"{prefix}{i}", "sa", 8000 + i
                        ),
                    )
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(s, p)) for s, p in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        reg = a.registry()
        vips = [s.vip for s in reg.services.values()]
        assert len(reg.services) == 20 and len(set(vips)) == 20
        assert a.revision() == 1 + 1 + 20
        # Each writer followed the other's changes from the log: both agree with a
        # fresh load, and with each other.
        for s, name in ((a, "a-last"), (b, "b-last")):
            _put(s, R.WorkloadRecord("node1", name, "default", name, "sa", 9000))
            fresh = s.registry()
            writer = s._writer  # noqa: SLF001 - the in-memory copy under test
            assert writer is not None
            assert writer.rows() == fresh.rows()
            assert writer.service_docs() == fresh.service_docs()
        assert "cannot follow" not in caplog.text  # caught up from the log, not reloaded
    finally:
        a.close()
        b.close()
