"""The eval report as one self-contained HTML file: a quality-vs-cost chart per task (one labelled
point per configuration), the tables, and the paired comparison of each run with the first.

Drawn like `leanserve bench --html` (its frame, ticks, palette and CSS): inline SVG, no script,
nothing fetched. Each chart sits in ``<figure class="chart" data-chart="quality-vs-cost-TASK">``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from leanserve.bench.report import CSS, PALETTE, _esc, _figure, _Frame, _html_table, fmt_tick, nice_ticks
from leanserve.eval.compare import COMPARISON_HEADER, COST_HEADER, compare_runs, comparison_rows, cost_rows
from leanserve.eval.run import METRIC_DIGITS, fmt

METRIC_LABELS = {"acc": "accuracy", "acc_norm": "length-normalized accuracy", "exact_match": "exact match",
                 "bits_per_byte": "bits per byte, lower is better", "perplexity": "perplexity, lower is better"}
FRACTIONS = ("acc", "acc_norm", "exact_match")
LABEL_CHAR_PX = 6.2  # about one character of an 11px label

DEFINITIONS = (
    "acc: the choice with the highest summed log-probability is right. acc_norm: the same, the sum divided by the "
    "choice's UTF-8 bytes. exact_match: the greedy answer equals the answer or an alias after SQuAD normalization. "
    "Perplexity: exp(mean NLL per token); bits per byte: total NLL / ln 2 / UTF-8 bytes of the scored text. "
    "Cost from the backend's own meter (machine-seconds; $ from the engine's price basis or the server's usage.cost): "
    "$ per 1,000 items = $ / items x 1000; $/Mtok over prompt + output tokens. Paired statistics on the items both "
    "runs scored: bootstrap 95% CI (percentile, seeded) and McNemar's exact p."
)

Named = Sequence[tuple[str, dict[str, Any]]]


def _x_of(entries: Sequence[dict[str, Any]]) -> tuple[str, list[float]]:
    """$ per 1,000 items when every run has it, else machine-seconds per 1,000 items."""
    usd = [(e.get("cost") or {}).get("usd_per_1k_items") for e in entries]
    if all(v is not None and math.isfinite(v) for v in usd):
        return "$ per 1,000 items", [float(v) for v in usd]
    ms = [(e.get("cost") or {}).get("machine_seconds_per_1k_items") for e in entries]
    return "machine-seconds per 1,000 items", [float(v) if v is not None and math.isfinite(v) else 0.0 for v in ms]


def quality_cost_svg(task: str, labels: Sequence[str], entries: Sequence[dict[str, Any]]) -> str:
    """One labelled point per configuration: x its cost per 1,000 items, y the task's main metric."""
    metric = entries[0].get("main_metric") or next(iter(entries[0]["metrics"]))
    xlabel, xs = _x_of(entries)
    ys = [e["metrics"].get(metric) for e in entries]
    ys = [float(y) if y is not None and math.isfinite(y) else math.nan for y in ys]
    finite = [y for y in ys if math.isfinite(y)]
    ylo, yhi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (yhi - ylo) * 0.15 or max(abs(ylo) * 0.05, 0.01)
    ylo, yhi = max(0.0, ylo - pad), yhi + pad  # every metric here is >= 0
    if metric in FRACTIONS:
        yhi = min(1.0, yhi)
    xhi = max(xs) * 1.15 if max(xs) > 0 else 1.0
    f = _Frame(0.0, xhi, ylo, yhi, xticks=nice_ticks(0.0, xhi), yticks=nice_ticks(ylo, yhi))
    p = f.open(f"{task}: quality vs cost", xlabel, f"{metric} ({METRIC_LABELS.get(metric, metric)})")
    for i, (label, x, y) in enumerate(zip(labels, xs, ys)):
        if not math.isfinite(y):
            continue
        color = PALETTE[i % len(PALETTE)]
        cx, cy = f.px(x), f.py(y)
        short = label if len(label) <= 28 else label[:27] + "…"
        fits_right = cx + 8 + LABEL_CHAR_PX * len(short) <= f.W - f.R
        anchor, dx = ("start", 8) if fits_right else ("end", -8)
        p.append(f'<circle class="point" cx="{cx:.2f}" cy="{cy:.2f}" r="5" fill="{color}">'
                 f'<title>{_esc(label)}: {metric} {fmt_tick(y)}, {_esc(xlabel)} {fmt_tick(x)}</title></circle>')
        p.append(f'<text class="point-label" x="{cx + dx:.1f}" y="{cy - 7:.1f}" text-anchor="{anchor}" '
                 f'fill="{color}">{_esc(short)}</text>')
    p.append("</svg>")
    return "\n".join(p)


def _tasks_in_order(runs: Named) -> list[str]:
    order: dict[str, None] = {}
    for _, r in runs:
        order.update(dict.fromkeys(r["tasks"]))
    return list(order)


def _task_table(task: str, runs: Named) -> str:
    have = [(n, r["tasks"][task]) for n, r in runs if task in r["tasks"]]
    metrics = list(dict.fromkeys(k for _, e in have for k in e["metrics"]))
    header = ["configuration", *metrics, "items", "$/1k items", "machine-s/1k items", "$/Mtok", "items/s", "wall s"]
    rows = []
    for name, e in have:
        c = e.get("cost") or {}
        rows.append([name, *(fmt(e["metrics"].get(k), METRIC_DIGITS.get(k, 4)) for k in metrics), str(e["num_items"]),
                     fmt(c.get("usd_per_1k_items"), 4), fmt(c.get("machine_seconds_per_1k_items"), 1),
                     fmt(c.get("usd_per_million_tokens"), 4), fmt(c.get("items_per_second"), 2),
                     fmt(c.get("wall_seconds"), 1)])
    return _html_table(header, rows)


def _run_summary(name: str, r: dict[str, Any]) -> str:
    b = r.get("backend") or {}
    where = b.get("base_url") or b.get("model_path") or b.get("model")
    commit = r.get("git_commit")
    return (f"{name}: {b.get('backend', '?')} backend, {where}; leanserve {r.get('leanserve_version')}"
            + (f", commit {str(commit)[:12]}" if commit else "") + f"; {r.get('date')}")


def render_report(runs: Named) -> str:
    """The page for one or more results documents, each named (its label, or its file's name)."""
    names = [n for n, _ in runs]
    tasks = _tasks_in_order(runs)
    body = ["<h1>leanserve eval report</h1>",
            f'<p class="sub">{_esc(str(len(runs)))} configuration(s), {_esc(str(len(tasks)))} task(s): '
            f'{_esc(", ".join(tasks))}</p>',
            '<p class="note">' + "<br>".join(_esc(_run_summary(n, r)) for n, r in runs) + "</p>"]
    charts = []
    for task in tasks:
        have = [(n, r["tasks"][task]) for n, r in runs if task in r["tasks"]]
        svg = quality_cost_svg(task, [n for n, _ in have], [e for _, e in have])
        caption = f"One point per configuration. {have[0][1].get('prompt_format', '')}"
        charts.append(_figure(f"quality-vs-cost-{task}", svg, caption))
    body.append("<h2>Quality against cost</h2>")
    body.append('<div class="charts">' + "\n".join(charts) + "</div>")
    for task in tasks:
        body.append(f"<h2>{_esc(task)}</h2>")
        body.append(_task_table(task, runs))
    if len(runs) > 1:
        body.append(f"<h2>Paired comparison with {_esc(names[0])}</h2>")
        for name, r in runs[1:]:
            try:
                c = compare_runs(runs[0][1], r, (names[0], name))
            except ValueError as e:  # no per-item records, or no shared items: the tables above still hold
                body.append(f'<p class="note">{_esc(name)}: no paired statistics ({_esc(str(e))}).</p>')
                continue
            body.append(f"<h3>{_esc(name)} (B) against {_esc(names[0])} (A)</h3>")
            body.append(_html_table(COMPARISON_HEADER, comparison_rows(c)))
            body.append(_html_table(COST_HEADER, cost_rows(c)))
            for task, t in c["tasks"].items():
                for note in t["notes"]:
                    body.append(f'<p class="note">{_esc(task)}: {_esc(note)}</p>')
    body.append("<h2>Configurations</h2>")
    for name, r in runs:
        cfg = {k: r.get(k) for k in ("label", "date", "leanserve_version", "git_commit", "backend", "options")}
        cfg["tasks"] = {t: {k: e.get(k) for k in ("selection", "details", "cost")} for t, e in r["tasks"].items()}
        body.append(f"<details><summary>{_esc(name)} (JSON)</summary><pre>"
                    f"{_esc(json.dumps(cfg, indent=2, default=str))}</pre></details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>leanserve eval report</title>\n"
            f"<style>{CSS}\nsvg .point-label{{font-size:11px}}h3{{font-size:14px;margin:18px 0 6px}}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) +
            f"\n<footer>{_esc(DEFINITIONS)}<br>Generated by leanserve eval; self-contained, no network.</footer>\n"
            "</body>\n</html>\n")


def run_names(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Name each run by its label, or by the given name (its file's stem) when labels repeat."""
    labels = [r.get("label") or n for n, r in runs]
    if len(set(labels)) == len(labels):
        return [(label, r) for label, (_, r) in zip(labels, runs)]
    return [(f"{n} ({r.get('label')})" if r.get("label") else n, r) for n, r in runs]
