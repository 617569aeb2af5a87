"""`effroll verify`'s checks pass on TorchEngine and catch a broken speculative path."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from effroll.control import Controller
from effroll.engine import sampling as sampling_mod
from effroll.engine.records import Plan
from effroll.engine.torch_engine import TorchEngine
from effroll.checks.stats import chi2_homogeneity, detectable_tv
from effroll.checks.verify import TorchEngineUnderTest, run_verify

PROMPTS = [[1, 2, 3], [4, 5], [6]]


@pytest.mark.parametrize("mode", ["sd", "adaptive"])
def test_verify_passes_on_torch_engine(small_pair, mode):
    target, drafter = small_pair
    eng = TorchEngine(target, drafter, max_batch=256, kmax=6)
    factory = (lambda: Plan(4)) if mode == "sd" else (lambda: Controller().plan)
    res = run_verify(TorchEngineUnderTest(eng, factory), PROMPTS, samples=4000, positions=2)
    assert res["passed"], res
    names = [c["name"] for c in res["checks"]]
    assert names == ["greedy_identity", "distribution", "logprob_parity"]
    assert all({"name", "passed", "statistic", "threshold"} <= set(c) for c in res["checks"])


def test_verify_reports_progress_in_tokens_to_the_end(small_pair):
    """The progress callback sees work only grow, never past the total, and end at the total; chunking the
    samples changes no token (each sample has its own seed)."""
    target, drafter = small_pair
    eng = TorchEngine(target, drafter, max_batch=64, kmax=6)
    seen = []
    res = run_verify(TorchEngineUnderTest(eng, lambda: Plan(3)), PROMPTS[:2], samples=300, positions=2, k=3,
                     greedy_tokens=8, progress=lambda what, done, total: seen.append((what, done, total)))
    assert res["passed"], res
    dones = [d for _, d, _ in seen]
    assert dones == sorted(dones) and len({t for _, _, t in seen}) == 1
    total = seen[0][2]
    assert dones[-1] == total == 4 * 2 * 8 + 2 * 300 * (2 + 4)  # greedy + parity, then AR 2 and SD k+1 tokens
    assert any("speculative side" in w for w, _, _ in seen) and seen[-1][0] == "logprob parity"
    from effroll.checks.verify import distribution_check

    one = distribution_check(TorchEngineUnderTest(eng, lambda: Plan(3)), PROMPTS[:1], samples=150, positions=2, k=3)
    chunked = distribution_check(TorchEngineUnderTest(eng, lambda: Plan(3)), PROMPTS[:1], samples=150, positions=2,
                                 k=3, chunk=7)
    assert one["statistic"] == chunked["statistic"] and one["max_tv"] == chunked["max_tv"]


def test_verify_catches_a_biased_sampler(small_pair, monkeypatch):
    """An engine that accepts every draft (the failure seen on vLLM-CPU at T=1) must fail."""
    target, drafter = small_pair

    def accept_all(p, q, draft, k, u_accept, u_final):
        rows = torch.arange(p.shape[0])
        return k.clone(), sampling_mod.sample_inverse_cdf(p[rows, k], u_final)

    monkeypatch.setattr("effroll.engine.spec_step.speculative_accept", accept_all)
    eng = TorchEngine(target, drafter, max_batch=256, kmax=6)
    res = run_verify(TorchEngineUnderTest(eng, lambda: Plan(4)), PROMPTS, samples=4000, positions=2)
    dist = next(c for c in res["checks"] if c["name"] == "distribution")
    assert not dist["passed"] and not res["passed"]


def test_chi2_homogeneity_and_power():
    a = Counter({0: 500, 1: 300, 2: 200})
    assert chi2_homogeneity(a, Counter({0: 480, 1: 320, 2: 200}))[1] > 0.1
    assert chi2_homogeneity(a, Counter({0: 300, 1: 300, 2: 400}))[1] < 1e-6
    assert detectable_tv(12000, alpha=1e-3 / 8) < 0.05 < detectable_tv(2000, alpha=1e-3 / 8)


def test_verify_cli_json_and_exit_code(tmp_path):
    from effroll.cli import main

    from test_cli_generate import save_tiny_checkpoint

    t = save_tiny_checkpoint(tmp_path / "t", seed=0, vocab=64)
    d = save_tiny_checkpoint(tmp_path / "d", seed=0, noise=0.2, vocab=64)
    res = CliRunner().invoke(main, ["verify", "--model", str(t), "--drafter", str(d), "--samples", "2000",
                                    "--prompts", "2", "--json", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["passed"] and len(out["checks"]) == 3


def test_verify_cli_vllm_engine_without_vllm_is_a_clear_error(tmp_path):
    from effroll.cli import main
    from effroll.engine.vllm import vllm_available

    from test_cli_generate import save_tiny_checkpoint

    if vllm_available()[0]:
        pytest.skip("vllm is importable here: the refusal path does not apply")
    t = save_tiny_checkpoint(tmp_path / "t", seed=0, vocab=64)
    res = CliRunner().invoke(main, ["verify", "--model", str(t), "--engine", "vllm"])
    assert res.exit_code == 2 and "--engine vllm: vllm is not importable" in res.output, res.output


def test_verify_drafts_the_k_it_is_asked_for_and_catches_a_k2_only_bug(small_pair, monkeypatch):
    """A sampler that is right for one-token drafts but always accepts the second draft token: verify
    at --k 4 must draft >= 2 tokens (it used to cap K at positions - 1 = 1) and so catch it."""
    target, drafter = small_pair
    real = sampling_mod.speculative_accept
    seen = {"max_k": 0}

    def accept_second_always(p, q, draft, k, u_accept, u_final):
        seen["max_k"] = max(seen["max_k"], int(k.max()) if k.numel() else 0)
        if u_accept.shape[1] >= 2:
            u_accept = u_accept.clone()
            u_accept[:, 1] = torch.where(k >= 2, torch.zeros_like(u_accept[:, 1]), u_accept[:, 1])
        return real(p, q, draft, k, u_accept, u_final)

    eng = TorchEngine(target, drafter, max_batch=256, kmax=6)
    eut = TorchEngineUnderTest(eng, lambda: Plan(4))
    assert run_verify(eut, PROMPTS[:2], samples=3000, positions=2, k=4)["passed"]
    monkeypatch.setattr("effroll.engine.spec_step.speculative_accept", accept_second_always)
    res = run_verify(eut, PROMPTS[:2], samples=3000, positions=2, k=4)
    assert seen["max_k"] == 4
    dist = next(c for c in res["checks"] if c["name"] == "distribution")
    assert not dist["passed"], dist


def test_verify_cli_auto_dtype_is_bf16_only_where_positions_are_exact(tmp_path):
    """--dtype auto (the default) picks bf16 where effroll's CPU kernels make decode and verify shapes give the
    same bits, and its greedy and logprob checks pass there; elsewhere fp32."""
    from effroll.checkpoints.files import default_device
    from effroll.cli import main
    from effroll.engine.glue import bf16_positions_exact

    from test_cli_generate import save_tiny_checkpoint

    t = save_tiny_checkpoint(tmp_path / "t", seed=0, vocab=64)
    d = save_tiny_checkpoint(tmp_path / "d", seed=0, noise=0.2, vocab=64)
    res = CliRunner().invoke(main, ["verify", "--model", str(t), "--drafter", str(d), "--samples", "500", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["dtype"] == ("bf16" if bf16_positions_exact(default_device()) else "fp32")
    assert out["passed"] and all(c["passed"] for c in out["checks"])
