"""Torch-free records exchanged between the engine and the controller.

`StepRecord` is what the engine reports after every step; `Plan` is what the
controller (or a caller) asks the next step to do. Neither imports torch, so the
controller package stays pure logic and unit-testable without a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Plan:
    """What one engine step should do.

    ``k`` is the draft length for every active row (0 = plain autoregressive
    step). ``per_row`` overrides it for individual requests, keyed by request id.
    The engine clamps each row's K to what the row can still use (never more
    than its remaining token budget minus one) and to 0 when it has no drafter.
    """

    k: int = 0
    per_row: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"Plan.k must be an int >= 0, got {self.k!r}")
        if self.per_row is not None:
            for rid, kk in self.per_row.items():
                if not isinstance(kk, int) or isinstance(kk, bool) or kk < 0:
                    raise ValueError(f"Plan.per_row[{rid!r}] must be an int >= 0, got {kk!r}")

    def k_for(self, request_id: str) -> int:
        if self.per_row is not None and request_id in self.per_row:
            return int(self.per_row[request_id])
        return self.k

    @property
    def speculative(self) -> bool:
        return self.k > 0 or bool(self.per_row and any(v > 0 for v in self.per_row.values()))


AR = Plan(0)


@dataclass
class StepRecord:
    """Measurements of one engine step (one decode step for every active row).

    Per-row lists are aligned: ``request_ids[i]`` had draft length ``k[i]``,
    got ``accepted[i]`` of its drafted tokens accepted, emitted ``emitted[i]``
    tokens (after stop/max_tokens truncation) and had ``context_lens[i]``
    tokens of context when the step began.

    Timing: ``seconds`` is the whole step (prefill of newly admitted rows
    excluded: that is ``prefill_s``); ``draft_s`` includes the drafter
    catch-up forward, whose extra tokens are counted in ``catchup_tokens``.
    """

    step: int
    request_ids: list[str]
    k: list[int]
    accepted: list[int]
    emitted: list[int]
    context_lens: list[int]
    seconds: float
    draft_s: float = 0.0
    verify_s: float = 0.0
    sample_s: float = 0.0
    catchup_tokens: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    admitted: int = 0
    finished: int = 0
    waiting: int = 0
    policy_version: int = 0
    events: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)

    @property
    def max_k(self) -> int:
        return max(self.k, default=0)

    @property
    def speculative(self) -> bool:
        return any(kk > 0 for kk in self.k)

    @property
    def mean_context_len(self) -> float:
        return sum(self.context_lens) / len(self.context_lens) if self.context_lens else 0.0

    @property
    def tokens(self) -> int:
        return sum(self.emitted)

    @property
    def drafted(self) -> int:
        return sum(self.k)

    @property
    def total_accepted(self) -> int:
        return sum(self.accepted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_size"] = self.batch_size
        return d


@dataclass(frozen=True)
class BatchView:
    """The active batch as the controller sees it before planning a step.

    ``remaining[i]`` is how many more tokens request ``request_ids[i]`` may
    emit (its max_tokens budget left); ``waiting`` is the queue length.
    ``greedy[i]`` is True for temperature-0 rows.
    """

    request_ids: tuple[str, ...]
    context_lens: tuple[int, ...]
    remaining: tuple[int, ...]
    waiting: int = 0
    has_drafter: bool = True
    greedy: tuple[bool, ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)

    @property
    def mean_context_len(self) -> float:
        return sum(self.context_lens) / len(self.context_lens) if self.context_lens else 0.0
