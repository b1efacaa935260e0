"""`leanserve plan`'s terminal tables, from the plan's JSON-able dict (cli.build_plan). Torch-free."""

from __future__ import annotations

from typing import Any


def _money(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"${v:,.0f}"
    if v >= 1:
        return f"${v:,.2f}"
    return f"${v:.4f}"


def _tokens(v: float | None) -> str:
    if v is None:
        return "never"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_plan(plan: dict[str, Any]) -> str:
    m, w, t = plan["model"], plan["workload"], plan["targets"]
    pct = f"p{t['percentile']:g}"
    out = [
        f"model: {m['name']} ({m['num_params'] / 1e6:,.0f}M parameters, {m['num_layers']} layers, "
        f"{m['kv_elements_per_token']:,} KV elements per token{', stored ' + m['file_format'] if m.get('file_format') else ''})",
        f"workload: {w['source']}: {w['requests_per_s']:.3g} req/s to size for ({w['mean_requests_per_s']:.3g} on "
        f"average), prompts {w['mean_input_tokens']:.0f} tokens, outputs {w['mean_output_tokens']:.0f} on average, "
        f"prefix-cache hits {w['prefix_hit_rate']:.0%}; {_tokens(w['tokens_per_day'])} tokens/day",
        *(f"  {n}" for n in w.get("notes") or []),
        f"targets: {t['text']}",
        "",
    ]
    rows = []
    for p in plan["predictions"]:
        a = p["at_rate"] or {}
        if not p["fits"]:
            rows.append([p["hardware"], p["precision"], "does not fit: " + p["reason"], "", "", "", "", "", "", ""])
            continue
        rows.append([
            p["hardware"], p["precision"] + ("" if p["configuration"].endswith("128 seqs, 512 tokens/step") else
                                             " | " + p["configuration"].split(", max ")[-1]),
            "calibrated" if p["calibrated"] else "default",
            f"{p['max_rate']:.3g}", _ms(a.get(f"{pct}_ttft_ms")), _ms(a.get(f"{pct}_tpot_ms")),
            str(p["instances"]) if p["instances"] else "-",
            _money(p["cost_per_mtok"]), _money(p["cost_per_mtok_full"]), _money(p["monthly_usd"]),
        ])
    out.append(_table(["hardware", "configuration", "efficiency", "max req/s", f"{pct} TTFT ms", f"{pct} TPOT ms",
                       "instances", "$/Mtok", "$/Mtok full", "$/month"], rows))
    out.append("")
    out.append("max req/s: one instance within the targets; TTFT/TPOT at the planned rate on one instance (capped at "
               "its max rate); $/Mtok: at the planned traffic on the instances needed; full: one instance at its max "
               "rate. efficiency: calibrated on this machine by `leanserve plan calibrate`, or stated defaults.")
    for p in plan["predictions"]:
        if p["fits"] and p["reason"]:
            out.append(f"{p['hardware']}: {p['reason']}")
    best = plan.get("best")
    if best is None:
        out.append("\nno hardware meets the targets: relax --ttft-ms/--tpot-ms or try other configurations")
        return "\n".join(out)
    out.append(f"\ncheapest that meets the targets: {best['hardware']} ({best['precision']}), {best['instances']} "
               f"instance(s), {_money(best['monthly_usd'])}/month at {_money(best['price_per_hour'])}/h "
               f"({best['price_note']})")
    if plan["apis"]:
        out.append(f"\nagainst managed APIs (this workload's token mix; self-hosting on {best['hardware']}):")
        rows = [[a["api"], _money(a["api_usd_per_mtok"]), _money(a["api_monthly_usd"]), _money(a["self_monthly_usd"]),
                 _money(a["monthly_saving_usd"]), _tokens(a["first_wins_tokens_per_day"]),
                 _tokens(a["always_wins_tokens_per_day"]), a["api_as_of"]] for a in plan["apis"]]
        out.append(_table(["API", "$/Mtok", "API $/month", "self $/month", "saving/month", "self wins from tok/day",
                           "always from", "price as of"], rows))
    return "\n".join(out)
