"""`leanserve plan`: which hardware and configuration for a model and a workload, self-host or API.

    leanserve plan --model smollm2-135m --rate 5 --input-tokens 512 --output-tokens 128
    leanserve plan --model gemma3-270m --ledger --window 7d --hardware l4,h100-sxm,cpu-local --html plan.html
    leanserve plan --model smollm2-135m --bench-json bench.json --api openai/gpt-4o-mini --api-price mine=0.1,0.4
    leanserve plan calibrate --model smollm2-135m --model gemma3-270m
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from leanserve.argtypes import nonneg_float as nonneg
from leanserve.argtypes import one_line_error, positive_int
from leanserve.argtypes import positive_float as positive
from leanserve.cli_common import CLIError
from leanserve.config import parse_bytes

EPILOG = "Docs: docs/plan.md. Errors are one line on stderr, exit code 2."


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {text!r}")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N[,N...] with N >= 1, got {text!r}")
    return values


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="predict throughput, latency and $ for each hardware and configuration; break-even against APIs",
        description="Predict, for a model and a workload, on each hardware of the catalog and each configuration: "
                    "the highest request rate that meets the latency targets, TTFT and TPOT at the planned rate, "
                    "instances, $/Mtok and $/month; then the traffic above which self-hosting beats each API. A "
                    "roofline over the engine's real steps, scaled by efficiencies `leanserve plan calibrate` "
                    "measured (or stated defaults), replayed through the engine's scheduling policy.",
        epilog=EPILOG, allow_abbrev=False)
    p.error = one_line_error("leanserve")  # type: ignore[method-assign]
    p.add_argument("--model", default="smollm2-135m", metavar="MODEL",
                   help="built-in name, .gguf file, HF folder or its config.json (weights not needed) "
                        "(default %(default)s)")
    w = p.add_argument_group("workload (flags, or --bench-json, or --ledger)")
    w.add_argument("--rate", type=positive, metavar="REQ/S", help="requests per second to size for (default 1; "
                   "with --ledger: its busiest hour; with --bench-json: its highest measured rate)")
    w.add_argument("--mean-rate", type=positive, metavar="REQ/S", help="average requests per second, for tokens/day "
                   "and the bill (default: --rate)")
    w.add_argument("--input-tokens", default="512", metavar="N|LO:HI|N1,N2",
                   help="prompt lengths (default %(default)s)")
    w.add_argument("--output-tokens", default="128", metavar="N|LO:HI|N1,N2",
                   help="output lengths (default %(default)s)")
    w.add_argument("--prefix-hit-rate", type=nonneg, default=None, metavar="F",
                   help="share of prompt tokens found in the prefix cache, 0..1 (default 0, or the file's own)")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--bench-json", type=Path, metavar="PATH", help="the requests of a `leanserve bench --json` file")
    src.add_argument("--ledger", nargs="?", const="", type=str, metavar="PATH",
                     help="real traffic from the cost ledger (default path: the server's)")
    w.add_argument("--window", default="7d", metavar="7d|24h|SECONDS", help="--ledger: how far back (default 7d)")
    w.add_argument("--ledger-model", metavar="NAME", help="--ledger: only this model's requests")
    t = p.add_argument_group("latency targets")
    t.add_argument("--ttft-ms", type=positive, default=2000.0, help="time to first token (default %(default)g)")
    t.add_argument("--tpot-ms", type=positive, default=100.0, help="time per output token (default %(default)g)")
    t.add_argument("--percentile", type=positive, default=90.0, help="which percentile must meet them "
                   "(default %(default)g)")
    h = p.add_argument_group("hardware and configurations")
    h.add_argument("--hardware", type=_names, default=[], metavar="NAME[,NAME]",
                   help="catalog entries (default: all of them; an unknown name lists the known ones)")
    h.add_argument("--price-per-hour", type=nonneg, metavar="USD", help="your price (only with one --hardware)")
    h.add_argument("--weights", type=_names, default=["auto"], metavar="auto|bf16|fp16|fp32|fp8|int8|int4",
                   help="weight formats to compare (default auto: as leanserve runs the model there)")
    h.add_argument("--kv-cache-dtype", type=_names, default=["auto"], metavar="auto|bf16|fp16|fp32|fp8|int8",
                   help="KV cache dtypes to compare (default auto: the weights' dtype)")
    h.add_argument("--max-num-seqs", type=_ints, default=[128], metavar="N[,N]",
                   help="batch limits to compare (default 128)")
    h.add_argument("--max-num-batched-tokens", type=positive_int, default=512, metavar="N",
                   help="tokens per step (default %(default)s)")
    h.add_argument("--kv-cache-memory", type=parse_bytes, metavar="BYTES",
                   help="KV cache size (default: as the engine sizes it: 1 GiB on a CPU, 80%% of what a GPU has left)")
    a = p.add_argument_group("managed APIs")
    a.add_argument("--api", type=_names, default=["all"], metavar="NAME[,NAME]|all|none",
                   help="catalog APIs to compare with (default all)")
    a.add_argument("--api-price", action="append", default=[], metavar="NAME=IN,OUT[,CACHED]",
                   help="your own API price, $ per million tokens (repeatable)")
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="json_out", type=Path, metavar="PATH", help="write the plan as JSON ('-': stdout)")
    o.add_argument("--html", type=Path, metavar="PATH", help="write a self-contained HTML report")
    o.add_argument("--calibration", type=Path, metavar="PATH", help="calibration file (default: "
                   "$LEANSERVE_HOME/plan/calibration.json)")
    o.add_argument("--requests", type=positive_int, default=300, metavar="N",
                   help="requests per simulated run (default %(default)s)")
    p.set_defaults(func=cmd_plan)

    sub = p.add_subparsers(dest="plan_command", metavar="{calibrate}")
    c = sub.add_parser("calibrate", help="measure what fraction of this machine's peak the engine's steps reach",
                       description="Measure this machine's memory bandwidth and matmul peaks, time a sweep of real "
                                   "engine steps (decode at batch 1-128 and short/long contexts, prompt chunks), fit "
                                   "the roofline's efficiencies and store them for `leanserve plan`.", epilog=EPILOG)
    c.error = one_line_error("leanserve")  # type: ignore[method-assign]
    c.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="model to calibrate with (repeatable; default smollm2-135m)")
    c.add_argument("--dtype", default="auto", help="as `leanserve serve --dtype` (default auto)")
    c.add_argument("--hardware", default="cpu-local", metavar="NAME",
                   help="the catalog entry this machine is (default %(default)s)")
    c.add_argument("--quick", action="store_true", help="fewer points (about half the time)")
    c.add_argument("--output", type=Path, metavar="PATH", help="calibration file to update (default: "
                   "$LEANSERVE_HOME/plan/calibration.json)")
    c.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    from leanserve.cli_common import ensure_model
    from leanserve.cost.catalog import get_hardware
    from leanserve.plan.calibrate import calibrate

    get_hardware(args.hardware)  # an unknown name fails before anything is measured
    models = args.model or ["smollm2-135m"]
    for m in models:
        ensure_model(m)
    path = calibrate(models, dtype=args.dtype, quick=args.quick, hardware=args.hardware, path=args.output,
                     log=lambda s: print(s, file=sys.stderr))
    print(f"calibration written to {path}")
    return 0


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `leanserve plan` prints, as one JSON-able dict."""
    from leanserve.plan import workload as wl
    from leanserve.plan.apis import get_api, load_api_catalog, parse_api_price
    from leanserve.plan.calibrate import calibration_path, load_calibrations
    from leanserve.plan.model import load_shape
    from leanserve.plan.planner import build_targets, compare_api, configurations, curve, predict

    if args.price_per_hour is not None and len(args.hardware) != 1:
        raise CLIError("--price-per-hour needs exactly one --hardware")
    targets_slo = wl.Targets(args.ttft_ms, args.tpot_ms, args.percentile)
    # the workload
    if args.bench_json is not None:
        load = wl.from_bench(args.bench_json, args.rate)
    elif args.ledger is not None:
        from leanserve.cost.ledger import default_ledger_path

        path = Path(args.ledger).expanduser() if args.ledger else default_ledger_path()
        load = wl.from_ledger(path, wl.parse_window(args.window), args.rate, args.ledger_model)
    else:
        load = wl.from_flags(args.rate or 1.0, args.input_tokens, args.output_tokens, args.prefix_hit_rate or 0.0,
                             args.mean_rate)
    if args.bench_json is not None or args.ledger is not None:  # a file's workload, with the flags given on top
        if args.mean_rate is not None:
            load = replace(load, mean_rate=args.mean_rate)
        if args.prefix_hit_rate is not None:
            load = replace(load, prefix_hit_rate=args.prefix_hit_rate)
    # the APIs
    if args.api == ["none"]:
        apis = []
    elif args.api == ["all"]:
        apis = list(load_api_catalog().values())
    else:
        apis = [get_api(n) for n in args.api]
    apis += [parse_api_price(t) for t in args.api_price]
    # the model and the hardware
    shape = load_shape(args.model)
    longest = max(load.input_tokens) + max(load.output_tokens)
    if longest > shape.max_context:
        raise CLIError(f"the workload's longest request ({longest:,} tokens) exceeds {shape.name}'s context of "
                       f"{shape.max_context:,} tokens")
    cal_path = args.calibration or calibration_path()
    calibrations = load_calibrations(cal_path)
    hw_targets = build_targets(args.hardware, calibrations, args.model, args.price_per_hour)
    cfgs = configurations([None if w == "auto" else w for w in args.weights],
                          [None if k == "auto" else k for k in args.kv_cache_dtype],
                          args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_memory)
    preds = [predict(shape, t, c, load, targets_slo, num_requests=args.requests) for t in hw_targets for c in cfgs]
    if len(hw_targets) == 1 and all(not p.fits for p in preds):
        raise CLIError(f"{shape.name} does not fit: {preds[0].reason}")
    usable = [p for p in preds if p.monthly_usd is not None]
    usable.sort(key=lambda p: (p.monthly_usd, p.cost_per_mtok_full or 0))
    preds.sort(key=lambda p: (p.monthly_usd is None, p.monthly_usd or 0, p.hardware))
    best = usable[0] if usable else None
    from leanserve import __version__

    return {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "leanserve": __version__,
        "model": shape.to_dict(),
        "workload": load.to_dict(),
        "targets": {"ttft_ms": targets_slo.ttft_ms, "tpot_ms": targets_slo.tpot_ms,
                    "percentile": targets_slo.percentile, "text": targets_slo.describe()},
        "calibration_file": str(cal_path) if calibrations else None,
        "predictions": [p.to_dict() for p in preds],
        "best": None if best is None else best.to_dict(),
        "apis": [] if best is None else [compare_api(best, a, load) for a in apis],
        "curve": [] if best is None else curve(best, apis, load),
    }


def cmd_plan(args: argparse.Namespace) -> int:
    from leanserve.plan.report import format_plan

    plan = build_plan(args)
    if args.json_out is not None:
        text = json.dumps(plan, indent=1)
        if str(args.json_out) == "-":
            print(text)
            return 0
        args.json_out.write_text(text + "\n", encoding="utf-8")
    if args.html is not None:
        from leanserve.plan.html import html_report

        args.html.write_text(html_report(plan), encoding="utf-8")
    print(format_plan(plan))
    return 0
