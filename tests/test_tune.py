"""`effroll tune`: end to end on a tiny checkpoint, plus the fit/evaluation logic on synthetic timings.

No timing assertions on the real engine (speed lives in experiments/): the end-to-end test checks
the profile's structure and that the controller and AdaptiveSpecRollout accept it.
"""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from effroll.cli import main
from effroll.control import Controller, load_profile
from effroll.engine.records import StepRecord
from effroll.tune import Grid, Sweep, evaluate, fit, point_table

from test_cli_generate import save_tiny_checkpoint


def _synthetic_sweep(noise: float, seed: int = 0) -> Sweep:
    """Step times from a known linear model (+ multiplicative noise) on the tune grid."""
    rng = random.Random(seed)
    sw = Sweep()

    def t_ar(B, L):
        return 0.020 + 0.001 * B + 2e-6 * B * L

    def t_draft(B, L):
        return 0.008 + 0.0015 * B + 1e-6 * B * L

    def t_verify(B, L, T):
        return 0.021 + 0.0011 * B * T + 2e-6 * B * L

    for B in (1, 2, 3, 4, 6, 8, 12, 16):
        for L in (64, 256):
            for _ in range(3):
                for K in (0, 0, 1, 2, 4):
                    n = lambda: 1 + rng.uniform(-noise, noise)  # noqa: E731
                    if K == 0:
                        secs, d = t_ar(B, L) * n(), 0.0
                    else:
                        d = K * t_draft(B, L) * n()
                        secs = d + t_verify(B, L, K + 1) * n()
                    rec = StepRecord(step=0, request_ids=[str(i) for i in range(B)], k=[K] * B, accepted=[0] * B,
                                     emitted=[1] * B, context_lens=[L] * B, seconds=secs, draft_s=d)
                    sw.records.append(rec)
                    sw.cell_of.append((B, L))
    return sw


def test_fit_recovers_a_linear_step_time_model_on_held_out_batches():
    sw = _synthetic_sweep(noise=0.03)
    grid = Grid(batch_sizes=(1, 2, 3, 4, 6, 8, 12, 16), context_lens=(64, 256), ks=(1, 2, 4))
    assert grid.holdout == (2, 4, 8)
    cm = fit(sw, exclude_batches=grid.holdout)
    ev = evaluate(cm, sw, a=0.8, batches=grid.holdout)
    assert ev["n_points"] == 3 * 2 * 4  # 3 batch sizes x 2 contexts x (AR + 3 K)
    assert ev["mape"] < 0.03 and ev["mape_steps"] < 0.05
    assert ev["sign_accuracy"] >= 0.9


def test_evaluation_detects_a_wrong_model():
    """The held-out metrics must be able to fail: a model fitted to other timings scores badly."""
    sw = _synthetic_sweep(noise=0.0)
    other = _synthetic_sweep(noise=0.0)
    for r in other.records:
        r.seconds *= 1.0 + 0.5 * (r.max_k > 0)  # SD 50% slower than in `sw`
        r.draft_s *= 1.5
    ev = evaluate(fit(other), sw, a=0.8, batches=(2, 4, 8))
    assert ev["mape"] > 0.15


def test_point_table_medians():
    sw = _synthetic_sweep(noise=0.0)
    pts = point_table(sw)
    assert len(pts) == 8 * 2 * 4 and all(v["n"] == (6 if k[2] == 0 else 3) for k, v in pts.items())


def test_grid_validation():
    with pytest.raises(ValueError, match="batch_sizes"):
        Grid(batch_sizes=(0, 2))
    with pytest.raises(ValueError, match="holdout batch sizes \\[5\\]"):
        Grid(batch_sizes=(1, 2, 4), holdout=(5,))
    with pytest.raises(ValueError, match="at least two batch sizes"):
        Grid(batch_sizes=(1, 2, 4), holdout=(1, 2))


def test_tune_end_to_end_on_a_tiny_model(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "m", vocab=128)
    out, png = tmp_path / "policies" / "tiny.json", tmp_path / "tune.png"
    res = CliRunner().invoke(main, ["tune", "--model", str(ckpt), "--drafter-recipe", "rtn-sym-g32", "--out", str(out),
                                    "--plot", str(png), "--batch-sizes", "1,2,3,4", "--context-lens", "16,32",
                                    "--k", "1,2", "--rounds", "2", "--budget-s", "120", "--dtype", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output.strip().splitlines()[-1])
    assert rep["profile"] == str(out) and rep["heldout"]["n_points"] == 1 * 2 * 3  # held out: B=2
    prof = load_profile(out, expect_model={"name": "m"})
    assert prof["drafter_recipe"] == "rtn-sym-g32" and prof["fit"]["holdout_batch_sizes"] == [2]
    assert 0 <= prof["fit"]["sign_accuracy"] <= 1 and prof["fit"]["mape"] >= 0
    assert set(prof["toggle"]["k_by_batch"]) == {"1", "2", "3", "4"}
    ctl = Controller(profile=out)
    assert ctl.cost.ready and ctl.stats()["warmup_steps"] == 0
    assert png.exists() and png.stat().st_size > 10_000

    from effroll import AdaptiveSpecRollout
    from effroll.llm import LLM

    llm = LLM(str(ckpt), recipe="rtn-sym-g32", dtype="fp32", max_batch=2)
    AdaptiveSpecRollout(None, llm=llm, profile=out)  # same architecture: accepted
    other = LLM(str(save_tiny_checkpoint(tmp_path / "other", vocab=96)), recipe="rtn-sym-g32", dtype="fp32")
    with pytest.raises(ValueError, match="profile is for model 'm'"):
        AdaptiveSpecRollout(None, llm=other, profile=out)


def test_tune_bad_input_is_a_user_error(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "m", vocab=128)
    r = CliRunner().invoke(main, ["tune", "--model", str(ckpt), "--out", str(tmp_path / "p.json"), "--k", "1,x"])
    assert r.exit_code == 2 and "--k must be a comma-separated list of ints" in r.output
    r = CliRunner().invoke(main, ["tune", "--model", str(ckpt), "--out", str(tmp_path / "p.json"),
                                  "--batch-sizes", "1,2,4", "--holdout", "3"])
    assert r.exit_code == 2 and "holdout batch sizes [3] are not in the grid" in r.output


def test_auto_profile_picks_a_matching_shipped_profile(tmp_path, monkeypatch, small_pair):
    from effroll.control import CostModel, find_profile, make_profile, save_profile
    from effroll import AdaptiveSpecRollout
    from effroll.llm import LLM, runtime_hardware

    target, _ = small_pair
    hw = runtime_hardware(target)
    assert hw.get("isa", "avx2") in ("amx", "avx512", "avx2", "baseline")
    cm = CostModel().fit()
    mine = make_profile(cm, model_name="small", model_fingerprint=target.fingerprint(), dtype="float32",
                        drafter_recipe="rtn-sym-g32", hardware=hw)
    other_hw = make_profile(cm, model_name="small", model_fingerprint=target.fingerprint(), dtype="float32",
                            drafter_recipe="rtn-sym-g32", hardware=dict(hw, cpu="some other CPU"))
    other_model = make_profile(cm, model_name="big", model_fingerprint="0123456789abcdef", dtype="float32",
                               drafter_recipe="rtn-sym-g32", hardware=hw)
    other_isa = make_profile(cm, model_name="small", model_fingerprint=target.fingerprint(), dtype="float32",
                             drafter_recipe="rtn-sym-g32", hardware=dict(hw, isa="something wider"))
    save_profile(other_hw, tmp_path / "a_other_hw.json")
    save_profile(other_isa, tmp_path / "a_other_isa.json")  # the same CPU name, other instructions
    save_profile(other_model, tmp_path / "b_other_model.json")
    (tmp_path / "c_broken.json").write_text("{not json")
    assert find_profile(target.fingerprint(), hw, dirs=[tmp_path]) is None
    save_profile(mine, tmp_path / "d_mine.json")
    assert find_profile(target.fingerprint(), hw, dirs=[tmp_path]) == tmp_path / "d_mine.json"

    monkeypatch.setenv("EFFROLL_POLICIES", str(tmp_path))
    llm = LLM(target, recipe="rtn-sym-g32", max_batch=2)
    assert AdaptiveSpecRollout(None, llm=llm).stats()["profile"] == str(tmp_path / "d_mine.json")
    assert AdaptiveSpecRollout(None, llm=llm, profile=None).stats()["profile"] is None


def test_breakeven_acceptance_matches_the_goodput_rule():
    from effroll.control.acceptance import expected_tokens
    from effroll.tune import breakeven_acceptance

    cm = fit(_synthetic_sweep(noise=0.0))
    be = breakeven_acceptance(cm, [1, 4, 16], L=128, ks=(1, 2, 4))
    assert be["1"] is not None and (be["16"] is None or be["16"] > be["4"] > be["1"])  # bigger batches need more
    a = be["1"]
    ratio = lambda a: max(expected_tokens(a, k) / float(cm.predict_sd(1, 128, k)) for k in (1, 2, 4)) \
        * float(cm.predict_ar(1, 128))  # noqa: E731
    assert ratio(a + 0.01) > 1 > ratio(a - 0.01)
