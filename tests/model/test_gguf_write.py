"""`leanserve quantize`: an HF Llama, Qwen2 or Qwen3 folder written as GGUF; loading it gives the model that
`--quantization` makes at load, and the file reads back with the expected tensor types."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader

from leanserve.cli import main
from leanserve.model.gguf_write import write_gguf
from leanserve.model.loader import load_model
from tests.model.helpers import paged_logits
from tests.model.test_quantize_at_load import CFG, _hf_folder


import transformers

ARCHS = {  # HF config class, extra fields, GGUF architecture
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),  # q/k/v biases
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),  # q/k norms, head_dim != hidden / heads
}


def _folder(tmp_path, arch: str = "llama"):
    src = tmp_path / f"src-{arch}"
    src.mkdir()
    cls, extra = ARCHS[arch]
    _hf_folder(src, cls, **extra)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    return src


@pytest.fixture()
def folder(tmp_path):
    return _folder(tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_qwen_round_trip_equals_quantizing_at_load(tmp_path, arch, quantization):
    src = _folder(tmp_path, arch)
    dst = tmp_path / "m.gguf"
    write_gguf(src, dst, quantization)
    reader = GGUFReader(str(dst))
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if arch == "qwen2":
        assert types["blk.0.attn_q.bias"] == types["blk.1.attn_v.bias"] == "F32"
    else:
        assert types["blk.0.attn_q_norm.weight"] == types["blk.1.attn_k_norm.weight"] == "F32"
        assert reader.fields["qwen3.attention.key_length"].contents() == 32
    from_file = load_model(str(dst), torch.float32, "cpu")
    at_load = load_model(str(src), torch.float32, "cpu", quantization)
    assert from_file.config.architecture == at_load.config.architecture
    seqs = [list(range(3, 40)), list(range(50, 71))]
    for a, b in zip(paged_logits(from_file.model, seqs, [16, 9]), paged_logits(at_load.model, seqs, [16, 9])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization,layer_type", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_round_trip_equals_quantizing_at_load(folder, tmp_path, quantization, layer_type):
    dst = tmp_path / "m.gguf"
    counts = write_gguf(folder, dst, quantization)
    reader = GGUFReader(str(dst))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == layer_type and types["blk.1.ffn_down.weight"] == layer_type
    assert types["token_embd.weight"] == "Q8_0"  # the (tied) LM head at 8 bits
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types
    assert counts == {layer_type: 7 * CFG["num_hidden_layers"], "Q8_0": 1, "F32": 2 * CFG["num_hidden_layers"] + 1} \
        if layer_type != "Q8_0" else counts == {"Q8_0": 7 * CFG["num_hidden_layers"] + 1, "F32": 2 * CFG["num_hidden_layers"] + 1}
    assert reader.fields["general.file_type"].contents() == {"int8": 7, "int4": 3}[quantization]
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages[0]['content'] }}"
    from_file = load_model(str(dst), torch.float32, "cpu")
    at_load = load_model(str(folder), torch.float32, "cpu", quantization)
    assert from_file.model.small_step_reads() == at_load.model.small_step_reads()
    seqs = [list(range(3, 40)), list(range(50, 71))]
    for a, b in zip(paged_logits(from_file.model, seqs, [16, 9]), paged_logits(at_load.model, seqs, [16, 9])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert from_file.tokenizer.encode("hello world") == at_load.tokenizer.encode("hello world")


def test_the_embedded_tokenizer_matches_the_source(folder, tmp_path):
    """llama.cpp reads the tokens and merges in the file: without the sidecar they tokenize alike."""
    dst = tmp_path / "m.gguf"
    write_gguf(folder, dst, "int8")
    dst.with_suffix(".tokenizer.json").unlink()
    from_meta = load_model(str(dst), torch.float32, "cpu").tokenizer
    source = load_model(str(folder), torch.float32, "cpu").tokenizer
    text = "Hello, world! 12345 tokens, naïve café."
    assert from_meta.encode(text) == source.encode(text)


def test_unsupported_models_and_types(folder, tmp_path):
    with pytest.raises(ValueError, match="unsupported quantization 'int3'; supported: int8, int4"):
        write_gguf(folder, tmp_path / "x.gguf", "int3")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="leanserve quantize writes LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM "
                                         "models; .* is Gemma3ForCausalLM"):
        write_gguf(folder, tmp_path / "x.gguf", "int8")
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["sliding_window"] = 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="writes LlamaForCausalLM"):
        write_gguf(folder, tmp_path / "x.gguf", "int8")


def test_cli_errors_are_one_line(folder, tmp_path, capsys):
    assert main(["quantize", str(folder), str(tmp_path / "out.bin")]) == 2
    assert "the destination must end in .gguf" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nothing"), str(tmp_path / "o.gguf")]) == 2
    assert "is not an HF model folder" in capsys.readouterr().err
    (tmp_path / "taken.gguf").write_text("x")
    assert main(["quantize", str(folder), str(tmp_path / "taken.gguf")]) == 2
    assert "exists (--force to overwrite)" in capsys.readouterr().err
    assert main(["quantize", str(folder), str(tmp_path / "ok.gguf"), "--type", "int4"]) == 0
    assert "wrote" in capsys.readouterr().out
