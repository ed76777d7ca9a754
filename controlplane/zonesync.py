"""A zone control plane's side of multi-zone (docs/multizone.md): its enrollment
with the global control plane, and the sync that keeps them in step.

- **Enrollment**, on the first start (the store holds no CA yet): the zone join
  token's pin finds the global's root (no trust on first use, core/cpclient.py);
  the zone sends the CSR of a key made here for its intermediate CA, and keeps
  the intermediate the global's root signed, with the global's root certificate
  (never its key), as its CA. Its nodes' certificates chain to the global root, so
  every zone's nodes trust each other.
- **Its certificate**: the zone's control plane signs its own client certificate
  ``spiffe://<td>/zone/<zone>/controlplane`` with that intermediate (24 h,
  renewed at half-life); the global knows the zone by the intermediate it issued.
- **Up**: whenever what other zones need of this zone changes (its services, the
  identity and number of their endpoints, its ingress address), a
  :class:`~meshnode.core.contracts.zone.ZoneState` goes to ``PUT /v1/zone/state``.
- **Down**: a long poll of ``GET /v1/zone/config`` brings the global's policies,
  identity grants and the other zones' states; they are written to this zone's
  store (:meth:`~meshnode.controlplane.registry.Registry.apply_global`), so every
  replica, and every node through its usual watch, gets them, and they survive
  the global being down or this zone restarting.

Every failure is retried with a jittered back-off and logged once per kind; the
zone keeps serving its nodes from its store meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import random
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshnode.controlplane.ca import CAError, CertificateAuthority, RotatingCA
from meshnode.controlplane.registry import ZONE_SYNC_KIND
from meshnode.controlplane.store import Store
from meshnode.core import api
from meshnode.core.contracts import ContractError
from meshnode.core.contracts.zone import ZoneConfig, ZoneState, ZoneUnchanged, parse_zone_answer
from meshnode.core.cpclient import ClientError, fetch_pinned_bundle, request_async, tls_context
from meshnode.core.errors import MeshnodeError
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import controlplane_uri
from meshnode.core.pki import generate_private_key, make_node_csr, private_key_pem, root_pin
from meshnode.core.token import TokenError, parse_token

if TYPE_CHECKING:
    from meshnode.controlplane.api.state import StateCache

__all__ = ["ZoneSync", "ZoneSyncError", "enroll_zone", "parse_ingress"]

log = logging.getLogger("meshnode.controlplane.zones")

ZONE_CERT_TTL = timedelta(hours=24)
POLL_WAIT = 30.0  # seconds a config long poll waits at the global
REQUEST_TIMEOUT = 15.0  # on top of POLL_WAIT for a poll
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
PUSH_RECHECK = 5.0  # seconds between looks at this zone's state without a commit
# A zone renews its intermediate at most this often for its age (seconds).
RENEW_AT_MOST_EVERY = 3600.0


class ZoneSyncError(MeshnodeError):
    """The zone cannot enroll or sync; the message says what to do."""


def global_urls(text: str) -> list[str]:
    """``--global URL[,URL...]``: the global control plane's replicas."""
    return [u.strip() for u in text.split(",") if u.strip()]


def parse_ingress(text: str) -> tuple[str, int]:
    """``IP:PORT`` (``[v6]:PORT``) of a zone's ingress, as other zones reach it."""
    host, sep, port = text.rpartition(":")
    try:
        ip = str(ipaddress.ip_address(host.strip("[]")))
        number = int(port)
    except ValueError:
        number, ip = -1, ""
    if not sep or not ip or not 0 < number < 65536:
        raise ZoneSyncError(
            f"--zone-ingress {text!r}: expected IP:PORT, the address other zones reach this "
            "zone's ingress at (e.g. 192.0.2.10:15443)"
        )
    return ip, number


# --- enrollment ------------------------------------------------------------------------


async def enroll_zone(store: Store, zone: str, global_url: str, token_text: str, td: str) -> None:
    """On a zone control plane's first start (its store holds no CA): enroll with
    the global control plane and keep the zone CA it gets. Does nothing when the
    store already has a CA."""
    if await asyncio.to_thread(store.ca_rows):
        return
    if not token_text:
        raise ZoneSyncError(
            f"zone {zone}'s control plane has no CA yet: start it once with --global-token "
            f"TOKEN, made at the global control plane by `meshnode token create "
            f"--zone-controlplane {zone}`"
        )
    try:
        token = parse_token(token_text)
    except TokenError as exc:
        raise ZoneSyncError(f"--global-token: {exc}") from None
    bundle, errors = b"", []
    for url in global_urls(global_url):  # the first replica that proves the pinned root
        try:
            bundle = await asyncio.to_thread(fetch_pinned_bundle, url, token.pin, 10.0, True)
        except ClientError as exc:
            errors.append(str(exc))
            continue
        global_url = url
        break
    if not bundle:
        raise ZoneSyncError(f"cannot enroll zone {zone}: {'; '.join(errors)}")
    roots = x509.load_pem_x509_certificates(bundle)
    key = generate_private_key()
    ctx = tls_context(
        bundle, check_hostname=False, server_uri=controlplane_uri(td), global_only=True
    )
    body = {
        "token": token_text.strip(),
        "zone": zone,
        "intermediate_csr": make_node_csr(key, None, f"zone-{zone}").decode(),
    }
    try:
        answer = await request_async(
            global_url, "POST", api.ZONE_ENROLL, ctx, body=body, timeout=REQUEST_TIMEOUT
        )
    except ClientError as exc:
        raise ZoneSyncError(f"cannot enroll zone {zone} with {global_url}: {exc}") from None
    if answer.status != 200:
        raise ZoneSyncError(
            f"the global control plane at {global_url} refused zone {zone}: {answer.error}"
        )
    try:
        intermediate = x509.load_pem_x509_certificate(str(answer.data["intermediate"]).encode())
        root = next(r for r in roots if _issued_by(intermediate, r))
        ca = CertificateAuthority.for_zone(root, intermediate, key)
    except (KeyError, ValueError, StopIteration, CAError) as exc:
        raise ZoneSyncError(
            f"the global control plane at {global_url} sent no usable intermediate for zone "
            f"{zone} ({exc or 'not issued by its root'})"
        ) from None
    if ca.trust_domain != td:
        raise ZoneSyncError(
            f"the global control plane's trust domain is {ca.trust_domain}, not {td}: start "
            f"this zone with --trust-domain {ca.trust_domain}"
        )
    await asyncio.to_thread(store.ensure_ca, lambda: ca)
    log.info(
        "zone %s enrolled with the global control plane %s (root %s)",
        zone,
        global_url,
        root_pin(root.public_bytes(serialization.Encoding.DER))[:16],
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- the sync ------------------------------------------------------------------------


@dataclass
class SyncStatus:
    """How the sync stands, for ``meshnode get zones`` (this replica's view)."""

    connected: bool = False
    last_contact: float | None = None
    last_error: str = ""
    published_generation: int | None = None
    refused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "last_contact": self.last_contact,
            "last_error": self.last_error,
            "published_generation": self.published_generation,
            "refused": self.refused,
        }


class ZoneSync:
    """The push and pull loops of one zone control plane replica. `cache` is its
    StateCache (registry, revision, CA, a wakeup on every commit)."""

    def __init__(
        self,
        store: Store,
        cache: StateCache,
        zone: str,
        global_url: str,
        ingress: tuple[str, int] | None,
        stopping: Callable[[], bool],
    ) -> None:
        self.store = store
        self.cache = cache
        self.zone = zone
        self.global_url = global_url
        # The global's replicas (`--global URL[,URL...]`), the last that answered first.
        self.urls = global_urls(global_url)
        self.ingress = ingress
        self._stopping = stopping
        self.status = SyncStatus()
        self._ctx: ssl.SSLContext | None = None
        self._ctx_until = 0.0
        self._ctx_ca: Any = None
        self._logged: dict[str, str] = {}
        self._renewed_at = -RENEW_AT_MOST_EVERY  # monotonic time of the last renewal
        self._bundle = ""  # the global's trust bundle, from its last configuration

    async def run(self) -> None:
        await asyncio.gather(
            self._guarded("publish", self._push_loop), self._guarded("watch", self._pull_loop)
        )

    async def _guarded(self, name: str, loop: Callable[[], Any]) -> None:
        """Run `loop`; if it fails on something unforeseen, log it and start it again
        after a back-off: the sync must not end quietly while the zone serves on."""
        step = BACKOFF_FIRST
        while not self._stopping():
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("zone sync (%s) failed; starting it again", name)
                self.status.last_error = f"the {name} loop failed; see the log"
                step = await self._sleep(step)

    # -- the client ---------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        """TLS with this zone's control-plane certificate, made and renewed here."""
        ca = self.cache.ca
        if ca is None:
            raise ZoneSyncError("the zone's CA is not loaded yet")
        if self._ctx is not None and self._ctx_ca is ca and time.time() < self._ctx_until:
            return self._ctx
        key = generate_private_key()
        chain = ca.active.issue_zone_controlplane_certificate(
            make_node_csr(key, None, f"zone-{self.zone}"), self.zone, ZONE_CERT_TTL
        )
        ctx = tls_context(
            ca.trust_bundle_pem(),
            check_hostname=False,
            server_uri=controlplane_uri(ca.trust_domain),
            global_only=True,  # not another zone's control plane (they serve the same URI)
        )
        # load_cert_chain reads files only; a private temp dir, removed at once.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            write_file_atomic(cert_path, chain, 0o600)
            write_file_atomic(key_path, private_key_pem(key), 0o600)
            ctx.load_cert_chain(cert_path, key_path)
        self._ctx, self._ctx_ca = ctx, ca
        self._ctx_until = time.time() + ZONE_CERT_TTL.total_seconds() / 2
        return ctx

    async def _call(self, method: str, path: str, body: Any = None, timeout: float = 0) -> Any:
        """Ask the global's replicas in order, the last one that answered first; one
        that does not answer, or answers 5xx, passes the call to the next."""
        errors = []
        try:
            ctx = self._context()
        except (CAError, OSError, ssl.SSLError) as exc:
            raise ZoneSyncError(f"cannot make this zone's certificate: {exc}") from None
        for url in list(self.urls):
            try:
                answer = await request_async(
                    url, method, path, ctx, body=body, timeout=timeout or REQUEST_TIMEOUT
                )
            except ClientError as exc:
                errors.append(str(exc))
                continue
            if answer.status >= 500:
                errors.append(f"{url}: {answer.status} {answer.error}")
                continue
            if self.urls[0] != url:
                self.urls.remove(url)
                self.urls.insert(0, url)
            break
        else:
            self.status.connected = False
            raise ZoneSyncError("; ".join(errors))
        self.status.connected = True
        self.status.last_contact = time.time()
        if answer.status != 200:
            raise ZoneSyncError(
                f"the global control plane answered {method} {path.split('?')[0]} with "
                f"{answer.status}: {answer.error}"
            )
        return answer.data

    def _problem(self, loop: str, message: str) -> None:
        """Log a failure when it is new (not once per retry)."""
        self.status.last_error = message
        if self._logged.get(loop) != message:
            self._logged[loop] = message
            log.warning("zone sync (%s): %s; retrying with back-off", loop, message)

    def _recovered(self, loop: str) -> None:
        if self._logged.pop(loop, None) is not None:
            log.info("zone sync (%s): the global control plane answers again", loop)
        if not self._logged:
            self.status.last_error = ""

    async def _sleep(self, step: float) -> float:
        await asyncio.sleep(step * random.uniform(0.5, 1.0))
        return min(step * 2, BACKOFF_MAX)

    # -- up -------------------------------------------------------------------------------

    def state(self) -> ZoneState:
        """What this zone publishes now (no ingress: nothing; other zones could not
        reach it)."""
        ip, port = self.ingress or ("", 0)
        services = self.cache.registry.zone_services() if port else ()
        return ZoneState(self.zone, max(self.cache.revision, 0), ip, port, services)

    async def _push_loop(self) -> None:
        sent: tuple[Any, ...] | None = None
        step = BACKOFF_FIRST
        while not self._stopping():
            state = self.state()
            what = (state.ingress_ip, state.ingress_port, state.services)
            if what != sent and self.cache.ca is not None:
                try:
                    data = await self._call("PUT", api.ZONE_STATE, state.to_json())
                except ZoneSyncError as exc:
                    self._problem("publish", str(exc))
                    step = await self._sleep(step)
                    continue
                self._recovered("publish")
                step = BACKOFF_FIRST
                sent = what
                self.status.published_generation = int(data.get("generation", state.generation))
                refused = [str(r) for r in data.get("refused", [])]
                if refused != self.status.refused:
                    for line in refused:
                        log.warning("zone sync: the global control plane leaves out %s", line)
                self.status.refused = refused
                log.info(
                    "zone sync: published %d service(s) of zone %s (generation %d)",
                    len(state.services),
                    self.zone,
                    state.generation,
                )
            await self.cache.changed.wait(PUSH_RECHECK)

    # -- down -----------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        synced = self.cache.registry.internal(ZONE_SYNC_KIND).get("global", {})
        after = int(synced.get("revision", -1))
        step = BACKOFF_FIRST
        while not self._stopping():
            if self.cache.ca is None:
                await asyncio.sleep(0.5)
                continue
            path = f"{api.ZONE_CONFIG}?after={after}&wait={POLL_WAIT:g}"
            try:
                answer = parse_zone_answer(
                    await self._call("GET", path, timeout=POLL_WAIT + REQUEST_TIMEOUT)
                )
            except (ZoneSyncError, ContractError) as exc:
                self._problem("watch", str(exc))
                step = await self._sleep(step)
                continue
            self._recovered("watch")
            step = BACKOFF_FIRST
            if isinstance(answer, ZoneUnchanged):
                if answer.revision < after:  # the global's store went back: take it all
                    after = -1
                elif self._bundle:  # the intermediate ages with no change at the global
                    try:
                        await self.follow_roots(self._bundle)
                    except ZoneSyncError as exc:
                        self._problem("renew", str(exc))
                    else:
                        self._recovered("renew")
                continue
            try:
                await self.apply(answer)
            except Exception as exc:  # noqa: BLE001 - the store may be away; try again
                self._problem("apply", f"cannot store the global's configuration: {exc}")
                step = await self._sleep(step)
                continue
            self._recovered("apply")
            after = answer.revision

    async def follow_roots(self, bundle_pem: str) -> None:
        """Keep this zone's CA in step with the global's roots (a root rotation at
        the global reaches the zone here): when the global signs with a root this
        zone's intermediate is not under, ask for a new intermediate and sign with
        it from now on, keeping the old one trusted; retire a root the global no
        longer trusts. The global's overlap is the zone's."""
        ca = self.cache.ca
        if ca is None:
            return
        try:
            roots = x509.load_pem_x509_certificates(bundle_pem.encode())
        except ValueError as exc:
            raise ZoneSyncError(f"the global sent an unreadable trust bundle: {exc}") from None
        now = datetime.now(UTC)
        reason, retire = plan_roots(ca, roots, now)
        if reason == "age" and time.monotonic() - self._renewed_at < RENEW_AT_MOST_EVERY:
            reason = ""  # e.g. a root near its end caps every new intermediate: not a loop
        new: CertificateAuthority | None = None
        if reason:
            self._renewed_at = time.monotonic()
            key = generate_private_key()
            csr = make_node_csr(key, None, f"zone-{self.zone}").decode()
            data = await self._call("POST", api.ZONE_INTERMEDIATE, {"intermediate_csr": csr})
            try:
                inter = x509.load_pem_x509_certificate(str(data["intermediate"]).encode())
                root = next(r for r in roots if _issued_by(inter, r))
                new = CertificateAuthority.for_zone(root, inter, key)
            except (KeyError, ValueError, StopIteration, CAError) as exc:
                raise ZoneSyncError(
                    f"the global sent no usable intermediate ({exc or 'not under its roots'})"
                ) from None
        if new is None and not retire:
            return

        def rotate(current: RotatingCA) -> RotatingCA:
            entries = [
                (c, now if _pin(c) in retire and (r is None or r > now) else r)
                for c, r in current.entries
            ]
            if reason == "age":  # the old intermediate serves until it ends, no longer
                end = current.active.intermediate_certificate.not_valid_after_utc
                entries = [(c, end if c is current.active else r) for c, r in entries]
            if new is not None:
                entries.append((new, None))
            return RotatingCA(entries)

        await asyncio.to_thread(self.store.rotate_ca, rotate)
        await self.cache.refresh()
        if new is not None and reason == "root":
            log.warning(
                "zone sync: the global signs with root %s now; zone %s has a new intermediate "
                "under it and keeps the old root trusted while the global does",
                _pin(new)[:16],
                self.zone,
            )
        elif new is not None:
            log.info(
                "zone sync: zone %s's intermediate had a third of its life left; it has a "
                "new one until %s",
                self.zone,
                new.intermediate_certificate.not_valid_after_utc.isoformat(timespec="seconds"),
            )
        for pin in sorted(retire):
            log.warning("zone sync: root %s retired (the global no longer trusts it)", pin[:16])

    async def apply(self, config: ZoneConfig) -> None:
        """Write what the global sent to this zone's store, when it changed."""
        await self.follow_roots(config.trust_bundle)
        self._bundle = config.trust_bundle
        digest = _digest(config, self.zone)
        synced = self.cache.registry.internal(ZONE_SYNC_KIND).get("global", {})
        if synced.get("digest") == digest:
            # Nothing this zone keeps changed (another zone's generation, say): only
            # which revision of the global it has seen, for `get zones` and restarts.
            if synced.get("revision") != config.revision:
                spec = {**synced, "revision": config.revision}
                await asyncio.to_thread(
                    self.store.mutate,
                    lambda tx, r, rev: r.put_internal(ZONE_SYNC_KIND, "global", spec),
                )
                await self.cache.refresh()
            return
        await self.follow_roots(config.trust_bundle)
        spec = {
            "revision": config.revision,
            "digest": digest,
            "synced_at": time.time(),
            "global": self.global_url,
        }
        docs = [r.to_dict() for r in config.resources]
        others = [z for z in config.zones if z.zone != self.zone]
        await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: r.apply_global(docs, others, spec)
        )
        await self.cache.refresh()
        log.info(
            "zone sync: took the global's revision %d (%d resource(s), %d other zone(s))",
            config.revision,
            len(docs),
            len(others),
        )


def plan_roots(
    ca: RotatingCA, global_roots: list[x509.Certificate], now: datetime
) -> tuple[str, set[str]]:
    """(why this zone needs a new intermediate: "root" when the global signs with a
    root the zone's intermediate is not under, "age" when the intermediate has
    less than a third of its life left, "" when it needs none; the root pins of
    its CA entries to retire now: those the global no longer trusts), given the
    roots the global trusts (its bundle, oldest first, the last the one it signs
    with). Pure."""
    if not global_roots:
        return "", set()
    wanted = {root_pin(r.public_bytes(serialization.Encoding.DER)) for r in global_roots}
    signing = root_pin(global_roots[-1].public_bytes(serialization.Encoding.DER))
    inter = ca.active.intermediate_certificate
    life = inter.not_valid_after_utc - inter.not_valid_before_utc
    reason = ""
    if _pin(ca.active) != signing:
        reason = "root"
    elif inter.not_valid_after_utc - now < life / 3:
        reason = "age"
    retire = {
        _pin(c)
        for c, r in ca.entries
        if c is not ca.active and _pin(c) not in wanted and (r is None or r > now)
    }
    return reason, retire


def _pin(ca: CertificateAuthority) -> str:
    return root_pin(ca.root_certificate.public_bytes(serialization.Encoding.DER))


def _digest(config: ZoneConfig, zone: str) -> str:
    what = {
        "resources": [r.to_dict() for r in config.resources],
        "zones": [z.to_json() | {"generation": 0} for z in config.zones if z.zone != zone],
        "trust_bundle": config.trust_bundle,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
