"""Per-rollout telemetry from the engine's step records (what ``stats()`` and the trace report)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from .engine.records import StepRecord, verified_positions


def summarize_steps(records: Sequence[StepRecord], kmax: int = 16) -> dict[str, Any]:
    """Per-rollout telemetry from its step records."""
    verified = [0] * (kmax + 1)
    accepted = [0] * (kmax + 1)
    khist: Counter = Counter()
    toggles, prev = 0, None
    drafts = acc_total = 0
    for r in records:
        spec = r.speculative
        if prev is not None and spec != prev:
            toggles += 1
        prev = spec
        khist[r.max_k] += 1
        for k, a in zip(r.k, r.accepted):
            if k <= 0:
                continue
            drafts += 1
            acc_total += a
            for pos in range(1, verified_positions(k, a) + 1):
                verified[min(pos, kmax)] += 1
                if pos <= a:
                    accepted[min(pos, kmax)] += 1
    per_pos = {str(p): round(accepted[p] / verified[p], 4) for p in range(1, kmax + 1) if verified[p]}
    nver = sum(verified)
    return {
        "steps": len(records),
        "tokens": sum(r.tokens for r in records),
        "engine_s": sum(r.seconds + r.prefill_s for r in records),
        "prefill_s": sum(r.prefill_s for r in records),
        "prefill_tokens": sum(r.prefill_tokens for r in records),  # computed
        "prefill_requested": sum(r.prefill_requested for r in records),  # asked for; the rest was shared
        "speculative_share": (sum(r.speculative for r in records) / len(records)) if records else 0.0,
        "acceptance": (sum(accepted) / nver) if nver else None,
        "verified_positions": nver,
        "acceptance_per_position": per_pos,
        "mean_accepted_per_draft": (acc_total / drafts) if drafts else None,
        "k_histogram": {str(k): v for k, v in sorted(khist.items())},
        "toggles": toggles,
    }
