"""The control plane's read-only web console, under /ui/ of its TLS listener
(docs/console.md): server-rendered Jinja2 templates and one small script, shipped
as package data (templates/, static/); nothing is fetched from elsewhere.

security.py (sessions, CSRF, origin, login rate limit) and views.py (what each page
shows) are pure; web.py is the aiohttp shell around them.
"""

from .web import PREFIX, Console

__all__ = ["PREFIX", "Console"]
