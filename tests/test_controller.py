"""Controller tests on a simulated engine (synthetic step times, Bernoulli acceptance); no torch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from effroll.control import (AcceptanceEstimator, Controller, CostModel, expected_tokens, load_profile,
                             make_profile, make_sample, record_samples, save_profile, toggle_table,
                             validate_profile)
from effroll.engine.records import BatchView, StepRecord

LADDER = tuple(range(1, 9))


# ---------------------------------------------------------------------------- simulated engine
class Truth:
    """Memory-bound-looking step times (seconds): SD wins at small B, loses at large B."""

    def t_ar(self, B, L):
        return 0.010 + 0.00012 * B + 2e-8 * B * L

    def t_draft(self, B, L):
        return 0.003 + 0.00004 * B + 7e-9 * B * L

    def t_catchup(self, n):
        return 0.001 + 0.00002 * n if n > 0 else 0.0

    def t_verify(self, B, L, T):
        return 0.0105 + 0.0002 * B * T + 2e-8 * B * L + 1e-9 * B * T * L

    def t_sd(self, B, L, K):
        return K * self.t_draft(B, L) + self.t_verify(B, L, K + 1)

    def best(self, B, L, a):
        """(SD truly faster?, K*, G_sd(K*)/G_ar)."""
        g = [expected_tokens(a, k) / self.t_sd(B, L, k) for k in LADDER]
        i = int(np.argmax(g))
        r = g[i] * self.t_ar(B, L)
        return r > 1.0, LADDER[i], r


def rollout(ctrl, rng, *, n=64, a=0.8, noise=0.08, truth=Truth(), lengths=None, prompt=128, max_steps=None,
            breakdown=True):
    """Run one long-tail rollout (B drains n -> 1) through ``ctrl``; return a per-step log.

    ``a`` may be a float or a function step -> acceptance rate. ``breakdown=False`` reports SD
    steps without draft_s/verify_s (an engine that only times whole steps).
    """
    acc_of = a if callable(a) else (lambda _s: a)
    if lengths is None:
        lengths = np.clip(rng.lognormal(math.log(200), 0.8, n), 8, 2000).astype(int)
    remaining = np.array(lengths)
    ctx = np.full(n, prompt)
    lag = np.zeros(n, dtype=int)  # drafter catch-up backlog per row
    ids = [f"r{i}" for i in range(n)]
    log, step = [], 0
    while (remaining > 0).any() and (max_steps is None or step < max_steps):
        act = np.flatnonzero(remaining > 0)
        view = BatchView(tuple(ids[i] for i in act), tuple(int(c) for c in ctx[act]),
                         tuple(int(r) for r in remaining[act]))
        plan = ctrl.plan(view)
        ks = [max(0, min(plan.k_for(ids[i]), int(remaining[i]) - 1)) for i in act]
        B, L, kmax, a_now = len(act), float(ctx[act].mean()), max(ks), acc_of(step)
        accepted, emitted = [], []
        if kmax == 0:
            secs = truth.t_ar(B, L) * rng.lognormal(0, noise)
            draft_s = verify_s = 0.0
            catch = 0
            lag[act] += 1
            accepted, emitted = [0] * B, [1] * B
        else:
            catch = int(lag[act].sum())
            lag[act] = 0
            for i, k in zip(act, ks):
                draws = rng.random(k) < a_now
                acc = int(np.argmin(draws)) if not draws.all() else k
                accepted.append(acc)
                emitted.append(min(acc + 1, int(remaining[i])))
            draft_s = (kmax * truth.t_draft(B, L) + truth.t_catchup(catch)) * rng.lognormal(0, noise)
            verify_s = truth.t_verify(B, L, kmax + 1) * rng.lognormal(0, noise)
            secs = draft_s + verify_s
        if not breakdown:
            draft_s = verify_s = 0.0
        rec = StepRecord(step, [ids[i] for i in act], ks, accepted, emitted, [int(c) for c in ctx[act]],
                         secs, draft_s=draft_s, verify_s=verify_s, catchup_tokens=catch)
        ctrl.observe(rec)
        sd_best, k_best, ratio = truth.best(B, L, a_now)
        log.append({"step": step, "B": B, "L": L, "spec": kmax > 0, "k": kmax, "sd_best": sd_best,
                    "k_best": k_best, "ratio": ratio, "correct": (kmax > 0) == sd_best})
        for i, e in zip(act, emitted):
            remaining[i] -= e
            ctx[i] += e
        step += 1
    return log


def accuracy(log, tol=0.10):
    """Share of steps that ran the truly faster mode, over the clear-cut steps where the two
    modes' true goodputs differ by more than ``tol`` (near the crossover both are fine: the
    controller's margin deliberately prefers AR within 5%)."""
    clear = [r["correct"] for r in log if abs(r["ratio"] - 1.0) > tol]
    assert len(clear) >= 0.5 * len(log)
    return float(np.mean(clear))


def efficiency(log, truth=Truth(), a=0.8):
    """Mean over steps of (true goodput of the chosen plan) / (true goodput of the best plan)."""
    out = []
    for r in log:
        g_ar = 1.0 / truth.t_ar(r["B"], r["L"])
        g = expected_tokens(a, r["k"]) / truth.t_sd(r["B"], r["L"], r["k"]) if r["k"] else g_ar
        out.append(g / (g_ar * max(1.0, r["ratio"])))
    return float(np.mean(out))


def mode_changes(log):
    return sum(a["spec"] != b["spec"] for a, b in zip(log, log[1:]))


def trained_profile(seed=0):
    ctrl = Controller(probe_band=1e9)  # like `effroll tune`: measure every cell, even where a mode looks hopeless
    rng = np.random.default_rng(seed)
    for _ in range(2):
        rollout(ctrl, rng)
    return make_profile(ctrl.cost, model_name="tiny-llama", model_fingerprint="abc123", dtype="float32",
                        drafter_recipe="rtn-int4-g32", toggle=toggle_table(ctrl.cost, 0.8, 300.0, LADDER))


@pytest.fixture(scope="module")
def profile():
    return trained_profile()


# ---------------------------------------------------------------------------- acceptance
def test_expected_tokens_formula():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.999999999999, 4) == pytest.approx(5.0)
    np.testing.assert_allclose(expected_tokens(0.8, [1, 2]), [1.8, 2.44])


def test_acceptance_estimator_converges_and_resets():
    rng = np.random.default_rng(1)
    est = AcceptanceEstimator(prior=0.7, half_life=256)
    assert est.rate == pytest.approx(0.7)
    for _ in range(300):
        ks = [4] * 8
        acc = []
        for k in ks:
            d = rng.random(k) < 0.9
            acc.append(k if d.all() else int(np.argmin(d)))
        est.update(ks, acc)
    assert est.rate == pytest.approx(0.9, abs=0.04)
    assert est.mean_accepted_per_draft == pytest.approx(sum(0.9 ** j for j in range(1, 5)), abs=0.15)
    est.reset()
    assert est.rate == pytest.approx(0.7) and est.drafts == 0


def test_acceptance_counts_positions():
    est = AcceptanceEstimator(prior=0.5, prior_weight=1e-9, half_life=1e9)
    est.update([3, 3, 0], [3, 1, 0])  # 3 accepted; 1 accepted + 1 rejected; AR row ignored
    assert est.rate == pytest.approx(4 / 5)
    assert est.mean_accepted_per_draft == 2.0


def test_per_position_expected_tokens_uses_product():
    est = AcceptanceEstimator(prior=0.5, prior_weight=1e-6, half_life=1e9, per_position=True, max_position=4)
    for _ in range(50):  # position 1 always accepted, position 2 always rejected
        est.update([2], [1])
    a = est.position_rates()
    assert a[0] == pytest.approx(1.0) and a[1] == pytest.approx(0.0, abs=1e-6)
    assert est.expected_tokens(1) == pytest.approx(2.0)
    assert est.expected_tokens(3) == pytest.approx(2.0, abs=1e-5)  # 1 + a1 + a1*a2 + a1*a2*a3


def test_acceptance_bad_params():
    with pytest.raises(ValueError, match="1.5"):
        AcceptanceEstimator(prior=1.5)
    with pytest.raises(ValueError, match="half_life"):
        AcceptanceEstimator(half_life=0)


# ---------------------------------------------------------------------------- cost model
def test_cost_model_fits_synthetic_and_round_trips():
    t, rng = Truth(), np.random.default_rng(2)
    m = CostModel()
    for B in (1, 2, 4, 8, 16, 32, 64):
        for L in (128, 512, 2048):
            m.add_ar(B, L, t.t_ar(B, L) * rng.lognormal(0, 0.03))
            for K in (1, 3, 6):
                m.add_draft(B, L, K, K * t.t_draft(B, L) * rng.lognormal(0, 0.03))
                m.add_verify(B, L, K + 1, t.t_verify(B, L, K + 1) * rng.lognormal(0, 0.03))
    m.fit()
    assert m.ready and m.mape() < 0.05
    for B, L, K in ((1, 300, 3), (48, 1000, 2), (10, 200, 8)):
        assert float(m.predict_ar(B, L)) == pytest.approx(t.t_ar(B, L), rel=0.06)
        assert float(m.predict_sd(B, L, K)) == pytest.approx(t.t_sd(B, L, K), rel=0.06)
    m2 = CostModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert float(m2.predict_sd(7, 300, 4)) == pytest.approx(float(m.predict_sd(7, 300, 4)))
    assert m2.ready


def test_cost_model_from_step_records_mixed_k_and_catchup():
    t, m = Truth(), CostModel(refit_every=4)
    for i, B in enumerate((2, 4, 8, 16, 32) * 4):
        L = 200 + 10 * i
        m.observe(StepRecord(i, ["x"] * B, [0] * B, [0] * B, [1] * B, [L] * B, t.t_ar(B, L)))
        ks = [3] * (B - 1) + [1]  # mixed K: uses max K = 3
        d = 3 * t.t_draft(B, L) + t.t_catchup(B)
        m.observe(StepRecord(i, ["x"] * B, ks, [1] * B, [2] * B, [L] * B, d + t.t_verify(B, L, 4),
                             draft_s=d, catchup_tokens=B))
    assert m.counts() == {"ar": 20, "draft": 20, "verify": 20, "sd": 0}
    assert m.ready and m.mape() < 0.02
    assert float(m.predict_sd(5, 300, 3)) == pytest.approx(t.t_sd(5, 300, 3), rel=0.05)


def test_record_samples():
    ar = StepRecord(0, ["a", "b"], [0, 0], [0, 0], [1, 1], [10, 30], 0.01)
    sd = StepRecord(1, ["a", "b"], [2, 4], [2, 1], [3, 2], [10, 30], 0.03, draft_s=0.01, catchup_tokens=5)
    whole = StepRecord(2, ["a", "b"], [2, 4], [2, 1], [3, 2], [10, 30], 0.03)
    assert [(s.kind, s.B, s.L, s.K, s.y) for s in record_samples(ar)] == [("ar", 2, 20, 0, 0.01)]
    assert [(s.kind, s.K, round(s.y, 6)) for s in record_samples(sd)] == [("draft", 4, 0.01), ("verify", 4, 0.02)]
    np.testing.assert_array_equal(record_samples(sd)[0].x, make_sample("draft", 2, 20, 4, 0.01, 5).x)
    assert [s.kind for s in record_samples(whole)] == ["sd"]
    assert record_samples(StepRecord(3, [], [], [], [], [], 0.0)) == []


def test_cost_model_bad_dict():
    with pytest.raises(ValueError, match="format"):
        CostModel.from_dict({"coef": {}})
    d = CostModel().to_dict()
    d["coef"]["ar"] = [1.0, -2.0, 0.0]
    with pytest.raises(ValueError, match="coef.ar"):
        CostModel.from_dict(d)


# ---------------------------------------------------------------------------- controller
def test_cold_start_converges_to_faster_mode():
    rng = np.random.default_rng(3)
    ctrl = Controller()
    log = rollout(ctrl, rng)
    assert any(r["sd_best"] for r in log) and any(not r["sd_best"] for r in log)  # both regimes occur
    s = ctrl.stats()
    assert s["warmup_steps"] == 12 and s["probe_steps"] <= 20, s
    assert accuracy(log[40:]) >= 0.95, accuracy(log[40:])
    assert efficiency(log[40:]) >= 0.97
    assert s["toggles"] <= 4, s
    log2 = rollout(ctrl, rng)  # second rollout: fully warm
    assert accuracy(log2) >= 0.97 and efficiency(log2) >= 0.98
    s = ctrl.stats()
    assert s["sign_assessed"] > 0 and s["sign_accuracy"] >= 0.7, s


def test_metrics_catch_bad_policies():
    """The accuracy/efficiency checks used above can fail: never-SD and always-SD-at-K=8 are caught."""
    lengths = np.clip(np.random.default_rng(3).lognormal(math.log(200), 0.8, 64), 8, 600).astype(int)
    never = rollout(Controller(policy="static", static_threshold=0), np.random.default_rng(3), lengths=lengths)
    always = rollout(Controller(policy="static", static_threshold=64, static_k=8), np.random.default_rng(3),
                     lengths=lengths)
    assert accuracy(never) < 0.6 and efficiency(never) < 0.95  # the thresholds used above
    assert accuracy(always) < 0.95 and efficiency(always) < 0.9


def test_engine_without_draft_timing_still_converges():
    """Joint "sd" samples (no draft_s breakdown) still give the right toggle after one rollout."""
    rng = np.random.default_rng(0)
    ctrl = Controller()
    rollout(ctrl, rng, breakdown=False)
    log = rollout(ctrl, rng, breakdown=False)
    assert ctrl.cost.counts()["sd"] > 0 and ctrl.cost.counts()["verify"] == 0
    assert accuracy(log) >= 0.95


def test_toggles_bounded_under_heavy_noise():
    rng = np.random.default_rng(4)
    ctrl = Controller()
    rollout(ctrl, rng, noise=0.1)
    for _ in range(3):
        before = ctrl.stats()
        log = rollout(ctrl, rng, noise=0.25)
        toggles = ctrl.stats()["toggles"] - before["toggles"]
        probes = ctrl.stats()["probe_steps"] - before["probe_steps"]
        assert toggles <= 4 and probes <= 6, (toggles, probes)
        assert mode_changes(log) <= 4 + 2 * 6  # committed toggles + probe round trips
        assert accuracy(log) >= 0.95 and efficiency(log) >= 0.97


def test_warm_start_from_profile_is_right_immediately(profile, tmp_path):
    path = save_profile(profile, tmp_path / "p.json")
    ctrl = Controller(profile=path)
    assert ctrl.cost.ready
    log = rollout(ctrl, np.random.default_rng(5))
    assert accuracy(log) >= 0.95, accuracy(log)
    assert ctrl.stats()["warmup_steps"] == 0
    assert accuracy(log[:10]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_follows_acceptance_step_change(profile, seed):
    """Fixed batch of 4 where SD wins at both rates; acceptance drops 0.9 -> 0.6 at step 60."""
    t, B = Truth(), 4
    (_, k_hi, _), (sd_lo, k_lo, _) = t.best(B, 300, 0.9), t.best(B, 300, 0.6)
    assert sd_lo and k_hi - k_lo >= 3

    def loss(r, a):  # goodput lost by running K instead of the true K*
        g = [expected_tokens(a, k) / t.t_sd(B, r["L"], k) for k in (r["k"], t.best(B, r["L"], a)[1])]
        return 1 - g[0] / g[1]

    ctrl = Controller(profile=profile)
    log = rollout(ctrl, np.random.default_rng(seed), n=B, lengths=np.full(B, 10**6), noise=0.05,
                  a=lambda s: 0.9 if s < 60 else 0.6, max_steps=140)
    ks = [r["k"] for r in log]
    assert all(k > 0 for k in ks), ks
    assert all(loss(r, 0.9) < 0.05 for r in log[30:60]), ks[30:60]
    reached = next((i for i in range(60, 140) if ks[i] == k_lo), None)
    assert reached is not None and reached - 60 <= 30, ks[60:]
    assert all(loss(r, 0.6) < 0.05 for r in log[reached:]), ks[reached:]
    assert ctrl.acceptance.rate == pytest.approx(0.6, abs=0.08)


def test_reset_acceptance_and_stats():
    ctrl = Controller()
    rollout(ctrl, np.random.default_rng(7), n=16)
    s = ctrl.stats()
    for key in ("steps", "speculative_steps", "toggles", "k_hist", "acceptance", "sign_accuracy", "probe_steps"):
        assert key in s
    assert s["steps"] == sum(s["k_hist"].values()) and s["speculative_steps"] > 0
    assert s["acceptance"] == pytest.approx(0.8, abs=0.08)
    ctrl.reset_acceptance()
    assert ctrl.stats()["acceptance"] == pytest.approx(0.7)


def test_no_drafter_or_empty_batch_plans_ar(profile):
    ctrl = Controller(profile=profile)
    assert ctrl.plan(BatchView(("a",), (10,), (50,), has_drafter=False)).k == 0
    assert ctrl.plan(BatchView((), (), ())).k == 0
    assert ctrl.plan(BatchView(("a",), (300,), (50,))).k > 0  # B=1 with a drafter: speculate


def test_static_policy():
    ctrl = Controller(policy="static", static_threshold=8, static_k=3)
    big = BatchView(tuple(map(str, range(9))), (10,) * 9, (50,) * 9)
    small = BatchView(tuple(map(str, range(8))), (10,) * 8, (50,) * 8)
    assert ctrl.plan(big).k == 0 and ctrl.plan(small).k == 3
    assert ctrl.stats()["toggles"] == 1


def test_static_policy_threshold_from_profile(profile):
    ctrl = Controller(policy="static", profile=profile)
    assert ctrl.static_threshold == profile["toggle"]["batch_threshold"] > 0


def test_bad_parameters():
    with pytest.raises(ValueError, match="bandit"):
        Controller(policy="bandit")
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        Controller(k_ladder=[0, 3])
    with pytest.raises(ValueError, match=r"\(\)"):
        Controller(k_ladder=())
    with pytest.raises(ValueError, match="duplicates"):
        Controller(k_ladder=(2, 2))
    with pytest.raises(ValueError, match="-0.1"):
        Controller(margin=-0.1)
    with pytest.raises(ValueError, match="nan"):
        Controller(margin=float("nan"))
    with pytest.raises(ValueError, match="hysteresis"):
        Controller(hysteresis=0)


# ---------------------------------------------------------------------------- profiles
def test_profile_round_trip(profile, tmp_path):
    path = save_profile(profile, tmp_path / "policies" / "p.json")
    back = load_profile(path, expect_model={"name": "tiny-llama", "fingerprint": "abc123"})
    assert back == json.loads(json.dumps(profile))
    assert back["hardware"]["cores"] and back["toggle"]["k_by_batch"]["1"] > 0
    assert load_profile(path, expect_model="tiny-llama")["model"]["name"] == "tiny-llama"


def test_profile_errors(profile, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*malformed"):
        load_profile(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "missing.json")

    d = dict(profile)
    del d["cost_model"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"bad\.json.*cost_model"):
        load_profile(bad)

    bad.write_text(json.dumps(dict(profile, schema_version=2)))
    with pytest.raises(ValueError, match=r"bad\.json.*schema_version 2"):
        load_profile(bad)

    bad.write_text(json.dumps(dict(profile, cost_model={"format": "nope"})))
    with pytest.raises(ValueError, match="cost_model"):
        load_profile(bad)

    good = save_profile(profile, tmp_path / "good.json")
    with pytest.raises(ValueError, match=r"tiny-llama.*qwen-7b"):
        load_profile(good, expect_model="qwen-7b")
    with pytest.raises(ValueError, match=r"abc123.*zzz"):
        load_profile(good, expect_model={"name": "tiny-llama", "fingerprint": "zzz"})
    with pytest.raises(ValueError, match="JSON object"):
        validate_profile([1, 2])
    bad.write_text(json.dumps(dict(profile, schema_version=2)))
    with pytest.raises(ValueError, match=r"bad\.json"):
        Controller(profile=str(bad))


@pytest.mark.parametrize("seed", [0, 1])
def test_acceptance_probes_discover_a_better_drafter_and_stop_for_a_worse_one(profile, seed):
    """The profile's acceptance prior (0.45) says SD does not pay at B=4; the drafter is really at
    0.9 (SD pays 1.5x there). In AR no acceptance is observed, so only the optimistic probes can
    find out. With a truly poor drafter (0.3) the probes must die out."""
    t = Truth()
    assert not t.best(4, 300, 0.45)[0] and t.best(4, 300, 0.9)[2] > 1.4 and not t.best(4, 300, 0.3)[0]
    prof = json.loads(json.dumps(profile))
    prof["toggle"]["a"] = 0.45
    good = Controller(profile=prof, explore_z=1.0)
    log = rollout(good, np.random.default_rng(seed), n=4, lengths=np.full(4, 10**6), a=0.9, max_steps=200)
    assert np.mean([r["spec"] for r in log[100:]]) > 0.95
    poor = Controller(profile=prof, explore_z=1.0)
    log = rollout(poor, np.random.default_rng(seed), n=4, lengths=np.full(4, 10**6), a=0.3, max_steps=300)
    assert poor.stats()["acceptance_probe_steps"] <= 12
    assert not any(r["spec"] for r in log[150:])
    no_explore = Controller(profile=prof)  # the default: no acceptance probes
    log = rollout(no_explore, np.random.default_rng(seed), n=4, lengths=np.full(4, 10**6), a=0.9, max_steps=200)
    assert not any(r["spec"] for r in log)  # without probes the better drafter is never found


def test_no_probes_where_the_other_mode_is_predicted_to_lose_badly(profile):
    """Outside the profile's batch range the controller used to probe SD once per new cell even where
    the model predicts it at half AR's goodput (B=64 on the CPU: 0.56x predicted, 0.55x measured)."""
    t, B = Truth(), 512
    assert t.best(B, 300, 0.8)[2] < 0.6 and B > Controller(profile=profile)._domain["B"][1] * 1.5
    runs = {}
    for band in (1.5, 100.0):
        ctrl = Controller(profile=profile, probe_band=band)
        log = rollout(ctrl, np.random.default_rng(0), n=B, lengths=np.full(B, 10**6), a=0.8, max_steps=60)
        runs[band] = (ctrl.stats()["probe_steps"], sum(r["spec"] for r in log))
    assert runs[1.5] == (0, 0)
    assert runs[100.0][0] > 0  # without the band: probes in every new cell (what the band saves)
    with pytest.raises(ValueError, match="probe_band must be > 1, got 1"):
        Controller(probe_band=1)


class ForeignTruth(Truth):
    """Another machine: AR steps 2x slower, the drafter 5x slower (an AVX2 CPU running a profile made on AMX)."""

    def t_ar(self, B, L):
        return 2.0 * super().t_ar(B, L)

    def t_draft(self, B, L):
        return 5.0 * super().t_draft(B, L)


def test_a_profile_from_this_machine_is_kept(profile):
    ctrl = Controller(profile=profile)
    assert ctrl.stats()["profile_check"]["status"] == "checking"
    rollout(ctrl, np.random.default_rng(11))
    pc = ctrl.stats()["profile_check"]
    assert pc["status"] == "in use" and pc["samples"] >= 16, pc
    assert all(0.8 < r < 1.25 for r in pc["ratios"].values()), pc
    assert ctrl.counters["profile_mismatch"] == 0


def test_a_profile_from_other_hardware_is_caught_and_outweighed(profile):
    """On a machine with 2x slower AR and 5x slower drafter steps the check sees the mismatch within 16
    samples, says so, and cuts the profile's prior weight: the rollout then runs closer to the best plan
    than with a controller blind to the mismatch (whose live refits must outweigh the full anchors)."""
    truth = ForeignTruth()
    ctrl = Controller(profile=profile)
    log = rollout(ctrl, np.random.default_rng(12), truth=truth)
    pc = ctrl.stats()["profile_check"]
    assert pc["status"].startswith("mismatch: ") and max(pc["ratios"].values()) > 1.5, pc
    assert ctrl.counters["profile_mismatch"] == 1 and ctrl.stats()["warmup_steps"] == 0
    # blind to the mismatch (the check switched off), the profile keeps SD on where the truth says AR
    blind = Controller(profile=profile)
    blind._profile_model = None
    blind_log = rollout(blind, np.random.default_rng(12), truth=truth)
    tail = slice(len(log) // 4, None)  # after the check and the relearning
    assert accuracy(log[tail]) >= 0.9
    assert efficiency(log, truth) > efficiency(blind_log, truth) + 0.005, (efficiency(log, truth),
                                                                        efficiency(blind_log, truth))
    assert len(log) < len(blind_log)  # fewer steps: the rollout ends sooner
