"""The web console (controlplane/console): its pages from a registry and a report
book filled directly (views.py, pure), sessions, CSRF and the login limit
(security.py, pure), and the console mounted on the control plane's aiohttp
application, driven by aiohttp's test client on loopback: no session, wrong
token, login, cookie flags, cross-site posts, security headers, escaping."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.controlplane.api import ControlPlane, ControlPlaneConfig
from meshnode.controlplane.console import Console, security, views
from meshnode.controlplane.console.web import SECURITY_HEADERS, SESSION_COOKIE
from meshnode.controlplane.registry import NodeRecord, Registry, WorkloadRecord
from meshnode.controlplane.reports import STALE_AFTER, ReportBook
from meshnode.controlplane.store import open_store
from meshnode.core.contracts.report import EndpointHealth, NodeReport, TrafficEdge
from meshnode.core.contracts.zone import ZoneService, ZoneState
from meshnode.core.resources import parse_documents, resources_to_json

TD = "cluster.local"
NOW = 1_800_000_000.0
TOKEN = "s3cret-admin-token"
EVIL = "<script>alert('x')</script>"
RESOURCES = """
kind: IdentityGrant
metadata: {name: web-nodes}
spec: {nodes: [node1, node2], identities: [default/*]}
---
kind: MeshConfig
metadata: {name: default}
spec: {authorization: {default_action: ALLOW}, dns: {domain: mesh.internal}}
"""


# Validation would refuse this principal; the page must be safe even when a value
# is not what validation promises (the registry takes the document as it is).
EVIL_POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "evil", "namespace": "default"},
    "spec": {"action": "DENY", "rules": [{"from": {"principals": [f"spiffe://{TD}/{EVIL}"]}}]},
}


def _fill(r: Registry) -> None:
    r.apply_resources(resources_to_json(parse_documents(RESOURCES)))
    r.apply_resources([EVIL_POLICY])
    r.put_node(NodeRecord("node1", "zone-a", "198.18.0.11"))
    r.put_node(NodeRecord("node2", "zone-b", "198.18.0.12"))
    r.put_node(NodeRecord("node3", "zone-a", "198.18.0.13"))
    r.register_workload(WorkloadRecord("node1", "api-1", "default", "api", "api", 8080))
    r.register_workload(WorkloadRecord("node2", "api-2", "default", "api", "api", 8080))
    r.register_workload(WorkloadRecord("node2", "web-1", "default", "web", "web", 80))


def registry() -> Registry:
    r = Registry()
    r.run(1, _fill)
    return r


def report(node: str, **kw: Any) -> NodeReport:
    base: dict[str, Any] = dict(
        node=node,
        agent_ready=True,
        ztunnel_ready=True,
        config_revision=1,
        cert_not_after=NOW + 12 * 3600,
        bpf_programs=("connect4", "sendmsg4"),
        endpoints=(),
        edges=(),
        agent_version="0.1.0",
    )
    base.update(kw)
    return NodeReport(**base)


def spiffe(sa: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{sa}"


def book() -> ReportBook:
    """node1 and node2 report; node3 never did. node2's balancer ejected api-1."""
    b = ReportBook(min_interval=0)
    api1, api2 = "198.18.0.11:8080", "198.18.0.12:8080"
    edge = TrafficEdge(spiffe("web"), spiffe("api"), True, 100, 1, 1)
    b.put(
        "node1",
        report("node1", endpoints=(EndpointHealth("default/api", api1, "node1", False, 1.5),)),
        NOW - 20,
    )
    b.put(
        "node2",
        report(
            "node2",
            endpoints=(
                EndpointHealth("default/api", api1, "node1", True, 80.0),
                EndpointHealth("default/api", api2, "node2", False, 2.5),
            ),
            edges=(edge,),
        ),
        NOW - 15,
    )
    b.put(
        "node2",
        report(
            "node2",
            endpoints=b.get("node2").report.endpoints,  # type: ignore[union-attr]
            edges=(TrafficEdge(spiffe("web"), spiffe("api"), True, 150, 1, 1),),
        ),
        NOW - 5,
    )
    return b


# --- views (pure) --------------------------------------------------------------------


def test_nodes_show_reports_and_stale_flags() -> None:
    week = 7 * 86400.0  # certificates of a week: warned 24 h before they end
    rows = {n["name"]: n for n in views.nodes(registry(), book(), NOW, week)}
    assert set(rows) == {"node1", "node2", "node3"}
    assert rows["node1"]["zone"] == "zone-a" and rows["node1"]["address"] == "198.18.0.11"
    assert rows["node1"]["agent_version"] == "0.1.0" and not rows["node1"]["stale"]
    assert rows["node1"]["last_report"] == "20s ago" and rows["node1"]["cert_warning"]
    # with 24 h certificates, 12 h left is on time (renewed at half-life); 9 h is late
    day = {n["name"]: n for n in views.nodes(registry(), book(), NOW, cert_ttl=86400)}
    assert not day["node1"]["cert_warning"]
    late = {n["name"]: n for n in views.nodes(registry(), book(), NOW + 3 * 3600, 86400)}
    assert late["node1"]["cert_warning"]
    assert rows["node3"]["stale"] and rows["node3"]["last_report"] == "never"
    later = {n["name"]: n for n in views.nodes(registry(), book(), NOW + STALE_AFTER + 1)}
    assert later["node1"]["stale"] and later["node2"]["stale"]


def test_services_show_dns_and_endpoint_health_as_the_balancers_see_it() -> None:
    rows = {s["key"]: s for s in views.services(registry(), book(), NOW)}
    api = rows["default/api"]
    assert api["dns"] == "api.default.mesh.internal" and api["vip"]
    eps = {e["address"]: e for e in api["endpoints"]}
    assert eps["198.18.0.11:8080"]["state"] == "ejected"
    assert eps["198.18.0.11:8080"]["health"] == "ejected by 1 of 2 reporting nodes"
    assert eps["198.18.0.11:8080"]["ejected_by"] == ["node2"]
    assert eps["198.18.0.12:8080"]["state"] == "healthy"
    assert rows["default/web"]["endpoints"][0]["state"] == "unknown"  # nobody balances to it
    # without any report book, health is unknown rather than "healthy"
    none = {s["key"]: s for s in views.services(registry(), None, NOW)}
    assert none["default/api"]["endpoints"][0]["state"] == "unknown"


def test_overview_lists_what_is_wrong() -> None:
    roots = [views.Root("ab" * 32, NOW + 3600)]
    data = views.overview(registry(), book(), NOW, roots, TD, cert_ttl=7 * 86400)
    wrong = " | ".join(p["what"] for p in data["problems"])
    assert "node node3 has never reported" in wrong
    assert "endpoint 198.18.0.11:8080 (api-1 on node1) of default/api" in wrong
    assert "certificate of node node1 expires in 12h 0m" in wrong
    assert "CA root abab" in wrong
    c = data["counts"]
    assert (c["nodes"], c["reporting"], c["stale"], c["services"], c["ejected"]) == (3, 2, 1, 2, 1)
    later = views.overview(registry(), book(), NOW + STALE_AFTER + 1, [], TD)
    assert "node node1 is stale" in " | ".join(p["what"] for p in later["problems"])


def test_graph_edges_with_rates_and_mtls() -> None:
    g = views.graph(registry(), book(), NOW, TD)
    (edge,) = g["edges"]
    assert (edge["source"], edge["destination"]) == ("default/web", "default/api")
    assert edge["mtls"] and edge["connections"] == 150 and edge["rate"] == 5.0  # 50 in 10 s
    assert len(g["vertices"]) == 2
    b = book()
    b.put(
        "node1",
        report("node1", edges=(TrafficEdge(spiffe("web"), spiffe("api"), False, 7, 0, 0),)),
        NOW,
    )
    (mixed,) = views.graph(registry(), b, NOW, TD)["edges"]
    assert not mixed["mtls"] and mixed["connections"] == 157
    assert views.graph(registry(), None, NOW, TD)["edges"] == []


def test_identities_and_policies() -> None:
    data = views.identities(registry(), TD)
    assert [g["name"] for g in data["grants"]] == ["web-nodes"]
    api = next(i for i in data["identities"] if i["identity"] == "default/api")
    assert api["spiffe"] == spiffe("api")
    assert {(h["node"], h["grant"]) for h in api["hosts"]} == {
        ("node1", "web-nodes"),
        ("node2", "web-nodes"),
    }
    kinds = [p["kind"] for p in views.policies(registry())]
    assert kinds == ["AuthorizationPolicy", "MeshConfig"]  # grants are on the other page


# --- security (pure) ----------------------------------------------------------------


def test_sessions_expire_when_idle_and_absolutely() -> None:
    s = security.Sessions(idle=10, absolute=100)
    sid, session = s.create(0)
    assert s.get(sid, 5) is session and s.get("nope", 5) is None and s.get(None, 5) is None
    assert s.get(sid, 14) is session  # seen at 5: idle for 9 s
    assert s.get(sid, 30) is None  # idle for 16 s
    sid, _ = s.create(0)
    for t in range(5, 100, 5):
        assert s.get(sid, t) is not None
    assert s.get(sid, 101) is None  # busy, but past the absolute limit
    sid, _ = s.create(0)
    s.end(sid)
    assert s.get(sid, 1) is None


def test_sessions_are_bounded() -> None:
    s = security.Sessions(limit=3)
    ids = [s.create(float(i))[0] for i in range(5)]
    assert len(s) == 3 and s.get(ids[0], 5) is None and s.get(ids[4], 5) is not None


def test_same_origin() -> None:
    own = "https://cp:15012"
    assert security.same_origin(own, "same-origin", own) is None
    assert security.same_origin(None, None, own) is None  # the CSRF token decides
    assert "another site" in str(security.same_origin(own, "cross-site", own))
    assert "not this console" in str(security.same_origin("https://evil", None, own))
    assert security.same_origin("null", None, own) is not None  # a data: or sandboxed page
    # Referrer-Policy: no-referrer makes a browser send Origin: null on its own posts
    assert security.same_origin("null", "same-origin", own) is None
    assert security.same_origin("https://evil", "same-origin", own) is not None


def test_failed_logins_are_limited_per_client_and_in_total() -> None:
    f = security.FailedLogins(per_client=3, total=5, window=60)
    for i in range(3):
        assert f.retry_after("a", i) == 0
        f.failed("a", i)
    assert f.retry_after("a", 3) == pytest.approx(57)
    assert f.retry_after("b", 3) == 0
    f.failed("b", 3)
    f.failed("c", 4)
    assert f.retry_after("d", 5) > 0  # 5 failures in all
    assert f.retry_after("a", 61) == 0


# --- the console over HTTP ----------------------------------------------------------


class Browser:
    """A test client that keeps its cookies by hand (they are Secure, and the test
    server speaks plain HTTP) and sends same-origin headers like a browser."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}
        self.origin = str(client.make_url("")).rstrip("/")

    async def request(
        self, method: str, path: str, site: str | None = "same-origin", **kw: Any
    ) -> tuple[aiohttp.ClientResponse, str]:
        headers = dict(kw.pop("headers", {}))
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if method == "POST" and site is not None:
            headers.setdefault("Origin", self.origin)
            headers.setdefault("Sec-Fetch-Site", site)
        resp = await self.client.request(method, path, headers=headers, allow_redirects=False, **kw)
        text = await resp.text()
        for name, morsel in resp.cookies.items():
            if morsel["expires"] or morsel["max-age"] == "0" or not morsel.value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = morsel.value
        return resp, text

    async def login_form(self) -> str:
        resp, text = await self.request("GET", "/ui/login")
        assert resp.status == 200
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        assert found
        return found.group(1)

    async def login(self, token: str = TOKEN, **kw: Any) -> tuple[aiohttp.ClientResponse, str]:
        csrf = await self.login_form()
        return await self.request("POST", "/ui/login", data={"csrf": csrf, "token": token}, **kw)


@asynccontextmanager
async def console(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, Browser]]:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    cp = ControlPlane(store, ControlPlaneConfig(trust_domain=TD, data_dir=tmp_path / "data"))
    cp.admin_token = TOKEN
    await asyncio.to_thread(store.mutate, lambda tx, r, rev: _fill(r))
    await cp.cache.refresh()
    for name, received in book().all().items():
        cp.reports.put(name, received.report, time.time() - 1)
    client: TestClient[Any, Any] = TestClient(
        TestServer(cp.application()), cookie_jar=aiohttp.DummyCookieJar()
    )
    await client.start_server()
    try:
        yield cp, Browser(client)
    finally:
        await client.close()
        store.close()


def run(tmp_path: Path, body: Callable[[ControlPlane, Browser], Awaitable[None]]) -> None:
    async def main() -> None:
        async with console(tmp_path) as (cp, browser):
            await body(cp, browser)

    asyncio.run(main())


PAGES = [
    "/ui/",
    "/ui/nodes",
    "/ui/services",
    "/ui/identities",
    "/ui/policies",
    "/ui/graph",
    "/ui/zones",
]


def test_no_session_redirects_pages_to_login(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        for path in [*PAGES, "/ui/no-such-page"]:
            resp, _ = await b.request("GET", path)
            assert resp.status == 303 and resp.headers["Location"] == "/ui/login", path
        resp, _ = await b.request("POST", "/ui/logout", data={"csrf": "x"})
        assert resp.status == 401
        resp, _ = await b.request("GET", "/ui")
        assert resp.status == 301 and resp.headers["Location"] == "/ui/"
        # the login page and the assets need no session
        resp, _ = await b.request("GET", "/ui/static/console.css")
        assert resp.status == 200 and resp.content_type == "text/css"
        resp, _ = await b.request("GET", "/ui/static/..%2Fweb.py")
        assert resp.status == 404
        resp, _ = await b.request("GET", "/ui/login")
        assert resp.status == 200

    run(tmp_path, body)


def test_wrong_token_is_refused_and_failures_are_limited(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        resp, text = await b.login("not-the-token")
        assert resp.status == 401 and "wrong admin token" in text
        assert SESSION_COOKIE not in b.cookies
        resp, _ = await b.request("GET", "/ui/")
        assert resp.status == 303
        for _ in range(4):
            await b.login("still-wrong")
        resp, text = await b.login(TOKEN)  # even the right token waits now
        assert resp.status == 429 and "too many failed logins" in text
        assert int(resp.headers["Retry-After"]) > 0

    run(tmp_path, body)


def test_login_sets_a_locked_down_cookie_and_shows_every_page(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        resp, _ = await b.login()
        assert resp.status == 303 and resp.headers["Location"] == "/ui/"
        set_cookie = next(
            h for h in resp.headers.getall("Set-Cookie") if h.startswith(SESSION_COOKIE)
        )
        flags = {f.strip().lower() for f in set_cookie.split(";")[1:]}
        assert {"secure", "httponly", "samesite=strict", "path=/ui/"} <= flags
        sid = b.cookies[SESSION_COOKIE]
        assert len(sid) >= 40 and TOKEN not in set_cookie
        for path in PAGES:
            resp, text = await b.request("GET", path)
            assert resp.status == 200, (path, text)
            assert 'id="logout"' in text
        _, text = await b.request("GET", "/ui/nodes")
        assert all(f'id="node-{n}"' in text for n in ("node1", "node2", "node3"))
        _, text = await b.request("GET", "/ui/services")
        assert "api.default.mesh.internal" in text and "ejected by 1 of 2 reporting nodes" in text
        _, text = await b.request("GET", "/ui/graph")
        assert 'data-source="default/web" data-destination="default/api"' in text
        assert 'data-mtls="yes"' in text and 'aria-label="mTLS"' in text
        _, text = await b.request("GET", "/ui/")
        assert "node node3 has never reported" in text
        # the API next door still wants its bearer token, not the console's cookie
        resp, _ = await b.request("GET", "/v1/admin/nodes")
        assert resp.status == 401

    run(tmp_path, body)


def test_logout_needs_the_session_csrf_token_and_ends_the_session(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        await b.login()
        _, text = await b.request("GET", "/ui/")
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        assert found
        resp, _ = await b.request("POST", "/ui/logout", data={"csrf": "forged"})
        assert resp.status == 403
        resp, _ = await b.request("POST", "/ui/logout", data={})
        assert resp.status == 403
        resp, _ = await b.request(
            "POST", "/ui/logout", data={"csrf": found.group(1)}, headers={"Origin": "https://evil"}
        )
        assert resp.status == 403
        sid = b.cookies[SESSION_COOKIE]
        resp, _ = await b.request("POST", "/ui/logout", data={"csrf": found.group(1)})
        assert resp.status == 303 and resp.headers["Location"] == "/ui/login"
        assert SESSION_COOKIE not in b.cookies
        b.cookies[SESSION_COOKIE] = sid  # the old cookie is worth nothing now
        resp, _ = await b.request("GET", "/ui/")
        assert resp.status == 303

    run(tmp_path, body)


@pytest.mark.parametrize(
    "headers, site, why",
    [
        ({"Origin": "https://evil.example"}, "same-origin", "not this console"),
        ({}, "cross-site", "another site"),
        ({"Origin": "null"}, None, "not this console"),
    ],
)
def test_cross_site_login_post_is_refused(
    tmp_path: Path, headers: dict[str, str], site: str | None, why: str
) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        resp, text = await b.login(TOKEN, headers=headers, site=site)
        assert resp.status == 403 and why in text
        assert SESSION_COOKIE not in b.cookies

    run(tmp_path, body)


def test_login_post_without_a_valid_csrf_token_is_refused(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        resp, text = await b.request("POST", "/ui/login", data={"token": TOKEN})
        assert resp.status == 403 and "CSRF" in text
        csrf = await b.login_form()
        b.cookies.clear()  # a form without the cookie it was made for (a forged post)
        resp, _ = await b.request("POST", "/ui/login", data={"csrf": csrf, "token": TOKEN})
        assert resp.status == 403
        await b.login_form()
        resp, _ = await b.request("POST", "/ui/login", data={"csrf": "0" * 64, "token": TOKEN})
        assert resp.status == 403
        # neither Origin nor Sec-Fetch-Site (an old browser): the token alone decides
        resp, _ = await b.login(TOKEN, site=None)
        assert resp.status == 303
        resp, _ = await b.request(
            "POST",
            "/ui/login",
            data="x" * 10000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert resp.status in (303, 413)  # logged in already: redirected first, or too large

    run(tmp_path, body)


def test_every_answer_carries_the_security_headers(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        answers = [await b.request("GET", "/ui/"), await b.request("GET", "/ui/login")]
        answers.append(await b.request("GET", "/ui/static/console.js"))
        answers.append(await b.login("wrong"))
        answers.append(await b.request("POST", "/ui/login", data={}, site="cross-site"))
        await b.login()
        answers += [await b.request("GET", p) for p in PAGES]
        answers.append(await b.request("GET", "/ui/nope"))
        for resp, _ in answers:
            for name, value in SECURITY_HEADERS.items():
                assert resp.headers.get(name) == value, (resp.url, name)
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
        _, text = await b.request("GET", "/ui/")
        assert "<script>" not in text and " style=" not in text  # nothing inline for the CSP
        assert re.search(r'<script src="/ui/static/console.js" defer></script>', text)

    run(tmp_path, body)


def test_a_policy_with_script_is_shown_escaped(tmp_path: Path) -> None:
    async def body(cp: ControlPlane, b: Browser) -> None:
        await b.login()
        resp, text = await b.request("GET", "/ui/policies")
        assert resp.status == 200
        assert EVIL not in text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text

    run(tmp_path, body)


# --- the zones page (multi-zone, docs/multizone.md) --------------------------------------

ZONE_GRANT = """
kind: IdentityGrant
metadata: {name: zone-a-api}
spec: {zones: [zone-a], identities: [default/api]}
"""


def _global(r: Registry) -> None:
    """A global control plane: zone-a published api (granted to it) and billing (not
    granted); zone-b published without an ingress; zone-c enrolled, published nothing."""
    r.apply_resources(resources_to_json(parse_documents(ZONE_GRANT)))
    for zone in ("zone-a", "zone-b", "zone-c"):
        r.enroll_zone(zone, NOW - 3600, "-----BEGIN CERTIFICATE-----")
    r.put_zone_state(
        ZoneState(
            "zone-a",
            7,
            "192.0.2.10",
            15443,
            (
                ZoneService("default", "api", 80, "api", 2),
                ZoneService("default", "billing", 80, "billing", 1),
            ),
        ),
        NOW - 42,
    )
    r.put_zone_state(ZoneState("zone-b", 3, "", 0), NOW - 600)


ZONE_B = ZoneState(
    "zone-b",
    12,
    "2001:db8::7",
    15443,
    (
        ZoneService("default", "api", 8080, "api", 3),
        ZoneService("default", "billing", 80, "billing", 1),
    ),
)
ZONE_C = ZoneState(
    "zone-c", 4, "192.0.2.30", 15443, (ZoneService("default", "api", 8080, "api", 1),)
)
SYNCED = {"revision": 31, "digest": "d", "synced_at": NOW - 90, "global": "https://global:15012"}
STATUS = {
    "connected": True,
    "last_contact": NOW - 3,
    "last_error": "",
    "published_generation": 9,
    "refused": [
        "default/web: zone zone-a is not granted identity default/web; at the global control "
        "plane, `meshnode apply` an IdentityGrant with zones: [zone-a] and that identity"
    ],
}


def _zone(r: Registry) -> None:
    """A zone control plane (zone-a): the fill above, and zones b and c from the global."""
    _fill(r)
    r.set_remote_zones([ZONE_B, ZONE_C], SYNCED)


def built(fill: Callable[[Registry], None]) -> Registry:
    r = Registry()
    r.run(1, fill)
    return r


def test_zones_view_of_a_global_control_plane() -> None:
    data = views.zones(built(_global), "global", "", None, NOW)
    assert data["mode"] == "global" and data["sync"] is None
    rows = {z["zone"]: z for z in data["rows"]}
    assert list(rows) == ["zone-a", "zone-b", "zone-c"]
    a = rows["zone-a"]
    assert (a["ingress"], a["services"], a["generation"]) == ("192.0.2.10:15443", 1, 7)
    assert a["last_sync"] == "42s ago" and a["enrolled"] == "1h 0m ago"
    ((refused,),) = [a["refused"]]
    assert refused["service"] == "default/billing"
    assert refused["reason"].startswith("zone zone-a is not granted identity default/billing")
    b = rows["zone-b"]
    assert (b["ingress"], b["services"], b["generation"], b["refused"]) == ("", 0, 3, [])
    assert b["published"] and b["last_sync"] == "10m ago"
    c = rows["zone-c"]
    assert not c["published"] and c["generation"] is None and c["last_sync"] == "never"
    # a grant applied later publishes what the zone sent before it
    r = built(_global)
    more = """
kind: IdentityGrant
metadata: {name: bill}
spec: {zones: [zone-a], identities: [default/billing]}
"""
    r.run(2, lambda r: r.apply_resources(resources_to_json(parse_documents(more))))
    a = views.zones(r, "global", "", None, NOW)["rows"][0]
    assert (a["services"], a["refused"]) == (2, [])


def test_zones_view_of_a_zone_control_plane() -> None:
    data = views.zones(built(_zone), "zone", "zone-a", STATUS, NOW)
    assert data["mode"] == "zone" and data["zone"] == "zone-a"
    s = data["sync"]
    assert s["running"] and s["connected"] and s["last_contact"] == "3s ago"
    assert (s["revision"], s["synced_at"], s["global"]) == (31, "1m ago", "https://global:15012")
    assert s["published_generation"] == 9 and s["last_error"] == ""
    assert [r["service"] for r in s["refused"]] == ["default/web"]
    assert s["refused"][0]["reason"].startswith("zone zone-a is not granted identity default/web")
    assert data["rows"] == [
        {"zone": "zone-b", "ingress": "[2001:db8::7]:15443", "services": 2, "generation": 12},
        {"zone": "zone-c", "ingress": "192.0.2.30:15443", "services": 1, "generation": 4},
    ]
    # no sync in this replica (yet), none taken from the global: said, not invented
    bare = views.zones(built(_fill), "zone", "zone-a", None, NOW)
    assert bare["rows"] == [] and not bare["sync"]["running"]
    assert bare["sync"]["connected"] is None and bare["sync"]["revision"] is None
    assert bare["sync"]["synced_at"] == "never"
    # a broken sync says why
    down = {**STATUS, "connected": False, "last_error": "the global answered 503"}
    s = views.zones(built(_zone), "zone", "zone-a", down, NOW)["sync"]
    assert s["connected"] is False and s["last_error"] == "the global answered 503"


def test_zones_view_of_a_single_control_plane() -> None:
    data = views.zones(registry(), "single", "", None, NOW)
    assert data == {"mode": "single", "zone": "", "rows": [], "sync": None}


def test_services_view_lists_the_other_zones_that_run_each_service() -> None:
    rows = {s["key"]: s for s in views.services(built(_zone), None, NOW)}
    api = rows["default/api"]
    assert len(api["endpoints"]) == 2  # this zone's own, by address
    assert api["remote"] == [
        {
            "zone": "zone-b",
            "ingress": "[2001:db8::7]:15443",
            "identity": "default/api",
            "port": 8080,
            "endpoints": 3,
        },
        {
            "zone": "zone-c",
            "ingress": "192.0.2.30:15443",
            "identity": "default/api",
            "port": 8080,
            "endpoints": 1,
        },
    ]
    billing = rows["default/billing"]  # only zone-b runs it: it has a VIP here too
    assert billing["vip"] and billing["endpoints"] == []
    assert [z["zone"] for z in billing["remote"]] == ["zone-b"]
    assert rows["default/web"]["remote"] == []


def test_policies_leave_out_the_internal_zone_rows() -> None:
    assert [p["kind"] for p in views.policies(built(_global))] == []
    kinds = [p["kind"] for p in views.policies(built(_zone))]
    assert kinds == ["AuthorizationPolicy", "MeshConfig"]
    data = views.overview(built(_zone), None, NOW, [], TD)
    assert data["counts"]["policies"] == 2


@asynccontextmanager
async def zone_console(
    tmp_path: Path,
    mode: str,
    fill: Callable[[Registry], None],
    status: dict[str, Any] | None = None,
) -> AsyncIterator[Browser]:
    """The console of a control plane in `mode`, as app.py would mount it with its
    mode, zone and sync status, over a store filled by `fill`."""
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    cp = ControlPlane(store, ControlPlaneConfig(trust_domain=TD, data_dir=tmp_path / "data"))
    await asyncio.to_thread(store.mutate, lambda tx, r, rev: fill(r))
    app = aiohttp.web.Application()
    Console(
        lambda: TOKEN,
        cp.cache,
        TD,
        lambda: cp.reports,
        clock=lambda: NOW,
        mode=mode,
        zone="zone-a" if mode == "zone" else "",
        sync_status=lambda: status,
    ).mount(app)
    client: TestClient[Any, Any] = TestClient(TestServer(app), cookie_jar=aiohttp.DummyCookieJar())
    await client.start_server()
    try:
        b = Browser(client)
        resp, _ = await b.login()
        assert resp.status == 303
        yield b
    finally:
        await client.close()
        store.close()


def zones_page(
    tmp_path: Path,
    mode: str,
    fill: Callable[[Registry], None],
    status: dict[str, Any] | None = None,
    path: str = "/ui/zones",
) -> str:
    async def main() -> str:
        async with zone_console(tmp_path, mode, fill, status) as b:
            resp, text = await b.request("GET", path)
            assert resp.status == 200, text
            for name, value in SECURITY_HEADERS.items():
                assert resp.headers.get(name) == value, name
            assert 'id="nav-zones"' in text
            return text

    return asyncio.run(main())


def cells(text: str, row_id: str) -> list[str]:
    """The text of each cell of the table row `row_id`, tags stripped."""
    found = re.search(rf'<tr id="{row_id}"[^>]*>(.*?)</tr>', text, re.S)
    assert found, row_id
    tds = re.findall(r"<td[^>]*>(.*?)</td>", found.group(1), re.S)
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", td)).strip() for td in tds]


def test_zones_page_of_a_global_control_plane(tmp_path: Path) -> None:
    text = zones_page(tmp_path, "global", _global)
    assert 'id="zones-single"' not in text and "<b>global</b>" in text
    a = cells(text, "zone-zone-a")
    assert a[:6] == ["zone-a", "192.0.2.10:15443", "1", "7", "42s ago", "1h 0m ago"]
    assert a[6].startswith("default/billing: zone zone-a is not granted identity default/billing")
    assert "IdentityGrant with zones: [zone-a]" in a[6]
    b = cells(text, "zone-zone-b")
    assert b[1].startswith("none") and b[2:5] == ["0", "3", "10m ago"] and b[6] == "nothing"
    assert cells(text, "zone-zone-c")[2:5] == [
        "-",
        "-",
        "never (enrolled, has published nothing yet)",
    ]


def test_zones_page_of_a_zone_control_plane(tmp_path: Path) -> None:
    text = zones_page(tmp_path, "zone", _zone, STATUS)
    assert "zone <b>zone-a</b>" in text
    assert cells(text, "zone-zone-b") == ["zone-b", "[2001:db8::7]:15443", "2", "12"]
    assert cells(text, "zone-zone-c") == ["zone-c", "192.0.2.30:15443", "1", "4"]
    assert re.search(r'id="sync-connected"><span class="badge good">connected</span>', text)
    assert re.search(
        r'id="sync-revision">31 <span class="muted">\(its content last changed here 1m ago', text
    )
    assert 'id="sync-error">none' in text
    refused = re.search(r'<table id="refused".*?</table>', text, re.S)
    assert refused and "<td>default/web</td>" in refused.group(0)


def test_zones_page_of_a_zone_whose_sync_is_down(tmp_path: Path) -> None:
    down = {**STATUS, "connected": False, "last_error": "the global answered 503", "refused": []}
    text = zones_page(tmp_path, "zone", _fill, down)
    assert '<span class="badge bad">not connected</span>' in text
    assert '<span class="error">the global answered 503</span>' in text
    assert 'id="sync-revision"><span class="warn">none yet</span>' in text
    assert 'id="refused-none"' in text and "no other zone publishes" in text


def test_zones_page_of_a_single_control_plane(tmp_path: Path) -> None:
    text = zones_page(tmp_path, "single", _fill)
    assert 'id="zones-single"' in text and "not part of a multi-zone mesh" in text
    assert "docs/multizone.md" in text and "--mode global" in text
    assert 'id="zones"' not in text


def test_zones_page_escapes_what_the_global_says(tmp_path: Path) -> None:
    """What the global sent (its refusals, its errors) is text from the wire."""
    hostile = {
        **STATUS,
        "last_error": f"the global answered 500: {EVIL}",
        "refused": [f"default/web: {EVIL}", f"{EVIL}: <img src=x onerror=alert(1)>"],
    }
    text = zones_page(tmp_path, "zone", _zone, hostile)
    assert EVIL not in text and "<img" not in text and "<script>" not in text
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert f'<span class="error">the global answered 500: {escaped}</span>' in text
    assert f"<td>default/web</td><td>{escaped}</td>" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text


def test_services_page_shows_the_other_zones(tmp_path: Path) -> None:
    text = zones_page(tmp_path, "zone", _zone, STATUS, path="/ui/services")
    api = re.search(r'<section class="service" id="service-default-api">.*?</section>', text, re.S)
    assert api
    assert re.findall(r'<tr class="remote-zone" data-zone="([^"]+)"', api.group(0)) == [
        "zone-b",
        "zone-c",
    ]
    assert "[2001:db8::7]:15443" in api.group(0)
    billing = re.search(
        r'<section class="service" id="service-default-billing">.*?</section>', text, re.S
    )
    assert billing and "no endpoints in this zone" in billing.group(0)
    assert 'data-zone="zone-b"' in billing.group(0)
    web = re.search(r'<section class="service" id="service-default-web">.*?</section>', text, re.S)
    assert web and "remote-zone" not in web.group(0)
