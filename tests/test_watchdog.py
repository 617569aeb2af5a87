"""Drafter health watchdog and online lossless audit (issue 9): fault injection and false alarms.

Every fault must be detected within a bounded number of steps, the rollout must still answer every
request, and the output distribution must stay exact (the engine's distribution test, reused from
test_engine_distribution, runs on the rollout's output). A healthy drafter must never trigger.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter

import pytest
import torch

from effroll.checks.audit import LosslessAuditError
from effroll.control.watchdog import Watchdog
from effroll.engine.records import DrafterMeta, StepRecord
from effroll.engine.sampling import SamplingParams
from effroll import AdaptiveSpecRollout
from effroll.llm import LLM
from effroll.telemetry import summarize_steps

from conftest import random_model
from test_engine_distribution import DEPTH, PROMPT, chi_square_pvalue, exact_distribution, no_residual
from test_rollout import make_llm

WINDOW = 64  # the watchdog's default window of verified positions


def rec(step, k, accepted, events=()):
    return StepRecord(step=step, request_ids=[f"r{i}" for i in range(len(k))], k=list(k), accepted=list(accepted),
                      emitted=[a + 1 for a in accepted], context_lens=[8] * len(k), seconds=0.0, events=list(events))


def feed(wd, k, accepted, steps, start=0):
    """Feed ``steps`` identical records; returns (step, action) of the first action, or None."""
    for s in range(start, start + steps):
        a = wd.observe(rec(s, k, accepted))
        if a is not None:
            return s, a
    return None


def own_tensors(drafter, target):
    """The drafter's tensors that are not the target's own (shared embedding/norms/head excluded)."""
    shared = {t.data_ptr() for t in target.state_dict().values()}
    return [t for t in drafter.state_dict().values() if t.data_ptr() not in shared]


def zero_drafter(drafter, target):
    """What a sleep/wake that does not reload the drafter leaves: its own weights are zeros."""
    with torch.no_grad():
        for t in own_tensors(drafter, target):
            t.zero_()
    return drafter


def first_event(rollout, prefix):
    return next(((r.step, e) for r in rollout._records for e in r.events if e.startswith(prefix)), None)


def exact_pvalue(target, outs, params, depth, eos):
    """The engine's exact-distribution test on the first ``depth`` tokens of a rollout's outputs."""
    counts = Counter(tuple(o.outputs[0].token_ids[:depth]) for o in outs)
    return chi_square_pvalue(counts, exact_distribution(target, PROMPT, params, depth, eos=eos), len(outs))


# ----------------------------------------------------------------------------- the rule (torch-free)
def test_rule_collapse_rederive_disable_and_bounds():
    wd = Watchdog(expected=0.6)  # e.g. drafter-report's acceptance
    assert wd.threshold == pytest.approx(0.3)
    wd.arm("rollout start", version=3)
    # 4 rows drafting K=4 with nothing accepted verify 4 positions per step: the window fills in 16 steps
    assert feed(wd, [4] * 4, [0] * 4, 100) == (math.ceil(WINDOW / 4) - 1, "rederive")
    assert wd.pending and "acceptance 0.000 < threshold 0.300" in wd.pending[0]
    wd.pending.clear()
    wd.rederived(version=3)
    assert feed(wd, [4] * 4, [0] * 4, 100) == (15, "disable") and wd.disabled
    assert feed(wd, [4] * 4, [0] * 4, 100) is None  # quiet while disabled
    wd.end_rollout(0.0, 1000)
    assert wd.expected == 0.6  # a collapsed rollout does not set the expectation
    # same policy version: re-deriving already failed there, so the next collapse disables at once
    wd.arm("rollout start", version=3)
    assert feed(wd, [4] * 4, [0] * 4, 100)[1] == "disable"
    # a new policy version gets its re-derivation again
    wd.arm("update_policy", version=4)
    wd.arm("rollout start", version=4)
    assert wd.reason == "update_policy+rollout start"  # one check for both
    assert feed(wd, [4] * 4, [0] * 4, 100)[1] == "rederive"
    assert wd.stats()["rederive"] == 2 and wd.stats()["disable"] == 2


def test_rule_healthy_passes_and_learns_expectation():
    wd = Watchdog()
    assert wd.expected is None and wd.threshold == 0.1  # the floor until something is expected
    for v in range(3):
        wd.arm("rollout start", v)
        assert feed(wd, [4] * 8, [2] * 8, 50) is None  # acceptance 2/3
        assert wd.state == "idle"
        wd.end_rollout(0.6 + 0.01 * v, 500)
    assert wd.expected == pytest.approx(0.61) and wd.threshold == pytest.approx(0.305)
    assert wd.stats()["passed"] == 3 and wd.stats()["collapses"] == 0
    wd.end_rollout(0.1, 10)  # too few positions to count
    assert wd.expected == pytest.approx(0.61)
    # AR steps (K=0) are not evidence: the check waits for speculative steps
    wd.arm("rollout start", 4)
    assert feed(wd, [0] * 8, [0] * 8, 100) is None and wd.state == "checking"
    # a stale-drafter event from the engine is a collapse at once, whatever the check's state
    wd.arm("rollout start", 5)
    assert feed(wd, [4] * 8, [3] * 8, 20) is None and wd.state == "idle"
    assert wd.observe(rec(21, [0], [0], ["stale_drafter: drafter from policy v4, target at v5; AR step"])) == "rederive"


@pytest.mark.parametrize("kw,match", [
    ({"floor": 1.5}, "floor must be a number in"), ({"relative": -0.1}, "relative must be"),
    ({"window": 0}, "window must be an int >= 1, got 0"), ({"expected": float("nan")}, "expected must be"),
    ({"history": 2.5}, "history must be an int"),
])
def test_rule_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        Watchdog(**kw)


def test_bad_options_through_the_wrapper():
    llm = make_llm()
    with pytest.raises(TypeError, match="watchdog must be True, False or a dict"):
        AdaptiveSpecRollout(None, llm=llm, watchdog="on")
    with pytest.raises(ValueError, match="audit on_failure must be one of raise, ar, got 'ignore'"):
        AdaptiveSpecRollout(None, llm=llm, audit={"on_failure": "ignore"})
    with pytest.raises(ValueError, match="audit shadow_rate must be a number in"):
        AdaptiveSpecRollout(None, llm=llm, audit={"shadow_rate": 2})


# ----------------------------------------------------------------------------- drafter faults
def inject(fault, llm, rollout):
    if fault == "random weights":
        d = random_model(llm.model.cfg, seed=99, std=0.3)
        d.meta = DrafterMeta(policy_version=llm.version)
        llm.engine.set_drafter(d)
    elif fault == "zeroed weights":
        zero_drafter(llm.drafter, llm.model)
    elif fault == "old policy version":
        old = llm.drafter
        g = torch.Generator().manual_seed(5)
        rollout.update_policy({k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if "norm" not in k else v
                               for k, v in llm.model.state_dict().items()})
        llm.engine.set_drafter(old)  # a weight sync that never swapped the drafter in
        assert old.meta.policy_version == llm.version - 1


FAULTS = ["random weights", "zeroed weights", "old policy version"]


@pytest.mark.parametrize("fault", FAULTS)
def test_drafter_fault_detected_within_bound_small_batch(fault):
    """8 rows drafting K=4: each verifies >= 1 position per step, so the check ends by step ceil(64/8)."""
    llm = make_llm()
    rollout = AdaptiveSpecRollout(None, llm=llm, mode="sd", k=4)
    sp = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True)
    rollout([[5, 6, 7]] * 8, sp)  # healthy: sets the expected acceptance
    healthy = rollout.stats()["last"]["acceptance"]
    inject(fault, llm, rollout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a repair that works warns nobody
        outs = rollout([[5, 6, 7]] * 8, sp)
    assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
    step, event = first_event(rollout, "watchdog_rederive")
    first_step = rollout._records[0].step
    bound = 0 if fault == "old policy version" else math.ceil(WINDOW / 8) - 1
    assert step - first_step <= bound, (fault, step - first_step, event)
    wd = rollout.stats()["watchdog"]
    assert wd["rederive"] == 1 and wd["disable"] == 0 and wd["state"] == "idle"  # the re-derived drafter passed
    assert llm.drafter.meta.policy_version == llm.version
    after = summarize_steps([r for r in rollout._records if r.step > step])
    assert after["acceptance"] > 0.5 * healthy, (after["acceptance"], healthy)  # acceptance is back


@pytest.mark.parametrize("fault", FAULTS)
def test_drafter_fault_recovered_path_is_exact(fault):
    """20,000 samples through a faulty drafter: detected in the first step (500 rows), repaired, exact."""
    llm = make_llm(max_batch=500, kmax=5)
    rollout = AdaptiveSpecRollout(None, llm=llm, mode="sd", k=3)
    params = SamplingParams(temperature=1.0, max_tokens=4)
    rollout([PROMPT] * 200, params)
    inject(fault, llm, rollout)
    outs = rollout([PROMPT] * 20_000, params)
    assert len(outs) == 20_000 and all(o.outputs[0].token_ids for o in outs)
    step, _ = first_event(rollout, "watchdog_rederive")
    assert step == rollout._records[0].step  # ceil(64 / 500) = 1 step
    last = rollout.stats()["last"]
    assert last["speculative_share"] == pytest.approx(1.0, abs=0.05) and 0.2 < last["acceptance"] < 0.9
    assert exact_pvalue(llm.model, outs, params, depth=2, eos={1}) > 1e-3


def test_rederivation_that_does_not_help_switches_speculation_off_once(tmp_path, monkeypatch):
    """The derivation itself is broken (returns zeroed drafters): one re-derivation, then AR, one warning."""
    import effroll.drafter.derive as derive

    real = derive.derive_drafter
    monkeypatch.setattr(derive, "derive_drafter", lambda target, *a, **kw: zero_drafter(real(target, *a, **kw), target))
    llm = make_llm(max_batch=500, kmax=5)
    trace = tmp_path / "trace.jsonl"
    rollout = AdaptiveSpecRollout(None, llm=llm, mode="sd", k=3, watchdog={"expected": 0.55}, trace=trace)
    rollout.update_policy(llm.model.state_dict())  # the drafter in use is now a broken one too
    params = SamplingParams(temperature=1.0, max_tokens=6)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = rollout([PROMPT] * 20_000, params)
    mine = [x for x in w if "effroll watchdog" in str(x.message)]
    assert len(mine) == 1 and "speculation is off for the rest of this rollout" in str(mine[0].message)
    assert len(outs) == 20_000 and all(o.outputs[0].token_ids for o in outs)
    events = [e for line in trace.read_text().splitlines() for e in json.loads(line)["events"]]
    assert [e.split(":")[0] for e in events] == ["watchdog_rederive", "watchdog_disable"]
    st = rollout.stats()
    assert st["watchdog"]["state"] == "disabled" and st["last"]["events"] == events
    first = rollout._records[0].step
    assert first_event(rollout, "watchdog_disable")[0] - first <= 1  # two checks of one step each (500 rows)
    assert st["last"]["speculative_share"] < 0.2
    assert exact_pvalue(llm.model, outs, params, depth=2, eos={1}) > 1e-3
    # the next rollout at the same policy version is switched off by its first check, without re-deriving
    n = len(llm.refresh_s)
    with pytest.warns(RuntimeWarning, match="effroll watchdog"):  # one warning per rollout
        rollout([PROMPT] * 500, params)
    assert len(llm.refresh_s) == n and rollout.stats()["watchdog"]["disable"] == 2


# ----------------------------------------------------------------------------- engine faults (audit)
def test_wrong_residual_sampler_detected_by_shadow_test_then_ar_is_exact(tiny_pair, monkeypatch):
    target, drafter = tiny_pair
    monkeypatch.setattr("effroll.engine.spec_step.speculative_accept", no_residual)
    llm = LLM(target, recipe=None, drafter=drafter, max_batch=500, kmax=5)
    rollout = AdaptiveSpecRollout(None, llm=llm, mode="sd", k=3,
                                  audit={"shadow_rate": 1.0, "logprob_rate": 0.0, "on_failure": "ar"})
    params = SamplingParams(temperature=1.0, max_tokens=6)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = rollout([PROMPT] * 4000, params)
    assert len([x for x in w if "lossless audit failed" in str(x.message)]) == 1
    assert len(outs) == 4000 and all(o.outputs[0].token_ids for o in outs)
    step, event = first_event(rollout, "audit_failed")
    assert "shadow first-token test" in event
    assert step - rollout._records[0].step <= 20, step  # about 2,000 first tokens (4 rounds of 500 rows)
    assert rollout.stats()["audit"]["failed"]
    # the recovered path is AR for good: the engine's exact-distribution test passes on it
    outs = rollout([PROMPT] * 20_000, params)
    assert rollout.stats()["last"]["speculative_share"] == 0.0
    counts = Counter(tuple(o.outputs[0].token_ids[:DEPTH]) for o in outs)
    assert chi_square_pvalue(counts, exact_distribution(target, PROMPT, params, DEPTH, eos={0}), 20_000) > 1e-3


def test_wrong_residual_raises_with_the_rollout_attached(tiny_pair, monkeypatch):
    target, drafter = tiny_pair
    monkeypatch.setattr("effroll.engine.spec_step.speculative_accept", no_residual)
    llm = LLM(target, recipe=None, drafter=drafter, max_batch=500, kmax=5)
    rollout = AdaptiveSpecRollout(None, llm=llm, mode="sd", k=3, audit={"shadow_rate": 1.0})  # on_failure="raise"
    with pytest.raises(LosslessAuditError, match="speculative and AR first tokens differ") as ei:
        rollout([PROMPT] * 6000, SamplingParams(temperature=1.0, max_tokens=6))
    assert len(ei.value.result) == 6000 and all(o.outputs[0].token_ids for o in ei.value.result)
    assert ei.value.stats["audit"]["failed"] and ei.value.stats["rollouts"] == 1


def test_corrupted_kv_cache_detected_by_logprob_spot_check():
    """A KV-cache bug (the target cache changes under the engine) shows in the returned logprobs."""
    llm = make_llm()
    rollout = AdaptiveSpecRollout(None, llm=llm, mode="sd", k=3, audit={"logprob_rate": 1.0, "shadow_rate": 0.0})

    seen = []

    def corrupt(r):
        seen.append(r.step)
        if len(seen) == 8:  # every row has >= 8 tokens by now (the spot check's minimum)
            llm.engine.cache.k_all.add_(torch.randn_like(llm.engine.cache.k_all))

    llm.listeners.append(corrupt)  # runs before the audit of the same step, whose logprobs predate it
    with pytest.raises(LosslessAuditError, match="logprob spot check") as ei:
        rollout([[5, 6, 7], [8, 9]] * 4, SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 64 for o in ei.value.result)
    step, _ = first_event(rollout, "audit_failed")
    assert step == seen[7] + 1  # the first step whose logprobs saw the corrupted cache
    assert rollout.stats()["audit"]["logprob_checks"] >= 3


# ----------------------------------------------------------------------------- no false alarms
@pytest.mark.parametrize("mode", ["sd", "adaptive"])
def test_healthy_drafter_never_triggers(mode):
    llm = make_llm()
    rollout = AdaptiveSpecRollout(None, llm=llm, mode=mode, k=4,
                                  audit={"shadow_rate": 1.0, "logprob_rate": 1.0, "look_every": 8})
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=t, top_k=tk, max_tokens=40) for t, tk in ((1.0, 0), (0.7, 20), (0.0, 0))]
    steps = 0
    for v in range(6):
        if v:
            rollout.update_policy({k: t + 0.02 * t.std() * torch.randn(t.shape, generator=g) if "norm" not in k else t
                                   for k, t in llm.model.state_dict().items()})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rollout([[5 + i, 6, 7 + v] for i in range(24)], params[v % 3])
        steps += rollout.stats()["last"]["steps"]
    st = rollout.stats()
    assert steps > 200
    assert st["watchdog"]["collapses"] == 0 and st["watchdog"]["passed"] >= (5 if mode == "sd" else 1), st["watchdog"]
    assert not st["audit"]["failed"], st["audit"]
    # adaptive: how much it speculates depends on measured step times; its warm-up has 9 speculative steps
    assert st["audit"]["logprob_checks"] >= (100 if mode == "sd" else 9)
    assert mode == "adaptive" or st["audit"]["shadow_looks"] >= 15
    assert st["audit"]["logprob_max_abs_diff"] < 1e-3  # fp32: the default tolerance is 1e-3 on the mean
    assert all(not h["events"] for h in st["history"])


def test_bench_reports_the_checks():
    from effroll.bench import bench, make_workload, report_lines

    llm = make_llm()
    res = bench(llm, make_workload(llm, n=6, cap=16), [2], audit=True)
    for m in ("sd_k2", "adaptive"):
        assert 0 <= res[m]["watchdog_overhead"] < 1 and 0 <= res[m]["audit_overhead"] < 1
        assert res[m]["events"] == 0 and res[m]["audit"]["failed"] is False
    res.pop("_records")
    json.dumps(res)
    line = report_lines(res)[1][-1]
    assert line.startswith("health checks: watchdog overhead <= ") and "audit overhead <= " in line, line
    assert line.endswith("no events")
