"""The control-plane API's handlers (docs/protocol.md, "Control plane API").

Each runs after its route's declared auth passed (routes.py) and gets the node
name for node routes; expected failures raise ApiError with their status.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from datetime import timedelta

from cryptography.hazmat.primitives import serialization

from meshnode.controlplane import registry as reg
from meshnode.controlplane.ca import CAError, RotatingCA, minimum_rotation_overlap
from meshnode.controlplane.grants import token_grant
from meshnode.controlplane.registry import RegistryError
from meshnode.controlplane.reports import ReportBook
from meshnode.controlplane.store import Store
from meshnode.controlplane.tokens import DEFAULT_TOKEN_TTL, ZONE_TOKEN_NODE, make_token
from meshnode.core import api
from meshnode.core.contracts.report import NodeReport
from meshnode.core.errors import ApiError
from meshnode.core.identity import IdentityError, SpiffeId
from meshnode.core.pki import root_pin
from meshnode.core.resources import KINDS, ResourceError, parse_documents, resources_to_json
from meshnode.core.token import parse_token

from .messages import ControlPlaneConfig, Request, Response, json_response
from .state import StateCache

__all__ = ["Handlers"]


class Handlers:
    """The handlers, mixed into :class:`~.app.ControlPlane`."""

    store: Store
    config: ControlPlaneConfig
    cache: StateCache
    reports: ReportBook

    def _ca(self) -> RotatingCA:
        if self.cache.ca is None:
            raise ApiError(503, "the CA is not loaded yet; retry in a second")
        return self.cache.ca

    # -- public ---------------------------------------------------------------------------

    async def get_trust_bundle(self, req: Request) -> Response:
        ca = self._ca()
        return json_response(
            200, {"trust_domain": ca.trust_domain, "trust_bundle": ca.trust_bundle_pem().decode()}
        )

    async def post_enroll(self, req: Request) -> Response:
        body = req.json()
        ca = self._ca()
        token = parse_token(body.get("token", ""))
        try:
            name = reg.check_label(body.get("name"), "name")
            zone = body.get("zone", "") or ""
            if zone:
                reg.check_label(zone, "zone")
            zone = self._own_zone(zone)
            claimed = reg.check_ip(body["ip"], "ip") if body.get("ip") else ""
        except RegistryError as exc:
            raise ApiError(400, str(exc)) from None
        peer = _unmapped(req.peer_ip)
        csr = body.get("csr")
        if not isinstance(csr, str):
            raise ApiError(400, "csr: missing; send a PEM P-256 CSR made on the node")
        # The token first: nobody without one makes the control plane sign anything.
        now = time.time()
        await asyncio.to_thread(self.store.check_token, token, name, zone, claimed, now, peer)
        try:  # then sign: a bad CSR must not consume the token
            chain = ca.active.issue_node_certificate(csr.encode(), name, self.config.cert_ttl)
        except CAError as exc:
            raise ApiError(400, f"csr: {exc}") from None
        revision, node = await asyncio.to_thread(
            self.store.enroll, token, name, zone, claimed, now, peer
        )
        await self.cache.refresh()
        req.identity = f"enroll/{name}"
        return json_response(
            200,
            {
                "certificate": chain.decode(),
                "trust_bundle": ca.trust_bundle_pem().decode(),
                "trust_domain": ca.trust_domain,
                "node": node.to_dict(),
                "revision": revision,
            },
        )

    # -- node API -------------------------------------------------------------------------

    async def post_node_workload(self, req: Request, node: str) -> Response:
        body = req.json()
        try:
            wl = reg.workload_from_request(node, body)
        except RegistryError as exc:
            raise ApiError(400, f"workload: {exc}") from None
        limit = self.config.max_workloads_per_node
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.register_workload(wl, limit)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "workload": wl.slice_dict()})

    async def delete_node_workload(self, req: Request, node: str, name: str) -> Response:
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.delete_workload(node, name)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": name})

    async def post_node_certificate(self, req: Request, node: str) -> Response:
        body = req.json()
        ns, sa, csr = body.get("namespace"), body.get("service_account"), body.get("csr")
        if not isinstance(csr, str):
            raise ApiError(400, "csr: missing; send a PEM P-256 CSR")
        try:
            identity = SpiffeId(self.config.trust_domain, str(ns), str(sa))
        except IdentityError as exc:
            raise ApiError(400, f"namespace/service_account: {exc}") from None
        registry = self.cache.registry
        decision = registry.granted(node, str(ns), str(sa))
        if not decision.allowed:  # a grant, not the node's own registration, decides
            raise ApiError(403, f"certificate for {identity.uri}: {decision.message}")
        if not registry.hosts(node, str(ns), str(sa)):
            raise ApiError(
                403,
                f"node {node} hosts no workload with identity {identity.uri}; register the "
                "workload on this node (POST /v1/node/workloads) before asking for its "
                "certificate",
            )
        ca = self._ca()
        try:
            chain = ca.active.issue_workload_certificate(
                csr.encode(), identity, self.config.cert_ttl, node=node
            )
        except CAError as exc:
            raise ApiError(400, f"csr: {exc}") from None
        return json_response(
            200, {"certificate": chain.decode(), "trust_bundle": ca.trust_bundle_pem().decode()}
        )

    async def post_node_renew(self, req: Request, node: str) -> Response:
        csr = req.json().get("csr")
        if not isinstance(csr, str):
            raise ApiError(400, "csr: missing; send a PEM P-256 CSR")
        ca = self._ca()
        try:
            chain = ca.active.issue_node_certificate(csr.encode(), node, self.config.cert_ttl)
        except CAError as exc:
            raise ApiError(400, f"csr: {exc}") from None
        return json_response(
            200, {"certificate": chain.decode(), "trust_bundle": ca.trust_bundle_pem().decode()}
        )

    async def post_node_report(self, req: Request, node: str) -> Response:
        """A node's health report (docs/protocol.md, "Node reports"): kept in
        memory, the latest per node; one accepted per node per second."""
        now = time.time()
        wait = self.reports.retry_after(node, now)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            response = json_response(
                429,
                {
                    "error": f"node {node} reported less than "
                    f"{self.reports.min_interval:g}s ago; send the next report in {seconds}s",
                    "retry_after": seconds,
                },
            )
            response.headers["Retry-After"] = str(seconds)
            return response
        try:
            doc = json.loads(req.body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the report is not valid JSON: {exc}") from None
        try:
            report = NodeReport.from_dict(doc)
        except ValueError as exc:
            raise ApiError(400, f"the report does not follow its schema: {exc}") from None
        if report.node != node:
            raise ApiError(
                403,
                f"node {node} may report only for itself, not for {report.node!r} (the "
                "report's node must be the name in the client certificate)",
            )
        self.reports.put(node, report, now)
        return json_response(200, {"node": node, "received_at": now})

    # -- admin API ------------------------------------------------------------------------

    def _own_zone(self, zone: str) -> str:
        """A zone control plane's nodes are in its zone, and no other."""
        if self.config.mode != "zone":
            return zone
        if zone and zone != self.config.zone:
            raise ApiError(
                400,
                f"this is zone {self.config.zone}'s control plane: its nodes are in zone "
                f"{self.config.zone}, not {zone}; enroll with that zone's control plane",
            )
        return self.config.zone

    def _not_in_zone(self, what: str) -> None:
        """Policies, grants and the root are the global control plane's (multi-zone)."""
        if self.config.mode == "zone":
            raise ApiError(
                409,
                f"this is zone {self.config.zone}'s control plane: {what} at the global "
                f"control plane ({self.config.global_url}); it reaches every zone from there",
            )

    async def post_admin_token(self, req: Request) -> Response:
        body = req.json()
        if body.get("zone_controlplane") is not None:
            return await self._zone_token(body)
        if self.config.mode == "global":
            raise ApiError(
                400,
                "this is the global control plane: nodes enroll with their zone's control "
                "plane (make the token there); here, make zone control plane tokens: "
                "meshnode token create --zone-controlplane <zone>",
            )
        try:
            node = reg.check_label(body.get("node"), "node")
            zone = body.get("zone", "") or ""
            if zone:
                reg.check_label(zone, "zone")
        except RegistryError as exc:
            raise ApiError(400, str(exc)) from None
        zone = self._own_zone(zone)
        ttl = body.get("ttl_seconds", DEFAULT_TOKEN_TTL)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise ApiError(400, f"ttl_seconds: {ttl!r} must be a positive number")
        identities = body.get("identities", [])
        if not isinstance(identities, list) or not all(isinstance(i, str) for i in identities):
            raise ApiError(400, "identities: must be a list of <namespace>/<service-account>")
        try:
            token_grant(node, identities)  # checks each as a grant would
            address = reg.check_ip(body["address"], "address") if body.get("address") else ""
        except (ResourceError, RegistryError) as exc:
            raise ApiError(400, f"{exc}") from None
        # The pin names the root the server's chain ends in (see RotatingCA.serving).
        pin = root_pin(
            self._ca().serving().root_certificate.public_bytes(serialization.Encoding.DER)
        )
        token, record = make_token(
            node, zone, float(ttl), pin, time.time(), identities=tuple(identities), address=address
        )
        await asyncio.to_thread(self.store.create_token, record)
        return json_response(
            200,
            {
                "token": token,
                "expires_at": record.expires_at,
                "node": node,
                "zone": zone,
                "identities": list(record.identities),
                "address": record.address,
            },
        )

    async def _zone_token(self, body: dict[str, object]) -> Response:
        """A token that enrolls zone `zone_controlplane`'s control plane (global)."""
        if self.config.mode != "global":
            raise ApiError(
                400,
                "zone control plane tokens are made at the global control plane "
                "(`meshnode controlplane run --mode global`)",
            )
        try:
            zone = reg.check_label(body.get("zone_controlplane"), "zone_controlplane")
        except RegistryError as exc:
            raise ApiError(400, str(exc)) from None
        ttl = body.get("ttl_seconds", DEFAULT_TOKEN_TTL)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise ApiError(400, f"ttl_seconds: {ttl!r} must be a positive number")
        pin = root_pin(
            self._ca().serving().root_certificate.public_bytes(serialization.Encoding.DER)
        )
        token, record = make_token(ZONE_TOKEN_NODE, zone, float(ttl), pin, time.time())
        await asyncio.to_thread(self.store.create_token, record)
        return json_response(
            200, {"token": token, "expires_at": record.expires_at, "zone_controlplane": zone}
        )

    async def post_admin_resources(self, req: Request) -> Response:
        self._not_in_zone("apply policies and grants")
        try:
            text = req.body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the resources must be UTF-8 YAML") from None
        source = req.arg("source") or "request"
        try:
            docs = resources_to_json(parse_documents(text, source=source))
        except ResourceError as exc:
            raise ApiError(400, str(exc)) from None
        if not docs:
            raise ApiError(400, f"{source}: no resources in the input")
        revision, results = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.apply_resources(docs)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "results": results})

    async def get_admin_resources(self, req: Request) -> Response:
        await self.cache.refresh()
        kind, ns, name = req.arg("kind"), req.arg("namespace"), req.arg("name")
        if kind is not None and kind not in KINDS:
            raise ApiError(400, f"unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        items = [
            doc
            for (k, n, nm), doc in sorted(self.cache.registry.resources.items())
            if k not in reg.INTERNAL_KINDS
            and (kind is None or k == kind)
            and (ns is None or n == ns)
            and (name is None or nm == name)
        ]
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def delete_admin_resource(
        self, req: Request, kind: str, namespace: str, name: str
    ) -> Response:
        self._not_in_zone("delete policies and grants")
        revision, _ = await asyncio.to_thread(
            self.store.mutate,
            lambda tx, r, rev: r.delete_resource(kind, namespace, name),
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": f"{kind}/{namespace}/{name}"})

    async def get_admin_nodes(self, req: Request) -> Response:
        await self.cache.refresh()
        r = self.cache.registry
        now = time.time()
        self.reports.keep_only(set(r.nodes))  # deleted through another replica
        full = req.arg("report") in ("1", "true")  # each node's whole last report too
        items = [
            {
                **n.to_dict(),
                "workloads": len(r.workloads_of(n.name)),
                **self._health(n.name, now, full),
            }
            for _, n in sorted(r.nodes.items())
        ]
        return json_response(200, {"revision": self.cache.revision, "items": items})

    def _health(self, node: str, now: float, full: bool) -> dict[str, object]:
        """What the admin node list shows of a node's last report (nulls before one
        reached this replica); with `full`, the report itself and the connection
        rates since the one before."""
        got = self.reports.get(node)
        rep = got.report if got is not None else None
        out: dict[str, object] = {
            "last_report": got.at if got is not None else None,
            "stale": self.reports.stale(node, now),
            "cert_not_after": rep.cert_not_after if rep is not None else None,
            "agent_version": rep.agent_version if rep is not None else None,
            "config_revision": rep.config_revision if rep is not None else None,
            "ztunnel_ready": rep.ztunnel_ready if rep is not None else None,
            "ejected_endpoints": (
                sum(1 for e in rep.endpoints if e.ejected) if rep is not None else None
            ),
        }
        if full:
            out["report"] = rep.to_dict() if rep is not None else None
            out["rates"] = [
                {"source": s, "destination": d, "connections_per_s": round(v, 3)}
                for (s, d), v in sorted(got.rates.items() if got is not None else ())
            ]
        return out

    async def delete_admin_node(self, req: Request, name: str) -> Response:
        now, ttl = time.time(), self.config.cert_ttl.total_seconds()
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.delete_node(name, now, ttl)
        )
        self.reports.forget(name)
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": name})

    async def get_admin_services(self, req: Request) -> Response:
        await self.cache.refresh()
        items = [doc.to_json() for doc in self.cache.registry.service_docs().values()]
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def get_admin_workloads(self, req: Request) -> Response:
        await self.cache.refresh()
        items = [w.to_dict() for _, w in sorted(self.cache.registry.workloads.items())]
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def delete_admin_workload(self, req: Request, node: str, name: str) -> Response:
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.delete_workload(node, name)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": f"{node}/{name}"})

    async def post_admin_rotate(self, req: Request) -> Response:
        self._not_in_zone("rotate the root CA")
        body = req.json()
        # The shortest overlap that locks no node out (ca.minimum_rotation_overlap);
        # `force` (a compromised root) retires the old one sooner, knowingly.
        watch = timedelta(seconds=api.NODE_CONFIG_MAX_WAIT)
        minimum = minimum_rotation_overlap(self.config.cert_ttl, watch)
        overlap = body.get("overlap_seconds", minimum.total_seconds())
        if isinstance(overlap, bool) or not isinstance(overlap, int | float) or overlap < 0:
            raise ApiError(400, f"overlap_seconds: {overlap!r} must be a number >= 0")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ApiError(400, f"force: {force!r} must be true or false")
        floor = timedelta(0) if force else minimum
        try:
            new = await asyncio.to_thread(
                self.store.rotate_ca,
                lambda ca: ca.rotate(timedelta(seconds=overlap), minimum=floor),
            )
        except CAError as exc:
            raise ApiError(400, f"{exc}; or --force, if every node may re-enroll") from None
        await self.cache.refresh()
        pins = [
            root_pin(c.root_certificate.public_bytes(serialization.Encoding.DER))
            for c in new.trusted()
        ]
        return json_response(
            200,
            {
                "revision": self.cache.revision,
                "roots": pins,
                "active": pins[-1],
                "overlap_seconds": overlap,
            },
        )


def _unmapped(address: str) -> str:
    """``::ffff:10.0.0.1`` (an IPv4 peer on a dual-stack socket) -> ``10.0.0.1``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
