"""Online estimate of the drafter's per-token acceptance rate ``a``.

Model: each drafted position is accepted independently with probability ``a``
(the usual speculative-decoding assumption). A row drafted ``k`` tokens and got
``acc`` accepted, so positions ``1..acc`` were accepted and, if ``acc < k``,
position ``acc+1`` was rejected; later positions were never verified. The MLE of
``a`` is then ``sum(accepted) / sum(verified)``; we keep an exponentially
weighted version of it over verified positions (half-life in positions), seeded
with a prior of ``prior_weight`` pseudo-positions at rate ``prior``.

Step changes (a new drafter, a different kind of prompt) are caught by a second, fast EWMA
(half-life ``fast_half_life``): when the two differ by more than ``change_z`` standard errors,

    |a_fast - a_slow| > z * sqrt(p (1 - p) (1 / n_fast + 1 / n_slow)),   p = a_slow,

the slow estimate restarts from the fast one (n = (sum w)^2 / sum w^2, the EWMA's effective
number of positions). So the estimate is smooth in steady state and still follows a jump within a few dozen
verified positions.

Expected tokens emitted per row per speculative step with draft length K
(accepted drafts plus the one corrected/bonus token):

    E(a, K) = sum_{j=0..K} a^j = (1 - a^(K+1)) / (1 - a)        (K + 1 when a = 1)

With ``per_position=True`` the estimator also uses a_j, the acceptance at draft
position j given position j was reached (shrunk towards the global ``a`` with
``prior_weight`` pseudo-counts), and E becomes

    E(K) = 1 + sum_{j=1..K} prod_{i=1..j} a_i.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from ..engine.records import verified_positions


def expected_tokens(a: float, k):
    """E(a, K) = (1 - a^(K+1)) / (1 - a); K may be an int or an array of ints."""
    kk = np.asarray(k, dtype=float)
    a = min(max(float(a), 0.0), 1.0)
    if 1.0 - a < 1e-9:
        out = kk + 1.0
    else:
        out = (1.0 - a ** (kk + 1.0)) / (1.0 - a)
    return float(out) if out.ndim == 0 else out


class AcceptanceEstimator:
    """EWMA acceptance rate over verified draft positions (see module docstring)."""

    def __init__(self, prior: float = 0.7, prior_weight: float = 8.0, half_life: float = 128.0,
                 per_position: bool = False, max_position: int = 16, fast_half_life: float = 16.0,
                 change_z: float | None = 4.0) -> None:
        if not (0.0 <= prior <= 1.0):
            raise ValueError(f"acceptance prior must be in [0, 1], got {prior!r}")
        if not (prior_weight > 0 and math.isfinite(prior_weight)):
            raise ValueError(f"acceptance prior_weight must be > 0, got {prior_weight!r}")
        if not (half_life > 0 and math.isfinite(half_life)):
            raise ValueError(f"acceptance half_life must be > 0 positions, got {half_life!r}")
        if not (fast_half_life > 0 and math.isfinite(fast_half_life)):
            raise ValueError(f"acceptance fast_half_life must be > 0 positions, got {fast_half_life!r}")
        if int(max_position) < 1:
            raise ValueError(f"max_position must be >= 1, got {max_position!r}")
        self.prior, self.prior_weight, self.half_life = float(prior), float(prior_weight), float(half_life)
        self.per_position, self.max_position = bool(per_position), int(max_position)
        self.decay = 0.5 ** (1.0 / self.half_life)  # weight kept per newer verified position
        self.fast_decay = 0.5 ** (1.0 / float(fast_half_life))
        self.change_z = change_z
        self.changes = 0  # step changes detected since construction
        self.reset()

    def reset(self, prior: float | None = None) -> None:
        """Forget everything (call after a policy update); restart from the prior."""
        p = self.prior if prior is None else float(prior)
        self._s, self._w = p * self.prior_weight, self.prior_weight  # weighted accepts / positions
        self._w2 = self.prior_weight ** 2  # sum of squared weights (effective sample size)
        self._fs, self._fw, self._fw2 = self._s, self._w, self._w2  # the fast EWMA
        self._ps = np.zeros(self.max_position)  # per-position weighted accepts
        self._pw = np.zeros(self.max_position)  # per-position weighted verifications
        self.drafts = self.drafted = self.accepted = self.verified = 0  # plain counts since reset

    def update(self, k: Iterable[int], accepted: Iterable[int]) -> None:
        """Add one step's rows: row i drafted k[i] tokens and had accepted[i] of them accepted."""
        reached = np.zeros(self.max_position)
        accepts = np.zeros(self.max_position)
        n_acc = n_ver = 0
        for kk, acc in zip(k, accepted):
            kk = int(kk)
            if kk <= 0:
                continue
            acc = min(max(int(acc), 0), kk)
            n = verified_positions(kk, acc)
            n_acc, n_ver = n_acc + acc, n_ver + n
            self.drafts, self.drafted = self.drafts + 1, self.drafted + kk
            reached[: min(n, self.max_position)] += 1
            accepts[: min(acc, self.max_position)] += 1
        if n_ver == 0:
            return
        self.accepted, self.verified = self.accepted + n_acc, self.verified + n_ver
        d, fd = self.decay ** n_ver, self.fast_decay ** n_ver
        self._s, self._w, self._w2 = d * self._s + n_acc, d * self._w + n_ver, d * d * self._w2 + n_ver
        self._fs, self._fw, self._fw2 = fd * self._fs + n_acc, fd * self._fw + n_ver, fd * fd * self._fw2 + n_ver
        dp = self.decay ** reached
        self._ps, self._pw = dp * self._ps + accepts, dp * self._pw + reached
        if self.change_z is not None:
            p = min(max(self.rate, 0.02), 0.98)
            se = math.sqrt(p * (1 - p) * (self._fw2 / self._fw ** 2 + self._w2 / self._w ** 2))
            if abs(self._fs / self._fw - self.rate) > self.change_z * se:
                self._s, self._w, self._w2 = self._fs, self._fw, self._fw2
                self._ps[:], self._pw[:] = 0.0, 0.0
                self.changes += 1

    def observe(self, record) -> None:
        """Update from a StepRecord (uses ``record.k`` and ``record.accepted``)."""
        self.update(record.k, record.accepted)

    @property
    def rate(self) -> float:
        """Current estimate of a."""
        return self._s / self._w

    @property
    def n_eff(self) -> float:
        """Effective number of positions behind ``rate``: (sum w)^2 / sum w^2."""
        return self._w ** 2 / self._w2

    @property
    def stderr(self) -> float:
        """Standard error of ``rate``: sqrt(a (1 - a) / n_eff)."""
        a = min(max(self.rate, 0.02), 0.98)
        return math.sqrt(a * (1 - a) / self.n_eff)

    def position_rates(self) -> np.ndarray:
        """a_j for draft positions j = 1..max_position, shrunk towards the global rate."""
        m = self.prior_weight
        return (self._ps + m * self.rate) / (self._pw + m)

    def expected_tokens(self, k, shift: float = 0.0):
        """E(a, K) (closed form), or the per-position product form if ``per_position``.
        ``shift`` adds a constant to every rate (clipped to [0, 1]), e.g. ``z * stderr``."""
        if not self.per_position:
            return expected_tokens(self.rate + shift, k)
        a = np.clip(self.position_rates() + shift, 0.0, 1.0)
        kk = np.asarray(k, dtype=int)
        tail = np.concatenate([a, np.full(max(int(kk.max(initial=0)) - len(a), 0), min(max(self.rate + shift, 0.0), 1.0))])
        cum = np.concatenate([[1.0], np.cumprod(tail)])  # cum[j] = P(position j accepted)
        out = np.cumsum(cum)[kk]
        return float(out) if out.ndim == 0 else out

    @property
    def mean_accepted_per_draft(self) -> float:
        """Accepted tokens per drafting row since the last reset (0 before any draft)."""
        return self.accepted / self.drafts if self.drafts else 0.0

    def stats(self) -> dict:
        return {"rate": self.rate, "stderr": self.stderr, "mean_accepted_per_draft": self.mean_accepted_per_draft,
                "drafts": self.drafts, "drafted": self.drafted, "accepted": self.accepted,
                "verified": self.verified, "changes": self.changes}
