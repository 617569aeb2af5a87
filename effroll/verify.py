"""`effroll verify`: statistical lossless check of an engine's speculative path against its AR path.

Three checks, each reported as ``{"name", "passed", "statistic", "threshold", ...}``:

1. ``greedy_identity``: at temperature 0 the speculative output equals the AR output token for token.
2. ``distribution``: at temperature 1.0, for each prompt and each of the first ``positions`` emitted
   positions, a chi-square test of homogeneity between the AR and speculative token samples
   (``samples`` per side; tokens with small expected counts pooled). The statistic is the smallest
   p-value, the threshold ``alpha / number_of_tests`` (Bonferroni). With ``samples`` = 12000 a
   total-variation gap of 0.05 is detected with power >= 0.9 even when spread evenly over 20
   tokens, the worst case (``detectable_tv``); the largest empirical TV is reported too.
3. ``logprob_parity``: the logprobs returned on the speculative path equal the target's own
   logprobs of those tokens from a fresh forward (max abs difference vs ``logprob_tol``).

Any engine works through a small adapter (``EngineUnderTest``): TorchEngine's is built in.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from .engine.records import Plan
from .engine.sampling import SamplingParams


class EngineUnderTest(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], speculative: bool) -> list[Any]: ...

    def reference_logprobs(self, prompt: list[int], tokens: list[int], params: SamplingParams) -> list[float]: ...


@dataclass
class TorchEngineUnderTest:
    """Adapter: the speculative path is ``plan`` (a fixed K, or an adaptive controller factory)."""

    engine: Any  # TorchEngine
    plan_factory: Callable[[], Any]
    name: str = "torch"

    def generate(self, prompts, params, speculative):
        plan = self.plan_factory() if speculative else Plan(0)
        return self.engine.generate(prompts, params, plan=plan)

    def reference_logprobs(self, prompt, tokens, params):
        return reference_logprobs(self.engine.model, prompt, tokens, params)


def reference_logprobs(model: Any, prompt: Sequence[int], tokens: Sequence[int], params: SamplingParams) -> list[float]:
    """The target's logprobs of ``tokens`` after ``prompt`` under ``params``' processing, from a fresh
    full-sequence forward (no KV cache): the reference every engine path must reproduce."""
    import torch

    from .engine.kv_cache import full_logits
    from .engine.sampling import process_logits

    logits = full_logits(model, list(prompt) + list(tokens))[len(prompt) - 1 : -1]
    n = logits.shape[0]
    if params.temperature == 0:
        lp = torch.log_softmax(logits, -1)
    else:
        lp = process_logits(logits, torch.full((n,), float(params.temperature)), torch.full((n,), params.top_k),
                            torch.full((n,), float(params.top_p)))
    return lp[torch.arange(n), torch.tensor(list(tokens))].tolist()


def chi2_homogeneity(a: Counter, b: Counter, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Two-sample chi-square test on token counts; returns (statistic, p-value, dof)."""
    from scipy.stats import chi2

    na, nb = sum(a.values()), sum(b.values())
    keys = set(a) | set(b)
    cells, pool_a, pool_b = [], 0, 0
    for k in keys:
        tot = a.get(k, 0) + b.get(k, 0)
        if min(tot * na, tot * nb) / (na + nb) >= min_expected:
            cells.append((a.get(k, 0), b.get(k, 0)))
        else:
            pool_a += a.get(k, 0)
            pool_b += b.get(k, 0)
    if pool_a + pool_b > 0:
        cells.append((pool_a, pool_b))
    if len(cells) < 2:
        return 0.0, 1.0, 0
    stat = 0.0
    for ca, cb in cells:
        tot = ca + cb
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb
    dof = len(cells) - 1
    return stat, float(chi2.sf(stat, dof)), dof


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def detectable_tv(samples: int, categories: int = 20, alpha: float = 1e-4, power: float = 0.9) -> float:
    """Smallest TV gap the two-sample chi-square test detects with ``power``, in the worst case.

    With n samples per side the noncentrality is lambda = n/2 * sum_i (p_i - q_i)^2 / m_i. A gap of
    total variation TV spread evenly over ``categories`` cells of mass 1/categories gives
    sum = 4 TV^2, so lambda = 2 n TV^2 (a gap concentrated on a few cells is far easier to see).
    """
    from scipy.stats import chi2, ncx2

    dof = categories - 1
    crit = chi2.isf(alpha, dof)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        tv = (lo + hi) / 2
        lam = 2 * samples * tv**2
        if ncx2.sf(crit, dof, lam) >= power:
            hi = tv
        else:
            lo = tv
    return hi


def run_verify(eut: EngineUnderTest, prompts: Sequence[Sequence[int]], *, samples: int = 12000, positions: int = 2,
               k: int = 1, greedy_tokens: int = 32, alpha: float = 1e-3, logprob_tol: float = 2e-2, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the three checks. ``k``: the longest draft the speculative path may use; its samples ask for
    ``max(positions, k + 1)`` tokens so the first step can draft all ``k`` (an engine drafts at most the
    tokens a request has left minus one), and the first ``positions`` are compared with AR's."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    prompts = [list(p) for p in prompts]
    sd_tokens = max(positions, k + 1)
    checks = []

    # 1. greedy identity
    if progress:
        progress("greedy identity")
    gp = [SamplingParams(temperature=0, max_tokens=greedy_tokens)] * len(prompts)
    ar = eut.generate(prompts, gp, speculative=False)
    sd = eut.generate(prompts, gp, speculative=True)
    mism = [i for i, (x, y) in enumerate(zip(ar, sd)) if x.token_ids != y.token_ids]
    checks.append({"name": "greedy_identity", "passed": not mism, "statistic": len(mism), "threshold": 0,
                   "detail": f"{len(prompts) - len(mism)}/{len(prompts)} prompts token-identical"})

    # 2. distribution of the first `positions` emitted tokens, per prompt
    results, tvs = [], []
    for pi, p in enumerate(prompts):
        if progress:
            progress(f"distribution: prompt {pi + 1}/{len(prompts)}")
        outs = {}
        for side, spec in (("ar", False), ("sd", True)):
            params = [SamplingParams(temperature=1.0, max_tokens=sd_tokens if spec else positions, ignore_eos=True,
                                     seed=(seed * 7919 + pi) * 1_000_003 + (s if side == "ar" else s + 10**7))
                      for s in range(samples)]
            outs[side] = eut.generate([p] * samples, params, speculative=spec)
        for pos in range(positions):
            a = Counter(o.token_ids[pos] for o in outs["ar"] if len(o.token_ids) > pos)
            b = Counter(o.token_ids[pos] for o in outs["sd"] if len(o.token_ids) > pos)
            stat, pv, dof = chi2_homogeneity(a, b)
            results.append(pv)
            tvs.append(total_variation(a, b))
    thr = alpha / max(1, len(results))
    checks.append({"name": "distribution", "passed": min(results) > thr, "statistic": min(results), "threshold": thr,
                   "max_tv": max(tvs), "tests": len(results), "samples_per_side": samples,
                   "detectable_tv": detectable_tv(samples, alpha=thr)})

    # 3. logprob parity on the speculative path (temperature 1 and greedy)
    if progress:
        progress("logprob parity")
    worst = 0.0
    for temp in (1.0, 0.0):
        params = [SamplingParams(temperature=temp, max_tokens=greedy_tokens, seed=seed + i) for i in range(len(prompts))]
        for p, sp, o in zip(prompts, params, eut.generate(prompts, params, speculative=True)):
            if not o.token_ids:
                continue
            ref = eut.reference_logprobs(p, o.token_ids, sp)
            worst = max(worst, max(abs(x - y) for x, y in zip(ref, o.logprobs)))
    checks.append({"name": "logprob_parity", "passed": worst <= logprob_tol and math.isfinite(worst),
                   "statistic": worst, "threshold": logprob_tol})
    return {"engine": eut.name, "passed": all(c["passed"] for c in checks), "checks": checks}
