"""The fused native kernels (kernels/csrc/fused.cpp: rms_norm, rotary_, act_mul) against the PyTorch
code of leanserve/model/layers.py that they replace, run with the kernels patched off."""

from __future__ import annotations

import pytest
import torch

from leanserve import kernels
from leanserve.model import layers
from leanserve.model.layers import ACTIVATIONS, GatedMLP, RMSNorm, RotaryEmbedding

TOL = dict(rtol=1e-6, atol=1e-6)


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


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("dim", [576, 640, 64, 256, 13])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama, Gemma (weight stored as a delta from 1)
def test_rms_norm_matches_pytorch(ops, monkeypatch, dim, tokens, offset):
    norm = RMSNorm(dim, 1e-6, offset)
    norm.weight.copy_(_rand(dim, seed=1))
    x = _rand(tokens, dim, scale=3.0)
    y = norm(x)
    torch.testing.assert_close(y, _pytorch(monkeypatch, norm, x), **TOL)
    assert y.shape == x.shape and y.dtype == torch.float32


def test_rms_norm_eps_matters_for_small_rows(ops, monkeypatch):
    norm = RMSNorm(576, 1e-5)
    x = torch.cat([_rand(2, 576, scale=1e-3), torch.zeros(1, 576)])  # mean(x^2) ~ eps, and 0
    y = norm(x)
    torch.testing.assert_close(y, _pytorch(monkeypatch, norm, x), **TOL)
    assert torch.equal(y[2], torch.zeros(576))


def test_rms_norm_of_per_head_views(ops, monkeypatch):
    # q/k norms get (tokens, heads, head_dim) views of the fused qkv output: strided rows, no copy
    norm = RMSNorm(64, 1e-6, 1.0)
    norm.weight.copy_(_rand(64, seed=1))
    qkv = _rand(5, 15 * 64)
    q = qkv[:, : 9 * 64].view(5, 9, 64)
    assert not q.is_contiguous()
    torch.testing.assert_close(norm(q), _pytorch(monkeypatch, norm, q), **TOL)
    torch.testing.assert_close(norm(q), norm(q.contiguous()), rtol=0, atol=0)
    torch.testing.assert_close(norm(q[:, 0]), _pytorch(monkeypatch, norm, q[:, 0]), **TOL)  # 1 head, 2-D


@pytest.mark.parametrize("head_dim", [64, 256, 20])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_rotary_matches_pytorch(ops, monkeypatch, head_dim, tokens, grad_mode):
    heads, kv_heads, max_pos = 9, 3, 4096
    rope = RotaryEmbedding(head_dim, max_pos, 10000.0)
    positions = torch.randperm(max_pos, generator=torch.Generator().manual_seed(2))[:tokens]  # out of order
    with grad_mode():
        qkv = _rand(tokens, (heads + 2 * kv_heads) * head_dim, scale=2.0)
        v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # views, as SelfAttention passes them
        k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        want_q, want_k = _pytorch(monkeypatch, rope, positions, q.clone(), k.clone())
        got_q, got_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(got_k, want_k, **TOL)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v, beside q and k, untouched


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("inter", [1536, 1000, 13])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_act_mul_matches_pytorch(ops, act, inter, tokens):
    gate_up = _rand(tokens, 2 * inter, scale=4.0)
    gate, up = gate_up.split(inter, dim=-1)
    code = layers._ACT_KERNEL[ACTIVATIONS[act]]
    # silu agrees to the last bit; gelu is computed as x * sigmoid(2u), exact where PyTorch's
    # 0.5 x (1 + tanh(u)) cancels for x < 0, so it differs there by up to a few 1e-7 absolute
    tol = TOL if act == "silu" else dict(rtol=2e-6, atol=4e-6)
    torch.testing.assert_close(ops.act_mul(gate_up, code), ACTIVATIONS[act](gate) * up, **tol)


def test_act_mul_special_values(ops):
    inf = float("inf")
    x = torch.tensor([inf, -inf, float("nan"), 0.0, -0.0, 88.0, -88.0, 1e20, -1e20, 1e-40, 120.0, -120.0])
    gate_up = torch.cat([x, torch.ones_like(x)])[None]
    for act in ("silu", "gelu_pytorch_tanh"):
        got = ops.act_mul(gate_up, layers._ACT_KERNEL[ACTIVATIONS[act]])[0]
        torch.testing.assert_close(got, ACTIVATIONS[act](x), rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_mlp_matches_pytorch(ops, monkeypatch, act):
    mlp = GatedMLP(64, 96, act)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(_rand(*p.shape, seed=p.numel()) * 0.2)
    x = _rand(7, 64)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), _pytorch(monkeypatch, mlp, x), rtol=2e-6, atol=2e-6)


def test_other_dtypes_take_the_pytorch_path(ops, monkeypatch):
    norm = RMSNorm(64, 1e-6)
    x = _rand(3, 64).bfloat16()
    assert torch.equal(norm(x), _pytorch(monkeypatch, norm, x))
    rope = RotaryEmbedding(64, 128, 10000.0)
    q, k = _rand(3, 2, 64).double(), _rand(3, 1, 64, seed=1).double()
    got, want = rope(torch.arange(3), q, k), _pytorch(monkeypatch, rope, torch.arange(3), q, k)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_inputs_raise(ops):
    x, w = torch.randn(2, 64), torch.randn(64)
    with pytest.raises(RuntimeError, match="weight must be float32 of shape"):
        ops.rms_norm(x, torch.randn(63), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        ops.rms_norm(x.double(), w, 1e-6, 0.0)

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

    with pytest.raises(RuntimeError, match="must be even"):
        ops.act_mul(torch.randn(2, 7), 0)
    with pytest.raises(RuntimeError, match="act must be 0"):
        ops.act_mul(torch.randn(2, 8), 2)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        ops.act_mul(torch.randn(2, 8).half(), 0)
