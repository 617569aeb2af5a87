"""The runtime controller: speculate or not (the toggle) and the draft length K.

Policies
--------
``static``      speculate iff B <= ``static_threshold``, with a fixed K (EfficientRollout style).
``cost_model``  (default) with B active rows, mean context L and the acceptance estimate a:

    G_ar    = B / T_ar(B, L)
    G_sd(K) = B * E(a, K) / T_sd(B, L, K),     E(a, K) = (1 - a^(K+1)) / (1 - a)
    K*      = argmax_{K in ladder} G_sd(K)
    want SD iff G_sd(K*) > (1 + margin) * G_ar

  and the committed mode flips only after ``hysteresis`` consecutive steps that want the other
  mode. Two refinements of that rule, both against flapping: the margin applies only to
  switching SD *on* (that is when the drafter catch-up is paid; staying on needs G_sd > G_ar),
  and staying on is judged optimistically, at a + ``stay_z`` * stderr(a): in AR mode no
  acceptance is observed, so an unlucky low estimate right after switching on would otherwise
  switch SD off and stay frozen there. The catch-up cost is not in the per-step comparison.

Exploration (``cost_model`` without a profile): the first ``warmup_cycles`` x (AR, 3 draft
lengths) steps are forced so both modes and the T-dependence of verify are sampled. Afterwards the
controller *probes* the mode it did not choose for a single step whenever the current (B, L) lies
in a cell of the log-grid (B cells a factor ``probe_ratio`` wide, L cells ``probe_ratio``^2 wide)
where that mode was never measured, at most once per ``probe_gap`` steps, and only if the model does
not predict that mode to lose by more than a factor ``probe_band``. So the model never
extrapolates far (a rollout whose batch drains 64 -> 1 costs about a dozen probe steps) and the
controller converges to the faster mode. With a profile, its fitted domain counts as measured:
no warm-up, no probes inside it (nor at contexts shorter than its shortest: every L term of the
cost model is linear), and its ``toggle.a`` (if any) is the acceptance prior.

Acceptance probes: acceptance is only observed while speculating, so a controller in AR mode
would never learn that a new drafter is better than its prior. While in AR, at most once per
``probe_gap`` steps, it drafts one step if SD would pay at an optimistic acceptance
a + ``explore_z`` * stderr(a) (upper-confidence exploration); each probe adds verified positions,
the stderr shrinks, and the probes stop wherever SD does not pay even optimistically.
Off by default (``explore_z=0``). With a drafter that keeps its own KV cache, a probe after a long
AR stretch pays the drafter catch-up of every row's missed tokens, which the per-step comparison
does not charge: in the GRPO run (experiments/README.md) probes found a 0.80-0.88 drafter behind a
0.61 prior and the rollouts got 1.33x slower. With the shared KV cache (the default for
self-derived drafters) there is no catch-up and the same run kept AR speed, but on fixed-batch runs
probes still cost up to 1.33x at B=2-4 (a probe drafts at the K that is best at the optimistic
acceptance, often the largest), so they stay off.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..engine.records import AR, Plan
from .acceptance import AcceptanceEstimator, expected_tokens
from .cost_model import CostModel, record_samples
from .profile import load_profile, validate_profile

POLICIES = ("cost_model", "static")


# A profile is trusted once this many live step-time samples agree with its prediction: for every sample
# kind seen PROFILE_MIN_KIND times, the median measured/predicted ratio within PROFILE_TOLERANCE either way.
# Otherwise it was made on other hardware (or another model build): stats() says so and its anchors' weight is
# cut, so this machine's samples decide within a few steps. (Scaling its blocks by the measured ratios did worse
# in tests/test_controller.py's simulation: a block not measured yet gets a wrong scale.) The acceptance prior
# stays: it belongs to the drafter, not the CPU.
PROFILE_CHECK_SAMPLES = 16
PROFILE_MIN_KIND = 3
PROFILE_TOLERANCE = 1.5
PROFILE_MISMATCH_WEIGHT = 4.0


def _check_ladder(k_ladder) -> tuple[int, ...]:
    try:
        ks = tuple(k_ladder)
    except TypeError:
        raise ValueError(f"k_ladder must be a sequence of ints >= 1, got {k_ladder!r}") from None
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"k_ladder must be a non-empty sequence of ints >= 1, got {k_ladder!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"k_ladder has duplicates: {k_ladder!r}")
    return tuple(sorted(int(k) for k in ks))


class Controller:
    def __init__(self, policy: str = "cost_model", k_ladder=tuple(range(1, 9)), profile=None,
                 margin: float = 0.05, hysteresis: int = 3, *, static_threshold: int | None = None,
                 static_k: int | None = None, acceptance: AcceptanceEstimator | None = None,
                 cost_model: CostModel | None = None, warmup_cycles: int = 3,
                 probe_ratio: float = 1.5, probe_gap: int = 8, stay_z: float = 1.0,
                 explore_z: float = 0.0, probe_band: float = 1.5) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown controller policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.k_ladder = _check_ladder(k_ladder)
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and 0 <= margin < 10):
            raise ValueError(f"margin must be a number in [0, 10), got {margin!r}")
        if not isinstance(hysteresis, int) or isinstance(hysteresis, bool) or hysteresis < 1:
            raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis!r}")
        if not (isinstance(probe_ratio, (int, float)) and probe_ratio > 1):
            raise ValueError(f"probe_ratio must be > 1, got {probe_ratio!r}")
        if int(warmup_cycles) < 1:
            raise ValueError(f"warmup_cycles must be >= 1, got {warmup_cycles!r}")
        self.margin, self.hysteresis = float(margin), hysteresis
        if not (isinstance(stay_z, (int, float)) and stay_z >= 0):
            raise ValueError(f"stay_z must be >= 0, got {stay_z!r}")
        self.probe_ratio, self.probe_gap, self.stay_z = float(probe_ratio), int(probe_gap), float(stay_z)
        if not (isinstance(explore_z, (int, float)) and explore_z >= 0):
            raise ValueError(f"explore_z must be >= 0, got {explore_z!r}")
        self.explore_z = float(explore_z)
        if not (isinstance(probe_band, (int, float)) and probe_band > 1):
            raise ValueError(f"probe_band must be > 1, got {probe_band!r}")
        self.probe_band = float(probe_band)

        if isinstance(profile, (str, Path)):
            profile = load_profile(profile)
        elif profile is not None:
            profile = validate_profile(profile)
        self.profile = profile
        toggle = profile["toggle"] if profile else {}

        a0 = toggle.get("a")  # the acceptance the profile was tuned at: a better prior than 0.7
        if acceptance is None:
            ok = isinstance(a0, (int, float)) and 0 <= a0 <= 1
            acceptance = AcceptanceEstimator(prior=a0) if ok else AcceptanceEstimator()
        self.acceptance = acceptance
        # where the acceptance prior comes from until reset_acceptance(prior=...) says otherwise
        self._base_prior_source = "profile" if (profile is not None and acceptance.prior == a0) else "default"
        self.prior_source, self.prior_value = self._base_prior_source, acceptance.prior
        if cost_model is not None:
            self.cost = cost_model
        elif profile is not None:
            self.cost = CostModel.from_dict(profile["cost_model"])
        else:
            self.cost = CostModel()
        self._domain = profile["cost_model"].get("domain") if profile else None
        # The profile's own prediction, frozen, to judge it by (the live model drifts toward the data).
        self._profile_model = (CostModel.from_dict(profile["cost_model"], prior_weight=0)
                               if profile is not None and cost_model is None and policy == "cost_model" else None)
        self._profile_ratios: dict[str, list[float]] = {}
        self.profile_check: dict = {"status": "checking" if self._profile_model is not None else
                                    ("none" if profile is None else "not checked"), "ratios": {}, "samples": 0}
        self._warmup_cycles = int(warmup_cycles)

        self.static_threshold = static_threshold if static_threshold is not None else toggle.get("batch_threshold", 16)
        self.static_k = static_k if static_k is not None else toggle.get("k", 4)
        if not isinstance(self.static_threshold, int) or self.static_threshold < 0:
            raise ValueError(f"static_threshold must be an int >= 0, got {self.static_threshold!r}")
        if not isinstance(self.static_k, int) or self.static_k < 1:
            raise ValueError(f"static_k must be an int >= 1, got {self.static_k!r}")

        lad = self.k_ladder
        self._warm_ks = sorted({lad[0], lad[len(lad) // 2], lad[-1]})
        self._warmup: list[int] = []
        if policy == "cost_model" and not self.cost.ready:
            self._warmup = ([0] + self._warm_ks) * int(warmup_cycles)
        self._spec: bool | None = None  # committed mode (None until the first decision)
        self._streak = 0
        self.k = lad[0]
        self._seen = {False: set(), True: set()}  # (B-cell, L-cell) where each mode was measured
        self._since_probe = 10**9
        self.last_ratio: float | None = None
        self._last_obs: dict[bool, tuple] = {}
        self._n_obs = 0
        self.counters = Counter()
        self.k_hist: Counter = Counter()

    # ------------------------------------------------------------------ decisions
    def goodput_ratio(self, B: float, L: float, shift: float = 0.0) -> tuple[int, float]:
        """(K*, G_sd(K*) / G_ar) at (B, L) under the current cost model and acceptance estimate
        (shifted by ``shift``)."""
        ks = np.array(self.k_ladder)
        t_sd = np.maximum(self.cost.predict_sd(B, L, ks), 1e-12)
        g_sd = self.acceptance.expected_tokens(ks, shift) / t_sd
        i = int(np.argmax(g_sd))
        return int(ks[i]), float(g_sd[i] * max(float(self.cost.predict_ar(B, L)), 1e-12))

    def _cell(self, B: float, L: float) -> tuple[int, int]:
        r = math.log(self.probe_ratio)
        return math.floor(math.log(max(B, 1)) / r), math.floor(math.log(max(L, 1)) / (2 * r))

    def _covered(self, spec: bool, B: float, L: float) -> bool:
        d, r = self._domain, self.probe_ratio
        # Below the profile's shortest context counts as covered: every L term is linear (B*L, B*T*L),
        # so shorter contexts only move predictions toward the well-measured intercepts. Probing there
        # cost 5% of short fixed-batch runs (one SD step at B=32 to "measure" L=37 < 64/1.5).
        if d and d["B"][0] / r <= B <= d["B"][1] * r and L <= d["L"][1] * r:
            return True
        return self._cell(B, L) in self._seen[spec]

    def _plan_cost_model(self, B: int, L: float) -> tuple[int, str]:
        if self._warmup:
            return self._warmup.pop(0), "warmup"
        if not self.cost.ready:  # e.g. the engine never reported an SD step: keep sampling
            self._warmup = [0] + self._warm_ks
            return self._warmup.pop(0), "warmup"
        self.k, ratio = self.goodput_ratio(B, L)
        self.last_ratio = ratio
        if self._spec:  # stay on unless SD loses even at an optimistic acceptance
            want = ratio > 1.0 or self.goodput_ratio(B, L, self.stay_z * self.acceptance.stderr)[1] > 1.0
        else:
            want = ratio > 1.0 + self.margin
        if self._spec is None:
            self._spec = want
        elif want != self._spec:
            self._streak += 1
            if self._streak >= self.hysteresis:
                self._spec, self._streak = want, 0
                self.counters["toggles"] += 1
        else:
            self._streak = 0
        self._since_probe += 1
        other = not self._spec
        # Probing the other mode only pays where the prediction could be wrong about the sign: not when
        # it is predicted to lose by more than probe_band (SD at B=64 here: 0.56x predicted, 0.55x
        # measured; each probe step cost ~2 AR steps).
        plausible = ratio > 1.0 / self.probe_band if other else ratio < self.probe_band
        if self._since_probe >= self.probe_gap and plausible and not self._covered(other, B, L):
            self._since_probe = 0
            return (self.k if other else 0), "probe"
        if not self._spec and self.explore_z > 0 and self._since_probe >= self.probe_gap:
            # Acceptance is only observed while speculating: if SD would pay at an optimistic
            # acceptance (a + z * stderr), draft one step to learn a. As positions accumulate the
            # stderr shrinks and these probes stop where SD does not pay.
            k_opt, r_opt = self.goodput_ratio(B, L, self.explore_z * self.acceptance.stderr)
            if r_opt > 1.0 + self.margin:
                self._since_probe = 0
                self.counters["acceptance_probe_steps"] += 1
                return k_opt, "probe"
        return (self.k if self._spec else 0), "decision"

    def plan(self, view) -> Plan:
        """Plan the next step for ``view`` (a BatchView)."""
        B = view.batch_size
        if B == 0 or not view.has_drafter:
            k, why = 0, "no_drafter" if B else "empty"
        elif self.policy == "static":
            spec = B <= self.static_threshold
            self.counters["toggles"] += self._spec is not None and spec != self._spec
            self._spec, self.k = spec, self.static_k
            k, why = (self.static_k if spec else 0), "static"
        else:
            k, why = self._plan_cost_model(B, max(view.mean_context_len, 1.0))
        self.counters["steps"] += 1
        self.counters["speculative_steps"] += k > 0
        self.counters[f"{why}_steps"] += 1
        self.k_hist[k] += 1
        return AR if k == 0 else Plan(k)

    # ------------------------------------------------------------------ feedback
    def observe(self, record) -> None:
        """Feed back a StepRecord: acceptance, cost model, coverage, sign accuracy."""
        B = record.batch_size
        if B == 0 or not record.seconds > 0:
            return
        spec, L = record.speculative, max(record.mean_context_len, 1.0)
        self._assess_sign(record, spec, B, L)
        self.acceptance.observe(record)
        self.cost.observe(record)
        if self._profile_model is not None:
            self._check_profile(record)
        self._seen[spec].add(self._cell(B, L))

    def _assess_sign(self, record, spec: bool, B: int, L: float) -> None:
        """Compare measured goodput (tokens/s) of a step with the latest step of the other mode at
        the same B (within 8 steps) against the model's predicted sign for that pair."""
        self._n_obs += 1
        k = record.max_k
        other = self._last_obs.get(not spec)
        self._last_obs[spec] = (self._n_obs, B, record.tokens / record.seconds, k)
        if other is None or other[1] != B or self._n_obs - other[0] > 8 or not self.cost.ready:
            return
        g_sd, g_ar, k_sd = ((self._last_obs[spec][2], other[2], k) if spec
                            else (other[2], self._last_obs[spec][2], other[3]))
        t_sd = float(self.cost.predict_sd(B, L, k_sd))
        pred = self.acceptance.expected_tokens(k_sd) / t_sd > 1.0 / float(self.cost.predict_ar(B, L))
        self.counters["sign_assessed"] += 1
        self.counters["sign_correct"] += pred == (g_sd > g_ar)

    def _check_profile(self, record) -> None:
        """Compare live step times with the profile's prediction; trust live samples when they disagree."""
        for smp in record_samples(record):
            pred = self._profile_model.predict(smp)
            if pred > 0:
                self._profile_ratios.setdefault(smp.kind, []).append(smp.y / pred)
        n = sum(len(v) for v in self._profile_ratios.values())
        if n < PROFILE_CHECK_SAMPLES:
            return
        ratios = {k: float(np.median(v)) for k, v in self._profile_ratios.items() if len(v) >= PROFILE_MIN_KIND}
        off = {k: r for k, r in ratios.items() if not 1 / PROFILE_TOLERANCE <= r <= PROFILE_TOLERANCE}
        self.profile_check = {"ratios": {k: round(r, 3) for k, r in ratios.items()}, "samples": n}
        profile_model, self._profile_model = self._profile_model, None  # decided once per controller
        if not off:
            self.profile_check["status"] = "in use"
            return
        # Trust this machine's samples over the profile's: its anchors keep a small weight (they still fill
        # the cells not measured yet) and live samples outweigh them within a few steps.
        d = profile_model.to_dict()
        d["domain"] = self._domain
        live = CostModel.from_dict(d, prior_weight=PROFILE_MISMATCH_WEIGHT)
        live.add_samples(self.cost.samples)
        live.fit()
        self.cost = live
        kind, r = max(off.items(), key=lambda kr: abs(math.log(kr[1])))
        self.profile_check["status"] = (f"mismatch: {kind} steps took {r:.2f}x its prediction (tolerance "
                                        f"{PROFILE_TOLERANCE}x); its prior weight cut to {PROFILE_MISMATCH_WEIGHT:g} samples")
        self.counters["profile_mismatch"] += 1

    def reset_acceptance(self, prior: float | None = None, source: str = "given") -> None:
        """Call after update_policy: the drafter changed, so forget its acceptance history. ``prior``:
        restart from this acceptance (e.g. the new drafter's teacher-forced score, ``source="scored"``)
        instead of the estimator's own prior."""
        if prior is not None and not (isinstance(prior, (int, float)) and 0.0 <= prior <= 1.0):
            raise ValueError(f"acceptance prior must be a number in [0, 1], got {prior!r}")
        self.acceptance.reset(prior)
        if prior is None:
            self.prior_source, self.prior_value = self._base_prior_source, self.acceptance.prior
        else:
            self.prior_source, self.prior_value = source, float(prior)

    def stats(self) -> dict:
        c = self.counters
        n = c["sign_assessed"]
        return {
            "policy": self.policy,
            "steps": c["steps"],
            "speculative_steps": c["speculative_steps"],
            "warmup_steps": c["warmup_steps"],
            "probe_steps": c["probe_steps"],
            "acceptance_probe_steps": c["acceptance_probe_steps"],
            "toggles": c["toggles"],
            "mode": None if self._spec is None else ("sd" if self._spec else "ar"),
            "k": self.k,
            "k_hist": dict(sorted(self.k_hist.items())),
            "acceptance": self.acceptance.rate,
            "acceptance_prior": self.prior_value,
            "acceptance_prior_source": self.prior_source,
            "mean_accepted_per_draft": self.acceptance.mean_accepted_per_draft,
            "last_goodput_ratio": self.last_ratio,
            "sign_accuracy": c["sign_correct"] / n if n else None,
            "sign_assessed": n,
            "cost_model_mape": self.cost.mape() if self.cost.n_live else None,
            "cost_model_ready": self.cost.ready,
            "profile_check": dict(self.profile_check),
        }


def toggle_table(cost: CostModel, a: float, L: float, k_ladder=tuple(range(1, 9)),
                 batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256), margin: float = 0.0) -> dict:
    """Summarise a cost model for a profile's ``toggle`` section at acceptance ``a``, context ``L``:
    ``k_by_batch`` = K* per batch size (0 = AR faster; the shape of vLLM's
    num_speculative_tokens_per_batch_size), ``threshold_by_k`` = largest listed B where SD at that
    K beats AR, and a static (batch_threshold, k) pair for the ``static`` policy."""
    ks = np.array(_check_ladder(k_ladder))
    E = expected_tokens(a, ks)
    k_by_batch, thr = {}, {int(k): 0 for k in ks}
    for B in batch_sizes:
        ratio = E / cost.predict_sd(B, L, ks) * float(cost.predict_ar(B, L))
        i = int(np.argmax(ratio))
        k_by_batch[str(B)] = int(ks[i]) if ratio[i] > 1 + margin else 0
        for k, r in zip(ks, ratio):
            if r > 1 + margin:
                thr[int(k)] = int(B)
    on = [int(b) for b, k in k_by_batch.items() if k > 0]
    return {"a": float(a), "L": float(L), "k_by_batch": k_by_batch, "threshold_by_k": {str(k): b for k, b in thr.items()},
            "batch_threshold": max(on, default=0), "k": k_by_batch[str(batch_sizes[0])] or int(ks[0])}
