"""`leanserve eval` end to end with a fake backend put in place of `make_backend`, and its user errors:
each one line, ``leanserve: error: ...``, exit code 2, before any backend is made."""

from __future__ import annotations

import json

import pytest

import leanserve.eval.cli as eval_cli
from leanserve.cli import main
from tests.unit.test_eval_tasks import FakeBackend


@pytest.fixture
def backends(monkeypatch):
    made: list[tuple[object, FakeBackend]] = []

    def make(args):
        fb = FakeBackend(max_length=32, answers={"Question: Capital of France?\nAnswer:": " Paris\n"})
        made.append((args, fb))
        return fb

    monkeypatch.setattr(eval_cli, "make_backend", make)
    return made


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("leanserve: error: ") and err.count("\n") == 1, err
    return err.strip()


def test_unknown_task(capsys, backends):
    err = one_line_error(capsys, ["eval", "--tasks", "arc_easy,mmlu"])
    assert err == ("leanserve: error: unknown task 'mmlu'; known tasks: arc_easy, hellaswag, triviaqa, wikitext2 "
                   "(or --task-file PATH.jsonl)")
    assert backends == []  # nothing loaded for a typo


def test_malformed_task_file_names_file_and_line(tmp_path, capsys, backends):
    bad = tmp_path / "quiz.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q2", "choices": ["a"], "gold": 0}\n')
    err = one_line_error(capsys, ["eval", "--task-file", str(bad)])
    assert err == f"leanserve: error: {bad}:2: 'choices' must be a list of at least 2 non-empty strings"
    err = one_line_error(capsys, ["eval", "--task-file", str(tmp_path / "missing.jsonl")])
    assert err.endswith("missing.jsonl not found")
    assert backends == []


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc_easy", "--limit", "5", "--first", "5"], "not allowed with argument"),
    (["--tasks", "wikitext2", "--context-length", "64", "--stride", "64"], "--stride must be between 1 and"),
    (["--tasks", "arc_easy", "--base-url", "http://127.0.0.1:1", "--dtype", "float32"], "--dtype configure the in-process"),
    (["--tasks", "arc_easy", "--base-url", "http://127.0.0.1:1", "--model", "x"], "--model configure the in-process"),
    (["--tasks", "arc_easy", "--api-key", "k"], "--api-key and --served-model go with --base-url"),
    (["--tasks", "arc_easy", "--base-url", "http://127.0.0.1:1", "--price-per-hour", "1"], "a server reports its own"),
    (["--tasks", "arc_easy", "--hardware", "tpu-v99"], "unknown hardware"),
    (["--tasks", "arc_easy", "--limit", "0"], "expected a whole number >= 1"),
    (["--tasks", "arc_easy", "--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
    ([], "no task: give --tasks"),
    (["--tasks", "arc_easy", "--html", "/"], "/ is a folder"),
])
def test_bad_flags_are_one_line_errors(capsys, backends, argv, message):
    assert message in one_line_error(capsys, ["eval", *argv])
    assert backends == []


def test_an_unwritable_output_is_found_before_the_run(tmp_path, capsys, backends):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    err = one_line_error(capsys, ["eval", "--tasks", "arc_easy", "--output", str(blocker / "run.json")])
    assert err == f"leanserve: error: cannot write {blocker / 'run.json'}: {blocker} is not a folder"
    assert backends == []


def test_a_run_writes_results_html_and_a_table(tmp_path, capsys, backends):
    mc = tmp_path / "quiz.jsonl"
    mc.write_text('{"query": "Q", "choices": ["ab", "cccccccccc"], "gold": 1}\n'
                  '{"query": "R", "choices": ["xx", "yz"], "gold": 0}\n')
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Capital of France?", "answers": ["Paris"]}\n{"question": "2+2?", "answers": ["4"]}\n')
    out, page = tmp_path / "run.json", tmp_path / "run.html"
    rc = main(["eval", "--tasks", "wikitext2", "--task-file", str(mc), "--task-file", str(qa), "--limit", "2",
               "--context-length", "16", "--save-items", "--output", str(out), "--html", str(page), "--quiet",
               "--label", "fake"])
    assert rc == 0
    (args, fb), = backends
    assert fb.closed and args.model == "smollm2-135m"  # no --model and no --base-url: the default model
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["wikitext2", "quiz", "qa"]
    assert result["tasks"]["quiz"]["metrics"] == {"acc": 0.5, "acc_norm": 1.0}
    assert result["tasks"]["qa"]["metrics"] == {"exact_match": 0.5}
    wt = result["tasks"]["wikitext2"]
    assert wt["num_items"] == 2 and wt["details"]["context_length"] == 16 and wt["details"]["stride"] == 15
    assert wt["details"]["tokens_scored"] == 30 and wt["details"]["bytes_exact"] is True
    assert [i["index"] for i in wt["items"]] == [0, 1]
    assert result["options"]["limit"] == 2 and result["label"] == "fake"
    html = page.read_text()
    assert html.count('<figure class="chart" data-chart="quality-vs-cost-') == 3
    stdout = capsys.readouterr().out
    assert stdout.startswith("fake  (") and "quiz" in stdout and "exact_match 0.5000" in stdout


def test_report_of_several_runs(tmp_path, capsys, backends):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Capital of France?", "answers": ["Paris"]}\n')
    paths = []
    for label in ("one", "two"):
        paths.append(tmp_path / f"{label}.json")
        assert main(["eval", "--task-file", str(qa), "--save-items", "--output", str(paths[-1]), "--quiet",
                     "--label", label]) == 0
    page = tmp_path / "report.html"
    assert main(["eval", "report", *map(str, paths), "--html", str(page)]) == 0
    html = page.read_text()
    assert html.count("<circle class=\"point\"") == 2 and "Paired comparison with one" in html
    assert capsys.readouterr().err == f"wrote {page}\n"
    err = one_line_error(capsys, ["eval", "report", str(paths[0])])
    assert "--html" in err


def test_make_backend_builds_the_backend_the_flags_name(monkeypatch):
    import leanserve.eval.inprocess as inprocess
    import leanserve.eval.server as server

    made = []
    monkeypatch.setattr(server, "ServerBackend", lambda *a, **k: made.append(("server", a, k)))
    monkeypatch.setattr(inprocess, "InProcessBackend", lambda *a, **k: made.append(("inprocess", a, k)))
    monkeypatch.setattr(eval_cli, "ensure_model", lambda name: made.append(("pulled", name)))
    parser = __import__("argparse").ArgumentParser()
    eval_cli.configure_parser(parser)
    eval_cli.make_backend(parser.parse_args(["--base-url", "http://h:1/v1", "--api-key", "k", "--served-model", "m"]))
    args = parser.parse_args(["--model", "gemma3-270m", "--dtype", "float32", "--max-model-len", "512",
                              "--price-per-hour", "0.5"])
    eval_cli._check_backend_flags(args)
    eval_cli.make_backend(args)
    assert made[0] == ("server", ("http://h:1/v1",), {"api_key": "k", "model": "m"})
    assert made[1] == ("pulled", "gemma3-270m")
    kind, (config,), kw = made[2]
    assert kind == "inprocess" and (config.model, config.dtype, config.max_model_len) == ("gemma3-270m", "float32", 512)
    assert kw == {"price_per_hour": 0.5, "hardware": None}
