"""Orchestration: resolve the model, warm up, run once or sweep, and assemble the result document.

Result document (what ``--json`` writes):
- kind "run": config, server, cost_assumption, every metric at the top level under vLLM's names
  (as ``vllm bench serve --save-result`` does), and ``requests`` (one record per request).
- kind "sweep": config, server, cost_assumption, ``saturation`` and ``runs`` (each a run without
  config); the first runs ramp concurrency, the rest are Poisson rates below the saturation point.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import platform
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import leanserve
from leanserve.bench.client import BenchError, ClientConfig, LoadSpec, fetch_model_ids, make_client, run_load, send_request
from leanserve.bench.metrics import DEFAULT_PERCENTILES, RequestRecord, compute_metrics
from leanserve.bench.workloads import WorkloadSpec, build_messages, default_num_prompts, iter_conversations
from leanserve.cost.catalog import get_hardware

RESULT_FORMAT = "leanserve-bench/1"


@dataclass(frozen=True)
class SweepSpec:
    max_concurrency: int = 64
    growth_threshold: float = 0.10  # saturated when the next level adds less than this fraction
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"sweep max concurrency must be >= 1, got {self.max_concurrency}")
        if not 0 <= self.growth_threshold < 10:
            raise ValueError(f"sweep growth threshold must be in [0, 10), got {self.growth_threshold}")
        if any(not 0 < f <= 1.5 for f in self.rate_fractions):
            raise ValueError("sweep rate fractions must be in (0, 1.5]")


@dataclass(frozen=True)
class CostSpec:
    price_per_hour: float | None = None  # for the whole deployment (num_devices included)
    hardware: str | None = None
    num_devices: int = 1
    source: str | None = None
    as_of: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_cost(price_per_hour: float | None, hardware: str | None, num_devices: int = 1) -> CostSpec:
    """The price assumed and the hardware it belongs to. ValueError for an unknown hardware name."""
    if num_devices < 1:
        raise ValueError(f"--num-devices must be >= 1, got {num_devices}")
    if price_per_hour is not None and not (price_per_hour >= 0 and math.isfinite(price_per_hour)):
        raise ValueError(f"--price-per-hour must be a number >= 0, got {price_per_hour}")
    if hardware is None:
        if price_per_hour is None:
            return CostSpec(note="no price given: pass --price-per-hour or --hardware NAME for $ per million tokens")
        return CostSpec(price_per_hour=price_per_hour * num_devices, hardware="user-specified",
                        num_devices=num_devices, source="--price-per-hour",
                        note=f"user price ${price_per_hour:g}/h per device x {num_devices}")
    hw = get_hardware(hardware)
    if price_per_hour is not None:
        return CostSpec(price_per_hour=price_per_hour * num_devices, hardware=hw.name, num_devices=num_devices,
                        source="--price-per-hour", note=f"user price ${price_per_hour:g}/h per {hw.unit} x {num_devices}")
    if hw.default_price:
        note = f"{hw.price_basis} (${hw.price_per_hour_usd:g}/h per {hw.unit} x {num_devices})"
    else:
        note = (f"on-demand list price as of {hw.as_of}, not a quote: {hw.price_basis} "
                f"(${hw.price_per_hour_usd:g}/h per {hw.unit} x {num_devices})")
    return CostSpec(price_per_hour=hw.price_per_hour_usd * num_devices, hardware=hw.name, num_devices=num_devices,
                    source=hw.source, as_of=hw.as_of, note=note)


@dataclass(frozen=True)
class BenchSettings:
    base_url: str
    model: str | None = None
    endpoint: str = "chat"
    api_key: str | None = None
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    load: LoadSpec = field(default_factory=lambda: LoadSpec(num_prompts=80))
    sweep: SweepSpec | None = None
    cost: CostSpec = field(default_factory=CostSpec)
    goodput_slos: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 600.0
    warmup_requests: int = 1
    save_texts: bool = False
    progress: bool = True

    def config_dict(self) -> dict[str, Any]:
        w = self.workload
        return {
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "workload": w.name,
            "data_dir": str(w.data_dir) if w.data_dir else None,
            "dataset_path": str(w.dataset_path) if w.dataset_path else None,
            "seed": w.seed,
            "output_len": w.output_len,
            "output_len_range": list(w.output_len_range) if w.output_len_range else None,
            "input_len": w.input_len,
            "input_len_range": list(w.input_len_range) if w.input_len_range else None,
            "shared_prefix_tokens": w.shared_prefix_tokens if w.name == "shared-prefix" else None,
            "load": self.load.to_dict(),
            "sweep": asdict(self.sweep) if self.sweep else None,
            "goodput_slos_ms": dict(self.goodput_slos),
            "percentiles": list(self.percentiles),
            "ignore_eos": self.ignore_eos,
            "temperature": self.temperature,
            "timeout_s": self.timeout_s,
            "warmup_requests": self.warmup_requests,
        }


def _progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                leave=True)


def _expected_requests(settings: BenchSettings, num_prompts: int | None) -> int | None:
    if num_prompts is None:
        return None
    turns = 2 if settings.workload.name == "multi-turn" else 1
    return num_prompts * turns


async def _one_run(client: Any, ccfg: ClientConfig, settings: BenchSettings, load: LoadSpec,
                   log: Callable[[str], None]) -> dict[str, Any]:
    bar = _progress_bar(settings.progress, _expected_requests(settings, load.num_prompts), load.label or "bench")
    try:
        convs = iter_conversations(settings.workload, load.num_prompts)
        records, duration = await run_load(client, ccfg, convs, load, seed=settings.workload.seed,
                                           on_done=lambda r: bar.update(1))
    finally:
        bar.close()
    records.sort(key=lambda r: (r.start_s, r.request_id))
    metrics = compute_metrics(records, duration, settings.percentiles, settings.goodput_slos,
                              settings.cost.price_per_hour)
    return {"label": load.label, "load": load.to_dict(), **metrics,
            "requests": [r.to_dict() for r in records]}


async def _warmup(client: Any, ccfg: ClientConfig, settings: BenchSettings) -> None:
    """Send a few short requests first: a wrong model name or endpoint fails here, clearly, and the
    first-connection cost does not land in the measured run."""
    convs = iter_conversations(settings.workload, max(1, settings.warmup_requests))
    for conv in convs:
        rec = RequestRecord(request_id=f"warmup-{conv.conversation_id}")
        rec, _ = await send_request(client, ccfg, build_messages(conv, 0, []), 4, rec, 0.0)
        if not rec.success:
            raise BenchError(f"warm-up request to {ccfg.url} failed ({rec.error_kind}): {rec.error}")


def _sweep_levels(max_concurrency: int, num_prompts: int | None) -> list[int]:
    cap = max_concurrency if num_prompts is None else min(max_concurrency, num_prompts)
    levels, c = [], 1
    while c <= cap:
        levels.append(c)
        c *= 2
    if levels[-1] != cap:
        levels.append(cap)
    return levels


async def _sweep(client: Any, ccfg: ClientConfig, settings: BenchSettings,
                 log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    assert settings.sweep is not None
    sw = settings.sweep
    runs: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    stop_reason = f"reached the largest level ({sw.max_concurrency} or --num-prompts)"
    for c in _sweep_levels(sw.max_concurrency, settings.load.num_prompts):
        load = replace(settings.load, concurrency=c, request_rate=math.inf, label=f"concurrency {c}")
        run = await _one_run(client, ccfg, settings, load, log)
        run["phase"] = "ramp"
        runs.append(run)
        thr = run["output_throughput"]
        log(f"  concurrency {c:>4}: {thr:10.1f} output tok/s, {run['request_throughput']:.2f} req/s, "
            f"median TTFT {run['median_ttft_ms']:.0f} ms")
        if run["completed"] == 0:
            stop_reason = f"every request failed at concurrency {c}"
            break
        if best is not None and thr < best["output_throughput"] * (1.0 + sw.growth_threshold):
            # The knee is the last level that still grew: more concurrency past it buys latency, not throughput.
            stop_reason = (f"throughput grew less than {sw.growth_threshold:.0%} from concurrency "
                           f"{best['load']['concurrency']} to {c}")
            break
        best = run
    if best is None:
        raise BenchError("the sweep's first level failed completely; nothing to measure")
    sat_rate = max(r["request_throughput"] for r in runs)
    saturation = {
        "concurrency": best["load"]["concurrency"],
        "request_throughput": best["request_throughput"],
        "output_throughput": best["output_throughput"],
        "total_token_throughput": best["total_token_throughput"],
        "max_request_throughput": sat_rate,
        "reason": stop_reason,
        "cost_per_million_output_tokens": best.get("cost_per_million_output_tokens"),
    }
    log(f"  saturation: concurrency {saturation['concurrency']}, {sat_rate:.2f} req/s ({stop_reason})")
    for frac in sw.rate_fractions:
        rate = frac * sat_rate
        if rate <= 0:
            continue
        load = replace(settings.load, request_rate=rate, concurrency=None,
                       label=f"rate {rate:.3g}/s ({frac:.0%} of saturation)")
        run = await _one_run(client, ccfg, settings, load, log)
        run["phase"] = "rate"
        run["rate_fraction"] = frac
        runs.append(run)
        log(f"  rate {rate:8.3g}/s: {run['output_throughput']:10.1f} output tok/s, "
            f"median TTFT {run['median_ttft_ms']:.0f} ms, median TPOT {run['median_tpot_ms']:.1f} ms")
    return runs, saturation


async def run_benchmark_async(settings: BenchSettings, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    async with make_client(settings.load.concurrency, settings.timeout_s) as client:
        model = settings.model
        if model is None:
            ids = await fetch_model_ids(client, settings.base_url, settings.api_key)
            if not ids:
                raise BenchError(f"{settings.base_url}/v1/models lists no model; pass --model NAME")
            model = ids[0]
        ccfg = ClientConfig(base_url=settings.base_url, model=model, endpoint=settings.endpoint,
                            api_key=settings.api_key, ignore_eos=settings.ignore_eos,
                            temperature=settings.temperature, timeout_s=settings.timeout_s,
                            save_texts=settings.save_texts)
        if settings.warmup_requests > 0:
            await _warmup(client, ccfg, settings)
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        config = settings.config_dict()
        config["model"] = model
        head = {
            "format": RESULT_FORMAT,
            "date": started,
            "leanserve_version": leanserve.__version__,
            "client_host": platform.node(),
            "config": config,
            "server": {"base_url": settings.base_url, "model": model, "endpoint": settings.endpoint},
            "cost_assumption": settings.cost.to_dict(),
        }
        if settings.sweep is None:
            run = await _one_run(client, ccfg, settings, settings.load, log)
            return {"kind": "run", **head, **run}
        runs, saturation = await _sweep(client, ccfg, settings, log)
        return {"kind": "sweep", **head, "saturation": saturation, "runs": runs}


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the benchmark described by ``settings`` and return the result document."""
    return asyncio.run(run_benchmark_async(settings, log))


def default_load(workload: WorkloadSpec, **kw: Any) -> LoadSpec:
    if kw.get("num_prompts") is None and kw.get("duration_s") is None:
        kw["num_prompts"] = default_num_prompts(workload)
    return LoadSpec(**kw)


def result_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs inside a result document: itself for kind 'run', its ``runs`` for a sweep."""
    if result.get("kind") == "sweep":
        return list(result.get("runs") or [])
    return [result]


def load_result(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or ("kind" not in data and "output_throughput" not in data):
        raise ValueError(f"{path}: not a leanserve bench (or vllm bench serve) result")
    return data
