"""A minimal batched sampler (KV cache, temperature sampling) for calibration and drafter reports."""

from __future__ import annotations

from typing import Sequence

import torch

from effroll.engine.kv_cache import KVCache


@torch.no_grad()
def sample_continuations(
    model, prompts: Sequence[Sequence[int]], n_tokens: int, *, temperature: float = 1.0, seed: int = 0,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """Sample ``n_tokens`` continuation tokens per prompt from ``model`` (all prompts as one batch).

    Rows are right-padded for the prefill; row ``i`` then decodes at its own position. With
    ``stop_at_eos`` a continuation is cut after its first EOS token (``model.cfg.eos_token_ids``).
    Returns the continuations only (without the prompts).
    """
    prompts = [list(p) for p in prompts]
    if not prompts or n_tokens <= 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample_continuations: empty prompt")
    dev = model.device
    B, T = len(prompts), max(len(p) for p in prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    cache = KVCache(model.cfg, B, T + n_tokens, model.dtype, dev)
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    gen = torch.Generator(device=dev).manual_seed(seed)
    h = model(ids, torch.zeros(B, dtype=torch.long, device=dev), cache, [0] * B)
    logits = model.logits(h[torch.arange(B, device=dev), lens - 1])
    out = []
    for step in range(n_tokens):
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, -1)
            tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out.append(tok)
        if step + 1 < n_tokens:
            pos = lens + step
            h = model(tok.view(B, 1), pos, cache, pos.tolist())
            logits = model.logits(h[:, 0])
    toks = torch.stack(out, 1).tolist()
    eos = set(model.cfg.eos_token_ids) if stop_at_eos else set()
    res = []
    for row in toks:
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        res.append(row[:cut])
    return res
