"""GET /dashboard in headless Chromium against the real server: the figures render, change under load
sent with the official openai client, per model behind the gateway, on a 390 px wide phone screen
with no horizontal scroll, no console error and no request that failed or left the server. With an
API key: the page holds no data until the key is typed into its form, the key stays out of the HTML,
the URL and every request line, and a model name written as HTML is shown as text.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
ending in NUL on file descriptors 3 and 4), so no websocket or browser-automation package is needed.
Skips only when no Chromium is installed (``apt-get install -y chromium``; scripts/test does).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.e2e.conftest import start_server
from tests.e2e.test_bench_report_html import CHROMIUM

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: apt-get install -y chromium")]

KEY = "sk-dash-3f9c27e1b5"
HOSTILE_NAME = '<img src="/x-injected" onerror="alert(1)">small'  # served model name written as HTML
DASH = "\u2013"


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe; every event is kept for the checks."""

    def __init__(self, profile: Path, log: Path) -> None:
        to_r, to_w = os.pipe()  # we write commands, Chromium reads them on fd 3
        from_r, from_w = os.pipe()  # Chromium writes answers and events on fd 4

        def child_fds() -> None:  # runs in the child: put the pipe ends on 3 and 4 whatever they were
            r = fcntl.fcntl(to_r, fcntl.F_DUPFD_CLOEXEC, 10)
            w = fcntl.fcntl(from_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        with log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=False,
                                         preexec_fn=child_fds)
        os.close(to_r)
        os.close(from_w)
        self.out, self.inp = to_w, from_r
        self.next_id = 0
        self.answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self.inp, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self.cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self.answers[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self.cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.answers, timeout):
                raise TimeoutError(f"no answer to {method} in {timeout} s")
            answer = self.answers.pop(mid)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.out)
        self.reader.join(5)  # Chromium gone: its end of the pipe is closed, the reader sees the end
        if not self.reader.is_alive():
            os.close(self.inp)


class Tab:
    """One tab (its own sessionStorage) at a phone's size: 390 x 844 CSS pixels, a touch screen."""

    def __init__(self, browser: Browser) -> None:
        self.b = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.sid = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2,
                                                         "mobile": True})
        self.send("Emulation.setFocusEmulationEnabled", {"enabled": True})  # focus() works in a headless tab

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.b.send(method, params, self.sid)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", what=url)

    def events(self, *methods: str) -> list[dict]:
        with self.b.cond:
            return [e["params"] for e in self.b.events if e.get("sessionId") == self.sid and e["method"] in methods]

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str = ""):
        """Poll until ``expression`` is truthy (an exception, e.g. while a page loads, counts as false)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                status = self.eval("document.getElementById('status')?.textContent")
                raise AssertionError(f"not seen in {timeout:.0f} s: {what or expression}; status line: {status!r}")
            time.sleep(0.2)

    def figure(self, key: str, root: str = "#total") -> str:
        return self.eval(f"document.querySelector({json.dumps(root)} + ' [data-k={key}]').textContent")

    def model_figures(self) -> dict[str, dict[str, str]]:
        return self.eval("""Object.fromEntries([...document.querySelectorAll('#model-list article')].map(a =>
            [a.querySelector('.name').textContent,
             Object.fromEntries([...a.querySelectorAll('[data-k]')].map(e => [e.dataset.k, e.textContent]))]))""")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and error log entries (CSP violations and failed loads)."""
        out = [f"exception: {e['exceptionDetails']}" for e in self.events("Runtime.exceptionThrown")]
        out += [f"console.{e['type']}: {e['args']}" for e in self.events("Runtime.consoleAPICalled")
                if e["type"] in ("error", "assert")]
        out += [f"log {e['entry']['source']}: {e['entry']['text']} ({e['entry'].get('url')})"
                for e in self.events("Log.entryAdded") if e["entry"]["level"] == "error"]
        return out

    def requests(self) -> list[str]:
        return [e["request"]["url"] for e in self.events("Network.requestWillBeSent")]

    def statuses(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for e in self.events("Network.responseReceived"):
            out.setdefault(urlsplit(e["response"]["url"]).path, set()).add(e["response"]["status"])
        return out

    def screenshot(self, path: Path) -> None:
        """The whole page, at the phone's width."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def assert_phone_fit(tab: Tab) -> None:
    width, inner = tab.eval("[document.documentElement.scrollWidth, window.innerWidth]")
    assert inner == 390, inner  # the viewport meta makes the layout viewport the phone's width
    assert width <= inner, f"the page scrolls sideways: {width} px wide in a {inner} px viewport"


def assert_stays_home(tab: Tab, base_url: str) -> None:
    """Every request went to this server, and none failed."""
    away = [u for u in tab.requests() if not u.startswith(base_url + "/") and not u.startswith("data:")]
    assert not away, away
    failed = [(e.get("errorText"), e.get("blockedReason")) for e in tab.events("Network.loadingFailed")]
    assert not failed, failed


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    b = Browser(tmp / "profile", tmp / "chromium.log")
    yield b
    b.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """Both built-in models behind one server, with the response cache, no API key."""
    tmp = tmp_path_factory.mktemp("dash-gateway")
    s = start_server(tmp, "--response-cache", "--cache-path", str(tmp / "cache.sqlite"),
                     model=["smollm2-135m", "gemma3-270m"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """One model under a name written as HTML, behind an API key."""
    s = start_server(tmp_path_factory.mktemp("dash-keyed"), "--served-model-name", HOSTILE_NAME, api_key=KEY)
    yield s
    s.stop()


def shot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("LEANSERVE_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_dashboard_figures_render_and_follow_load_per_model_on_a_phone(gateway, browser, tmp_path):
    tab = Tab(browser)
    tab.goto(gateway.base_url + "/dashboard")
    tab.wait_for("!document.getElementById('total').hidden && document.querySelectorAll('#model-list article')"
                 ".length === 2", what="the figures and both models' cards")
    assert tab.eval("document.getElementById('login').hidden")  # no key on this server: no prompt
    for key in ("out_tps", "total_tps", "running", "waiting", "util", "idle", "requests", "kv"):
        assert tab.figure(key) != DASH, key  # rendered ($/Mtok and hit rates need a request first)
    assert number(tab.figure("requests")) == 0 and number(tab.figure("running")) == 0
    assert tab.eval("!document.querySelector('#total [data-rcache]').hidden")  # the server has a response cache
    assert set(tab.model_figures()) == {"smollm2-135m", "gemma3-270m"}
    assert_phone_fit(tab)

    # load: 4 concurrent completions of 200 tokens on one model; the page must see them run
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=120)

    def complete(i: int):
        return client.completions.create(model="smollm2-135m", prompt=f"Count to one hundred, attempt {i}:",
                                         max_tokens=200, temperature=0, extra_body={"ignore_eos": True})

    seen_running, seen_tps = 0.0, 0.0
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, i) for i in range(4)]
        while not all(f.done() for f in futures):
            seen_running = max(seen_running, number(tab.figure("running")))
            if tab.figure("out_tps") != DASH:
                seen_tps = max(seen_tps, number(tab.figure("out_tps")))
            time.sleep(0.2)
        usages = [f.result().usage for f in futures]
    assert all(u.completion_tokens == 200 for u in usages)
    assert seen_running >= 1, "the page never showed a running request"
    tab.wait_for("Number(document.querySelector('#total [data-k=requests]').textContent) === 4",
                 what="4 requests done")
    tab.wait_for("Number(document.querySelector('#total [data-k=out_tps]').textContent.replace(/,/g, '')) > 0")
    seen_tps = max(seen_tps, number(tab.figure("out_tps")))
    assert seen_tps > 0
    for key in ("usd_in", "usd_out", "usd_total"):
        assert tab.figure(key).startswith("$") and tab.figure(key) != "$0", (key, tab.figure(key))
    assert number(tab.figure("total_tps")) >= number(tab.figure("out_tps"))
    models = tab.model_figures()
    assert models["smollm2-135m"]["requests"] == "4" and models["gemma3-270m"]["requests"] == "0", models
    assert number(models["smollm2-135m"]["out_tps"]) > 0 and number(models["gemma3-270m"]["out_tps"]) == 0, models
    assert models["smollm2-135m"]["usd_total"].startswith("$") and models["gemma3-270m"]["usd_total"] == DASH

    assert tab.figure("prefix").endswith("%")
    # a repeated request is answered from the response cache: the page's hit rate is the server's
    assert tab.figure("rcache") in ("0.0%", DASH)
    for _ in range(2):
        client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=4, temperature=0)
    lookups = httpx.get(gateway.v1 + "/cost", timeout=10).json()["response_cache"]["lookups"]
    hits = lookups["hit"] + lookups["semantic_hit"]
    assert hits >= 1, lookups
    expected = f"{100 * hits / (hits + lookups['miss']):.1f}%"
    tab.wait_for(f"document.querySelector('#total [data-k=rcache]').textContent === '{expected}'",
                 what=f"the response cache's hit rate {expected} ({lookups})")

    assert_phone_fit(tab)
    shot = shot_path(tmp_path, "dashboard-phone.png")
    tab.screenshot(shot)
    assert shot.stat().st_size > 30_000  # a blank page is a few kB
    assert not tab.errors(), tab.errors()
    assert_stays_home(tab, gateway.base_url)
    assert tab.statuses().keys() >= {"/dashboard", "/v1/cost", "/metrics"}
    assert all(s == {200} for s in tab.statuses().values()), tab.statuses()


def test_dashboard_behind_an_api_key_asks_for_it_and_keeps_it_out_of_urls(keyed, browser, tmp_path):
    # the shell is open and holds nothing secret; the data is not
    page = httpx.get(keyed.base_url + "/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert KEY not in page.text
    for path in ("/v1/cost", "/metrics"):
        assert httpx.get(keyed.base_url + path, timeout=10).status_code == 401
        assert httpx.get(keyed.base_url + path, headers=keyed.headers, timeout=10).status_code == 200

    tab = Tab(browser)
    tab.goto(keyed.base_url + "/dashboard")
    tab.wait_for("!document.getElementById('login').hidden", what="the key prompt")
    assert tab.eval("document.getElementById('total').hidden")
    assert tab.eval("[...document.querySelectorAll('[data-k]')].every(e => e.textContent === '\u2013')")
    assert tab.eval("document.getElementById('served').textContent") == ""  # not even the model's name
    assert_phone_fit(tab)

    def type_key(key: str) -> None:
        tab.eval("document.getElementById('key').focus()")
        tab.send("Input.insertText", {"text": key})
        enter = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        tab.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **enter})
        tab.send("Input.dispatchKeyEvent", {"type": "keyUp", **enter})

    type_key("sk-wrong")
    tab.wait_for("document.getElementById('login-error').textContent.includes('refused')", what="the refusal")
    assert tab.eval("sessionStorage.length") == 0
    type_key(KEY)
    tab.wait_for("!document.getElementById('total').hidden && "
                 "document.querySelector('#total [data-k=requests]').textContent !== '\u2013'", what="the figures")
    assert tab.eval("document.getElementById('login').hidden")

    # the key: in this tab's sessionStorage, nowhere else
    assert tab.eval("sessionStorage.getItem('leanserve.apiKey')") == KEY
    assert tab.eval("localStorage.length") == 0 and tab.eval("document.cookie") == ""
    assert KEY not in tab.eval("location.href")
    assert KEY not in tab.eval("document.documentElement.outerHTML")
    assert not [u for u in tab.requests() if KEY in u or "sk-wrong" in u]

    # the model's name is shown as text: no element made of it, nothing fetched from it
    client = openai.OpenAI(base_url=keyed.v1, api_key=KEY, max_retries=0, timeout=60)
    client.completions.create(model=HOSTILE_NAME, prompt="Hi", max_tokens=8)
    tab.wait_for("document.querySelector('#total [data-k=requests]').textContent === '1'", what="1 request done")
    assert tab.eval("document.getElementById('served').textContent") == HOSTILE_NAME
    # /metrics escapes the name's quotes in its labels; the page reads them back to the same name
    prefix = tab.eval("document.querySelector('#total [data-s=prefix]').textContent")
    assert re.fullmatch(r"\d+ of [1-9][\d,]* prompt tokens", prefix), prefix
    assert tab.eval("document.querySelectorAll('img').length") == 0
    assert not [u for u in tab.requests() if "x-injected" in u]

    # reloading the tab keeps the key (sessionStorage): the figures come back with no prompt, no 401
    tab.eval("window.beforeReload = true")
    tab.send("Page.reload")
    tab.wait_for("!window.beforeReload && document.readyState === 'complete'", what="the reloaded page")
    tab.wait_for("document.querySelector('#total [data-k=requests]').textContent === '1'", what="figures after reload")
    assert tab.eval("document.getElementById('login').hidden")
    assert_phone_fit(tab)
    tab.screenshot(shot_path(tmp_path, "dashboard-phone-keyed.png"))

    # the only errors: the browser's log lines for the two refused polls (no key, then the wrong key)
    errors = tab.errors()
    assert len(errors) <= 4 and all(e.startswith("log network:") and "401" in e and ("/v1/cost" in e or "/metrics" in e)
                          for e in errors), errors
    assert_stays_home(tab, keyed.base_url)
    assert tab.statuses()["/v1/cost"] == {200, 401} and tab.statuses()["/dashboard"] == {200}
