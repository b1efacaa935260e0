"""The fused native kernels (kernels/csrc/fused.cpp: rms_norm, rotary_, act_mul) against the PyTorch
code of leanserve/model/layers.py that they replace, run with the kernels patched off, in float32 and
bfloat16."""

from __future__ import annotations

import pytest
import torch

from leanserve import kernels
from leanserve.model import layers
from leanserve.model.layers import ACTIVATIONS, GatedMLP, RMSNorm, RotaryEmbedding

TOL = dict(rtol=1e-6, atol=1e-6)
all_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.fixture
def ops():
    ops = kernels.ops()
    if ops is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    return ops


def _pytorch(monkeypatch, fn, *args):
    """fn(*args) on the PyTorch path (the fused kernels patched off)."""
    with monkeypatch.context() as m:
        m.setattr(layers, "_fused_ops", lambda: None)
        return fn(*args)


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _assert_same_bits(got, want):
    """Equal to the last bit (the sign of zero included); a NaN matches any NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[want.dtype]
    got, want = got[~nan], want[~nan]
    diff = got.view(bits) != want.view(bits)
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} differ, e.g. {got[diff][:4]} vs {want[diff][:4]}"


def _assert_bf16_ulps(got, want, max_ulps, max_frac):
    """bfloat16 got within max_ulps steps of want (both finite), and unequal in at most max_frac of the
    elements (or one). Same-signed bfloat16 values are ordered as their bits: a step is one unit of these."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    ulps = (got.reshape(-1).view(torch.int16).int() - want.reshape(-1).view(torch.int16).int()).abs()
    assert int(ulps.max()) <= max_ulps, f"{int(ulps.max())} ulps apart"
    differ = int((ulps > 0).sum())
    assert differ <= max(1, max_frac * ulps.numel()), f"{differ} of {ulps.numel()} differ"


def _norm(dim, offset, dtype, eps=1e-6):
    norm = RMSNorm(dim, eps, offset).to(dtype)  # in a bfloat16 model the weight is bfloat16 too
    norm.weight.copy_(_rand(dim, seed=1))
    return norm


# rms_norm adds the sum of squares in another order than torch.sum: float32 within a few ulp. In
# bfloat16 the 1-ulp float32 differences of x / rms now and then (~2e-5 of the elements) round to the
# other side: 1 ulp, 2 for Llama (offset 0), which rounds x / rms to bfloat16 before the weight multiply
# and again after. Where the sums are exact it is bit for bit: test_rms_norm_bf16_exact_sums_bit_for_bit.
def _assert_norm_close(y, want, offset):
    if y.dtype == torch.bfloat16:
        _assert_bf16_ulps(y, want, max_ulps=1 if offset else 2, max_frac=1e-3)
    else:
        torch.testing.assert_close(y, want, **TOL)


@all_dtypes
@pytest.mark.parametrize("dim", [576, 640, 64, 256, 13])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama, Gemma (weight stored as a delta from 1)
def test_rms_norm_matches_pytorch(ops, monkeypatch, dim, tokens, offset, dtype):
    norm = _norm(dim, offset, dtype)
    x = _rand(tokens, dim, scale=3.0, dtype=dtype)
    y = norm(x)
    _assert_norm_close(y, _pytorch(monkeypatch, norm, x), offset)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("dim", [576, 640, 64, 256, 13])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_bf16_exact_sums_bit_for_bit(ops, monkeypatch, dim, offset):
    # multiples of 1/16 up to 4: the squares and their sums are exact in float32 in any order, so every
    # rounding left is one the kernel must place as the PyTorch code does
    x = (torch.randint(-64, 65, (300, dim), generator=torch.Generator().manual_seed(3)) / 16).bfloat16()
    norm = _norm(dim, offset, torch.bfloat16)
    _assert_same_bits(norm(x), _pytorch(monkeypatch, norm, x))


@all_dtypes
def test_rms_norm_eps_matters_for_small_rows(ops, monkeypatch, dtype):
    norm = RMSNorm(576, 1e-5).to(dtype)
    x = torch.cat([_rand(2, 576, scale=1e-3), torch.zeros(1, 576)]).to(dtype)  # mean(x^2) ~ eps, and 0
    y = norm(x)
    _assert_norm_close(y, _pytorch(monkeypatch, norm, x), 0.0)
    assert torch.equal(y[2], torch.zeros(576, dtype=dtype))


@all_dtypes
def test_rms_norm_of_per_head_views(ops, monkeypatch, dtype):
    # q/k norms get (tokens, heads, head_dim) views of the fused qkv output: strided rows, no copy
    norm = _norm(64, 1.0, dtype)
    qkv = _rand(5, 15 * 64, dtype=dtype)
    q = qkv[:, : 9 * 64].view(5, 9, 64)
    assert not q.is_contiguous()
    _assert_norm_close(norm(q), _pytorch(monkeypatch, norm, q), 1.0)
    assert torch.equal(norm(q), norm(q.contiguous()))
    _assert_norm_close(norm(q[:, 0]), _pytorch(monkeypatch, norm, q[:, 0]), 1.0)  # 1 head, 2-D


@all_dtypes
@pytest.mark.parametrize("head_dim", [64, 256, 20])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_rotary_matches_pytorch(ops, monkeypatch, head_dim, tokens, grad_mode, dtype):
    heads, kv_heads, max_pos = 9, 3, 4096
    rope = RotaryEmbedding(head_dim, max_pos, 10000.0)
    positions = torch.randperm(max_pos, generator=torch.Generator().manual_seed(2))[:tokens]  # out of order
    with grad_mode():
        qkv = _rand(tokens, (heads + 2 * kv_heads) * head_dim, scale=2.0, dtype=dtype)
        v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # views, as SelfAttention passes them
        k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        want_q, want_k = _pytorch(monkeypatch, rope, positions, q.clone(), k.clone())
        got_q, got_k = rope(positions, q, k)
    if dtype == torch.bfloat16:  # float32 products and sums as _rotate's, then one rounding: bit for bit
        _assert_same_bits(got_q, want_q)
        _assert_same_bits(got_k, want_k)
    else:
        torch.testing.assert_close(got_q, want_q, **TOL)
        torch.testing.assert_close(got_k, want_k, **TOL)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v, beside q and k, untouched


def test_rotary_bf16_in_a_bf16_model(ops, monkeypatch):
    # modules built under a bfloat16 default dtype (as the loader builds them) keep float32 cos/sin
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rope = RotaryEmbedding(64, 512, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    finally:
        torch.set_default_dtype(prev)
    assert rope.cos.dtype == torch.float32
    q, k = _rand(3, 4, 64, dtype=torch.bfloat16), _rand(3, 2, 64, seed=1, dtype=torch.bfloat16)
    positions = torch.tensor([0, 511, 7])
    want = _pytorch(monkeypatch, rope, positions, q.clone(), k.clone())
    got = rope(positions, q, k)
    assert got[0] is q  # the kernel ran: in place
    for g, w in zip(got, want):
        _assert_same_bits(g, w)


def _act_mul_pytorch(act, gate, up):
    # row by row: torch's threads may split a row and start its vector loop elsewhere; the kernel
    # follows torch's loop within a row
    return torch.cat([ACTIVATIONS[act](g[None]) * u[None] for g, u in zip(gate, up)])


@pytest.fixture(params=["1", "0"], ids=["avx512", "avx2"])
def isa(request, monkeypatch):
    """The 16-lane paths of act_mul and argmax_rows (where the CPU has AVX-512) and their 8-lane ones:
    the same results."""
    monkeypatch.setenv("LEANSERVE_AVX512", request.param)
    return request.param


# gelu: the kernel computes 0.5 g (1 + tanh(u)) as g * sigmoid(2u), which does not cancel for g < -3
# as PyTorch's form does (float32: up to a few 1e-7 absolute). In bfloat16 act(g) agrees to the bit
# for g > -2.9 (every bfloat16 value checked in test_act_mul_bf16_every_value) and by 1.6e-5 below.
GELU_EXACT_ABOVE, GELU_ATOL = -2.9, 1.6e-5


@all_dtypes
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("inter", [1536, 1000, 13])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_act_mul_matches_pytorch(ops, isa, act, inter, tokens, dtype):
    gate_up = _rand(tokens, 2 * inter, scale=4.0, dtype=dtype)
    gate, up = gate_up.split(inter, dim=-1)
    got, want = ops.act_mul(gate_up, layers._ACT_KERNEL[ACTIVATIONS[act]]), _act_mul_pytorch(act, gate, up)
    if dtype == torch.float32:
        # silu agrees to the last bit; gelu is computed as x * sigmoid(2u), exact where PyTorch's
        # 0.5 x (1 + tanh(u)) cancels for x < 0, so it differs there by up to a few 1e-7 absolute
        torch.testing.assert_close(got, want, **(TOL if act == "silu" else dict(rtol=2e-6, atol=4e-6)))
    elif act == "silu":  # silu rounded to bfloat16, times up rounded again, as torch: bit for bit
        _assert_same_bits(got, want)
    else:
        exact = gate > GELU_EXACT_ABOVE
        _assert_same_bits(got[exact], want[exact])
        # act(g) * up rounded: where the acts differ |act| < 4e-3, so the products differ by at most
        # the acts' difference times |up| and two roundings of products below 4e-3 |up| (2^-8 relative)
        bound = (GELU_ATOL + 2 * 4e-3 * 2**-8) * up[~exact].float().abs()
        assert ((got[~exact].float() - want[~exact].float()).abs() <= bound).all()


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("inter", [65280, 1001])  # rows of whole vector steps; rows with long tails
def test_act_mul_bf16_every_value(ops, isa, act, inter):
    # every bfloat16 value as a gate (up = 1: the result is act(g) rounded once), NaN and infinities too
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.randperm(2**16, generator=torch.Generator().manual_seed(4))]  # any value at any column
    gate = torch.cat([every[every.isfinite()], every[~every.isfinite()]])[: 65536 // inter * inter].view(-1, inter)
    got = ops.act_mul(torch.cat([gate, torch.ones_like(gate)], dim=1), layers._ACT_KERNEL[ACTIVATIONS[act]])
    want = _act_mul_pytorch(act, gate, torch.ones_like(gate))
    exact = torch.ones_like(gate, dtype=torch.bool) if act == "silu" else ~(gate <= GELU_EXACT_ABOVE)
    # torch's loop takes two bfloat16 vectors (of 16 or 32) per step and the rest of a row with the
    # scalar formula, which the kernel's tail repeats: gelu too is bit for bit there
    step = 64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32
    exact[:, inter // step * step:] = True
    _assert_same_bits(got[exact], want[exact])
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=GELU_ATOL, equal_nan=True)


def test_bf16_rounding_keeps_nan(ops):
    # a float32 NaN whose low half, rounded by adding 0x7fff, would carry into the sign (-0.0): from
    # float32 cos into the bfloat16 rotary output
    cos = torch.ones(1, 8)
    cos[0, 3] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    q, k = torch.ones(1, 1, 16, dtype=torch.bfloat16), torch.ones(1, 1, 16, dtype=torch.bfloat16)
    ops.rotary_(q, k, cos, torch.zeros(1, 8), torch.tensor([0]))
    assert q[0, 0].isnan().tolist() == [j in (3, 11) for j in range(16)]


@all_dtypes
def test_act_mul_special_values(ops, isa, dtype):
    inf = float("inf")
    x = torch.tensor([inf, -inf, float("nan"), 0.0, -0.0, 88.0, -88.0, 1e20, -1e20, 1e-40, 120.0, -120.0]).to(dtype)
    gate_up = torch.cat([x, torch.ones_like(x)])[None]
    for act in ("silu", "gelu_pytorch_tanh"):
        got = ops.act_mul(gate_up, layers._ACT_KERNEL[ACTIVATIONS[act]])[0]
        torch.testing.assert_close(got, ACTIVATIONS[act](x), rtol=1e-6, atol=1e-6, equal_nan=True)


@all_dtypes
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_mlp_matches_pytorch(ops, monkeypatch, act, dtype):
    mlp = GatedMLP(64, 96, act).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(_rand(*p.shape, seed=p.numel()) * 0.2)
    x = _rand(7, 64, dtype=dtype)
    with torch.inference_mode():
        got, want = mlp(x), _pytorch(monkeypatch, mlp, x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    elif act == "gelu_pytorch_tanh":  # gelu's small differences for g < -2.9, summed by down_proj
        _assert_bf16_ulps(got, want, max_ulps=1, max_frac=0.05)
    else:  # silu; gelu (erf) has no kernel
        _assert_same_bits(got, want)


def test_other_dtypes_take_the_pytorch_path(ops, monkeypatch):
    norm = RMSNorm(64, 1e-6)
    x = _rand(3, 64).half()
    assert torch.equal(norm(x), _pytorch(monkeypatch, norm, x))
    x = _rand(3, 64, dtype=torch.bfloat16)  # a float32 weight with bfloat16 x: PyTorch promotes to float32
    y = norm(x)
    assert y.dtype == torch.float32 and torch.equal(y, _pytorch(monkeypatch, norm, x))
    rope = RotaryEmbedding(64, 128, 10000.0)
    q, k = _rand(3, 2, 64).double(), _rand(3, 1, 64, seed=1).double()
    got, want = rope(torch.arange(3), q, k), _pytorch(monkeypatch, rope, torch.arange(3), q, k)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_inputs_raise(ops):
    x, w = torch.randn(2, 64), torch.randn(64)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ops.rms_norm(x, torch.randn(63), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ops.rms_norm(x.bfloat16(), w, 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU"):
        ops.rms_norm(x.double(), w.double(), 1e-6, 0.0)

    cos = sin = torch.randn(16, 32)
    q, k, pos = torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.tensor([3, 15])
    q_before = q.clone()
    with pytest.raises(RuntimeError, match="position 16 out of range"):
        ops.rotary_(q, k, cos, sin, torch.tensor([3, 16]))
    assert torch.equal(q, q_before)  # checked before anything is written
    with pytest.raises(RuntimeError, match="position -1 out of range"):
        ops.rotary_(q, k, cos, sin, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="positions must be int64"):
        ops.rotary_(q, k, cos, sin, pos.int())
    with pytest.raises(RuntimeError, match="same tokens"):
        ops.rotary_(q, k[:1], cos, sin, pos)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.rotary_(torch.randn(2, 128, 4).transpose(1, 2), k, cos, sin, pos)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops.rotary_(q, k, torch.randn(16, 31), sin, pos)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.rotary_(q, k.bfloat16(), cos, sin, pos)
    with pytest.raises(RuntimeError, match="cos and sin must be"):  # float32 cos/sin with bfloat16 q/k too
        ops.rotary_(q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16(), pos)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU"):
        ops.rotary_(q.half(), k.half(), cos, sin, pos)

    with pytest.raises(RuntimeError, match="must be even"):
        ops.act_mul(torch.randn(2, 7), 0)
    with pytest.raises(RuntimeError, match="act must be 0"):
        ops.act_mul(torch.randn(2, 8), 2)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU"):
        ops.act_mul(torch.randn(2, 8).half(), 0)


@all_dtypes
@pytest.mark.parametrize("n", [1, 3, 8, 9, 17, 33, 64, 70, 1000, 49152])
def test_argmax_rows_is_torch_max_indices(ops, isa, dtype, n):
    # ties (rounded values, all zeros), all -inf, NaNs (the first NaN wins, as torch.max says) and
    # plain random rows; the maximum both in the vector part and in the tail
    g = torch.Generator().manual_seed(n)
    x = torch.randn(12, n, generator=g).to(dtype)
    x[1] = (x[1] * 2).round()
    x[2] = float("-inf")
    x[3] = 0
    x[4, -1] = 100.0  # the last element (the tail when n % 8)
    x[5, 0] = 100.0
    if n > 2:
        x[6, n // 2] = float("nan")
        x[6, n - 1] = float("nan")
        x[7, 1] = float("nan")
    x[8, :] = 7.0  # one value: the first index
    got = ops.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.max(dim=-1).indices)
    # rows of a wider tensor (row stride > n) read only their own n elements
    wide = torch.full((12, n + 5), 1e4).to(dtype)
    wide[:, :n] = x
    assert torch.equal(ops.argmax_rows(wide[:, :n]), got)


def test_argmax_rows_rejects_bad_input(ops):
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU tensor with contiguous rows"):
        ops.argmax_rows(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.argmax_rows(torch.zeros(8, 4).t())
    with pytest.raises(RuntimeError, match="n > 0"):
        ops.argmax_rows(torch.zeros(4, 0))


def test_sampler_greedy_uses_the_native_argmax(ops, monkeypatch):
    from leanserve.sampling import sampler

    calls = []
    monkeypatch.setattr(ops, "argmax_rows", lambda x: calls.append(x.shape) or x.max(dim=-1).indices, raising=False)
    monkeypatch.setattr(sampler.kernels, "ops", lambda: ops)
    x = torch.randn(3, 50)
    assert torch.equal(sampler._argmax(x), x.argmax(-1)) and calls == [(3, 50)]
    assert torch.equal(sampler._argmax(x.double()), x.double().argmax(-1)) and len(calls) == 1  # float64: torch
