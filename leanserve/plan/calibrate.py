"""`leanserve plan calibrate`: what fraction of this machine's peak the engine's real steps reach.

This machine's CPU; a GPU is not calibrated yet (the catalog's GPUs use stated defaults).

1. The machine's peaks, measured now: the read rate of a 512 MiB buffer (past every cache) and
   the best rate of square matmuls (512, 1024, 2048) in float32 and bfloat16.
2. A short sweep of real engine steps through the public engine API (add_request / step), each of
   a composition known by construction: pure decode steps of B sequences at context C (B from 1 to
   128), and single prompt chunks of L tokens at a given start.
3. A fit of the roofline's six parameters (roofline.Efficiency: four fractions of peak, a per-step
   and a per-sequence overhead) minimising the squared relative error over the sweep's steps: the
   four fractions on a grid, the two overheads by least squares for each grid point.

The result is stored as JSON (``calibration_path()``), one entry per model and dtype, beside the
measured peaks, the CPU and the date; ``leanserve plan`` uses it for the hardware it was measured on.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from leanserve.plan.roofline import Efficiency, Machine, ModelShape, Precision, Step, StepWork, step_time, step_work

CALIBRATION_VERSION = 1
GRID = tuple(round(0.02 * (2.0 / 0.02) ** (i / 27), 6) for i in range(28))  # 0.02 .. 2, geometric (above 1: a
# working set that stays in the caches reads faster than the 512 MiB buffer the peak is measured with)


def calibration_path() -> Path:
    from leanserve.env import home

    return home() / "plan" / "calibration.json"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the machine's peaks ----------------------------------------------------------------------

def median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 1) -> float:
    """The median of ``repeats`` timed calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_peaks(log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """{'bandwidth_gbps', 'peak_flops': {'fp32', 'bf16'}} of this machine, now (medians of repeats)."""
    import torch

    big = torch.ones(128 * 2**20)  # 512 MiB of float32
    bandwidth = big.numel() * 4 / median_time(lambda: big.sum()) / 1e9
    del big
    flops: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for size in (512, 1024, 2048):
            a = torch.randn(size, size).to(dtype)
            b = torch.randn(size, size).to(dtype)
            best = max(best, 2 * size**3 / median_time(lambda: a @ b, repeats=5))
        flops[name] = best
    log(f"peaks: read {bandwidth:.1f} GB/s, fp32 {flops['fp32'] / 1e9:,.0f} GFLOP/s, "
        f"bf16 {flops['bf16'] / 1e9:,.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    return {"bandwidth_gbps": bandwidth, "peak_flops": flops, "threads": torch.get_num_threads()}


# ---- the sweep ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """One measured engine step of a known composition."""

    step: Step
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"num_decode": self.step.num_decode, "decode_kv": list(self.step.decode_kv),
                "prefill": [list(p) for p in self.step.prefill], "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Observation":
        return cls(Step(int(d["num_decode"]), tuple(int(x) for x in d["decode_kv"]),
                        tuple((int(a), int(b), bool(c)) for a, b, c in d["prefill"])), float(d["seconds"]))


DECODE_POINTS = ((1, 64), (2, 64), (4, 64), (8, 64), (12, 64), (16, 64), (24, 64), (32, 64), (48, 64), (64, 64),
                 (96, 64), (128, 64), (1, 1024), (4, 1024), (8, 1024), (16, 1024), (32, 256), (48, 512))
PREFILL_POINTS = ((16,), (64,), (128,), (256,), (384,), (512,), (1536,))  # prompt lengths, one request each
QUICK_DECODE_POINTS = ((1, 64), (8, 64), (32, 64), (128, 64), (8, 1024), (24, 512))
QUICK_PREFILL_POINTS = ((64,), (512,), (1536,))


def decode_kv(shape: ModelShape, contexts: list[int]) -> tuple[int, ...]:
    """Step.decode_kv for decoding sequences whose step attends ``contexts`` keys each."""
    return tuple(sum(c if w is None else min(c, w) for c in contexts) for w, _ in shape.window_groups())


def run_sweep(engine: Any, shape: ModelShape, quick: bool = False, decode_steps: int = 5, seed: int = 0,
              log: Callable[[str], None] = lambda s: None) -> list[Observation]:
    """Time real steps of ``engine`` (an LLMEngine with max_num_batched_tokens >= 512) whose
    composition is known: see the module's docstring."""
    from leanserve.types import SamplingParams

    rng = random.Random(seed)
    budget = engine.scheduler_config.max_num_batched_tokens
    vocab = shape.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def submit(n_prompt: int, max_tokens: int) -> str:
        rid = engine.new_request_id()
        engine.add_request(rid, prompt(n_prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return rid

    def drain() -> None:
        while engine.has_unfinished():
            engine.step()

    submit(32, 4)  # warm-up: first calls load kernels and fill allocator caches
    drain()
    obs: list[Observation] = []
    for batch, context in (QUICK_DECODE_POINTS if quick else DECODE_POINTS):
        # enough tokens that nobody finishes while the last prompts are still being computed
        max_tokens = -(-batch * context // budget) + decode_steps + 4
        ids = [submit(context, max_tokens) for _ in range(batch)]
        produced = dict.fromkeys(ids, 0)
        while min(produced.values()) == 0:  # prefill every prompt; each samples its first token
            for out in engine.step().outputs:
                produced[out.request_id] = len(out.outputs[0].token_ids)
        times, steps = [], []
        for j in range(decode_steps):
            # the token being decoded is each one's last output, at position context + produced - 1
            steps.append(Step(batch, decode_kv(shape, [context + n for n in produced.values()])))
            t = time.perf_counter()
            result = engine.step()
            times.append(time.perf_counter() - t)
            for out in result.outputs:
                produced[out.request_id] = len(out.outputs[0].token_ids)
        # the first decode step after the prefills is a warm-up; of the rest, the median (a step of
        # the middle context) stands for the point, so one stray slow step does not
        timed = sorted(zip(times[1:], range(1, decode_steps)))
        seconds, j = timed[len(timed) // 2]
        obs.append(Observation(steps[j], seconds))
        for rid in ids:
            engine.abort_request(rid)
        drain()
        log(f"decode batch {batch:>3} at context {context:>4}: median step "
            f"{1e3 * statistics.median(times[1:]):.2f} ms")
    for (length,) in (QUICK_PREFILL_POINTS if quick else PREFILL_POINTS):
        chunks: dict[int, list[float]] = {}  # chunk start -> its times over the repeats
        for _ in range(3):
            submit(length, 1)
            start = 0
            while engine.has_unfinished():
                t = time.perf_counter()
                engine.step()
                chunks.setdefault(start, []).append(time.perf_counter() - t)
                start += budget
        for start, times in chunks.items():
            n = min(budget, length - start)
            step = Step(0, (0,) * len(shape.window_groups()), ((start, n, start + n == length),))
            obs.append(Observation(step, statistics.median(times)))
        log(f"prefill of {length} tokens: {1e3 * sum(statistics.median(t) for t in chunks.values()):.1f} ms")
    return obs


# ---- the fit -----------------------------------------------------------------------------------

def fit(observations: list[Observation], shape: ModelShape, precision: Precision, machine: Machine,
        source: str) -> tuple[Efficiency, dict[str, float]]:
    """The Efficiency minimising sum(((predicted - measured) / measured)^2), and the fit's errors.
    A step that took over twice its fitted time was disturbed (another process on the cores, a
    page fault storm): it is left out and the rest fitted again."""
    eff, errors = _fit(observations, shape, precision, machine, source)
    kept = [o for o in observations
            if o.seconds <= 2 * step_time(step_work(shape, o.step, precision), o.step.num_seqs, machine, eff,
                                          precision.compute_dtype)]
    if len(kept) < len(observations) and len(kept) >= 4:
        eff, errors = _fit(kept, shape, precision, machine, source)
        errors["left_out"] = len(observations) - len(kept)
    return eff, errors


def _fit(observations: list[Observation], shape: ModelShape, precision: Precision, machine: Machine,
         source: str) -> tuple[Efficiency, dict[str, float]]:
    import numpy as np

    if len(observations) < 4:
        raise ValueError("a calibration needs at least 4 measured steps")
    works: list[StepWork] = [step_work(shape, o.step, precision) for o in observations]
    meas = np.array([o.seconds for o in observations])
    seqs = np.array([o.step.num_seqs for o in observations], dtype=float)
    bw = machine.bandwidth_gbps * 1e9
    peak = machine.flops_for(precision.compute_dtype)
    grid = np.array(GRID)
    small = np.array([w.small_batch for w in works])
    lb = np.array([w.linear_bytes for w in works]) / bw
    lf = np.array([w.linear_flops for w in works]) / peak
    ab = np.array([w.attention_bytes for w in works]) / bw
    af = np.array([w.attention_flops for w in works]) / peak
    w = 1.0 / meas**2
    a11, a12, a22 = w.sum(), (w * seqs).sum(), (w * seqs * seqs).sum()
    det = a11 * a22 - a12 * a12

    def roof(nbytes: Any, flops: Any) -> Any:
        """(G*G, N): max(bytes / e1, flops / e2) at every pair of the grid."""
        return np.maximum(nbytes[None, None, :] / grid[:, None, None], flops[None, None, :] / grid[None, :, None]).reshape(-1, len(meas))

    def overheads(r: Any) -> tuple[Any, Any, Any]:
        """Least-squares (step, per-sequence) overheads >= 0 for each row of residuals r, and the error."""
        b1, b2 = (w * r).sum(axis=1), (w * seqs * r).sum(axis=1)
        t0 = (a22 * b1 - a12 * b2) / det
        ts = (a11 * b2 - a12 * b1) / det
        neg0, negs = t0 < 0, ts < 0  # where one is negative: 0, and the other fitted alone
        t0, ts = np.where(neg0, 0.0, t0), np.where(neg0, np.maximum(b2 / a22, 0.0), ts)
        ts, t0 = np.where(negs & ~neg0, 0.0, ts), np.where(negs & ~neg0, np.maximum(b1 / a11, 0.0), t0)
        return t0, ts, (w * (r - t0[:, None] - ts[:, None] * seqs[None, :]) ** 2).sum(axis=1)

    # three kinds of work, each a pair of fractions on the grid: big steps' matmuls, small steps'
    # (the quantized copy: another kernel), attention. Coordinate descent over the pairs, each pair
    # searched whole with the other two fixed, until nothing improves.
    parts = [np.where(small, 0.0, 1.0)[None, :] * roof(lb, lf), np.where(small, 1.0, 0.0)[None, :] * roof(lb, lf),
             roof(ab, af)]
    pick = [len(grid) * (len(grid) // 2) + len(grid) // 2] * 3
    best = np.inf
    for _ in range(20):
        improved = False
        for k in range(3):
            fixed = sum(parts[m][pick[m]] for m in range(3) if m != k)
            t0s, tss, err = overheads(meas[None, :] - fixed[None, :] - parts[k])
            i = int(np.argmin(err))
            if err[i] < best - 1e-15:
                best, pick[k], improved = float(err[i]), i, True
        if not improved:
            break
    t0s, tss, _ = overheads((meas - sum(parts[m][pick[m]] for m in range(3)))[None, :])
    t0, ts = float(t0s[0]), float(tss[0])
    g = len(grid)
    (mem, flops), (smem, sflops), (kv, attn) = ((float(grid[p // g]), float(grid[p % g])) for p in pick)
    eff = Efficiency(mem=mem, flops=flops, kv_mem=kv, attn_flops=attn, step_overhead_s=t0, seq_overhead_s=ts,
                     source=source, small_mem=smem if small.any() else None, small_flops=sflops if small.any() else None)
    pred = sum(parts[m][pick[m]] for m in range(3)) + t0 + ts * seqs
    rel = np.abs(pred - meas) / meas
    return eff, {"median_abs_rel_error": float(np.median(rel)), "max_abs_rel_error": float(rel.max()),
                 "steps": int(len(meas))}


# ---- the stored calibration --------------------------------------------------------------------

def model_key(model: str, precision: Precision) -> str:
    return f"{Path(model).name if os.sep in model else model}|{precision.label()}"


def load_calibrations(path: Path | None = None) -> dict[str, Any]:
    """The stored calibrations ({} when there are none). ValueError, one line, when unreadable."""
    path = path or calibration_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the calibration file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION or not isinstance(data.get("machines"), dict):
        raise ValueError(f"{path} is not a leanserve plan calibration (version {CALIBRATION_VERSION}); "
                         "run `leanserve plan calibrate` again")
    return data


def save_calibration(hardware: str, peaks: dict[str, Any], model: str, shape: ModelShape, precision: Precision,
                     eff: Efficiency, errors: dict[str, float], observations: list[Observation],
                     path: Path | None = None) -> Path:
    path = path or calibration_path()
    data = load_calibrations(path) if path.exists() else {}
    data = data or {"version": CALIBRATION_VERSION, "machines": {}}
    entry = data["machines"].setdefault(hardware, {})
    entry.update(cpu=cpu_name(), peaks=peaks, date=_dt.date.today().isoformat())
    entry.setdefault("models", {})[model_key(model, precision)] = {
        "model": model, "shape": shape.name, "precision": {"weights": precision.weights, "kv_cache": precision.kv_cache,
                                                           "small_batch": precision.small_batch},
        "efficiency": eff.to_dict(), "fit": errors, "observations": [o.to_dict() for o in observations],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def efficiency_from(entry: dict[str, Any], source: str) -> Efficiency:
    e = entry["efficiency"]
    return Efficiency(mem=e["mem"], flops=e["flops"], kv_mem=e["kv_mem"], attn_flops=e["attn_flops"],
                      step_overhead_s=e["step_overhead_s"], seq_overhead_s=e["seq_overhead_s"], source=source,
                      small_mem=e.get("small_mem"), small_flops=e.get("small_flops"))


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def engine_precision(info: Any) -> Precision:
    """How a built engine (its ModelInfo) stores its weights and KV cache."""
    dtype = DTYPE_NAMES.get(info.dtype, info.dtype)
    small = tuple((int(r), float(b)) for r, b in info.small_step_reads) or None
    return Precision(weights=dtype, kv_cache=dtype, small_batch=small)


def local_machine(peaks: dict[str, Any], memory_gb: float | None = None) -> Machine:
    return Machine("cpu-local", float(peaks["bandwidth_gbps"]), dict(peaks["peak_flops"]), memory_gb, "cpu")


def calibrate(models: list[str], dtype: str = "auto", quick: bool = False, hardware: str = "cpu-local",
              path: Path | None = None, log: Callable[[str], None] = lambda s: None) -> Path:
    """Measure the peaks, sweep each model's steps, fit and store. Returns the file written."""
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import LLMEngine
    from leanserve.plan.model import load_shape

    peaks = measure_peaks(log)
    machine = local_machine(peaks)
    written = path or calibration_path()
    for model in models:
        shape = load_shape(model)
        # the CPU only: a GPU's calibration (its peaks measured with device synchronisation, CUDA
        # graphs on and off) belongs with the CUDA path's first run on a real GPU
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device="cpu", kv_cache_memory=3 << 30,
                                        max_num_batched_tokens=512))
        precision = engine_precision(engine.info)
        log(f"{model}: {precision.label()}; {engine.describe_runtime()}")
        obs = run_sweep(engine, shape, quick=quick, log=log)
        del engine
        eff, errors = fit(obs, shape, precision, machine, source=f"calibrated on this machine ({cpu_name()})")
        small = (f" (small steps' quantized copy: {eff.small_mem:.0%} / {eff.small_flops:.0%})"
                 if eff.small_mem and eff.small_flops else "")
        log(f"{model}: linear layers at {eff.mem:.0%} of peak bandwidth{small} / {eff.flops:.0%} of peak FLOP/s, attention "
            f"{eff.kv_mem:.0%} / {eff.attn_flops:.0%}, overhead {1e3 * eff.step_overhead_s:.2f} ms per step + "
            f"{1e6 * eff.seq_overhead_s:.0f} us per sequence; fit: median error "
            f"{errors['median_abs_rel_error']:.1%}, worst {errors['max_abs_rel_error']:.1%} over {errors['steps']} steps")
        written = save_calibration(hardware, peaks, model, shape, precision, eff, errors, obs, path)
    return written
