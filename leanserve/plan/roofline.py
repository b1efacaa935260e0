"""The roofline of one engine step: bytes moved and FLOPs done, and the time they take on a machine.

One step of the engine (engine/engine.py) runs the model once over a flat batch: some sequences
decode one token, some compute a chunk of their prompt. Its work, per kind of operation:

- **linear**: every layer's q/k/v/o and MLP weights are read once per step and multiplied by all
  T tokens of the step: ``2 x linear_params x T`` FLOPs; the LM head (vocab x hidden) multiplies
  only the rows that sample (decoding sequences, and prompts whose last chunk this is).
- **attention**: each sequence reads its own K and V once per layer (up to the layer's sliding
  window) and each of its query tokens does ``4 x num_heads x head_dim`` FLOPs per key it attends
  to (QK^T and PV); new tokens' K and V are written.

Time of a step = fixed overhead + per-sequence overhead
               + max(linear bytes / (bandwidth x e_mem),      linear FLOPs / (peak x e_flops))
                 (e_small_mem and e_small_flops where a small step reads the quantized copy: another kernel)
               + max(attention bytes / (bandwidth x e_kv),    attention FLOPs / (peak x e_attn))

The efficiencies and overheads come from ``leanserve plan calibrate`` (what this machine's real
steps reached) or, for hardware never calibrated, from stated defaults (``DEFAULT_EFFICIENCY``).
No torch here: the arithmetic is pinned by hand-computed unit tests.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

# Bytes per weight of each format the planner knows. The 8- and 4-bit ones are GGUF's block
# formats (a 32-weight block with its float16 scale, and a min for the _1 kinds); Q4_K_M is about
# 4.5-4.8 bits (its mix of Q4_K and Q6_K), counted as Q4_K's 4.5.
WEIGHT_FORMATS: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0,
    "int8": 34 / 32,  # Q8_0
    "q4_1": 20 / 32,
    "int4": 18 / 32,  # Q4_0 / Q4_K (144 bytes per 256 weights)
}
# Bytes per K or V element of the KV cache.
KV_FORMATS: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
# Which peak FLOP/s a step runs at, by weight format: weight-only quantized weights are
# dequantized into the activations' dtype (bf16), so they run at its peak.
COMPUTE_DTYPE: dict[str, str] = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "int8": "bf16",
                                 "q4_1": "bf16", "int4": "bf16"}


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a model: its shapes, not its weights."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True
    layer_windows: tuple[int | None, ...] = ()  # per layer: None (full attention) or the window
    max_context: int = 2048
    file_bytes: int | None = None  # the weights as stored (a GGUF file's tensor bytes), when known
    file_format: str | None = None  # e.g. "Q4_1", "Q4_K_M" (GGUF) or "bf16" (safetensors)

    def __post_init__(self) -> None:
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")

    @property
    def linear_params_per_layer(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h + 3 * h * i

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.linear_params_per_layer

    @property
    def head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Every weight: the layers, the embedding table and (when not tied) the LM head."""
        return self.linear_params + self.head_params * (1 if self.tie_word_embeddings else 2)

    def kv_elements_per_token(self) -> int:
        """K and V elements one token keeps, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def kv_row_bytes(self, kv_format: str) -> float:
        """One token's K (or V) of one KV head: head_dim values, plus the float16 scales of leanserve's
        8-bit cache (--kv-cache-dtype int8: one per 32 values, or one per row where head_dim is not a
        multiple of 32)."""
        scales = (self.head_dim // 32 if self.head_dim % 32 == 0 else 1) if kv_format == "int8" else 0
        return self.head_dim * KV_FORMATS[kv_format] + 2 * scales

    def kv_bytes_per_token(self, kv_format: str) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.kv_row_bytes(kv_format)

    def weight_bytes(self, weight_format: str) -> float:
        """Resident weights in ``weight_format`` (norms and biases left out: under 0.1%)."""
        return self.num_params * WEIGHT_FORMATS[weight_format]

    def window_groups(self) -> list[tuple[int | None, int]]:
        """(window or None, number of layers) for each distinct window, full attention first."""
        counts = Counter(self.layer_windows)
        return sorted(counts.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(num_params=self.num_params, linear_params=self.linear_params, head_params=self.head_params,
                 kv_elements_per_token=self.kv_elements_per_token())
        return d


@dataclass(frozen=True)
class Step:
    """One engine step in aggregate.

    ``decode_kv[g]``: over the decoding sequences, the sum of min(context, window) of the layer
    group ``g`` (ModelShape.window_groups order), context counting the token being decoded.
    ``prefill``: (tokens already in the cache, tokens in this chunk, samples) per prompt chunk.
    """

    num_decode: int = 0
    decode_kv: tuple[int, ...] = ()
    prefill: tuple[tuple[int, int, bool], ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.num_decode + sum(n for _, n, _ in self.prefill)

    @property
    def num_seqs(self) -> int:
        return self.num_decode + len(self.prefill)

    @property
    def num_samples(self) -> int:
        return self.num_decode + sum(1 for *_, last in self.prefill if last)


def attended_keys(start: int, length: int, window: int | None) -> int:
    """Sum over the chunk's queries (positions start .. start+length-1) of the keys each attends to:
    min(position + 1, window)."""
    if length <= 0:
        return 0
    first, last = start + 1, start + length  # keys of the first and last query, before the window
    if window is None or last <= window:
        return (first + last) * length // 2
    if first >= window:
        return window * length
    below = window - first  # queries with fewer than `window` keys: first .. window-1
    return (first + window - 1) * below // 2 + window * (length - below)


@dataclass(frozen=True)
class StepWork:
    """Bytes and FLOPs of one step, by kind."""

    linear_bytes: float
    linear_flops: float
    attention_bytes: float
    attention_flops: float
    small_batch: bool = False  # the weights were read from Precision.small_batch's copy


@dataclass(frozen=True)
class Precision:
    """How a configuration stores things: the weights' format, and the KV cache's.

    ``small_batch``: ((rows, bytes), ...) ascending, where the engine reads another copy of the
    weights in small steps: a step of at most ``rows`` tokens reads ``bytes`` of weights (leanserve
    on a CPU reads a GGUF file's quantized blocks there, each matmul up to its own row limit)."""

    weights: str = "bf16"
    kv_cache: str = "bf16"
    small_batch: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        for fmt, known, what in ((self.weights, WEIGHT_FORMATS, "weight format"), (self.kv_cache, KV_FORMATS, "KV cache dtype")):
            if fmt not in known:
                raise ValueError(f"unknown {what} {fmt!r}; known: {', '.join(known)}")

    @property
    def compute_dtype(self) -> str:
        return COMPUTE_DTYPE[self.weights]

    def small_step_bytes(self, num_tokens: int) -> float | None:
        """The weight bytes a step of ``num_tokens`` reads from the small-step copy, None above it."""
        for rows, nbytes in self.small_batch or ():
            if num_tokens <= rows:
                return nbytes
        return None

    def label(self) -> str:
        text = f"{self.weights} weights, {self.kv_cache} KV"
        if self.small_batch:
            text += f" (quantized blocks up to {self.small_batch[-1][0]} rows)"
        return text


def step_work(shape: ModelShape, step: Step, precision: Precision) -> StepWork:
    """Bytes moved and FLOPs done by one step (see the module's docstring)."""
    tokens = step.num_tokens
    if tokens == 0:
        return StepWork(0.0, 0.0, 0.0, 0.0)
    bpw = WEIGHT_FORMATS[precision.weights]
    samples = step.num_samples
    small = precision.small_step_bytes(tokens)
    linear_bytes = small if small is not None else shape.linear_params * bpw + (shape.head_params * bpw if samples else 0.0)
    linear_flops = 2.0 * shape.linear_params * tokens + 2.0 * shape.head_params * samples
    kv_per_layer = 2 * shape.num_kv_heads * shape.kv_row_bytes(precision.kv_cache)  # bytes per token
    flops_per_key = 4 * shape.num_heads * shape.head_dim
    groups = shape.window_groups()
    decode_kv = step.decode_kv or (0,) * len(groups)
    if len(decode_kv) != len(groups):
        raise ValueError(f"decode_kv has {len(decode_kv)} entries for {len(groups)} window groups")
    keys_read = keys_attended = 0
    for (window, layers), dec in zip(groups, decode_kv):
        read = dec
        attended = dec
        for start, length, _ in step.prefill:
            end = start + length
            read += end if window is None else min(end, window + length - 1)
            attended += attended_keys(start, length, window)
        keys_read += layers * read
        keys_attended += layers * attended
    written = tokens * shape.num_layers
    attention_bytes = (keys_read + written) * kv_per_layer
    attention_flops = float(flops_per_key * keys_attended)
    return StepWork(float(linear_bytes), float(linear_flops), float(attention_bytes), attention_flops, small is not None)


@dataclass(frozen=True)
class Efficiency:
    """What fraction of a machine's peak each kind of work reaches, and the per-step overheads."""

    mem: float  # linear layers: fraction of peak bandwidth
    flops: float  # linear layers: fraction of peak FLOP/s
    kv_mem: float  # attention: fraction of peak bandwidth
    attn_flops: float  # attention: fraction of peak FLOP/s
    step_overhead_s: float  # per step, whatever its size (scheduling, launches, sampling setup)
    seq_overhead_s: float  # per sequence in the step (metadata, sampling, detokenizing)
    source: str = "default"  # "default" or where the calibration came from
    small_mem: float | None = None  # steps reading the small-step copy (another kernel): its bandwidth fraction
    small_flops: float | None = None  # and its fraction of peak FLOP/s

    def __post_init__(self) -> None:
        for name in ("mem", "flops", "kv_mem", "attn_flops", "small_mem", "small_flops"):
            v = getattr(self, name)
            if v is None and name.startswith("small_"):
                continue
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 3):
                raise ValueError(f"efficiency {name} must be in (0, 3], got {v!r}")
        for name in ("step_overhead_s", "seq_overhead_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Stated defaults for hardware never calibrated (not measured by leanserve): GPU decode kernels
# commonly reach 60-80% of HBM bandwidth and large GEMMs 50-70% of dense peak; paged attention is
# less regular; an eager (no CUDA graphs) Python engine step costs a few ms of launches.
DEFAULT_EFFICIENCY = {
    "gpu": Efficiency(mem=0.7, flops=0.5, kv_mem=0.5, attn_flops=0.3, step_overhead_s=4e-3, seq_overhead_s=20e-6),
    "tpu": Efficiency(mem=0.7, flops=0.5, kv_mem=0.5, attn_flops=0.3, step_overhead_s=4e-3, seq_overhead_s=20e-6),
    "cpu": Efficiency(mem=0.5, flops=0.3, kv_mem=0.3, attn_flops=0.1, step_overhead_s=2e-3, seq_overhead_s=60e-6),
}


@dataclass(frozen=True)
class Machine:
    """The peaks a roofline divides by (one unit of a catalog entry, or this machine as measured)."""

    name: str
    bandwidth_gbps: float  # GB/s
    peak_flops: dict[str, float | None]  # by dtype
    memory_gb: float | None = None
    kind: str = "gpu"  # gpu | tpu | cpu: which default efficiencies apply

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; a dtype the hardware has no figure for falls back to fp32's
        (a CPU without bf16 units runs bf16 steps at its fp32 rate), else ValueError."""
        value = self.peak_flops.get(dtype)
        if value is None and dtype in ("bf16", "fp16", "fp8"):
            value = self.peak_flops.get("bf16") or self.peak_flops.get("fp16") or self.peak_flops.get("fp32")
        if not value:
            raise ValueError(f"{self.name} has no peak FLOP/s figure for {dtype}")
        return float(value)


def step_time(work: StepWork, num_seqs: int, machine: Machine, eff: Efficiency, compute_dtype: str) -> float:
    """Seconds one step takes on ``machine`` at efficiencies ``eff``."""
    if num_seqs == 0:
        return 0.0
    bw = machine.bandwidth_gbps * 1e9
    peak = machine.flops_for(compute_dtype)
    mem, flops = ((eff.small_mem or eff.mem, eff.small_flops or eff.flops) if work.small_batch else (eff.mem, eff.flops))
    linear = max(work.linear_bytes / (bw * mem), work.linear_flops / (peak * flops))
    attention = max(work.attention_bytes / (bw * eff.kv_mem), work.attention_flops / (peak * eff.attn_flops))
    return eff.step_overhead_s + eff.seq_overhead_s * num_seqs + linear + attention

