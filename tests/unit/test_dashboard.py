"""GET /dashboard without a browser: the route with and without an API key, its headers, a policy whose
hashes are those of the page's own inline blocks, and a page that loads nothing from elsewhere,
builds no HTML from strings and cannot put a key in a URL. The page in Chromium: tests/e2e/test_dashboard_server.py."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from leanserve.cost.basis import resolve_price_basis
from leanserve.engine.async_engine import AsyncEngine
from leanserve.serve.api import ServerSettings, build_app
from leanserve.serve.auth import key_digest
from leanserve.serve.dashboard import content_security_policy, page
from tests.conftest import run_in_installed_copy
from tests.fake_engine import FakeEngine

KEY = "sk-unit-dashboard"


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.blocks: dict[str, list[str]] = {"script": [], "style": []}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.blocks:
            self._open = tag
            self.blocks[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.blocks[self._open][-1] += data


@pytest.fixture(scope="module")
def html() -> str:
    return page().body.decode("utf-8")


@pytest.fixture(scope="module")
def parsed(html) -> PageParser:
    p = PageParser()
    p.feed(html)
    return p


def _app(keys: tuple[str, ...] = ()):
    engine = AsyncEngine(FakeEngine(), max_queue=8)
    return build_app(engine, ServerSettings("fake-model", frozenset(key_digest(k) for k in keys),
                                            price_basis=resolve_price_basis(price_per_hour=3.6)))


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_policy_allows_exactly_the_page_s_own_inline_script_and_style(html, parsed):
    csp = dict(d.strip().split(" ", 1) for d in page().headers["Content-Security-Policy"].split(";"))
    assert len(parsed.blocks["script"]) == 1 and len(parsed.blocks["style"]) == 1
    assert csp["script-src"] == _sha256(parsed.blocks["script"][0])
    assert csp["style-src"] == _sha256(parsed.blocks["style"][0])
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["form-action"] == "'none'"
    assert csp["frame-ancestors"] == "'none'" and csp["trusted-types"] == "'none'"
    assert "unsafe" not in page().headers["Content-Security-Policy"]
    # an edited script gets another hash: nothing but the shipped text runs
    assert content_security_policy(html.replace("const POLL_MS", "const  POLL_MS")) != page().headers[
        "Content-Security-Policy"]
    with pytest.raises(ValueError):
        content_security_policy("<p>no script</p>")


def test_the_page_loads_nothing_from_elsewhere(html, parsed):
    assert not re.search(r"https?:|//[\w.-]+\.\w", html), "an absolute URL in the page"
    assert "url(" not in html and "@import" not in html
    for tag, attrs in parsed.tags:
        assert "src" not in attrs, (tag, attrs)  # every script and style is inline
        if "href" in attrs:
            assert (tag, attrs) == ("link", {"rel": "icon", "href": "data:,"}), (tag, attrs)
    script = parsed.blocks["script"][0]
    assert re.findall(r"\bfetch\(", script) == ["fetch("]  # one fetch, through get(path)
    paths = re.findall(r"\bget\((`[^`]*`|\"[^\"]*\")", script)
    assert sorted(p.strip('`"').split("?")[0] for p in paths) == ["/metrics", "/v1/cost"]


def test_the_page_builds_no_html_from_strings_and_keeps_the_key_out_of_urls(parsed):
    script = parsed.blocks["script"][0]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(",
                 "location", "localStorage", "document.cookie"):
        assert sink not in script, sink
    assert "textContent" in script and "sessionStorage" in script
    key_input = [a for t, a in parsed.tags if t == "input"]
    assert key_input == [{"id": "key", "type": "password", "autocomplete": "off", "spellcheck": "false",
                          "required": None}]  # no name: a field without one is never put in a query string
    assert ("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}) in parsed.tags


def test_the_route_is_open_and_the_data_stays_behind_the_key():
    with TestClient(_app((KEY,))) as client:
        r = client.get("/dashboard")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.content == page().body  # a static shell: no data, the same with or without a key
        for name, value in page().headers.items():
            assert r.headers[name] == value
        assert r.headers["cache-control"] == "no-store"
        assert KEY not in r.text and key_digest(KEY) not in r.text
        for path in ("/v1/cost", "/metrics"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        bad = client.post("/dashboard", json={})
        assert bad.status_code == 405 and bad.json()["error"]["type"] == "invalid_request_error"
        assert client.get("/dashboard/x").status_code == 401  # only the page itself is open


def test_the_route_without_a_key():
    with TestClient(_app()) as client:
        r = client.get("/dashboard?key=ignored")
        assert r.status_code == 200 and r.content == page().body
        assert client.get("/v1/cost?window=10").status_code == 200
        assert client.head("/dashboard").status_code == 405  # GET only, in OpenAI's error format
        assert "/dashboard" in client.get("/openapi.json").json()["paths"]


def test_an_installed_copy_serves_the_page(tmp_path):
    out = run_in_installed_copy(tmp_path, """
        from leanserve.serve.dashboard import page
        print(json.dumps({"size": len(page().body)}))
    """)
    assert out["size"] == len(page().body)
