"""vLLM's spec-decode counters (``llm.get_metrics()``, which needs ``disable_log_stats=False``) as SpecMetrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

SPEC_METRICS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@dataclass
class SpecMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (vLLM's 'draft acceptance rate')."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per speculative step: 1 + accepted / drafts."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def __sub__(self, o: "SpecMetrics") -> "SpecMetrics":
        pp = tuple(a - b for a, b in zip(self.accepted_per_pos, o.accepted_per_pos or (0,) * len(self.accepted_per_pos)))
        return SpecMetrics(self.num_drafts - o.num_drafts, self.num_draft_tokens - o.num_draft_tokens,
                           self.num_accepted_tokens - o.num_accepted_tokens, pp)

    def to_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length}


def read_spec_metrics(llm: Any) -> SpecMetrics:
    """Cumulative counters of a ``vllm.LLM`` since it started: drafts, drafted and accepted tokens, and
    accepted tokens per draft position."""
    m = SpecMetrics()
    for x in llm.get_metrics():
        name = x.name.removeprefix("vllm:spec_decode_")
        if name in SPEC_METRICS:
            setattr(m, name, int(getattr(x, "value", 0) or 0))
        elif name == "num_accepted_tokens_per_pos":
            m.accepted_per_pos = tuple(int(v) for v in (getattr(x, "values", None) or ()))
    return m


def merge_spec_metrics(metrics: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Counters (``SpecMetrics.to_dict()``) of several calls or actors, summed."""
    ms = [m for m in metrics if m]
    if not ms:
        return None
    per_pos = [m["accepted_per_pos"] for m in ms]
    width = max(map(len, per_pos))
    return SpecMetrics(*(sum(m[k] for m in ms) for k in SPEC_METRICS),
                       tuple(sum(p[i] for p in per_pos if i < len(p)) for i in range(width))).to_dict()
