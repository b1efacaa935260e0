"""`leanserve eval cascade`: the simulation and the threshold pick on hand-made per-item data with
results worked out by hand (which threshold, quality, cost, who answered), the tie-breaking rules,
the one-pass sweep against the item-by-item reference, and each user error as one line.

The main hand-made case: two models, 9 items, dev = the first 6. Each item costs $1 on the small
model and $4 more when it goes on to the large one.

    item  small score  small right  large right
    0     -0.1         yes          yes
    1     -0.5         yes          yes
    2     -1.0         no           yes
    3     -2.0         yes          no
    4     -3.0         no           yes
    5     -inf         no           yes          (an empty answer: no tokens)
    ----- test ------------------------------------------
    6     -0.4         yes          yes
    7     -2.5         no           yes
    8     -1.5         yes          no

On dev, threshold t sends the items scored below t on to the large model:

    t        +inf  -0.1  -0.5  -1.0  -2.0  -3.0  -inf
    right    5     5     5     4     5     4     3      (of 6)
    cost $   30    26    22    18    14    10    6
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest

from leanserve.cli import main
from leanserve.eval.cascade import ModelItems, Point, candidates, cascade_report, pick, simulate, sweep
from leanserve.eval.run import dumps, load_results, run_tasks
from leanserve.eval.tasks import EvalOptions, GenerationItem, GenerationTask
from tests.unit.test_eval_tasks import FakeBackend

INF = math.inf
SMALL = [(-0.1, True), (-0.5, True), (-1.0, False), (-2.0, True), (-3.0, False), (-INF, False),
         (-0.4, True), (-2.5, False), (-1.5, True)]
LARGE_RIGHT = [True, True, True, False, True, True, True, True, False]


def results(label: str, rows: list[tuple[float, bool, float | None]], task: str = "triviaqa",
            kind: str = "generation", logprobs: bool = False) -> dict:
    """A results document as `leanserve eval --save-items` writes it, with (score, correct, cost) per
    item; ``logprobs``: the item's token logprobs are [score] (so every score function gives it)."""
    items = []
    for i, (score, correct, cost) in enumerate(rows):
        item = {"index": i, "prediction": "p", "generated": " p", "answer": f"a{i}", "correct": correct,
                "scores": {"mean_logprob": score, "min_logprob": score}, "cost_usd": cost, "machine_seconds": 1.0}
        if logprobs:
            item["token_logprobs"] = [] if score == -INF else [score]
        items.append(item)
    doc = {"kind": "leanserve-eval", "format": 1, "label": label,
           "tasks": {task: {"kind": kind, "main_metric": "exact_match", "metrics": {}, "num_items": len(rows),
                            "items": items, "cost": {}}}}
    return json.loads(dumps(doc))  # through JSON as a file holds it: -inf is null there


def small_large() -> list[tuple[str, dict]]:
    small = results("small-model", [(s, c, 1.0) for s, c in SMALL])
    large = results("large-model", [(-0.01, c, 4.0) for c in LARGE_RIGHT])
    return [("small", small), ("large", large)]


def write(tmp_path, runs: list[tuple[str, dict]]) -> list[str]:
    paths = []
    for name, doc in runs:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------- simulation and pick

def models_of(runs: list[tuple[str, dict]], score: str = "mean_logprob") -> list[ModelItems]:
    from leanserve.eval.cascade import load_models

    return load_models(runs, "triviaqa", score)[1]


def test_the_dev_sweep_gives_the_hand_worked_cost_and_quality_at_every_threshold():
    models = models_of(small_large())
    dev = list(range(6))
    assert candidates(models, dev) == [-INF, -3.0, -2.0, -1.0, -0.5, -0.1, INF]
    got = [(p.threshold, p.correct, p.cost, p.answered) for p in sweep(models, dev)]
    assert got == [(-INF, 3, 6, (6, 0)), (-3.0, 4, 10, (5, 1)), (-2.0, 5, 14, (4, 2)), (-1.0, 4, 18, (3, 3)),
                   (-0.5, 5, 22, (2, 4)), (-0.1, 5, 26, (1, 5)), (INF, 5, 30, (0, 6))]


@pytest.mark.parametrize("target, threshold, correct, cost", [
    ("0.8", -3.0, 4, 10),  # floor 0.8 x 5/6 = 2/3: 4 right of 6 will do, and -3 is the cheapest such
    ("0.95", -2.0, 5, 14),  # floor 19/24: 5 right needed; -2 is cheaper than -0.5, -0.1 and +inf
    ("1", -2.0, 5, 14),
    ("0.6", -INF, 3, 6),  # floor 1/2: the small model alone qualifies
])
def test_the_pick_is_the_cheapest_threshold_that_reaches_the_target(target, threshold, correct, cost):
    report = cascade_report(small_large(), task="triviaqa", target=target, dev_items=6)
    dev = report["dev"]["cascade"]
    assert report["threshold"] == (threshold if math.isfinite(threshold) else "-inf")
    assert (dev["correct"], dev["usd"]) == (correct, cost)
    assert report["quality_floor_dev"] == float(Fraction(target) * Fraction(5, 6))
    assert report["candidates"] == 7


def test_the_report_on_test_items_at_the_picked_threshold():
    report = cascade_report(small_large(), task="triviaqa", target="0.95", dev_items=6)
    assert report["split"] == {"dev_items": 6, "test_items": 3, "dev_index": [0, 5], "test_index": [6, 8]}
    test = report["test"]
    # t = -2: items 6 (-0.4) and 8 (-1.5) stay with the small model (both right), 7 (-2.5) goes on (right)
    assert [(m["name"], m["correct"], m["usd"], m["usd_per_1k_items"]) for m in test["models"]] == [
        ("small", 2, 3.0, 1000.0), ("large", 2, 12.0, 4000.0)]
    assert test["cascade"] == {"correct": 3, "quality": 1.0, "usd": 7.0, "usd_per_1k_items": 7000 / 3,
                               "answered_by": [2 / 3, 1 / 3], "fraction_first": 2 / 3, "quality_vs_last": 1.5,
                               "cost_vs_last": 7 / 12}
    dev = report["dev"]["cascade"]
    assert dev["fraction_first"] == 4 / 6 and dev["cost_vs_last"] == 14 / 24  # the large model alone: $4 x 6


def test_ties_go_to_the_higher_quality_then_the_lower_threshold():
    # item 0: small score -2, wrong; the large model gets it right for $0 more. item 1: small -1, right.
    # t = -1 sends item 0 on for free: the same $2 as -2 and -inf, one more right answer.
    a = results("a", [(-2.0, False, 1.0), (-1.0, True, 1.0)])
    b = results("b", [(0.0, True, 0.0), (0.0, True, 5.0)])
    # with item 0 alone as dev, every threshold costs $1 and only +inf (never accept) gets it right
    assert cascade_report([("a", a), ("b", b)], target="0.5", dev_items=1)["threshold"] == "+inf"
    models = models_of([("a", a), ("b", b)])
    points = sweep(models, [0, 1])
    assert [(p.threshold, p.correct, p.cost) for p in points] == [(-INF, 1, 2), (-2.0, 1, 2), (-1.0, 2, 2),
                                                                  (INF, 2, 7)]
    assert pick(points, Fraction(1, 2)).threshold == -1.0  # same $2 as -2 and -inf, one more right
    # equal cost and equal quality: the lower threshold
    assert pick([Point(-1.0, 2, 1, Fraction(2), (2, 0)), Point(-INF, 2, 1, Fraction(2), (2, 0)),
                 Point(-2.0, 2, 1, Fraction(2), (2, 0))], Fraction(0)).threshold == -INF


def test_costs_are_summed_exactly_so_equal_costs_tie():
    # $0.1 + $0.2 + $0.3 in two orders is 0.6000000000000001 or 0.6 in floats; exactly equal here
    assert (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)
    a = results("a", [(-1.0, True, 0.1), (-2.0, True, 0.2), (-3.0, True, 0.3)])
    b = results("b", [(0.0, True, 0.0), (0.0, True, 0.0), (0.0, True, 0.0)])
    points = sweep(models_of([("a", a), ("b", b)]), [0, 1, 2])
    assert len({p.cost for p in points}) == 1 and pick(points, Fraction(1)).threshold == -INF


def test_three_models_share_one_threshold_and_the_last_always_answers():
    # scores A, B; right A, B, C; costs $1, $2, $4 per item
    a = results("a", [(-1.0, False, 1.0), (-3.0, True, 1.0), (-2.0, True, 1.0)])
    b = results("b", [(-0.5, True, 2.0), (-1.0, False, 2.0), (-4.0, True, 2.0)])
    c = results("c", [(0.0, True, 4.0), (0.0, True, 4.0), (0.0, False, 4.0)])
    models = models_of([("a", a), ("b", b), ("c", c)])
    items = [0, 1, 2]
    assert candidates(models, items) == [-INF, -4.0, -3.0, -2.0, -1.0, -0.5, INF]
    # t = -1: item 0 A (wrong, $1); item 1 B (wrong, $3); item 2 C (wrong, $7)
    assert simulate(models, items, -1.0) == Point(-1.0, 3, 0, Fraction(11), (1, 1, 1))
    # t = -2: item 0 A (wrong, $1); item 1 B (wrong, $3); item 2 A (right, $1)
    assert simulate(models, items, -2.0) == Point(-2.0, 3, 1, Fraction(5), (2, 1, 0))
    assert simulate(models, items, INF) == Point(INF, 3, 2, Fraction(21), (0, 0, 3))
    assert sweep(models, items) == [simulate(models, items, t) for t in candidates(models, items)]


@pytest.mark.parametrize("seed", range(5))
def test_the_one_pass_sweep_equals_the_item_by_item_reference(seed):
    rng = random.Random(seed)
    k, n = rng.choice([2, 3, 4]), rng.randint(1, 40)
    runs = []
    for j in range(k):
        rows = [(rng.choice([-INF, *(-rng.randint(0, 8) / 4 for _ in range(3))]), rng.random() < 0.5,
                 rng.choice([0.1, 0.2, 0.3, 0.7]) * (j + 1)) for _ in range(n)]
        runs.append((f"m{j}", results(f"m{j}", rows)))
    models = models_of(runs)
    items = list(range(n))
    assert sweep(models, items) == [simulate(models, items, t) for t in candidates(models, items)]


def test_scores_come_from_the_token_logprobs_when_the_items_have_them():
    # token logprobs [-1, -3]: mean -2, min -3; the stored scores (0) are not used
    a = results("a", [(0.0, True, 1.0)])
    a["tasks"]["triviaqa"]["items"][0]["token_logprobs"] = [-1.0, -3.0]
    b = results("b", [(0.0, True, 1.0)])
    assert models_of([("a", a), ("b", b)])[0].score == (-2.0,)
    assert models_of([("a", a), ("b", b)], "min_logprob")[0].score == (-3.0,)


def test_generation_runs_written_and_read_back_give_a_cascade():
    # two fake models through the real task, results JSON and reader: b answers both, a only the first
    items = [GenerationItem(i, f"Question: {q}?\nAnswer:", (ans,)) for i, (q, ans) in
             enumerate([("a", "aa"), ("b", "bb"), ("c", "cc"), ("d", "dd")])]
    task = GenerationTask("qa", lambda: items, "t", "t")
    small = FakeBackend(answers={"Question: a?\nAnswer:": " aa", "Question: b?\nAnswer:": " bc"})
    large = FakeBackend(answers={p.prompt: " " + p.answers[0] for p in items})
    runs = [(name, json.loads(dumps(run_tasks(fb, [task], EvalOptions(), save_items=True))))
            for name, fb in (("small", small), ("large", large))]
    report = cascade_report(runs, target="1", dev_items=2)
    # dev: item 0 " aa" (mean -4.25/3, right), item 1 " bc" (mean -2, wrong): accept >= -4.25/3 only
    assert report["task"] == "qa" and report["threshold"] == -4.25 / 3
    assert report["dev"]["cascade"]["correct"] == 2 and report["dev"]["cascade"]["fraction_first"] == 0.5
    # test: the small model answers nothing (scores -inf), so every item goes on to the large one
    assert report["test"]["cascade"]["answered_by"] == [0.0, 1.0] and report["test"]["cascade"]["quality"] == 1.0


# ----------------------------------------------------------------------------- the command and its errors

def test_the_command_prints_a_table_and_json(tmp_path, capsys):
    paths = write(tmp_path, small_large())
    out_file = tmp_path / "cascade.json"
    assert main(["eval", "cascade", *paths, "--task", "triviaqa", "--dev-items", "6", "--output", str(out_file)]) == 0
    table = capsys.readouterr().out
    assert "threshold: -2 (the cheapest of 7 on dev with quality >= 0.7917)" in table
    test_row = next(line for line in table.splitlines() if line.startswith("test") and "cascade" in line)
    assert test_row.split() == ["test", "cascade", "1.0000", "2333", "0.667", "1.500", "0.583"]
    assert json.loads(out_file.read_text())["threshold"] == -2.0
    assert main(["eval", "cascade", *paths, "--dev-fraction", "2/3", "--json"]) == 0  # the only task: no --task
    report = json.loads(capsys.readouterr().out)
    assert report["threshold"] == -2.0 and report["split"]["dev_items"] == 6
    assert main(["eval", "cascade", *paths, "--json"]) == 0  # default: the first third, 3 dev items
    assert json.loads(capsys.readouterr().out)["split"]["dev_items"] == 3


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("leanserve: error: ") and err.count("\n") == 1, err
    return err.strip().removeprefix("leanserve: error: ")


@pytest.mark.parametrize("target", ["0", "1.5", "-0.2", "abc"])
def test_a_target_outside_zero_to_one_is_refused(tmp_path, capsys, target):
    paths = write(tmp_path, small_large())
    assert one_line_error(capsys, ["eval", "cascade", *paths, f"--target={target}"]).startswith("--target must be")


def broken(kind: str) -> list[tuple[str, dict]]:
    small, large = small_large()
    items = small[1]["tasks"]["triviaqa"]["items"]
    if kind == "items":
        del small[1]["tasks"]["triviaqa"]["items"]
    elif kind == "scores":
        for r in items:
            del r["scores"]
    elif kind == "cost":
        items[4]["cost_usd"] = None
    elif kind == "other items":
        large[1]["tasks"]["triviaqa"]["items"].pop()
    elif kind == "answers":
        items[3]["answer"] = "other"
    elif kind == "not generation":
        large[1]["tasks"]["triviaqa"]["kind"] = "multiple_choice"
    elif kind == "no task":
        large[1]["tasks"] = {"arc_easy": large[1]["tasks"]["triviaqa"]}
    return [small, large]


@pytest.mark.parametrize("kind, message", [
    ("items", "small has no per-item records for triviaqa: run leanserve eval with --save-items"),
    ("scores", "small: triviaqa item 0 has no token logprobs or confidence scores (a run from before cascades): "
               "run leanserve eval with --save-items again"),
    ("cost", "small: triviaqa item 4 has no cost_usd"),
    ("other items", "small and large hold other items of triviaqa (9 vs 8; item 8 is only in small): run every "
                    "model with the same --limit/--first/--seed"),
    ("answers", "item 3 of triviaqa has another reference answer in large than in small: not the same task data"),
    ("not generation", "triviaqa in large is a multiple_choice task; a cascade needs a generation task"),
    ("no task", "large has no task 'triviaqa' (it holds: arc_easy)"),
])
def test_unusable_results_files_are_one_line_errors(tmp_path, capsys, kind, message):
    paths = write(tmp_path, broken(kind))
    assert one_line_error(capsys, ["eval", "cascade", *paths, "--task", "triviaqa"]).startswith(message)


def test_other_user_errors(tmp_path, capsys):
    paths = write(tmp_path, small_large())
    assert one_line_error(capsys, ["eval", "cascade", paths[0]]) == \
        "a cascade needs two or more results files, the cheapest model first"
    assert one_line_error(capsys, ["eval", "cascade", *paths, "--dev-items", "9"]) == \
        "--dev-items 9 of 9 items leaves no test item"
    assert one_line_error(capsys, ["eval", "cascade", *paths, "--dev-fraction", "0.1"]) == \
        "--dev-fraction 0.1 of 9 items leaves no dev item"
    assert one_line_error(capsys, ["eval", "cascade", *paths, "--dev-fraction", "1"]) == \
        "--dev-fraction must be in (0, 1), got 1"
    assert "invalid choice: 'entropy'" in one_line_error(capsys, ["eval", "cascade", *paths, "--score", "entropy"])
    assert one_line_error(capsys, ["eval", "cascade", *paths, "--dev-items", "3", "--dev-fraction", "0.5"]) \
        .endswith("not allowed with argument --dev-items")
    missing = str(tmp_path / "nope.json")
    assert one_line_error(capsys, ["eval", "cascade", paths[0], missing]) == f"{missing}: not found"


def test_load_results_still_reads_a_cascade_input(tmp_path):
    paths = write(tmp_path, small_large())
    assert load_results(paths[0])["tasks"]["triviaqa"]["items"][5]["scores"] == {"mean_logprob": None,
                                                                                  "min_logprob": None}
