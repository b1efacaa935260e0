"""`leanserve eval cascade SMALL.json LARGE.json [MORE.json ...]`: the confidence threshold at which a
cascade reaches a target quality for the least cost, picked on a dev split and reported on a held-out
test split beside each model alone.

A cascade tries the cheapest model first and accepts its answer when the answer's confidence score
(``gateway/confidence.py``: the same functions the server's cascade uses) reaches the threshold t,
else asks the next model; the last model always answers, and every model tried is paid for. From
per-item results of each model alone (the same generation task on the same items, ``--save-items``),
the cascade at any t is simulated exactly, with no new generation:

    answered by   the first model j before the last with score_j >= t, else the last
                  (one t for every step: a threshold per step is more than a dev split can fit)
    cost          the sum of the costs of models 1 .. answered-by, for that item
    quality       the mean correctness of the answering model

Items are split by index: dev = the first part, test = the rest. On dev, every candidate t (each
distinct dev score of the models before the last, plus -inf: always accept, and +inf: never accept)
is simulated; the pick is the lowest dev cost among the candidates whose dev quality is at least
target x the last model's dev quality (ties: the higher quality, then the lower t). Costs are summed
as fractions of the float costs and qualities are counts, so the comparisons are exact and ties are
ties. +inf always qualifies (it is the last model alone, and target <= 1), so there is always a pick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from leanserve.gateway.confidence import DEFAULT_SCORE, answer_score, get_score

RESULTS_KIND = "leanserve-eval-cascade"
DEFAULT_DEV_FRACTION = Fraction(1, 3)
SAVE_ITEMS = "run leanserve eval with --save-items"


@dataclass(frozen=True)
class ModelItems:
    """One model's per-item results on the shared items, in item-index order."""

    name: str  # the results file's name
    label: str | None  # the run's label (model and settings)
    correct: tuple[bool, ...]
    cost: tuple[Fraction, ...]  # $ of each item, exactly the float the run recorded
    score: tuple[float, ...]  # the confidence score of each answer; -inf for an answer with no tokens


@dataclass(frozen=True)
class Point:
    """The cascade at one threshold over some items."""

    threshold: float
    items: int
    correct: int
    cost: Fraction  # $ of all the items together
    answered: tuple[int, ...]  # how many items each model answered

    @property
    def quality(self) -> Fraction:
        return Fraction(self.correct, self.items)


# ----------------------------------------------------------------------------- simulation

def simulate(models: Sequence[ModelItems], items: Sequence[int], threshold: float) -> Point:
    """The cascade at ``threshold`` over ``items`` (positions): the reference, item by item."""
    k = len(models)
    correct, cost, answered = 0, Fraction(0), [0] * k
    for i in items:
        j = 0
        while j < k - 1 and not models[j].score[i] >= threshold:
            j += 1
        cost += sum((models[m].cost[i] for m in range(j + 1)), Fraction(0))
        correct += models[j].correct[i]
        answered[j] += 1
    return Point(threshold, len(items), correct, cost, tuple(answered))


def candidates(models: Sequence[ModelItems], items: Sequence[int]) -> list[float]:
    """-inf, every distinct score of the models before the last on ``items``, +inf; ascending."""
    values = {models[j].score[i] for j in range(len(models) - 1) for i in items}
    return sorted(values | {-math.inf, math.inf})


def sweep(models: Sequence[ModelItems], items: Sequence[int]) -> list[Point]:
    """`simulate` at every candidate threshold, ascending, in one pass: from t = +inf (the last model
    answers everything) down, an item moves to model j once t falls to its score there."""
    k = len(models)
    # prefix[n][j]: what item items[n] costs when model j answers it (models 0..j tried)
    prefix = []
    for i in items:
        acc, row = Fraction(0), []
        for m in models:
            acc += m.cost[i]
            row.append(acc)
        prefix.append(row)
    events = sorted(((models[j].score[i], n, j) for n, i in enumerate(items) for j in range(k - 1)), reverse=True)
    by = [k - 1] * len(items)  # the model answering each item at the current threshold
    cost = sum((row[k - 1] for row in prefix), Fraction(0))
    correct = sum(models[k - 1].correct[i] for i in items)
    answered = [0] * k
    answered[k - 1] = len(items)
    points, e = [], 0
    for t in reversed(candidates(models, items)):
        while e < len(events) and events[e][0] >= t:
            _, n, j = events[e]
            e += 1
            was = by[n]
            if j < was:
                i = items[n]
                cost += prefix[n][j] - prefix[n][was]
                correct += models[j].correct[i] - models[was].correct[i]
                answered[was] -= 1
                answered[j] += 1
                by[n] = j
        points.append(Point(t, len(items), correct, cost, tuple(answered)))
    points.reverse()
    return points


def pick(points: Sequence[Point], floor: Fraction) -> Point:
    """The cheapest point whose quality is at least ``floor``; ties: the higher quality, then the lower
    threshold. ValueError when none qualifies."""
    ok = [p for p in points if p.quality >= floor]
    if not ok:
        raise ValueError(f"no threshold reaches quality {float(floor):.4f}")
    return min(ok, key=lambda p: (p.cost, -p.quality, p.threshold))


# ----------------------------------------------------------------------------- reading results files

def parse_target(value: Any) -> Fraction:
    """The target as an exact fraction ("0.95" is 19/20, not the float nearest it); in (0, 1]."""
    try:
        target = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--target must be a number in (0, 1], got {value!r}") from None
    if not 0 < target <= 1:
        raise ValueError(f"--target must be in (0, 1] (a share of the largest model's quality), got {value}")
    return target


def _score_of(record: dict[str, Any], score: str) -> float | None:
    """The item's confidence score: recomputed from its token logprobs (and its text: an empty answer
    scores -inf, as in the server's cascade) when the record has them, so any score in SCORES applies
    to older files too; else the stored one (null: -inf)."""
    lps = record.get("token_logprobs")
    if isinstance(lps, list):
        values = [-math.inf if v is None else float(v) for v in lps]
        text = record.get("generated")
        return answer_score(score, text, values) if isinstance(text, str) else get_score(score)(values)
    scores = record.get("scores")
    if isinstance(scores, dict) and score in scores:
        v = scores[score]
        return -math.inf if v is None else float(v)
    return None


def _generation_task(name: str, run: dict[str, Any], task: str) -> dict[str, Any]:
    tasks = run.get("tasks") or {}
    if task not in tasks:
        raise ValueError(f"{name} has no task {task!r} (it holds: {', '.join(tasks) or 'none'})")
    entry = tasks[task]
    if entry.get("kind") != "generation":
        raise ValueError(f"{task} in {name} is a {entry.get('kind')} task; a cascade needs a generation task "
                         "(an answer and its token logprobs), e.g. triviaqa")
    return entry


def choose_task(runs: Sequence[tuple[str, dict[str, Any]]], task: str | None) -> str:
    """``task``, or the one generation task every run holds when none is given."""
    if task is not None:
        return task
    common = [t for t, e in (runs[0][1].get("tasks") or {}).items()
              if e.get("kind") == "generation" and all(t in (r.get("tasks") or {}) for _, r in runs[1:])]
    if len(common) != 1:
        raise ValueError("give --task: the files hold " + (f"{len(common)} generation tasks in common "
                                                           f"({', '.join(common)})" if common else
                                                           "no generation task in common"))
    return common[0]


def load_models(runs: Sequence[tuple[str, dict[str, Any]]], task: str, score: str = DEFAULT_SCORE
                ) -> tuple[list[int], list[ModelItems]]:
    """(item indices, each run's per-item results in that order) for ``task``; ValueError (one line)
    when a run lacks the task, it is not a generation task, the per-item records, scores or costs are
    missing, or the runs hold other items."""
    get_score(score)  # an unknown name fails first
    if len(runs) < 2:
        raise ValueError("a cascade needs two or more results files, the cheapest model first")
    records: list[dict[int, dict[str, Any]]] = []
    for name, run in runs:
        entry = _generation_task(name, run, task)
        items = entry.get("items")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{name} has no per-item records for {task}: {SAVE_ITEMS}")
        records.append({int(r["index"]): r for r in items})
    indices = sorted(records[0])
    for (name, _), recs in zip(runs[1:], records[1:]):
        if set(recs) != set(indices):
            only = sorted(set(recs) ^ set(indices))[0]
            where = name if only in recs else runs[0][0]
            raise ValueError(f"{runs[0][0]} and {name} hold other items of {task} ({len(indices)} vs {len(recs)}; "
                             f"item {only} is only in {where}): run every model with the same --limit/--first/--seed")
        for i in indices:
            if recs[i].get("answer") != records[0][i].get("answer"):
                raise ValueError(f"item {i} of {task} has another reference answer in {name} than in {runs[0][0]}: "
                                 "not the same task data")
    models = []
    for (name, run), recs in zip(runs, records):
        correct, cost, scores = [], [], []
        for i in indices:
            r = recs[i]
            s = _score_of(r, score)
            if s is None:
                raise ValueError(f"{name}: {task} item {i} has no token logprobs or confidence scores (a run from "
                                 f"before cascades): {SAVE_ITEMS} again")
            if math.isnan(s) or s == math.inf:
                raise ValueError(f"{name}: {task} item {i} has the score {s} (scores are log-probabilities: "
                                 "finite, or -inf for no tokens)")
            usd = r.get("cost_usd")
            if not isinstance(usd, int | float) or isinstance(usd, bool) or not math.isfinite(usd):
                raise ValueError(f"{name}: {task} item {i} has no cost_usd (a server that reports no usage.cost, "
                                 f"or a run from before cascades): a cascade needs each item's cost; {SAVE_ITEMS}")
            correct.append(bool(r.get("correct")))
            cost.append(Fraction(usd))
            scores.append(s)
        models.append(ModelItems(name, run.get("label"), tuple(correct), tuple(cost), tuple(scores)))
    return indices, models


def split(n: int, dev_fraction: Any = None, dev_items: int | None = None) -> int:
    """How many of ``n`` items (in index order) are dev: ``dev_items``, or floor(``dev_fraction`` x n)
    (default 1/3); at least one dev and one test item."""
    if dev_items is not None and dev_fraction is not None:
        raise ValueError("--dev-fraction and --dev-items exclude each other")
    if dev_items is not None:
        k, how = dev_items, f"--dev-items {dev_items}"
    else:
        try:
            frac = DEFAULT_DEV_FRACTION if dev_fraction is None else Fraction(str(dev_fraction))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--dev-fraction must be a number in (0, 1), got {dev_fraction!r}") from None
        if not 0 < frac < 1:
            raise ValueError(f"--dev-fraction must be in (0, 1), got {dev_fraction}")
        k, how = math.floor(frac * n), f"--dev-fraction {dev_fraction if dev_fraction is not None else '1/3'}"
    if k < 1:
        raise ValueError(f"{how} of {n} items leaves no dev item")
    if k >= n:
        raise ValueError(f"{how} of {n} items leaves no test item")
    return k


# ----------------------------------------------------------------------------- the whole command

def _threshold(t: float) -> float | str:
    """JSON has no infinity: -inf and +inf as the strings "-inf" and "+inf" (float() reads both)."""
    return t if math.isfinite(t) else ("+inf" if t > 0 else "-inf")


def _ratio(a: Fraction, b: Fraction) -> float | None:
    return float(a / b) if b else None


def figures(models: Sequence[ModelItems], items: Sequence[int], point: Point) -> dict[str, Any]:
    """Each model alone and the cascade at ``point`` over ``items``: quality, $ per 1,000 items, who
    answered, and the cascade relative to the last model."""
    n = len(items)
    alone = []
    for m in models:
        c = sum(m.correct[i] for i in items)
        usd = sum((m.cost[i] for i in items), Fraction(0))
        alone.append({"name": m.name, "label": m.label, "correct": c, "quality": c / n, "usd": float(usd),
                      "usd_per_1k_items": float(usd * 1000 / n), "_usd": usd})
    last = alone[-1]
    out = {"items": n,
           "models": [{k: v for k, v in a.items() if k != "_usd"} for a in alone],
           "cascade": {"correct": point.correct, "quality": float(point.quality), "usd": float(point.cost),
                       "usd_per_1k_items": float(point.cost * 1000 / n),
                       "answered_by": [a / n for a in point.answered], "fraction_first": point.answered[0] / n,
                       "quality_vs_last": _ratio(point.quality, Fraction(last["correct"], n)),
                       "cost_vs_last": _ratio(point.cost, last["_usd"])}}
    return out


def cascade_report(runs: Sequence[tuple[str, dict[str, Any]]], task: str | None = None, target: Any = "0.95",
                   score: str = DEFAULT_SCORE, dev_fraction: Any = None, dev_items: int | None = None
                   ) -> dict[str, Any]:
    """The whole `leanserve eval cascade`: load, split, sweep dev, pick, report test (module docstring)."""
    goal = parse_target(target)
    task = choose_task(runs, task)
    indices, models = load_models(runs, task, score)
    n_dev = split(len(indices), dev_fraction, dev_items)
    dev, test = list(range(n_dev)), list(range(n_dev, len(indices)))
    points = sweep(models, dev)
    last_dev = Fraction(sum(models[-1].correct[i] for i in dev), len(dev))
    floor = goal * last_dev
    best = pick(points, floor)
    return {
        "kind": RESULTS_KIND, "task": task, "score": score, "target": float(goal),
        "models": [{"name": m.name, "label": m.label} for m in models],
        "split": {"dev_items": len(dev), "test_items": len(test),
                  "dev_index": [indices[0], indices[n_dev - 1]], "test_index": [indices[n_dev], indices[-1]]},
        "threshold": _threshold(best.threshold), "candidates": len(points),
        "quality_floor_dev": float(floor),
        "dev": figures(models, dev, best),
        "test": figures(models, test, simulate(models, test, best.threshold)),
    }


def _t(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:.6g}"


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _usd(v: float) -> str:
    """4 significant digits, trailing zeros kept (0.01000, 0.002815, 2333), so a column lines up."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    rounded = float(f"{v:.4g}")  # 0.0099999 is 0.01000, not 0.010000
    return f"{v:.{max(0, 3 - math.floor(math.log10(abs(rounded))))}f}"


def format_cascade(report: dict[str, Any]) -> str:
    from leanserve.bench.report import _table

    models = report["models"]
    first, last = models[0]["name"], models[-1]["name"]
    lines = [f"cascade: {report['task']}, score {report['score']}, target {report['target']:g} x {last}'s quality",
             "models, cheapest first: " + ", ".join(f"{m['name']} ({m['label']})" for m in models),
             f"dev: items {report['split']['dev_index'][0]}..{report['split']['dev_index'][1]} "
             f"({report['split']['dev_items']}); test: items {report['split']['test_index'][0]}.."
             f"{report['split']['test_index'][1]} ({report['split']['test_items']})",
             f"threshold: {_t(report['threshold'])} (the cheapest of {report['candidates']} on dev with quality >= "
             f"{report['quality_floor_dev']:.4f})", ""]
    rows = []
    for part in ("dev", "test"):
        f = report[part]
        for m in f["models"]:
            rows.append([part, f"{m['name']} alone", _num(m["quality"]), _usd(m["usd_per_1k_items"]),
                         "-", "-", "-"])
        c = f["cascade"]
        rows.append([part, "cascade", _num(c["quality"]), _usd(c["usd_per_1k_items"]), _num(c["fraction_first"], 3),
                     _num(c["quality_vs_last"], 3), _num(c["cost_vs_last"], 3)])
    lines.append(_table(["split", "configuration", "quality", "$/1k items", f"answered by {first}",
                         f"quality / {last}", f"$ / {last}"], rows))
    if len(models) > 2:
        for part in ("dev", "test"):
            shares = report[part]["cascade"]["answered_by"]
            lines.append(f"{part}: answered by " + ", ".join(f"{m['name']} {s:.3f}" for m, s in zip(models, shares)))
    return "\n".join(lines)
