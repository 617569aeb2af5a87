"""``AdaptiveSpecRollout``: wrap a rollout function so its generation runs AR, fixed-K speculative, or adaptive.

``AdaptiveSpecRollout(rollout_fn, llm=llm)`` returns a callable with ``rollout_fn``'s signature and return
value. ``rollout_fn`` generates through ``llm`` (by closure, or as an argument the caller passes); for the
duration of each call the wrapper holds an ``llm.session`` with its planner (``ar``: K=0 always; ``sd``:
fixed K; ``adaptive``: the runtime controller) and its step listener, and collects one telemetry entry.
``rollout_fn=None`` makes the wrapper call ``llm.generate`` directly. ``update_policy(weights)`` reloads the
target in place and re-derives the INT4 drafter from the new weights. Scale-out (``workers=N``) is the same
class at ``effroll.AdaptiveSpecRollout`` (``effroll.dist.front``).

Health checks: ``watchdog=True`` (default; a dict passes options to ``control.watchdog.Watchdog``) checks
the first speculative steps after every ``update_policy`` and at the start of every rollout; a collapsed
acceptance re-derives the drafter from the current weights once, and if that does not help, speculation is
off for the rest of the rollout (one warning, a ``watchdog_disable`` event). ``audit=True`` (opt-in; a dict
passes options to ``checks.audit.LosslessAudit``) runs the online lossless audit. Both show up in
``stats()``, in each history entry (``events``, ``guard_s``) and in the JSONL trace (``events``).
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from .checks.audit import LosslessAudit, LosslessAuditError
from .control import Controller
from .control.watchdog import DISABLE, REDERIVE, Watchdog
from .engine.model import Transformer
from .engine.records import AUDIT_FAILED, BatchView, Plan, StepRecord, event
from .llm import LLM, profile_for
from .once import warn_once
from .telemetry import summarize_steps

MODES = ("ar", "sd", "adaptive")


def check_wrapper_args(rollout_fn: Any, mode: Any, k: Any) -> None:
    """The arguments every AdaptiveSpecRollout checks first (local or pooled)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if rollout_fn is not None and not callable(rollout_fn):
        raise TypeError(f"rollout_fn must be callable, got {type(rollout_fn).__name__}")


def _options(name: str, value: Any) -> dict[str, Any]:
    """``True`` (defaults) or a mapping of keyword arguments for the watchdog / audit."""
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{name} must be True, False or a dict of options, got {value!r}")


class AdaptiveSpecRollout:
    """Wrap a rollout function so its generation runs AR, fixed-K speculative, or adaptive."""

    def __init__(
        self,
        rollout_fn: Callable[..., Any] | None = None,
        *,
        llm: LLM | None = None,
        model: str | Path | Transformer | None = None,
        mode: str = "adaptive",
        k: int = 4,
        policy: str = "cost_model",
        profile: str | Path | dict | None = "auto",
        recipe: str | None = "rtn-sym-g64",
        trace: str | Path | None = None,
        controller_kwargs: Mapping[str, Any] | None = None,
        watchdog: bool | Mapping[str, Any] = True,
        audit: bool | Mapping[str, Any] = False,
        score_drafter: bool = True,
        **llm_kwargs: Any,
    ):
        check_wrapper_args(rollout_fn, mode, k)
        if llm is None:
            if model is None:
                raise ValueError("AdaptiveSpecRollout needs llm= (an effroll.LLM) or model= (a checkpoint path)")
            llm = LLM(model, recipe=recipe, **llm_kwargs)
        self.rollout_fn = rollout_fn
        self.llm = llm
        self.mode = mode
        self.k = min(k, llm.engine.kmax)
        self.profile_path, profile = profile_for(profile, llm.model)
        self.controller = Controller(policy=policy, profile=profile, **dict(controller_kwargs or {}))
        # Health checks (control/watchdog.py, checks/audit.py): watchdog on by default, audit opt-in.
        self.watchdog = Watchdog(**_options("watchdog", watchdog)) if watchdog is not False else None
        self.audit = LosslessAudit(**_options("audit", audit)) if audit is not False else None
        self.guard_s = {"watchdog": 0.0, "audit": 0.0}  # seconds spent in the checks (overhead)
        self._told_profile = False  # warned once that the profile does not fit this machine
        self.score_drafter = bool(score_drafter)
        self.score_s = 0.0  # seconds spent scoring drafters for the acceptance prior
        self._warned: set[str] = set()
        self.trace_path = Path(trace) if trace else None
        self.history: list[dict[str, Any]] = []
        self._records: list[StepRecord] = []
        self._trace = None
        if rollout_fn is not None:
            functools.update_wrapper(self, rollout_fn)

    def _planner(self) -> Plan | Callable[[BatchView], Plan]:
        if self.mode == "ar":
            return Plan(0)
        base = Plan(self.k) if self.mode == "sd" else self.controller.plan

        def plan(view: BatchView) -> Plan:
            if (self.watchdog is not None and self.watchdog.disabled) or (self.audit is not None and self.audit.failed):
                return Plan(0)
            p = base if isinstance(base, Plan) else base(view)
            if self.audit is not None and p.speculative:
                t0 = time.perf_counter()
                p = self.audit.assign(view, p)
                self.guard_s["audit"] += time.perf_counter() - t0
            return p

        return plan

    def _check(self, rec: StepRecord) -> None:
        """Watchdog and audit after one step; their events go into the step record (and so the trace)."""
        wd, au = self.watchdog, self.audit
        t0 = time.perf_counter()
        if wd is not None and self.mode != "ar":
            action = wd.observe(rec)
            if action == REDERIVE:
                if self.llm.rederive_drafter():
                    wd.rederived(self.llm.version)
                    self.controller.reset_acceptance()
                else:
                    action = wd.give_up(rec.step, f"re-derivation failed: {self.llm.drafter_error}")
            if action == DISABLE:
                self._warn("watchdog", f"effroll watchdog: drafter acceptance collapsed and re-deriving it from "
                                       f"the current policy did not restore it ({wd.events[-1]['detail']}); "
                                       f"speculation is off for the rest of this rollout")
            rec.events.extend(wd.pending)
            wd.pending.clear()
        t1 = time.perf_counter()
        if au is not None and self.mode != "ar":
            msg = au.observe(rec, self.llm.engine)
            if msg is not None:
                rec.events.append(event(AUDIT_FAILED, f"{msg}; speculation is off"))
                if au.on_failure == "ar":
                    self._warn("audit", f"effroll lossless audit failed: {msg}; falling back to AR decoding")
        t2 = time.perf_counter()
        self.guard_s["watchdog"] += t1 - t0
        self.guard_s["audit"] += t2 - t1

    def _warn(self, kind: str, message: str) -> None:
        warn_once(kind, message, self._warned)  # one warning per kind and rollout

    def _on_step(self, rec: StepRecord) -> None:
        self._records.append(rec)
        if self.mode == "adaptive":
            self.controller.observe(rec)
        self._check(rec)
        if self._trace is not None:
            d = rec.to_dict()
            d.update(rollout=len(self.history), mode=self.mode)
            self._trace.write(json.dumps(d) + "\n")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.llm.session(self._planner(), self._on_step):  # calls from several threads queue up here
            return self._rollout(*args, **kwargs)

    def _rollout(self, *args: Any, **kwargs: Any) -> Any:
        llm = self.llm
        self._records = []
        self._warned = set()
        if self.watchdog is not None:
            self.watchdog.arm("rollout start", llm.version)
        if self.audit is not None:
            self.audit.start_rollout()
        audit_failed = self.audit is not None and self.audit.failed
        if self.mode == "adaptive" and self.score_drafter and self.controller.acceptance.verified == 0:
            # Nothing observed since the drafter changed: start from its teacher-forced score on the
            # latest rollouts instead of the profile's prior (in AR the controller never observes a).
            ts = time.perf_counter()
            try:
                a = llm.acceptance_estimate()
            except Exception as e:  # noqa: BLE001 - a failed estimate must not cost the rollout
                a = None
                self._warn("score", f"effroll: scoring the drafter failed ({type(e).__name__}: {e}); "
                                    "the controller keeps its prior acceptance")
            if a is not None:
                self.controller.reset_acceptance(prior=a, source="scored")
            self.score_s += time.perf_counter() - ts
        guard0 = dict(self.guard_s)
        self._trace = open(self.trace_path, "a") if self.trace_path else None
        t0 = time.perf_counter()
        try:
            fn = self.rollout_fn or llm.generate
            result = fn(*args, **kwargs)
        finally:
            wall = time.perf_counter() - t0
            if self._trace is not None:
                self._trace.close()
                self._trace = None
        entry = summarize_steps(self._records, llm.engine.kmax)
        entry.update(mode=self.mode, wall_s=wall, tok_per_s=entry["tokens"] / wall if wall > 0 else 0.0,
                     policy_version=llm.version,
                     events=[e for r in self._records for e in r.events],
                     guard_s={k: v - guard0[k] for k, v in self.guard_s.items()})
        if self.watchdog is not None:
            self.watchdog.end_rollout(entry["acceptance"], entry["verified_positions"])
        self.history.append(entry)
        check = self.controller.profile_check
        if check.get("status", "").startswith("mismatch") and not self._told_profile:
            self._told_profile = True  # the profile's status stays in stats()["controller"]
            warnings.warn(f"effroll: controller profile {self.profile_path or '(given)'} does not fit this machine: "
                          f"{check['status']}; re-run `effroll tune` here", RuntimeWarning, stacklevel=2)
        if self.audit is not None and self.audit.failed and not audit_failed and self.audit.on_failure == "raise":
            raise LosslessAuditError(f"effroll lossless audit failed: {self.audit.failure}; the rollout finished in "
                                     f"AR after the detection (its result is in .result) and speculation stays off",
                                     result=result, stats=self.stats())
        return result

    def update_policy(self, weights_or_path: Any, *, keep_drafter: bool = False) -> float:
        """Reload the policy, re-derive the drafter (``keep_drafter=True``: keep the old one, see
        ``LLM.update_policy``), reset acceptance estimates; returns refresh seconds."""
        s = self.llm.update_policy(weights_or_path, keep_drafter=keep_drafter)
        self.controller.reset_acceptance()
        if self.watchdog is not None:
            self.watchdog.arm("update_policy", self.llm.version)
        return s

    def stats(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "mode": self.mode,
            "policy_version": self.llm.version,
            "rollouts": len(self.history),
            "last": last,
            "history": list(self.history),
            "refresh_s": list(self.llm.refresh_s),
            "drafter_error": self.llm.drafter_error,
            "controller": self.controller.stats(),
            "profile": self.profile_path,
            "watchdog": self.watchdog.stats() if self.watchdog is not None else None,
            "audit": self.audit.stats() if self.audit is not None else None,
            "guard_s": dict(self.guard_s),
            "score_s": self.score_s,
            # prompt tokens computed vs asked for, over all rollouts (shared prompt prefixes are copied)
            "prefill_tokens": {"computed": sum(h.get("prefill_tokens", 0) for h in self.history),
                               "requested": sum(h.get("prefill_requested", 0) for h in self.history)},
        }
