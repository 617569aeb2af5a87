"""Shared prompt prefill: rows whose prompts share a prefix compute its KV once.

GRPO samples each prompt n times and ``effroll verify`` one prompt thousands of times, so most admitted rows
repeat a prompt already in the cache. A new row takes the KV of the longest prefix it shares with a cached
row (an active row, or a new row prefilled first in the same admission) by copy, and only the rest of its
prompt goes through the model. This is exact: with causal attention a position's K/V depend only on the
tokens up to it, so the copy holds what the row's own prefill would have computed (equal bit for bit up to
the batch-shape rounding any batched prefill has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

# A row whose whole prompt is cached is always copied. A shorter common prefix than this is computed, not
# copied: the row's remainder then needs a second forward, which costs more than a few prompt tokens.
MIN_SHARED = 8


@dataclass(frozen=True)
class Share:
    """Where a new row's prompt KV comes from: ``source`` indexes the cached rows (``cached`` for the old
    rows, then ``len(cached) + j`` for new row j, always a leader) or is None (computed whole, a leader);
    ``shared`` positions are copied, the row's other prompt tokens are computed."""

    source: int | None
    shared: int


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on slice equality (C speed, no Python loop)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def plan_shares(feeds: Sequence[Sequence[int]], cached: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> list[Share]:
    """For each new row's prompt feed, its :class:`Share`. ``cached[i]`` are the tokens whose KV old row i
    holds. Three kinds of new rows, prefilled in this order: *leaders* (computed whole, one forward),
    *partial* rows (a prefix copied from an old row or a leader, the rest computed in a second forward) and
    *copies* (the whole prompt copied from an old row or any new row of the first two kinds).

    Equal prompts are grouped first (one representative each). For the representatives, prefixes are found
    in lexicographic order, where the longest common prefix of a sequence with a set is found at its
    neighbours, and the prefix common to a run of neighbours is the minimum of their adjacent prefixes."""
    n_old = len(cached)
    feeds = [list(f) for f in feeds]
    shares: list[Share | None] = [None] * len(feeds)
    rep: dict[tuple, int] = {}
    for r, f in enumerate(feeds):
        first = rep.setdefault(tuple(f), r)
        if first != r:
            shares[r] = Share(n_old + first, len(f))
    # Fast path: a representative whose whole prompt an old row holds (a group split over admissions).
    if cached:
        held: dict[tuple, int] = {}
        for length in {len(feeds[r]) for r in rep.values()}:
            for i, c in enumerate(cached):
                if len(c) >= length:
                    held.setdefault(tuple(c[:length]), i)
        for key, r in list(rep.items()):
            if key in held and feeds[r]:
                shares[r] = Share(held[key], len(feeds[r]))
                del rep[key]
    if not rep:
        return shares  # type: ignore[return-value]
    reps = sorted(rep.values())
    seqs = [list(c) for c in cached] + [feeds[r] for r in reps]  # index n_old + j: representative reps[j]
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    adj = [_lcp(seqs[order[j - 1]], seqs[order[j]]) if j else 0 for j in range(len(order))]

    def useful(got: int, length: int) -> bool:
        return got > 0 and (got == length or got >= min_shared)

    # The best old row for each representative, from either side.
    best: dict[int, tuple[int, int]] = {}  # representative (index into seqs) -> (shared, old row)
    for direction in (1, -1):
        src, run = None, 0
        for j in (range(len(order)) if direction == 1 else range(len(order) - 1, -1, -1)):
            i = order[j]
            run = min(run, adj[j] if direction == 1 else (adj[j + 1] if j + 1 < len(order) else 0))
            if i < n_old:
                src, run = i, len(seqs[i])
            elif src is not None and useful(min(run, len(seqs[i])), len(seqs[i])):
                best[i] = max(best.get(i, (0, 0)), (min(run, len(seqs[i])), src), key=lambda t: t[0])
    # Leaders, in lexicographic order: a representative leads when no old row and no earlier leader gives
    # it a useful prefix. Sources of partial rows are leaders or old rows only (they are complete first).
    leader, run = None, 0
    for j in range(len(order)):
        i = order[j]
        run = min(run, adj[j])
        if i < n_old:
            continue
        length = len(seqs[i])
        old = best.get(i, (0, 0))
        new = min(run, length) if leader is not None else 0
        new = new if useful(new, length) else 0
        r = reps[i - n_old]
        if old[0] and old[0] >= new:
            shares[r] = Share(old[1], old[0])
        elif new:
            shares[r] = Share(n_old + reps[leader - n_old], new)
        else:
            shares[r] = Share(None, 0)
            leader, run = i, length
    return shares  # type: ignore[return-value]


def shared_prefill(feeds: Sequence[Sequence[int]], cached: Sequence[Sequence[int]], row0: int,
                   move: Callable[[int, int, int], None],
                   forward: Callable[[int, list, list], object]) -> tuple[list[int], int]:
    """Prefill ``feeds`` into the slots from ``row0`` on (old rows hold slots 0..row0-1 and ``cached``),
    as :func:`plan_shares` plans: leaders in one ``forward(row0, feeds, starts)``, the shared prefixes of
    partial rows copied (``move(src, dst, length)``) and their rest in a second forward, then the copies.
    Returns the slot order (new row ``order[j]`` is in slot ``row0 + j``) and the tokens computed."""
    shares = plan_shares(feeds, cached)
    kind = [0 if sh.source is None else 1 if sh.shared < len(f) else 2 for sh, f in zip(shares, feeds)]
    order = sorted(range(len(feeds)), key=lambda i: kind[i])
    slot = {i: row0 + j for j, i in enumerate(order)}

    def copy(i: int) -> None:  # plan sources: old rows are slots 0..row0-1, new row i is source row0 + i
        src = shares[i].source
        move(src if src < row0 else slot[src - row0], slot[i], shares[i].shared)

    leaders = [i for i in order if kind[i] == 0]
    rest = [i for i in order if kind[i] == 1]
    if any(feeds[i] for i in leaders):
        forward(row0, [list(feeds[i]) for i in leaders], [0] * len(leaders))
    for i in rest:
        copy(i)
    if rest:
        forward(row0 + len(leaders), [list(feeds[i][shares[i].shared:]) for i in rest], [shares[i].shared for i in rest])
    for i in range(len(feeds)):  # in request order: a copy's source (its group's first row) is done before it
        if kind[i] == 2:
            copy(i)
    computed = sum(len(feeds[i]) for i in leaders) + sum(len(feeds[i]) - shares[i].shared for i in rest)
    return order, computed
