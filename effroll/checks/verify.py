"""`effroll verify`: statistical lossless check of an engine's speculative path against its AR path.

Three checks, each reported as ``{"name", "passed", "statistic", "threshold", ...}``:

1. ``greedy_identity``: at temperature 0 the speculative output equals the AR output token for token.
2. ``distribution``: at temperature 1.0, for each prompt and each of the first ``positions`` emitted
   positions, a chi-square test of homogeneity between the AR and speculative token samples
   (``samples`` per side; tokens with small expected counts pooled). The statistic is the smallest
   p-value, the threshold ``alpha / number_of_tests`` (Bonferroni). The gap detected with power 0.9
   even when spread evenly over 20 tokens, the worst case (``detectable_tv``), is reported with the
   largest empirical TV: 0.11 for 2000 samples (the CLI default), 0.045 for 12000 (the library's).
3. ``logprob_parity``: the logprobs returned on the speculative path equal the target's own
   logprobs of those tokens from a fresh forward (max abs difference vs ``logprob_tol``).

Any engine works through a small adapter (``EngineUnderTest``): one for TorchEngine, one for VLLMEngine.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ..engine.records import Plan
from ..engine.sampling import SamplingParams, derive_seed
from .stats import chi2_homogeneity, detectable_tv, total_variation


SAMPLES = 12000  # per side and prompt (the module doc says what it detects)


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


@dataclass
class VLLMEngineUnderTest:
    """Adapter for :func:`run_verify` (``effroll verify --engine vllm``): the speculative path
    is K = kmax (at temperature > 0 too, even where :attr:`VLLMEngine.spec_sampling_ok` is False), the AR
    path K = 0. ``reference_logprobs`` are the target's
    prompt logprobs from a fresh vLLM prefill (valid for temperature 0 and 1, no top-k/top-p)."""

    engine: VLLMEngine
    name: str = "vllm"

    def generate(self, prompts, params, speculative):
        eng = self.engine
        if not speculative:
            return eng.generate(prompts, params, plan=0)
        # verify the speculative path itself: with spec_sampling_ok False, generate() would quietly run AR
        saved, eng.spec_sampling_ok = eng.spec_sampling_ok, True
        try:
            return eng.generate(prompts, params, plan=eng.kmax)
        finally:
            eng.spec_sampling_ok = saved

    def reference_logprobs(self, prompt, tokens, params):
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if params.temperature not in (0, 1) or params.top_k > 0 or params.top_p < 1:
            raise NotImplementedError("reference logprobs from vLLM prompt_logprobs: temperature 0/1, no top-k/top-p")
        ids = list(prompt) + list(tokens)
        o = self.engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                     VSP(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
        pl = o.prompt_logprobs
        return [pl[i][ids[i]].logprob for i in range(len(prompt), len(ids))]


def reference_logprobs(model: Any, prompt: Sequence[int], tokens: Sequence[int], params: SamplingParams) -> list[float]:
    """The target's logprobs of ``tokens`` after ``prompt`` under ``params``' processing, from a fresh
    full-sequence forward (no KV cache): the reference every engine path must reproduce."""
    import torch

    from ..engine.kv_cache import full_logits
    from ..engine.sampling import process_logits

    logits = full_logits(model, list(prompt) + list(tokens))[len(prompt) - 1 : -1]
    n = logits.shape[0]
    if params.temperature == 0:
        lp = torch.log_softmax(logits, -1)
    else:
        lp = process_logits(logits, torch.full((n,), float(params.temperature)), torch.full((n,), params.top_k),
                            torch.full((n,), float(params.top_p)))
    return lp[torch.arange(n), torch.tensor(list(tokens))].tolist()


Progress = Callable[[str, float, float], None]  # (what runs now, work done, total work): work in tokens asked


class _Work:
    """Counts the tokens asked of the engine so far against the total, for a progress bar with an ETA."""

    def __init__(self, total: float, progress: Progress | None):
        self.done, self.total, self.progress = 0.0, total, progress

    def add(self, what: str, tokens: float) -> None:
        self.done += tokens
        if self.progress:
            self.progress(what, self.done, self.total)


def _side_tokens(positions: int, k: int) -> tuple[int, int]:
    """Tokens each sample asks for on the AR side and on the speculative side (room for drafts of k)."""
    return positions, max(positions, k + 1)


def distribution_check(eut: EngineUnderTest, prompts: Sequence[Sequence[int]], *, samples: int, positions: int,
                       k: int = 1, first: int = 0, alpha: float = 1e-3, seed: int = 0, chunk: int = 256,
                       progress: Progress | None = None, work: _Work | None = None) -> dict[str, Any]:
    """Chi-square homogeneity of AR vs speculative tokens at temperature 1, per prompt and emitted position
    ``first .. positions-1``. The speculative side asks for ``max(positions, k + 1)`` tokens so its first step
    can draft all ``k`` (an engine drafts at most the tokens a request has left minus one). Samples go to
    the engine ``chunk`` at a time (each has its own seed, so chunking changes no token), for the progress."""
    sides = _side_tokens(positions, k)
    work = work or _Work(len(prompts) * samples * sum(sides), progress)
    results, tvs = [], []
    for pi, p in enumerate(prompts):
        outs: dict[int, list] = {}
        for side, spec in ((0, False), (1, True)):
            outs[side] = []
            for s0 in range(0, samples, chunk):
                n = min(chunk, samples - s0)
                params = [SamplingParams(temperature=1.0, max_tokens=sides[side], ignore_eos=True,
                                         seed=derive_seed(seed, pi, side) + s) for s in range(s0, s0 + n)]
                outs[side] += eut.generate([list(p)] * n, params, speculative=spec)
                work.add(f"distribution: prompt {pi + 1}/{len(prompts)}, {'speculative' if spec else 'AR'} side",
                         n * sides[side])
        for pos in range(first, positions):
            a = Counter(o.token_ids[pos] for o in outs[0] if len(o.token_ids) > pos)
            b = Counter(o.token_ids[pos] for o in outs[1] if len(o.token_ids) > pos)
            results.append(chi2_homogeneity(a, b)[1])
            tvs.append(total_variation(a, b))
    thr = alpha / max(1, len(results))
    return {"name": "distribution", "passed": bool(results) and min(results) > thr,
            "statistic": min(results) if results else None, "threshold": thr, "max_tv": max(tvs) if tvs else None,
            "tests": len(results), "samples_per_side": samples, "detectable_tv": detectable_tv(samples, alpha=thr)}


def run_verify(eut: EngineUnderTest, prompts: Sequence[Sequence[int]], *, samples: int = SAMPLES,
               positions: int = 2, k: int = 1, greedy_tokens: int = 32, alpha: float = 1e-3,
               logprob_tol: float = 2e-2, seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Run the three checks. ``k``: the longest draft the speculative path may use (see ``distribution_check``).
    ``progress(what, done, total)`` is called as work finishes (work counted in tokens asked of the engine)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    prompts = [list(p) for p in prompts]
    checks = []
    greedy = 4 * len(prompts) * greedy_tokens  # greedy identity (2 sides) + logprob parity (2 temperatures)
    work = _Work(len(prompts) * samples * sum(_side_tokens(positions, k)) + greedy, progress)

    # 1. greedy identity
    gp = [SamplingParams(temperature=0, max_tokens=greedy_tokens)] * len(prompts)
    ar = eut.generate(prompts, gp, speculative=False)
    sd = eut.generate(prompts, gp, speculative=True)
    work.add("greedy identity", 2 * len(prompts) * greedy_tokens)
    mism = [i for i, (x, y) in enumerate(zip(ar, sd)) if x.token_ids != y.token_ids]
    checks.append({"name": "greedy_identity", "passed": not mism, "statistic": len(mism), "threshold": 0,
                   "detail": f"{len(prompts) - len(mism)}/{len(prompts)} prompts token-identical"})

    # 2. distribution of the first `positions` emitted tokens, per prompt
    checks.append(distribution_check(eut, prompts, samples=samples, positions=positions, k=k, alpha=alpha, seed=seed,
                                     work=work))

    # 3. logprob parity on the speculative path (temperature 1 and greedy)
    worst = 0.0
    for temp in (1.0, 0.0):
        params = [SamplingParams(temperature=temp, max_tokens=greedy_tokens, seed=seed + i) for i in range(len(prompts))]
        for p, sp, o in zip(prompts, params, eut.generate(prompts, params, speculative=True)):
            if not o.token_ids:
                continue
            ref = eut.reference_logprobs(p, o.token_ids, sp)
            worst = max(worst, max(abs(x - y) for x, y in zip(ref, o.logprobs)))
        work.add("logprob parity", len(prompts) * greedy_tokens)
    checks.append({"name": "logprob_parity", "passed": worst <= logprob_tol and math.isfinite(worst),
                   "statistic": worst, "threshold": logprob_tol})
    return {"engine": eut.name, "passed": all(c["passed"] for c in checks), "checks": checks}


def verify_vllm_sampling(engine: Any, prompts: Sequence[Sequence[int]] | None = None, *, samples: int = 2000,
                         positions: int = 3, alpha: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """The distribution check on a VLLMEngine's speculative sampling at temperature 1 (K = kmax), positions
    1.. (position 0 comes from the prefill, never speculative); sets ``engine.spec_sampling_ok`` to its result."""
    if not engine.speculative:
        raise RuntimeError("no drafter: nothing to verify")
    m0 = engine.spec_metrics()
    c = distribution_check(VLLMEngineUnderTest(engine), [list(p) for p in (prompts or [[1, 2, 3]])], samples=samples,
                           positions=positions, k=engine.kmax, first=1, alpha=alpha, seed=seed)
    m = engine.spec_metrics() - m0
    engine.spec_sampling_ok = c["passed"]
    if not c["passed"]:
        engine.spec_sampling_note = f"verification failed (min p-value {c['statistic']:.2e} <= {c['threshold']:.1e})"
    engine.last_verify = {"passed": c["passed"], "min_pvalue": c["statistic"], "threshold": c["threshold"],
                          "max_tv": c["max_tv"], "tests": c["tests"], "samples_per_side": samples,
                          "acceptance_rate": m.acceptance_rate, "sampler_patch": engine.sampler_patch}
    return engine.last_verify


def auto_dtype(engine_name: str) -> str:
    """``effroll verify --dtype auto``: bf16 where a bf16 position's logits are the same bits in decode and verify
    (effroll's CPU kernels; greedy identity and logprob parity then test the algorithm), else fp32."""
    from ..checkpoints.files import default_device
    from ..engine.glue import bf16_positions_exact

    return "bf16" if engine_name == "torch" and bf16_positions_exact(default_device()) else "fp32"
