"""Online lossless audit (opt-in): catch a speculative path that is not lossless while it runs.

``effroll verify`` checks an engine offline; this runs inside live rollouts, cheaply. Two checks:

(a) *Logprob spot check*: with probability ``logprob_rate`` per speculative step, one random row that
    drafted in that step (still running, with at least ``min_tokens`` output tokens) is recomputed with
    an independent full-sequence target forward without KV cache (``verify.reference_logprobs``); the
    mean absolute difference over the row's last ``min(32, n)`` tokens must be <= ``logprob_tol``.
    Catches wrong logprobs and corrupted or wrongly rolled-back KV caches. A mean, because low precision
    is noisy token by token (bf16 measurements: experiments/README.md section 5); hence the default
    tolerance of 0.15 for bf16/fp16 models and 1e-3 for fp32 ones. Cost: one prefill of one sequence.
(b) *Shadow first-token test*: on speculative steps each newly admitted row (with at least two tokens
    to go) joins the shadow slice with probability ``shadow_rate``, and a fair coin assigns it to the
    AR arm (its first step runs with K=0) or the SD arm (the step's K). The assignment is independent
    of prompt, sampling parameters and time, so when the engine is lossless both arms' first tokens
    are samples of one and the same mixture, and a two-sample chi-square test on the pooled counts is
    valid across prompts and policy updates. The test is repeated every ``look_every`` new samples;
    look j runs at level alpha * 6 / (pi^2 j^2), so the chance of any false alarm over an unbounded
    run is <= ``alpha``. Cost: no extra forward; an AR-arm row forgoes its draft for one step.

A failure is final for this audit (``failed``): the caller switches speculation off (the AR path is
the reference) and either raises ``LosslessAuditError`` at the end of the rollout, with the rollout's
result attached so nothing generated is lost (``on_failure="raise"``), or warns and carries on in AR
(``on_failure="ar"``). The audit reads the engine only through ``TorchEngine.snapshot``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import torch

from ..engine.records import BatchView, Plan, StepRecord
from .stats import chi2_homogeneity
from .verify import reference_logprobs

ON_FAILURE = ("raise", "ar")


class LosslessAuditError(RuntimeError):
    """The online audit found the speculative path not lossless. ``result``: the rollout's return value."""

    def __init__(self, message: str, result: Any = None, stats: dict | None = None):
        super().__init__(message)
        self.result, self.stats = result, stats


def _rate(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"audit {name} must be a number in [0, 1], got {v!r}")
    return float(v)


class LosslessAudit:
    """See the module docstring. ``assign`` goes into the planner, ``observe`` after every step."""

    def __init__(self, logprob_rate: float = 0.01, shadow_rate: float = 0.25, alpha: float = 1e-4,
                 logprob_tol: float | None = None, min_tokens: int = 8, look_every: int = 200,
                 on_failure: str = "raise", seed: int = 0):
        self.logprob_rate, self.shadow_rate = _rate("logprob_rate", logprob_rate), _rate("shadow_rate", shadow_rate)
        self.alpha = _rate("alpha", alpha)
        if logprob_tol is not None and (isinstance(logprob_tol, bool) or not isinstance(logprob_tol, (int, float))
                                        or not logprob_tol > 0):
            raise ValueError(f"audit logprob_tol must be a number > 0 (or None: by dtype), got {logprob_tol!r}")
        for name, v in (("min_tokens", min_tokens), ("look_every", look_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"audit {name} must be an int >= 1, got {v!r}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"audit on_failure must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
        self.logprob_tol, self.min_tokens = logprob_tol, min_tokens
        self.look_every, self.on_failure = look_every, on_failure
        self._rng = random.Random(seed)
        self._seen: set[str] = set()  # request ids already planned once (their first step is behind them)
        self._arm: dict[str, str] = {}  # shadow rows waiting for their first token: rid -> "ar" | "sd"
        self.counts = {"ar": Counter(), "sd": Counter()}
        self.logprob_checks, self.logprob_max_diff, self.logprob_max_mean_diff = 0, 0.0, 0.0
        self.looks, self.last_p, self._next_look = 0, None, look_every
        self.failure: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def start_rollout(self) -> None:
        """Request ids never repeat, so what was seen in earlier rollouts can go."""
        self._seen.clear()
        self._arm.clear()

    # ------------------------------------------------------------------ planner side
    def assign(self, view: BatchView, plan: Plan) -> Plan:
        """Put some of the rows that start in this (speculative) step into the shadow slice."""
        per_row = None
        for rid, rem in zip(view.request_ids, view.remaining):
            if rid in self._seen:
                continue
            self._seen.add(rid)
            if not view.has_drafter or rem < 2 or plan.k_for(rid) < 1 or self._rng.random() >= self.shadow_rate:
                continue
            arm = "ar" if self._rng.random() < 0.5 else "sd"
            self._arm[rid] = arm
            if arm == "ar":
                per_row = dict(plan.per_row or {}) if per_row is None else per_row
                per_row[rid] = 0
        return plan if per_row is None else Plan(plan.k, per_row=per_row)

    # ------------------------------------------------------------------ after a step
    def observe(self, rec: StepRecord, engine: Any) -> str | None:
        """Check one step of ``engine`` (a TorchEngine); returns a failure message the first time one occurs."""
        if self.failed:
            return None
        msg = self._shadow(rec, engine) if self._arm else None
        if msg is None and rec.speculative and self._rng.random() < self.logprob_rate:
            msg = self._logprobs(rec, engine)
        if msg is not None:
            self.failure = msg
        return msg

    def _shadow(self, rec: StepRecord, engine: Any) -> str | None:
        outs = None
        for rid, k in zip(rec.request_ids, rec.k):
            arm = self._arm.pop(rid, None)
            if arm is None or (arm == "sd" and k == 0):  # e.g. a stale drafter made the step AR: no sample
                continue
            if outs is None:
                outs = {rid: row.out for rid, row in engine.snapshot(rec.request_ids).items()}
            if outs.get(rid):
                self.counts[arm][outs[rid][0]] += 1
        n = sum(self.counts["ar"].values()) + sum(self.counts["sd"].values())
        if n < self._next_look:
            return None
        self._next_look += self.look_every
        self.looks += 1
        level = self.alpha * 6 / (math.pi ** 2 * self.looks ** 2)
        _, self.last_p, _ = chi2_homogeneity(self.counts["ar"], self.counts["sd"])
        if self.last_p < level:
            return (f"shadow first-token test: speculative and AR first tokens differ (chi-square p={self.last_p:.2e} "
                    f"< {level:.2e}, {sum(self.counts['sd'].values())} SD vs {sum(self.counts['ar'].values())} AR)")
        return None

    def _logprobs(self, rec: StepRecord, engine: Any) -> str | None:
        drafted = {rid for rid, k, e in zip(rec.request_ids, rec.k, rec.emitted) if k > 0 and e > 0}
        rows = [r for r in engine.snapshot(drafted).values() if not r.finished and len(r.out) >= self.min_tokens]
        if not rows:
            return None
        r = self._rng.choice(rows)  # slot order, as the engine holds them
        ref = reference_logprobs(engine.model, r.prompt, r.out, r.params)
        diffs = [abs(x - y) for x, y in zip(ref[-32:], r.logprobs[-32:])]
        diff = sum(diffs) / len(diffs)
        tol = self.logprob_tol or (1e-3 if engine.model.dtype == torch.float32 else 0.15)
        self.logprob_checks += 1
        self.logprob_max_diff = max(self.logprob_max_diff, max(diffs))
        self.logprob_max_mean_diff = max(self.logprob_max_mean_diff, diff)
        if not diff <= tol:
            return (f"logprob spot check: request {r.rid}'s returned logprobs differ from an independent target "
                    f"forward by {diff:.3g} on average over its last {len(diffs)} tokens (> {tol:g})")
        return None

    def stats(self) -> dict[str, Any]:
        return {"failed": self.failed, "failure": self.failure, "on_failure": self.on_failure,
                "logprob_checks": self.logprob_checks, "logprob_max_mean_abs_diff": self.logprob_max_mean_diff,
                "logprob_max_abs_diff": self.logprob_max_diff,
                "shadow_samples": {a: sum(c.values()) for a, c in self.counts.items()}, "shadow_looks": self.looks,
                "shadow_p_value": self.last_p}
