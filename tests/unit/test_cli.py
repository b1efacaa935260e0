"""The command line: every command listed (a broken import is loud, never a hidden command), flags
derived from the config dataclasses (a default written once), API keys from the environment and
files, and the start-up warning for a server reachable beyond this machine without a key."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import pytest

from leanserve import cli_common
from leanserve.cli import build_parser, main
from leanserve.config import EngineConfig
from leanserve.serve import cli as serve_cli
from leanserve.serve.transport import TransportConfig


def run(*code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = run("-m", "leanserve", "--help")
    assert out.returncode == 0, out.stderr
    for command in ("pull", "models", "generate", "serve", "bench", "usage"):
        assert command in out.stdout


def test_a_broken_command_module_fails_loudly_instead_of_hiding_the_command():
    # an ImportError inside leanserve/serve/cli.py, simulated: the module cannot be imported
    out = run("-c", "import sys; sys.modules['leanserve.serve.cli'] = None\n"
                    "from leanserve.cli import main\nsys.exit(main(['--help']))")
    assert out.returncode != 0
    assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr, out.stderr


def test_building_the_parser_imports_no_torch():
    out = run("-c", "import sys\nfrom leanserve.cli import build_parser\nbuild_parser()\n"
                    "assert 'torch' not in sys.modules, 'torch imported'")
    assert out.returncode == 0, out.stderr


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_engine_flags_come_from_engine_config(command):
    p = _subparser(command)
    dests = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(EngineConfig):
        if f.metadata.get("cli") is False:
            assert f.name not in dests or command == "generate" and f.name == "seed"  # generate's --seed samples
            continue
        assert f.name in dests, f"no flag for EngineConfig.{f.name}"
        assert dests[f.name].default == f.default, f.name
        assert dests[f.name].help, f"EngineConfig.{f.name} has no help"
    argv = [command] + (["a prompt"] if command == "generate" else [])
    args = build_parser().parse_args(argv)
    assert cli_common.engine_config(args) == EngineConfig()  # no flags: every default is EngineConfig's


def test_engine_flags_parse_into_the_config():
    args = build_parser().parse_args(["serve", "m.gguf", "--dtype", "bfloat16", "--kv-cache-memory", "1GiB",
                                      "--no-prefix-caching", "--max-num-seqs", "8", "--threads", "2",
                                      "--max-model-len", "512", "--block-size", "32"])
    assert cli_common.engine_config(args) == EngineConfig(
        model="m.gguf", dtype="bfloat16", kv_cache_memory=2**30, enable_prefix_caching=False, max_num_seqs=8,
        threads=2, max_model_len=512, block_size=32)


def test_a_bad_size_is_an_argparse_error_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-memory", "lots"])
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_a_bad_engine_value_fails_before_any_pull(monkeypatch, capsys):
    monkeypatch.setattr(serve_cli, "ensure_model", lambda name: pytest.fail("pulled before validating"))
    monkeypatch.setattr(serve_cli, "_bind", lambda host, port: pytest.fail("bound before validating"))
    assert main(["serve", "--threads", "0", "--no-ledger"]) == 2
    assert "threads must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--speculative", "draft", "--draft-model", "self:x"], "--draft-model 'self:x': expected self or self:N"),
    (["--speculative", "draft", "--draft-model", "self:0"], "--draft-model 'self:0': expected self or self:N"),
    (["--speculative", "ngram", "--draft-model", "self:4"], "--draft-model needs --speculative draft or auto"),
    (["--speculative", "fast"], "invalid choice: 'fast'"),
])
def test_bad_speculation_flags_fail_in_one_line_before_any_pull(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(serve_cli, "ensure_model", lambda name: pytest.fail("pulled before validating"))
    monkeypatch.setattr(serve_cli, "_bind", lambda host, port: pytest.fail("bound before validating"))
    try:
        code = main(["serve", "--no-ledger", *argv])
    except SystemExit as e:  # argparse's own choices check
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_server_flags_come_from_their_config_homes():
    from leanserve.serve.api import ServerSettings

    args = build_parser().parse_args(["serve"])
    assert args.request_timeout == ServerSettings.request_timeout
    for f in dataclasses.fields(TransportConfig):
        assert getattr(args, f.name) == f.default, f.name
    args = build_parser().parse_args(["serve", "--max-body-size", "16MiB", "--header-timeout", "2",
                                      "--body-timeout", "3", "--keep-alive-timeout", "4", "--max-connections", "50"])
    assert serve_cli.config_from_args(args, TransportConfig) == TransportConfig(
        max_body_bytes=16 * 2**20, header_timeout=2.0, body_timeout=3.0, keep_alive_timeout=4.0, max_connections=50)


# ---- API keys --------------------------------------------------------------------------------


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_api_keys_from_every_source(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANSERVE_API_KEY", "from-env")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nsecond line is ignored\n")
    digests_file = tmp_path / "digests"
    digests_file.write_text(digest("from-digests") + "  # a comment\n")
    args = build_parser().parse_args(["serve", "--api-key", "from-flag", "--api-key-file", str(key_file),
                                      "--api-keys-file", str(digests_file)])
    assert serve_cli.api_key_digests(args) == {digest(k) for k in ("from-env", "from-file", "from-flag",
                                                                      "from-digests")}


def test_api_key_from_the_environment_alone(monkeypatch):
    monkeypatch.setenv("LEANSERVE_API_KEY", "sk-env\n")
    assert serve_cli.api_key_digests(build_parser().parse_args(["serve"])) == {digest("sk-env")}
    monkeypatch.delenv("LEANSERVE_API_KEY")
    assert serve_cli.api_key_digests(build_parser().parse_args(["serve"])) == frozenset()


@pytest.mark.parametrize("content", ["", "\n", "   \nkey-on-second-line\n"])
def test_an_api_key_file_without_a_key_on_its_first_line_is_an_error(tmp_path, monkeypatch, content):
    monkeypatch.delenv("LEANSERVE_API_KEY", raising=False)
    f = tmp_path / "key"
    f.write_text(content)
    with pytest.raises(cli_common.CLIError, match="first line"):
        serve_cli.api_key_digests(build_parser().parse_args(["serve", "--api-key-file", str(f)]))


def test_a_missing_api_key_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(serve_cli, "_bind", lambda host, port: pytest.fail("bound"))
    assert main(["serve", "--api-key-file", str(tmp_path / "nope"), "--no-ledger"]) == 2
    assert "cannot read --api-key-file" in capsys.readouterr().err


# ---- start-up: the exposure warning, the Host allow list, the connection cap -------------------


class FakeSocket:
    def __init__(self, address: str) -> None:
        self.address = address

    def getsockname(self):
        return (self.address, 8000)

    def close(self) -> None:
        pass


@pytest.fixture()
def started(monkeypatch):
    """Runs `leanserve serve ARGS` up to the point where the model would load; returns what _serve got."""
    seen = {}

    def fake_serve(args, config, models, setup, limits, hosts, sock, digests, t0, ledger):
        seen.update(config=config, models=models, setup=setup, limits=limits, hosts=hosts, digests=digests)
        return 0

    def start(address: str, *argv: str) -> dict:
        seen.clear()
        monkeypatch.setattr(serve_cli, "_bind", lambda host, port: FakeSocket(address))
        monkeypatch.setattr(serve_cli, "_serve", fake_serve)
        assert main(["serve", "--no-ledger", *argv]) == 0
        return seen

    monkeypatch.delenv("LEANSERVE_API_KEY", raising=False)
    return start


def test_non_loopback_without_a_key_warns_once(started, capsys, monkeypatch):
    started("0.0.0.0", "--host", "0.0.0.0")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no API key" in warnings[0] and "LEANSERVE_API_KEY" in warnings[0]
    monkeypatch.setenv("LEANSERVE_API_KEY", "k")
    started("0.0.0.0", "--host", "0.0.0.0")
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("LEANSERVE_API_KEY")
    started("127.0.0.1")
    started("::1")
    assert "warning" not in capsys.readouterr().err


def test_the_host_allow_list_depends_on_the_bound_address(started):
    assert started("127.0.0.1")["hosts"] == ("localhost", "127.0.0.1", "::1")
    assert started("127.0.0.1", "--allowed-hosts", "a.example,b.example", "--allowed-hosts", "c.example")[
        "hosts"] == ("localhost", "127.0.0.1", "::1", "a.example", "b.example", "c.example")
    assert started("127.0.0.1", "--allowed-hosts", "*")["hosts"] is None
    assert started("0.0.0.0")["hosts"] is None
    assert started("0.0.0.0", "--allowed-hosts", "api.example")["hosts"] == ("api.example",)


def test_the_connection_cap_stays_below_the_open_file_limit(started, monkeypatch, capsys):
    monkeypatch.setattr(serve_cli.transport, "raise_open_files_limit", lambda: (1024, 1024))
    assert started("127.0.0.1")["limits"].max_connections == 1024 - 128
    assert "--max-connections 1000 lowered to 896" in capsys.readouterr().err
    monkeypatch.setattr(serve_cli.transport, "raise_open_files_limit", lambda: (65536, 65536))
    assert started("127.0.0.1", "--max-connections", "5000")["limits"].max_connections == 5000


@pytest.mark.parametrize("argv, message", [
    (["m1", "--cascade", "auto=m1,nope"], "--cascade auto: 'nope' is not a served model (served: m1)"),
    (["m1", "--cascade", "auto=m1"], "needs a name and at least two models"),
    (["m1", "m2", "--cascade", "m1=m1,m2"], "the name 'm1' is taken"),
    (["m1", "--upstream", "up=ftp://x"], "must be http(s)://host"),
    (["m1", "--upstream", "up=http://127.0.0.1:9/v1,key_env=LEANSERVE_TEST_NO_SUCH_KEY"],
     "the environment variable LEANSERVE_TEST_NO_SUCH_KEY is not set"),
    (["m1", "--upstream", "m1=http://127.0.0.1:9/v1"], "the name 'm1' is taken by another model"),
    (["m1", "--upstream", "up=http://127.0.0.1:9/v1,retries=0,timeout=2"], "upstream up at http://127.0.0.1:9/v1 is "
                                                                           "unreachable"),
    (["m1", "m1"], "the model 'm1' is given twice"),
    (["m1", "m2", "--served-model-name", "x"], "--served-model-name names one model"),
    (["m1", "--cache-ttl", "5"], "need --response-cache"),
    (["m1", "--cascade-threshold", "-1"], "need a --cascade"),
])
def test_bad_gateway_configuration_fails_at_start_up_with_one_line(started, capsys, argv, message):
    """Checked before any model is pulled or loaded (the fake _serve is never reached)."""
    assert main(["serve", "--no-ledger", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("leanserve: error: ") and message in err, err


def test_several_models_and_the_gateway_flags_reach_serve(started):
    seen = started("127.0.0.1", "m1", "m2", "--cascade", "auto=m1,m2", "--cascade-threshold", "-0.25",
                   "--cascade-score", "min_logprob", "--response-cache", "--cache-ttl", "60", "--cache-path", "/tmp/x.db")
    assert seen["models"] == ["m1", "m2"] and seen["config"].model == "m1"
    setup = seen["setup"]
    assert setup.names == ["m1", "m2"] and setup.upstreams == []
    (c,) = setup.cascades
    assert (c.name, c.models, c.threshold, c.score) == ("auto", ("m1", "m2"), -0.25, "min_logprob")
    assert (str(setup.cache.path), setup.cache.ttl_s) == ("/tmp/x.db", 60.0)
