"""One engine step for a run of rows, in four phases: draft, verify, accept, emit (DESIGN.md section 2).

``draft`` samples K tokens per row from the drafter (with the own-cache catch-up merged into its first
forward), ``verify`` runs one target forward over [pending, x_1..x_k], ``accept`` applies batched rejection
sampling and gathers the target's logprob of every emitted token, ``emit`` appends them to the rows.
Only ``emit`` changes a row, and it only appends: a phase that raises leaves every row as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .records import Plan, StepRecord
from .rows import Row
from .sampling import greedy_accept, process_logits, process_probs, sample_inverse_cdf, speculative_accept, uniforms


@dataclass
class StepBatch:
    """The rows of one step (slots lo..lo+B-1), their draft lengths and their random numbers."""

    rows: list[Row]
    lo: int
    ks: list[int]
    K: int
    greedy: torch.Tensor  # [B] bool
    temp: torch.Tensor  # [B] (greedy rows: 1.0)
    topk: torch.Tensor
    topp: torch.Tensor
    u: torch.Tensor  # [B, 2K+1]: [0:k) draft sampling, [k:2k) acceptance, [2k] final, by each row's OWN k
    u_acc: torch.Tensor  # [B, K]
    u_fin: torch.Tensor  # [B]

    @property
    def kt(self) -> torch.Tensor:
        return torch.tensor(self.ks, dtype=torch.long)

    @property
    def any_greedy(self) -> bool:
        return bool(self.greedy.any())


def plan_batch(rows: list[Row], lo: int, plan: Plan, kmax: int, max_seq_len: int) -> StepBatch:
    """Each row's K (clamped to kmax and to what the row can still use) and its uniforms. A row's draws
    depend on its seed and its own draft lengths only, never on the rest of the batch."""
    ks = [max(0, min(plan.k_for(r.rid), kmax, r.remaining(max_seq_len) - 1)) for r in rows]
    K = max(ks)
    kt = torch.tensor(ks, dtype=torch.long)
    u = uniforms(torch.tensor([r.seed for r in rows]), torch.tensor([r.rng_used for r in rows]), 2 * K + 1)
    return StepBatch(
        rows=rows, lo=lo, ks=ks, K=K,
        greedy=torch.tensor([r.params.greedy for r in rows]),
        temp=torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows]),
        topk=torch.tensor([r.params.top_k for r in rows], dtype=torch.long),
        topp=torch.tensor([float(r.params.top_p) for r in rows]),
        u=u, u_acc=u.gather(1, (kt.view(-1, 1) + torch.arange(K).view(1, -1)).clamp(max=2 * K)),
        u_fin=u.gather(1, (2 * kt).view(-1, 1)).view(-1))


def draft(engine: Any, b: StepBatch, rec: StepRecord) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(drafts [B, K], their drafter probabilities q [B, K, V] or None, the drafter cache lengths after the
    catch-up). Shared KV: the drafter reads the target's cache for the prefix and feeds the pending token."""
    rows, B, K = b.rows, len(b.rows), b.K
    toks = torch.zeros(B, K, dtype=torch.long)
    d_lens = [r.d_len for r in rows]
    t0 = time.perf_counter()
    q = None
    if K > 0:
        d, dev = engine.drafter, engine.model.device
        q = torch.zeros(B, K, engine.vocab)
        if engine.share_kv:
            cache, feeds, starts = engine.cache, [r.tokens[-1:] for r in rows], [r.t_len for r in rows]
        else:
            cache, feeds, starts = engine.dcache, [r.tokens[r.d_len :] for r in rows], [r.d_len for r in rows]
        h = engine.forward(d, cache, b.lo, feeds, starts)
        hl = h[torch.arange(B, device=h.device), torch.tensor([len(f) - 1 for f in feeds], device=h.device)]
        d_lens = [len(r.tokens) for r in rows]
        for j in range(K):
            logits = d.logits(hl).cpu()
            probs = process_probs(logits, b.temp, b.topk, b.topp)
            x = sample_inverse_cdf(probs, b.u[:, j])
            if b.any_greedy:
                x = torch.where(b.greedy, logits.argmax(-1), x)
            q[:, j] = probs
            toks[:, j] = x
            if j + 1 < K:
                start = [len(r.tokens) + j for r in rows]
                hl = d(x.view(B, 1).to(dev), torch.tensor(start, device=dev), cache, start, row0=b.lo)[:, 0]
        rec.catchup_tokens += sum(len(f) - 1 for f in feeds)
    rec.draft_s += time.perf_counter() - t0
    return toks, q, d_lens


def verify(engine: Any, b: StepBatch, toks: torch.Tensor, rec: StepRecord) -> torch.Tensor:
    """Target logits [B, K+1, V] (float32, CPU) over [pending, x_1..x_k] of every row."""
    t0 = time.perf_counter()
    feeds = [[r.tokens[-1]] + toks[i, : b.ks[i]].tolist() for i, r in enumerate(b.rows)]
    h = engine.forward(engine.model, engine.cache, b.lo, feeds, [r.t_len for r in b.rows])
    logits = engine.model.logits(h).cpu()
    rec.verify_s += time.perf_counter() - t0
    return logits


def accept(b: StepBatch, logits: torch.Tensor, toks: torch.Tensor, q: torch.Tensor | None,
           vocab: int) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """Per row: accepted drafts j, the j + 1 emitted tokens (drafts then the final one), and the target's
    logprob of each under its processed distribution (greedy rows: the plain log-softmax, T = 1)."""
    B, K1 = len(b.rows), b.K + 1
    kt = b.kt
    lp = process_logits(logits.view(B * K1, -1), b.temp.repeat_interleave(K1), b.topk.repeat_interleave(K1),
                        b.topp.repeat_interleave(K1)).view(B, K1, -1)
    j = torch.zeros(B, dtype=torch.long)
    final = torch.zeros(B, dtype=torch.long)
    if bool((~b.greedy).any()):
        idx = (~b.greedy).nonzero().flatten()
        qq = q[idx] if q is not None else torch.zeros(len(idx), 0, vocab)
        j[idx], final[idx] = speculative_accept(lp[idx].exp(), qq, toks[idx], kt[idx], b.u_acc[idx], b.u_fin[idx])
    if b.any_greedy:
        idx = b.greedy.nonzero().flatten()
        j[idx], final[idx] = greedy_accept(logits[idx].argmax(-1), toks[idx], kt[idx])
        lp = torch.where(b.greedy.view(B, 1, 1), torch.log_softmax(logits, dim=-1), lp)
    emitted = torch.cat([toks, torch.zeros(B, 1, dtype=torch.long)], dim=1)
    emitted[torch.arange(B), j] = final
    lps = lp.gather(2, emitted.unsqueeze(-1)).squeeze(-1).tolist()
    jl = j.tolist()
    return jl, [e[: n + 1] for e, n in zip(emitted.tolist(), jl)], [x[: n + 1] for x, n in zip(lps, jl)]


def emit(b: StepBatch, accepted: list[int], tokens: list[list[int]], logprobs: list[list[float]],
         d_lens: list[int], max_seq_len: int, rec: StepRecord) -> None:
    """Append each row's tokens up to its first stop token or its budget, advance its random stream by
    2k+1 and roll both caches back to the accepted length (by setting the row's lengths)."""
    for i, r in enumerate(b.rows):
        n_before, cnt = len(r.tokens), 0
        for tok, lpv in zip(tokens[i], logprobs[i]):
            r.tokens.append(tok)
            r.out.append(tok)
            r.logprobs.append(lpv)
            cnt += 1
            if tok in r.stop_ids:
                r.finish = "stop"
            elif r.remaining(max_seq_len) <= 0:
                r.finish = "length"
            if r.finish:
                break
        r.rng_used += 2 * b.ks[i] + 1
        r.t_len = n_before + accepted[i]
        if b.K > 0:
            r.d_len = min(d_lens[i] + min(accepted[i], b.K - 1), len(r.tokens))
        rec.k.append(b.ks[i])
        rec.accepted.append(accepted[i])
        rec.emitted.append(cnt)
