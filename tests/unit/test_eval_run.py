"""The runner: cost per task from the backend's tally (before/after), the results document, the table."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from leanserve import __version__
from leanserve.eval.run import (
    RESULTS_KIND,
    cost_summary,
    default_label,
    dumps,
    format_results,
    git_commit,
    load_results,
    run_tasks,
)
from leanserve.eval.backend import CostTally
from leanserve.eval.tasks import Document, EvalOptions, MultipleChoiceItem, MultipleChoiceTask, PerplexityTask, Selection
from tests.unit.test_eval_tasks import FakeBackend

ITEMS = [MultipleChoiceItem(i, "Q", ("ab", "cccccccccc"), gold=i % 2) for i in range(4)]


def tasks():
    return [MultipleChoiceTask("mc", lambda: ITEMS, "fmt", "src"),
            PerplexityTask("ppl", lambda: [Document(0, "aaaabbbb")], "fmt", "src", windows_are_items=True)]


def test_each_task_is_charged_what_the_backend_metered_during_it():
    fb = FakeBackend()
    fb.score([])  # cost before the run is not charged to any task
    fb._charge(100, 0)
    result = run_tasks(fb, tasks(), EvalOptions(context_length=4), save_items=True, label="fake")
    mc = result["tasks"]["mc"]
    # 4 items x 2 choices; prompts "Q ab" (4 tokens) and "Q cccccccccc" (12): 4 x 16 = 64 tokens at 0.01 s
    assert mc["cost"]["prompt_tokens"] == 64 and mc["cost"]["requests"] == 8
    assert mc["cost"]["machine_seconds"] == pytest.approx(0.64)
    assert mc["cost"]["machine_seconds_per_1k_items"] == pytest.approx(160.0)  # 0.64 s / 4 items x 1000
    assert mc["cost"]["usd_per_1k_items"] == pytest.approx(80.0)  # at $0.5 per machine-second
    assert mc["cost"]["usd_per_million_tokens"] == pytest.approx(0.32 / 64 * 1e6)
    assert mc["metrics"] == {"acc": 0.5, "acc_norm": 0.5}  # acc always picks choice 0, acc_norm choice 1
    assert mc["num_items"] == 4 and mc["num_items_available"] == 4
    assert mc["selection"] == {"method": "all", "limit": None, "first": None, "seed": None}
    assert [r["index"] for r in mc["items"]] == [0, 1, 2, 3]
    ppl = result["tasks"]["ppl"]
    # "aaaabbbb", windows of 4 moving by 3: [0,4) [3,7) [6,8): 3 + 3 + 1 = 7 tokens scored, 4 + 4 + 2 = 10 sent
    assert ppl["details"]["windows"] == 3 and ppl["cost"]["prompt_tokens"] == 10
    assert ppl["kind"] == "perplexity" and ppl["main_metric"] == "bits_per_byte" and ppl["higher_is_better"] is False
    assert ppl["cost"]["items_per_second"] > 0 and ppl["cost"]["wall_seconds"] > 0


def test_results_document_carries_configuration_version_commit_and_options():
    result = run_tasks(FakeBackend(), tasks()[:1], EvalOptions(Selection(limit=2, seed=5), batch_size=3))
    assert result["kind"] == RESULTS_KIND and result["format"] == 1
    assert result["backend"]["backend"] == "fake" and result["label"] == "bigram-chars float32"
    assert result["leanserve_version"] == __version__
    assert result["options"] == {"limit": 2, "first": None, "seed": 5, "batch_size": 3, "context_length": None,
                                 "stride": None, "save_items": False}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", result["date"])
    assert "items" not in result["tasks"]["mc"]
    assert result["tasks"]["mc"]["selection"] == {"method": "seeded_shuffle", "limit": 2, "first": None, "seed": 5}


def test_git_commit_is_this_checkout_head():
    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert git_commit() == head.stdout.strip()


def test_no_usd_from_the_backend_gives_none_not_zero():
    result = run_tasks(FakeBackend(usd=False), tasks()[:1], EvalOptions())
    cost = result["tasks"]["mc"]["cost"]
    assert cost["usd"] is None and cost["usd_per_1k_items"] is None and cost["usd_per_million_tokens"] is None
    assert cost["machine_seconds_per_1k_items"] == pytest.approx(160.0)


def test_cost_summary_of_nothing():
    s = cost_summary(CostTally(), 0, 0.0)
    assert s["machine_seconds_per_1k_items"] is None and s["items_per_second"] is None


def test_default_label():
    assert default_label({"model": "/m/SmolLM2.gguf", "dtype": "bfloat16", "quantization": "Q4_1",
                          "kv_cache_dtype": "bfloat16"}) == "SmolLM2.gguf bfloat16 Q4_1"
    assert default_label({"model": "smollm2-135m", "dtype": "float32", "kv_cache_dtype": "int8"}) == \
        "smollm2-135m float32 int8"
    assert default_label({"base_url": "http://h:8000", "model": None}) == "h:8000"
    assert default_label({"model": "smollm2-135m", "dtype": "float32",
                          "quantization": "121 of 121 matmuls also in 4/8-bit GGUF blocks"}) == "smollm2-135m float32"


def test_results_round_trip_and_table(tmp_path):
    result = run_tasks(FakeBackend(), tasks(), EvalOptions(context_length=4), label="fake run")
    path = tmp_path / "r.json"
    path.write_text(dumps(result))
    assert load_results(path) == json.loads(dumps(result))
    assert json.loads(dumps({"p": Path("/m/x.gguf"), "nan": float("nan")})) == {"p": "/m/x.gguf", "nan": None}
    table = format_results(result)
    lines = table.splitlines()
    assert lines[0].startswith("fake run  (")
    assert lines[1].split() == ["task", "metrics", "items", "$/1k", "items", "machine-s/1k", "$/Mtok", "items/s",
                                "wall", "s"]
    assert lines[3].startswith("mc ") and "acc 0.5000, acc_norm 0.5000" in lines[3] and " 80.0000 " in lines[3]
    assert lines[4].startswith("ppl ") and "bits_per_byte" in lines[4]


@pytest.mark.parametrize("content, error", [
    (None, "not found"), ("{", "not valid JSON"), ('{"kind": "run"}', "not a leanserve eval results file"),
])
def test_load_results_errors(tmp_path, content, error):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=error):
        load_results(path)
