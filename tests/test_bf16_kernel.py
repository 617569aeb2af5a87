"""effroll's CPU bf16 GEMM (torch.ops.effroll.bf16_linear) against a float32 matmul, and Linear's use of it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from effroll import kernels
from effroll.engine import linear as linear_mod

from conftest import needs_cxx, random_model, tiny_config

needs_kernel = pytest.mark.skipif(not kernels.BF16.available(),
                                  reason=f"effroll's bf16 kernel is unavailable: {kernels.BF16.unavailable_reason()}")
pytestmark = needs_kernel


@pytest.fixture(autouse=True)
def _auto_path(monkeypatch):
    monkeypatch.delenv(kernels.BF16_KERNEL_ENV, raising=False)


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


def test_strided_and_3d_inputs_m0_k0_and_nonfinite_rows():
    w, b, gen = make(40, 600)
    wide = torch.randn(9, 1000, generator=gen).bfloat16()[:, 100:700]  # x rows strided
    assert ulps_off(kernels.bf16_linear(wide, w, b), wide, w, b) <= 1
    xt = torch.randn(600, 5, generator=gen).bfloat16().T  # x columns strided (copied)
    assert ulps_off(kernels.bf16_linear(xt, w, b), xt, w, b) <= 1
    ww = torch.randn(40, 700, generator=gen).bfloat16()[:, :600]  # weight rows strided (read in place)
    assert ww.stride() == (700, 1)
    assert ulps_off(kernels.bf16_linear(wide, ww, b), wide, ww, b) <= 1
    we = w[:1].expand(40, 600)  # every weight row the same memory (row stride 0)
    assert we.stride() == (0, 1) and ulps_off(kernels.bf16_linear(wide, we, b), wide, we, b) <= 1
    assert kernels.bf16_linear(torch.empty(0, 600, dtype=torch.bfloat16), w, b).shape == (0, 40)
    assert torch.equal(kernels.bf16_linear(torch.empty(3, 0, dtype=torch.bfloat16), w[:, :0], b),
                       b.expand(3, 40))  # K = 0: the bias alone
    x3 = torch.randn(4, 3, 600, generator=gen).bfloat16()  # [..., K] in, [..., N] out: flattened in place ...
    y3 = kernels.bf16_linear(x3, w, b)
    assert y3.shape == (4, 3, 40) and y3.is_contiguous()
    assert torch.equal(y3.view(12, 40), kernels.bf16_linear(x3.view(12, 600), w, b))
    xs = x3.transpose(0, 1)  # ... or copied when the leading dims are not one row stride apart
    assert torch.equal(kernels.bf16_linear(xs, w, b), y3.transpose(0, 1))
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
    with pytest.raises(ValueError, match=r"at least 2 dims and w 2, got x \(600,\)"):
        kernels.bf16_linear(x[0], w, b)
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


# --------------------------------------------------------------------------- Linear


def make_linear(n: int, k: int, bias: bool = True, seed: int = 0) -> linear_mod.Linear:
    lin = linear_mod.Linear(k, n, bias=bias).bfloat16().requires_grad_(False)
    w, b, _ = make(n, k, seed)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(b)
    return lin


def effroll_path_expected() -> str:
    return "onednn" if linear_mod.packed_bf16_ok() else "effroll"


def test_linear_takes_the_kernel_for_3d_bias_and_in_place_weight_updates():
    assert linear_mod.bf16_linear_path() == effroll_path_expected()
    if linear_mod.bf16_linear_path() != "effroll":
        pytest.skip("oneDNN's bf16 linear runs here: auto keeps it (EFFROLL_BF16_KERNEL=effroll is tested below)")
    lin = make_linear(45, 577)
    x = torch.randn(2, 3, 577).bfloat16()
    y = lin(x)
    assert y.shape == (2, 3, 45) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(6, 45), kernels.bf16_linear(x.reshape(6, 577), lin.weight, lin.bias))
    assert torch.equal(lin(x[:, 1:]), y[:, 1:])  # rows strided in a non-flattenable 3-D view
    assert ulps_off(y, x, lin.weight, lin.bias) <= 1
    with torch.no_grad():
        lin.weight.mul_(2)  # what update_policy does: new values in the same tensor
    assert ulps_off(lin(x), x, lin.weight, lin.bias) <= 1
    assert lin(torch.empty(2, 0, 577, dtype=torch.bfloat16)).shape == (2, 0, 45)


def test_linear_uses_f_linear_when_autograd_needs_the_result():
    lin = make_linear(16, 32).requires_grad_(True)
    x = torch.randn(4, 32).bfloat16()
    y = lin(x)
    assert y.grad_fn is not None
    y.float().sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        assert lin(x).grad_fn is None


def test_env_switch(monkeypatch):
    lin = make_linear(40, 72)
    x = torch.randn(5, 72).bfloat16()
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "torch")
    assert linear_mod.bf16_linear_path() == ("onednn" if linear_mod.packed_bf16_ok() else "torch")
    if not linear_mod.packed_bf16_ok():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "effroll")  # even where oneDNN runs
    assert linear_mod.bf16_linear_path() == "effroll"
    assert torch.equal(lin(x), torch.ops.effroll.bf16_linear(x, lin.weight, lin.bias))
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, " AUTO ")
    assert linear_mod.bf16_linear_path() == effroll_path_expected()
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="EFFROLL_BF16_KERNEL='fast'"):
        lin(x)


def test_unavailable_kernel_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(kernels.BF16, "available", lambda: False)
    monkeypatch.setattr(kernels.BF16, "unavailable_reason", lambda: "RuntimeError: stand-in build failure")
    monkeypatch.setattr(linear_mod, "packed_bf16_ok", lambda: False)  # a CPU where auto wants effroll's kernel
    monkeypatch.setattr(linear_mod, "_BF16_PATHS", {})
    __import__("effroll.once").once.forget()
    lin = make_linear(24, 40)
    x = torch.randn(3, 40).bfloat16()
    with pytest.warns(RuntimeWarning, match="stand-in build failure"):
        y = lin(x)
    assert linear_mod.bf16_linear_path() == "torch"
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin(x)
        monkeypatch.setattr(linear_mod, "_BF16_PATHS", {})  # resolved again: the reason was warned already
        assert linear_mod.bf16_linear_path() == "torch"


def test_lm_head_goes_through_the_kernel():
    if linear_mod.bf16_linear_path() != "effroll":
        pytest.skip("oneDNN's bf16 linear runs here")
    m = random_model(tiny_config(vocab=97, tie_word_embeddings=True), seed=3, std=0.3).to(torch.bfloat16)
    h = torch.randn(2, 5, 32).bfloat16()
    logits = m.logits(h)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 97)
    assert torch.equal(logits, torch.ops.effroll.bf16_linear(h.reshape(10, 32), m.embed.weight, None)
                       .float().view(2, 5, 97))


@needs_cxx
@torch.no_grad()
def test_inside_torch_compile_without_graph_breaks(monkeypatch):
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "effroll")  # the op even where oneDNN runs
    lin = make_linear(40, 600)

    def f(x):
        return torch.relu(lin(x * 2)) + 1

    cf = torch.compile(f, fullgraph=True, dynamic=True)  # fullgraph: a graph break would raise
    for m in (1, 3, 8):
        x = torch.randn(m, 600).bfloat16()
        torch.testing.assert_close(cf(x), f(x), rtol=1e-2, atol=1e-2)  # inductor may skip a bf16 rounding
    gm = []
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=lambda g, _: gm.append(g) or g)(torch.randn(2, 600).bfloat16())
    assert "effroll.bf16_linear" in gm[0].code  # one opaque node, traced through the fake implementation


@pytest.mark.skipif(not os.environ.get("EFFROLL_MODEL"), reason="EFFROLL_MODEL (a bf16 checkpoint directory) is not set")
@torch.no_grad()
def test_real_model_prefill_and_decode_logits(monkeypatch):
    """The real target through effroll's kernels (prefill of 48 tokens, then 4 decode steps of a batch of 3) is as
    close to its float32 forward as torch's path (F.linear, SDPA), and decode rows do not depend on the batch."""
    from effroll.checkpoints import load_model
    from effroll.engine.kv_cache import KVCache

    target = load_model(os.environ["EFFROLL_MODEL"])
    if target.dtype != torch.bfloat16:
        pytest.skip(f"the checkpoint loads as {target.dtype}")
    ref = load_model(os.environ["EFFROLL_MODEL"], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, target.cfg.vocab_size, (3, 48), generator=gen)
    steps = torch.randint(0, target.cfg.vocab_size, (3, 4), generator=gen)

    def run(model, rows):
        cache = KVCache(model.cfg, len(rows), 64, model.dtype, "cpu")
        out = [model.logits(model(prompt[rows], torch.zeros(len(rows), dtype=torch.long), cache, [0] * len(rows)))]
        for t in range(steps.shape[1]):
            pos = 48 + t
            h = model(steps[rows, t : t + 1], torch.full((len(rows),), pos), cache, [pos] * len(rows))
            out.append(model.logits(h))
        return torch.cat(out, 1).float()

    want = run(ref, [0, 1, 2])
    got = {}
    for env in ("torch", "auto"):  # torch's linears and glue, or effroll's
        monkeypatch.setenv(kernels.BF16_KERNEL_ENV, env)
        monkeypatch.setenv(kernels.GLUE_KERNEL_ENV, env)
        got[env] = run(target, [0, 1, 2])
    assert linear_mod.bf16_linear_path() == effroll_path_expected()
    rel = {e: float((g - want).norm() / want.norm()) for e, g in got.items()}
    agree = {e: float((g.argmax(-1) == want.argmax(-1)).float().mean()) for e, g in got.items()}
    assert rel["auto"] < 0.05 and rel["auto"] <= 1.2 * rel["torch"], rel
    assert agree["auto"] >= 0.85 and agree["auto"] >= agree["torch"] - 0.03, agree  # random tokens: ~0.9 either way
    if linear_mod.bf16_linear_path() == "effroll":
        assert torch.equal(run(target, [1]), got["auto"][1:2])  # row 1 alone = row 1 of the batch of 3
