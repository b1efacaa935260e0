"""`leanserve eval`: quality and cost of a model, in-process or behind any OpenAI-compatible server.

    leanserve eval [--model NAME|PATH ENGINE FLAGS | --base-url URL] --tasks arc_easy,wikitext2 [options]
    leanserve eval compare A.json B.json [--json]
    leanserve eval report A.json B.json ... --html report.html
    leanserve eval cascade SMALL.json LARGE.json [--task T] [--target 0.95] [--score NAME] [--json]

``leanserve/cli.py`` adds the command through :func:`add_parser`. Every user error is one line,
``leanserve: error: ...``, exit code 2. The backends are imported only when a run needs one
(`make_backend`), so this module imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from leanserve.argtypes import add_config_args, config_kwargs, nonneg_float, one_line_error, positive_int
from leanserve.cli_common import CLIError, engine_config, ensure_model
from leanserve.config import EngineConfig
from leanserve.eval.tasks import BUILTIN_TASKS, EvalOptions, Selection, TaskError, resolve_tasks
from leanserve.gateway.confidence import DEFAULT_SCORE, SCORES

EPILOG = "Full guide: docs/eval.md."


class _ModelAsFlag:
    """Hands `add_config_args` a target that turns EngineConfig's positional MODEL into ``--model``
    (``eval`` has sub-commands, which a positional would swallow), with no default, so that a model
    given beside ``--base-url`` can be told apart; the flags' defaults and help stay in config.py."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        if names == ("model",):
            kwargs.pop("nargs", None)
            kwargs["default"] = None
            return self.group.add_argument("--model", dest="model", metavar="NAME|PATH", **kwargs)
        return self.group.add_argument(*names, **kwargs)


def _task_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``compare``, ``report`` and ``cascade``) to the top-level CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="measure quality beside cost: perplexity and task accuracy, in-process or over HTTP",
        description="Run evaluation tasks on a model in this process (--model and the engine flags) or on any "
                    "OpenAI-compatible server (--base-url), and report each task's metrics with its cost: $ and "
                    "machine-seconds per 1,000 items, $/Mtok, items/s.", epilog=EPILOG,
        allow_abbrev=False)  # else `eval cascade --task` would be an ambiguous abbreviation of --tasks here
    configure_parser(p)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.error = one_line_error("leanserve")  # type: ignore[method-assign]
    add_config_args(_ModelAsFlag(p.add_argument_group("in-process model (the engine's flags)")), EngineConfig)
    c = p.add_argument_group("in-process cost basis (docs/cost.md)")
    c.add_argument("--hardware", default=None, metavar="NAME",
                   help="hardware catalog entry for the price (default: the detected GPU, else cpu-local)")
    c.add_argument("--price-per-hour", type=nonneg_float, default=None, metavar="USD",
                   help="your $ per machine hour; overrides the catalog price")
    g = p.add_argument_group("or a server")
    g.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000; it "
                   "must return prompt logprobs (echo + logprobs on /v1/completions)")
    g.add_argument("--api-key", metavar="KEY", help="bearer token for --base-url")
    g.add_argument("--served-model", metavar="NAME", help="the model name to request (default: the server's first)")

    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", type=_task_names, default=[], metavar="T1,T2",
                   help=f"built-in tasks, comma-separated: {', '.join(BUILTIN_TASKS)}")
    g.add_argument("--task-file", type=Path, action="append", default=[], metavar="PATH.jsonl",
                   help='a task from a JSONL file (repeatable), lines of one shape: {"query", "choices", "gold"}, '
                        '{"question", "answers"} or {"text"}; named by the file\'s stem')
    pick = g.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=positive_int, metavar="N",
                      help="N items per task, chosen by a seeded shuffle (--seed); wikitext2: the first N windows")
    pick.add_argument("--first", type=positive_int, metavar="N", help="the first N items of each task, in file order")
    g.add_argument("--seed", type=int, default=0, help="the shuffle that --limit draws from (default 0)")
    g.add_argument("--context-length", type=positive_int, metavar="N",
                   help="perplexity window in tokens (default: min(1024, the model's context))")
    g.add_argument("--stride", type=positive_int, metavar="N",
                   help="new tokens scored per perplexity window, < --context-length (default: context length - 1: "
                        "windows share one token, every token but the first is scored once)")
    g.add_argument("--batch-size", type=positive_int, default=EvalOptions.batch_size, metavar="N",
                   help="items per backend call (default %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, metavar="PATH", help="write the results JSON")
    g.add_argument("--save-items", action="store_true", help="keep one record per item in the results (compare "
                   "needs them)")
    g.add_argument("--html", type=Path, metavar="PATH", help="write a self-contained HTML report")
    g.add_argument("--label", metavar="NAME", help="this configuration's name in tables and charts (default: the "
                   "model and its dtype/quantization)")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_eval)

    sub = p.add_subparsers(dest="eval_command", metavar="{compare,report,cascade}")
    c = sub.add_parser("compare", help="per-task deltas with paired statistics and the cost ratio",
                       description="B - A per task on the items both runs scored (paired bootstrap 95%% CI, "
                                   "McNemar's exact p), and B/A of $ and machine-seconds per 1,000 items. Both runs "
                                   "need --save-items.", epilog=EPILOG)
    c.error = one_line_error("leanserve")  # type: ignore[method-assign]
    c.add_argument("results", nargs=2, type=Path, metavar="RESULTS.json")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.add_argument("--resamples", type=positive_int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    c.add_argument("--seed", dest="stats_seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.set_defaults(func=cmd_compare)
    r = sub.add_parser("report", help="an HTML quality-vs-cost report of one or more results files",
                       description="One self-contained HTML page: a quality-vs-cost chart per task (one point per "
                                   "configuration) and the tables.", epilog=EPILOG)
    r.error = one_line_error("leanserve")  # type: ignore[method-assign]
    r.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json")
    r.add_argument("--html", type=Path, required=True, metavar="PATH", help="where to write the page")
    r.set_defaults(func=cmd_report)
    k = sub.add_parser("cascade", help="pick a cascade's confidence threshold for a target quality at the least cost",
                       description="From per-item runs of one generation task on the same items, one file per "
                                   "model, cheapest first (each with --save-items): simulate the cascade (accept a "
                                   "model's answer when its confidence score >= the threshold, else ask the next; "
                                   "the last always answers; every model tried is paid), pick on the dev items the "
                                   "cheapest threshold whose quality >= target x the last model's, and report it on "
                                   "the test items beside each model alone.", epilog=EPILOG)
    k.error = one_line_error("leanserve")  # type: ignore[method-assign]
    k.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json",
                   help="two or more results files, the cheapest model first")
    k.add_argument("--task", metavar="NAME", help="the generation task (default: the one all files hold)")
    k.add_argument("--target", default="0.95", metavar="F",
                   help="the quality to reach, a share of the last model's dev quality, in (0, 1] (default 0.95)")
    k.add_argument("--score", default=DEFAULT_SCORE, choices=sorted(SCORES),
                   help="the confidence score of an answer (default %(default)s)")
    split = k.add_mutually_exclusive_group()
    split.add_argument("--dev-fraction", metavar="F", help="the share of the items, first by index, that picks the "
                       "threshold (default 1/3); the rest is the test split")
    split.add_argument("--dev-items", type=positive_int, metavar="N", help="the first N items pick the threshold")
    k.add_argument("--json", action="store_true", help="print the report as JSON")
    k.add_argument("--output", type=Path, metavar="PATH", help="also write the report as JSON")
    k.set_defaults(func=cmd_cascade)


# ----------------------------------------------------------------------------- backends

def make_backend(args: argparse.Namespace) -> Any:
    """The backend the flags ask for: a server (--base-url) or the engine in this process."""
    if args.base_url:
        from leanserve.eval.server import ServerBackend

        return ServerBackend(args.base_url, api_key=args.api_key, model=args.served_model)
    from leanserve.eval.inprocess import InProcessBackend

    config = engine_config(args)
    ensure_model(config.model)
    return InProcessBackend(config, price_per_hour=args.price_per_hour, hardware=args.hardware)


def _check_backend_flags(args: argparse.Namespace) -> None:
    """One backend: engine flags beside --base-url would be silently ignored, so they are an error."""
    if args.base_url:
        given = [f for f, v in config_kwargs(args, EngineConfig).items()
                 if f != "model" and v != EngineConfig.__dataclass_fields__[f].default]
        if args.model is not None or given:
            flags = ["--model"] * (args.model is not None) + ["--" + f.replace("_", "-") for f in given]
            raise CLIError(f"{', '.join(flags)} configure the in-process engine; drop them with --base-url "
                           "(the server has its own)")
        if args.hardware is not None or args.price_per_hour is not None:
            raise CLIError("--hardware and --price-per-hour set the in-process price; a server reports its own "
                           "usage.cost")
        return
    if args.api_key or args.served_model:
        raise CLIError("--api-key and --served-model go with --base-url")
    if args.hardware is not None:
        from leanserve.cost.catalog import get_hardware

        get_hardware(args.hardware)  # an unknown name fails now, not after the model loads
    if args.model is None:
        args.model = EngineConfig.model
    engine_config(args)  # a bad engine value fails now, before any task data is read or a model loaded


# ----------------------------------------------------------------------------- commands

class _Reporter:
    """Progress on stderr: one line that updates in place on a terminal, nothing otherwise; a line per task."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def progress(self, task: str, done: int, total: int) -> None:
        if not self.quiet and self.tty:
            sys.stderr.write(f"\r{task}: {done}/{total} ")
            sys.stderr.flush()

    def log(self, line: str) -> None:
        if not self.quiet:
            sys.stderr.write(("\r\033[K" if self.tty else "") + line + "\n")


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise CLIError(f"{path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CLIError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write {path}: permission denied")


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `leanserve eval compare a b | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter from failing at exit
        except OSError:
            pass


def cmd_eval(args: argparse.Namespace) -> int:
    from leanserve.eval.html import render_report
    from leanserve.eval.run import dumps, format_results, run_tasks

    _check_backend_flags(args)
    try:
        options = EvalOptions(selection=Selection(limit=args.limit, seed=args.seed, first=args.first),
                              batch_size=args.batch_size, context_length=args.context_length, stride=args.stride)
        tasks = resolve_tasks(args.tasks, args.task_file)  # task files are read and checked now, before any load
    except TaskError as e:
        raise CLIError(str(e)) from None
    for path in (args.output, args.html):  # found now, not after an hour of evaluation
        if path is not None:
            _check_writable(path)
    backend = make_backend(args)
    try:
        reporter = _Reporter(args.quiet)
        result = run_tasks(backend, tasks, options, save_items=args.save_items, label=args.label,
                           log=reporter.log, progress=reporter.progress)
    except TaskError as e:
        raise CLIError(str(e)) from None
    finally:
        backend.close()
    if args.output:
        _write(args.output, dumps(result) + "\n")
    if args.html:
        _write(args.html, render_report([(result["label"], result)]))
    _print(format_results(result))
    return 0


def _load_all(paths: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    from leanserve.eval.run import load_results

    return [(p.stem, load_results(p)) for p in paths]


def cmd_compare(args: argparse.Namespace) -> int:
    from leanserve.eval.compare import compare_runs, format_comparison
    from leanserve.eval.run import dumps

    (name_a, a), (name_b, b) = _load_all(args.results)
    if name_a == name_b:
        name_a, name_b = str(args.results[0]), str(args.results[1])
    comparison = compare_runs(a, b, (name_a, name_b), resamples=args.resamples, seed=args.stats_seed)
    _print(dumps(comparison) if args.json else format_comparison(comparison))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from leanserve.eval.html import render_report, run_names

    runs = _load_all(args.results)
    _write(args.html, render_report(run_names(runs)))
    print(f"wrote {args.html}", file=sys.stderr)
    return 0


def cmd_cascade(args: argparse.Namespace) -> int:
    from leanserve.eval.cascade import cascade_report, format_cascade, parse_target
    from leanserve.eval.run import dumps

    parse_target(args.target)  # a bad target fails before any file is read
    if len(args.results) < 2:
        raise CLIError("a cascade needs two or more results files, the cheapest model first")
    if args.output is not None:
        _check_writable(args.output)
    runs = _load_all(args.results)
    if len({name for name, _ in runs}) < len(runs):
        runs = [(str(p), r) for p, (_, r) in zip(args.results, runs)]
    report = cascade_report(runs, task=args.task, target=args.target, score=args.score,
                            dev_fraction=args.dev_fraction, dev_items=args.dev_items)
    if args.output is not None:
        _write(args.output, dumps(report) + "\n")
    _print(dumps(report) if args.json else format_cascade(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m leanserve.eval.cli``: the command alone, with leanserve's one-line errors."""
    parser = argparse.ArgumentParser(prog="leanserve eval", epilog=EPILOG, allow_abbrev=False)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError) as e:
        print(f"leanserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
