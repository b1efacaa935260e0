"""The native decode loop (kernels/csrc/decode_layers.cpp, model/native.py NativeDecodePlan) against the
Python layers it replaces: the same operators in the same order, so decode steps must give the same
hidden states bit for bit, for tiny random models of each variant it takes (tied and untied heads,
GQA and MHA, q/k/v biases, q/k norms, sliding windows, Gemma 3's four norms and two rotary bases) in
float32 and bfloat16, and for the real SmolLM2 in bfloat16 with its quantized blocks (one row) and
AMX-packed weights (more rows)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from leanserve import kernels
from leanserve.model import layers
from leanserve.model.attention import AttentionMetadata, reference_attention
from leanserve.model.config import ModelConfig
from leanserve.model.base import CausalLM
from leanserve.model.loader import build_model, iter_safetensors
from tests.model.helpers import new_kv_caches

pytestmark = pytest.mark.skipif(kernels.ops() is None, reason=f"native kernels unavailable: {kernels.status()}")

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)
CASES = {
    "llama-gqa-tied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-untied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2-biases": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
    "gemma3-sliding-window": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=6, num_key_value_heads=1, head_dim=16, sliding_window=8, query_pre_attn_scalar=24)),
}
BLOCK = 4


def _tiny(case: str, dtype: torch.dtype, tmp_path) -> CausalLM:
    cls, extra = CASES[case]
    torch.manual_seed(0)
    cfg = cls(**{**SMALL, **extra})
    if cls is transformers.Gemma3TextConfig:
        cfg.architectures = ["Gemma3ForCausalLM"]
        hf = transformers.Gemma3ForCausalLM(cfg).float().eval()
    else:
        hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    return build_model(config, iter_safetensors(tmp_path), dtype, torch.device("cpu"))


@torch.inference_mode()
def _decode_hidden(model, native: bool, dtype: torch.dtype, prompt_lens: list[int], steps: int,
                   kv_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Prefill each sequence (Python layers), then `steps` decode steps of all of them together; the
    hidden states of every decode step, with the model's native loop on or off (the KV cache in
    ``kv_dtype``, default the model's)."""
    model.native_decode = native
    kv = new_kv_caches(model, 64, BLOCK, kv_dtype or dtype)
    windows = set(model.cfg.layer_windows)
    per = -(-(max(prompt_lens) + steps) // BLOCK)
    ids = list(range(64))[::-1]  # scattered blocks
    tables = [ids[i * per:(i + 1) * per] for i in range(len(prompt_lens))]
    g = torch.Generator().manual_seed(3)
    vocab = model.cfg.vocab_size
    lens = list(prompt_lens)
    meta = AttentionMetadata.build(lens, lens, tables, BLOCK, windows)
    tokens = torch.randint(0, vocab, (sum(lens),), generator=g)
    model(tokens, torch.cat([torch.arange(n) for n in lens]), meta, kv)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (len(lens),), generator=g)
        positions = torch.tensor(lens)
        lens = [n + 1 for n in lens]
        meta = AttentionMetadata.build([1] * len(lens), lens, tables, BLOCK, windows)
        out.append(model(tokens, positions, meta, kv))
    return out


def _assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_models_decode_the_same_bits(case, dtype, tmp_path):
    model = _tiny(case, dtype, tmp_path)
    native = _decode_hidden(model, True, dtype, [5, 13, 9], steps=12)  # windows of 8 slide past their start
    assert model.native_plan() is not None  # the native loop ran
    python = _decode_hidden(model, False, dtype, [5, 13, 9], steps=12)
    _assert_same_bits(native, python)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["llama-gqa-tied", "gemma3-sliding-window"])
def test_tiny_models_decode_the_same_bits_over_the_8bit_cache(case, dtype, tmp_path):
    # the native loop writes and reads the 8-bit cache with the same operators as the Python layers
    model = _tiny(case, dtype, tmp_path)
    native = _decode_hidden(model, True, dtype, [5, 13, 9], steps=12, kv_dtype=torch.int8)
    assert model.native_plan() is not None and model.native_plan().takes(new_kv_caches(model, 8, BLOCK, torch.int8))
    python = _decode_hidden(model, False, dtype, [5, 13, 9], steps=12, kv_dtype=torch.int8)
    _assert_same_bits(native, python)
    # and the 8-bit cache is a small change, not a different model: within a few percent of the float cache's
    exact = _decode_hidden(model, False, dtype, [5, 13, 9], steps=12)
    for got, want in zip(python, exact):
        assert (got.float() - want.float()).norm() < 0.05 * want.float().norm()


def test_plan_falls_back_where_the_native_loop_does_not_apply(tmp_path, monkeypatch):
    model = _tiny("llama-gqa-tied", torch.float32, tmp_path)
    plan = model.native_plan()
    assert plan is not None and plan.takes(new_kv_caches(model, 8, BLOCK))
    # a cache in another dtype than the model's: this step runs the Python layers
    assert not plan.takes(new_kv_caches(model, 8, BLOCK, torch.bfloat16))
    # another attention implementation (the native loop has only paged_attention's kernel)
    model.model.layers[1].self_attn.attn_impl = reference_attention
    model._plan = False
    assert model.native_plan() is None
    model.model.layers[1].self_attn.attn_impl = layers.paged_attention
    # kernels off: no plan, and decode steps still run (on the Python layers)
    monkeypatch.setattr(layers, "_fused_ops", lambda: None)
    model._plan = False
    assert model.native_plan() is None
    assert len(_decode_hidden(model, True, torch.float32, [3], steps=2)) == 2


@pytest.mark.model
def test_smollm2_bf16_quantized_and_amx_rows_decode_the_same_bits():
    from leanserve.model.registry import is_pulled

    if not is_pulled("smollm2-135m"):
        pytest.skip("model smollm2-135m not pulled")
    from leanserve.model.loader import load_model

    loaded = load_model("smollm2-135m", torch.bfloat16)
    model = loaded.model
    # 1 sequence: every matmul's kernel on the blocks; 6: still the kernel without AMX (up to 16 rows),
    # AMX with it; 20: past the kernel's rows: the blocks dequantized in tiles for the dense matmul
    for prompts in ([7], [3, 9, 17, 4, 12, 30], [3, 9, 5, 4, 7, 2, 8, 6] * 2 + [1, 9, 3, 5]):
        native = _decode_hidden(model, True, torch.bfloat16, prompts, steps=3)
        python = _decode_hidden(model, False, torch.bfloat16, prompts, steps=3)
        _assert_same_bits(native, python)


def test_environment_switch_turns_the_native_loop_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSERVE_NATIVE_DECODE", "0")
    assert not _tiny("llama-gqa-tied", torch.float32, tmp_path).native_decode
    monkeypatch.setenv("LEANSERVE_NATIVE_DECODE", "1")
    assert _tiny("llama-gqa-tied", torch.float32, tmp_path / "on").native_decode


@pytest.mark.model
def test_start_up_line_says_whether_decode_steps_run_natively(monkeypatch):
    from leanserve.engine.engine import LLM
    from leanserve.model.registry import is_pulled

    if not is_pulled("smollm2-135m"):
        pytest.skip("model smollm2-135m not pulled")
    assert "one native call" in LLM("smollm2-135m", kv_cache_memory=1 << 24).engine.describe_runtime()
    monkeypatch.setenv("LEANSERVE_NATIVE_DECODE", "0")
    assert "one native call" not in LLM("smollm2-135m", kv_cache_memory=1 << 24).engine.describe_runtime()


def test_rotary_tables_grow_past_their_first_length_and_the_plan_follows(tmp_path, monkeypatch):
    """Tables start short and grow when a step reaches past them; the native loop's plan (which holds
    them) is rebuilt; every step is the same bits as a model whose tables were full length from the start."""
    full = _tiny("gemma3-sliding-window", torch.float32, tmp_path / "full")  # two rotary tables
    monkeypatch.setattr(layers.RotaryEmbedding, "INITIAL_POSITIONS", 8)
    short = _tiny("gemma3-sliding-window", torch.float32, tmp_path / "short")
    assert short.rope_global.cos.shape[0] == 8 and full.rope_global.cos.shape[0] == SMALL["max_position_embeddings"]
    grown = _decode_hidden(short, True, torch.float32, [5, 7], steps=12)  # positions up to 18
    assert short.rope_global.cos.shape[0] == short.rope_local.cos.shape[0] == 32  # 8 -> 16 -> 32
    assert short.native_plan().positions == 32
    _assert_same_bits(grown, _decode_hidden(full, True, torch.float32, [5, 7], steps=12))
    assert torch.equal(short.rope_local.sin, full.rope_local.sin[:32])
