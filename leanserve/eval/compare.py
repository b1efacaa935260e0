"""`leanserve eval compare A.json B.json`: per task, B - A on the items both runs scored, with the
paired statistics that say whether the change is real, and what B costs relative to A.

Items are matched by task and item index, so both runs need their per-item records (``--save-items``).
Accuracy-like metrics (acc, acc_norm, exact_match): the difference of means with a paired bootstrap
95% CI and McNemar's exact p. Perplexity: the ratio B / A with a paired bootstrap 95% CI over windows
(or documents), when both runs cut the text into the same tokens; bits per byte beside it, which
compares across tokenizers. Cost: B / A of $ and machine-seconds per 1,000 items.
"""

from __future__ import annotations

import math
from typing import Any

from leanserve.eval.stats import mcnemar_exact, paired_bootstrap_diff, paired_bootstrap_ppl_ratio

ACCURACY_FIELDS = {
    "multiple_choice": (("acc", "correct"), ("acc_norm", "correct_norm")),
    "generation": (("exact_match", "correct"),),
}
COST_KEYS = ("usd_per_1k_items", "machine_seconds_per_1k_items")


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None or not a or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return b / a


def _items(run: dict[str, Any], name: str, task: str) -> dict[int, dict[str, Any]]:
    entry = run["tasks"][task]
    if not isinstance(entry.get("items"), list):
        raise ValueError(f"{name} has no per-item records for {task}: run leanserve eval with --save-items")
    return {int(r["index"]): r for r in entry["items"]}


def _same_windows(ra: dict[str, Any], rb: dict[str, Any]) -> bool:
    return all(ra.get(k) == rb.get(k) for k in ("tokens", "begin", "end", "score_from"))


def compare_task(a: dict[str, Any], b: dict[str, Any], task: str, names: tuple[str, str] = ("A", "B"),
                 resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    ea, eb = a["tasks"][task], b["tasks"][task]
    if ea.get("kind") != eb.get("kind"):
        raise ValueError(f"{task}: a {ea.get('kind')} task in {names[0]} but a {eb.get('kind')} task in {names[1]}")
    ia, ib = _items(a, names[0], task), _items(b, names[1], task)
    shared = sorted(set(ia) & set(ib))
    if not shared:
        raise ValueError(f"{task}: {names[0]} and {names[1]} share no item (other --limit, --first or --seed?)")
    kind = ea["kind"]
    out: dict[str, Any] = {"kind": kind, "main_metric": ea.get("main_metric"),
                           "higher_is_better": ea.get("higher_is_better", True), "items_shared": len(shared),
                           "items_a": len(ia), "items_b": len(ib), "metrics": {}, "notes": []}
    if kind in ACCURACY_FIELDS:
        for metric, key in ACCURACY_FIELDS[kind]:
            xa = [1.0 if ia[i][key] else 0.0 for i in shared]
            xb = [1.0 if ib[i][key] else 0.0 for i in shared]
            ci = paired_bootstrap_diff(xa, xb, resamples, seed)
            mc = mcnemar_exact([x > 0 for x in xa], [x > 0 for x in xb])
            out["metrics"][metric] = {"a": sum(xa) / len(xa), "b": sum(xb) / len(xb), "delta": ci.estimate,
                                      "ci95": [ci.low, ci.high], "mcnemar_p": mc.p_value,
                                      "only_a_right": mc.only_a, "only_b_right": mc.only_b}
    elif kind == "perplexity":
        if all(_same_windows(ia[i], ib[i]) for i in shared):
            nll_a, nll_b = [ia[i]["nll"] for i in shared], [ib[i]["nll"] for i in shared]
            tokens = [ia[i]["tokens"] for i in shared]
            ci = paired_bootstrap_ppl_ratio(nll_a, tokens, nll_b, tokens, resamples, seed)
            n = sum(tokens)
            out["metrics"]["perplexity"] = {"a": math.exp(sum(nll_a) / n) if n else None,
                                            "b": math.exp(sum(nll_b) / n) if n else None,
                                            "ratio": ci.estimate, "ci95": [ci.low, ci.high]}
        else:
            out["notes"].append("the runs cut the text into other tokens (another tokenizer or windowing): "
                                "their perplexities are not comparable; bits per byte is")
        bpb_a, bpb_b = ea["metrics"].get("bits_per_byte"), eb["metrics"].get("bits_per_byte")
        if len(shared) < max(len(ia), len(ib)):
            out["notes"].append("bits per byte is over each run's own items")
        out["metrics"]["bits_per_byte"] = {"a": bpb_a, "b": bpb_b,
                                           "delta": None if bpb_a is None or bpb_b is None else bpb_b - bpb_a,
                                           "ratio": _ratio(bpb_b, bpb_a)}
    else:
        raise ValueError(f"{task}: unknown task kind {kind!r}")
    ca, cb = ea.get("cost") or {}, eb.get("cost") or {}
    out["cost"] = {k: {"a": ca.get(k), "b": cb.get(k), "ratio": _ratio(cb.get(k), ca.get(k))} for k in COST_KEYS}
    return out


def compare_runs(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B"), resamples: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Every task both runs hold; ValueError when they hold none in common, or lack per-item records."""
    shared = [t for t in a["tasks"] if t in b["tasks"]]
    if not shared:
        raise ValueError(f"{names[0]} and {names[1]} have no task in common "
                         f"({', '.join(a['tasks']) or 'none'} vs {', '.join(b['tasks']) or 'none'})")
    return {
        "a": {"name": names[0], "label": a.get("label"), "backend": a.get("backend")},
        "b": {"name": names[1], "label": b.get("label"), "backend": b.get("backend")},
        "resamples": resamples, "seed": seed,
        "tasks": {t: compare_task(a, b, t, names, resamples, seed) for t in shared},
        "only_in_a": [t for t in a["tasks"] if t not in b["tasks"]],
        "only_in_b": [t for t in b["tasks"] if t not in a["tasks"]],
    }


def _signed(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.{digits}f}"


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def comparison_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """task, metric, A, B, change (B - A, or xB/A for perplexity), 95% CI, McNemar p, shared items."""
    rows = []
    for task, c in comparison["tasks"].items():
        for metric, m in c["metrics"].items():
            ci = m.get("ci95")
            if metric == "perplexity":
                change = "-" if m.get("ratio") is None else f"x{m['ratio']:.4f}"
                interval = "-" if not ci or ci[0] is None else f"[x{ci[0]:.4f}, x{ci[1]:.4f}]"
                a, b = _num(m.get("a"), 3), _num(m.get("b"), 3)
            else:
                change = _signed(m.get("delta"))
                interval = "-" if not ci else f"[{_signed(ci[0])}, {_signed(ci[1])}]"
                a, b = _num(m.get("a")), _num(m.get("b"))
            p = m.get("mcnemar_p")
            rows.append([task, metric, a, b, change, interval, "-" if p is None else f"{p:.4g}",
                         str(c["items_shared"])])
    return rows


def cost_rows(comparison: dict[str, Any]) -> list[list[str]]:
    rows = []
    for task, c in comparison["tasks"].items():
        usd, ms = c["cost"]["usd_per_1k_items"], c["cost"]["machine_seconds_per_1k_items"]
        rows.append([task, _num(usd["a"]), _num(usd["b"]), _num(usd["ratio"], 3), _num(ms["a"], 1), _num(ms["b"], 1),
                     _num(ms["ratio"], 3)])
    return rows


COMPARISON_HEADER = ["task", "metric", "A", "B", "B - A", "95% CI", "McNemar p", "items"]
COST_HEADER = ["task", "$/1k A", "$/1k B", "$ B/A", "machine-s/1k A", "machine-s/1k B", "machine-s B/A"]


def format_comparison(comparison: dict[str, Any]) -> str:
    from leanserve.bench.report import _table

    a, b = comparison["a"], comparison["b"]
    lines = [f"A: {a['name']} ({a.get('label')})", f"B: {b['name']} ({b.get('label')})", "",
             _table(COMPARISON_HEADER, comparison_rows(comparison)),
             f"(paired bootstrap, {comparison['resamples']} resamples, seed {comparison['seed']}; "
             "perplexity as the ratio B/A)", "", "cost, B relative to A:", _table(COST_HEADER, cost_rows(comparison))]
    for task, c in comparison["tasks"].items():
        lines += [f"note, {task}: {n}" for n in c["notes"]]
    if comparison["only_in_a"] or comparison["only_in_b"]:
        lines.append(f"not compared: only in A: {', '.join(comparison['only_in_a']) or '-'}; "
                     f"only in B: {', '.join(comparison['only_in_b']) or '-'}")
    return "\n".join(lines)
