"""Sampling parameters, logit processing and lossless speculative acceptance.

Every distribution the engine samples from (target or drafter, AR or speculative)
goes through ``process_logits``: temperature, then top-k, then top-p, giving the
log of the *processed* distribution. Speculative decoding applies the same
processing to drafter logits q and target logits p, then (Leviathan et al. 2023,
Chen et al. 2023) accepts draft x_j with probability min(1, p_j(x_j)/q_j(x_j)),
emits a token from normalize(max(0, p_j - q_j)) at the first rejection, or a
bonus token from p_K when all K drafts are accepted. The emitted tokens are then
distributed exactly as AR sampling from p.

Randomness is inverse-CDF sampling from per-request uniforms, so each request's
stream depends only on its own seed, not on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    top_p: float = 1.0  # 1.0 = off
    max_tokens: int = 128
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError/TypeError naming the offending value."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature must be a number, got {t!r}")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"top_p must be a number, got {p!r}")
        if not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        m = self.max_tokens
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"max_tokens must be an int, got {m!r}")
        if m < 1:
            raise ValueError(f"max_tokens must be >= 1, got {m!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise TypeError(f"stop_token_ids must be a sequence of ints, got {self.stop_token_ids!r}")
        for s in self.stop_token_ids:
            if isinstance(s, bool) or not isinstance(s, int) or not (0 <= s < vocab_size):
                raise ValueError(f"stop token id {s!r} is not in [0, {vocab_size})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [N, V] of the processed distribution for N positions.

    ``temperature`` [N] (float, > 0; greedy rows pass 1.0 and are handled by the caller),
    ``top_k`` [N] (int, 0 = off), ``top_p`` [N] (float, 1.0 = off). Masked tokens get -inf.
    Ties at the top-k boundary are kept (same rule in every path, so AR and SD agree).
    """
    x = _tempered(logits, temperature)
    kk = top_k.clamp(min=0)
    if bool((kk > 0).any()):
        kmax = int(kk.max())
        kth = torch.topk(x, min(kmax, x.shape[-1]), dim=-1).values
        idx = (kk.clamp(min=1, max=x.shape[-1]) - 1).view(-1, 1)
        thresh = kth.gather(1, idx)
        thresh = torch.where((kk > 0).view(-1, 1), thresh, torch.full_like(thresh, -math.inf))
        x = x.masked_fill(x < thresh, -math.inf)
    rows = (top_p < 1.0).nonzero().flatten()
    if rows.numel():
        sub = x[rows]
        srt, order = torch.sort(sub, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token (in sorted order)
        drop = before > top_p[rows].view(-1, 1)
        drop[:, 0] = False  # always keep the most likely token
        srt = srt.masked_fill(drop, -math.inf)
        sub = torch.empty_like(sub).scatter_(1, order, srt)
        x = x.index_copy(0, rows, sub)
    return torch.log_softmax(x, dim=-1)


def process_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities [N, V] of the processed distribution: ``process_logits(...).exp()``, in one
    softmax pass when no row uses top-k/top-p (the drafter's hot path needs probabilities only)."""
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        return process_logits(logits, temperature, top_k, top_p).exp()
    return torch.softmax(_tempered(logits, temperature), dim=-1)


def _tempered(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """float32 logits / temperature per row (x / 1.0 == x exactly: the pass over B x V is skipped at T=1)."""
    x = logits.float()
    return x / temperature.view(-1, 1) if bool((temperature != 1.0).any()) else x


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of ``probs`` [N, V] (unnormalised OK) using uniforms ``u`` [N] in [0, 1)."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).view(-1, 1)
    idx = torch.searchsorted(cdf, target, right=True).view(-1)
    idx = idx.clamp(max=probs.shape[-1] - 1)
    # Rounding can only land on a zero-probability token when u*total hits the very top: take the argmax then.
    bad = probs.gather(1, idx.view(-1, 1)).view(-1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


def speculative_accept(
    p: torch.Tensor,
    q: torch.Tensor,
    draft: torch.Tensor,
    k: torch.Tensor,
    u_accept: torch.Tensor,
    u_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched rejection sampling.

    p [B, Kmax+1, V] target probabilities (processed), q [B, Kmax, V] drafter probabilities,
    draft [B, Kmax] drafted tokens, k [B] draft length per row (0..Kmax), u_accept [B, Kmax]
    and u_final [B] uniforms. Returns (accepted count j [B], final token [B]): the row emits
    draft[:j] then the final token (from the residual at a rejection, else the bonus from p_k).
    """
    B, kmax1, V = p.shape
    kmax = kmax1 - 1
    if kmax == 0:
        return torch.zeros(B, dtype=torch.long, device=p.device), sample_inverse_cdf(p[:, 0], u_final)
    px = p[:, :kmax].gather(2, draft.unsqueeze(-1)).squeeze(-1)
    qx = q.gather(2, draft.unsqueeze(-1)).squeeze(-1)
    # accept with probability min(1, p/q)  <=>  u * q < p  (q > 0 for a sampled draft)
    ok = u_accept * qx < px
    ok &= torch.arange(kmax, device=p.device).view(1, -1) < k.view(-1, 1)
    j = ok.long().cumprod(-1).sum(-1)  # number of leading accepts
    rows = torch.arange(B, device=p.device)
    pj = p[rows, j]
    rejected = j < k
    qj = q[rows, j.clamp(max=kmax - 1)]
    resid = (pj - qj).clamp(min=0)
    # A rejection implies p < q somewhere, hence positive residual mass; guard rounding anyway.
    use_resid = rejected & (resid.sum(-1) > 0)
    final = torch.where(use_resid.view(-1, 1), resid, pj)
    return j, sample_inverse_cdf(final, u_final)


def greedy_accept(target_argmax: torch.Tensor, draft: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0: accept while the draft equals the target's argmax; emit the target's argmax next."""
    B, kmax1 = target_argmax.shape
    kmax = kmax1 - 1
    if kmax == 0:
        return torch.zeros(B, dtype=torch.long, device=draft.device), target_argmax[:, 0]
    ok = draft == target_argmax[:, :kmax]
    ok &= torch.arange(kmax, device=draft.device).view(1, -1) < k.view(-1, 1)
    j = ok.long().cumprod(-1).sum(-1)
    return j, target_argmax.gather(1, j.view(-1, 1)).view(-1)


# ---------------------------------------------------------------------------- randomness
# Counter-based uniforms (the SplitMix64 stream of each request's seed), vectorised over
# rows: uniform number i of a request is mix(seed + (i + 1) * golden). Each request's
# stream depends only on its seed and how many uniforms it has used, never on the batch.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _lshr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    z = (z ^ _lshr(z, 30)) * _M1
    z = (z ^ _lshr(z, 27)) * _M2
    return z ^ _lshr(z, 31)


def derive_seed(seed: int, *index: int) -> int:
    """The seed of item ``index`` of something seeded ``seed`` (nested: ``derive_seed(s, i, j)``): each level
    maps ``s -> (s * 1000003 + i) * 10007``. With ``stream_seed`` and "sample j of a request seeded s is
    seeded s + j" (``requests.expand_requests``), the one seed rule of effroll."""
    for i in index:
        seed = (int(seed) * 1_000_003 + int(i)) * 10_007
    return seed


def stream_seed(seed: int) -> int:
    """A request seed as the int64 its stream uses: ``seed`` modulo 2**64, read as two's complement.

    The one rule for every seed that reaches the engine (any Python int is a valid seed): seeds in
    int64 range are unchanged, and seeds that differ modulo 2**64 share a stream.
    """
    return (int(seed) + 2**63) % 2**64 - 2**63


def uniforms(seeds: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] float64 uniforms in [0, 1): numbers counters[b] .. counters[b]+n-1 of stream seeds[b]."""
    idx = counters.view(-1, 1) + torch.arange(1, n + 1, dtype=torch.long).view(1, -1)
    z = splitmix64(seeds.view(-1, 1) + idx * _GOLDEN)
    return _lshr(z, 11).double() * (2.0**-53)
