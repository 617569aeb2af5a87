"""effroll's bf16 glue ops (torch.ops.effroll.cache_attention, rms_norm) against float32 references, their
independence from the batch, and what that buys the engine: a bf16 target's decode, verify and prefill give a
position bit-identical logits, so SD's logprobs equal a fresh full forward's exactly and greedy SD equals AR."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from effroll import kernels
from effroll.engine import glue
from effroll.engine.kv_cache import full_logits
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams
from effroll.engine.torch_engine import TorchEngine

from conftest import perturbed_copy, random_model, tiny_config

pytestmark = pytest.mark.skipif(not kernels.DECODE.available(),
                                reason=f"effroll's glue ops are unavailable: {kernels.DECODE.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _auto_path(monkeypatch):
    monkeypatch.delenv(kernels.GLUE_KERNEL_ENV, raising=False)
    monkeypatch.delenv(kernels.BF16_KERNEL_ENV, raising=False)


def reference_attention(q, kc, vc, pos, row0, scale):
    B, T, h, hd = q.shape
    span = int(pos.max()) + 1
    keys, vals = kc[row0 : row0 + B, :, :span].float(), vc[row0 : row0 + B, :, :span].float()
    mask = torch.arange(span).view(1, 1, 1, span) <= pos.view(B, 1, T, 1)
    return F.scaled_dot_product_attention(q.float().transpose(1, 2), keys, vals, attn_mask=mask, scale=scale,
                                          enable_gqa=True).transpose(1, 2)


def attention_case(B, T, h, hkv, hd, cap=48, row0=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(B + row0 + 1, hkv, cap, hd, generator=g).bfloat16()
    vc = torch.randn(B + row0 + 1, hkv, cap, hd, generator=g).bfloat16()
    q = (torch.randn(B, T, h, hd, generator=g) * 2).bfloat16()
    pos = torch.randint(0, cap - T, (B, 1), generator=g) + torch.arange(T)
    return q, kc, vc, pos


# GQA and MHA; head dims that are and are not multiples of 64; T across the op's 16-query blocks; one key.
SHAPES = [(1, 1, 9, 3, 64), (4, 5, 9, 3, 64), (3, 17, 4, 4, 32), (2, 3, 8, 2, 128), (5, 1, 6, 2, 72), (2, 33, 2, 1, 8)]


@pytest.mark.parametrize("B,T,h,hkv,hd", SHAPES)
def test_cache_attention_matches_float32_and_does_not_depend_on_the_batch(B, T, h, hkv, hd):
    q, kc, vc, pos = attention_case(B, T, h, hkv, hd)
    scale = 1 / math.sqrt(hd)
    out = torch.ops.effroll.cache_attention(q, kc, vc, pos, 1, scale)
    ref = reference_attention(q, kc, vc, pos, 1, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # One bf16 rounding of the output (2^-8 relative) plus fp32 noise.
    assert ((out.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()
    for b in range(B):  # each query alone (T = 1, B = 1) gives the same bits as in the batch
        for t in (0, T - 1):
            alone = torch.ops.effroll.cache_attention(q[b : b + 1, t : t + 1], kc, vc, pos[b : b + 1, t : t + 1],
                                                      1 + b, scale)
            assert torch.equal(alone, out[b : b + 1, t : t + 1])


def test_cache_attention_first_position_and_wrong_key_detected():
    q, kc, vc, pos = attention_case(2, 1, 4, 2, 16)
    pos.zero_()  # one key: the output is that key's value, exactly
    out = torch.ops.effroll.cache_attention(q, kc, vc, pos, 1, 0.25)
    assert torch.equal(out[:, 0], vc[1:3, :, 0].repeat_interleave(2, dim=1))
    q, kc, vc, pos = attention_case(2, 4, 4, 2, 16)
    before = torch.ops.effroll.cache_attention(q, kc, vc, pos, 1, 0.25)
    kc[2, 1, int(pos[1, 0]) + 1] += 4  # a key only row 1's later queries may see
    after = torch.ops.effroll.cache_attention(q, kc, vc, pos, 1, 0.25)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1, 0], before[1, 0])
    assert not torch.equal(after[1, 1:, 2:], before[1, 1:, 2:])  # kv head 1 = query heads 2, 3


def test_cache_attention_bad_arguments():
    q, kc, vc, pos = attention_case(2, 3, 4, 2, 16, cap=20)
    op = torch.ops.effroll.cache_attention
    with pytest.raises(RuntimeError, match=r"position 2[0-9] outside the cache \(20\)"):
        op(q, kc, vc, pos + 25 - pos.max(), 1, 0.25)
    with pytest.raises(RuntimeError, match="outside 4 slots"):
        op(q, kc, vc, pos, 3, 0.25)
    with pytest.raises(RuntimeError, match="h a multiple of hkv"):
        op(q[:, :, :3].contiguous(), kc, vc, pos, 1, 0.25)
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(q.float(), kc, vc, pos, 1, 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, kc, vc, pos.int(), 1, 0.25)


@pytest.mark.parametrize("m,d", [(1, 576), (7, 576), (33, 2048), (2, 16), (5, 48)])
def test_rms_norm_matches_torch_within_one_rounding(m, d):
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, d, generator=g) * 3).bfloat16()
    w = torch.randn(d, generator=g).bfloat16()
    y = torch.ops.effroll.rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x.float(), (d,), w.float(), 1e-5)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(torch.ops.effroll.rms_norm(x[m - 1 :], w, 1e-5), y[m - 1 :])  # rows on their own
    wide = torch.cat([x, x], 1)[:, :d]  # a row stride that is not d
    assert torch.equal(torch.ops.effroll.rms_norm(wide, w, 1e-5), y)


@pytest.mark.parametrize("B,T,h,hkv,hd", [(1, 1, 9, 3, 64), (3, 5, 4, 2, 8), (2, 17, 4, 4, 32), (2, 2, 2, 1, 20)])
def test_rope_cache_write_matches_float32_rope_and_writes_only_its_positions(B, T, h, hkv, hd):
    g = torch.Generator().manual_seed(hd)
    qkv = torch.randn(B, T, h + 2 * hkv, hd, generator=g).bfloat16()
    ang = torch.rand(B, T, 1, hd // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).bfloat16()
    sin = torch.cat([-ang.sin(), ang.sin()], -1).bfloat16()  # rotate_half's sign folded in, as the model's table
    cap, row0 = 30, 1
    kc, vc = (torch.randn(B + 2, hkv, cap, hd, generator=g).bfloat16() for _ in range(2))
    kc0, vc0 = kc.clone(), vc.clone()
    pos = torch.randint(0, cap - T, (B, 1), generator=g) + torch.arange(T)
    q = torch.ops.effroll.rope_cache_write(qkv, cos, sin, kc, vc, pos, row0, h)
    ref = glue.rope(qkv[:, :, : h + hkv].float(), cos.float(), sin.float())
    tol = ref.abs() * 2**-8 + 1e-6  # one rounding
    assert q.shape == (B, T, h, hd) and ((q.float() - ref[:, :, :h]).abs() <= tol[:, :, :h]).all()
    rows = torch.arange(row0, row0 + B).view(B, 1)
    assert ((kc[rows, :, pos].float() - ref[:, :, h:]).abs() <= tol[:, :, h:]).all()
    assert torch.equal(vc[rows, :, pos], qkv[:, :, h + hkv :])
    kc[rows, :, pos], vc[rows, :, pos] = kc0[rows, :, pos], vc0[rows, :, pos]
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)  # nothing else written
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.effroll.rope_cache_write(qkv, cos, sin, kc, vc, pos + cap, row0, h)


@pytest.mark.parametrize("m,inter", [(1, 1536), (5, 64), (3, 40)])
def test_silu_mul_matches_float32(m, inter):
    g = torch.Generator().manual_seed(inter)
    gu = (torch.randn(m, 2 * inter, generator=g) * 4).bfloat16()
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated, and zero
    y = torch.ops.effroll.silu_mul(gu)
    ref = F.silu(gu[:, :inter].float()) * gu[:, inter:].float()
    assert y.shape == (m, inter) and ((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(glue.silu_mul(gu.view(1, m, 2 * inter), inter), y.view(1, m, inter))


def test_glue_wrappers_take_torch_for_other_dtypes_odd_dims_autograd_and_the_switch(monkeypatch):
    called = []
    real = torch.ops.effroll.rms_norm
    monkeypatch.setattr(glue.torch.ops.effroll, "rms_norm", lambda *a: called.append(1) or real(*a), raising=False)
    x, w = torch.randn(3, 32).bfloat16(), torch.ones(32).bfloat16()
    glue.rms_norm(x, w, 1e-6)
    assert called == [1]
    glue.rms_norm(x.float(), w.float(), 1e-6)  # float32: torch's
    glue.rms_norm(torch.randn(3, 24).bfloat16(), torch.ones(24).bfloat16(), 1e-6)  # D not a multiple of 16
    glue.rms_norm(x, w.clone().requires_grad_(), 1e-6)  # autograd needs the result
    assert called == [1]
    monkeypatch.setenv(kernels.GLUE_KERNEL_ENV, "torch")
    assert torch.equal(glue.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6)) and called == [1]
    monkeypatch.setenv(kernels.GLUE_KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="EFFROLL_GLUE_KERNEL='fastest'"):
        glue.rms_norm(x, w, 1e-6)


def test_unavailable_ops_warn_once_and_torch_runs(monkeypatch):
    monkeypatch.setattr(kernels.DECODE, "available", lambda: False)
    monkeypatch.setattr(kernels.DECODE, "unavailable_reason", lambda: "RuntimeError: stand-in build failure")
    monkeypatch.setattr(glue, "_PATHS", {})
    __import__("effroll.once").once.forget()
    x, w = torch.randn(3, 32).bfloat16(), torch.ones(32).bfloat16()
    with pytest.warns(RuntimeWarning, match="stand-in build failure"):
        y = glue.rms_norm(x, w, 1e-6)
    assert torch.equal(y, F.rms_norm(x, (32,), w, 1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glue.rms_norm(x, w, 1e-6)


def bf16_pair():
    cfg = tiny_config(vocab=97, layers=3, eos=(1,))
    target = random_model(cfg, seed=3, std=0.3)
    return target.to(torch.bfloat16), perturbed_copy(target, seed=4, scale=0.3).to(torch.bfloat16)


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [2, 2], [40, 41, 42, 43], [90] * 12, [7, 8]]


def toggled(view, n={"i": 0}):  # noqa: B006 - a counter shared by one test's steps
    n["i"] += 1
    return Plan(4 if n["i"] % 3 else 0)


PLANS = {"ar": Plan(0), "k3": Plan(3),
         "mixed": lambda view: Plan(2, per_row={rid: i % 5 for i, rid in enumerate(view.request_ids)}),
         "toggled": toggled}


@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_bf16_engine_logprobs_equal_a_fresh_full_forward_exactly(plan, share_kv):
    """With effroll's linears and glue every position's logits are the same bits in decode, verify and prefill."""
    target, drafter = bf16_pair()
    assert target.dtype == torch.bfloat16
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=5)
    outs = TorchEngine(target, drafter, max_batch=4, kmax=8, share_kv=share_kv).generate(PROMPTS, params,
                                                                                       plan=PLANS[plan])
    for prompt, o in zip(PROMPTS, outs):
        full = full_logits(target, prompt + o.token_ids)[len(prompt) - 1 : -1]
        ref = torch.log_softmax(full, -1)[torch.arange(len(o.token_ids)), torch.tensor(o.token_ids)]
        assert torch.equal(ref, torch.tensor(o.logprobs, dtype=ref.dtype)), (ref - torch.tensor(o.logprobs)).abs().max()


@pytest.mark.parametrize("plan", ["k3", "mixed", "toggled"])
def test_bf16_greedy_speculative_is_token_identical_to_ar(plan):
    target, drafter = bf16_pair()
    params = SamplingParams(temperature=0, max_tokens=40)
    ar = TorchEngine(target, drafter, max_batch=3, kmax=8).generate(PROMPTS, params, plan=Plan(0))
    sd = TorchEngine(target, drafter, max_batch=3, kmax=8).generate(PROMPTS, params, plan=PLANS[plan])
    assert [o.token_ids for o in sd] == [o.token_ids for o in ar]


def test_bf16_parity_needs_the_glue_ops(monkeypatch):
    """Negative control: with torch's SDPA the same check fails (decode and full forward differ in the last bits)."""
    monkeypatch.setenv(kernels.GLUE_KERNEL_ENV, "torch")
    target, _ = bf16_pair()
    seq = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    full = full_logits(target, seq)
    from effroll.engine.kv_cache import KVCache

    cache = KVCache(target.cfg, 1, len(seq), target.dtype, target.device)
    with torch.no_grad():
        target(torch.tensor([seq[:4]]), torch.zeros(1, dtype=torch.long), cache, [0])
        steps = [target.logits(target(torch.tensor([[seq[t]]]), torch.tensor([t]), cache, [t]))[0, 0]
                 for t in range(4, len(seq))]
    assert not torch.equal(torch.stack(steps), full[4:])
    monkeypatch.delenv(kernels.GLUE_KERNEL_ENV)
    cache = KVCache(target.cfg, 1, len(seq), target.dtype, target.device)
    with torch.no_grad():
        target(torch.tensor([seq[:4]]), torch.zeros(1, dtype=torch.long), cache, [0])
        steps = [target.logits(target(torch.tensor([[seq[t]]]), torch.tensor([t]), cache, [t]))[0, 0]
                 for t in range(4, len(seq))]
    assert torch.equal(torch.stack(steps), full_logits(target, seq)[4:])
