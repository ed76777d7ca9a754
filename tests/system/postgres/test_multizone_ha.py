"""Multi-zone with HA at each level (issue 12): a global control plane of two
replicas on one PostgreSQL database, zone-a's control plane of two replicas on
another, zone-b's one on SQLite; all real `meshnode controlplane run` processes.

A zone enrolls once (its second replica starts from the database, no token);
a global replica killed hard: the zones go on with the other one; a zone replica
killed hard: the zone's other replica keeps syncing.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.core import api
from tests.support.controlplane import PostgresServer, enroll, wait_until

from .test_replicas import Replica

GRANT = """\
kind: IdentityGrant
metadata: {name: zone-b-api}
spec: {zones: [zone-b], identities: [default/api]}
"""


def policy(name: str) -> str:
    return (
        f"kind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\n"
        "spec: {action: ALLOW, rules: [{from: {namespaces: [default]}}]}\n"
    )


class ModeReplica(Replica):
    """A replica started with extra `controlplane run` options (its mode)."""

    def __init__(self, name: str, dsn: str, base: Path, *args: str) -> None:
        super().__init__(name, dsn, base)
        self.args = list(args)

    def start(self) -> ModeReplica:
        import subprocess

        log = open(self.data.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "meshnode.cli.main", "controlplane", "run",
                "--listen", f"127.0.0.1:{self.port}", "--db", self.dsn,
                "--data-dir", str(self.data), "--cert-ttl", "1h", *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        ok = wait_until(self._ready, timeout=60, interval=0.1)
        assert ok, (self.data.parent / f"{self.name}.log").read_text()
        return self


@pytest.fixture
def zones(postgres: PostgresServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    started: list[ModeReplica] = []

    def start(r: ModeReplica) -> ModeReplica:
        started.append(r)
        return r.start()

    try:
        gdsn = postgres.new_database()
        g1 = start(ModeReplica("g1", gdsn, tmp_path, "--mode", "global"))
        g2 = start(ModeReplica("g2", gdsn, tmp_path, "--mode", "global"))
        urls = f"{g1.url},{g2.url}"

        def zone_args(zone: str, ingress: str, token: str = "") -> list[str]:
            out = ["--mode", "zone", "--zone", zone, "--global", urls, "--zone-ingress", ingress]
            return out + (["--global-token", token] if token else [])

        def token(zone: str) -> str:
            body = {"zone_controlplane": zone}
            return str(g1.admin().call("POST", api.ADMIN_TOKENS, body)["token"])

        adsn = postgres.new_database()
        first = zone_args("zone-a", "127.0.0.21:15443", token("zone-a"))
        a1 = start(ModeReplica("a1", adsn, tmp_path, *first))
        # The second replica of zone-a: no token, the zone's CA is in the database.
        a2 = start(ModeReplica("a2", adsn, tmp_path, *zone_args("zone-a", "127.0.0.21:15443")))
        b1 = start(
            ModeReplica(
                "b1",
                f"sqlite://{tmp_path}/zone-b.db",
                tmp_path,
                *zone_args("zone-b", "127.0.0.22:15443", token("zone-b")),
            )
        )
        yield {"g1": g1, "g2": g2, "a1": a1, "a2": a2, "b1": b1, "tmp": tmp_path}
    finally:
        for r in started:
            if r.proc is not None and r.proc.poll() is None:
                r.kill(signal.SIGTERM)


def has_policy(r: Replica, name: str) -> bool:
    items = r.admin().call("GET", api.ADMIN_RESOURCES, timeout=5)["items"]
    return any(i["metadata"]["name"] == name for i in items)


def remote_zones(r: Replica, service: str) -> list[str]:
    for item in r.admin().call("GET", api.ADMIN_SERVICES, timeout=5)["items"]:
        if item["name"] == service:
            return [e["zone"] for e in item.get("remote", [])]
    return []


def test_each_level_survives_losing_a_replica(zones: dict[str, Any]) -> None:
    try:
        _each_level_survives(zones)
    except AssertionError:  # what each replica said, to see why
        for log in sorted(zones["tmp"].glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-25:]))
        raise


def _each_level_survives(zones: dict[str, Any]) -> None:
    g1, g2, a1, a2, b1 = (zones[k] for k in ("g1", "g2", "a1", "a2", "b1"))
    # One zone CA for both replicas of zone-a, under the global's root.
    assert a1.admin().bundle_pem == a2.admin().bundle_pem == g1.admin().bundle_pem
    g1.admin().call("POST", api.ADMIN_RESOURCES, GRANT, content_type="application/yaml")
    token = b1.admin().call(
        "POST",
        api.ADMIN_TOKENS,
        {"node": "node3", "identities": ["default/api"], "address": "127.0.0.33"},
    )["token"]
    status, data, node3 = enroll(
        b1.url, b1.admin().bundle_pem, token, "node3", zones["tmp"] / "n3", ip="127.0.0.33"
    )
    assert status == 200 and node3 is not None, data
    node3.client(b1.url).call("POST", api.NODE_WORKLOADS, {"name": "api", "port": 8080})
    for r in (a1, a2):
        assert wait_until(lambda r=r: remote_zones(r, "api") == ["zone-b"], 30), r.name

    # A global replica dies hard: the zones carry on with the other.
    g1.kill()
    started = time.monotonic()
    g2.admin().call("POST", api.ADMIN_RESOURCES, policy("p1"), content_type="application/yaml")
    for r in (a1, a2, b1):
        assert wait_until(lambda r=r: has_policy(r, "p1"), 60), f"p1 never reached {r.name}"
    print(
        f"with global replica g1 killed, a policy applied at g2 reached both zones in "
        f"{time.monotonic() - started:.2f}s"
    )

    # A zone replica dies hard: the zone's other replica keeps syncing (and serving).
    a1.kill()
    started = time.monotonic()
    g2.admin().call("POST", api.ADMIN_RESOURCES, policy("p2"), content_type="application/yaml")
    assert wait_until(lambda: has_policy(a2, "p2") and has_policy(b1, "p2"), 60)
    print(f"with a1 killed too, p2 reached zone-a (a2) in {time.monotonic() - started:.2f}s")
    zones_at_a2 = a2.admin().call("GET", api.ADMIN_ZONES)
    assert zones_at_a2["status"]["connected"] is True
    assert [z["zone"] for z in zones_at_a2["items"]] == ["zone-b"]
