"""For each hardware and configuration: does the model fit, the highest request rate that meets the
latency targets, latency at the planned rate, instances, $/Mtok and $/month; then the break-even
against managed APIs. Torch-free: the roofline (roofline.py) times each step, the simulator
(simulate.py) replays the workload through the engine's scheduling policy.

Break-even, for an API at ``a`` $ per token of this workload's mix and an instance at ``p`` $/h
that serves at most ``C`` tokens/day within the targets:

    self-hosting $/day at V tokens/day = max(1, ceil(V / C)) x 24 p
    API $/day                          = V x a
    it first wins at  V1 = 24 p / a        (when V1 <= C; if C x a <= 24 p it never wins)
    and wins at every traffic from V* = V1 if k <= 1 else k x C,  k = ceil(24 p / (C a - 24 p))
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from leanserve.cost.catalog import cost_per_million_tokens
from leanserve.plan.apis import ApiPrice
from leanserve.plan.roofline import (DEFAULT_EFFICIENCY, Efficiency, Machine, ModelShape, Precision, WEIGHT_FORMATS,
                                     KV_FORMATS)
from leanserve.plan.simulate import Limits, SimRequest, roofline_timer, simulate
from leanserve.plan.workload import SECONDS_PER_DAY, Targets, Workload

HOURS_PER_MONTH = 730.0
MEMORY_RESERVE = 0.10  # of an accelerator's memory kept for activations, the runtime and fragmentation
CPU_KV_CACHE_BYTES = 1 << 30  # the engine's default KV cache on a CPU (engine.DEFAULT_KV_CACHE_CPU)
GPU_KV_FRACTION = 0.8  # of the memory left after the weights (engine.DEFAULT_KV_CACHE_FRACTION_CUDA)


def hardware_kind(unit: str, name: str) -> str:
    if "gpu" in unit.lower():
        return "gpu"
    if "chip" in unit.lower() or name.lower().startswith("tpu"):
        return "tpu"
    return "cpu"


@dataclass(frozen=True)
class Target:
    """One hardware option: its peaks, price, memory and the efficiencies its steps reach."""

    name: str
    machine: Machine
    price_per_hour: float
    efficiency: Efficiency
    calibrated: bool
    precision: Precision | None = None  # the calibrated engine's own precision (else the configuration's)
    price_note: str = ""


@dataclass(frozen=True)
class Configuration:
    weights: str | None = None  # None: the hardware's default (bf16 where it has bf16, else fp32)
    kv_cache: str | None = None  # None: as the weights' dtype
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    kv_cache_bytes: float | None = None  # None: as the engine sizes it on that hardware

    def precision_for(self, target: Target) -> Precision:
        cal = target.precision
        if cal is not None and self.weights in (None, cal.weights) and self.kv_cache in (None, cal.kv_cache):
            return cal
        weights = self.weights or (cal.weights if cal else default_dtype(target.machine))
        kv = self.kv_cache or (weights if weights in KV_FORMATS else "bf16")
        return Precision(weights=weights, kv_cache=kv)


def default_dtype(machine: Machine) -> str:
    return "bf16" if machine.peak_flops.get("bf16") else "fp32"


@dataclass
class Prediction:
    hardware: str
    configuration: str
    precision: str
    efficiency_source: str
    calibrated: bool
    price_per_hour: float
    fits: bool
    memory_needed_gb: float
    memory_gb: float | None
    kv_cache_tokens: int = 0
    reason: str = ""
    max_rate: float = 0.0  # requests/s one instance serves within the targets
    at_rate: dict[str, Any] = field(default_factory=dict)  # the simulator's summary at the planned rate (one instance)
    instances: int = 0
    cost_per_mtok: float | None = None  # at the planned rate, on `instances` instances
    cost_per_mtok_output: float | None = None
    cost_per_mtok_full: float | None = None  # one instance at its max rate
    monthly_usd: float | None = None
    capacity_tokens_per_day: float = 0.0
    price_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def memory_needed(shape: ModelShape, precision: Precision, tokens: int) -> float:
    """Bytes of weights plus ``tokens`` tokens of KV cache."""
    return shape.weight_bytes(precision.weights) + tokens * shape.kv_bytes_per_token(precision.kv_cache)


def kv_capacity(shape: ModelShape, precision: Precision, target: Target, cfg: Configuration) -> tuple[int, float, str]:
    """(KV cache tokens, bytes needed in all, '' or why the model does not fit)."""
    weights = shape.weight_bytes(precision.weights)
    per_token = shape.kv_bytes_per_token(precision.kv_cache)
    one_request = min(shape.max_context, 4096)
    mem = target.machine.memory_gb
    if cfg.kv_cache_bytes is not None:
        kv_bytes = cfg.kv_cache_bytes
    elif target.machine.kind == "cpu":
        kv_bytes = CPU_KV_CACHE_BYTES
    else:
        usable = (mem or 0) * 1e9 * (1 - MEMORY_RESERVE) - weights
        kv_bytes = max(usable, 0.0) * GPU_KV_FRACTION
    needed = weights + max(kv_bytes, one_request * per_token)
    if mem is not None:
        usable = mem * 1e9 * (1 - (MEMORY_RESERVE if target.machine.kind != "cpu" else 0.0))
        if weights + one_request * per_token > usable:
            return 0, weights + one_request * per_token, (
                f"needs {(weights + one_request * per_token) / 1e9:.1f} GB ({weights / 1e9:.1f} GB of weights + one "
                f"{one_request}-token request's KV cache), {target.name} has {mem:g} GB")
        kv_bytes = min(kv_bytes, usable - weights)
        needed = weights + kv_bytes
    return int(kv_bytes // per_token), needed, ""


def requests_for(workload: Workload, n: int, seed: int) -> list[SimRequest]:
    """``n`` requests drawn from the workload's lengths, arrivals at unit rate (scaled later)."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(1.0)
        i = rng.randrange(len(workload.input_tokens))
        prompt = workload.input_tokens[i]
        output = workload.output_tokens[i if len(workload.output_tokens) == len(workload.input_tokens)
                                        else rng.randrange(len(workload.output_tokens))]
        out.append(SimRequest(t, prompt, output, cached=int(prompt * workload.prefix_hit_rate)))
    return out


def _run(shape: ModelShape, timer: Callable, limits: Limits, base: list[SimRequest], rate: float | None,
         concurrency: int | None = None) -> dict[str, Any]:
    reqs = [SimRequest(r.arrival / rate if rate else 0.0, r.prompt, r.output, r.cached) for r in base]
    return simulate(shape, timer, limits, reqs, concurrency=concurrency).summary((50, 90, 95, 99))


def _meets(summary: dict[str, Any], targets: Targets) -> bool:
    key = "median" if targets.percentile == 50 else f"p{targets.percentile:g}"
    ttft, tpot = summary.get(f"{key}_ttft_ms"), summary.get(f"{key}_tpot_ms")
    if summary.get("truncated") or ttft is None:
        return False
    return ttft <= targets.ttft_ms and (tpot is None or tpot <= targets.tpot_ms)


def max_rate(shape: ModelShape, timer: Callable, limits: Limits, base: list[SimRequest], targets: Targets,
             iterations: int = 10) -> float:
    """The highest Poisson arrival rate whose simulated run meets the targets (0 if none does)."""
    sat = _run(shape, timer, limits, base, None, concurrency=limits.max_num_seqs)["request_throughput"]
    hi = sat * 1.05
    lo = sat / 1000.0
    # at a trickle requests run alone, one step per token: a few of them say as much as all
    if not _meets(_run(shape, timer, limits, base[:20], lo), targets):
        return 0.0
    if _meets(_run(shape, timer, limits, base, hi), targets):
        return hi
    for _ in range(iterations):
        mid = math.sqrt(lo * hi) if hi / lo > 4 else (lo + hi) / 2
        if _meets(_run(shape, timer, limits, base, mid), targets):
            lo = mid
        else:
            hi = mid
    return lo


def predict(shape: ModelShape, target: Target, cfg: Configuration, workload: Workload, targets: Targets,
            num_requests: int = 300, seed: int = 0) -> Prediction:
    precision = cfg.precision_for(target)
    label = (f"{precision.label()}, max {cfg.max_num_seqs} seqs, {cfg.max_num_batched_tokens} tokens/step")
    kv_tokens, needed, reason = kv_capacity(shape, precision, target, cfg)
    p = Prediction(target.name, label, precision.label(), target.efficiency.source, target.calibrated,
                   target.price_per_hour, fits=not reason, memory_needed_gb=needed / 1e9,
                   memory_gb=target.machine.memory_gb, kv_cache_tokens=kv_tokens, reason=reason,
                   price_note=target.price_note)
    longest = max(workload.input_tokens) + max(workload.output_tokens)
    if not reason and kv_tokens < longest:
        p.fits, p.reason = False, (f"its KV cache holds {kv_tokens:,} tokens, fewer than the workload's longest "
                                   f"request ({longest:,}): give --kv-cache-memory")
    if not p.fits:
        return p
    limits = Limits(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                    kv_cache_tokens=kv_tokens)
    timer = roofline_timer(shape, precision, target.machine, target.efficiency)
    base = requests_for(workload, num_requests, seed)
    p.max_rate = max_rate(shape, timer, limits, base, targets)
    p.at_rate = _run(shape, timer, limits, base, min(workload.rate, max(p.max_rate, workload.rate / 100)))
    tokens_per_request = workload.tokens_per_request
    if p.max_rate <= 0:
        p.reason = f"cannot meet {targets.describe()} even at a trickle of requests"
        return p
    p.instances = max(1, math.ceil(workload.rate / p.max_rate - 1e-9))
    # the bill runs all month for the instances sized for the busiest hour; tokens come at the mean rate
    hourly = p.instances * target.price_per_hour
    p.monthly_usd = hourly * HOURS_PER_MONTH
    mean_tokens_s = workload.mean_rate * tokens_per_request
    p.cost_per_mtok = cost_per_million_tokens(hourly, mean_tokens_s)
    p.cost_per_mtok_output = cost_per_million_tokens(hourly, workload.mean_rate * workload.mean_output)
    p.cost_per_mtok_full = cost_per_million_tokens(target.price_per_hour, p.max_rate * tokens_per_request)
    p.capacity_tokens_per_day = p.max_rate * tokens_per_request * SECONDS_PER_DAY
    return p


# ---- break-even against an API -----------------------------------------------------------------

def api_usd_per_token(api: ApiPrice, workload: Workload) -> float:
    """$ per token of this workload's mix at ``api``'s prices (its cached-input price for the
    prompt tokens a prefix cache would serve, where it has one)."""
    n_in, n_out = workload.mean_input, workload.mean_output
    cached = n_in * workload.prefix_hit_rate
    return api.cost_usd(n_in, n_out, cached_input_tokens=cached) / (n_in + n_out)


def break_even(price_per_hour: float, capacity_tokens_per_day: float, api_per_token: float) -> dict[str, Any]:
    """See the module's docstring. Traffic in tokens/day; None where self-hosting never wins."""
    day = 24.0 * price_per_hour
    if capacity_tokens_per_day <= 0 or api_per_token <= 0 or capacity_tokens_per_day * api_per_token <= day:
        return {"first_wins_tokens_per_day": None, "always_wins_tokens_per_day": None}
    v1 = day / api_per_token
    k = math.ceil(day / (capacity_tokens_per_day * api_per_token - day) - 1e-12)
    always = v1 if k <= 1 else max(v1, k * capacity_tokens_per_day)
    return {"first_wins_tokens_per_day": v1, "always_wins_tokens_per_day": always}


def self_host_usd_per_day(tokens_per_day: float, capacity_tokens_per_day: float, price_per_hour: float) -> float:
    return max(1, math.ceil(tokens_per_day / capacity_tokens_per_day - 1e-12)) * 24.0 * price_per_hour


def compare_api(p: Prediction, api: ApiPrice, workload: Workload) -> dict[str, Any]:
    a = api_usd_per_token(api, workload)
    v = workload.tokens_per_day
    api_month = v * a * HOURS_PER_MONTH / 24.0
    self_month = p.monthly_usd
    out = {"api": api.name, "api_source": api.source, "api_as_of": api.as_of,
           "api_usd_per_mtok": a * 1e6, "api_monthly_usd": api_month, "self_monthly_usd": self_month,
           "monthly_saving_usd": None if self_month is None else api_month - self_month,
           "ratio_api_to_self": None if not self_month else api_month / self_month,
           **break_even(p.price_per_hour, p.capacity_tokens_per_day, a)}
    return out


def curve(p: Prediction, apis: Iterable[ApiPrice], workload: Workload, points: int = 41) -> list[dict[str, Any]]:
    """$/day of self-hosting and of each API over tokens/day, log-spaced around the workload's traffic
    and the break-even points (for the report's chart)."""
    if p.capacity_tokens_per_day <= 0:
        return []
    apis = list(apis)
    marks = [workload.tokens_per_day, p.capacity_tokens_per_day]
    for api in apis:
        be = break_even(p.price_per_hour, p.capacity_tokens_per_day, api_usd_per_token(api, workload))
        marks += [v for v in be.values() if v]
    lo, hi = max(min(marks) / 20, 1.0), max(marks) * 20
    out = []
    for i in range(points):
        v = lo * (hi / lo) ** (i / (points - 1))
        row = {"tokens_per_day": v, "self_usd_per_day": self_host_usd_per_day(v, p.capacity_tokens_per_day, p.price_per_hour)}
        for api in apis:
            row[api.name] = v * api_usd_per_token(api, workload)
        out.append(row)
    return out


def configurations(weights: list[str | None], kv: list[str | None], max_num_seqs: list[int],
                   max_num_batched_tokens: int, kv_cache_bytes: float | None) -> list[Configuration]:
    for w in weights:
        if w is not None and w not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {w!r}; known: {', '.join(WEIGHT_FORMATS)}")
    for k in kv:
        if k is not None and k not in KV_FORMATS:
            raise ValueError(f"unknown KV cache dtype {k!r}; known: {', '.join(KV_FORMATS)}")
    return [Configuration(w, k, n, max_num_batched_tokens, kv_cache_bytes) for w in weights for k in kv
            for n in max_num_seqs]


def default_efficiency(kind: str) -> Efficiency:
    return replace(DEFAULT_EFFICIENCY[kind], source=f"default {kind} efficiencies (not measured)")


def build_targets(names: list[str], calibrations: dict[str, Any], model: str,
                  price_per_hour: float | None = None) -> list[Target]:
    """Catalog entries (``names``; empty: all) as planning targets. A calibrated machine uses its
    measured peaks and efficiencies (this model's if calibrated with it, else another model's);
    any other uses its catalog peaks and the stated defaults."""
    from leanserve.cost.catalog import get_hardware, load_catalog

    entries = [get_hardware(n) for n in names] if names else list(load_catalog().values())
    machines = calibrations.get("machines", {}) if calibrations else {}
    out = []
    for hw in entries:
        kind = hardware_kind(hw.unit, hw.name)
        machine = Machine(hw.name, hw.peak_memory_bandwidth_gbps, dict(hw.peak_flops), hw.memory_gb, kind)
        eff, precision, calibrated = default_efficiency(kind), None, False
        cal = machines.get(hw.name)
        if cal:
            from leanserve.plan.calibrate import efficiency_from

            peaks = cal["peaks"]
            machine = Machine(hw.name, float(peaks["bandwidth_gbps"]), dict(peaks["peak_flops"]), hw.memory_gb, kind)
            models = cal.get("models", {})
            same = [m for m in models.values() if m.get("model") == model]
            pick = same[0] if same else next(iter(models.values()), None)
            if pick is not None:
                how = "" if same else f", with {pick['model']} (not this model)"
                eff = efficiency_from(pick, f"calibrated {pick['date'][:10]} on {cal.get('cpu', hw.name)}{how}")
                calibrated = True
                if same:
                    pr = pick["precision"]
                    small = pr.get("small_batch")
                    precision = Precision(pr["weights"], pr["kv_cache"],
                                          tuple((int(r), float(b)) for r, b in small) if small else None)
        price = hw.price_per_hour_usd if price_per_hour is None else price_per_hour
        note = ("your price" if price_per_hour is not None else
                f"{'placeholder' if hw.default_price else 'list'} price, {hw.source}, {hw.as_of}")
        out.append(Target(hw.name, machine, price, eff, calibrated, precision, note))
    return out
