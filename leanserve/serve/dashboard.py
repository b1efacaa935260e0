"""GET /dashboard: a live page of the server's throughput, load, cost and cache figures.

The page (``leanserve/data/dashboard.html``) is a static shell with no data and no secret in it, so
it is served without an API key. Its script polls ``/v1/cost`` and ``/metrics`` every 2 s, sending
``Authorization: Bearer <key>`` when it has a key: those stay behind the key like any other data
route. On a 401 the page asks for the key and keeps it in ``sessionStorage`` only (never in a URL).
Everything the server sends is shown through ``textContent``.

The page's inline script and style are allowed by their sha256 hashes in a Content-Security-Policy
that allows nothing else: no other script, style, frame, form target or connection beyond this
origin, and Trusted Types with no policy, so no HTML can ever be parsed from a string at run time.
What each figure is and where it comes from: docs/serving.md, "Dashboard".
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

PATH = "/dashboard"
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


@dataclass(frozen=True)
class Page:
    body: bytes
    headers: dict[str, str]


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(html: str) -> str:
    """The page's policy: its own inline <script> and <style> blocks by hash, fetches to this origin,
    and nothing else."""
    blocks: dict[str, list[str]] = {"script": [], "style": []}
    for tag, text in _INLINE.findall(html):
        blocks[tag].append(csp_hash(text))
    if not blocks["script"] or not blocks["style"]:
        raise ValueError("the dashboard page needs one inline <script> and one <style> block")
    return "; ".join((
        "default-src 'none'",
        "script-src " + " ".join(blocks["script"]),
        "style-src " + " ".join(blocks["style"]),
        "connect-src 'self'",
        "img-src data:",  # the empty favicon (<link rel=icon href="data:,">), so the browser asks for none
        "base-uri 'none'",
        "form-action 'none'",  # the key form is handled by the script, never submitted
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ))


@cache
def page() -> Page:
    html = resources.files("leanserve").joinpath("data/dashboard.html").read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    return Page(html.encode("utf-8"), headers)


def install_dashboard(app: FastAPI) -> None:
    """Register GET /dashboard. The path must also be open (serve/api.py ``OPEN_PATHS``): the page
    asks for the key itself."""

    @app.get(PATH, tags=["ops"], summary="live dashboard (HTML; its data comes from /v1/cost and /metrics)",
             response_class=Response, responses={200: {"content": {"text/html": {}}}})
    async def dashboard() -> Response:
        p = page()
        return Response(p.body, media_type="text/html; charset=utf-8", headers=p.headers)
