"""The roofline's arithmetic, pinned by hand-computed cases (bytes and FLOPs of a known step)."""

from __future__ import annotations

import pytest

from leanserve.plan.roofline import (Efficiency, Machine, ModelShape, Precision, Step, StepWork, attended_keys,
                                     step_time, step_work)

# 2 layers, hidden 8, MLP 16, 2 query heads and 1 KV head of 4, vocab 10, tied embeddings
TINY = ModelShape("tiny", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                  head_dim=4, vocab_size=10)
WINDOWED = ModelShape("tiny-sw", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                      head_dim=4, vocab_size=10, layer_windows=(None, 4))


def test_parameter_counts():
    # per layer: q,k,v 8x(8+4+4) = 128, o 8x8 = 64, gate/up/down 3x8x16 = 384
    assert TINY.linear_params_per_layer == 576
    assert TINY.linear_params == 1152
    assert TINY.head_params == 80
    assert TINY.num_params == 1232  # tied: the LM head is the embedding table
    untied = ModelShape("u", 2, 8, 16, 2, 1, 4, 10, tie_word_embeddings=False)
    assert untied.num_params == 1312
    assert TINY.kv_elements_per_token() == 16  # K and V x 2 layers x 1 head x 4
    assert TINY.kv_bytes_per_token("bf16") == 32
    assert TINY.kv_bytes_per_token("int8") == 24  # 16 values and 4 rows' float16 scales (the engine's 8-bit cache)
    assert TINY.weight_bytes("fp32") == 4928
    assert TINY.weight_bytes("int4") == 1232 * 18 / 32


def test_smollm2_shape_matches_its_published_size():
    smol = ModelShape("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152)
    assert smol.num_params == 134_479_872  # 134.5M (norms left out)
    assert smol.kv_elements_per_token() == 11_520


@pytest.mark.parametrize("start,length,window,expected", [
    (0, 3, None, 6),  # keys 1 + 2 + 3
    (3, 4, None, 22),  # 4 + 5 + 6 + 7
    (3, 4, 4, 16),  # every query already sees a full window of 4
    (1, 4, 3, 11),  # 2, 3, 3, 3
    (0, 4, 8, 10),  # the window is never reached
    (5, 0, None, 0),
])
def test_attended_keys(start, length, window, expected):
    assert attended_keys(start, length, window) == expected


def test_step_work_by_hand():
    # two sequences decode at contexts 5 and 7 (12 keys), one prompt chunk of 4 tokens after 3 cached
    step = Step(num_decode=2, decode_kv=(12,), prefill=((3, 4, True),))
    assert (step.num_tokens, step.num_seqs, step.num_samples) == (6, 3, 3)
    w = step_work(TINY, step, Precision("bf16", "bf16"))
    assert w.linear_bytes == 1152 * 2 + 80 * 2  # 2464: every weight once, the LM head since rows sample
    assert w.linear_flops == 2 * 1152 * 6 + 2 * 80 * 3  # 14304
    # per layer: 12 decode keys + 7 prompt keys read, 6 tokens written; 16 bytes per token per layer
    assert w.attention_bytes == (2 * (12 + 7) + 2 * 6) * 16 == 800
    # per layer 12 + 22 attended keys, 4 x 2 heads x 4 dims FLOPs each
    assert w.attention_flops == 2 * (12 + 22) * 32 == 2176


def test_step_work_sliding_window_layers():
    # decode at contexts 5 and 7: the windowed layer reads min(5, 4) + min(7, 4) = 8 keys
    step = Step(num_decode=2, decode_kv=(12, 8), prefill=((6, 2, False),))
    w = step_work(WINDOWED, step, Precision("fp32", "fp32"))
    # full layer: 12 + 8 keys read, 12 + (7 + 8) attended; windowed: 8 + min(8, 4 + 2 - 1) = 13 read, 8 + 8 attended
    assert w.attention_bytes == ((12 + 8) + (8 + 5) + 2 * 4) * 2 * 4 * 4
    assert w.attention_flops == ((12 + 15) + (8 + 8)) * 32
    # the two decoding rows sample, the chunk (not its prompt's last) does not
    assert w.linear_bytes == (1152 + 80) * 4
    assert w.linear_flops == 2 * 1152 * 4 + 2 * 80 * 2
    chunk_only = step_work(WINDOWED, Step(0, (0, 0), ((6, 2, False),)), Precision("fp32", "fp32"))
    assert chunk_only.linear_bytes == 1152 * 4  # no row samples: the LM head is not read


def test_small_batches_read_the_quantized_copy():
    # up to 4 rows every matmul reads its blocks (100 bytes); up to 8 the LM head reads its float copy
    p = Precision("bf16", "bf16", small_batch=((4, 100.0), (8, 300.0)))
    assert step_work(TINY, Step(3, (24,)), p).linear_bytes == 100
    assert step_work(TINY, Step(3, (24,)), p).small_batch
    assert step_work(TINY, Step(8, (64,)), p).linear_bytes == 300
    nine = step_work(TINY, Step(9, (72,)), p)
    assert nine.linear_bytes == (1152 + 80) * 2 and not nine.small_batch
    assert p.label() == "bf16 weights, bf16 KV (quantized blocks up to 8 rows)"
    assert step_work(TINY, Step(), p) == StepWork(0.0, 0.0, 0.0, 0.0)


def test_step_time_by_hand():
    w = StepWork(linear_bytes=2464, linear_flops=14304, attention_bytes=800, attention_flops=2176)
    m = Machine("m", bandwidth_gbps=1.0, peak_flops={"bf16": 1e9})
    eff = Efficiency(mem=0.5, flops=0.25, kv_mem=0.5, attn_flops=0.5, step_overhead_s=1e-3, seq_overhead_s=1e-4)
    # linear: max(2464 / 0.5e9, 14304 / 0.25e9) = 57.216 us; attention: max(800 / 0.5e9, 2176 / 0.5e9) = 4.352 us
    assert step_time(w, 3, m, eff, "bf16") == pytest.approx(1e-3 + 3e-4 + 57.216e-6 + 4.352e-6, rel=1e-12)
    assert step_time(w, 0, m, eff, "bf16") == 0.0


def test_machine_flops_fall_back_and_fail_clearly():
    cpu = Machine("cpu", 20.0, {"fp32": 1e11, "bf16": None})
    assert cpu.flops_for("bf16") == 1e11  # no bf16 units: bf16 runs at the fp32 rate
    with pytest.raises(ValueError, match="no peak FLOP/s figure for fp32"):
        Machine("tpu", 800.0, {"fp32": None, "bf16": 1e14}).flops_for("fp32")


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        Precision("int3")
    with pytest.raises(ValueError, match="unknown KV cache dtype 'q2'"):
        Precision("bf16", "q2")
    with pytest.raises(ValueError, match="efficiency mem must be in"):
        Efficiency(mem=0, flops=0.5, kv_mem=0.5, attn_flops=0.5, step_overhead_s=0, seq_overhead_s=0)
    with pytest.raises(ValueError, match="step_overhead_s must be"):
        Efficiency(mem=0.5, flops=0.5, kv_mem=0.5, attn_flops=0.5, step_overhead_s=-1, seq_overhead_s=0)
    with pytest.raises(ValueError, match="decode_kv has 1 entries for 2 window groups"):
        step_work(WINDOWED, Step(1, (5,)), Precision())
