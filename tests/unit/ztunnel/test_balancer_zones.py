"""The balancer's split by zone (Service.zone_split, a TrafficSplit with ``zones``):
seeded randomness and a simulated clock, as in test_balancer.py."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.ztunnel.balancer import EndpointPicker
from meshnode.ztunnel.state import Endpoint, Service, ServicePort, parse_snapshot

ID = SpiffeId("cluster.local", "default", "api")
PORT = 8080
N = 2000
TOLERANCE = 0.03  # 3.4 standard deviations of a share of 0.8 over 2000 picks
Split = tuple[tuple[str, int], ...]
ZONES_80_20: Split = (("zone-a", 80), ("zone-b", 20))


def ep(address: str, node: str, zone: str, version: str = "") -> Endpoint:
    return Endpoint(
        workload=f"api-{address}",
        identity=ID,
        node=node,
        node_ip=address,
        address=address,
        port=PORT,
        zone=zone,
        version=version,
    )


def svc(
    endpoints: Sequence[Endpoint],
    zone_split: Split = (),
    split: Split = (),
    name: str = "api",
) -> Service:
    return Service(
        name=name,
        namespace="default",
        vip="240.0.0.1",
        ports=(ServicePort(80, PORT),),
        endpoints=tuple(endpoints),
        split=split,
        zone_split=zone_split,
    )


def picker(seed: int = 7) -> EndpointPicker:
    return EndpointPicker(rng=random.Random(seed))


def key(e: Endpoint) -> tuple[str, int]:
    return (e.address, e.port)


def eject(p: EndpointPicker, e: Endpoint, now: float = 0.0) -> None:
    for _ in range(3):
        p.on_failure(e, now)


def zone_shares(
    p: EndpointPicker,
    s: Service,
    *,
    node: str = "n1",
    zone: str = "zone-c",
    now: float = 0.1,
    exclude: Any = (),
    n: int = N,
) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        chosen = p.pick(s, s.endpoints, node=node, zone=zone, now=now, exclude=exclude)
        assert chosen is not None
        counts[chosen.zone] += 1
    return {z: c / n for z, c in counts.items()}


def assert_shares(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want), got
    for zone, share in want.items():
        assert abs(got[zone] - share) <= TOLERANCE, got


ZONE_A = [ep("10.1.0.1", "n2", "zone-a"), ep("10.1.0.2", "n3", "zone-a")]
ZONE_B = [ep("10.2.0.1", "n4", "zone-b"), ep("10.2.0.2", "n5", "zone-b")]
ZONE_C = [ep("10.3.0.1", "n1", "zone-c"), ep("10.3.0.2", "n6", "zone-c")]  # the caller's


# -- shares -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_zone_shares_follow_the_weights(seed: int) -> None:
    s = svc(ZONE_A + ZONE_B, ZONES_80_20)
    assert_shares(zone_shares(picker(seed), s), {"zone-a": 0.8, "zone-b": 0.2})


def test_the_weights_override_locality() -> None:
    # The caller (n2, zone-a) has an endpoint of its own: without a split it takes all.
    without = zone_shares(picker(), svc(ZONE_A + ZONE_B), node="n2", zone="zone-a")
    assert without == {"zone-a": 1.0}
    s = svc(ZONE_A + ZONE_B, (("zone-a", 20), ("zone-b", 80)))
    assert_shares(
        zone_shares(picker(), s, node="n2", zone="zone-a"), {"zone-a": 0.2, "zone-b": 0.8}
    )


def test_inside_its_own_zone_this_node_comes_first() -> None:
    s = svc(ZONE_A + ZONE_B, ZONES_80_20)
    p = picker()
    counts: Counter[str] = Counter()
    for _ in range(N):
        chosen = p.pick(s, s.endpoints, node="n2", zone="zone-a", now=0.1)
        assert chosen is not None
        counts[chosen.address] += 1
    # zone-a's share all to n2's endpoint, none to n3's; zone-b's spread over both.
    assert counts[ZONE_A[1].address] == 0
    assert abs(counts[ZONE_A[0].address] / N - 0.8) <= TOLERANCE
    assert counts[ZONE_B[0].address] > 0 and counts[ZONE_B[1].address] > 0
    # n2's endpoint ejected: zone-a's share goes to the rest of zone-a.
    eject(p, ZONE_A[0])
    counts.clear()
    for _ in range(N):
        chosen = p.pick(s, s.endpoints, node="n2", zone="zone-a", now=0.1)
        assert chosen is not None
        counts[chosen.address] += 1
    assert counts[ZONE_A[0].address] == 0
    assert abs(counts[ZONE_A[1].address] / N - 0.8) <= TOLERANCE


def test_this_nodes_endpoint_does_not_win_another_zones_share() -> None:
    # The caller's node has an endpoint in zone-c, but zone-c weighs nothing here.
    s = svc(ZONE_A + ZONE_B + ZONE_C, ZONES_80_20)
    assert_shares(zone_shares(picker(), s), {"zone-a": 0.8, "zone-b": 0.2})


# -- availability: ejection, retries ------------------------------------------------------


def test_an_ejected_zone_moves_its_share_to_the_others_and_gets_it_back() -> None:
    lone_a = ZONE_A[:1]
    s, p = svc(lone_a + ZONE_B, ZONES_80_20), picker()
    eject(p, lone_a[0], now=0.0)  # ejected for 5 s
    assert zone_shares(p, s, now=1.0) == {"zone-b": 1.0}
    assert p.panics_total == 0 and p.zone_split_fallbacks_total == 0
    assert_shares(zone_shares(p, s, now=5.0), {"zone-a": 0.8, "zone-b": 0.2})  # readmitted


def test_an_ejected_endpoint_of_a_zone_leaves_the_share_to_the_rest_of_it() -> None:
    s, p = svc(ZONE_A + ZONE_B, ZONES_80_20), picker()
    eject(p, ZONE_A[0])
    counts: Counter[tuple[str, str]] = Counter()
    for _ in range(N):
        chosen = p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1)
        assert chosen is not None
        counts[(chosen.zone, chosen.address)] += 1
    assert counts[("zone-a", ZONE_A[0].address)] == 0
    assert abs(counts[("zone-a", ZONE_A[1].address)] / N - 0.8) <= TOLERANCE


def test_a_tried_endpoint_moves_the_pick_to_another_weighted_zone() -> None:
    lone_a = ZONE_A[:1]
    s, p = svc(lone_a + ZONE_B, ZONES_80_20), picker()
    tried = {key(lone_a[0])}
    assert zone_shares(p, s, exclude=tried) == {"zone-b": 1.0}
    assert p.zone_split_fallbacks_total == 0


def test_a_zone_of_weight_zero_gets_nothing_while_a_weighted_zone_has_endpoints() -> None:
    # zone-c weighs 0 and zone-d is not named: neither is picked, not even the
    # caller's own endpoint (n1, zone-c), while zone-a or zone-b has one left.
    zone_d = [ep("10.4.0.1", "n7", "zone-d")]
    split: Split = (("zone-a", 80), ("zone-b", 20), ("zone-c", 0))
    s, p = svc(ZONE_A + ZONE_B + ZONE_C + zone_d, split), picker()
    assert_shares(zone_shares(p, s), {"zone-a": 0.8, "zone-b": 0.2})
    for e in ZONE_A + ZONE_B[:1]:
        eject(p, e)
    assert zone_shares(p, s) == {"zone-b": 1.0}  # one endpoint left in a weighted zone
    assert p.zone_split_fallbacks_total == 0


# -- fallback -----------------------------------------------------------------------------


def test_without_a_weighted_zone_left_it_picks_as_without_the_split(
    caplog: pytest.LogCaptureFixture,
) -> None:
    zone_d = [ep("10.4.0.1", "n7", "zone-d")]
    eps = ZONE_A + ZONE_B + ZONE_C + zone_d
    split: Split = (("zone-a", 80), ("zone-b", 20), ("zone-c", 0))
    s, plain = svc(eps, split), svc(eps)
    p, control = picker(3), picker(3)
    for e in ZONE_A + ZONE_B:
        eject(p, e)
        eject(control, e)
    caplog.set_level(logging.INFO, logger="meshnode.ztunnel.balancer")
    got, want = [], []
    for _ in range(200):
        got.append(p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1))
        want.append(control.pick(plain, plain.endpoints, node="n1", zone="zone-c", now=0.1))
    assert got == want  # the same picks, the same draws: locality, this node first
    assert set(got) == {ZONE_C[0]}
    assert p.zone_split_fallbacks_total == 200
    # One line for the service, however many picks fell back.
    lines = [r for r in caplog.records if r.name == "meshnode.ztunnel.balancer"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "api.default.mesh" in message
    assert "zone-a: 80, zone-b: 20, zone-c: 0" in message
    assert "as without the zone split" in message
    # Another service gets its own line, once.
    other = svc(eps, split, name="other")
    for _ in range(10):
        p.pick(other, other.endpoints, node="n1", zone="zone-c", now=0.1)
    lines = [r for r in caplog.records if r.name == "meshnode.ztunnel.balancer"]
    assert len(lines) == 2 and "other.default.mesh" in lines[1].getMessage()


def test_fallback_when_the_weighted_zones_have_no_endpoints_at_all() -> None:
    s, p = svc(ZONE_C, (("zone-x", 1),)), picker()
    assert zone_shares(p, s, zone="zone-c", n=100) == {"zone-c": 1.0}
    assert p.zone_split_fallbacks_total == 100
    assert p(s, s.endpoints) in ZONE_C  # as a routing Chooser: no RouteError


def test_fallback_panics_like_the_balancer_without_a_split() -> None:
    s, p = svc(ZONE_A + ZONE_B, ZONES_80_20), picker()
    for e in ZONE_A + ZONE_B:
        eject(p, e)
    chosen = {p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1) for _ in range(100)}
    assert chosen == set(ZONE_A + ZONE_B)  # health ignored rather than fail
    assert p.panics_total == 100
    tried = {key(e) for e in ZONE_A + ZONE_B}
    assert p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1, exclude=tried) is None


def test_a_pick_with_nothing_left_to_try_is_no_fallback(caplog: pytest.LogCaptureFixture) -> None:
    s, p = svc(ZONE_A, ZONES_80_20), picker()
    caplog.set_level(logging.INFO, logger="meshnode.ztunnel.balancer")
    tried = {key(e) for e in ZONE_A}
    assert p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1, exclude=tried) is None
    assert p.zone_split_fallbacks_total == 0
    assert not [r for r in caplog.records if r.name == "meshnode.ztunnel.balancer"]


# -- remote zone entries ------------------------------------------------------------------


def _remote(zone: str, ip: str) -> dict[str, Any]:
    return {
        "zone": zone,
        "ingress_ip": ip,
        "ingress_port": 15443,
        "namespace": "default",
        "service_account": "api",
        "port": 80,
        "endpoints": 4,
    }


def _zoned_service(zone_split: dict[str, int]) -> Service:
    """api as ztunnel on n1 (zone-a) sees it: two endpoints in zone-a, and zone-b
    and zone-c behind their ingress (one remote entry each)."""
    endpoints = [
        {
            "workload": f"api-{i}",
            "namespace": "default",
            "service_account": "api",
            "node": f"n{i}",
            "node_ip": f"198.18.0.{i}",
            "address": f"198.18.0.{i}",
            "zone": "zone-a",
            "port": PORT,
        }
        for i in (2, 3)
    ]
    state = parse_snapshot(
        {
            "schema": 4,
            "version": 1,
            "node": {"name": "n1", "ip": "198.18.0.1", "zone": "zone-a"},
            "trust_domain": "cluster.local",
            "trust_bundle": "/b.pem",
            "workloads": [],
            "services": [
                {
                    "name": "api",
                    "namespace": "default",
                    "vip": "240.0.0.1",
                    "ports": [{"port": 80, "target_port": PORT}],
                    "endpoints": endpoints,
                    "remote": [_remote("zone-b", "203.0.113.2"), _remote("zone-c", "203.0.113.3")],
                    "zone_split": zone_split,
                }
            ],
        }
    )
    s = state.find_service_by_vip("240.0.0.1")
    assert s is not None
    return s


def test_remote_entries_are_picked_by_their_zones_weight() -> None:
    s = _zoned_service({"zone-a": 50, "zone-b": 30, "zone-c": 20})
    assert [e.remote for e in s.endpoints] == [False, False, True, True]
    p = picker()
    counts: Counter[str] = Counter()
    for _ in range(N):
        chosen = p.pick(s, s.endpoints, node="n1", zone="zone-a", now=0.1)
        assert chosen is not None
        counts[chosen.zone] += 1
        assert chosen.remote == (chosen.zone != "zone-a")
        if chosen.remote:  # the pick is the remote entry of that zone, by its SNI
            assert chosen.sni.endswith(f".80.{chosen.zone}.mz.cluster.local")
    assert_shares(
        {z: c / N for z, c in counts.items()}, {"zone-a": 0.5, "zone-b": 0.3, "zone-c": 0.2}
    )


def test_a_failing_remote_zone_moves_its_share_to_the_other_weighted_zones() -> None:
    s = _zoned_service({"zone-a": 0, "zone-b": 75, "zone-c": 25})
    p = picker()
    assert_shares(zone_shares(p, s, node="n1", zone="zone-a"), {"zone-b": 0.75, "zone-c": 0.25})
    zone_b = next(e for e in s.endpoints if e.zone == "zone-b")
    eject(p, zone_b)
    assert zone_shares(p, s, node="n1", zone="zone-a") == {"zone-c": 1.0}
    # zone-a weighs 0: it gets traffic only once no weighted zone can take it.
    zone_c = next(e for e in s.endpoints if e.zone == "zone-c")
    eject(p, zone_c)
    assert zone_shares(p, s, node="n1", zone="zone-a") == {"zone-a": 1.0}
    assert p.zone_split_fallbacks_total == N


# -- with a version split, determinism, cost ----------------------------------------------


def test_version_first_then_zone_among_that_versions_endpoints() -> None:
    eps = [
        ep("10.1.0.1", "n2", "zone-a", "v1"),
        ep("10.2.0.1", "n4", "zone-b", "v1"),
        ep("10.2.0.2", "n5", "zone-b", "v2"),  # v2 runs only in zone-b
    ]
    s, p = svc(eps, ZONES_80_20, split=(("v1", 50), ("v2", 50))), picker()
    counts: Counter[tuple[str, str]] = Counter()
    for _ in range(N):
        chosen = p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1)
        assert chosen is not None
        counts[(chosen.version, chosen.zone)] += 1
    want = {("v1", "zone-a"): 0.4, ("v1", "zone-b"): 0.1, ("v2", "zone-b"): 0.5}
    assert set(counts) == set(want)
    for k, share in want.items():
        assert abs(counts[k] / N - share) <= TOLERANCE, counts
    assert p.zone_split_fallbacks_total == 0


def test_the_same_seed_makes_the_same_picks() -> None:
    s = svc(ZONE_A + ZONE_B + ZONE_C, (("zone-a", 3), ("zone-b", 2), ("zone-c", 1)))

    def run(seed: int) -> list[Endpoint | None]:
        p = picker(seed)
        eject(p, ZONE_B[0])
        return [p.pick(s, s.endpoints, node="n1", zone="zone-c", now=0.1) for _ in range(300)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_cost_per_pick_stays_flat_with_a_zone_split() -> None:
    eps = [
        ep(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"n{i % 1000}", f"zone-{i % 3}")
        for i in range(10_000)
    ]
    s = svc(eps, (("zone-0", 5), ("zone-1", 3), ("zone-2", 2)))
    p = picker()
    for e in eps[::3]:
        eject(p, e)
    p.pick(s, s.endpoints, node="n1", zone="zone-1", now=0.0)  # indexing
    before = p.examined
    for i in range(2000):
        assert p.pick(s, s.endpoints, node="n1", zone="zone-1", now=0.001 * i) is not None
    assert (p.examined - before) / 2000 < 20
