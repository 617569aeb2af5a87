"""Drafter health watchdog (pure logic, no torch): no silent slowdown from a stale or empty drafter.

After a weight sync, an engine sleep/wake or a restart the drafter can be stale or empty; acceptance
then collapses to about zero and speculation becomes pure overhead without any error. The watchdog
is *armed* after every ``update_policy`` and at the start of every rollout; it then checks the next
speculative steps until ``window`` draft positions have been verified, and goes quiet again.

The rule. A drafted position is *verified* when the target judged it (the accepted positions of a
row plus its first rejected one). With ``n`` verified and ``m`` accepted positions, ``a = m / n`` is
the MLE of the per-token acceptance rate (independent of K, unlike the mean accepted tokens per
draft, which is reported too). Once ``n >= window``:

    collapse  iff  a < threshold = max(floor, relative * expected)     (floor while nothing is expected)

``expected`` is the median acceptance of the last ``history`` healthy rollouts, or before any, the
configured ``expected`` (e.g. the ``acceptance`` of ``effroll drafter-report``, the same quantity).
By the Chernoff bound for ``n`` Bernoulli positions, a drafter whose true rate ``a*`` is on the
other side of the threshold ``t`` is misjudged with probability <= exp(-n KL(t || a*)): with the
defaults (window 64, relative 0.5), a healthy drafter at 0.6 trips with probability <= 1e-5 and a
collapsed one at 0.05 passes with probability <= 1e-9. Positions are not independent in practice
(acceptance varies with the context), so these figures are optimistic; the factor-2 margin is what
keeps false alarms away (tests check it on many steps). Every speculating row verifies at least one
position per step, so a check ends within ceil(window / B) speculative steps with B rows drafting.

A ``stale_drafter`` event from the engine (it refuses to draft with a drafter derived from another
policy version) is a collapse at once, without a window.

Actions (``observe`` returns them; the caller acts): the first collapse of a check asks for
``"rederive"`` (a drafter from the *current* policy weights; then call ``rederived``, which starts a
fresh check); a collapse after that, or one at a policy version whose re-derivation already failed
to help, asks for ``"disable"``: speculation off until the next ``arm`` (the end of the rollout).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from ..engine.records import STALE_DRAFTER, WATCHDOG_DISABLE, WATCHDOG_REDERIVE, event, event_kind, verified_positions

REDERIVE, DISABLE = "rederive", "disable"


def _number(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"watchdog {name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


class Watchdog:
    """Checks the first speculative steps after ``arm``; see the module docstring for the rule."""

    def __init__(self, floor: float = 0.1, relative: float = 0.5, window: int = 64, expected: float | None = None,
                 history: int = 5) -> None:
        self.floor = _number("floor", floor, 0.0, 1.0)
        self.relative = _number("relative", relative, 0.0, 1.0)
        self.configured = None if expected is None else _number("expected", expected, 0.0, 1.0)
        for name, v in (("window", window), ("history", history)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"watchdog {name} must be an int >= 1, got {v!r}")
        self.window = window
        self.recent: deque[float] = deque(maxlen=history)
        self.state = "idle"  # "checking" | "idle" (check passed) | "disabled" (until the next arm)
        self.reason = ""
        self.version: int | None = None
        self._failed_version: int | None = None  # re-deriving at this version did not restore acceptance
        self._rederived = False  # this check already asked for its one re-derivation
        self._collapsed = False  # a collapse since the last arm (the rollout does not count as healthy)
        self._n = self._m = self._drafts = 0
        self.events: list[dict[str, Any]] = []  # every collapse/action, for stats()
        self.pending: list[str] = []  # one-line messages for the step record's events (caller drains)
        self.counts = {"checks": 0, "passed": 0, "collapses": 0, "rederive": 0, "disable": 0}

    # ------------------------------------------------------------------ state
    @property
    def expected(self) -> float | None:
        return statistics.median(self.recent) if self.recent else self.configured

    @property
    def threshold(self) -> float:
        e = self.expected
        return self.floor if e is None else max(self.floor, self.relative * e)

    @property
    def disabled(self) -> bool:
        return self.state == "disabled"

    def _restart(self) -> None:
        self.state, self._n, self._m, self._drafts = "checking", 0, 0, 0
        self.counts["checks"] += 1

    def arm(self, reason: str, version: int) -> None:
        """Check the next speculative steps (after ``update_policy``, at the start of a rollout)."""
        if self.state == "checking" and self._n == 0 and self.version == version:
            self.reason = f"{self.reason}+{reason}"  # armed twice before any step: one check
            return
        self.reason, self.version, self._rederived, self._collapsed = reason, version, False, False
        self._restart()

    def rederived(self, version: int) -> None:
        """The caller installed a drafter derived from the current weights: check it afresh."""
        self.version = version
        self._rederived = True
        self._restart()

    # ------------------------------------------------------------------ observation
    def observe(self, rec) -> str | None:
        """Feed one StepRecord; returns ``"rederive"``, ``"disable"`` or None."""
        if self.state == "disabled":
            return None
        stale = next((e for e in rec.events if event_kind(e) == STALE_DRAFTER), None)
        if stale is not None:
            return self._collapse(rec.step, stale)
        if self.state != "checking":
            return None
        for k, acc in zip(rec.k, rec.accepted):
            if k > 0:
                self._n += verified_positions(k, acc)
                self._m += min(max(acc, 0), k)
                self._drafts += 1
        if self._n < self.window:
            return None
        a, t = self._m / self._n, self.threshold
        if a >= t:
            self.state = "idle"
            self.counts["passed"] += 1
            return None
        return self._collapse(rec.step, f"acceptance {a:.3f} < threshold {t:.3f} over {self._n} verified positions "
                                        f"({self._m / self._drafts:.2f} accepted tokens per draft)", a)

    def _collapse(self, step: int, detail: str, acceptance: float | None = None) -> str:
        action = DISABLE if self._rederived or self._failed_version == self.version else REDERIVE
        if action == DISABLE and self._rederived:
            self._failed_version = self.version
        self._collapsed = True
        self.counts["collapses"] += 1
        self.counts[action] += 1
        if action == DISABLE:
            self.state = "disabled"
        self.events.append({"step": step, "action": action, "reason": self.reason, "policy_version": self.version,
                            "acceptance": acceptance, "positions": self._n, "detail": detail})
        kind = WATCHDOG_DISABLE if action == DISABLE else WATCHDOG_REDERIVE
        self.pending.append(event(kind, f"{detail} (check after {self.reason}, policy v{self.version})"))
        return action

    def give_up(self, step: int, detail: str) -> str:
        """The requested re-derivation could not be done: speculation off until the next arm."""
        self._rederived = True
        return self._collapse(step, detail)

    def end_rollout(self, acceptance: float | None, positions: int) -> None:
        """A rollout finished: its acceptance sets the expectation if it was healthy and long enough."""
        if not self._collapsed and acceptance is not None and positions >= self.window:
            self.recent.append(float(acceptance))

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "expected": self.expected, "threshold": self.threshold, **self.counts,
                "events": list(self.events)}
