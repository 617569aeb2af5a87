"""Exact-distribution tests: speculative sampling must reproduce the target's distribution.

A tiny random model with an 8-token vocabulary lets us enumerate the exact probability
of every continuation of the first 3 emitted tokens (EOS = token 0 ends a sequence early).
For each setting we draw 20,000 speculative samples through the engine (continuous
batching, rows joining and leaving) and run a chi-square goodness-of-fit test against the
exact distribution. A negative control (a broken acceptance rule) must fail the same test.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from effroll import kernels
from effroll.engine import compiled as compiled_mod
from effroll.engine import sampling as sampling_mod
from effroll.engine.kv_cache import full_logits
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams, process_logits
from effroll.engine.torch_engine import TorchEngine

from conftest import NO_CXX

N_SAMPLES = 20_000
DEPTH = 3
PROMPT = [5, 2, 7]
ALPHA = 1e-3


def processed_logprobs(model, seq, params: SamplingParams) -> torch.Tensor:
    logits = full_logits(model, seq)[-1:]
    t = params.temperature if params.temperature > 0 else 1.0
    return process_logits(logits, torch.tensor([t]), torch.tensor([params.top_k]), torch.tensor([params.top_p]))[0]


def exact_distribution(model, prompt, params: SamplingParams, depth: int, eos: set[int]) -> dict[tuple, float]:
    """P(first `depth` emitted tokens) under AR sampling from the processed target distribution."""
    dist: dict[tuple, float] = {}
    frontier = [((), 1.0)]
    for d in range(depth):
        nxt = []
        for prefix, pr in frontier:
            probs = processed_logprobs(model, prompt + list(prefix), params).exp().double()
            for tok in range(probs.shape[0]):
                p = pr * float(probs[tok])
                if p == 0.0:
                    continue
                seq = prefix + (tok,)
                if tok in eos or d == depth - 1:
                    dist[seq] = dist.get(seq, 0.0) + p
                else:
                    nxt.append((seq, p))
        frontier = nxt
    return dist


def sample_engine(target, drafter, params, plan, n=N_SAMPLES, max_batch=500, share_kv=None, compile_drafter=False,
                  share_prefill=True):
    eng = TorchEngine(target, drafter, max_batch=max_batch, kmax=5, seed=123, share_kv=share_kv,
                      compile_drafter=compile_drafter, share_prefill=share_prefill)
    drafted = accepted = 0

    def on_step(rec):
        nonlocal drafted, accepted
        drafted += sum(rec.k)
        accepted += rec.total_accepted

    outs = eng.generate([PROMPT] * n, params, plan=plan, on_step=on_step)
    counts = Counter(tuple(o.token_ids[:DEPTH]) for o in outs)
    return counts, (accepted / drafted if drafted else None)


def chi_square_pvalue(counts: Counter, exact: dict[tuple, float], n: int) -> float:
    unknown = set(counts) - set(exact)
    assert not unknown, f"sampled continuations with zero exact probability: {sorted(unknown)[:5]}"
    keys = sorted(exact, key=lambda k: -exact[k])
    obs, exp, rest_o, rest_e = [], [], 0.0, 0.0
    for k in keys:
        e = exact[k] * n
        if e >= 5:
            obs.append(counts.get(k, 0))
            exp.append(e)
        else:
            rest_o += counts.get(k, 0)
            rest_e += e
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    exp_t = torch.tensor(exp, dtype=torch.float64)
    exp_t *= sum(obs) / exp_t.sum()  # absorb float rounding of the total
    return float(chisquare(obs, exp_t.tolist()).pvalue)


def alternating(k_on: int):
    """Speculation toggled off and on mid-sequence: even steps AR, odd steps K=k_on."""
    state = {"n": 0}

    def plan(view):
        state["n"] += 1
        return Plan(k_on if state["n"] % 2 else 0)

    return plan


def mixed_k(view):
    """Rows with different K in one step (0..5, by request id)."""
    return Plan(0, per_row={rid: (hash(rid) % 6) for rid in view.request_ids})


SETTINGS = [
    ("t1.0-k1", SamplingParams(temperature=1.0, max_tokens=6), Plan(1)),
    ("t1.0-k3", SamplingParams(temperature=1.0, max_tokens=6), Plan(3)),
    ("t1.0-k5", SamplingParams(temperature=1.0, max_tokens=6), Plan(5)),
    ("t0.7-k3", SamplingParams(temperature=0.7, max_tokens=6), Plan(3)),
    ("t0.7-topk4-k3", SamplingParams(temperature=0.7, top_k=4, max_tokens=6), Plan(3)),
    ("t1.0-topp0.8-k5", SamplingParams(temperature=1.0, top_p=0.8, max_tokens=6), Plan(5)),
    ("t1.0-topk5-topp0.9-k1", SamplingParams(temperature=1.0, top_k=5, top_p=0.9, max_tokens=6), Plan(1)),
    ("t1.0-mixedK", SamplingParams(temperature=1.0, max_tokens=6), mixed_k),
    ("t0.7-toggled", SamplingParams(temperature=0.7, max_tokens=6), "alternating"),
    ("t1.0-ar", SamplingParams(temperature=1.0, max_tokens=6), Plan(0)),
]
# The drafter shares the target's KV cache by default (same geometry); these settings also run with the
# drafter's own cache, the path with catch-up (speculation toggled on after AR steps feeds the missed tokens).
OWN_CACHE = {"t1.0-k3", "t1.0-mixedK", "t0.7-toggled"}
SETTINGS += [(name + "-owncache", params, plan) for name, params, plan in SETTINGS if name in OWN_CACHE]
# Every setting samples one prompt n times, so rows copy the prompt's KV (shared prefill); this one computes it.
SETTINGS += [("t1.0-k3-noshare", SamplingParams(temperature=1.0, max_tokens=6), Plan(3))]
# The drafter's decode through torch.compile'd layer chunks (compile_drafter): per-row K, toggling, catch-up.
COMPILED = {"t1.0-k3", "t1.0-mixedK", "t0.7-toggled", "t0.7-toggled-owncache"}
SETTINGS += [(name + "-compiled", params, plan) for name, params, plan in SETTINGS if name in COMPILED]
# bf16 models: on CPUs where effroll's kernels run, decode, verify and the reference's full forward give a position
# the same logits bits, so the exact distribution is the one the engine samples from (engine.glue).
BF16 = {"t1.0-k3", "t1.0-mixedK", "t0.7-toggled-owncache"}
SETTINGS += [(name + "-bf16", params, plan) for name, params, plan in SETTINGS if name in BF16]


@pytest.mark.parametrize("name,params,plan", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_speculative_matches_exact_distribution(tiny_pair, name, params, plan):
    target, drafter = tiny_pair
    if name.endswith("-bf16"):
        if not (kernels.DECODE.available() and kernels.BF16.available()):
            pytest.skip(f"effroll's bf16 kernels are unavailable: {kernels.DECODE.unavailable_reason()}")
        target, drafter = (copy.deepcopy(m).to(torch.bfloat16) for m in (target, drafter))  # Module.to is in place
    if plan == "alternating":
        plan = alternating(3)
    exact = exact_distribution(target, PROMPT, params, DEPTH, eos={0})
    assert abs(sum(exact.values()) - 1) < 1e-6
    compiled = name.endswith("-compiled")
    if compiled and NO_CXX:
        pytest.skip(NO_CXX)
    if compiled:
        drafter = copy.copy(drafter)  # same modules; the compile flag stays off the session fixture
    counts, acc = sample_engine(target, drafter, params, plan, share_kv="-owncache" not in name,
                                compile_drafter=compiled, share_prefill="-noshare" not in name)
    assert not compiled or compiled_mod.compile_error is None
    assert sum(counts.values()) == N_SAMPLES
    p = chi_square_pvalue(counts, exact, N_SAMPLES)
    assert p > ALPHA, f"{name}: chi-square p={p:.2e} (acceptance {acc})"
    if name != "t1.0-ar":
        # The rejection path must be exercised: the drafter differs from the target.
        assert acc is not None and 0.1 < acc < 0.9, f"{name}: acceptance {acc} does not exercise rejections"


def test_negative_control_broken_acceptance_is_detected(tiny_pair, monkeypatch):
    """Accepting every draft (no rejection sampling) samples from the drafter: the test must catch it."""
    target, drafter = tiny_pair
    params = SamplingParams(temperature=1.0, max_tokens=6)

    def accept_all(p, q, draft, k, u_accept, u_final):
        j = k.clone()
        rows = torch.arange(p.shape[0])
        return j, sampling_mod.sample_inverse_cdf(p[rows, j], u_final)

    monkeypatch.setattr("effroll.engine.spec_step.speculative_accept", accept_all)
    exact = exact_distribution(target, PROMPT, params, DEPTH, eos={0})
    counts, _ = sample_engine(target, drafter, params, Plan(3), n=N_SAMPLES)
    assert chi_square_pvalue(counts, exact, N_SAMPLES) < ALPHA


def no_residual(p, q, draft, k, u_accept, u_final):
    """A broken ``speculative_accept``: after a rejection it resamples from p instead of the residual."""
    B, kmax1, V = p.shape
    kmax = kmax1 - 1
    px = p[:, :kmax].gather(2, draft.unsqueeze(-1)).squeeze(-1)
    qx = q.gather(2, draft.unsqueeze(-1)).squeeze(-1)
    ok = (u_accept * qx < px) & (torch.arange(kmax).view(1, -1) < k.view(-1, 1))
    j = ok.long().cumprod(-1).sum(-1)
    return j, sampling_mod.sample_inverse_cdf(p[torch.arange(B), j], u_final)


def test_negative_control_wrong_residual_is_detected(tiny_pair, monkeypatch):
    """Resampling from p instead of normalize(max(0, p - q)) after a rejection is biased."""
    target, drafter = tiny_pair
    params = SamplingParams(temperature=1.0, max_tokens=6)
    monkeypatch.setattr("effroll.engine.spec_step.speculative_accept", no_residual)
    exact = exact_distribution(target, PROMPT, params, DEPTH, eos={0})
    counts, _ = sample_engine(target, drafter, params, Plan(3), n=N_SAMPLES)
    assert chi_square_pvalue(counts, exact, N_SAMPLES) < ALPHA

