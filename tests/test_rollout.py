"""AdaptiveSpecRollout: the wrapping contract, losslessness through the wrapper, policy updates."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from effroll.engine.sampling import SamplingParams
from effroll import AdaptiveSpecRollout
from effroll.llm import LLM

from conftest import perturbed_copy, random_model, tiny_config
from test_engine_distribution import DEPTH, PROMPT, chi_square_pvalue, exact_distribution


def make_llm(recipe="rtn-sym-g32", vocab=97, max_batch=8, **kw):
    cfg = tiny_config(vocab=vocab, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                      eos=(1,))
    target = random_model(cfg, seed=21, std=0.3)
    return LLM(target, recipe=recipe, max_batch=max_batch, **kw)


class VLLMStyleParams:
    """Duck-typed stand-in for vllm.SamplingParams (top_k=-1 means off, as in vLLM)."""

    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, seed=None):
        self.n, self.temperature, self.top_p, self.top_k, self.max_tokens, self.seed = n, temperature, top_p, top_k, max_tokens, seed


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def test_wraps_plain_engine_function_and_keeps_signature():
    llm = make_llm()

    def rollout_fn(prompts, max_tokens=12):
        """my rollout"""
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
        return [o.outputs[0].token_ids for o in outs]

    ref = rollout_fn(PROMPTS)
    for mode in ("ar", "sd", "adaptive"):
        wrapped = AdaptiveSpecRollout(rollout_fn, llm=llm, mode=mode, k=3)
        assert wrapped.__name__ == "rollout_fn" and wrapped.__doc__ == "my rollout"
        assert wrapped(PROMPTS, max_tokens=12) == ref  # greedy: identical across modes
        st = wrapped.stats()
        assert st["rollouts"] == 1 and st["last"]["tokens"] == sum(len(x) for x in ref)
        if mode == "sd":
            assert st["last"]["speculative_share"] > 0.5 and st["last"]["acceptance"] is not None
        if mode == "ar":
            assert st["last"]["speculative_share"] == 0.0


def test_wraps_trl_shaped_rollout_func():
    llm = make_llm()

    def rollout_func(prompts, trainer):
        sp = VLLMStyleParams(n=2, temperature=1.0, max_tokens=10, seed=3)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
        return {
            "prompt_ids": [o.prompt_token_ids for o in outs for _ in o.outputs],
            "completion_ids": [c.token_ids for o in outs for c in o.outputs],
            "logprobs": [c.logprobs for o in outs for c in o.outputs],
        }

    ref = rollout_func(PROMPTS, trainer=None)
    got = AdaptiveSpecRollout(rollout_func, llm=llm, mode="sd", k=4)(PROMPTS, trainer=None)
    assert set(got) == {"prompt_ids", "completion_ids", "logprobs"}
    assert len(got["completion_ids"]) == 2 * len(PROMPTS)
    assert got["prompt_ids"] == ref["prompt_ids"]
    assert all(len(c) == len(lp) for c, lp in zip(got["completion_ids"], got["logprobs"]))


def test_wraps_vllm_style_function_with_llm_argument():
    llm = make_llm()

    def rollout(prompts, llm, sampling_params):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sampling_params)]

    sp = VLLMStyleParams(temperature=0.0, max_tokens=8)
    wrapped = AdaptiveSpecRollout(rollout, llm=llm, mode="adaptive")
    assert wrapped(PROMPTS, llm, sp) == rollout(PROMPTS, llm, sp)


@pytest.mark.parametrize("mode", ["sd", "adaptive"])
def test_wrapped_rollouts_are_lossless(tiny_pair, mode):
    """The engine's exact-distribution test, run through AdaptiveSpecRollout."""
    target, drafter = tiny_pair
    llm = LLM(target, recipe=None, drafter=drafter, max_batch=500, kmax=5)
    params = SamplingParams(temperature=1.0, max_tokens=6)
    wrapped = AdaptiveSpecRollout(lambda ps: llm.generate(ps, params), llm=llm, mode=mode, k=3)
    outs = wrapped([PROMPT] * 20_000)
    counts = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids[:DEPTH])
        counts[key] = counts.get(key, 0) + 1
    from collections import Counter

    p = chi_square_pvalue(Counter(counts), exact_distribution(target, PROMPT, params, DEPTH, eos={0}), 20_000)
    assert p > 1e-3
    assert wrapped.stats()["last"]["speculative_share"] > 0


def test_update_policy_refreshes_drafter_and_keeps_state_on_bad_weights():
    llm = make_llm()
    rollout = AdaptiveSpecRollout(lambda p: llm.generate(p, SamplingParams(max_tokens=4)), llm=llm, mode="sd")
    rollout(PROMPTS)
    old_drafter = llm.drafter
    new = {k: v + 0.05 * torch.randn_like(v) if "norm" not in k else v for k, v in llm.model.state_dict().items()}
    secs = rollout.update_policy(new)
    assert secs > 0 and llm.version == 1 and llm.drafter is not old_drafter
    assert llm.drafter.meta.policy_version == 1
    assert torch.equal(llm.model.layers[0].attn.qkv.weight, new["layers.0.attn.qkv.weight"])
    assert llm.drafter.embed.weight is llm.model.embed.weight  # shared by reference
    before = llm.model.layers[0].mlp.down.weight.clone()
    bad = dict(new)
    bad["layers.0.mlp.down.weight"] = torch.full_like(before, float("inf"))
    with pytest.raises(ValueError, match="layers.0.mlp.down.weight"):
        rollout.update_policy(bad)
    assert torch.equal(llm.model.layers[0].mlp.down.weight, before) and llm.version == 1
    missing = {k: v for k, v in new.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="missing key 'norm.weight'"):
        rollout.update_policy(missing)
    with pytest.raises(TypeError, match="update_policy expects"):
        rollout.update_policy(42)
    rollout(PROMPTS)  # still works
    assert rollout.stats()["rollouts"] == 2


def test_update_policy_from_hf_names_and_derivation_failure_turns_speculation_off(monkeypatch):
    llm = make_llm()
    import effroll.drafter.derive as derive

    def boom(*a, **kw):
        raise RuntimeError("simulated quantizer failure")

    monkeypatch.setattr(derive, "derive_drafter", boom)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        llm.update_policy(llm.model.state_dict())
    assert llm.drafter is None and "simulated quantizer failure" in llm.drafter_error
    assert any("speculation is off" in str(x.message) for x in w)
    out = AdaptiveSpecRollout(lambda p: llm.generate(p, SamplingParams(max_tokens=5)), llm=llm, mode="sd")(PROMPTS)
    assert len(out) == len(PROMPTS)


def test_trace_and_stats(tmp_path):
    llm = make_llm()
    path = tmp_path / "trace.jsonl"
    rollout = AdaptiveSpecRollout(lambda p: llm.generate(p, SamplingParams(max_tokens=6)), llm=llm, mode="adaptive",
                                  trace=path)
    rollout(PROMPTS)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines and all({"step", "k", "accepted", "seconds", "rollout", "mode"} <= set(x) for x in lines)
    st = rollout.stats()
    assert {"history", "refresh_s", "controller", "last"} <= set(st)
    assert {"wall_s", "tokens", "tok_per_s", "acceptance_per_position", "speculative_share", "k_histogram",
            "toggles"} <= set(st["last"])


def test_bad_arguments():
    llm = make_llm(recipe=None)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        AdaptiveSpecRollout(None, llm=llm, mode="fast")
    with pytest.raises(ValueError, match="policy"):
        AdaptiveSpecRollout(None, llm=llm, policy="magic")
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        AdaptiveSpecRollout(None, llm=llm, k=0)
    with pytest.raises(ValueError, match="needs llm="):
        AdaptiveSpecRollout(None)
    with pytest.raises(TypeError, match="rollout_fn must be callable"):
        AdaptiveSpecRollout(42, llm=llm)


def test_profile_errors(tmp_path):
    llm = make_llm(recipe=None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        AdaptiveSpecRollout(None, llm=llm, profile=bad)


@pytest.mark.parametrize("head", ["shared", "int4"])
def test_gptq_recipe_calibrates_on_its_own_rollouts(head):
    llm = make_llm(recipe={"method": "gptq", "group_size": 32, "lm_head": head})
    assert llm._collector is not None and llm._collector.tokens == 0
    llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=16))
    assert llm._collector.tokens > 0  # the target's verification forwards fed X^T X
    assert ("lm_head" in llm._collector.counts) == (head == "int4")  # the head's input only when GPTQ needs it
    llm.update_policy(llm.model.state_dict())
    assert llm.drafter is not None and llm.drafter_error is None
    assert llm._collector.tokens == 0  # consumed by the refresh


# ----------------------------------------------------------------------------- scored acceptance prior


def test_forward_first_draft_is_a_shared_kv_draft_step_at_every_position():
    from effroll.engine.kv_cache import KVCache

    llm = make_llm()
    target, drafter = llm.model, llm.drafter
    assert llm.engine.share_kv
    ids = torch.tensor([[3, 17, 5, 60, 2, 44, 9, 81, 7, 12]])
    n = ids.shape[1]
    cache = KVCache(target.cfg, 1, n, target.dtype, "cpu")
    target(ids, torch.zeros(1, dtype=torch.long), cache, [0])
    mixed = drafter.logits(drafter.forward_first_draft(ids, cache))[0]
    for t in (0, 1, 4, n - 1):
        step = KVCache(target.cfg, 1, n, target.dtype, "cpu")  # the target's K/V for 0..t-1, as in the engine
        for a, b in zip(step.k + step.v, cache.k + cache.v):
            a[:, :, :t] = b[:, :, :t]
        h = drafter(ids[:, t : t + 1], torch.tensor([t]), step, [t])  # the drafter writes its own K/V at t
        torch.testing.assert_close(drafter.logits(h)[0, 0], mixed[t], rtol=1e-4, atol=1e-4)
    # a subset of positions costs only those positions and gives the same logits
    sub = drafter.logits(drafter.forward_first_draft(ids, cache, torch.tensor([0, 4, n - 1])))[0]
    torch.testing.assert_close(sub, mixed[[0, 4, n - 1]], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one sequence, got a batch of 2"):
        drafter.forward_first_draft(ids.repeat(2, 1), cache)
    with pytest.raises(ValueError, match="within 0..9"):
        drafter.forward_first_draft(ids, cache, torch.tensor([3, 10]))


def test_first_draft_acceptance_is_one_for_the_target_itself():
    from effroll.drafter.report import first_draft_acceptance

    llm = make_llm()
    seqs, starts = [[3, 17, 5, 60, 2, 44, 9, 81]], [3]
    for shared in (True, False):
        a = first_draft_acceptance(llm.model, llm.model, seqs, starts, shared_kv=shared)
        assert a["positions"] == 5 and a["acceptance"] == pytest.approx(1.0, abs=1e-5)
    a = first_draft_acceptance(llm.model, llm.drafter, seqs, starts, [SamplingParams(temperature=0.0)])
    assert any(a["acceptance"] == pytest.approx(i / 5) for i in range(6))  # greedy: argmax agreement per position
    with pytest.raises(ValueError, match="no positions"):
        first_draft_acceptance(llm.model, llm.drafter, [[1, 2]], [2])


def test_adaptive_starts_from_the_drafters_scored_acceptance():
    llm = make_llm()
    assert llm.acceptance_estimate() is None  # no finished sequence yet
    ro = AdaptiveSpecRollout(None, llm=llm, profile=None)
    ro([[5, 6, 7]] * 3, SamplingParams(max_tokens=12, seed=3))
    est = llm.acceptance_estimate()
    assert 0.0 < est < 1.0 and llm.acceptance_estimate() is est  # computed once per drafter
    llm.generate([[5, 6, 7]] * 2, SamplingParams(temperature=0.0, max_tokens=12))  # a greedy check afterwards
    llm._estimate = None
    assert llm.acceptance_estimate() == pytest.approx(est)  # still scored on the sampled requests
    fresh = AdaptiveSpecRollout(None, llm=llm, profile=None)  # nothing observed yet: starts from the score
    fresh([[5, 6, 7]], SamplingParams(max_tokens=4, seed=4))
    st = fresh.stats()
    assert st["controller"]["acceptance_prior_source"] == "scored" and st["controller"]["acceptance_prior"] == est
    assert st["score_s"] > 0
    llm.update_policy(perturbed_copy(llm.model, seed=5, scale=0.3).state_dict())
    assert llm.acceptance_estimate() != est  # the new drafter is scored again
    off = AdaptiveSpecRollout(None, llm=llm, profile=None, score_drafter=False)
    off([[5, 6, 7]], SamplingParams(max_tokens=4, seed=4))
    assert off.stats()["controller"]["acceptance_prior_source"] == "default" and off.score_s == 0
    with pytest.raises(ValueError, match="acceptance prior must be a number in \\[0, 1\\], got 1.5"):
        off.controller.reset_acceptance(prior=1.5)


def test_a_failing_drafter_score_warns_and_the_rollout_goes_on(monkeypatch):
    llm = make_llm()
    ro = AdaptiveSpecRollout(None, llm=llm, profile=None)
    ro([[5, 6, 7]] * 2, SamplingParams(max_tokens=6, seed=1))

    def boom(*a, **k):
        raise RuntimeError("no memory")

    monkeypatch.setattr(llm, "acceptance_estimate", boom)
    fresh = AdaptiveSpecRollout(None, llm=llm, profile=None)
    with pytest.warns(RuntimeWarning, match="scoring the drafter failed.*no memory"):
        outs = fresh([[5, 6, 7]] * 2, SamplingParams(max_tokens=6, seed=2))
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert fresh.stats()["controller"]["acceptance_prior_source"] == "default"
