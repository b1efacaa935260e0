"""`leanserve plan --html`: the plan as one self-contained HTML page, from the plan's JSON-able dict
(cli.build_plan). Torch-free.

Drawn like `leanserve bench --html` (its frame, ticks, palette and CSS): inline SVG, no script, nothing
fetched. Three charts, each in ``<figure class="chart" data-chart=NAME>``:

- ``cost-per-hardware``: $/Mtok per hardware option, at the planned traffic and at full load (bars);
- ``rate-per-hardware``: the highest request rate one instance serves within the targets (bars), the
  planned rate marked;
- ``break-even``: $/day against tokens/day on log-log axes, self-hosting on the cheapest option that
  meets the targets (a step line: one more instance per capacity) against one line per managed API,
  this workload's traffic marked. Absent when no hardware meets the targets or no API is compared.

Then the predictions table (options that do not fit, with why), the API comparison and the prices'
sources. Every string from the dict is escaped: API and model names can be user-given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from leanserve.bench.report import CSS, PALETTE, _cards, _esc, _figure, _Frame, fmt_tick

LABEL_CHAR_PX = 6.2  # about one character of an 11px label
PLANNED, FULL, SELF = PALETTE[0], PALETTE[2], "#111827"

EXTRA_CSS = """
svg .row-label{font-size:11px;fill:#111827}svg .row-label.best{font-weight:700}
svg .miss{font-size:11px;fill:#b91c1c}
tr.best td{background:#eff6ff}td.txt,td.src,th.txt{text-align:left}td.src{font-size:12px;max-width:360px}
td.miss{color:#b91c1c;text-align:left}td.neg{color:#b91c1c}
ul.sources{font-size:13px;margin:6px 0;padding-left:20px}ul.sources li{margin:2px 0}
"""

DEFINITIONS = (
    "max req/s: the highest Poisson request rate one instance serves within the targets (simulated through the "
    "engine's scheduler, each step timed by the roofline model). TTFT/TPOT: at the planned rate on one instance "
    "(capped at its max rate). $/Mtok: price per hour x instances needed for the planned traffic / its tokens "
    "(input + output); full: one instance at its max rate. $/month: 730 hours. Self-hosting $/day at V tokens/day = "
    "max(1, ceil(V / capacity)) x 24 x price per hour; an API's $/day = V x its price per token for this workload's "
    "token mix (cached input at the cached price). Efficiencies: calibrated on a machine by `leanserve plan "
    "calibrate`, or stated defaults (not measured)."
)


# ----------------------------------------------------------------------------- formatting

def _money(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if abs(v) >= 100:
        return f"${v:,.0f}" if v >= 0 else f"-${-v:,.0f}"
    if abs(v) >= 1:
        return f"${v:,.2f}" if v >= 0 else f"-${-v:,.2f}"
    return f"${v:.4f}" if v >= 0 else f"-${-v:.4f}"


def _tokens(v: float | None) -> str:
    if v is None:
        return "never"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"


def _ms(v: Any) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _pct(plan: dict[str, Any]) -> str:
    return f"p{(plan.get('targets') or {}).get('percentile', 90):g}"


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and a.get("hardware") == b.get("hardware") and a.get("configuration") == b.get("configuration")


def row_labels(preds: Sequence[dict[str, Any]]) -> list[str]:
    """The hardware's name; where one hardware has several configurations, with the parts that differ."""
    out = []
    for p in preds:
        hw = str(p.get("hardware"))
        siblings = [str(q.get("configuration", "")).split(", ") for q in preds
                    if q.get("hardware") == p.get("hardware")]
        if len(siblings) < 2:
            out.append(hw)
            continue
        mine = str(p.get("configuration", "")).split(", ")
        differ = [part for i, part in enumerate(mine) if any(i >= len(s) or s[i] != part for s in siblings)]
        out.append(f"{hw} · {', '.join(differ or mine)}")
    return out


def _efficiency(p: dict[str, Any]) -> str:
    src = str(p.get("efficiency_source") or "")
    kind = "calibrated" if p.get("calibrated") else "default"
    return src if src.lower().startswith(kind) else f"{kind}: {src}" if src else kind


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


# ----------------------------------------------------------------------------- charts

def hbar_svg(title: str, xlabel: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float | None]]],
             notes: Sequence[str] = (), bold: int | None = None, vline: tuple[float, str] | None = None,
             value_fmt=fmt_tick) -> str:
    """Horizontal bars, one row per label and one bar per series in each row (``series``: name, color,
    values); a row with no value shows its note instead. Drawn in bench's frame: its ticks and classes."""
    n, k = len(labels), max(1, len(series))
    values = [v for _, _, vs in series for v in vs if _finite(v) is not None]
    top = max([*values, vline[0] if vline else 0.0, 0.0])
    label_w = min(230, 12 + LABEL_CHAR_PX * max((len(_short(s, 34)) for s in labels), default=4))
    bar_h, gap = (14 if k == 1 else 10), 8
    row_h = bar_h * k + gap
    f = _Frame(0.0, top or 1.0, 0.0, 1.0)
    f.L, f.R = int(label_w), 56
    ph = row_h * n
    height = f.T + ph + 44 + (len(series) * 16 + 4 if len(series) > 1 else 0)
    x_at = lambda v: f.L + (v - f.x0) / ((f.x1 - f.x0) or 1.0) * f.pw
    base = f.T + ph
    p = [f'<svg class="plot" viewBox="0 0 {f.W} {height}" width="{f.W}" height="{height}" role="img" '
         f'aria-label="{_esc(title)}">',
         f'<rect class="bg" x="0" y="0" width="{f.W}" height="{height}" fill="#ffffff"/>',
         f'<text x="{f.W / 2:.1f}" y="22" text-anchor="middle" class="title">{_esc(title)}</text>']
    for t in f.xt:
        x = x_at(t)
        p.append(f'<line class="grid" x1="{x:.1f}" y1="{f.T}" x2="{x:.1f}" y2="{base}"/>')
        p.append(f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" class="tick">{fmt_tick(t)}</text>')
    p.append(f'<line class="axis" x1="{f.L}" y1="{base}" x2="{f.W - f.R}" y2="{base}"/>')
    p.append(f'<line class="axis" x1="{f.L}" y1="{f.T}" x2="{f.L}" y2="{base}"/>')
    p.append(f'<text x="{f.L + f.pw / 2:.1f}" y="{base + 34}" text-anchor="middle" class="label">{_esc(xlabel)}</text>')
    for i, label in enumerate(labels):
        y0 = f.T + row_h * i + gap / 2
        cls = "row-label best" if i == bold else "row-label"
        p.append(f'<text x="{f.L - 6}" y="{y0 + bar_h * k / 2 + 4:.1f}" text-anchor="end" class="{cls}">'
                 f'<title>{_esc(label)}</title>{_esc(_short(label, 34))}</text>')
        drawn = False
        for j, (name, color, vs) in enumerate(series):
            v = _finite(vs[i]) if i < len(vs) else None
            if v is None:
                continue
            drawn = True
            y, w = y0 + bar_h * j, max(x_at(v) - f.L, 0.0)
            p.append(f'<rect class="bar" x="{f.L}" y="{y:.2f}" width="{max(w, 0.8):.2f}" height="{bar_h - 1}" '
                     f'fill="{color}"><title>{_esc(label)}, {_esc(name)}: {_esc(value_fmt(v))}</title></rect>')
            p.append(f'<text x="{f.L + w + 4:.1f}" y="{y + bar_h - 3:.1f}" class="tick">{_esc(value_fmt(v))}</text>')
        if not drawn and i < len(notes) and notes[i]:
            p.append(f'<text x="{f.L + 6}" y="{y0 + bar_h * k / 2 + 4:.1f}" class="miss">{_esc(_short(notes[i], 70))}'
                     f'</text>')
    if vline is not None:
        x = x_at(vline[0])
        p.append(f'<line class="vline" x1="{x:.1f}" y1="{f.T - 6}" x2="{x:.1f}" y2="{base}" stroke="#6b7280" '
                 f'stroke-dasharray="3 3" stroke-width="1.5"/>')
        anchor, dx = ("end", -4) if x + 8 + LABEL_CHAR_PX * len(vline[1]) > f.W - f.R else ("start", 4)
        p.append(f'<text x="{x + dx:.1f}" y="{f.T - 8}" text-anchor="{anchor}" class="vline-text">'
                 f'{_esc(vline[1])}</text>')
    if len(series) > 1:  # one entry per row, under the axis label
        for i, (name, color, _) in enumerate(series):
            x, yy = 16, base + 52 + 16 * i
            p.append(f'<rect x="{x:.1f}" y="{yy - 9}" width="18" height="9" fill="{color}"/>')
            p.append(f'<text x="{x + 24:.1f}" y="{yy}" class="legend-text">{_esc(name)}</text>')
    p.append("</svg>")
    return "\n".join(p)


def _decades(lo: float, hi: float, most: int = 7) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b <= a:
        b = a + 1
    step = max(1, math.ceil((b - a) / most))
    return [float(a + i * step) for i in range(math.ceil((b - a) / step) + 1)]


def break_even_svg(plan: dict[str, Any]) -> str:
    """$/day against tokens/day, log-log: self-hosting on ``best`` (steps) and each API in ``apis``."""
    best, curve = plan["best"], plan["curve"]
    names = [str(a["api"]) for a in plan.get("apis") or []]
    xs = [float(r["tokens_per_day"]) for r in curve]
    ys = [float(v) for r in curve for v in [r.get("self_usd_per_day"), *(r.get(n) for n in names)]
          if _finite(v) is not None and v > 0]
    xlo, xhi = min(xs), max(xs)
    f = _Frame(0.0, 1.0, 0.0, 1.0, xticks=_decades(xlo, xhi), yticks=_decades(min(ys), max(ys)),
               n_legend=1 + len(names))
    lx = lambda x: f.px(math.log10(x))
    ly = lambda y: f.py(math.log10(y))
    yticks, f.yt = f.yt, []  # bench's frame labels linear ticks: the decades' labels are drawn below
    p = f.open(f"Break-even: self-hosting on {best['hardware']} vs APIs", "tokens per day (log)", "$ per day (log)",
               xtick_labels={t: _tokens(10 ** t) for t in f.xt})
    f.yt = yticks
    grid = []
    for t in yticks:
        y = f.py(t)
        grid.append(f'<line class="grid" x1="{f.L}" y1="{y:.1f}" x2="{f.W - f.R}" y2="{y:.1f}"/>')
        grid.append(f'<text x="{f.L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">${fmt_tick(10 ** t)}</text>')
    p[3:3] = grid  # under the axes
    legend = []
    # self-hosting: one more instance each `capacity` tokens/day (the planner's formula), else the curve's samples
    cap, price = _finite(best.get("capacity_tokens_per_day")) or 0.0, _finite(best.get("price_per_hour")) or 0.0
    k0, k1 = max(1, math.ceil(xlo / cap - 1e-12)) if cap else 0, math.ceil(xhi / cap - 1e-12) if cap else 0
    if cap > 0 and price > 0 and k1 - k0 <= 400:
        pts = []
        for k in range(k0, k1 + 1):
            a, b = xlo if k == k0 else (k - 1) * cap, min(xhi, k * cap)
            pts += [(a, k * 24.0 * price), (b, k * 24.0 * price)]
    else:
        pts = []
        for r, nxt in zip(curve, curve[1:] + [None]):
            v = _finite(r.get("self_usd_per_day"))
            if v and v > 0:
                pts += [(r["tokens_per_day"], v), ((nxt or r)["tokens_per_day"], v)]
    if pts:
        d = "M" + " L".join(f"{lx(x):.2f},{ly(y):.2f}" for x, y in pts)
        p.append(f'<path class="series self" d="{d}" fill="none" stroke="{SELF}" stroke-width="2.6">'
                 f'<title>self-hosting on {_esc(best["hardware"])}: {_money(price)}/h per instance, '
                 f'{_tokens(cap)} tokens/day each</title></path>')
        legend.append((f"self-host: {best['hardware']}", SELF, False))
    for i, a in enumerate(plan.get("apis") or []):
        name = str(a["api"])
        color = PALETTE[(i + 1) % len(PALETTE)]
        line = [(r["tokens_per_day"], v) for r in curve if (v := _finite(r.get(name))) is not None and v > 0]
        if len(line) < 2:
            continue
        d = "M" + " L".join(f"{lx(x):.2f},{ly(y):.2f}" for x, y in line)
        p.append(f'<path class="series api" d="{d}" fill="none" stroke="{color}" stroke-width="1.8" '
                 f'stroke-dasharray="6 4"><title>{_esc(name)}: {_money(a.get("api_usd_per_mtok"))}/Mtok</title></path>')
        v1 = _finite(a.get("first_wins_tokens_per_day"))
        if v1 and price > 0 and xlo <= v1 <= xhi:
            p.append(f'<circle class="point" cx="{lx(v1):.2f}" cy="{ly(24.0 * price):.2f}" r="3.5" fill="{color}">'
                     f'<title>{_esc(name)}: self-hosting first wins at {_tokens(v1)} tokens/day</title></circle>')
        legend.append((name, color, True))
    v = _finite((plan.get("workload") or {}).get("tokens_per_day"))
    if v and xlo <= v <= xhi:
        x = lx(v)
        p.append(f'<line class="vline" x1="{x:.1f}" y1="{f.T}" x2="{x:.1f}" y2="{f.T + f.ph}" stroke="#6b7280" '
                 f'stroke-dasharray="3 3" stroke-width="1.5"/>')
        label = f"this workload: {_tokens(v)} tokens/day"
        anchor, dx = ("end", -4) if x + 8 + LABEL_CHAR_PX * len(label) > f.W - f.R else ("start", 4)
        p.append(f'<text x="{x + dx:.1f}" y="{f.T + 12}" text-anchor="{anchor}" class="vline-text">'
                 f'{_esc(label)}</text>')
        self_day = (_finite(best.get("instances")) or 0) * 24.0 * price
        if self_day > 0:
            p.append(f'<circle class="point" cx="{x:.2f}" cy="{ly(self_day):.2f}" r="4.5" fill="{SELF}">'
                     f'<title>self-hosting at this workload: {_money(self_day)}/day</title></circle>')
    p += f.legend(legend)
    p.append("</svg>")
    return "\n".join(p)


# ----------------------------------------------------------------------------- page parts

def _header(plan: dict[str, Any]) -> list[str]:
    m, w, t = plan.get("model") or {}, plan.get("workload") or {}, plan.get("targets") or {}
    preds = plan.get("predictions") or []
    model = [f"{m.get('name')}"]
    if _finite(m.get("num_params")):
        model.append(f"{m['num_params'] / 1e6:,.0f}M parameters")
    if m.get("num_layers"):
        model.append(f"{m['num_layers']} layers")
    if m.get("kv_elements_per_token"):
        model.append(f"{m['kv_elements_per_token']:,} KV elements per token")
    if m.get("file_format"):
        model.append(f"stored {m['file_format']}")
    if m.get("max_context"):
        model.append(f"context {m['max_context']:,}")
    workload = (f"{w.get('source', '?')}: {_num(w.get('requests_per_s'))} req/s to size for "
                f"({_num(w.get('mean_requests_per_s'))} on average), prompts {_num(w.get('mean_input_tokens'))} "
                f"tokens and outputs {_num(w.get('mean_output_tokens'))} on average (at most "
                f"{w.get('max_input_tokens', '?')} / {w.get('max_output_tokens', '?')}), prefix-cache hits "
                f"{(_finite(w.get('prefix_hit_rate')) or 0):.0%}; "
                f"{_tokens(_finite(w.get('tokens_per_day')))} tokens/day")
    by_source: dict[str, list[str]] = {}
    for p, label in zip(preds, row_labels(preds)):
        key = _efficiency(p)
        by_source.setdefault(key, [])
        if label not in by_source[key]:
            by_source[key].append(label)
    cal = plan.get("calibration_file")
    lines = [f"<b>model</b> {_esc(', '.join(model))}",
             f"<b>workload</b> {_esc(workload)}",
             *(f"&nbsp;&nbsp;{_esc(n)}" for n in w.get("notes") or []),
             f"<b>targets</b> {_esc(t.get('text', '?'))}",
             "<b>efficiencies</b> " + "; ".join(f"{_esc(k)} ({_esc(', '.join(v))})" for k, v in by_source.items()),
             f"<b>calibration file</b> {_esc(cal) if cal else 'none found: default efficiencies throughout'}"]
    return [f"<h1>leanserve plan: {_esc(m.get('name', '?'))}</h1>",
            f'<p class="sub">generated {_esc(plan.get("generated", "?"))} by leanserve '
            f'{_esc(plan.get("leanserve", "?"))}'
            f" from the model's shape, a roofline model of each step and a simulation of the engine's scheduler; "
            f"predictions, not measurements</p>",
            '<p class="note">' + "<br>".join(lines) + "</p>"]


def _cards_for(plan: dict[str, Any]) -> str:
    best = plan.get("best")
    if best is None:
        return ""
    items = [("cheapest meeting the targets", str(best["hardware"])),
             ("instances", str(best.get("instances"))),
             ("per month", _money(best.get("monthly_usd"))),
             ("$/Mtok at this traffic", _money(best.get("cost_per_mtok"))),
             ("$/Mtok at full load", _money(best.get("cost_per_mtok_full"))),
             ("tokens/day (this workload)", _tokens(_finite((plan.get("workload") or {}).get("tokens_per_day"))))]
    apis = [a for a in plan.get("apis") or [] if _finite(a.get("api_monthly_usd")) is not None]
    if apis:
        cheapest = min(apis, key=lambda a: a["api_monthly_usd"])
        items.append((f"cheapest API: {cheapest['api']}", _money(cheapest["api_monthly_usd"]) + "/month"))
    return _cards(items)


def _miss(p: dict[str, Any]) -> str:
    if not p.get("fits"):
        return "does not fit"
    if _finite(p.get("cost_per_mtok")) is None:
        return "misses the targets"
    return ""


def _charts(plan: dict[str, Any]) -> tuple[list[str], list[str]]:
    preds, best = plan.get("predictions") or [], plan.get("best")
    labels = row_labels(preds)
    bold = next((i for i, p in enumerate(preds) if _same(best, p)), None)
    notes = [_miss(p) for p in preds]
    figs, remarks = [], []
    if preds:
        svg = hbar_svg("$ per million tokens", "$ per million tokens (input + output)", labels,
                       [("at the planned traffic, on the instances needed", PLANNED,
                         [p.get("cost_per_mtok") for p in preds]),
                        ("at full load (one instance at its max rate)", FULL,
                         [p.get("cost_per_mtok_full") for p in preds])],
                       notes, bold, value_fmt=_money)
        figs.append(_figure("cost-per-hardware", svg, "Per hardware option; the cheapest that meets the targets in "
                            "bold. Options that do not fit, or miss the targets at any rate, have no bar."))
        rate = _finite((plan.get("workload") or {}).get("requests_per_s"))
        svg = hbar_svg("Max request rate per instance", "requests per second within the targets", labels,
                       [("max req/s", PALETTE[3], [p.get("max_rate") if p.get("fits") and (p.get("max_rate") or 0) > 0
                                                  else None for p in preds])],
                       notes, bold, vline=(rate, f"planned {_num(rate)} req/s") if rate else None,
                       value_fmt=lambda v: _num(v))
        figs.append(_figure("rate-per-hardware", svg, f"One instance, {(plan.get('targets') or {}).get('text', '')}; "
                            "instances needed = planned rate / max rate, rounded up."))
    if best is None:
        remarks.append("No break-even chart: no hardware meets the targets, so there is no self-hosting cost to "
                       "compare with the APIs.")
    elif not plan.get("apis"):
        remarks.append("No break-even chart: no managed API to compare with (--api none, or none given).")
    elif not plan.get("curve"):
        remarks.append(f"No break-even chart: {best['hardware']} has no capacity within the targets.")
    else:
        figs.append(_figure("break-even", break_even_svg(plan),
                            f"$/day at each traffic (log-log). Self-hosting on {best['hardware']} steps up by one "
                            f"instance each {_tokens(_finite(best.get('capacity_tokens_per_day')))} tokens/day; APIs "
                            "are priced per token for this workload's mix. Dots: where self-hosting first wins."))
    return figs, remarks


def _td(v: Any, cls: str = "", span: int = 1) -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' colspan="{span}"' if span > 1 else "")
    return f"<td{attrs}>{_esc(v)}</td>"


def _thead(header: Sequence[str], text_columns: set[str]) -> str:
    cells = (f'<th class="txt">{_esc(h)}</th>' if h in text_columns else f"<th>{_esc(h)}</th>" for h in header)
    return "<table><thead><tr>" + "".join(cells) + "</tr></thead><tbody>"


def _predictions_table(plan: dict[str, Any]) -> str:
    pct = _pct(plan)
    header = ["hardware", "configuration", "efficiency", "memory GB needed / has", "max req/s", f"{pct} TTFT ms",
              f"{pct} TPOT ms", "instances", "$/h", "$/Mtok", "$/Mtok output", "$/Mtok full", "$/month",
              "capacity tok/day"]
    rows = []
    best = plan.get("best")
    preds = plan.get("predictions") or []
    for p, label in zip(preds, row_labels(preds)):
        a = p.get("at_rate") or {}
        mem = f"{_num(p.get('memory_needed_gb'))} / {_num(p.get('memory_gb'))}"
        cells = [_td(p.get("hardware")), _td(p.get("configuration"), "txt"),
                 _td(_efficiency(p), "txt"), _td(mem)]
        if not p.get("fits"):
            cells.append(_td(f"does not fit: {p.get('reason', '')}", "miss", len(header) - 4))
        elif _finite(p.get("cost_per_mtok")) is None and p.get("reason"):
            cells.append(_td(f"{p.get('reason')}", "miss", len(header) - 4))
        else:
            saving = [_num(p.get("max_rate")), _ms(a.get(f"{pct}_ttft_ms")), _ms(a.get(f"{pct}_tpot_ms")),
                      str(p.get("instances") or "-"), _money(p.get("price_per_hour")), _money(p.get("cost_per_mtok")),
                      _money(p.get("cost_per_mtok_output")), _money(p.get("cost_per_mtok_full")),
                      _money(p.get("monthly_usd")), _tokens(_finite(p.get("capacity_tokens_per_day")))]
            cells += [_td(c) for c in saving]
        rows.append(("<tr class=\"best\">" if _same(best, p) else "<tr>") + "".join(cells) + "</tr>")
    notes = [f'<p class="note">{_esc(p.get("hardware"))}: {_esc(p.get("reason"))}</p>' for p in preds
             if p.get("fits") and p.get("reason") and _finite(p.get("cost_per_mtok")) is not None]
    return (_thead(header, {"configuration", "efficiency"}) + "".join(rows) + "</tbody></table>" + "".join(notes))


def _apis_table(plan: dict[str, Any]) -> list[str]:
    best, apis = plan.get("best"), plan.get("apis") or []
    if best is None:
        return ['<p class="note">No hardware meets the targets: relax the TTFT/TPOT targets or try other '
                'hardware or configurations; there is nothing to compare with the APIs.</p>']
    if not apis:
        return ['<p class="note">No managed API compared (--api none, or none given).</p>']
    header = ["API", "$/Mtok (this mix)", "API $/month", "self $/month", "saving/month", "API / self",
              "self wins from tok/day", "always wins from tok/day", "price source", "as of"]
    rows = []
    for a in apis:
        saving = _finite(a.get("monthly_saving_usd"))
        ratio = _finite(a.get("ratio_api_to_self"))
        rows.append("<tr>" + "".join([
            _td(a.get("api")), _td(_money(a.get("api_usd_per_mtok"))), _td(_money(a.get("api_monthly_usd"))),
            _td(_money(a.get("self_monthly_usd"))),
            _td(_money(saving), "neg" if saving is not None and saving < 0 else ""),
            _td(f"{ratio:.3g}x" if ratio is not None else "-"),
            _td(_tokens(_finite(a.get("first_wins_tokens_per_day")))),
            _td(_tokens(_finite(a.get("always_wins_tokens_per_day")))),
            _td(a.get("api_source", ""), "src"), _td(a.get("api_as_of", ""))]) + "</tr>")
    return [f'<p class="sub">This workload\'s token mix, self-hosting on {_esc(best["hardware"])} '
            f'({_esc(best.get("precision", ""))}, {_esc(best.get("instances"))} instance(s)). Saving: API minus '
            'self-hosting; "never": self-hosting never wins against that price.</p>',
            _thead(header, {"price source"}) + "".join(rows) + "</tbody></table>"]


def _sources(plan: dict[str, Any]) -> list[str]:
    hw: dict[str, str] = {}
    for p in plan.get("predictions") or []:
        note = p.get("price_note") or "no source given"
        hw.setdefault(str(p.get("hardware")), f"{_money(p.get('price_per_hour'))}/h, {note}")
    items = [f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in hw.items()]
    items += [f"<li>{_esc(a.get('api'))}: {_esc(a.get('api_source') or 'no source given')}, as of "
              f"{_esc(a.get('api_as_of') or '?')}</li>" for a in plan.get("apis") or []]
    return ['<ul class="sources">' + "".join(items) + "</ul>"]


def html_report(plan: dict[str, Any]) -> str:
    """The page for one plan (cli.build_plan's dict)."""
    body = _header(plan)
    cards = _cards_for(plan)
    if cards:
        body.append(cards)
    else:
        body.append('<p class="note"><b>No hardware meets the targets</b> among the options below: relax the '
                    "TTFT/TPOT targets or try other hardware or configurations.</p>")
    figs, remarks = _charts(plan)
    body.append("<h2>Charts</h2>")
    body.append('<div class="charts">' + "\n".join(figs) + "</div>")
    body += [f'<p class="note">{_esc(r)}</p>' for r in remarks]
    body.append("<h2>Predictions per hardware and configuration</h2>")
    body.append(_predictions_table(plan))
    body.append("<h2>Against managed APIs</h2>")
    body += _apis_table(plan)
    body.append("<h2>Prices and their sources</h2>")
    body += _sources(plan)
    body.append(f"<details><summary>The plan (JSON)</summary><pre>"
                f"{_esc(json.dumps(plan, indent=1, default=str))}</pre></details>")
    title = f"leanserve plan: {(plan.get('model') or {}).get('name', '?')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}{EXTRA_CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + f"\n<footer>{_esc(DEFINITIONS)}<br>Generated by leanserve plan; self-contained, no network.</footer>\n"
            "</body>\n</html>\n")
