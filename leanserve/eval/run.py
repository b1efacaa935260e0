"""Run tasks on a backend, time them, and put quality and cost in one results document.

Cost comes from the backend's own `CostTally` (the engine's meter in-process, the server's
``usage.cost`` over HTTP): the difference between its value after and before each task. From it:

    machine_seconds_per_1k_items = machine-seconds / items x 1000
    usd_per_1k_items             = $ / items x 1000              (None when the server reports no cost)
    usd_per_million_tokens       = $ / (prompt + output tokens) x 1,000,000
    items_per_second             = items / the task's wall seconds (as measured here)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leanserve import __version__
from leanserve.eval.backend import CostTally, EvalBackend
from leanserve.eval.tasks import EvalOptions, Task

RESULTS_KIND = "leanserve-eval"
RESULTS_FORMAT = 1
LABEL_KEYS = ("dtype", "quantization", "kv_cache_dtype", "speculation")  # shown in a label when set
LABEL_PART_MAX = 24  # a longer value (a sentence describing the weights) stays in the description only

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (task, items done, items in all)


def git_commit() -> str | None:
    """The commit of the repository this package was loaded from; None for an installed package."""
    package = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = top.stdout.split()
    # a package installed into a virtual environment that sits inside some repository is not that repository
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None
    return lines[1]


def default_label(backend_description: dict[str, Any]) -> str:
    """The model's name (a path's last part) and the settings that change quality, e.g.
    ``smollm2-135m bfloat16``."""
    model = str(backend_description.get("model") or backend_description.get("base_url") or "model")
    parts = [Path(model).name or model]
    for key in LABEL_KEYS:
        value = backend_description.get(key)
        if key == "kv_cache_dtype" and value == backend_description.get("dtype"):
            continue  # the KV cache in the model's dtype is the default, not a lever
        if value not in (None, "", False, "auto", "none") and len(str(value)) <= LABEL_PART_MAX \
                and str(value) not in parts:
            parts.append(str(value))
    return " ".join(parts)


def _snapshot(backend: EvalBackend) -> CostTally:
    return dataclasses.replace(backend.cost())  # a copy: the backend may keep adding to its own


def _delta(after: CostTally, before: CostTally) -> CostTally:
    usd = None if after.usd is None or before.usd is None else after.usd - before.usd
    return CostTally(machine_seconds=after.machine_seconds - before.machine_seconds, usd=usd,
                     prompt_tokens=after.prompt_tokens - before.prompt_tokens,
                     output_tokens=after.output_tokens - before.output_tokens,
                     requests=after.requests - before.requests, wall_seconds=after.wall_seconds - before.wall_seconds)


def cost_summary(tally: CostTally, num_items: int, wall_seconds: float) -> dict[str, Any]:
    tokens = tally.prompt_tokens + tally.output_tokens
    per_1k = 1000.0 / num_items if num_items else math.nan
    return {
        "machine_seconds": tally.machine_seconds, "usd": tally.usd, "prompt_tokens": tally.prompt_tokens,
        "output_tokens": tally.output_tokens, "requests": tally.requests,
        "backend_wall_seconds": tally.wall_seconds, "wall_seconds": wall_seconds,
        "machine_seconds_per_1k_items": tally.machine_seconds * per_1k if num_items else None,
        "usd_per_1k_items": tally.usd * per_1k if tally.usd is not None and num_items else None,
        "usd_per_million_tokens": tally.usd / tokens * 1e6 if tally.usd is not None and tokens else None,
        "items_per_second": num_items / wall_seconds if wall_seconds > 0 else None,
    }


def run_tasks(backend: EvalBackend, tasks: Sequence[Task], options: EvalOptions, *, save_items: bool = False,
              label: str | None = None, log: Log | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Every task in turn on ``backend``: the results document (see docs/eval.md, "Results JSON")."""
    description = backend.describe()
    started = dt.datetime.now(dt.timezone.utc)
    result: dict[str, Any] = {
        "kind": RESULTS_KIND, "format": RESULTS_FORMAT, "label": label or default_label(description),
        "date": started.isoformat(timespec="seconds"), "leanserve_version": __version__, "git_commit": git_commit(),
        "backend": description,
        "options": {"limit": options.selection.limit, "first": options.selection.first, "seed": options.selection.seed,
                    "batch_size": options.batch_size, "context_length": options.context_length,
                    "stride": options.stride, "save_items": save_items},
        "tasks": {},
    }
    for task in tasks:
        def task_progress(done: int, total: int, name: str = task.name) -> None:
            if progress:
                progress(name, done, total)

        before = _snapshot(backend)
        t0 = time.perf_counter()
        outcome = task.run(backend, options, task_progress)
        wall = time.perf_counter() - t0
        spent = _delta(_snapshot(backend), before)
        entry = {**task.describe(), "metrics": outcome.metrics, "num_items": outcome.num_items,
                 "num_items_available": outcome.num_items_available, "selection": outcome.selection,
                 "details": outcome.details, "cost": cost_summary(spent, outcome.num_items, wall)}
        if save_items:
            entry["items"] = outcome.items
        result["tasks"][task.name] = entry
        if log:
            log(f"{task.name}: {format_metrics(entry)} ({outcome.num_items} items, {wall:.1f} s)")
    return result


# ----------------------------------------------------------------------------- reading and printing

def load_results(path: Path) -> dict[str, Any]:
    """A results file written by ``leanserve eval --output``; ValueError (one line) otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("kind") != RESULTS_KIND or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: not a leanserve eval results file (written by leanserve eval --output)")
    return data


def dumps(result: dict[str, Any]) -> str:
    """Strict JSON: NaN and infinity written as null; anything else JSON lacks (a path in a backend's
    description) as its text, so a long run is never lost to a value that cannot be written."""
    from leanserve.bench.report import finite

    return json.dumps(finite(result), indent=1, allow_nan=False, default=str)


METRIC_DIGITS = {"acc": 4, "acc_norm": 4, "exact_match": 4, "perplexity": 3, "bits_per_byte": 4}


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def format_metrics(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v, METRIC_DIGITS.get(k, 4))}" for k, v in entry["metrics"].items())


def format_results(result: dict[str, Any]) -> str:
    """The terminal table: one row per task."""
    from leanserve.bench.report import _table

    rows = []
    for name, e in result["tasks"].items():
        c = e["cost"]
        rows.append([name, format_metrics(e), str(e["num_items"]), fmt(c.get("usd_per_1k_items"), 4),
                     fmt(c.get("machine_seconds_per_1k_items"), 1), fmt(c.get("usd_per_million_tokens"), 4),
                     fmt(c.get("items_per_second"), 2), fmt(c.get("wall_seconds"), 1)])
    head = f"{result.get('label')}  ({result.get('date')}, leanserve {result.get('leanserve_version')}" + (
        f", commit {str(result['git_commit'])[:12]})" if result.get("git_commit") else ")")
    return head + "\n" + _table(["task", "metrics", "items", "$/1k items", "machine-s/1k", "$/Mtok", "items/s",
                                 "wall s"], rows)
