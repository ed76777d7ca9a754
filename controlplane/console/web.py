"""The console's aiohttp shell: routes under /ui/, the session and CSRF checks,
security headers, templates and static assets (package data, read at start).

The decisions are in security.py (sessions, tokens, origin, rate limit) and
views.py (what a page shows); this module reads requests, calls them and renders.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jinja2
from aiohttp import web

from meshnode.core.pki import root_pin

from . import views
from .security import FailedLogins, Session, Sessions, login_csrf, same_origin, token_matches

if TYPE_CHECKING:
    from meshnode.controlplane.api.state import StateCache
    from meshnode.controlplane.reports import ReportBook

__all__ = ["PREFIX", "Console", "SECURITY_HEADERS", "SESSION_COOKIE"]

log = logging.getLogger("meshnode.controlplane.console")

PREFIX = "/ui"
SESSION_COOKIE = "meshnode_console"
LOGIN_COOKIE = "meshnode_login"  # the pre-session cookie the login form's token derives from
MAX_FORM = 4096  # bytes of a login or logout form
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
PAGES = (
    ("overview", "", "Overview"),
    ("nodes", "nodes", "Nodes"),
    ("services", "services", "Services"),
    ("identities", "identities", "Identities"),
    ("policies", "policies", "Policies"),
    ("graph", "graph", "Graph"),
    ("zones", "zones", "Zones"),
)
_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Console:
    """The read-only console. `admin_token` and `reports` are asked at each use
    (the token is read when the control plane starts; reports may come later).
    `mode` and `zone` are the control plane's multi-zone mode ("single", "global"
    or "zone") and, in mode zone, its zone; `sync_status` is asked at each use for
    its zone sync's status (``ZoneSync.status.to_json()``; None without one)."""

    def __init__(
        self,
        admin_token: Callable[[], str],
        cache: StateCache,
        trust_domain: str,
        reports: Callable[[], ReportBook | None] = lambda: None,
        cert_ttl: float = views.CERT_WARNING,
        clock: Callable[[], float] = time.time,
        *,
        mode: str = "single",
        zone: str = "",
        sync_status: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self._admin_token = admin_token
        self._cache = cache
        self._trust_domain = trust_domain
        self._reports = reports
        self._cert_ttl = cert_ttl
        self._clock = clock
        self._mode = mode
        self._zone = zone
        self._sync_status = sync_status
        self.sessions = Sessions()
        self.failed = FailedLogins()
        self._key = secrets.token_bytes(32)  # for login CSRF tokens; this process only
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("meshnode.controlplane.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._static = _load_static()

    # -- the application -------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self.overview)
        for page, path, _ in PAGES[1:]:
            app.router.add_get(f"/{path}", getattr(self, page))
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/static/{name}", self.static)
        return app

    def mount(self, app: web.Application) -> None:
        """Serve the console under /ui/ of `app` (and /ui -> /ui/)."""
        app.add_subapp(PREFIX, self.app())

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Security headers on every answer; a session for everything but the login
        page and the static assets; errors as pages."""
        try:
            response = await self._checked(request, handler)
        except web.HTTPException as exc:
            if exc.status >= 400:
                response = self._error(exc.status, exc.reason, exc.text or "")
            else:  # a redirect
                response = _redirect(exc.headers.get("Location", f"{PREFIX}/login"), exc.status)
        except Exception:
            log.exception("console: internal error on %s %s", request.method, request.path)
            response = self._error(500, "Internal error", "see the control plane log")
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == PREFIX:
            raise web.HTTPMovedPermanently(f"{PREFIX}/")
        public = request.path in (f"{PREFIX}/login",) or request.path.startswith(
            f"{PREFIX}/static/"
        )
        if not public:
            session = self.sessions.get(request.cookies.get(SESSION_COOKIE), self._clock())
            if session is None:
                if request.method in ("GET", "HEAD"):
                    raise web.HTTPSeeOther(f"{PREFIX}/login")
                raise web.HTTPUnauthorized(text="log in first: /ui/login")
        return await handler(request)

    # -- pages -------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        roots = []
        if self._cache.ca is not None:
            for ca in self._cache.ca.trusted():
                cert = ca.root_certificate
                roots.append(views.Root(root_pin(cert), cert.not_valid_after_utc.timestamp()))
        data = views.overview(
            self._cache.registry,
            self._reports(),
            self._clock(),
            roots,
            self._trust_domain,
            self._cert_ttl,
        )
        return self._page(request, "overview", data=data)

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        rows = views.nodes(self._cache.registry, self._reports(), self._clock(), self._cert_ttl)
        return self._page(request, "nodes", rows=rows)

    async def services(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        rows = views.services(self._cache.registry, self._reports(), self._clock())
        return self._page(request, "services", rows=rows)

    async def identities(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        data = views.identities(self._cache.registry, self._trust_domain)
        return self._page(request, "identities", data=data)

    async def policies(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        return self._page(request, "policies", rows=views.policies(self._cache.registry))

    async def graph(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        data = views.graph(self._cache.registry, self._reports(), self._clock(), self._trust_domain)
        return self._page(request, "graph", data=data)

    async def zones(self, request: web.Request) -> web.StreamResponse:
        await self._cache.refresh()
        data = views.zones(
            self._cache.registry, self._mode, self._zone, self._sync_status(), self._clock()
        )
        return self._page(request, "zones", data=data)

    async def static(self, request: web.Request) -> web.StreamResponse:
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound(text="no such asset")
        body, content_type = found
        return web.Response(body=body, content_type=content_type)

    # -- login and logout ------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.get(request.cookies.get(SESSION_COOKIE), self._clock()) is not None:
            raise web.HTTPSeeOther(f"{PREFIX}/")
        return self._login_page(request, 200, "")

    async def login(self, request: web.Request) -> web.StreamResponse:
        self._same_origin(request)
        form = await _form(request)
        presession = request.cookies.get(LOGIN_COOKIE, "")
        if not presession or not token_matches(form.get("csrf"), login_csrf(self._key, presession)):
            raise web.HTTPForbidden(
                text="the login form's CSRF token is missing or wrong: reload /ui/login "
                "and log in from there (cookies must be enabled)"
            )
        client, now = request.remote or "?", self._clock()
        wait = self.failed.retry_after(client, now)
        if wait > 0:
            response = self._login_page(
                request, 429, f"too many failed logins; try again in {int(wait) + 1} s"
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        if not self._token_ok(form.get("token", "")):
            self.failed.failed(client, now)
            log.info("console: failed login from %s", client)
            return self._login_page(
                request,
                401,
                "wrong admin token. It is in the file admin-token in the control "
                "plane's data directory (the one `meshnode` admin commands use).",
            )
        sid, _ = self.sessions.create(now)
        log.info("console: login from %s", client)
        response = _redirect(f"{PREFIX}/")
        _set_cookie(response, SESSION_COOKIE, sid)
        response.del_cookie(LOGIN_COOKIE, path=f"{PREFIX}/")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        self._same_origin(request)
        form = await _form(request)
        if not token_matches(form.get("csrf"), session.csrf):
            raise web.HTTPForbidden(text="the logout form's CSRF token is missing or wrong")
        self.sessions.end(request.cookies.get(SESSION_COOKIE))
        response = _redirect(f"{PREFIX}/login")
        response.del_cookie(SESSION_COOKIE, path=f"{PREFIX}/")
        return response

    def _session(self, request: web.Request) -> Session:
        """The request's session (the guard let it in only with one)."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), self._clock())
        if session is None:  # ended since the guard looked, by another request
            raise web.HTTPSeeOther(f"{PREFIX}/login")
        return session

    def _token_ok(self, presented: str) -> bool:
        expected = self._admin_token()
        if not presented or not expected:
            return False
        # Digests, so that the comparison's time tells nothing of the length either.
        return hmac.compare_digest(
            hashlib.sha256(presented.strip().encode()).digest(),
            hashlib.sha256(expected.encode()).digest(),
        )

    def _same_origin(self, request: web.Request) -> None:
        why = same_origin(
            request.headers.get("Origin"),
            request.headers.get("Sec-Fetch-Site"),
            f"{request.scheme}://{request.host}",
        )
        if why is not None:
            log.info("console: refused a cross-site %s %s: %s", request.method, request.path, why)
            raise web.HTTPForbidden(text=f"refused: {why}")

    # -- rendering ---------------------------------------------------------------------

    def _render(self, template: str, code: int, **context: Any) -> web.Response:
        values = {"prefix": PREFIX, "pages": PAGES, "page": "", "session": None, **context}
        body = self._env.get_template(template).render(values)
        return web.Response(status=code, text=body, content_type="text/html", charset="utf-8")

    def _page(self, request: web.Request, page: str, **context: Any) -> web.Response:
        return self._render(
            f"{page}.html",
            200,
            **{
                **context,
                "page": page,
                "session": self._session(request),
                "revision": self._cache.revision,
                "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._clock())),
            },
        )

    def _login_page(self, request: web.Request, status: int, error: str) -> web.Response:
        presession = request.cookies.get(LOGIN_COOKIE, "")
        if not (20 <= len(presession) <= 100):
            presession = secrets.token_urlsafe(32)
        response = self._render(
            "login.html", status, error=error, csrf=login_csrf(self._key, presession)
        )
        _set_cookie(response, LOGIN_COOKIE, presession)
        return response

    def _error(self, status: int, reason: str, text: str) -> web.Response:
        return self._render("error.html", status, status=status, reason=reason, text=text)


def _redirect(location: str, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": location})


def _set_cookie(response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(
        name, value, path=f"{PREFIX}/", secure=True, httponly=True, samesite="Strict"
    )


async def _form(request: web.Request) -> dict[str, str]:
    """A small urlencoded form (at most MAX_FORM bytes): name -> first value."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPBadRequest(text="expected a form (application/x-www-form-urlencoded)")
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise web.HTTPRequestEntityTooLarge(MAX_FORM, request.content_length)
    body = bytearray()
    async for chunk in request.content.iter_chunked(1024):
        body += chunk
        if len(body) > MAX_FORM:
            raise web.HTTPRequestEntityTooLarge(MAX_FORM, len(body))
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return {k: v[0] for k, v in fields.items()}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """The assets shipped in static/, by file name (nothing else is ever served)."""
    out = {}
    root = importlib.resources.files("meshnode.controlplane.console").joinpath("static")
    for entry in root.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out
