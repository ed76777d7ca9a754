"""The global control plane's zone API (docs/multizone.md, docs/protocol.md).

- ``POST /v1/zone/enroll`` (a zone join token in the body): a zone control plane
  sends the CSR of its intermediate CA; the global's root signs it. From then on
  the zone signs its own nodes' certificates, and its control plane's own
  certificate ``spiffe://<td>/zone/<zone>/controlplane``, with it.
- ``PUT /v1/zone/state`` and ``GET /v1/zone/config`` (that certificate): the
  zone's services up, the global's policies and the other zones' services down
  (core/contracts/zone.py).
- ``GET /v1/admin/zones``: the zones and how their sync stands.

A zone is known by the intermediate the global issued it: its control plane's
certificate must be signed by exactly that intermediate, which must chain to a
root the global trusts now. A certificate another zone's intermediate signed, or
one of another trust domain, names no zone here.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshnode.controlplane import registry as reg
from meshnode.controlplane.ca import CAError, RotatingCA
from meshnode.controlplane.grants import TOKEN_GRANT_PREFIX
from meshnode.controlplane.registry import ZONE_KIND, RegistryError
from meshnode.controlplane.zonesync import ZoneSync
from meshnode.core import api
from meshnode.core.contracts import ContractError
from meshnode.core.contracts.zone import ZoneConfig, ZoneState, ZoneUnchanged
from meshnode.core.errors import ApiError
from meshnode.core.identity import zone_of_controlplane_certificate
from meshnode.core.resources import resource_from_dict
from meshnode.core.token import parse_token

from .handlers import Handlers
from .messages import Request, Response, json_response

__all__ = ["MAX_ZONE_WAIT", "Zones", "zone_of_certificate"]

MAX_ZONE_WAIT = api.NODE_CONFIG_MAX_WAIT
# Intermediates kept per zone: the current one and the one before it (a zone
# enrolled again keeps working under its old one until it restarts).
KEEP_INTERMEDIATES = 2


def zone_of_certificate(
    cert: x509.Certificate | None,
    trust_domain: str,
    ca: RotatingCA,
    zones: dict[str, dict[str, object]],
    now: datetime | None = None,
) -> str:
    """The enrolled zone whose control plane presented `cert`, or ApiError. Pure."""
    if cert is None:
        raise ApiError(
            401,
            "the zone API needs the zone control plane's certificate (it makes one after "
            "`meshnode controlplane run --mode zone --global-token ...` enrolled it)",
        )
    zone = zone_of_controlplane_certificate(cert, trust_domain)
    if zone is None:
        raise ApiError(
            403,
            f"the client certificate is not a zone control plane's of trust domain "
            f"{trust_domain} (expected URI SAN spiffe://{trust_domain}/zone/<zone>/controlplane)",
        )
    spec = zones.get(zone)
    if spec is None:
        raise ApiError(
            403,
            f"zone {zone} is not enrolled here; enroll it with a token from `meshnode token "
            f"create --zone-controlplane {zone}`",
        )
    now = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise ApiError(403, f"the certificate of zone {zone}'s control plane is not valid now")
    roots = [c.root_certificate for c in ca.trusted(now)]
    for pem in spec.get("intermediates", ()):  # type: ignore[attr-defined]
        inter = _certificate(str(pem))
        if not inter.not_valid_before_utc <= now < inter.not_valid_after_utc:
            continue
        if _signed_by(cert, [inter]) and _signed_by(inter, roots):
            return zone
    raise ApiError(
        403,
        f"the certificate of zone {zone}'s control plane was not signed by the intermediate "
        "this control plane issued to that zone (or that intermediate expired); enroll the "
        "zone again",
    )


def _signed_by(cert: x509.Certificate, issuers: list[x509.Certificate]) -> bool:
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


_CERTS: dict[str, x509.Certificate] = {}


def _certificate(pem: str) -> x509.Certificate:
    cert = _CERTS.get(pem)
    if cert is None:
        if len(_CERTS) > 1024:
            _CERTS.clear()
        cert = _CERTS[pem] = x509.load_pem_x509_certificate(pem.encode())
    return cert


class Zones(Handlers):
    """The zone handlers, mixed into :class:`~.app.ControlPlane`."""

    _stopping: bool
    zone_sync: ZoneSync | None

    def _global_only(self) -> None:
        if self.config.mode != "global":
            raise ApiError(
                404,
                "this is not a global control plane: zone control planes enroll with one "
                "started as `meshnode controlplane run --mode global`",
            )

    async def post_zone_enroll(self, req: Request) -> Response:
        self._global_only()
        body = req.json()
        ca = self._ca()
        token = parse_token(body.get("token", ""))
        try:
            zone = reg.check_label(body.get("zone"), "zone")
        except RegistryError as exc:
            raise ApiError(400, str(exc)) from None
        csr = _csr(body)
        now = time.time()
        # The token first: nobody without one makes the root sign anything.
        await asyncio.to_thread(self.store.check_zone_token, token, zone, now)
        intermediate = self._intermediate(ca, csr, zone)
        revision, _ = await asyncio.to_thread(
            self.store.enroll_zone, token, zone, now, intermediate, KEEP_INTERMEDIATES
        )
        await self.cache.refresh()
        return _issued(zone, revision, ca, intermediate)

    def _intermediate(self, ca: RotatingCA, csr: str, zone: str) -> str:
        """Zone `zone`'s intermediate for `csr`, from the global's active root (PEM)."""
        try:
            return ca.active.issue_zone_intermediate(
                csr.encode(), zone, self.config.zone_intermediate_ttl
            ).decode()
        except CAError as exc:
            raise ApiError(400, f"intermediate_csr: {exc}") from None

    async def post_zone_intermediate(self, req: Request, zone: str) -> Response:
        """A new intermediate for an enrolled zone, from the global's active root:
        how a root rotation reaches the zones. The zone asks when the global's trust
        bundle names a root its CA does not have (zonesync.py)."""
        self._global_only()
        ca = self._ca()
        intermediate = self._intermediate(ca, _csr(req.json()), zone)
        revision, _ = await asyncio.to_thread(
            self.store.mutate,
            lambda tx, r, rev: r.add_zone_intermediate(zone, intermediate, KEEP_INTERMEDIATES),
        )
        await self.cache.refresh()
        return _issued(zone, revision, ca, intermediate)

    async def put_zone_state(self, req: Request, zone: str) -> Response:
        self._global_only()
        try:
            state = ZoneState.from_json(req.json(), "state")
        except ContractError as exc:
            raise ApiError(400, str(exc)) from None
        if state.zone != zone:
            raise ApiError(
                403, f"zone {zone}'s control plane may publish zone {zone}, not {state.zone}"
            )
        revision, kept = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.put_zone_state(state, time.time())
        )
        await self.cache.refresh()
        _, refused = self.cache.registry.zone_states().get(zone, (None, []))
        return json_response(200, {"revision": revision, "generation": kept, "refused": refused})

    async def get_zone_config(self, req: Request, zone: str) -> Response:
        self._global_only()
        try:
            after = int(req.arg("after") or -1)
            wait = min(float(req.arg("wait") or 0), MAX_ZONE_WAIT)
        except ValueError:
            raise ApiError(400, "after must be an integer revision and wait seconds") from None
        deadline = time.monotonic() + max(wait, 0.0)
        while self.cache.revision <= after and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return json_response(200, ZoneUnchanged(self.cache.revision).to_json())
            await self.cache.changed.wait(left)
        registry, ca = self.cache.registry, self._ca()
        states = registry.zone_states()
        config = ZoneConfig(
            revision=self.cache.revision,
            trust_domain=ca.trust_domain,
            trust_bundle=ca.trust_bundle_pem().decode(),
            resources=tuple(resource_from_dict(doc) for doc in _exported(registry)),
            zones=tuple(s for z, (s, _) in sorted(states.items()) if z != zone),
        )
        return json_response(200, config.to_json())

    async def get_admin_zones(self, req: Request) -> Response:
        await self.cache.refresh()
        registry = self.cache.registry
        if self.config.mode == "global":
            states = registry.zone_states()
            items = []
            for zone, spec in registry.internal(ZONE_KIND).items():
                state, refused = states.get(zone, (None, []))
                items.append(
                    {
                        "zone": zone,
                        "enrolled_at": spec.get("enrolled_at"),
                        "last_sync": spec.get("received_at"),
                        "generation": state.generation if state else None,
                        "ingress": _ingress(state),
                        "services": len(state.services) if state else 0,
                        "refused": refused,
                    }
                )
            return json_response(
                200, {"mode": "global", "revision": self.cache.revision, "items": items}
            )
        sync = registry.internal(reg.ZONE_SYNC_KIND).get("global", {})
        items = [
            {
                "zone": zone,
                "generation": spec.get("generation"),
                "ingress": _ingress(ZoneState.from_json(spec, f"RemoteZone/{zone}")),
                "services": len(spec.get("services", [])),
            }
            for zone, spec in registry.internal(reg.REMOTE_ZONE_KIND).items()
        ]
        return json_response(
            200,
            {
                "mode": self.config.mode,
                "zone": self.config.zone,
                "revision": self.cache.revision,
                "sync": sync,
                "status": self.zone_sync.status.to_json() if self.zone_sync else None,
                "items": items,
            },
        )


def _csr(body: dict[str, object]) -> str:
    csr = body.get("intermediate_csr")
    if not isinstance(csr, str):
        raise ApiError(400, "intermediate_csr: missing; send a PEM P-256 CSR")
    return csr


def _issued(zone: str, revision: int, ca: RotatingCA, intermediate: str) -> Response:
    return json_response(
        200,
        {
            "zone": zone,
            "revision": revision,
            "trust_domain": ca.trust_domain,
            "trust_bundle": ca.trust_bundle_pem().decode(),
            "intermediate": intermediate,
        },
    )


def _ingress(state: ZoneState | None) -> str:
    if state is None or not state.ingress_port:
        return ""
    host = f"[{state.ingress_ip}]" if ":" in state.ingress_ip else state.ingress_ip
    return f"{host}:{state.ingress_port}"


def _exported(registry: reg.Registry) -> list[dict[str, object]]:
    """What the global gives every zone: its policies and identity grants, not its
    internal rows nor the grants of its own join tokens (those name nodes of the
    global itself)."""
    return [
        doc
        for (kind, _, name), doc in sorted(registry.resources.items())
        if kind not in reg.INTERNAL_KINDS
        and not (kind == reg.GRANT_KIND and name.startswith(TOKEN_GRANT_PREFIX))
    ]
