"""A request inside the engine (``Row``) and the check every prompt passes on its way in."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

from .sampling import SamplingParams


def check_prompt_ids(prompt_token_ids: Sequence[int], vocab: int, max_seq_len: int) -> list[int]:
    """The prompt as a list of Python ints, or a ValueError/TypeError naming what is wrong with it.

    Any sequence of integers is accepted (lists, tuples, 1-D numpy arrays or tensors, numpy ints)."""
    if isinstance(prompt_token_ids, (str, bytes)):
        raise TypeError("prompt_token_ids must be a sequence of ints, got a string (tokenize it first)")
    if getattr(prompt_token_ids, "ndim", 1) != 1:
        raise ValueError(f"prompt_token_ids must be 1-D, got shape {tuple(prompt_token_ids.shape)}")
    if hasattr(prompt_token_ids, "tolist") and not isinstance(prompt_token_ids, (list, tuple)):
        prompt_token_ids = prompt_token_ids.tolist()  # numpy / torch: one conversion, Python ints out
    try:
        raw = list(prompt_token_ids)
    except TypeError:
        raise TypeError(f"prompt_token_ids must be a sequence of ints, got {type(prompt_token_ids).__name__}") from None
    if not raw:
        raise ValueError("empty prompt: prompt_token_ids has no tokens")
    ids = []
    for t in raw:
        try:
            v = None if isinstance(t, bool) or type(t).__name__ == "bool_" else operator.index(t)
        except TypeError:
            v = None
        if v is None or not (0 <= v < vocab):
            raise ValueError(f"prompt token id {t!r} is not an int in [0, {vocab})")
        ids.append(v)
    if len(ids) >= max_seq_len:
        raise ValueError(
            f"prompt of {len(ids)} tokens is longer than the context: max_seq_len is {max_seq_len} "
            f"(prompt + at least one generated token must fit)"
        )
    return ids


@dataclass
class Row:
    """One request in flight. Invariants between steps (``n = len(tokens)``, prompt + output): the last
    token is pending, the target cache holds positions 0..n-2 (``t_len = n-1``), the drafter's own cache
    (if any) the first ``d_len <= n`` tokens."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    t_len: int = 0  # target cache valid length
    d_len: int = 0  # drafter cache valid length
    rng_used: int = 0  # uniforms consumed from this request's stream
    finish: str | None = None
    error: str | None = None  # why a step failed for this request (finish == "error")

    def remaining(self, max_seq_len: int) -> int:
        return min(self.params.max_tokens - len(self.out), max_seq_len - len(self.tokens))


@dataclass(frozen=True)
class RowSnapshot:
    """A request's state as checks outside the engine may read it (a copy: the engine's rows stay private)."""

    rid: str
    prompt: tuple[int, ...]
    out: tuple[int, ...]
    logprobs: tuple[float, ...]
    params: SamplingParams | None  # None once finished
    finished: bool


def describe(e: BaseException) -> str:
    """``Type: first line`` of an exception, for error fields and events."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
