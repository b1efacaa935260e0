"""--quantization int8|int4 at load: a float HF model's matmul weights in GGUF blocks (gguf's
reference quantizer), the float copy replaced by the same values dequantized, so every batch size
computes the one quantized model. Checked against HF transformers running that quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, quants

from leanserve import kernels
from leanserve.config import EngineConfig
from leanserve.model.loader import load_model
from leanserve.model.quant import QUANTIZE_TYPES, quantize_weight
from tests.model.helpers import paged_logits

CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1"])
def test_blocks_dequantize_as_gguf_does(type_name):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    qw, raw = quantize_weight(w, type_name)
    ref = quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(48, 96)
    np.testing.assert_array_equal(qw.dequantize().numpy(), ref)  # our unpacking vs gguf's, bit for bit
    err = (qw.dequantize() - w).abs().view(48, 3, 32)
    step = w.view(48, 3, 32)
    # half a step of rounding, plus what storing the step (and the min) in float16 adds: at most 2^-11
    # relative, times the 127 (15) steps of the largest value
    if type_name == "Q8_0":  # d = amax / 127
        bound = step.abs().amax(-1, keepdim=True) / 127 * (0.5 + 127 * 2**-11)
    else:  # d = (max - min) / 15, min stored too
        d = (step.amax(-1, keepdim=True) - step.amin(-1, keepdim=True)) / 15
        bound = d * (0.5 + 15 * 2**-11) + step.amin(-1, keepdim=True).abs() * 2**-11
    assert bool((err <= bound).all())


def test_odd_width_is_refused():
    with pytest.raises(ValueError, match=r"cannot quantize a \(4, 40\) weight in blocks of 32"):
        quantize_weight(torch.zeros(4, 40), "Q8_0")


def _hf_folder(tmp_path, config_class=transformers.LlamaConfig, **extra):
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one token per byte: 256
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config_class(**CFG, **extra)).float().eval()
    with torch.no_grad():  # biases and norms away from their zero/one initialization, so they count
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    return hf


def _quantized_reference(hf, quantization: str):
    """The HF model with each weight the loader quantizes replaced by gguf's dequantized blocks."""
    layer_type, head_type = QUANTIZE_TYPES[quantization]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                kind = head_type if name.endswith(("embed_tokens.weight", "lm_head.weight")) else layer_type
                raw = quants.quantize(p.numpy(), GGMLQuantizationType[kind])
                p.copy_(torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(p.shape)))
    return hf


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_matches_transformers_on_the_same_weights(quantization, tmp_path):
    hf = _hf_folder(tmp_path)
    loaded = load_model(str(tmp_path), torch.float32, "cpu", quantization)
    if kernels.ops() is not None:  # small steps read the blocks: every matmul has them
        assert loaded.model.small_step_reads(), "no quantized blocks attached"
        assert "GGUF blocks" in loaded.model.quantized_summary()
    ref = _quantized_reference(hf, quantization)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, CFG["vocab_size"], (21,), generator=g).tolist(),
            torch.randint(0, CFG["vocab_size"], (17,), generator=g).tolist()]
    with torch.no_grad():
        refs = [ref(torch.tensor([s])).logits[0] for s in seqs]
    # prompt chunks (float copy: many rows) then decode steps of 2 rows (the blocks, where the kernel is)
    for got, want in zip(paged_logits(loaded.model, seqs, [9, 8]), refs):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_quantization_differs_from_the_float_model(tmp_path):
    """The flag does something: int4 logits move away from the float model's."""
    hf = _hf_folder(tmp_path)
    seq = list(range(1, 20))
    f32 = paged_logits(load_model(str(tmp_path), torch.float32, "cpu").model, [seq], [19])[0]
    q4 = paged_logits(load_model(str(tmp_path), torch.float32, "cpu", "int4").model, [seq], [19])[0]
    with torch.no_grad():
        torch.testing.assert_close(f32, hf(torch.tensor([seq])).logits[0], atol=2e-4, rtol=1e-4)
    assert (q4 - f32).abs().max() > 1e-3


def test_eval_names_the_quantization_in_its_label(tmp_path):
    """`leanserve eval --quantization int4`: the option in the run's description and default label (the
    weights' summary, a sentence, stays in the description beside it)."""
    from leanserve.config import EngineConfig
    from leanserve.eval.inprocess import InProcessBackend
    from leanserve.eval.run import default_label

    _hf_folder(tmp_path)
    for quantization in ("int4", "none"):
        desc = InProcessBackend(EngineConfig(model=str(tmp_path), dtype="float32", quantization=quantization)).describe()
        assert desc["quantization"] == (None if quantization == "none" else quantization)
        assert default_label(desc) == f"{tmp_path.name} float32" + (" int4" if quantization == "int4" else "")
        if kernels.ops() is not None:
            assert ("GGUF blocks" in (desc["weights"] or "")) == (quantization == "int4")


def test_a_gguf_file_is_not_quantized_again(tmp_path):
    path = tmp_path / "m.gguf"
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="--quantization int8 quantizes a float model"):
        load_model(str(path), torch.float32, "cpu", "int8")


def test_config_refuses_unknown_quantization():
    with pytest.raises(ValueError, match="quantization must be one of none, int8, int4, got 'int3'"):
        EngineConfig(quantization="int3")
