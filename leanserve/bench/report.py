"""Reports: the terminal summary, the side-by-side comparison, and one self-contained HTML file.

The HTML needs no network and no script: every chart is an inline SVG drawn here in Python
(histograms, CDFs, line and bar charts). Each chart sits in ``<figure class="chart" data-chart=NAME>``.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable, Sequence

import numpy as np

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
           "#4b5563", "#65a30d")
LATENCY_LABELS = {
    "ttft": "Time to first token",
    "tpot": "Time per output token (excl. 1st)",
    "itl": "Inter-token latency",
    "e2el": "End-to-end latency",
}


# ----------------------------------------------------------------------------- text reports

def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def _pkeys(run: dict[str, Any], name: str) -> list[str]:
    keys = [k for k in run if k.startswith("p") and k.endswith(f"_{name}_ms") and k[1:-len(f"_{name}_ms")].replace(".", "").isdigit()]
    return sorted(keys, key=lambda k: float(k[1:-len(f"_{name}_ms")]))


def format_summary(result: dict[str, Any]) -> str:
    """vllm-bench-serve-style summary of one run (``kind`` run, or a run inside a sweep)."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<40}{_fmt(value, digits):<10}")

    row("Successful requests:", result.get("completed"))
    row("Failed requests:", result.get("failed"))
    if result.get("load"):
        load = result["load"]
        if load.get("request_rate") is not None:
            row("Request rate (req/s):", load["request_rate"])
        row("Max concurrency:", load.get("concurrency") if load.get("concurrency") else "unlimited")
    row("Benchmark duration (s):", result.get("duration"))
    row("Total input tokens:", result.get("total_input_tokens"))
    row("Total generated tokens:", result.get("total_output_tokens"))
    row("Request throughput (req/s):", result.get("request_throughput"))
    if "request_goodput" in result:
        row("Request goodput (req/s):", result.get("request_goodput"))
    row("Output token throughput (tok/s):", result.get("output_throughput"))
    row("Total token throughput (tok/s):", result.get("total_token_throughput"))
    row("Mean requests in flight:", result.get("mean_requests_in_flight"))
    if "prefix_cache_hit_rate" in result:
        row("Prefix cache hit rate:", result.get("prefix_cache_hit_rate"), 3)
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name, title in titles.items():
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        up = name.upper()
        row(f"Mean {up} (ms):", result.get(f"mean_{name}_ms"))
        row(f"Median {up} (ms):", result.get(f"median_{name}_ms"))
        for k in _pkeys(result, name):
            row(f"P{k[1:-len(f'_{name}_ms')]} {up} (ms):", result.get(k))
    lines.append("{s:{c}^{n}}".format(s="Cost", n=w, c="-"))
    cost = result.get("cost_assumption") or {}
    if cost.get("price_per_hour") is not None:
        row("Price assumed ($/h):", cost["price_per_hour"], 4)
        row("Hardware:", f"{cost.get('hardware')} x{cost.get('num_devices', 1)}")
        if cost.get("as_of"):
            row("Price source:", f"{cost.get('source')} (as of {cost.get('as_of')})")
    row("$ per 1M output tokens:", result.get("cost_per_million_output_tokens"), 4)
    row("$ per 1M total tokens:", result.get("cost_per_million_total_tokens"), 4)
    if result.get("server_reported_cost_usd") is not None:
        row("Server-reported cost ($):", result["server_reported_cost_usd"], 6)
        row("Server $ per 1M output tokens:", result.get("server_cost_per_million_output_tokens"), 4)
        row("Server $ per 1M total tokens:", result.get("server_cost_per_million_total_tokens"), 4)
    if cost.get("price_per_hour") is None and not result.get("server_reported_cost_usd"):
        lines.append("(no price: pass --price-per-hour or --hardware NAME)")
    if result.get("spec_accepted_tokens") is not None:
        lines.append("{s:{c}^{n}}".format(s="Speculative decoding", n=w, c="-"))
        row("Draft tokens accepted:", result["spec_accepted_tokens"])
        row("Draft tokens rejected:", result.get("spec_rejected_tokens"))
        row("Acceptance rate:", result.get("spec_acceptance_rate"), 3)
        row("Output tokens from drafts:", result.get("spec_accepted_share_of_output"), 3)
    lines.append("-" * w)
    row("Output tokens counted by:", result.get("output_tokens_counted_by"))
    if result.get("errors_by_kind"):
        row("Errors:", ", ".join(f"{k}: {v}" for k, v in result["errors_by_kind"].items()))
    lines.append("=" * w)
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text == "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: numeric columns right-aligned, others (and the first) left-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    numeric_col = [i > 0 and any(_is_number(str(r[i])) for r in rows) for i in range(len(header))]

    def line(cells: Sequence[Any], is_header: bool = False) -> str:
        parts = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            right = numeric_col[i] if is_header else (i > 0 and _is_number(str(c)))
            parts.append(str(c).rjust(w) if right else str(c).ljust(w))
        return "  ".join(parts).rstrip()

    out = [line(header, is_header=True), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _load_label(run: dict[str, Any]) -> str:
    load = run.get("load") or {}
    if load.get("request_rate") is not None:
        return f"rate {load['request_rate']:.3g}/s"
    if load.get("concurrency"):
        return f"conc {load['concurrency']}"
    return run.get("label") or "run"


def format_sweep(result: dict[str, Any]) -> str:
    rows = []
    for r in result.get("runs") or []:
        rows.append([
            _load_label(r), _fmt(r.get("mean_requests_in_flight"), 1), _fmt(r.get("request_throughput")),
            _fmt(r.get("output_throughput"), 1), _fmt(r.get("median_ttft_ms"), 1), _fmt(r.get("p99_ttft_ms"), 1),
            _fmt(r.get("median_tpot_ms"), 1), _fmt(r.get("p99_e2el_ms"), 0),
            _fmt(r.get("cost_per_million_output_tokens"), 4), str(r.get("failed", 0)),
        ])
    table = _table(["load", "in flight", "req/s", "out tok/s", "med TTFT", "p99 TTFT", "med TPOT", "p99 E2EL",
                    "$/Mtok out", "failed"], rows)
    sat = result.get("saturation") or {}
    head = (f"Sweep: saturation at concurrency {sat.get('concurrency')} "
            f"({_fmt(sat.get('max_request_throughput'))} req/s, {_fmt(sat.get('output_throughput'), 1)} output tok/s); "
            f"{sat.get('reason', '')}")
    return head + "\n" + table + "\n(latencies in ms)"


COMPARE_ROWS = (
    ("completed", "completed", 0), ("failed", "failed", 0), ("duration", "duration (s)", 2),
    ("request_throughput", "req/s", 2), ("output_throughput", "output tok/s", 1),
    ("total_token_throughput", "total tok/s", 1), ("request_goodput", "goodput (req/s)", 2),
    ("mean_ttft_ms", "mean TTFT (ms)", 1), ("median_ttft_ms", "median TTFT (ms)", 1), ("p99_ttft_ms", "p99 TTFT (ms)", 1),
    ("mean_tpot_ms", "mean TPOT (ms)", 2), ("median_tpot_ms", "median TPOT (ms)", 2), ("p99_tpot_ms", "p99 TPOT (ms)", 2),
    ("median_itl_ms", "median ITL (ms)", 2), ("p99_itl_ms", "p99 ITL (ms)", 2),
    ("median_e2el_ms", "median E2EL (ms)", 1), ("p99_e2el_ms", "p99 E2EL (ms)", 1),
    ("prefix_cache_hit_rate", "prefix cache hit rate", 3),
    ("cost_per_million_output_tokens", "$/Mtok output", 4), ("cost_per_million_total_tokens", "$/Mtok total", 4),
    ("server_cost_per_million_output_tokens", "server $/Mtok output", 4),
    ("spec_acceptance_rate", "draft acceptance", 3),
)


def compare_columns(named_results: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Flatten (name, result) pairs into (column label, run) pairs: a sweep gives one column per run."""
    from leanserve.bench.runner import result_runs

    cols = []
    for name, res in named_results:
        runs = result_runs(res)
        for r in runs:
            label = name if len(runs) == 1 else f"{name} [{_load_label(r)}]"
            r = dict(r)
            r.setdefault("cost_assumption", res.get("cost_assumption"))
            r.setdefault("server", res.get("server"))
            cols.append((label, r))
    return cols


def format_compare(named_results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    cols = compare_columns(named_results)
    rows = []
    for key, label, digits in COMPARE_ROWS:
        if not any(r.get(key) is not None for _, r in cols):
            continue
        rows.append([label] + [_fmt(r.get(key), digits) for _, r in cols])
    models = ["model"] + [str(((r.get("server") or {}).get("model")) or (r.get("model_id") or "-")) for _, r in cols]
    hw = ["hardware"] + [str((r.get("cost_assumption") or {}).get("hardware") or "-") for _, r in cols]
    return _table(["metric"] + [c for c, _ in cols], [models, hw] + rows)


# ----------------------------------------------------------------------------- SVG charts

def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def fmt_tick(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about ``n`` of them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


class _Frame:
    """Plot area geometry and data->pixel mapping for one chart."""

    W, H = 560, 330
    L, R, T, B = 64, 18, 40, 52

    def __init__(self, xlo: float, xhi: float, ylo: float, yhi: float, xticks: list[float] | None = None,
                 yticks: list[float] | None = None, n_legend: int = 0) -> None:
        # The legend sits under the x-axis label, two entries per row, so it never hides data.
        self.legend_rows = math.ceil(n_legend / 2)
        self.H = _Frame.H + (self.legend_rows * 16 + 4 if n_legend else 0)
        self.xt = xticks if xticks is not None else nice_ticks(xlo, xhi)
        self.yt = yticks if yticks is not None else nice_ticks(ylo, yhi)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]

    @property
    def pw(self) -> float:
        return self.W - self.L - self.R

    @property
    def ph(self) -> float:
        return _Frame.H - self.T - self.B

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.L + (x - self.x0) / span * self.pw

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.T + self.ph - (y - self.y0) / span * self.ph

    def open(self, title: str, xlabel: str, ylabel: str, xtick_labels: dict[float, str] | None = None) -> list[str]:
        p = [f'<svg class="plot" viewBox="0 0 {self.W} {self.H}" width="{self.W}" height="{self.H}" role="img" '
             f'aria-label="{_esc(title)}">',
             f'<rect class="bg" x="0" y="0" width="{self.W}" height="{self.H}" fill="#ffffff"/>',
             f'<text x="{self.W / 2:.1f}" y="22" text-anchor="middle" class="title">{_esc(title)}</text>']
        for t in self.yt:
            y = self.py(t)
            p.append(f'<line class="grid" x1="{self.L}" y1="{y:.1f}" x2="{self.W - self.R}" y2="{y:.1f}"/>')
            p.append(f'<text x="{self.L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{fmt_tick(t)}</text>')
        for t in self.xt:
            x = self.px(t)
            label = (xtick_labels or {}).get(t, fmt_tick(t))
            p.append(f'<line class="tickmark" x1="{x:.1f}" y1="{self.T + self.ph}" x2="{x:.1f}" y2="{self.T + self.ph + 4}"/>')
            p.append(f'<text x="{x:.1f}" y="{self.T + self.ph + 17}" text-anchor="middle" class="tick">{_esc(label)}</text>')
        p.append(f'<line class="axis" x1="{self.L}" y1="{self.T + self.ph}" x2="{self.W - self.R}" y2="{self.T + self.ph}"/>')
        p.append(f'<line class="axis" x1="{self.L}" y1="{self.T}" x2="{self.L}" y2="{self.T + self.ph}"/>')
        p.append(f'<text x="{self.L + self.pw / 2:.1f}" y="{_Frame.H - 10}" text-anchor="middle" class="label">{_esc(xlabel)}</text>')
        p.append(f'<text x="14" y="{self.T + self.ph / 2:.1f}" text-anchor="middle" class="label" '
                 f'transform="rotate(-90 14 {self.T + self.ph / 2:.1f})">{_esc(ylabel)}</text>')
        return p

    def legend(self, items: Sequence[tuple[str, str, bool]]) -> list[str]:
        """items: (name, color, dashed), laid out two per row below the plot."""
        if not items:
            return []
        p = []
        col_w = (self.W - self.L - self.R) / 2
        for i, (name, color, dashed) in enumerate(items):
            x = self.L + col_w * (i % 2)
            yy = _Frame.H + 4 + 16 * (i // 2)
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            short = name if len(name) <= 40 else name[:39] + "…"
            p.append(f'<line class="legend-key" x1="{x:.1f}" y1="{yy - 4}" x2="{x + 20:.1f}" y2="{yy - 4}" '
                     f'stroke="{color}" stroke-width="2.5"{dash}/>')
            p.append(f'<text x="{x + 26:.1f}" y="{yy}" class="legend-text">{_esc(short)}</text>')
        return p


def _empty_svg(title: str) -> str:
    f = _Frame(0, 1, 0, 1)
    p = f.open(title, "", "")
    p.append(f'<text x="{f.W / 2}" y="{f.H / 2}" text-anchor="middle" class="empty">no data</text></svg>')
    return "\n".join(p)


def histogram_svg(values: Sequence[float], title: str, xlabel: str, bins: int = 30, color: str = PALETTE[0]) -> str:
    """Histogram of ``values`` with median and p99 markers."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return _empty_svg(title)
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo < 1e-9:
        pad = max(abs(lo) * 0.05, 0.5)
        lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    top = int(counts.max())
    # Counts get whole-number ticks.
    step = 1 if top <= 6 else math.ceil(nice_ticks(0, top)[1])
    yticks = [float(t) for t in range(0, top + step, step)]
    f = _Frame(lo, hi, 0, float(top), yticks=yticks, n_legend=2)
    p = f.open(title, xlabel, "requests" if "ITL" not in title.upper() else "chunks")
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c == 0:
            continue
        x, x2, y = f.px(a), f.px(b), f.py(c)
        p.append(f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{max(0.8, x2 - x - 0.6):.2f}" '
                 f'height="{f.T + f.ph - y:.2f}" fill="{color}"><title>{fmt_tick(a)}-{fmt_tick(b)}: {int(c)}</title></rect>')
    for name, q, col in (("median", 50, "#111827"), ("p99", 99, "#dc2626")):
        v = float(np.percentile(vals, q))
        x = f.px(v)
        p.append(f'<line class="marker" x1="{x:.1f}" y1="{f.T}" x2="{x:.1f}" y2="{f.T + f.ph}" stroke="{col}" '
                 f'stroke-dasharray="4 3" stroke-width="1.5"/>')
    p += f.legend([(f"median {fmt_tick(float(np.median(vals)))}", "#111827", True),
                   (f"p99 {fmt_tick(float(np.percentile(vals, 99)))}", "#dc2626", True)])
    p.append("</svg>")
    return "\n".join(p)


def line_chart_svg(series: Sequence[dict[str, Any]], title: str, xlabel: str, ylabel: str,
                   vlines: Sequence[tuple[float, str]] = (), ylo: float | None = 0.0, markers: bool = True,
                   connect: bool = True) -> str:
    """series: dicts with name, xs, ys, and optional color, dashed, labels. Points sorted by x.
    ``connect`` False draws a scatter (points only)."""
    pts_all = [(x, y) for s in series for x, y in zip(s["xs"], s["ys"])
               if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if not pts_all:
        return _empty_svg(title)
    xs = [x for x, _ in pts_all] + [v for v, _ in vlines]
    ys = [y for _, y in pts_all]
    xlo, xhi = min(xs), max(xs)
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 0.5, xhi + 0.5
    n_legend = sum(1 for s in series if any(x is not None and y is not None for x, y in zip(s["xs"], s["ys"])))
    f = _Frame(xlo, xhi, min(ys) if ylo is None else min(ylo, min(ys)), max(ys), n_legend=n_legend)
    p = f.open(title, xlabel, ylabel)
    legend = []
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        pts = sorted((x, y) for x, y in zip(s["xs"], s["ys"])
                     if x is not None and y is not None and math.isfinite(x) and math.isfinite(y))
        if not pts:
            continue
        if connect:
            d = "M" + " L".join(f"{f.px(x):.2f},{f.py(y):.2f}" for x, y in pts)
            dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
            p.append(f'<path class="series" d="{d}" fill="none" stroke="{color}" stroke-width="2.2"{dash}>'
                     f'<title>{_esc(s["name"])}</title></path>')
        if markers and (len(pts) <= 60 or not connect):
            labels = s.get("labels") or []
            for j, (x, y) in enumerate(sorted(zip(s["xs"], s["ys"]), key=lambda t: t[0])):
                if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                    continue
                tip = labels[j] if j < len(labels) else ""
                p.append(f'<circle class="point" cx="{f.px(x):.2f}" cy="{f.py(y):.2f}" r="3.5" fill="{color}">'
                         f'<title>{_esc(s["name"])} {_esc(tip)}: x={fmt_tick(x)}, y={fmt_tick(y)}</title></circle>')
        legend.append((s["name"], color, bool(s.get("dashed"))))
    for v, label in vlines:
        x = f.px(v)
        p.append(f'<line class="vline" x1="{x:.1f}" y1="{f.T}" x2="{x:.1f}" y2="{f.T + f.ph}" stroke="#6b7280" '
                 f'stroke-dasharray="3 3" stroke-width="1.5"/>')
        p.append(f'<text x="{x + 4:.1f}" y="{f.T + 12}" class="vline-text">{_esc(label)}</text>')
    p += f.legend(legend)
    p.append("</svg>")
    return "\n".join(p)


def cdf_points(values: Sequence[float], n: int = 200) -> tuple[list[float], list[float]]:
    """(x, F(x)) at ``n``+1 quantiles: a CDF drawn from any number of samples with bounded size."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return [], []
    qs = np.linspace(0.0, 100.0, n + 1)
    return [float(x) for x in np.percentile(vals, qs)], [float(q / 100.0) for q in qs]


def cdf_svg(named_values: Sequence[tuple[str, Sequence[float]]], title: str, xlabel: str) -> str:
    series = []
    for i, (name, vals) in enumerate(named_values):
        xs, ys = cdf_points(vals)
        if xs:
            series.append({"name": name, "xs": xs, "ys": ys, "color": PALETTE[i % len(PALETTE)]})
    return line_chart_svg(series, title, xlabel, "fraction of requests", markers=False)


def bar_chart_svg(categories: Sequence[str], values: Sequence[float | None], title: str, ylabel: str) -> str:
    pairs = [(c, v) for c, v in zip(categories, values) if v is not None and math.isfinite(v)]
    if not pairs:
        return _empty_svg(title)
    n = len(categories)
    f = _Frame(0, n, 0, max(v for _, v in pairs), xticks=[0, n])
    p = f.open(title, "", ylabel, xtick_labels={0: "", n: ""})
    slot = f.pw / n
    for i, (c, v) in enumerate(zip(categories, values)):
        if v is None or not math.isfinite(v):
            continue
        x = f.L + slot * i + slot * 0.15
        y = f.py(v)
        color = PALETTE[i % len(PALETTE)]
        p.append(f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{slot * 0.7:.2f}" height="{f.T + f.ph - y:.2f}" '
                 f'fill="{color}"><title>{_esc(c)}: {fmt_tick(v)}</title></rect>')
        p.append(f'<text x="{x + slot * 0.35:.2f}" y="{y - 4:.2f}" text-anchor="middle" class="tick">{fmt_tick(v)}</text>')
        short = c if len(c) <= 22 else c[:21] + "…"
        p.append(f'<text x="{x + slot * 0.35:.2f}" y="{f.T + f.ph + 16}" text-anchor="middle" class="tick">{_esc(short)}</text>')
    p.append("</svg>")
    return "\n".join(p)


# ----------------------------------------------------------------------------- HTML pages

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#111827;background:#f9fafb}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#4b5563;font-size:13px;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .k{font-size:12px;color:#6b7280}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(570px,1fr));gap:14px}
figure.chart{background:#fff;border:1px solid #e5e7eb;border-radius:8px;margin:0;padding:6px}
figure.chart figcaption{font-size:12px;color:#4b5563;padding:2px 8px 6px}
svg.plot{max-width:100%;height:auto;display:block}
svg .title{font-size:14px;font-weight:600;fill:#111827}
svg .tick{font-size:11px;fill:#4b5563}svg .label{font-size:12px;fill:#374151}
svg .grid{stroke:#eef0f3;stroke-width:1}svg .axis{stroke:#9ca3af;stroke-width:1}svg .tickmark{stroke:#9ca3af}
svg .legend-text{font-size:11px;fill:#111827}svg .vline-text{font-size:11px;fill:#4b5563}
svg .empty{font-size:14px;fill:#9ca3af}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f4f6}
.note{background:#fff;border-left:4px solid #2563eb;padding:8px 12px;font-size:13px;max-width:1100px}
details pre{background:#fff;border:1px solid #e5e7eb;padding:10px;font-size:12px;overflow:auto;max-height:420px}
footer{margin-top:30px;font-size:12px;color:#6b7280;max-width:1100px}
"""

DEFINITIONS = (
    "TTFT: request sent to first content chunk. ITL: gap between consecutive content chunks (pooled over requests). "
    "TPOT: per request, (E2EL - TTFT) / (output tokens - 1). E2EL: request sent to last content chunk. "
    "Percentiles use linear interpolation (numpy), as vllm bench serve does. "
    "Throughputs count successful requests only and divide by the run's wall time. "
    "$ per million tokens = price per hour / (tokens per second x 3600) x 1,000,000. "
    "Mean requests in flight = sum of E2EL / duration (Little's law): the load the server actually saw."
)


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) +
            f"\n<footer>{_esc(DEFINITIONS)}<br>Generated by leanserve bench; self-contained, no network.</footer>\n"
            "</body>\n</html>\n")


def _figure(name: str, svg: str, caption: str = "") -> str:
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart" data-chart="{_esc(name)}">\n{svg}\n{cap}</figure>'


def _cards(items: Iterable[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{_esc(v)}</div><div class="k">{_esc(k)}</div></div>' for k, v in items) + "</div>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    h = "".join(f"<th>{_esc(x)}</th>" for x in header)
    b = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _cost_note(result: dict[str, Any]) -> str:
    c = result.get("cost_assumption") or {}
    if c.get("price_per_hour") is None:
        text = "No price assumed (pass --price-per-hour or --hardware NAME); $ per million tokens not computed."
    else:
        text = (f"Price assumed: ${c['price_per_hour']:g}/h for {c.get('hardware')} x{c.get('num_devices', 1)}"
                f" (source: {c.get('source')}{', as of ' + str(c['as_of']) if c.get('as_of') else ''}). {c.get('note', '')}")
    return f'<p class="note">{_esc(text)}</p>'


def _run_values(run: dict[str, Any], name: str) -> list[float]:
    reqs = [r for r in run.get("requests") or [] if r.get("success")]
    if name == "itl":
        return [x for r in reqs for x in (r.get("itl_ms") or [])]
    return [r[f"{name}_ms"] for r in reqs if r.get(f"{name}_ms") is not None]


def _metrics_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for key, label, digits in COMPARE_ROWS:
        if any(r.get(key) is not None for _, r in runs):
            rows.append([label] + [_fmt(r.get(key), digits) for _, r in runs])
    return rows


def _headline(result: dict[str, Any]) -> str:
    s = result.get("server") or {}
    cfg = result.get("config") or {}
    load = cfg.get("load") or {}
    return (f"model {s.get('model')} at {s.get('base_url')} ({s.get('endpoint')} endpoint) | workload {cfg.get('workload')} "
            f"| seed {cfg.get('seed')} | num prompts {load.get('num_prompts')} | {result.get('date', '')}")


def render_run_html(result: dict[str, Any]) -> str:
    """One run: summary cards, latency histograms, TTFT over time, metrics table, config."""
    run = result
    body = ["<h1>leanserve bench report</h1>", f'<p class="sub">{_esc(_headline(result))}</p>']
    body.append(_cards([
        ("output tok/s", _fmt(run.get("output_throughput"), 1)),
        ("requests/s", _fmt(run.get("request_throughput"))),
        ("median TTFT (ms)", _fmt(run.get("median_ttft_ms"), 1)),
        ("median TPOT (ms)", _fmt(run.get("median_tpot_ms"), 2)),
        ("$ / M output tokens", _fmt(run.get("cost_per_million_output_tokens"), 4)),
        ("completed / failed", f"{run.get('completed')} / {run.get('failed')}"),
    ]))
    body.append(_cost_note(result))
    body.append("<h2>Latency distributions</h2>")
    charts = []
    for i, name in enumerate(("ttft", "tpot", "itl", "e2el")):
        vals = _run_values(run, name)
        charts.append(_figure(f"{name}-distribution",
                              histogram_svg(vals, f"{LATENCY_LABELS[name]} ({name.upper()})", "milliseconds",
                                            color=PALETTE[i]),
                              f"{len(vals)} samples"))
    reqs = [r for r in run.get("requests") or [] if r.get("success")]
    xs = [r.get("start_ms", 0) / 1000.0 for r in reqs]
    charts.append(_figure("ttft-over-time", line_chart_svg(
        [{"name": "TTFT", "xs": xs, "ys": [r.get("ttft_ms") for r in reqs], "color": PALETTE[0]}],
        "TTFT by request start time", "seconds since start", "TTFT (ms)", markers=True, connect=False),
        "Queueing shows as TTFT rising with time."))
    body.append('<div class="charts">' + "\n".join(charts) + "</div>")
    body.append("<h2>Metrics</h2>")
    body.append(_html_table(["metric", "value"], _metrics_rows([("run", run)])))
    if run.get("errors_by_kind"):
        body.append("<h2>Errors</h2>")
        body.append(_html_table(["kind", "count"], sorted(run["errors_by_kind"].items())))
    body.append("<h2>Configuration</h2><details><summary>config and cost assumption (JSON)</summary><pre>"
                + _esc(json.dumps({"config": result.get("config"), "cost_assumption": result.get("cost_assumption")},
                                  indent=2)) + "</pre></details>")
    return _page("leanserve bench report", body)


def render_sweep_html(result: dict[str, Any]) -> str:
    """A sweep: throughput, latency and $/Mtok against load (knee visible), and per-run CDFs."""
    runs = result.get("runs") or []
    sat = result.get("saturation") or {}
    ramp = [r for r in runs if r.get("phase") == "ramp"]
    rate = [r for r in runs if r.get("phase") == "rate"]
    body = ["<h1>leanserve bench sweep</h1>", f'<p class="sub">{_esc(_headline(result))}</p>']
    body.append(_cards([
        ("saturation concurrency", _fmt(sat.get("concurrency"))),
        ("max requests/s", _fmt(sat.get("max_request_throughput"))),
        ("output tok/s at saturation", _fmt(sat.get("output_throughput"), 1)),
        ("$ / M output tokens at saturation", _fmt(sat.get("cost_per_million_output_tokens"), 4)),
        ("runs", str(len(runs))),
    ]))
    body.append(f'<p class="note">{_esc("Saturation: " + str(sat.get("reason", "")))}</p>')
    body.append(_cost_note(result))

    def xy(rs: list[dict[str, Any]], key: str) -> tuple[list[float], list[Any]]:
        return [r.get("mean_requests_in_flight") for r in rs], [r.get(key) for r in rs]

    def labels(rs: list[dict[str, Any]]) -> list[str]:
        return [_load_label(r) for r in sorted(rs, key=lambda r: r.get("mean_requests_in_flight") or 0)]

    sat_run = next((r for r in ramp if (r.get("load") or {}).get("concurrency") == sat.get("concurrency")), None)
    vl = [(sat_run["mean_requests_in_flight"], f"saturation (conc {sat.get('concurrency')})")] if sat_run else []
    xlabel = "load: mean requests in flight"

    def series(key: str, name: str, dashed: bool = False) -> list[dict[str, Any]]:
        out = []
        for rs, phase, color in ((ramp, "concurrency ramp", PALETTE[0]), (rate, "Poisson rates", PALETTE[2])):
            if rs:
                xs, ys = xy(rs, key)
                out.append({"name": f"{name}, {phase}" if name else phase, "xs": xs, "ys": ys, "color": color,
                            "dashed": dashed, "labels": labels(rs)})
        return out

    charts = [
        _figure("throughput-vs-load", line_chart_svg(series("output_throughput", ""), "Output throughput vs load",
                                                      xlabel, "output tokens/s", vlines=vl),
                "Throughput stops growing at the knee."),
        _figure("ttft-vs-load", line_chart_svg(series("median_ttft_ms", "median") + series("p99_ttft_ms", "p99", True),
                                                "TTFT vs load", xlabel, "TTFT (ms)", vlines=vl)),
        _figure("tpot-vs-load", line_chart_svg(series("median_tpot_ms", "median") + series("p99_tpot_ms", "p99", True),
                                                "TPOT vs load", xlabel, "TPOT (ms)", vlines=vl)),
        _figure("e2el-vs-load", line_chart_svg(series("median_e2el_ms", "median") + series("p99_e2el_ms", "p99", True),
                                                "End-to-end latency vs load", xlabel, "E2EL (ms)", vlines=vl)),
    ]
    if any(r.get("cost_per_million_output_tokens") is not None for r in runs):
        charts.append(_figure("cost-vs-load", line_chart_svg(
            series("cost_per_million_output_tokens", "output") + series("cost_per_million_total_tokens", "total", True),
            "$ per million tokens vs load", xlabel, "$ / M tokens", vlines=vl),
            "Cost falls as load rises until the knee; past it latency grows for no saving."))
    body.append("<h2>Load sweep</h2>")
    body.append('<div class="charts">' + "\n".join(charts) + "</div>")
    body.append("<h2>Latency distributions per run</h2>")
    cdfs = []
    for name in ("ttft", "tpot", "itl", "e2el"):
        cdfs.append(_figure(f"{name}-cdf", cdf_svg([(_load_label(r), _run_values(r, name)) for r in runs],
                                                    f"{LATENCY_LABELS[name]} CDF", "milliseconds")))
    body.append('<div class="charts">' + "\n".join(cdfs) + "</div>")
    body.append("<h2>Runs</h2>")
    body.append(_html_table(["metric"] + [_load_label(r) for r in runs], _metrics_rows([(_load_label(r), r) for r in runs])))
    body.append("<h2>Configuration</h2><details><summary>config and cost assumption (JSON)</summary><pre>"
                + _esc(json.dumps({"config": result.get("config"), "cost_assumption": result.get("cost_assumption"),
                                   "saturation": sat}, indent=2)) + "</pre></details>")
    return _page("leanserve bench sweep", body)


def render_html(result: dict[str, Any]) -> str:
    return render_sweep_html(result) if result.get("kind") == "sweep" else render_run_html(result)


def render_compare_html(named_results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    cols = compare_columns(named_results)
    names = [c for c, _ in cols]
    body = ["<h1>leanserve bench comparison</h1>",
            f'<p class="sub">{_esc(", ".join(n for n, _ in named_results))}</p>']
    charts = [
        _figure("compare-output-throughput", bar_chart_svg(names, [r.get("output_throughput") for _, r in cols],
                                                           "Output throughput", "tokens/s")),
        _figure("compare-median-ttft", bar_chart_svg(names, [r.get("median_ttft_ms") for _, r in cols],
                                                     "Median TTFT", "ms")),
        _figure("compare-median-tpot", bar_chart_svg(names, [r.get("median_tpot_ms") for _, r in cols],
                                                     "Median TPOT", "ms")),
    ]
    if any(r.get("cost_per_million_output_tokens") is not None for _, r in cols):
        charts.append(_figure("compare-cost", bar_chart_svg(names, [r.get("cost_per_million_output_tokens") for _, r in cols],
                                                            "$ per million output tokens", "$ / M tokens")))
    for name in ("ttft", "tpot"):
        if any(r.get("requests") for _, r in cols):
            charts.append(_figure(f"compare-{name}-cdf", cdf_svg([(c, _run_values(r, name)) for c, r in cols],
                                                                  f"{LATENCY_LABELS[name]} CDF", "milliseconds")))
    body.append('<div class="charts">' + "\n".join(charts) + "</div>")
    body.append("<h2>Metrics</h2>")
    body.append(_html_table(["metric"] + names, _metrics_rows(cols)))
    return _page("leanserve bench comparison", body)


def finite(o: Any) -> Any:
    """A copy of ``o`` with NaN/inf floats replaced by None, so the JSON is strict."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o
