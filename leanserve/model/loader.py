"""Model sources -> (ModelConfig, weights, tokenizer).

A model is a built-in name (`leanserve pull NAME`), an HF folder (config.json, *.safetensors,
tokenizer.json) or a .gguf file. Weights stream as (HF tensor name, tensor) pairs straight into the
model's parameters: safetensors are memory-mapped, GGUF blocks are dequantized one tensor at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanserve import kernels
from leanserve.model.config import ModelConfig
from leanserve.model.quant import QUANTIZE_TYPES, QuantWeight, from_gguf_blocks, quantize_weight
from leanserve.model.registry import BUILTIN_MODELS, builtin_path, is_pulled, model_class
from leanserve.tokenizer import LeanTokenizer

GGUF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


class ModelNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    path: Path
    kind: str  # "gguf" | "hf"


def resolve(model: str) -> ModelSource:
    """Name or path -> where the files are. Raises ModelNotFoundError with what was expected."""
    if model in BUILTIN_MODELS:
        if not is_pulled(model):
            raise ModelNotFoundError(f"model {model!r} is not downloaded yet: run `leanserve pull {model}`")
        return ModelSource(model, builtin_path(model), "gguf")
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(model, path, "gguf")
    if path.is_dir():
        missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            raise ModelNotFoundError(f"{path} is not an HF model folder: missing {', '.join(missing)}")
        return ModelSource(model, path, "hf")
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor an HF model folder")
    raise ModelNotFoundError(
        f"unknown model {model!r}: expected a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a .gguf file or an HF folder with config.json, *.safetensors and tokenizer.json")


# ---- GGUF -------------------------------------------------------------------------------------

def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def gguf_to_hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch not in GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    cfg: dict[str, Any] = {
        "architectures": [GGUF_ARCHS[arch]],
        "vocab_size": get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": get("attention.key_length") or get("embedding_length") // num_heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if get("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    if get("attention.sliding_window"):
        cfg["sliding_window"] = get("attention.sliding_window")
    if arch == "gemma3":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["query_pre_attn_scalar"] = cfg["head_dim"]
        cfg["rope_local_base_freq"] = 10000.0
    return cfg


_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_NAMES = {**_GGUF_NAMES, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def gguf_tensor_name(name: str, arch: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    blk, idx, part, suffix = name.split(".")
    names = _GEMMA3_NAMES if arch == "gemma3" else _GGUF_NAMES
    if blk != "blk" or part not in names:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{idx}.{names[part]}.{suffix}"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores Llama's q/k rows interleaved per head (pairs (0,1),(2,3)...) for its rope;
    # put them back in HF's rotate-half order: (head, pair, 2, in) -> (head, 2, pair, in)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(reader: Any, cfg: ModelConfig, arch: str, blocks: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """Every tensor, HF-named, as float32, in HF's layout (Llama q/k rows un-permuted, Gemma norms
    shifted); with ``blocks``, each 2-D tensor whose GGUF type the native kernel reads as is
    (model/quant.py) comes in its quantized blocks instead (rows arranged alike), never dequantized."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = gguf_tensor_name(t.name, arch)
        llama_qk = arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight"))
        heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
        if blocks and len(t.shape) == 2:
            n, k = (int(d) for d in reversed(t.shape))
            qw = from_gguf_blocks(t.data, t.tensor_type.name, n, k)
            if qw is not None:
                yield name, qw.rows(_unpermute_rope(np.arange(n)[:, None], heads)[:, 0]) if llama_qk else qw
                continue
        data = t.data
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = dequantize(data, t.tensor_type)
        w = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if llama_qk:
            w = _unpermute_rope(w, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + weight); our RMSNorm adds the 1
        yield name, torch.from_numpy(np.array(w, copy=True) if not w.flags.writeable else np.ascontiguousarray(w))


# ---- HF folders -------------------------------------------------------------------------------

def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:  # memory-mapped
            for name in st.keys():
                yield name.removeprefix("model.language_model.").removeprefix("language_model."), st.get_tensor(name)


# ---- building ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Parameters are overwritten by the checkpoint: skip their random initialization."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = lambda self: None  # type: ignore[method-assign]
    nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(cfg: ModelConfig, weights: Iterator[tuple[str, torch.Tensor | QuantWeight]] | None, dtype: torch.dtype,
                device: torch.device, float_weights: bool = True) -> nn.Module:
    """Allocate the model once in its final dtype/device and copy the weights in (no second copy;
    a weight that comes in quantized blocks is never written in float unless ``float_weights``:
    see ``CausalLM.load_weights``)."""
    cls = model_class(cfg)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), (_no_init() if weights is not None else contextlib.nullcontext()):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    if weights is not None:
        model.load_weights(weights, float_weights)
    return model.eval()


@dataclass
class LoadedModel:
    source: ModelSource
    config: ModelConfig
    model: nn.Module
    tokenizer: LeanTokenizer
    dtype: torch.dtype
    device: torch.device

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a sequence: the tokenizer's and the model config's (computed here only)."""
        return frozenset(self.tokenizer.eos_token_ids) | frozenset(self.config.eos_token_ids)


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes of weights) of a torch module; tied weights count once."""
    n = b = 0
    for p in model.parameters():
        n += p.numel()
        b += p.numel() * p.element_size()
    return n, b


_FAST_READER: type | None = None


def open_gguf(path: str | Path) -> Any:
    """gguf's ``GGUFReader`` over the file, parsed 3-4x faster: the reader slices its data once per
    metadata value (300k times for a 49k-token vocabulary), and on an ``np.memmap`` each slice runs
    memmap's Python-level ``__getitem__``/``__array_finalize__``; here it slices a plain ndarray view
    of the same mapping (no copy). The fields and tensors are the same (tests/model checks them):
    SmolLM2's file parses in ~1.2 s instead of ~4.3 s, Gemma 3's 262k-token one in ~8 instead of ~29."""
    global _FAST_READER
    if _FAST_READER is None:
        import numpy as np
        from gguf.gguf_reader import GGUFReader

        class PlainArrayReader(GGUFReader):
            @property
            def data(self) -> Any:
                return self._plain

            @data.setter
            def data(self, value: Any) -> None:
                self._plain = np.asarray(value)  # the memmap's buffer as a base-class ndarray

            def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
                count = int(count)
                dt = np.dtype(dtype)
                arr = self._plain[offset:offset + dt.itemsize * count].view(dt)[:count]
                return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        _FAST_READER = PlainArrayReader
    return _FAST_READER(str(path))


def load_config_and_tokenizer(source: ModelSource) -> tuple[ModelConfig, LeanTokenizer, Any]:
    if source.kind == "gguf":
        try:
            reader = open_gguf(source.path)
        except Exception as e:  # a truncated or foreign file: say which, not where in gguf it broke
            raise ModelNotFoundError(f"{source.path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        meta = read_gguf_metadata(reader)
        hf = gguf_to_hf_config(meta, {t.name for t in reader.tensors})
        tokenizer = LeanTokenizer.from_gguf_metadata(meta, source.path.with_suffix(".tokenizer.json"))
        return ModelConfig.from_hf_config(hf), tokenizer, reader
    try:
        hf = json.loads((source.path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"{source.path / 'config.json'} is not valid JSON: {e}") from None
    return ModelConfig.from_hf_config(hf), LeanTokenizer.from_hf_folder(source.path), None


def quantize_at_load(weights: Iterator[tuple[str, torch.Tensor]], quantization: str
                     ) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """``--quantization``: each matmul weight (2-D, rows a multiple of 32 wide) in GGUF blocks
    (``quant.quantize_weight``), so every path computes the quantized model; norms, biases and odd
    shapes stay as they are."""
    layer_type, head_type = QUANTIZE_TYPES[quantization]
    for name, t in weights:
        if t.dim() != 2 or t.shape[1] % 32 or not name.endswith(".weight"):
            yield name, t
            continue
        head = name.endswith(("embed_tokens.weight", "lm_head.weight"))
        qw, _ = quantize_weight(t, head_type if head else layer_type)
        yield name, qw


def _dequantized(weights: Iterator[tuple[str, torch.Tensor | QuantWeight]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in weights:
        yield name, t.dequantize() if isinstance(t, QuantWeight) else t


def load_model(model: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               quantization: str = "none", float_weights: bool = False) -> LoadedModel:
    """``float_weights``: a quantized model (a GGUF file, ``quantization``) keeps a float copy of its
    matmul weights beside the blocks for big batches (more memory); by default the blocks are the
    only copy wherever the native CPU kernels run (elsewhere the weights are float)."""
    source = resolve(model)
    device = torch.device(device)
    if quantization != "none" and source.kind == "gguf":
        raise ValueError(f"--quantization {quantization} quantizes a float model (an HF folder); "
                         f"{source.path.name} is a GGUF file, already quantized")
    cfg, tokenizer, reader = load_config_and_tokenizer(source)
    native = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and kernels.ops() is not None
    if reader is not None:
        weights = iter_gguf_weights(reader, cfg, read_arch(reader), blocks=native)
    else:
        weights = iter_safetensors(source.path)
        if quantization != "none":
            weights = quantize_at_load(weights, quantization)
            if not native:  # no kernel reads blocks here: the quantized model's values, in float
                weights = _dequantized(weights)
    net = build_model(cfg, weights, dtype, device, float_weights=float_weights)
    if device.type == "cpu" and dtype == torch.bfloat16 and kernels.amx_available():
        net.attach_amx()
    del weights, reader
    _return_freed_memory()
    return LoadedModel(source, cfg, net, tokenizer, dtype, device)


def _return_freed_memory() -> None:
    """Loading leaves tens of MB freed but still resident (the GGUF reader's metadata objects, block
    conversion temporaries): glibc keeps freed heap pages until told. Measured: SmolLM2's load 247 ->
    176 MB resident, Gemma 3's 815 -> 605 (benchmarks/quant_memory.py). Elsewhere a no-op."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def read_arch(reader: Any) -> str:
    return reader.fields["general.architecture"].contents()
