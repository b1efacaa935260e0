"""The AMX bfloat16 matmul (kernels/csrc/amx_linear.cpp): its packed layout, its results against the
float32 product of the same bf16 inputs rounded once, the Linear / LM-head routing, and its input
checks. Skipped on CPUs without AMX-BF16 (the float path is then the only one)."""

from __future__ import annotations

import pytest
import torch

from leanserve import kernels
from leanserve.model.layers import Linear
from leanserve.model.quant import AMX_KERNEL_ROWS

pytestmark = pytest.mark.skipif(not kernels.amx_available(), reason="no AMX-BF16 on this CPU (or kernels off)")


def _ops():
    return kernels.ops()


def _inputs(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


def test_pack_layout_is_vnni_pairs_of_16_column_tiles():
    n, k = 64, 96
    w = (torch.arange(n)[:, None] * 1000 + torch.arange(k)[None, :]).float().bfloat16()
    p = _ops().amx_pack(w)
    assert p.shape == (n // 16, k // 32, 16, 32) and p.dtype == torch.bfloat16
    for nb, kb, r, col, e in [(0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (1, 2, 5, 7, 1), (3, 1, 15, 15, 0), (2, 0, 3, 9, 1)]:
        # tile row r holds, for each of 16 columns n, the pair w[n, 2r], w[n, 2r + 1] of its K block
        assert p[nb, kb, r, 2 * col + e] == w[nb * 16 + col, kb * 32 + 2 * r + e]


@pytest.mark.parametrize("m", [1, 15, 16, 17, 31, 32, 33, 80, 129])
@pytest.mark.parametrize("n,k", [(32, 32), (960, 576), (576, 1536)])
def test_matches_the_float32_product_rounded_once(m, n, k):
    x, w = _inputs(m, n, k)
    got = _ops().amx_linear(x, _ops().amx_pack(w))
    ref32 = x.float() @ w.float().t()
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # within one bf16 rounding of the float32 sum (summation order differs: a few float32 ulps)
    torch.testing.assert_close(got.float(), ref32, rtol=2**-8, atol=1e-4 * k**0.5)
    # and torch's rounding (nearest even) except where float32 order moves a value across a boundary
    assert (got == ref32.bfloat16()).float().mean() > 0.995


def test_rows_past_m_do_not_leak_into_the_output():
    # the padded tile rows are zeros, so the first m rows are the same whatever m is
    x, w = _inputs(40, 64, 64, seed=1)
    p = _ops().amx_pack(w)
    full = _ops().amx_linear(x, p)
    for m in (1, 17, 33):
        assert torch.equal(_ops().amx_linear(x[:m], p), full[:m])


def test_non_contiguous_x_and_no_rows():
    x, w = _inputs(8, 64, 128, seed=2)
    p = _ops().amx_pack(w)
    wide = torch.zeros(8, 256, dtype=torch.bfloat16)
    wide[:, ::2] = x  # strided view of the same values
    assert torch.equal(_ops().amx_linear(wide[:, ::2], p), _ops().amx_linear(x, p))
    assert _ops().amx_linear(x[:0], p).shape == (0, 64)


def test_nan_stays_in_its_row():
    x, w = _inputs(20, 32, 64, seed=3)
    x[3, 5] = float("nan")
    y = _ops().amx_linear(x, _ops().amx_pack(w))
    assert y[3].isnan().all() and not y[torch.arange(20) != 3].isnan().any()


@pytest.mark.parametrize("call,message", [
    (lambda o: o.amx_pack(torch.zeros(32, 32)), "2-D bfloat16"),
    (lambda o: o.amx_pack(torch.zeros(16, 32, dtype=torch.bfloat16)), "N % 32 == 0 and K % 32 == 0"),
    (lambda o: o.amx_pack(torch.zeros(32, 48, dtype=torch.bfloat16)), "N % 32 == 0 and K % 32 == 0"),
    (lambda o: o.amx_linear(torch.zeros(2, 32), o.amx_pack(torch.zeros(32, 32, dtype=torch.bfloat16))),
     "x must be a 2-D bfloat16"),
    (lambda o: o.amx_linear(torch.zeros(2, 64, dtype=torch.bfloat16), o.amx_pack(torch.zeros(32, 32, dtype=torch.bfloat16))),
     "x has K = 64, the packed weight 32"),
    (lambda o: o.amx_linear(torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(32, 32, dtype=torch.bfloat16)),
     "packed must come from amx_pack"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(_ops())


def test_linear_routes_small_batches_to_qlinear_then_amx(monkeypatch):
    import leanserve.model.layers as layers
    from leanserve.model.quant import QuantWeight

    n, k = 64, 64
    layer = Linear(k, n, bias=True).bfloat16()
    with torch.no_grad():
        layer.bias.copy_(torch.arange(float(n)))
    layer.amx = _ops().amx_pack(layer.weight)
    scales = torch.full((n, k // 32), 0.01)
    layer.qweight = QuantWeight(torch.zeros(n, k, dtype=torch.int8), scales, torch.zeros(n, 0), 8,
                                max_rows=AMX_KERNEL_ROWS)
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(layers, "qlinear", lambda x, w: calls.append(("q", x.shape[0])) or torch.zeros(x.shape[0], n, dtype=x.dtype))
    real = _ops().amx_linear
    for rows in (1, AMX_KERNEL_ROWS, AMX_KERNEL_ROWS + 1, 80):
        x = torch.randn(rows, k).bfloat16()
        y = layer(x)
        if rows > AMX_KERNEL_ROWS:  # the AMX result plus the bias
            torch.testing.assert_close(y, (real(x, layer.amx).float() + layer.bias.float()).bfloat16())
    assert calls == [("q", 1), ("q", AMX_KERNEL_ROWS)]
    x3 = torch.randn(2, 3, k).bfloat16()  # leading dimensions are flattened and restored
    torch.testing.assert_close(layer(x3), (real(x3.reshape(6, k), layer.amx).float() + layer.bias.float()).bfloat16().view(2, 3, n))
    with pytest.raises(RuntimeError, match="x must be a 2-D bfloat16"):
        layer(torch.randn(9, k))  # float32 rows: the packed weight is bf16, and the plain one may be gone
    layer.amx = None  # without the packed weight: BLAS on the float weight
    x = torch.randn(9, k).bfloat16()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_loaded_bf16_model_packs_every_matmul_and_keeps_its_logits(monkeypatch):
    from leanserve.model.registry import is_pulled

    if not is_pulled("smollm2-135m"):
        pytest.skip("model smollm2-135m not pulled")
    from leanserve.model.loader import model_size
    from leanserve.model.attention import AttentionMetadata
    from leanserve.model.loader import load_model

    net = load_model("smollm2-135m", torch.bfloat16).model
    monkeypatch.setenv("LEANSERVE_AMX", "0")
    plain = load_model("smollm2-135m", torch.bfloat16).model  # oneDNN on the float weights
    linears = [m for m in net.modules() if isinstance(m, Linear)]
    assert linears and all(m.amx is not None for m in linears) and net.lm_head_amx is not None
    assert all(m.qweight.max_rows <= AMX_KERNEL_ROWS for m in linears if m.qweight is not None)
    # one copy of each packed weight: the plain one is released, its shape and count kept
    assert all(m.weight.is_meta for m in linears) and not net.model.embed_tokens.weight.is_meta
    # no autograd node holding the released weight alive (nn.Linear's weights require grad)
    assert not any(m.amx.requires_grad or m.amx.grad_fn is not None for m in linears)
    assert not any(m.weight.is_meta for m in plain.modules() if isinstance(m, Linear))
    assert model_size(net) == model_size(plain)
    # 24 prompt rows (past the qlinear limit): the same logits, within bf16 noise
    ids = torch.arange(100, 124)

    def logits(model) -> torch.Tensor:
        cache = [(torch.zeros(4, 16, 3, 64, dtype=torch.bfloat16), torch.zeros(4, 16, 3, 64, dtype=torch.bfloat16))
                 for _ in model.model.layers]
        meta = AttentionMetadata.build([24], [24], [[0, 1]], 16, {None})
        with torch.no_grad():
            return model.compute_logits(model(ids, torch.arange(24), meta, cache)).float()

    amx, blas = logits(net), logits(plain)
    assert (amx.argmax(-1) == blas.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(amx.softmax(-1), blas.softmax(-1), atol=2e-2, rtol=0)
