"""`leanserve bench`: command-line entry points.

    leanserve bench --base-url http://127.0.0.1:8000 [options]
    leanserve bench compare a.json b.json [--html compare.html]

``leanserve/cli.py`` adds this command through :func:`add_parser`; ``python -m leanserve.bench.cli`` runs it alone.
Bad input gives one line on stderr and exit code 2; an unreachable server or a run where every
request failed gives one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from leanserve.argtypes import nonneg_float, nonneg_int, one_line_error, positive_float, positive_int

PROG = "leanserve bench"
EPILOG = "Full guide: docs/bench.md. Results use the field names of `vllm bench serve`."


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def _rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    return positive_float(text)


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.replace("..", ":").replace("-", ":").partition(":")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI (e.g. 100:1024), got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
    return a, b


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the bench options (and the ``compare`` sub-command) to ``p``."""
    from leanserve.bench.workloads import WORKLOADS

    p.error = one_line_error(p.prog)  # type: ignore[method-assign]
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    g.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions (default) or /v1/completions")
    g.add_argument("--model", help="model name to request (default: the first id from GET /v1/models)")
    g.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    g.add_argument("--timeout", type=positive_float, default=600.0, metavar="S",
                   help="give up on a request after S seconds without any byte from the server (default 600)")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="chat (MT-Bench first turns, default), multi-turn (both turns, history re-sent), "
                        "shared-prefix (long shared system prompt), random, sharegpt (--dataset-path); input-grounded, "
                        "for speculative decoding: spec-bench (Spec-Bench prompts), rag (its passage-grounded QA), "
                        "code-edit (HumanEvalFix bug fixes), summarize (SciTLDR abstracts)")
    g.add_argument("--dataset-path", type=Path, help="a ShareGPT-format .json/.jsonl file (implies --workload sharegpt)")
    g.add_argument("--data-dir", type=Path, help="folder with mt_bench_questions.jsonl (and, for shared-prefix, "
                                                 "mt_bench_reference_answers.jsonl) to use instead of the copies "
                                                 "shipped in the package")
    g.add_argument("--num-prompts", type=positive_int, metavar="N",
                   help="conversations to send per run (default: 80 for MT-Bench workloads, 100 random, 1000 sharegpt); "
                        "a multi-turn conversation is 2 requests")
    g.add_argument("--duration", type=positive_float, metavar="S",
                   help="stop starting requests after S seconds (with or without --num-prompts)")
    g.add_argument("--seed", type=int, default=0, help="seeds prompt order, lengths and arrivals (default 0)")
    out = g.add_mutually_exclusive_group()
    out.add_argument("--output-len", type=positive_int, metavar="N", help="max_tokens for every request")
    out.add_argument("--output-len-range", type=_range, metavar="LO:HI",
                     help="max_tokens uniform in [LO, HI] (default for random: 100:1024; MT-Bench workloads: 128)")
    inp = g.add_mutually_exclusive_group()
    inp.add_argument("--input-len", type=positive_int, metavar="N", help="random workload: ~N input tokens")
    inp.add_argument("--input-len-range", type=_range, metavar="LO:HI",
                     help="random workload: ~input tokens uniform in [LO, HI] (default 100:1024)")
    g.add_argument("--shared-prefix-len", type=positive_int, default=1500, metavar="N",
                   help="shared-prefix workload: ~tokens of shared system prompt (default 1500)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos: true so every request produces exactly max_tokens")
    g.add_argument("--temperature", type=nonneg_float, default=0.0, help="sampling temperature (default 0: greedy)")

    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=positive_int, metavar="N",
                   help="at most N requests in flight (closed loop when no --request-rate)")
    g.add_argument("--request-rate", type=_rate, default=math.inf, metavar="R",
                   help="Poisson arrivals at R requests/s (default inf: all at once, bounded by --concurrency)")
    g.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier, >1 steadier (default 1)")
    g.add_argument("--sweep", action="store_true",
                   help="ramp concurrency 1,2,4,... until throughput stops growing, then measure Poisson rates below it")
    g.add_argument("--sweep-max-concurrency", type=positive_int, default=64, metavar="N")
    g.add_argument("--sweep-threshold", type=nonneg_float, default=0.10, metavar="F",
                   help="saturated when doubling concurrency adds less than this fraction of throughput (default 0.10)")
    g.add_argument("--sweep-rates", type=_floats, default=(0.25, 0.5, 0.75, 0.9), metavar="F,F,...",
                   help="request rates to measure, as fractions of the saturation rate (default 0.25,0.5,0.75,0.9)")
    g.add_argument("--warmup-requests", type=nonneg_int, default=1, metavar="N",
                   help="short requests sent before measuring (default 1; 0 to skip)")

    g = p.add_argument_group("metrics and cost")
    g.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:10000 (a request counts if it meets all)")
    g.add_argument("--percentiles", type=_floats, default=(90.0, 99.0), metavar="P,P",
                   help="percentiles to report besides the median (default 90,99)")
    g.add_argument("--price-per-hour", type=nonneg_float, metavar="USD", help="your price per device-hour")
    g.add_argument("--hardware", metavar="NAME",
                   help="catalog entry for the price (leanserve/data/hardware.json), e.g. h100-sxm, l4, cpu-local")
    g.add_argument("--num-devices", type=positive_int, default=1, metavar="N",
                   help="devices the server uses (multiplies the price per hour; default 1)")

    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, metavar="PATH", help="write the full result (config, metrics, per-request records)")
    g.add_argument("--html", type=Path, metavar="PATH", help="write a self-contained HTML report with charts")
    g.add_argument("--save-texts", action="store_true", help="keep generated texts in the per-request records")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument("--quiet", action="store_true", help="no summary on stdout")
    g.add_argument("--list-hardware", action="store_true", help="print the price catalog and exit")
    p.set_defaults(func=run_bench_command)

    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    c = sub.add_parser("compare", help="print runs side by side", description="Print benchmark results side by side.")
    c.error = one_line_error(c.prog)  # type: ignore[method-assign]
    c.add_argument("results", nargs="+", type=Path, metavar="RESULT.json", help="files written by --json")
    c.add_argument("--html", type=Path, metavar="PATH", help="also write a comparison page")
    c.set_defaults(func=run_compare_command)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with its ``compare`` sub-command) to the top-level CLI's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server (latency, throughput, $/Mtok)",
                              description="Benchmark any OpenAI-compatible server: TTFT, TPOT, ITL, E2E latency, "
                                          "throughput, goodput and $ per million tokens.", epilog=EPILOG)
    configure_parser(p)
    return p


# ----------------------------------------------------------------------------- commands

def _err(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")


def _print(text: str) -> None:
    """stdout, tolerating a closed pipe (``leanserve bench compare a b | head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter from failing at exit
        except OSError:
            pass


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def build_settings(args: argparse.Namespace) -> Any:
    """argparse namespace -> BenchSettings. UsageError with a one-line message on bad input."""
    from leanserve.bench.client import normalize_base_url
    from leanserve.bench.metrics import parse_goodput
    from leanserve.bench.runner import BenchSettings, SweepSpec, default_load, resolve_cost
    from leanserve.bench.workloads import WorkloadError, WorkloadSpec, iter_conversations, needs_data_dir

    if not args.base_url:
        raise UsageError("--base-url is required (e.g. --base-url http://127.0.0.1:8000)")
    try:
        base_url = normalize_base_url(args.base_url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    workload = args.workload or ("sharegpt" if args.dataset_path else "chat")
    if args.dataset_path and workload != "sharegpt":
        raise UsageError(f"--dataset-path goes with --workload sharegpt, not {workload}")
    if (args.input_len or args.input_len_range) and workload != "random":
        raise UsageError("--input-len/--input-len-range apply to --workload random only")
    if any(not 0 < q < 100 for q in args.percentiles):
        raise UsageError("--percentiles must be between 0 and 100 (exclusive)")
    try:
        spec = WorkloadSpec(name=workload, data_dir=args.data_dir, dataset_path=args.dataset_path, seed=args.seed,
                            output_len=args.output_len, output_len_range=args.output_len_range,
                            input_len=args.input_len, input_len_range=args.input_len_range,
                            shared_prefix_tokens=args.shared_prefix_len)
        # Load the data now so a missing file is a clear error before any request is sent.
        next(iter_conversations(spec, 1))
    except WorkloadError as e:
        raise UsageError(str(e)) from None
    if needs_data_dir(workload) and args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"data directory {args.data_dir} not found")
    try:
        load = default_load(spec, concurrency=args.concurrency, request_rate=args.request_rate,
                            burstiness=args.burstiness, num_prompts=args.num_prompts, duration_s=args.duration,
                            label="run")
        goodput = parse_goodput(args.goodput)
        cost = resolve_cost(args.price_per_hour, args.hardware, args.num_devices)
        sweep = (SweepSpec(max_concurrency=args.sweep_max_concurrency, growth_threshold=args.sweep_threshold,
                           rate_fractions=tuple(args.sweep_rates)) if args.sweep else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.sweep and (args.concurrency or not math.isinf(args.request_rate)):
        raise UsageError("--sweep chooses the load itself: drop --concurrency and --request-rate")
    return BenchSettings(
        base_url=base_url, model=args.model, endpoint=args.endpoint,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None, workload=spec, load=load, sweep=sweep,
        cost=cost, goodput_slos=goodput, percentiles=tuple(args.percentiles), ignore_eos=args.ignore_eos,
        temperature=args.temperature, timeout_s=args.timeout, warmup_requests=args.warmup_requests,
        save_texts=args.save_texts, progress=not args.no_progress,
    )


def _print_catalog() -> None:
    from leanserve.cost.catalog import catalog_note, load_catalog

    text = catalog_note() + "\n\n"
    rows = []
    for name, hw in sorted(load_catalog().items()):
        bf16 = hw.peak_flops.get("bf16")
        rows.append([name, f"{hw.price_per_hour_usd:g}", hw.unit, f"{hw.peak_memory_bandwidth_gbps:g}",
                     "-" if bf16 is None else f"{bf16 / 1e12:g}", hw.as_of, hw.source])
    from leanserve.bench.report import _table

    _print(text + _table(["name", "$/h", "per", "GB/s", "bf16 TFLOP/s", "as of", "source"], rows))


def run_bench_command(args: argparse.Namespace) -> int:
    """Entry point of ``leanserve bench``. Returns the process exit code."""
    if getattr(args, "list_hardware", False):
        _print_catalog()
        return 0
    from leanserve.bench.client import BenchError
    from leanserve.bench.report import format_summary, format_sweep, render_html

    try:
        settings = build_settings(args)
    except UsageError as e:
        _err(str(e))
        return 2

    def log(line: str) -> None:
        if not args.quiet:
            sys.stderr.write(line + "\n")

    from leanserve.bench.runner import run_benchmark

    try:
        result = run_benchmark(settings, log=log)
    except BenchError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    try:
        if args.json:
            from leanserve.bench.report import finite

            _write(args.json, json.dumps(finite(result), indent=1, allow_nan=False, default=_json_default))
        if args.html:
            _write(args.html, render_html(result))
    except UsageError as e:
        _err(str(e))
        return 2
    if not args.quiet:
        _print(format_sweep(result) if result["kind"] == "sweep" else format_summary(result))
    runs = result["runs"] if result["kind"] == "sweep" else [result]
    if sum(r["completed"] for r in runs) == 0:
        errors = runs[-1].get("errors_by_kind") or {}
        first = next((q.get("error") for r in runs for q in r.get("requests", []) if q.get("error")), "")
        _err(f"every request failed ({', '.join(f'{k}: {v}' for k, v in errors.items())}): {first}")
        return 1
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def run_compare_command(args: argparse.Namespace) -> int:
    """Entry point of ``leanserve bench compare``."""
    from leanserve.bench.report import format_compare, render_compare_html
    from leanserve.bench.runner import load_result

    named = []
    try:
        for path in args.results:
            named.append((path.stem, load_result(path)))
    except ValueError as e:
        _err(str(e))
        return 2
    # Same stem twice (runs/a.json, other/a.json): use the relative paths instead.
    if len({n for n, _ in named}) < len(named):
        named = [(str(p), r) for p, (_, r) in zip(args.results, named)]
    _print(format_compare(named))
    if args.html:
        try:
            _write(args.html, render_compare_html(named))
        except UsageError as e:
            _err(str(e))
            return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Benchmark an OpenAI-compatible server.", epilog=EPILOG)
    configure_parser(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
