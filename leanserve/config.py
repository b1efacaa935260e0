"""Every knob, as frozen dataclasses validated on construction. No global state, no torch import.

A field's ``metadata`` may carry ``cli``: how the command line shows it (help, choices, type, flag
name; ``{"cli": False}``: no flag). `leanserve.argtypes.add_config_args` derives the flags from the
fields, so a default is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPECULATIVE_METHODS = ("off", "ngram", "suffix", "draft", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "int8")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _cli(help: str, **how: Any) -> dict[str, Any]:
    """A field's command-line metadata: help text (plain, no % formatting) and add_argument options
    (choices, type, metavar), ``flag`` for a name other than ``--field-name``, ``positional``."""
    return {"cli": {"help": help, **how}}


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '1000' -> 1000. ValueError on anything else."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "k": 2**10, "m": 2**20, "g": 2**30}
    s = text.strip().lower().replace(" ", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512MiB, 2GiB, 1000000)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512MiB, 2GiB, 1000000)")
    return int(value * units[unit])


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``num_blocks`` blocks of ``block_size`` tokens each."""

    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; int8: Q8_0 blocks (model/attention.py)

    def __post_init__(self) -> None:
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _require(self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits. ``max_num_batched_tokens`` is the token budget of one model forward."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # BATCH-priority sequences a step may carry when it also carries INTERACTIVE ones; None: no cap
    max_batch_seqs_beside_interactive: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _require(self.max_batch_seqs_beside_interactive is None or self.max_batch_seqs_beside_interactive >= 0,
                 f"max_batch_seqs_beside_interactive must be >= 0, got {self.max_batch_seqs_beside_interactive}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
        _require(
            self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
            "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
            f"({self.max_num_batched_tokens} < {self.max_model_len})",
        )


@dataclass(frozen=True)
class EngineConfig:
    """What `LLM` and the server are built from."""

    model: str = field(default="smollm2-135m", metadata=_cli(
        "built-in model name, .gguf file or HF folder", positional=True))
    dtype: str = field(default="auto", metadata=_cli(
        "weights and activations; auto: bfloat16 where the hardware has fast bf16 matmul, else float32",
        choices=DTYPES))
    device: str = field(default="auto", metadata=_cli("auto (cuda if available, else cpu), cpu, cuda or cuda:N"))
    quantization: str = field(default="none", metadata=_cli(
        "quantize a float model's weights at load (an HF folder): int8 (GGUF Q8_0: a scale per 32 weights) or int4 "
        "(Q4_1: a scale and a min per 32; the LM head in Q8_0); the model then is the quantized one at every batch "
        "size, small steps reading the blocks with the native CPU kernels", choices=QUANTIZATIONS))
    float_weights: bool = field(default=False, metadata=_cli(
        "keep a float copy of quantized weights (a GGUF file's blocks, --quantization) for batches past a few "
        "dozen rows: more memory; without it (the default on CPU) big batches dequantize tiles of the blocks "
        "just before the dense matmul, and the blocks are the only copy"))
    kv_cache_memory: int | None = field(default=None, metadata=_cli(
        "bytes for the KV cache, e.g. 1GiB (default: 1GiB on CPU, 80% of free GPU memory)",
        type=parse_bytes, metavar="SIZE"))
    kv_cache_dtype: str = field(default="auto", metadata=_cli(
        "the KV cache's element type: auto (the model's dtype) or int8 (GGUF Q8_0 blocks: 8-bit values and a "
        "float16 scale per 32, quantized as they are written: 1.88x the tokens of a 16-bit cache in the same "
        "memory, 3.76x of float32; the CPU kernels read it in place)", choices=KV_CACHE_DTYPES))
    block_size: int = field(default=16, metadata=_cli("tokens per KV cache block"))
    enable_prefix_caching: bool = field(default=True, metadata=_cli(
        "do not reuse the KV cache of prompt prefixes already computed", flag="--no-prefix-caching"))
    max_num_batched_tokens: int = field(default=512, metadata=_cli(
        "tokens one model step may compute (its prefill chunks and decodes together)"))
    max_num_seqs: int = field(default=128, metadata=_cli("sequences in the running batch at most"))
    batch_seqs_beside_interactive: int = field(default=0, metadata=_cli(
        "batch-priority sequences (the batch API's lines) a step may carry beside interactive ones (0: batch work "
        "runs only in steps without interactive work; measured on a 2-core CPU, where a decode step's time grows "
        "with its rows: 2 doubled interactive TPOT, 0 kept it flat; batch work alone is not capped)", metavar="N"))
    max_model_len: int | None = field(default=None, metadata=_cli(
        "context length (default: the model's own, capped by the KV cache)"))
    speculative: str = field(default="off", metadata=_cli(
        "speculative decoding: off; ngram (prompt lookup in each request's own prompt and output); suffix "
        "(that, and recent requests of the same API key); draft (a draft model, --draft-model); auto (the sequence's "
        "own text, else the API key's recent requests, else the draft model where one is given). Every method sizes its drafts from the "
        "measured step cost and each sequence's acceptance", choices=SPECULATIVE_METHODS))
    draft_model: str | None = field(default=None, metadata=_cli(
        "the draft model for --speculative draft/auto: a model with the target's tokenizer (name, .gguf or HF "
        "folder), or self:N, the target's own first N layers with its final norm and head (draft's default: "
        "self with a quarter of the layers)", metavar="MODEL"))
    num_speculative_tokens: int = field(default=4, metadata=_cli(
        "draft tokens per sequence and step at most (each sequence adapts below it to its acceptance)"))
    speculative_max_batch: int = field(default=8, metadata=_cli(
        "speculate only while at most this many sequences decode (a bigger batch keeps the machine busy already)"))
    seed: int = field(default=0, metadata={"cli": False})  # torch's seed at load; requests carry their own
    threads: int | None = field(default=None, metadata=_cli(
        "CPU threads for the model and the native kernels (default: one per core, torch's choice; stated at "
        "start-up)", metavar="N"))

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(self.quantization in QUANTIZATIONS,
                 f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0,
                 f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        _require(self.block_size in (8, 16, 32, 64, 128), f"block_size must be 8, 16, 32, 64 or 128, got {self.block_size}")
        _require(self.max_num_batched_tokens >= 1, f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.batch_seqs_beside_interactive >= 0,
                 f"batch_seqs_beside_interactive must be >= 0, got {self.batch_seqs_beside_interactive}")
        _require(self.max_model_len is None or self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(self.speculative in SPECULATIVE_METHODS,
                 f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}")
        _require(self.draft_model is None or self.speculative in ("draft", "auto"),
                 f"--draft-model needs --speculative draft or auto, got {self.speculative!r}")
        if self.draft_model is not None and self.draft_model.startswith("self"):
            n = self.draft_model.removeprefix("self").removeprefix(":")
            _require(self.draft_model in ("self", "self:") or (self.draft_model.startswith("self:") and n.isdigit()
                                                                and int(n) >= 1),
                     f"--draft-model {self.draft_model!r}: expected self or self:N, N >= 1 layers of the target")
        _require(1 <= self.num_speculative_tokens <= 16,
                 f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        _require(self.speculative_max_batch >= 1, f"speculative_max_batch must be >= 1, got {self.speculative_max_batch}")
