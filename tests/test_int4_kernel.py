"""effroll's CPU INT4 GEMM (torch.ops.effroll.int4_mm) against a float32 matmul of the dequantized weight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effroll import kernels
from effroll.drafter import Int4Linear, quantize_rtn
from effroll.drafter import int4 as I

from conftest import needs_cxx

needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason=f"effroll's INT4 kernel is unavailable: {kernels.unavailable_reason()}")
pytestmark = needs_kernel


@pytest.fixture(autouse=True)
def _effroll_kernel(monkeypatch):
    monkeypatch.delenv(I.KERNEL_ENV, raising=False)


def rel_ok(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """``y`` is ``x.float() @ w.T`` rounded to bf16: within half a bf16 ulp (2^-8 relative) plus the fp32
    accumulation error of a K-term sum (1e-5 of ``|x| @ |w|^T``, which bounds any cancellation)."""
    xf = x.float().reshape(-1, x.shape[-1])
    ref = xf @ w.T
    err = (y.float().reshape(ref.shape) - ref).abs()
    return bool((err <= 2**-8 * ref.abs() + 1e-5 * (xf.abs() @ w.abs().T) + 1e-30).all())


def make(n: int, k: int, g: int, sym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05 + (0 if sym else 0.01)
    qw = quantize_rtn(w, g, sym)
    return qw, Int4Linear(qw), gen


@pytest.mark.parametrize("n,k,g,sym", [(45, 192, 64, True), (40, 600, 64, False), (16, 96, 32, False)])
def test_every_m_from_1_to_64(n, k, g, sym):
    qw, lin, gen = make(n, k, g, sym)
    assert lin.backend == "effroll"
    wd = qw.dequantize()
    for m in range(1, 65):
        x = torch.randn(m, k, generator=gen).bfloat16()
        y = lin(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert rel_ok(y, x, wd), m


@pytest.mark.parametrize("n,k,g,sym", [(3072, 576, 64, True), (576, 1536, 128, False), (960, 576, 32, False),
                                       (24, 3136, 64, False)])  # K > 3072: many rows without the fp32 tile buffer
def test_smollm2_shapes(n, k, g, sym):
    qw, lin, gen = make(n, k, g, sym)
    wd = qw.dequantize()
    for m in (1, 2, 3, 5, 6, 7, 13, 33, 64):
        x = torch.randn(m, k, generator=gen).bfloat16()
        assert rel_ok(lin(x), x, wd), m


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
@pytest.mark.parametrize("groups", [1, 3, 5, 2.5])  # 2.5: a ragged last group (K not a multiple of g)
def test_group_sizes_and_counts(g, groups, sym):
    k = int(groups * g)
    qw, lin, gen = make(33, k, g, sym, seed=g + k)
    assert lin.padded_in_features == -(-k // g) * g
    for m in (1, 4, 9):
        x = torch.randn(m, k, generator=gen).bfloat16()
        assert rel_ok(lin(x), x, qw.dequantize())


def test_the_check_catches_plausible_kernel_bugs():
    """Outputs of kernels with typical bugs, built exactly in torch, fail ``rel_ok``."""
    g, k = 64, 600
    qw, lin, gen = make(32, k, g, False)
    x = torch.randn(5, k, generator=gen).bfloat16()
    good = qw.dequantize()
    assert rel_ok(lin(x), x, good)
    c, s, z = qw.codes.float(), qw.scales.float(), qw.zeros.float()
    rows = torch.arange(32).view(2, 2, 8).flip(1).reshape(-1)  # rows j and 8 + j of each tile swapped
    bugs = {
        "code off by one": ((c + 1 - 8) * s.repeat_interleave(g, 1) + z.repeat_interleave(g, 1)),
        "no -8": (c * s.repeat_interleave(g, 1) + z.repeat_interleave(g, 1)),
        "groups shifted": I.dequantize(qw.codes, s.roll(1, 1), z.roll(1, 1), g),
        "nibbles swapped": good[rows],
        "one scale 2% off": I.dequantize(qw.codes, s.index_put((torch.tensor([3]), torch.tensor([4])),
                                                                s[3, 4] * 1.02), z, g),
    }
    for name, w in bugs.items():
        wb = w[:, :k]
        y_bug = (x.float() @ wb.T).bfloat16()  # what that kernel would return
        assert not rel_ok(y_bug, x, good), name
    # the padding of a ragged last group must meet zero activations, not the repeated last column
    xp = torch.cat([x.float(), x.float()[:, -1:].expand(-1, qw.codes.shape[1] - k)], 1)
    y_pad = (xp @ I.dequantize(qw.codes, s, z, g).T).bfloat16()
    assert not rel_ok(y_pad, x, good)


def test_bias_3d_float32_m0_and_strided_inputs():
    qw, lin, gen = make(40, 600, 64, False)
    lin_b = Int4Linear(qw, bias=torch.randn(40, generator=gen))
    wd = qw.dequantize()
    x = torch.randn(2, 3, 600, generator=gen).bfloat16()
    y = lin_b(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, lin(x) + lin_b.bias.bfloat16(), rtol=0, atol=0)
    assert rel_ok(lin(x), x, wd)
    xf = torch.randn(4, 600, generator=gen)  # float32 in: rounded to bf16 for the kernel, result back in float32
    yf = lin(xf)
    assert yf.dtype == torch.float32 and rel_ok(yf, xf.bfloat16(), wd)
    assert lin(torch.empty(0, 600, dtype=torch.bfloat16)).shape == (0, 40)
    assert lin(torch.empty(2, 0, 600)).shape == (2, 0, 40)
    xs = torch.randn(600, 7, generator=gen).bfloat16().T  # columns not contiguous
    assert rel_ok(lin(xs), xs, wd)
    wide = torch.randn(6, 1000, generator=gen).bfloat16()[:, 100:700]  # rows strided
    assert rel_ok(lin(wide), wide, wd)


def test_nonfinite_inputs_propagate():
    qw, lin, gen = make(16, 64, 32, True)
    x = torch.randn(3, 64, generator=gen).bfloat16()
    x[1, 5] = float("nan")
    y = lin(x)
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())


def test_threads_do_not_change_the_result():
    qw, lin, gen = make(3072, 576, 64, True)
    x = torch.randn(7, 576, generator=gen).bfloat16()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = lin(x)
        torch.set_num_threads(2)
        y2 = lin(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


def test_torch_fallback_gives_the_same_result(monkeypatch):
    qw, lin, gen = make(48, 600, 64, False)
    monkeypatch.setenv(I.KERNEL_ENV, "torch")
    ref_lin = Int4Linear(qw)
    assert ref_lin.backend == "cpu" and lin.backend == "effroll"
    x = torch.randn(9, 600, generator=gen).bfloat16()
    y, y_ref = lin(x).float(), ref_lin(x).float()
    assert float((y - y_ref).norm() / y_ref.norm()) < 4e-3  # both round to bf16 from differently ordered sums
    assert torch.equal(lin.dequantize(), ref_lin.dequantize())
    monkeypatch.setenv(I.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="EFFROLL_INT4_KERNEL='fast'"):
        Int4Linear(qw)


def test_unavailable_kernel_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "RuntimeError: stand-in build failure")
    __import__('effroll.once').once.forget()
    qw = quantize_rtn(torch.randn(32, 64), 32, True)
    with pytest.warns(RuntimeWarning, match="stand-in build failure"):
        lin = Int4Linear(qw)
    assert lin.backend == "cpu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Int4Linear(qw).backend == "cpu"


@pytest.mark.parametrize("n,k,g,sym", [(40, 600, 64, False), (3072, 576, 128, True)])
def test_codes_scales_and_zeros_round_trip(n, k, g, sym):
    qw, lin, _ = make(n, k, g, sym)
    assert lin.packed.shape == (-(-n // 16), qw.codes.shape[1], 8)  # 4 bits per weight (plus <16 padded rows)
    assert torch.equal(lin.codes(), qw.codes)
    s, z = lin.scales_zeros()
    assert torch.equal(s, qw.scales) and torch.equal(z, qw.zeros)
    q2 = lin.quantized_weight()
    assert q2.in_features == k and q2.group_size == g and torch.equal(q2.dequantize(), qw.dequantize())
    assert "backend=effroll" in repr(lin)


def test_wrapper_rejects_bad_arguments():
    qw, lin, _ = make(40, 600, 64, False)
    p, sz = lin.packed, lin.scales_and_zeros
    x = torch.randn(2, 600).bfloat16()
    assert rel_ok(kernels.int4_mm(x, p, sz, 64, 40), x, qw.dequantize())
    with pytest.raises(TypeError, match="bfloat16"):
        kernels.int4_mm(x.float(), p, sz, 64, 40)
    with pytest.raises(TypeError, match="2-D"):
        kernels.int4_mm(x[None], p, sz, 64, 40)
    with pytest.raises(ValueError, match="575 columns"):
        kernels.int4_mm(x[:, :575], p, sz, 64, 40)
    with pytest.raises(ValueError, match="group_size=48"):
        kernels.int4_mm(x, p, sz, 48, 40)
    with pytest.raises(ValueError, match="n=49"):
        kernels.int4_mm(x, p, sz, 64, 49)
    with pytest.raises(ValueError, match="scales_zeros"):
        kernels.int4_mm(x, p, sz.float(), 64, 40)
    with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
        kernels.int4_mm(x, None, sz, 64, 40)
    with pytest.raises(RuntimeError, match="columns"):  # the op itself checks too
        torch.ops.effroll.int4_mm(x[:, :500].contiguous(), p, sz, 64, 40)


@needs_cxx
@torch.no_grad()
def test_inside_torch_compile_without_graph_breaks():
    qw, lin, gen = make(40, 600, 64, False)
    lin_b = Int4Linear(qw, bias=torch.randn(40, generator=gen).bfloat16())

    def f(x):
        return torch.relu(lin_b(x * 2)) + 1

    cf = torch.compile(f, fullgraph=True, dynamic=True)  # fullgraph: a graph break would raise
    for m in (1, 3, 8):
        x = torch.randn(m, 600, generator=gen).bfloat16()
        torch.testing.assert_close(cf(x), f(x), rtol=1e-2, atol=1e-2)  # inductor may skip a bf16 rounding


def _load_in_subprocesses(n: int, cache: Path | None = None) -> list[str]:
    """``kernels.build_seconds()`` as printed by ``n`` concurrent fresh processes (optionally on a fresh cache)."""
    code = "from effroll import kernels; assert kernels.available(), kernels.unavailable_reason(); " \
           "print(kernels.build_seconds())"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    if cache is not None:
        env["EFFROLL_CACHE"] = str(cache)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=root, env=env) for _ in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [out.strip() for out, _ in outs]


def test_a_second_process_loads_the_cached_build():
    assert _load_in_subprocesses(1) == ["None"]


@pytest.mark.slow  # two compilations (~5-20 s)
def test_concurrent_cold_builds_both_succeed_and_leave_only_the_library(tmp_path):
    outs = _load_in_subprocesses(2, tmp_path)
    assert all(o == "None" or float(o) > 0 for o in outs)  # each built it, or found the other's finished build
    (d,) = (tmp_path / "kernels").iterdir()
    assert [f.name for f in d.iterdir()] == ["effroll_int4_gemm.so"]
    assert _load_in_subprocesses(1, tmp_path) == ["None"]
