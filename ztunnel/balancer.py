"""Endpoint selection for outbound connections, free of I/O.

One pick, in order:

1. **Traffic split** -- if the service has ``split`` weights, a weighted random
   choice among the versions that still have a candidate not yet tried.
2. **Zone split** -- if the service has ``zone_split`` weights, a weighted random
   choice among the zones that still have an available endpoint (of the version
   chosen in step 1): healthy and not yet tried. An endpoint is its ``zone``'s, a
   remote zone entry its zone's; a zone not named weighs 0. Then step 4 inside that
   zone, this node's endpoints first when it is this node's zone. When no weighted
   zone has one, step 3 as without the zone split, and a line is logged (once per
   service).
3. **Locality with failover** -- healthy endpoints on this node, else in this zone,
   else anywhere; if none is healthy at all, "panic" and use every untried one
   (an ejection must never turn a degraded service into an unreachable one).
4. **Power of two choices** -- two distinct endpoints of that group at random, the
   one with the lower cost wins; cost = peak-EWMA RTT x (in-flight + 1).

The proxy reports back (``on_attempt`` / ``on_success`` / ``on_failure`` /
``on_done``); consecutive connect failures eject an endpoint for an exponentially
growing time (outlier detection, which istio's ztunnel lacks).

Cost per pick does not depend on the number of endpoints: per (service, port) the
endpoints are indexed once into locality groups, each group keeps its healthy
members in a list with positions (O(1) eject/readmit, one random draw per sample),
and readmissions come off a heap. The index is rebuilt only when the service's
endpoint tuple changes. Time is passed in as ``now`` (monotonic seconds) and
randomness comes from an injected ``random.Random``, so tests drive it with a
simulated clock and a seed.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.ztunnel.routing import RouteError
from meshnode.ztunnel.state import Endpoint, Service

__all__ = ["EJECTED", "HEALTHY", "EndpointPicker"]

log = logging.getLogger("meshnode.ztunnel.balancer")

HEALTHY = "healthy"
EJECTED = "ejected"

Key = tuple[str, int]  # (address, port): what stats are kept under

# Random draws per pick before falling back to a scan of the group. Draws are only
# rejected for endpoints excluded by this connection's earlier attempts (ejected ones
# are not in the sampled list at all), so the fallback needs a group that is mostly
# excluded -- a few endpoints, or an exclude set as large as the group.
_MAX_DRAWS = 8

# Group keys: (version or None for "all versions", tier, value).
_NODE, _ZONE, _ANY = "node", "zone", "any"
GroupKey = tuple[str | None, str, str]


@dataclass(slots=True)
class _Stats:
    ewma: float | None = None  # seconds; None until the first success (cost uses default_rtt)
    updated_at: float = 0.0
    inflight: int = 0
    consecutive_failures: int = 0
    ejected_until: float | None = None  # None = healthy
    times_ejected: int = 0  # back-off level: the next ejection lasts base * 2**times_ejected
    total_ejections: int = 0
    readmitted_at: float | None = None  # when the last ejection ended


class _Group:
    """The endpoints of one locality tier. ``healthy`` is kept as a list plus positions
    so ejecting/readmitting is O(1) (swap with the last) and a uniform sample of the
    healthy ones is a single random index."""

    __slots__ = ("_pos", "healthy", "members")

    def __init__(self) -> None:
        self.members: list[Key] = []
        self.healthy: list[Key] = []
        self._pos: dict[Key, int] = {}

    def add(self, key: Key, healthy: bool) -> None:
        self.members.append(key)
        if healthy:
            self.mark_healthy(key)

    def is_healthy(self, key: Key) -> bool:
        return key in self._pos

    def mark_healthy(self, key: Key) -> None:
        if key not in self._pos:
            self._pos[key] = len(self.healthy)
            self.healthy.append(key)

    def mark_ejected(self, key: Key) -> None:
        i = self._pos.pop(key, None)
        if i is None:
            return
        last = self.healthy.pop()
        if last != key:
            self.healthy[i] = last
            self._pos[last] = i


class _PortIndex:
    """A service's endpoints on one target port, grouped by (version, locality)."""

    __slots__ = ("by_key", "endpoints", "first", "groups", "groups_of", "last", "raw_count")

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        candidates: Sequence[Endpoint],
        stats: dict[Key, _Stats],
    ) -> None:
        self.endpoints = endpoints  # the Service.endpoints tuple this index was built from
        self.raw_count = len(candidates)
        self.first = candidates[0]
        self.last = candidates[-1]
        self.by_key: dict[Key, Endpoint] = {}
        self.groups: dict[GroupKey, _Group] = {}
        self.groups_of: dict[Key, tuple[_Group, ...]] = {}
        for ep in candidates:
            key = (ep.address, ep.port)
            if key in self.by_key:
                continue  # the same address listed twice: one endpoint
            self.by_key[key] = ep
            st = stats.setdefault(key, _Stats())
            healthy = st.ejected_until is None
            mine = []
            for version in (None, ep.version):
                for tier, value in ((_NODE, ep.node), (_ZONE, ep.zone), (_ANY, "")):
                    group = self.groups.get((version, tier, value))
                    if group is None:
                        group = self.groups[(version, tier, value)] = _Group()
                    group.add(key, healthy)
                    mine.append(group)
            self.groups_of[key] = tuple(mine)

    def same_endpoints(self, endpoints: tuple[Endpoint, ...]) -> bool:
        """Whether this index was built from `endpoints` (identity first; an equal new
        tuple, from a new snapshot, is compared once and then remembered)."""
        if self.endpoints is endpoints:
            return True
        if self.endpoints != endpoints:
            return False
        self.endpoints = endpoints
        return True

    def covers(self, candidates: Sequence[Endpoint]) -> bool:
        """Whether `candidates` is the list this index was built from (O(1) check)."""
        return (
            len(candidates) == self.raw_count
            and candidates[0] == self.first
            and candidates[-1] == self.last
        )


class EndpointPicker:
    """Chooses the endpoint of a service for each new connection; see the module doc.

    Also a :data:`meshnode.ztunnel.routing.Chooser` (``__call__``), using the wall
    monotonic clock and the node/zone given here.
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        decay: float = 10.0,
        eject_after: int = 3,
        base_ejection: float = 5.0,
        max_ejection: float = 300.0,
        default_rtt: float = 0.005,
        node: str = "",
        zone: str = "",
    ) -> None:
        if decay <= 0:
            raise ValueError(f"decay must be > 0 seconds, got {decay}")
        if eject_after < 1:
            raise ValueError(f"eject_after must be >= 1, got {eject_after}")
        if base_ejection <= 0 or max_ejection < base_ejection:
            raise ValueError(
                f"need 0 < base_ejection <= max_ejection, got {base_ejection}, {max_ejection}"
            )
        if default_rtt <= 0:
            raise ValueError(f"default_rtt must be > 0 seconds, got {default_rtt}")
        self._rng = rng if rng is not None else random.Random()
        self._decay = decay
        self._eject_after = eject_after
        self._base_ejection = base_ejection
        self._max_ejection = max_ejection
        self._default_rtt = default_rtt
        self._node = node
        self._zone = zone
        self._stats: dict[Key, _Stats] = {}
        self._indexes: dict[tuple[str, str, str, int], _PortIndex] = {}
        self._indexes_of: dict[Key, list[_PortIndex]] = {}  # registered indexes holding a key
        self._readmit_heap: list[tuple[float, Key]] = []  # (ejected_until, key), lazy deletion
        self.ejections_total = 0
        self.panics_total = 0  # picks made with no healthy endpoint left (all ejected)
        # Picks of a service with a zone split that no weighted zone could serve.
        self.zone_split_fallbacks_total = 0
        self._zone_split_fallen_back: set[tuple[str, str]] = set()  # logged once each
        # Endpoint entries inspected by pick(): random draws, fallback scans and
        # (re)indexing. Flat per pick once a service is indexed.
        self.examined = 0

    # -- choosing ----------------------------------------------------------------------

    def pick(
        self,
        service: Service,
        candidates: Sequence[Endpoint],
        *,
        node: str,
        zone: str,
        now: float,
        exclude: Collection[Key] = (),
    ) -> Endpoint | None:
        """The endpoint for a new connection, or None when every candidate is
        excluded (or, with a split, when no weighted version has one left; a zone
        split never makes it None: without a weighted zone it picks as without it)."""
        self._readmit_due(now)
        if not candidates:
            return None
        excl: Collection[Key] = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        idx = self._index_for(service, candidates)

        version: str | None = None
        if service.split:
            version = self._choose_version(service.split, idx, excl)
            if version is None:
                return None

        if service.zone_split:
            chosen = self._choose_zone(service.zone_split, idx, version, excl)
            if chosen is not None:
                return self._pick_in_zone(idx, version, chosen, node, zone, excl)
            picked = self._pick_by_locality(idx, version, node, zone, excl)
            if picked is not None:
                self._zone_split_fallback(service, version)
            return picked

        return self._pick_by_locality(idx, version, node, zone, excl)

    def _pick_by_locality(
        self, idx: _PortIndex, version: str | None, node: str, zone: str, excl: Collection[Key]
    ) -> Endpoint | None:
        """Steps 3 and 4 among the endpoints of `version` (None: all)."""
        tiers: list[tuple[str, str]] = []
        if node:
            tiers.append((_NODE, node))
        if zone:
            tiers.append((_ZONE, zone))
        tiers.append((_ANY, ""))
        for tier, value in tiers:
            group = idx.groups.get((version, tier, value))
            if group is None:
                continue
            eligible = self._eligible(group, excl)
            if eligible > 0:
                return self._two_choices(idx, group.healthy, eligible, excl)

        # Panic: nothing healthy is left, so health is ignored rather than fail.
        group = idx.groups.get((version, _ANY, ""))
        if group is None:
            return None
        eligible = len(group.members) - self._excluded_in(idx, version, excl)
        if eligible <= 0:
            return None
        self.panics_total += 1
        return self._two_choices(idx, group.members, eligible, excl)

    def _pick_in_zone(
        self,
        idx: _PortIndex,
        version: str | None,
        chosen: str,
        node: str,
        zone: str,
        excl: Collection[Key],
    ) -> Endpoint:
        """Step 4 inside the zone a zone split chose (which has an available endpoint
        of `version`): this node's endpoints first when it is this node's zone."""
        if node and chosen == zone:
            group = idx.groups.get((version, _NODE, node))
            if group is not None:
                eligible = self._eligible(group, excl)
                if eligible > 0:
                    return self._two_choices(idx, group.healthy, eligible, excl)
        group = idx.groups[(version, _ZONE, chosen)]
        return self._two_choices(idx, group.healthy, self._eligible(group, excl), excl)

    def _zone_split_fallback(self, service: Service, version: str | None) -> None:
        self.zone_split_fallbacks_total += 1
        key = (service.namespace, service.name)
        if key in self._zone_split_fallen_back:
            return
        self._zone_split_fallen_back.add(key)
        log.warning(
            "service %s: no zone its TrafficSplit weighs (%s) has an endpoint%s left that "
            "is neither ejected nor already tried; balancing as without the zone split "
            "(logged once per service)",
            service.hostname,
            ", ".join(f"{z}: {w}" for z, w in service.zone_split),
            "" if version is None else f" of version {version}",
        )

    def __call__(self, service: Service, candidates: Sequence[Endpoint]) -> Endpoint:
        ep = self.pick(service, candidates, node=self._node, zone=self._zone, now=time.monotonic())
        if ep is None:
            raise RouteError(
                f"service {service.hostname} has no endpoint of a version it "
                f"splits traffic to ({dict(service.split)})"
            )
        return ep

    def _index_for(self, service: Service, candidates: Sequence[Endpoint]) -> _PortIndex:
        port = candidates[0].port
        cache_key = (service.namespace, service.name, service.vip, port)
        idx = self._indexes.get(cache_key)
        if idx is not None:
            if idx.endpoints is not service.endpoints:
                self.examined += len(service.endpoints)  # one tuple comparison per new tuple
            if not idx.same_endpoints(service.endpoints):
                self._drop_index(cache_key)
                idx = None
        if idx is None:
            on_port = [e for e in service.endpoints if e.port == port]
            self.examined += len(service.endpoints)
            if on_port:
                idx = _PortIndex(service.endpoints, on_port, self._stats)
                self._indexes[cache_key] = idx
                for key in idx.by_key:
                    self._indexes_of.setdefault(key, []).append(idx)
        if idx is not None and idx.covers(candidates):
            return idx
        # The caller passed some other subset of endpoints: index it for this pick only.
        self.examined += len(candidates)
        return _PortIndex(service.endpoints, candidates, self._stats)

    def _drop_index(self, cache_key: tuple[str, str, str, int]) -> None:
        idx = self._indexes.pop(cache_key)
        for key in idx.by_key:
            holders = self._indexes_of.get(key)
            if holders is not None:
                holders[:] = [h for h in holders if h is not idx]
                if not holders:
                    del self._indexes_of[key]

    @staticmethod
    def _excluded_in(idx: _PortIndex, version: str | None, excl: Collection[Key]) -> int:
        """How many excluded keys are endpoints of `version` (None: any) in `idx`."""
        n = 0
        for k in excl:
            ep = idx.by_key.get(k)
            if ep is not None and (version is None or ep.version == version):
                n += 1
        return n

    def _choose_version(
        self, split: tuple[tuple[str, int], ...], idx: _PortIndex, excl: Collection[Key]
    ) -> str | None:
        options: list[tuple[str, int]] = []
        total = 0
        for version, weight in split:
            if weight <= 0:
                continue
            group = idx.groups.get((version, _ANY, ""))
            if group is None or len(group.members) <= self._excluded_in(idx, version, excl):
                continue
            options.append((version, weight))
            total += weight
        if not options:
            return None
        r = self._rng.random() * total
        for version, weight in options:
            r -= weight
            if r < 0:
                return version
        return options[-1][0]  # float rounding at the top end

    def _choose_zone(
        self,
        zone_split: tuple[tuple[str, int], ...],
        idx: _PortIndex,
        version: str | None,
        excl: Collection[Key],
    ) -> str | None:
        """A zone by weight among those with an endpoint of `version` (None: any)
        that is neither ejected nor in `excl`; None when no weighted zone has one."""
        options: list[tuple[str, int]] = []
        total = 0
        for zone, weight in zone_split:
            if weight <= 0:
                continue
            group = idx.groups.get((version, _ZONE, zone))
            if group is None or self._eligible(group, excl) <= 0:
                continue
            options.append((zone, weight))
            total += weight
        if not options:
            return None
        r = self._rng.random() * total
        for zone, weight in options:
            r -= weight
            if r < 0:
                return zone
        return options[-1][0]  # float rounding at the top end

    @staticmethod
    def _eligible(group: _Group, excl: Collection[Key]) -> int:
        """How many of `group`'s healthy endpoints are not in `excl`."""
        return len(group.healthy) - sum(1 for k in excl if group.is_healthy(k))

    def _two_choices(
        self, idx: _PortIndex, keys: list[Key], eligible: int, excl: Collection[Key]
    ) -> Endpoint:
        """P2C over `keys`, of which `eligible` (> 0) are not in `excl`."""
        need = 2 if eligible >= 2 else 1
        chosen: list[Key] = []
        n = len(keys)
        for _ in range(_MAX_DRAWS):
            key = keys[self._rng.randrange(n)]
            self.examined += 1
            if key in excl or key in chosen:
                continue
            chosen.append(key)
            if len(chosen) == need:
                break
        else:
            # Degenerate: most of the group is excluded. Scan what is left.
            rest = [k for k in keys if k not in excl and k not in chosen]
            self.examined += n
            chosen.extend(self._rng.sample(rest, need - len(chosen)))
        if need == 1:
            return idx.by_key[chosen[0]]
        a, b = chosen
        return idx.by_key[a if self._cost(a) <= self._cost(b) else b]

    def _cost(self, key: Key) -> float:
        st = self._stats.get(key)
        if st is None:
            return self._default_rtt
        return self._rtt(st) * (st.inflight + 1)

    def _rtt(self, st: _Stats) -> float:
        return self._default_rtt if st.ewma is None else st.ewma

    # -- feedback from the proxy -------------------------------------------------------

    def on_attempt(self, ep: Endpoint, now: float) -> None:
        self._entry(ep).inflight += 1

    def on_done(self, ep: Endpoint) -> None:
        st = self._stats.get((ep.address, ep.port))
        if st is not None and st.inflight > 0:
            st.inflight -= 1

    def on_success(self, ep: Endpoint, latency: float, now: float) -> None:
        """Connect latency (seconds). Peak-EWMA: a slower sample is adopted at once;
        a faster one pulls the estimate with weight 1 - exp(-elapsed / decay)."""
        self._readmit_due(now)
        key = (ep.address, ep.port)
        st = self._entry(ep)
        latency = max(latency, 0.0)
        if st.ewma is None or latency >= st.ewma:
            st.ewma = latency
        else:
            w = math.exp(-max(now - st.updated_at, 0.0) / self._decay)
            st.ewma = st.ewma * w + latency * (1.0 - w)
        st.updated_at = now
        st.consecutive_failures = 0
        if st.ejected_until is not None:  # it served panic traffic: take it back
            self._readmit(key, st, now)

    def on_failure(self, ep: Endpoint, now: float) -> None:
        """A connect attempt failed; `eject_after` in a row eject the endpoint."""
        self._readmit_due(now)
        key = (ep.address, ep.port)
        st = self._entry(ep)
        st.consecutive_failures += 1
        if st.ejected_until is None and st.consecutive_failures >= self._eject_after:
            self._eject(key, st, now)

    def _entry(self, ep: Endpoint) -> _Stats:
        key = (ep.address, ep.port)
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = _Stats()
        return st

    def _decay_backoff(self, st: _Stats, now: float) -> None:
        """Back-off forgiveness: healthy for max_ejection since its last readmission
        resets the ejection time to base_ejection."""
        if (
            st.ejected_until is None
            and st.readmitted_at is not None
            and now - st.readmitted_at >= self._max_ejection
        ):
            st.times_ejected = 0

    def _eject(self, key: Key, st: _Stats, now: float) -> None:
        self._decay_backoff(st, now)
        duration = min(self._base_ejection * 2.0 ** min(st.times_ejected, 64), self._max_ejection)
        st.ejected_until = now + duration
        st.times_ejected += 1
        st.total_ejections += 1
        self.ejections_total += 1
        heapq.heappush(self._readmit_heap, (st.ejected_until, key))
        for idx in self._indexes_of.get(key, ()):
            for group in idx.groups_of[key]:
                group.mark_ejected(key)

    def _readmit(self, key: Key, st: _Stats, at: float) -> None:
        st.ejected_until = None
        st.readmitted_at = at
        st.consecutive_failures = 0
        for idx in self._indexes_of.get(key, ()):
            for group in idx.groups_of[key]:
                group.mark_healthy(key)

    def _readmit_due(self, now: float) -> None:
        heap = self._readmit_heap
        while heap and heap[0][0] <= now:
            until, key = heapq.heappop(heap)
            st = self._stats.get(key)
            if st is not None and st.ejected_until == until:  # else a stale entry
                self._readmit(key, st, until)

    # -- config updates and introspection ----------------------------------------------

    def forget_missing(self, services: Iterable[Service]) -> None:
        """Keep stats of endpoints still in some service; drop the rest, and the
        indexes of services that are gone or whose endpoints changed."""
        services = list(services)
        live = {(e.address, e.port) for s in services for e in s.endpoints}
        current = {(s.namespace, s.name, s.vip): s for s in services}
        for cache_key, idx in list(self._indexes.items()):
            svc = current.get((cache_key[0], cache_key[1], cache_key[2]))
            if svc is None or (
                idx.endpoints is not svc.endpoints and idx.endpoints != svc.endpoints
            ):
                self._drop_index(cache_key)
            else:
                idx.endpoints = svc.endpoints
        for key in [k for k in self._stats if k not in live]:
            del self._stats[key]
            self._indexes_of.pop(key, None)
        self._readmit_heap = [e for e in self._readmit_heap if e[1] in self._stats]
        heapq.heapify(self._readmit_heap)

    def endpoint_stats(self, now: float) -> list[dict[str, Any]]:
        """One record per known endpoint, for the admin endpoint and metrics."""
        self._readmit_due(now)
        out: list[dict[str, Any]] = []
        for (address, port), st in sorted(self._stats.items()):
            self._decay_backoff(st, now)
            ejected = st.ejected_until is not None
            out.append(
                {
                    "address": address,
                    "port": port,
                    "ewma_ms": round(self._rtt(st) * 1000.0, 3),
                    "inflight": st.inflight,
                    "consecutive_failures": st.consecutive_failures,
                    "state": EJECTED if ejected else HEALTHY,
                    "ejected_for_s": (
                        round(max(st.ejected_until - now, 0.0), 3)
                        if st.ejected_until is not None
                        else 0.0
                    ),
                    "times_ejected": st.times_ejected,
                    "total_ejections": st.total_ejections,
                }
            )
        return out

    def health(self, now: float) -> dict[Key, tuple[bool, float]]:
        """(address, port) -> (ejected now, peak-EWMA in ms, 0 if never used), for
        every endpoint this balancer has stats of (the node's health report)."""
        self._readmit_due(now)
        return {
            key: (st.ejected_until is not None, 0.0 if st.ewma is None else st.ewma * 1000.0)
            for key, st in self._stats.items()
        }
