"""Torch-free records exchanged between the engines, the controller and the callers.

`Plan` is what the controller (or a caller) asks the next step to do; `StepRecord` is what the
engine reports after it; `RequestOutput` is a finished request. None imports torch, so the
controller package stays pure logic and unit-testable without a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Union


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


def verified_positions(k: int, accepted: int) -> int:
    """Draft positions a verification decided for a row that drafted ``k`` and had ``accepted`` accepted:
    every accepted one plus the first rejected one, if any (the acceptance rate's denominator)."""
    if k <= 0:
        return 0
    a = min(max(accepted, 0), k)
    return a + (a < k)


# Event kinds: a step record's ``events`` are "kind: detail" strings, matched by kind.
STALE_DRAFTER = "stale_drafter"  # the drafter belongs to another policy version: the step ran AR
STEP_ERROR = "step_error"  # a step raised: its rows were retried one at a time
WATCHDOG_REDERIVE = "watchdog_rederive"  # acceptance collapsed: the drafter is derived again
WATCHDOG_DISABLE = "watchdog_disable"  # it did not recover: speculation off for the rollout
AUDIT_FAILED = "audit_failed"  # the online lossless audit failed: speculation off


def event(kind: str, detail: str) -> str:
    return f"{kind}: {detail}"


def event_kind(e: str) -> str:
    return e.split(":", 1)[0]


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
    prefill_tokens: int = 0  # prompt tokens computed; prefill_requested: what rows asked (shared prefixes copied)
    prefill_requested: int = 0
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


@dataclass
class RequestOutput:
    """A finished request of an engine: its tokens, the target's logprob of each, why it ended."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # "stop" | "length" | "error"
    error: str | None = None
    index: int = 0  # position in the caller's input (generate())

    def to_dict(self) -> dict:
        d = {"request_id": self.request_id, "token_ids": self.token_ids, "logprobs": self.logprobs,
             "finish_reason": self.finish_reason}
        if self.error:
            d["error"] = self.error
        return d


class BatchInputError(ValueError):
    """Some requests of a batch were invalid; ``outputs`` holds every result, the valid ones complete."""

    def __init__(self, message: str, outputs: list):
        super().__init__(message)
        self.outputs = outputs


@dataclass
class DrafterMeta:
    """What a derived drafter carries (``Transformer.meta``): the engine drafts with it only while
    ``policy_version`` is the target's (None: unversioned, e.g. a hand-made drafter)."""

    recipe: Any = None  # the drafter.recipe.Recipe it was derived with
    policy_version: int | None = None
    pinned_from: int | None = None  # update_policy(keep_drafter=True): the version it was derived for
    shared_names: tuple[str, ...] = ()  # tensors shared with the target by reference
    derive_seconds: float = 0.0  # wall time of the derivation, Hessian collection included
    calib_seconds: float = 0.0  # of which collecting GPTQ Hessians

    @property
    def recipe_name(self) -> str | None:
        return getattr(self.recipe, "name", None)


PlanLike = Union[Plan, int, None, Callable[[BatchView], Plan]]


def resolve_plan(plan: PlanLike, view: Callable[[], BatchView]) -> Plan:
    """The step's Plan: a Plan as given, an int K, None (AR), or a planner called on ``view()``."""
    if plan is None:
        return Plan(0)
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, int) and not isinstance(plan, bool):
        return Plan(plan)
    if callable(plan):
        p = plan(view())
        if not isinstance(p, Plan):
            raise TypeError(f"planner returned {type(p).__name__}, expected Plan")
        return p
    raise TypeError(f"plan must be a Plan, an int K, None or a callable, got {plan!r}")
