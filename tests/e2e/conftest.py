"""The real server as a subprocess: ``python -m leanserve serve --port <free port> ...``.

Each test module starts one server (module-scoped fixture) and kills it at the end. Its output
goes to a log file whose tail is shown if it fails to start.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, require_model

START_TIMEOUT_S = 120.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The leanserve: samples of /metrics as {name{labels}: value}, labels dropped for one-label series."""
        text = httpx.get(self.base_url + "/metrics", headers=self.headers, timeout=10).text
        out: dict[str, float] = {}
        for name, labels, value in re.findall(r"^(leanserve:[\w:]+)(?:\{([^}]*)\})? (\S+)$", text, re.M):
            pairs = [p for p in re.findall(r'\w+="[^"]*"', labels) if not p.startswith("model_name=")]
            out[name + ("{" + ",".join(pairs) + "}" if pairs else "")] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_dir: Path, *args: str, model: str | list[str] = "smollm2-135m", api_key: str | list[str] | None = None,
                 env_extra: dict[str, str] | None = None) -> ServerProcess:
    models = [model] if isinstance(model, str) else model
    for m in models:
        require_model(m)
    port = free_port()
    cmd = [sys.executable, "-m", "leanserve", "serve", *models, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args]
    keys = [api_key] if isinstance(api_key, str) else api_key or []
    for k in keys:
        cmd += ["--api-key", k]
    api_key = keys[0] if keys else None
    if "--ledger" not in args and "--no-ledger" not in args:
        cmd += ["--ledger", str(tmp_dir / f"ledger-{port}.sqlite")]  # never the user's own ledger
    if "--batch-dir" not in args and "--no-batch-api" not in args:
        cmd += ["--batch-dir", str(tmp_dir / f"batches-{port}")]  # nor the user's batches
    log_path = tmp_dir / f"server-{port}.log"
    log = log_path.open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, api_key)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} before it was ready:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    pytest.fail(f"the server was not ready after {START_TIMEOUT_S:.0f} s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    """Extra `leanserve serve` arguments; a test module overrides this fixture to change them."""
    return []


@pytest.fixture(scope="module")
def server_api_key() -> str | None:
    return None


@pytest.fixture(scope="module")
def server(server_args, server_api_key, tmp_path_factory):
    """One real server per test module."""
    s = start_server(tmp_path_factory.mktemp("server"), *server_args, api_key=server_api_key)
    yield s
    s.stop()
