"""`leanserve eval compare` on two crafted results files whose statistics are known by hand."""

from __future__ import annotations

import json
import math

import pytest

from leanserve.cli import main
from leanserve.eval.compare import compare_runs, format_comparison
from leanserve.eval.run import RESULTS_KIND, dumps


def mc_items(pattern: list[tuple[bool, bool]], extra: int = 0) -> list[dict]:
    return [{"index": i, "gold": 0, "chosen": 0 if right else 1, "chosen_norm": 0, "correct": right,
             "correct_norm": True, "logprobs": [-1.0, -2.0], "tokens": [2, 2]} for i, (right, _) in enumerate(pattern)] + [
        {"index": len(pattern) + k, "gold": 0, "chosen": 0, "chosen_norm": 0, "correct": True, "correct_norm": True,
         "logprobs": [-1.0, -2.0], "tokens": [2, 2]} for k in range(extra)]


# 10 items right in A only, 2 right in B only, 2 right in both: McNemar b=10, c=2
A_RIGHT = [True] * 10 + [False] * 2 + [True] * 2
B_RIGHT = [False] * 10 + [True] * 2 + [True] * 2
WINDOWS = [(0, 4, 1, 3, 6.0), (3, 7, 4, 3, 4.5), (6, 8, 7, 1, 2.0)]  # begin, end, score_from, tokens, A's NLL


def result(label: str, right: list[bool], nll_shift: float, usd: float, ms: float, extra_items: int = 0,
           extra_task: bool = False) -> dict:
    def cost(u: float, m: float) -> dict:
        return {"usd_per_1k_items": u, "machine_seconds_per_1k_items": m}

    n = len(right) + extra_items
    windows = [{"index": i, "begin": b, "end": e, "score_from": s, "tokens": t, "nll": nll + t * nll_shift}
               for i, (b, e, s, t, nll) in enumerate(WINDOWS)]
    tasks = {
        "arc_easy": {"kind": "multiple_choice", "main_metric": "acc_norm", "higher_is_better": True,
                     "metrics": {"acc": (sum(right) + extra_items) / n, "acc_norm": 1.0}, "num_items": n,
                     "cost": cost(usd, ms), "items": mc_items([(r, r) for r in right], extra_items)},
        "wikitext2": {"kind": "perplexity", "main_metric": "bits_per_byte", "higher_is_better": False,
                      "metrics": {"perplexity": 0.0, "bits_per_byte": 1.0 + nll_shift}, "num_items": 3,
                      "cost": cost(usd * 2, ms * 2), "items": windows},
    }
    if extra_task:
        tasks["triviaqa"] = {"kind": "generation", "metrics": {"exact_match": 0.1}, "items": [], "cost": {}}
    return {"kind": RESULTS_KIND, "format": 1, "label": label, "backend": {"backend": "fake"}, "tasks": tasks}


A = result("base float32", A_RIGHT, 0.0, usd=10.0, ms=100.0)
B = result("int4", B_RIGHT, math.log(2), usd=4.0, ms=50.0, extra_items=1, extra_task=True)


def test_accuracy_deltas_mcnemar_and_intervals():
    c = compare_runs(A, B, ("a", "b"))
    arc = c["tasks"]["arc_easy"]
    assert arc["items_shared"] == 14 and (arc["items_a"], arc["items_b"]) == (14, 15)
    acc = arc["metrics"]["acc"]
    assert acc["a"] == 12 / 14 and acc["b"] == 4 / 14 and acc["delta"] == pytest.approx(-8 / 14)
    assert (acc["only_a_right"], acc["only_b_right"]) == (10, 2)
    assert round(acc["mcnemar_p"], 4) == 0.0386
    assert acc["ci95"][0] < -8 / 14 < acc["ci95"][1] < 0  # the whole interval is a loss
    norm = arc["metrics"]["acc_norm"]
    assert (norm["delta"], norm["ci95"], norm["mcnemar_p"]) == (0.0, [0.0, 0.0], 1.0)  # identical: [0, 0]


def test_perplexity_ratio_and_cost_ratio():
    c = compare_runs(A, B)
    wt = c["tasks"]["wikitext2"]["metrics"]
    # B's NLL is A's + ln 2 per token in every window: perplexity doubles, in every resample too
    assert wt["perplexity"]["a"] == pytest.approx(math.exp(12.5 / 7))
    assert wt["perplexity"]["ratio"] == pytest.approx(2.0) and wt["perplexity"]["ci95"] == pytest.approx([2.0, 2.0])
    assert wt["bits_per_byte"]["delta"] == pytest.approx(math.log(2))
    cost = c["tasks"]["arc_easy"]["cost"]
    assert cost["usd_per_1k_items"] == {"a": 10.0, "b": 4.0, "ratio": 0.4}
    assert cost["machine_seconds_per_1k_items"] == {"a": 100.0, "b": 50.0, "ratio": 0.5}
    assert c["only_in_a"] == [] and c["only_in_b"] == ["triviaqa"]


def test_other_windows_give_no_perplexity_ratio_but_a_note():
    other = json.loads(json.dumps(B))
    other["tasks"]["wikitext2"]["items"][1]["tokens"] = 2  # another tokenizer cut the text elsewhere
    wt = compare_runs(A, other)["tasks"]["wikitext2"]
    assert "perplexity" not in wt["metrics"] and "bits_per_byte" in wt["metrics"]
    assert "not comparable" in wt["notes"][0]


def test_missing_items_no_shared_items_no_common_task_are_errors():
    bare = json.loads(json.dumps(B))
    del bare["tasks"]["arc_easy"]["items"]
    with pytest.raises(ValueError, match="B has no per-item records for arc_easy: run leanserve eval with --save-items"):
        compare_runs(A, bare)
    moved = json.loads(json.dumps(B))
    for r in moved["tasks"]["arc_easy"]["items"]:
        r["index"] += 100
    with pytest.raises(ValueError, match="arc_easy: A and B share no item"):
        compare_runs(A, moved)
    with pytest.raises(ValueError, match="no task in common"):
        compare_runs(A, {"tasks": {"triviaqa": {}}})


def test_table_shows_every_metric_with_its_interval():
    text = format_comparison(compare_runs(A, B, ("base", "int4")))
    rows = {tuple(line.split()[:2]): line for line in text.splitlines() if line.startswith(("arc_easy", "wikitext2"))}
    assert "-0.5714" in rows[("arc_easy", "acc")] and " 0.03857 " in rows[("arc_easy", "acc")]
    assert "[+0.0000, +0.0000]" in rows[("arc_easy", "acc_norm")]
    assert "x2.0000" in rows[("wikitext2", "perplexity")]
    assert "only in B: triviaqa" in text


def test_cli_compare_table_and_json(tmp_path, capsys):
    pa, pb = tmp_path / "base.json", tmp_path / "int4.json"
    pa.write_text(dumps(A))
    pb.write_text(dumps(B))
    assert main(["eval", "compare", str(pa), str(pb), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"]["arc_easy"]["metrics"]["acc"]["only_a_right"] == 10
    assert out["a"]["name"] == "base" and out["b"]["label"] == "int4"
    assert main(["eval", "compare", str(pa), str(pb)]) == 0
    assert "McNemar p" in capsys.readouterr().out


def test_cli_compare_errors_are_one_line(tmp_path, capsys):
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(dumps(A))
    bare = json.loads(json.dumps(B))
    del bare["tasks"]["arc_easy"]["items"]
    pb.write_text(json.dumps(bare))
    assert main(["eval", "compare", str(pa), str(pb)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanserve: error: b has no per-item records for arc_easy") and err.count("\n") == 1
    assert main(["eval", "compare", str(pa), str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.json: not found")
