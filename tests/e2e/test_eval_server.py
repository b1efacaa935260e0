"""`leanserve eval` through the server backend against the in-process engine: the same items give the
same choices, log-likelihoods, answers (with the same token logprobs, and each answer's own cost adding
up to the run's) and perplexity (float32); a server that cannot score prompts is a one-line error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leanserve.config import EngineConfig
from leanserve.eval.inprocess import InProcessBackend
from leanserve.eval.server import ServerBackend
from leanserve.eval.tasks import EvalOptions, Selection, builtin_task
from tests.stub_server import serve_in_subprocess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return ["--dtype", "float32", "--max-model-len", "1024"]


@pytest.mark.parametrize("name,first,extra", [("arc_easy", 12, {}), ("hellaswag", 4, {}), ("triviaqa", 4, {}),
                                              ("wikitext2", 2, {"context_length": 128, "stride": 100})])
def test_server_backend_gives_the_in_process_results(server, name, first, extra, inprocess):
    remote = ServerBackend(server.base_url + "/v1")
    options = EvalOptions(selection=Selection(first=first), batch_size=8, **extra)
    task = builtin_task(name)
    before = inprocess.cost()
    there, here = task.run(remote, options), task.run(inprocess, options)
    assert there.metrics == pytest.approx(here.metrics, rel=1e-4)
    for a, b in zip(there.items, here.items):
        if "chosen" in a:
            assert (a["chosen"], a["chosen_norm"]) == (b["chosen"], b["chosen_norm"])
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3)
        elif "prediction" in a:
            assert a["prediction"] == b["prediction"]
            assert b["token_logprobs"] and all(v <= 0 for v in b["token_logprobs"])  # EOS or 24 tokens: never none
            assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-3)
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-3)
        else:
            assert a["nll"] == pytest.approx(b["nll"], rel=1e-4)
    cost = remote.cost()
    assert cost.usd is not None and cost.usd > 0 and cost.machine_seconds > 0 and cost.requests > 0
    if name == "triviaqa":  # each answer's own cost (usage.cost; the in-process bill) adds up to the run's
        assert all(r["cost_usd"] > 0 and r["machine_seconds"] > 0 for r in there.items + here.items)
        assert sum(r["cost_usd"] for r in there.items) == pytest.approx(cost.usd, rel=1e-9)
        spent_here = inprocess.cost().usd - before.usd
        assert sum(r["cost_usd"] for r in here.items) == pytest.approx(spent_here, rel=1e-9)
    remote.close()


@pytest.fixture(scope="module")
def inprocess():
    return InProcessBackend(EngineConfig(model="smollm2-135m", dtype="float32", max_model_len=1024))


def test_a_server_without_prompt_scoring_is_a_one_line_error(tmp_path):
    with serve_in_subprocess() as url:  # an OpenAI-compatible stub: no /tokenize, no echo
        done = subprocess.run([sys.executable, "-m", "leanserve", "eval", "--base-url", url, "--tasks", "arc_easy",
                               "--first", "1", "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanserve: error: ") and "/tokenize" in lines[0], done.stderr
