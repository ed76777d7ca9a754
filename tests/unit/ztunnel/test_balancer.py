"""Table tests of the endpoint picker on a simulated clock and seeded randomness
(no sockets, no sleeping)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.ztunnel.balancer import EJECTED, HEALTHY, EndpointPicker
from meshnode.ztunnel.routing import RouteError
from meshnode.ztunnel.state import Endpoint, Service, ServicePort

ID = SpiffeId("cluster.local", "default", "api")
PORT = 8080


def ep(
    address: str, node: str = "n9", zone: str = "z9", version: str = "", port: int = PORT
) -> Endpoint:
    return Endpoint(
        workload=f"api-{address}",
        identity=ID,
        node=node,
        node_ip=address,
        address=address,
        port=port,
        zone=zone,
        version=version,
    )


def svc(
    endpoints: Sequence[Endpoint], split: tuple[tuple[str, int], ...] = (), name: str = "api"
) -> Service:
    return Service(
        name=name,
        namespace="default",
        vip="240.0.0.1",
        ports=(ServicePort(80, PORT),),
        endpoints=tuple(endpoints),
        split=split,
    )


def picker(seed: int = 7, **kw: Any) -> EndpointPicker:
    return EndpointPicker(rng=random.Random(seed), **kw)


def stats_of(p: EndpointPicker, now: float) -> dict[str, dict[str, Any]]:
    return {s["address"]: s for s in p.endpoint_stats(now)}


def pick(
    p: EndpointPicker,
    service: Service,
    now: float = 0.0,
    node: str = "n1",
    zone: str = "z1",
    exclude: Any = (),
) -> Endpoint | None:
    return p.pick(service, service.endpoints, node=node, zone=zone, now=now, exclude=exclude)


def fail(p: EndpointPicker, e: Endpoint, now: float, times: int) -> None:
    for _ in range(times):
        p.on_failure(e, now)


# -- power of two choices ---------------------------------------------------------------


def test_p2c_prefers_low_latency() -> None:
    eps = [ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")]
    latency = {"10.0.0.1": 0.002, "10.0.0.2": 0.002, "10.0.0.3": 0.020}
    s, p = svc(eps), picker()
    counts: Counter[str] = Counter()
    now = 0.0
    for _ in range(3000):
        now += 0.01
        chosen = pick(p, s, now)
        assert chosen is not None
        counts[chosen.address] += 1
        p.on_attempt(chosen, now)
        p.on_success(chosen, latency[chosen.address], now)
        p.on_done(chosen)
    assert counts["10.0.0.3"] / 3000 < 0.15
    assert counts["10.0.0.1"] / 3000 > 0.35
    assert counts["10.0.0.2"] / 3000 > 0.35


def test_p2c_without_feedback_spreads_evenly() -> None:
    # The control for the test above: the skew comes from the costs, not from the sampler.
    eps = [ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")]
    s, p = svc(eps), picker()
    counts: Counter[str] = Counter()
    for _ in range(3000):
        chosen = pick(p, s)
        assert chosen is not None
        counts[chosen.address] += 1
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert 0.30 < counts[address] / 3000 < 0.37


def test_inflight_counts_in_the_cost() -> None:
    eps = [ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")]
    s, p = svc(eps), picker()
    for e in eps:
        p.on_success(e, 0.002, 0.0)
    busy = eps[0]
    for _ in range(20):
        p.on_attempt(busy, 0.0)
    counts: Counter[str] = Counter()
    for _ in range(1000):
        chosen = pick(p, s)
        assert chosen is not None
        counts[chosen.address] += 1
        p.on_attempt(chosen, 0.0)
        p.on_done(chosen)
    assert counts[busy.address] < 50
    assert stats_of(p, 0.0)[busy.address]["inflight"] == 20
    # Once its connections finish it competes again.
    for _ in range(25):
        p.on_done(busy)
    assert stats_of(p, 0.0)[busy.address]["inflight"] == 0  # never below zero
    counts.clear()
    for _ in range(900):
        chosen = pick(p, s)
        assert chosen is not None
        counts[chosen.address] += 1
    assert counts[busy.address] > 200


# -- peak EWMA ----------------------------------------------------------------------------


def test_peak_ewma_adopts_spike_then_decays() -> None:
    e = ep("10.0.0.1")
    p = picker(decay=10.0)
    p.on_success(e, 0.010, 0.0)
    assert stats_of(p, 0.0)["10.0.0.1"]["ewma_ms"] == pytest.approx(10.0)
    p.on_success(e, 0.100, 0.0)  # the spike counts at once: peak
    assert stats_of(p, 0.0)["10.0.0.1"]["ewma_ms"] == pytest.approx(100.0)
    seen = {}
    for t in range(1, 31):  # then normal samples once a second
        p.on_success(e, 0.010, float(t))
        seen[t] = stats_of(p, float(t))["10.0.0.1"]["ewma_ms"]
    # Every sample pulls with weight 1 - exp(-1/10): the excess decays as exp(-t/decay).
    for t in (1, 5, 10, 30):
        assert seen[t] == pytest.approx(10.0 + 90.0 * math.exp(-t / 10.0), abs=0.01)
    assert seen[10] == pytest.approx(43.1, abs=0.1)  # one decay period: 1/e of the excess left


@pytest.mark.parametrize(
    "elapsed, expected_ms",
    [
        (0.0, 100.0),  # no time passed: a fast sample does not move it
        (10.0, 10.0 + 90.0 * math.exp(-1.0)),
        (100.0, 10.0 + 90.0 * math.exp(-10.0)),
    ],
)
def test_ewma_weight_depends_on_elapsed_time(elapsed: float, expected_ms: float) -> None:
    e = ep("10.0.0.1")
    p = picker(decay=10.0)
    p.on_success(e, 0.100, 0.0)
    p.on_success(e, 0.010, elapsed)
    assert stats_of(p, elapsed)["10.0.0.1"]["ewma_ms"] == pytest.approx(expected_ms, abs=1e-3)


def test_unknown_latency_uses_default_rtt() -> None:
    p = picker(default_rtt=0.005)
    p.on_attempt(ep("10.0.0.1"), 0.0)
    assert stats_of(p, 0.0)["10.0.0.1"]["ewma_ms"] == pytest.approx(5.0)


# -- locality with failover -------------------------------------------------------------

LOCAL = [ep("10.0.1.1", "n1", "z1"), ep("10.0.1.2", "n1", "z1")]
ZONE = [ep("10.0.2.1", "n2", "z1"), ep("10.0.2.2", "n3", "z1")]
REMOTE = [ep("10.0.3.1", "n4", "z2"), ep("10.0.3.2", "n5", "z3")]
ALL = LOCAL + ZONE + REMOTE


@pytest.mark.parametrize(
    "ejected, node, zone, expect, panic",
    [
        ([], "n1", "z1", LOCAL, False),
        (LOCAL, "n1", "z1", ZONE, False),
        (LOCAL[:1], "n1", "z1", LOCAL[1:], False),  # one healthy local one is enough
        (LOCAL + ZONE, "n1", "z1", REMOTE, False),
        (LOCAL + ZONE + REMOTE[:1], "n1", "z1", REMOTE[1:], False),
        (ALL, "n1", "z1", ALL, True),  # panic: something rather than nothing
        ([], "n2", "z1", ZONE[:1], False),
        ([], "n7", "z1", LOCAL + ZONE, False),  # no endpoint on this node: the zone
        ([], "n7", "z2", REMOTE[:1], False),
        ([], "n7", "z8", ALL, False),
        ([], "", "", ALL, False),  # node and zone unknown: anywhere
    ],
)
def test_locality_failover(
    ejected: list[Endpoint], node: str, zone: str, expect: list[Endpoint], panic: bool
) -> None:
    p, s = picker(), svc(ALL)
    for e in ejected:
        fail(p, e, 0.0, 3)
    seen = set()
    for i in range(200):
        chosen = p.pick(s, s.endpoints, node=node, zone=zone, now=0.1 * i / 200)
        assert chosen in expect
        seen.add(chosen)
    assert seen == set(expect)  # and spread over the whole tier
    assert (p.panics_total > 0) == panic


def test_locality_recovers_when_local_readmitted() -> None:
    p, s = picker(), svc(ALL)
    for e in LOCAL:
        fail(p, e, 0.0, 3)
    assert pick(p, s, 1.0) in ZONE
    assert pick(p, s, 5.0) in LOCAL  # ejection (5 s) over


# -- ejection ---------------------------------------------------------------------------


def test_eject_after_consecutive_failures() -> None:
    e, other = ep("10.0.0.1"), ep("10.0.0.2")
    p, s = picker(eject_after=3), svc([e, other])
    fail(p, e, 0.0, 2)
    assert stats_of(p, 0.0)["10.0.0.1"]["state"] == HEALTHY
    p.on_success(e, 0.001, 0.0)  # a success resets the run of failures
    assert stats_of(p, 0.0)["10.0.0.1"]["consecutive_failures"] == 0
    fail(p, e, 0.0, 2)
    assert stats_of(p, 0.0)["10.0.0.1"]["state"] == HEALTHY
    fail(p, e, 0.0, 1)
    st = stats_of(p, 0.0)["10.0.0.1"]
    assert st["state"] == EJECTED and st["ejected_for_s"] == 5.0
    assert p.ejections_total == 1
    assert all(pick(p, s, 0.1 * i / 100) == other for i in range(100))


def test_ejection_time_doubles_and_is_capped() -> None:
    e, other = ep("10.0.0.1"), ep("10.0.0.2")
    p, s = picker(base_ejection=5.0, max_ejection=30.0), svc([e, other])
    now = 0.0
    durations = []
    for _ in range(5):
        fail(p, e, now, 3)
        st = stats_of(p, now)["10.0.0.1"]
        assert st["state"] == EJECTED
        durations.append(st["ejected_for_s"])
        # Still ejected just before the time is up, readmitted at it.
        assert stats_of(p, now + st["ejected_for_s"] - 0.01)["10.0.0.1"]["state"] == EJECTED
        now += st["ejected_for_s"]
        assert pick(p, s, now) is not None
        assert stats_of(p, now)["10.0.0.1"]["state"] == HEALTHY
        assert stats_of(p, now)["10.0.0.1"]["consecutive_failures"] == 0
    assert durations == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert stats_of(p, now)["10.0.0.1"]["total_ejections"] == 5
    assert p.ejections_total == 5


def test_back_off_resets_after_staying_healthy_for_max_ejection() -> None:
    e = ep("10.0.0.1")
    p = picker(base_ejection=5.0, max_ejection=60.0)
    fail(p, e, 0.0, 3)  # 5 s
    fail(p, e, 5.0, 3)  # readmitted at 5, ejected again: 10 s
    assert stats_of(p, 5.0)["10.0.0.1"]["times_ejected"] == 2
    # Readmitted at 15; healthy for less than max_ejection: the back-off stands.
    fail(p, e, 70.0, 3)
    assert stats_of(p, 70.0)["10.0.0.1"]["ejected_for_s"] == 20.0
    # Readmitted at 90; healthy for 60 s: forgiven.
    assert stats_of(p, 150.0)["10.0.0.1"]["times_ejected"] == 0
    fail(p, e, 150.0, 3)
    assert stats_of(p, 150.0)["10.0.0.1"]["ejected_for_s"] == 5.0
    assert stats_of(p, 150.0)["10.0.0.1"]["total_ejections"] == 4


def test_success_of_ejected_endpoint_readmits_it() -> None:
    e, other = ep("10.0.0.1"), ep("10.0.0.2")
    p, s = picker(), svc([e, other])
    fail(p, e, 0.0, 3)
    p.on_success(e, 0.001, 1.0)  # it served panic traffic fine
    assert stats_of(p, 1.0)["10.0.0.1"]["state"] == HEALTHY
    assert e in {pick(p, s, 1.0) for _ in range(50)}


def test_failures_while_ejected_do_not_stack() -> None:
    e = ep("10.0.0.1")
    p = picker()
    fail(p, e, 0.0, 3)
    fail(p, e, 1.0, 6)
    st = stats_of(p, 1.0)["10.0.0.1"]
    assert st["total_ejections"] == 1 and st["ejected_for_s"] == 4.0


# -- traffic split ----------------------------------------------------------------------

V1 = [ep(f"10.1.0.{i}", version="v1") for i in range(1, 4)]
V2 = [ep(f"10.2.0.{i}", version="v2") for i in range(1, 4)]
V3 = [ep(f"10.3.0.{i}", version="v3") for i in range(1, 4)]


@pytest.mark.parametrize(
    "split, exclude, expect",
    [
        ((("v1", 90), ("v2", 10)), [], {"v1": 0.90, "v2": 0.10}),
        ((("v1", 50), ("v2", 50)), [], {"v1": 0.50, "v2": 0.50}),
        ((("v1", 90), ("v2", 10), ("v3", 0)), [], {"v1": 0.90, "v2": 0.10}),
        ((("v1", 90), ("v2", 10)), V1, {"v2": 1.0}),  # v1 all tried: skipped
        ((("v1", 1), ("v2", 3)), V1[:2], {"v1": 0.25, "v2": 0.75}),  # one v1 left
        ((("v1", 1), ("v4", 9)), [], {"v1": 1.0}),  # v4 has no endpoints
    ],
)
def test_split(
    split: tuple[tuple[str, int], ...], exclude: list[Endpoint], expect: dict[str, float]
) -> None:
    p, s = picker(seed=1), svc(V1 + V2 + V3, split=split)
    excl = {(e.address, e.port) for e in exclude}
    counts: Counter[str] = Counter()
    for _ in range(1000):
        chosen = pick(p, s, exclude=excl)
        assert chosen is not None
        assert (chosen.address, chosen.port) not in excl
        counts[chosen.version] += 1
    assert set(counts) == set(expect)
    for version, share in expect.items():
        assert abs(counts[version] / 1000 - share) <= 0.04, counts


def test_split_with_no_version_left_returns_none() -> None:
    p, s = picker(), svc(V1 + V2 + V3, split=(("v1", 1), ("v2", 1)))
    excl = {(e.address, e.port) for e in V1 + V2}
    assert pick(p, s, exclude=excl) is None  # v3 is not in the split: never
    # Weight 0 is "never" too, even as the last version with endpoints left.
    p, s = picker(), svc(V1 + V3, split=(("v1", 1), ("v3", 0)))
    assert pick(p, s, exclude={(e.address, e.port) for e in V1}) is None


def test_split_then_locality() -> None:
    eps = [
        ep("10.1.0.1", "n1", "z1", "v1"),
        ep("10.1.0.2", "n2", "z2", "v1"),
        ep("10.2.0.1", "n1", "z1", "v2"),
        ep("10.2.0.2", "n2", "z2", "v2"),
    ]
    p, s = picker(), svc(eps, split=(("v1", 1), ("v2", 1)))
    chosen = {pick(p, s, node="n2", zone="z2") for _ in range(200)}
    assert chosen == {eps[1], eps[3]}  # both versions, each on the local node


# -- exclude (retries) ------------------------------------------------------------------


def test_exclude_never_returned_and_none_when_exhausted() -> None:
    eps = [ep(f"10.0.0.{i}") for i in range(1, 6)]
    p, s = picker(), svc(eps)
    tried: set[tuple[str, int]] = set()
    for _ in range(len(eps)):
        chosen = pick(p, s, exclude=tried)
        assert chosen is not None
        assert (chosen.address, chosen.port) not in tried
        tried.add((chosen.address, chosen.port))
    assert pick(p, s, exclude=tried) is None
    assert pick(p, s, exclude=list(tried)) is None  # any collection


def test_exclude_skips_to_next_locality_tier() -> None:
    p, s = picker(), svc(ALL)
    excl = [(e.address, e.port) for e in LOCAL]
    assert all(pick(p, s, exclude=excl) in ZONE for _ in range(100))


def test_exclude_in_panic() -> None:
    p, s = picker(), svc(ALL)
    for e in ALL:
        fail(p, e, 0.0, 3)
    excl = {(e.address, e.port) for e in ALL[1:]}
    assert pick(p, s, 1.0, exclude=excl) == ALL[0]
    assert pick(p, s, 1.0, exclude=excl | {(ALL[0].address, PORT)}) is None


def test_exclude_mostly_everything_in_a_big_group() -> None:
    # The degenerate case for rejection sampling: still correct, falls back to a scan.
    eps = [ep(f"10.0.{i // 250}.{i % 250}") for i in range(1000)]
    p, s = picker(), svc(eps)
    excl = {(e.address, e.port) for e in eps[:-2]}
    assert {pick(p, s, exclude=excl) for _ in range(50)} == set(eps[-2:])


# -- cost per pick ----------------------------------------------------------------------


def _examined_per_pick(n: int) -> float:
    nodes, zones = max(n // 10, 1), 3
    eps = [
        ep(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"n{i % nodes}", f"z{i % zones}")
        for i in range(n)
    ]
    p, s = picker(seed=3), svc(eps)
    for e in eps[::3]:  # a third of them ejected: not skipped over one by one
        fail(p, e, 0.0, 3)
    pick(p, s, 0.0, node="n1", zone="z1")  # first sight of the service: indexing
    before = p.examined
    tried = {(eps[1].address, eps[1].port)}
    for i in range(2000):
        chosen = p.pick(
            s, s.endpoints, node=f"n{i % 7}", zone=f"z{i % 3}", now=0.001 * i, exclude=tried
        )
        assert chosen is not None
        p.on_attempt(chosen, 0.001 * i)
        p.on_success(chosen, 0.001 + (i % 5) * 0.001, 0.001 * i)
        p.on_done(chosen)
    return (p.examined - before) / 2000


def test_cost_per_pick_is_flat() -> None:
    small, big = _examined_per_pick(10), _examined_per_pick(10_000)
    assert big < 20
    assert big <= 3 * small


def test_index_is_reused_across_equal_service_objects() -> None:
    eps = [ep(f"10.0.{i // 250}.{i % 250}") for i in range(5000)]
    p, s = picker(), svc(eps)
    pick(p, s)
    # A new snapshot: equal, but new objects. Compared once, then reused.
    s2 = svc(list(eps))
    pick(p, s2)
    before = p.examined
    for _ in range(100):
        pick(p, s2)
    assert p.examined - before < 100 * 10


def test_candidates_filtered_by_port() -> None:
    a, b = ep("10.0.0.1", port=8080), ep("10.0.0.1", port=9090)
    p, s = picker(), svc([a, b])
    for port, want in ((8080, a), (9090, b)):
        cands = [e for e in s.endpoints if e.port == port]
        assert {p.pick(s, cands, node="", zone="", now=0.0) for _ in range(20)} == {want}


def test_arbitrary_subset_of_candidates() -> None:
    eps = [ep(f"10.0.0.{i}") for i in range(1, 6)]
    p, s = picker(), svc(eps)
    pick(p, s)
    subset = eps[1:3]
    assert {p.pick(s, subset, node="", zone="", now=0.0) for _ in range(50)} == set(subset)


# -- config updates ---------------------------------------------------------------------


def test_stats_survive_update_and_forget_missing_drops() -> None:
    a, b, c = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")
    p = picker()
    s1 = svc([a, b, c])
    pick(p, s1)
    p.on_success(a, 0.050, 0.0)
    fail(p, b, 0.0, 3)
    # New snapshot: c is gone, a and b stay (as new but equal objects).
    s2 = svc([replace(a), replace(b)])
    p.forget_missing([s2, svc([], name="other")])
    st = stats_of(p, 1.0)
    assert set(st) == {"10.0.0.1", "10.0.0.2"}
    assert st["10.0.0.1"]["ewma_ms"] == pytest.approx(50.0)
    assert st["10.0.0.2"]["state"] == EJECTED  # and still avoided
    assert all(pick(p, s2, 1.0) == a for _ in range(50))
    # b gone too; back later as a fresh endpoint.
    p.forget_missing([svc([a])])
    assert set(stats_of(p, 1.0)) == {"10.0.0.1"}
    s3 = svc([a, b])
    assert pick(p, s3, 1.0) == b  # healthy again, at the default RTT (a is at 50 ms)
    st = stats_of(p, 1.0)["10.0.0.2"]
    assert (st["state"], st["total_ejections"], st["ewma_ms"]) == (HEALTHY, 0, 5.0)


def test_endpoint_changes_rebuild_the_index() -> None:
    a, b, c = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")
    p = picker()
    assert {pick(p, svc([a, b])) for _ in range(50)} == {a, b}
    assert {pick(p, svc([b, c])) for _ in range(50)} == {b, c}
    fail(p, c, 0.0, 3)  # ejection reaches the rebuilt index
    assert {pick(p, svc([b, c])) for _ in range(50)} == {b}


def test_endpoint_stats_shape() -> None:
    p = picker()
    e = ep("10.0.0.1")
    p.on_attempt(e, 0.0)
    p.on_failure(e, 0.0)
    assert p.endpoint_stats(0.0) == [
        {
            "address": "10.0.0.1",
            "port": PORT,
            "ewma_ms": 5.0,
            "inflight": 1,
            "consecutive_failures": 1,
            "state": HEALTHY,
            "ejected_for_s": 0.0,
            "times_ejected": 0,
            "total_ejections": 0,
        }
    ]


# -- as a routing Chooser ---------------------------------------------------------------


def test_callable_as_chooser() -> None:
    eps = [ep("10.0.1.1", "n1", "z1"), ep("10.0.2.1", "n2", "z1")]
    p = EndpointPicker(rng=random.Random(1), node="n1", zone="z1")
    s = svc(eps)
    assert p(s, s.endpoints) == eps[0]
    with pytest.raises(RouteError):
        p(svc(eps, split=(("v9", 1),)), eps)


@pytest.mark.parametrize(
    "kw",
    [
        {"decay": 0},
        {"eject_after": 0},
        {"base_ejection": 0},
        {"max_ejection": 1.0},
        {"default_rtt": 0},
    ],
)
def test_rejects_bad_settings(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EndpointPicker(**kw)
