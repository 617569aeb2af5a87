"""effroll's CPU bf16 GEMM (torch.ops.effroll.bf16_linear) against a float32 matmul."""

from __future__ import annotations

import pytest
import torch

from effroll import kernels

needs_kernel = pytest.mark.skipif(not kernels.BF16.available(),
                                  reason=f"effroll's bf16 kernel is unavailable: {kernels.BF16.unavailable_reason()}")
pytestmark = needs_kernel


def ulps_off(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Largest error of ``y`` against ``x.float() @ w.float().T (+ b)``, in units of the bound an fp32 sum rounded
    once to bf16 meets: half a bf16 ulp of the result plus the fp32 accumulation error of a K-term sum (1e-5 of
    ``|x| @ |w|^T``, which bounds any cancellation). <= 1 means within the bound."""
    xf, wf = x.float().reshape(-1, x.shape[-1]), w.float()
    ref = xf @ wf.T + (0 if b is None else b.float())
    delta = 1e-5 * (xf.abs() @ wf.abs().T + (0 if b is None else b.float().abs())) + 1e-30
    mag = ref.abs() + delta
    half_ulp = torch.ldexp(torch.ones_like(mag), torch.frexp(mag).exponent - 9)  # |v| in [2^(e-1), 2^e): ulp 2^(e-8)
    err = (y.float().reshape(ref.shape) - ref).abs()
    return float((err / (delta + half_ulp)).max()) if err.numel() else 0.0


def make(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    return w, (torch.randn(n, generator=gen) * 0.1).bfloat16(), gen


MS = (1, 2, 3, 5, 7, 16, 33, 64, 200)


@pytest.mark.parametrize("n,k", [(40, 72), (45, 577), (17, 7), (33, 1), (8, 16), (3, 600)])  # ragged N and K
@pytest.mark.parametrize("bias", [False, True])
def test_ragged_shapes_every_m_and_rows_do_not_depend_on_the_batch(n, k, bias):
    w, b, gen = make(n, k)
    b = b if bias else None
    x = torch.randn(max(MS), k, generator=gen).bfloat16()
    full = kernels.bf16_linear(x, w, b)
    for m in MS:
        y = kernels.bf16_linear(x[:m], w, b)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert ulps_off(y, x[:m], w, b) <= 1, m
        assert torch.equal(y, full[:m]), m  # the same sums in the same order for any M
    for m in range(1, 65):  # every block split of 1..64 rows
        assert torch.equal(kernels.bf16_linear(x[:m], w, b), full[:m]), m


@pytest.mark.parametrize("n,k", [(960, 576), (576, 576), (3072, 576), (576, 1536)])  # SmolLM2's linears
def test_smollm2_shapes_and_rows_do_not_depend_on_the_batch(n, k):
    """Many outputs: an fp32 sum done differently in one block shape flips some bf16 roundings (~1e-4 each)."""
    w, b, gen = make(n, k)
    x = torch.randn(max(MS), k, generator=gen).bfloat16()
    full = kernels.bf16_linear(x, w, b)
    for m in MS:
        y = kernels.bf16_linear(x[:m], w, b)
        assert ulps_off(y, x[:m], w, b) <= 1, m
        assert torch.equal(y, full[:m]), m
    for i in range(0, max(MS), 5):  # one row (the decode kernel) against the same row in a batch
        assert torch.equal(kernels.bf16_linear(x[i : i + 1], w, b), full[i : i + 1]), i


def test_the_bound_catches_plausible_kernel_bugs():
    """Outputs of kernels with typical bugs, built exactly in torch, fail the bound the kernel meets."""
    n, k = 48, 600
    w, b, gen = make(n, k)
    x = torch.randn(7, k, generator=gen).bfloat16()
    assert ulps_off(kernels.bf16_linear(x, w, b), x, w, b) <= 1
    xf, wf, bf = x.float(), w.float(), b.float()
    ref = xf @ wf.T + bf
    k16 = k // 16 * 16
    bugs = {
        "truncated, not rounded": (ref.view(torch.int32) & -65536).view(torch.float32),
        "bias added after rounding": ((xf @ wf.T).bfloat16().float() + bf),
        "bf16 partial sums per 16 k": sum(((xf[:, c:c + 16] @ wf[:, c:c + 16].T).bfloat16().float()
                                           for c in range(0, k, 16)), bf),
        "K tail dropped": xf[:, :k16] @ wf[:, :k16].T + bf,
        "even/odd halves swapped": xf @ wf.view(n, -1, 2).flip(-1).reshape(n, k).T + bf,
        "last N tail row repeated": torch.cat([ref[:, :-1], ref[:, -2:-1]], 1),
        "no bias": xf @ wf.T,
    }
    for name, y_bug in bugs.items():
        assert ulps_off(y_bug.bfloat16(), x, w, b) > 1, name


def test_strided_inputs_m0_k0_and_nonfinite_rows():
    w, b, gen = make(40, 600)
    wide = torch.randn(9, 1000, generator=gen).bfloat16()[:, 100:700]  # x rows strided
    assert ulps_off(kernels.bf16_linear(wide, w, b), wide, w, b) <= 1
    xt = torch.randn(600, 5, generator=gen).bfloat16().T  # x columns strided (copied)
    assert ulps_off(kernels.bf16_linear(xt, w, b), xt, w, b) <= 1
    ww = torch.randn(40, 700, generator=gen).bfloat16()[:, :600]  # weight rows strided (read in place)
    assert ww.stride() == (700, 1)
    assert ulps_off(kernels.bf16_linear(wide, ww, b), wide, ww, b) <= 1
    assert kernels.bf16_linear(torch.empty(0, 600, dtype=torch.bfloat16), w, b).shape == (0, 40)
    assert torch.equal(kernels.bf16_linear(torch.empty(3, 0, dtype=torch.bfloat16), w[:, :0], b),
                       b.expand(3, 40))  # K = 0: the bias alone
    x = torch.randn(3, 600, generator=gen).bfloat16()
    x[1, 5] = float("nan")
    y = kernels.bf16_linear(x, w, b)
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())


def test_threads_do_not_change_the_result():
    w, b, gen = make(3072, 576)
    x = torch.randn(7, 576, generator=gen).bfloat16()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.bf16_linear(x, w, b)
        torch.set_num_threads(2)
        y2 = kernels.bf16_linear(x, w, b)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


def test_bad_arguments_are_errors_naming_the_value():
    w, b, gen = make(40, 600)
    x = torch.randn(2, 600, generator=gen).bfloat16()
    with pytest.raises(TypeError, match="x must be bfloat16, got torch.float32"):
        kernels.bf16_linear(x.float(), w, b)
    with pytest.raises(TypeError, match="bias must be bfloat16"):
        kernels.bf16_linear(x, w, b.float())
    with pytest.raises(ValueError, match=r"2-D, got x \(1, 2, 600\)"):
        kernels.bf16_linear(x[None], w, b)
    with pytest.raises(ValueError, match="x has 599 columns but w has 600"):
        kernels.bf16_linear(x[:, :599], w, b)
    with pytest.raises(ValueError, match=r"bias has shape \(39,\), expected \(40,\)"):
        kernels.bf16_linear(x, w, b[:39])
    with pytest.raises(TypeError, match="w must be a torch.Tensor, got NoneType"):
        kernels.bf16_linear(x, None, b)
    # a weight with strided columns: the wrapper copies it, the op itself refuses
    wt = torch.randn(600, 40, generator=gen).bfloat16().T
    assert ulps_off(kernels.bf16_linear(x, wt, b), x, wt, b) <= 1
    with pytest.raises(RuntimeError, match="columns must be contiguous"):
        torch.ops.effroll.bf16_linear(x, wt, b)
    with pytest.raises(RuntimeError, match="x has 500 columns, w has 600"):  # the op checks too
        torch.ops.effroll.bf16_linear(x[:, :500], w, b)
    with pytest.raises(RuntimeError, match="bias must be a CPU bfloat16 vector of 40"):
        torch.ops.effroll.bf16_linear(x, w, b[:39])


def test_fake_impl_passes_opcheck():
    w, b, gen = make(24, 40)
    x = torch.randn(3, 40, generator=gen).bfloat16()
    for bias in (b, None):
        res = torch.library.opcheck(torch.ops.effroll.bf16_linear.default, (x, w, bias))
        assert set(res.values()) == {"SUCCESS"}, res
