"""vLLM's dynamic speculation schedule: batch-size ranges with a K each (``num_speculative_tokens_per_batch_size``).

``[(lo, hi, K), ...]``: inclusive batch-size ranges, K = 0 means plain AR, the first range starts at 1,
K is clamped to ``num_speculative_tokens``. vLLM looks it up through a dense table indexed by the batch
size (``scheduler.dynamic_sd_lookup``), which VLLMEngine rewrites between steps.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

Schedule = list[tuple[int, int, int]]


def normalize_schedule(schedule: Sequence[Sequence[int]], max_batch: int, kmax: int) -> Schedule:
    """Validate ``[(lo, hi, K), ...]`` as vLLM does (sorted, non-overlapping, starting at 1), clamp K to kmax."""
    out = []
    for e in schedule:
        lo, hi, k = (int(x) for x in e)
        if lo < 1 or hi < lo or k < 0:
            raise ValueError(f"bad schedule entry {tuple(e)!r}: need 1 <= lo <= hi and K >= 0")
        out.append((lo, hi, min(k, kmax)))
    out.sort()
    if not out or out[0][0] != 1:
        raise ValueError(f"schedule must start at batch size 1, got {schedule!r}")
    for (a0, a1, _), (b0, _, _) in zip(out, out[1:]):
        if b0 <= a1:
            raise ValueError(f"schedule ranges overlap: {schedule!r}")
    return out


def dense_lookup(schedule: Schedule, max_batch: int) -> list[int]:
    """vLLM's dense batch-size -> K table (index 0 unused; gaps carry the previous K forward)."""
    lut = [0] * (max_batch + 1)
    for b in range(1, max_batch + 1):
        k = 0
        for lo, hi, kk in schedule:
            if lo <= b:
                k = kk
            if lo <= b <= hi:
                break
        lut[b] = k
    return lut


def schedule_from_profile(profile: Mapping[str, Any], max_batch: int, kmax: int) -> Schedule:
    """A policy profile (or its ``toggle`` section) -> ``num_speculative_tokens_per_batch_size``.

    Uses ``toggle.k_by_batch`` ({"1": K, "2": K, "4": ...}: K* per measured batch size, 0 = AR) when
    present, each K holding from its batch size up to the next listed one; else the static pair
    ``batch_threshold`` / ``k`` (speculate with K for B <= threshold, AR above).
    """
    toggle = profile.get("toggle", profile)
    kbb = toggle.get("k_by_batch")
    if kbb:
        pts = sorted((int(b), int(k)) for b, k in kbb.items())
        sched = []
        for i, (b, k) in enumerate(pts):
            lo = 1 if i == 0 else b
            hi = pts[i + 1][0] - 1 if i + 1 < len(pts) else max(max_batch, b)
            sched.append((lo, hi, min(k, kmax)))
    else:
        thr, k = int(toggle.get("batch_threshold", 0)), int(toggle.get("k", kmax))
        top = max(max_batch, thr + 1)
        sched = [(1, top, 0)] if thr <= 0 else [(1, thr, min(k, kmax)), (thr + 1, top, 0)]
    merged: Schedule = []
    for lo, hi, k in sched:  # merge neighbours with the same K
        if merged and merged[-1][2] == k and merged[-1][1] + 1 == lo:
            merged[-1] = (merged[-1][0], hi, k)
        else:
            merged.append((lo, hi, k))
    return merged
