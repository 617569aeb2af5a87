"""Greedy identity, logprob parity, continuous batching, per-row K, catch-up, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from effroll.engine import compiled as compiled_mod
from effroll.engine.kv_cache import full_logits
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams, process_logits, splitmix64, uniforms
from effroll.engine.records import BatchInputError
from effroll.engine.torch_engine import TorchEngine

from conftest import needs_cxx, perturbed_copy, random_model, tiny_config

PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [2, 2], [40, 41, 42, 43], [90] * 12, [7, 8]]


def toggled(k):
    n = {"i": 0}

    def plan(view):
        n["i"] += 1
        return Plan(k if n["i"] % 3 else 0)

    return plan


def mixed(view):
    return Plan(2, per_row={rid: (i % 5) for i, rid in enumerate(view.request_ids)})


PLANS = {"ar": Plan(0), "k1": Plan(1), "k3": Plan(3), "k5": Plan(5), "k8": Plan(8), "mixed": mixed, "toggled": "toggled"}


def get_plan(name):
    return toggled(4) if PLANS[name] == "toggled" else PLANS[name]


@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
@pytest.mark.parametrize("plan", [p for p in PLANS if p != "ar"])
def test_greedy_speculative_is_token_identical_to_ar(small_pair, plan, share_kv):
    target, drafter = small_pair
    params = SamplingParams(temperature=0, max_tokens=40)
    ar = TorchEngine(target, drafter, max_batch=3, kmax=8).generate(PROMPTS, params, plan=Plan(0))
    sd = TorchEngine(target, drafter, max_batch=3, kmax=8, share_kv=share_kv).generate(PROMPTS, params,
                                                                                      plan=get_plan(plan))
    assert [o.token_ids for o in sd] == [o.token_ids for o in ar]
    assert [o.finish_reason for o in sd] == [o.finish_reason for o in ar]
    assert any(o.finish_reason == "stop" for o in ar) and any(o.finish_reason == "length" for o in ar)


def reference_logprobs(model, prompt, out, params):
    full = full_logits(model, prompt + out.token_ids)[len(prompt) - 1 : -1]
    n = len(full)
    if params.temperature == 0:
        lp = torch.log_softmax(full, -1)
    else:
        lp = process_logits(full, torch.full((n,), float(params.temperature)), torch.full((n,), params.top_k),
                            torch.full((n,), float(params.top_p)))
    return lp[torch.arange(n), torch.tensor(out.token_ids)]


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_tokens=30, seed=1),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=30, seed=2),
    SamplingParams(temperature=0, max_tokens=30),
], ids=["t1", "t0.7-topk-topp", "greedy"])
@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
def test_logprobs_equal_fresh_full_forward(small_pair, plan, params, share_kv):
    target, drafter = small_pair
    eng = TorchEngine(target, drafter, max_batch=4, kmax=8, share_kv=share_kv)
    outs = eng.generate(PROMPTS, params, plan=get_plan(plan))
    for prompt, o in zip(PROMPTS, outs):
        assert len(o.logprobs) == len(o.token_ids) > 0
        ref = reference_logprobs(target, prompt, o, params)
        assert torch.isfinite(ref).all()
        err = (ref - torch.tensor(o.logprobs)).abs().max().item()
        assert err <= 1e-4, f"logprob mismatch {err:.2e}"


@needs_cxx
@pytest.mark.parametrize("plan", ["k3", "mixed", "toggled"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_tokens=30, seed=1),
                                    SamplingParams(temperature=0, max_tokens=30)], ids=["t1", "greedy"])
@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
def test_compiled_drafter_keeps_target_logprobs_and_greedy_tokens(small_pair, plan, params, share_kv):
    # compile_drafter: draft steps run through torch.compile'd layer chunks; the target stays eager.
    target, drafter = small_pair
    drafter = copy.copy(drafter)  # same modules; the compile flag stays off the session fixture
    eng = TorchEngine(target, drafter, max_batch=4, kmax=8, share_kv=share_kv, compile_drafter=True)
    assert drafter.compile_decode and not target.compile_decode and eng.compile_s > 0
    outs = eng.generate(PROMPTS, params, plan=get_plan(plan))
    assert compiled_mod.compile_error is None
    for prompt, o in zip(PROMPTS, outs):
        err = (reference_logprobs(target, prompt, o, params) - torch.tensor(o.logprobs)).abs().max().item()
        assert err <= 1e-4, f"logprob mismatch {err:.2e}"
    if params.temperature == 0:
        ar = TorchEngine(target, drafter, max_batch=4).generate(PROMPTS, params, plan=Plan(0))
        assert [o.token_ids for o in outs] == [o.token_ids for o in ar]
        assert not drafter.compile_decode  # the AR engine took the drafter over, without compiling


def test_seeded_requests_reproduce_regardless_of_batch(small_pair):
    target, drafter = small_pair
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=7)
    alone = TorchEngine(target, drafter, max_batch=1).generate([PROMPTS[0]], params, plan=Plan(0))[0]
    crowd = TorchEngine(target, drafter, max_batch=4).generate(PROMPTS, params, plan=Plan(0))[0]
    assert alone.token_ids == crowd.token_ids


def test_max_tokens_and_stop_cut_inside_accepted_draft():
    cfg = tiny_config(vocab=16, eos=(5,))
    target = random_model(cfg, seed=11, std=0.3)
    drafter = target  # identical drafter: every draft is accepted, so cuts happen inside drafts
    eng = TorchEngine(target, drafter, max_batch=8, kmax=8)
    recs = []
    params = [SamplingParams(temperature=1.0, max_tokens=m, seed=s) for s in range(30) for m in (1, 3, 7)]
    outs = eng.generate([[1, 2]] * len(params), params, plan=Plan(8), on_step=recs.append)
    for sp, o in zip(params, outs):
        assert len(o.token_ids) <= sp.max_tokens
        if o.finish_reason == "length":
            assert len(o.token_ids) == sp.max_tokens and 5 not in o.token_ids
        else:
            assert o.finish_reason == "stop" and o.token_ids[-1] == 5 and 5 not in o.token_ids[:-1]
    assert any(o.finish_reason == "stop" for o in outs)
    # The engine clamps K to the remaining budget - 1, so max_tokens=1 rows never draft.
    assert all(k <= 7 for r in recs for k in r.k)
    assert sum(r.total_accepted for r in recs) == sum(sum(r.k) for r in recs)  # identical drafter accepts all


@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
def test_step_records_and_continuous_batching(small_pair, share_kv):
    target, drafter = small_pair
    eng = TorchEngine(target, drafter, max_batch=2, kmax=4, share_kv=share_kv)
    assert eng.share_kv == share_kv and (eng.dcache is None) == share_kv
    recs = []
    outs = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=12, seed=3), plan=mixed, on_step=recs.append)
    assert len(outs) == len(PROMPTS)
    assert max(r.batch_size for r in recs) == 2
    assert sum(r.admitted for r in recs) == len(PROMPTS)
    assert sum(r.tokens for r in recs) == sum(len(o.token_ids) for o in outs)
    for r in recs:
        assert len(r.k) == len(r.accepted) == len(r.emitted) == len(r.context_lens) == r.batch_size
        assert all(0 <= a <= k for a, k in zip(r.accepted, r.k))
        assert all(1 <= e <= a + 1 for e, a in zip(r.emitted, r.accepted))
    assert len({tuple(r.k) for r in recs if r.batch_size == 2}) > 1  # per-row K differed
    # own cache: the drafter catches up (e.g. after a row's K=0 steps); shared: it never has to
    assert any(r.catchup_tokens > 0 for r in recs) != share_kv


@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
def test_catch_up_after_drafter_swap_and_ar_steps(small_pair, share_kv):
    """Turning speculation on after AR steps, and swapping the drafter mid-rollout, stays exact (greedy)."""
    target, drafter = small_pair
    params = SamplingParams(temperature=0, max_tokens=30)
    ref = TorchEngine(target, max_batch=4).generate(PROMPTS, params)
    eng = TorchEngine(target, drafter, max_batch=4, kmax=6, share_kv=share_kv)
    other = perturbed_copy(target, seed=9, scale=0.1)
    for n, p in enumerate(PROMPTS):
        eng.add_request(p, params, request_id=str(n))
    i = 0
    while eng.has_unfinished():
        if i == 5:
            eng.set_drafter(other)
        if i == 9:
            eng.set_drafter(None)
        if i == 12:
            eng.set_drafter(drafter)
        eng.step(Plan(0) if i < 3 else Plan(3))
        i += 1
    got = {o.request_id: o.token_ids for o in eng.pop_finished()}
    assert [got[str(n)] for n in range(len(PROMPTS))] == [o.token_ids for o in ref]


def test_uniform_stream_matches_reference_splitmix64():
    def ref(seed, i):
        m = (1 << 64) - 1
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z = z ^ (z >> 31)
        return (z >> 11) * 2.0**-53

    seeds = torch.tensor([0, 1, 12345, -(2**40)])
    u = uniforms(seeds, torch.tensor([0, 3, 10, 0]), 4)
    for b, (s, c) in enumerate(zip([0, 1, 12345, -(2**40)], [0, 3, 10, 0])):
        for i in range(4):
            assert u[b, i].item() == ref(s & ((1 << 64) - 1), c + i)
    big = uniforms(torch.tensor([42]), torch.tensor([0]), 200_000)[0]
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean().item() - 0.5) < 0.005
    assert splitmix64(torch.tensor([1])).item() != splitmix64(torch.tensor([2])).item()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("prompt,match", [
    ([], "empty prompt"),
    ([1] * 300, "longer than the context"),
    ([1, 2, 97], r"prompt token id 97"),
    ("hello", "got a string"),
])
def test_bad_prompts(small_pair, prompt, match):
    target, _ = small_pair
    eng = TorchEngine(target, max_batch=2, max_seq_len=256)
    with pytest.raises((ValueError, TypeError), match=match):
        eng.add_request(prompt, SamplingParams())
    assert not eng.has_unfinished()


@pytest.mark.parametrize("params,match", [
    (SamplingParams(temperature=-1.0), "temperature must be finite and >= 0, got -1.0"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-3), "top_k must be >= 0"),
    (SamplingParams(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (SamplingParams(stop_token_ids=(1000,)), "stop token id 1000"),
    (SamplingParams(top_k=2.5), "top_k must be an int"),
])
def test_bad_sampling_values(small_pair, params, match):
    target, _ = small_pair
    with pytest.raises((ValueError, TypeError), match=match):
        TorchEngine(target).add_request([1, 2], params)


def test_bad_requests_do_not_stop_the_batch(small_pair):
    target, drafter = small_pair
    eng = TorchEngine(target, drafter, max_batch=2, max_seq_len=128)
    prompts = [[1, 2, 3], [], [4, 5], [1] * 500, [6]]
    params = [SamplingParams(temperature=0, max_tokens=8)] * 4 + [SamplingParams(temperature=-2)]
    with pytest.raises(BatchInputError) as ei:
        eng.generate(prompts, params, plan=Plan(2))
    msg = str(ei.value)
    assert "prompt 1: empty prompt" in msg and "prompt 3:" in msg and "prompt 4: temperature" in msg
    outs = ei.value.outputs
    assert [o.finish_reason for o in outs] == ["length", "error", "length", "error", "error"]
    ref = TorchEngine(target, max_batch=1).generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=8))
    assert [outs[0].token_ids, outs[2].token_ids] == [o.token_ids for o in ref]


def test_mismatched_drafter_is_rejected(small_pair):
    target, _ = small_pair
    other_vocab = random_model(tiny_config(vocab=50), seed=5)
    with pytest.raises(ValueError, match="drafter vocabulary size 50 does not match the target's 97"):
        TorchEngine(target, other_vocab)
    with pytest.raises(TypeError, match="drafter must be an effroll Transformer"):
        TorchEngine(target, object())
    eng = TorchEngine(target)
    with pytest.raises(ValueError, match="drafter vocabulary"):
        eng.set_drafter(other_vocab)
    assert eng.drafter is None


def test_bad_plans(small_pair):
    target, drafter = small_pair
    with pytest.raises(ValueError, match="Plan.k must be an int >= 0, got -1"):
        Plan(-1)
    with pytest.raises(ValueError, match="per_row"):
        Plan(1, per_row={"a": -2})
    eng = TorchEngine(target, drafter)
    eng.add_request([1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(TypeError, match="plan must be"):
        eng.step("fast")
    assert eng.has_unfinished()  # nothing lost: the request is still there
    eng.step(Plan(2))


def test_seeded_speculative_sampling_does_not_depend_on_the_batch(small_pair):
    """At T=1 with a fixed plan, a seeded request gets the same tokens alone or beside others: each
    row's uniforms are laid out by its own K (rows near max_tokens get a smaller K than the batch)."""
    target, drafter = small_pair
    params = [SamplingParams(temperature=1.0, max_tokens=5 + 4 * i, seed=100 + i) for i in range(len(PROMPTS))]
    together = TorchEngine(target, drafter, max_batch=7, kmax=8).generate(PROMPTS, params, plan=Plan(4))
    alone = [TorchEngine(target, drafter, max_batch=1, kmax=8).generate([p], [sp], plan=Plan(4))[0]
             for p, sp in zip(PROMPTS, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_share_kv_needs_the_target_geometry(small_pair):
    target, _ = small_pair
    other = random_model(tiny_config(vocab=97, layers=2, eos=(1,)), seed=5)  # 2 layers vs the target's 3
    assert not TorchEngine(target, other).share_kv  # auto: falls back to its own cache
    with pytest.raises(ValueError, match="share_kv=True needs a drafter with the target's KV-cache geometry"):
        TorchEngine(target, other, share_kv=True)
