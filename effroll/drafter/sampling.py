"""Continuations for calibration and drafter reports, sampled with the engine's own AR path."""

from __future__ import annotations

from typing import Sequence

from ..engine.sampling import SamplingParams, derive_seed
from ..engine.torch_engine import TorchEngine


def sample_continuations(
    model, prompts: Sequence[Sequence[int]], n_tokens: int, *, temperature: float = 1.0, seed: int = 0,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """Sample ``n_tokens`` continuation tokens per prompt from ``model`` (TorchEngine, AR, one batch).

    Each prompt gets its own seed (``seed``-derived), so results do not depend on batching. With
    ``stop_at_eos`` a continuation ends at (and includes) its first EOS token. Returns the
    continuations only (without the prompts).
    """
    prompts = [list(p) for p in prompts]
    if not prompts or n_tokens <= 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample_continuations: empty prompt")
    eng = TorchEngine(model, max_batch=len(prompts), max_seq_len=max(len(p) for p in prompts) + n_tokens + 1, kmax=0)
    params = [SamplingParams(temperature=temperature, max_tokens=n_tokens, ignore_eos=not stop_at_eos,
                             seed=derive_seed(seed, i)) for i in range(len(prompts))]
    return [o.token_ids for o in eng.generate(prompts, params)]
