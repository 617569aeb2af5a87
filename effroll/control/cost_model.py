"""Step-time model for memory-bound decode: T_ar, T_draft, T_verify, catch-up.

Notation: B rows, L mean context length, T tokens per row in one target forward,
K draft length. In decode a forward reads all weights once (constant), reads the
KV cache (~ B*L), and computes ~ B*T tokens of MLP and ~ B*T*L of attention, so
each time is linear in a few features (all coefficients >= 0):

    T_ar(B, L)        = c . [1, B, B*L]                       (whole AR step)
    T_draft(B, L)     = d . [1, B, B*L]                       (one drafter forward, 1 token/row)
    T_catchup(n)      = u . [n, n > 0]                        (drafter prefill of n missed tokens)
    T_verify(B, L, T) = v . [1, B*T, B*L, B*T*L]              (target forward, T tokens/row,
                                                               + sampling/acceptance overhead)
    T_sd(B, L, K)     = K * T_draft(B, L) + T_verify(B, L, K + 1) + T_catchup(n)

Fit: one non-negative least-squares problem (scikit-learn ``LinearRegression(positive=True)``)
over the stacked coefficient vector [c | d, u | v], with each sample weighted by 1/t^2 (t: the
previous fit's prediction, y on the first fit) so the loss is squared *relative* error (what
MAPE and goodput ratios care about) without biasing the fit low under multiplicative noise.
Columns are scaled to unit max before solving. An SD record gives a draft sample (``draft_s`` = K*T_draft +
T_catchup) and a verify sample (``seconds - draft_s``: verify plus sampling overhead, so that
T_ar and T_sd both model whole-step seconds); without a ``draft_s`` breakdown it gives one joint
sample of ``seconds`` against both blocks. Rows with different K in one step: the drafter runs
max(K) forwards and the verifier pads to max(K)+1 tokens, so we use K = max(k).

Online refinement keeps a sliding window of live samples (plus optional "anchor" samples
regenerated from a loaded profile, which act as a prior outside the live data range) and refits
every ``refit_every`` new samples (a 12-column NNLS over <= ``window`` rows: a few ms).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from sklearn.linear_model import LinearRegression

FEATURES = {
    "ar": ("1", "B", "B*L"),
    "draft": ("K", "K*B", "K*B*L", "catchup_tokens", "catchup>0"),
    "verify": ("1", "B*T", "B*L", "B*T*L"),
}
_SLICES, _o = {}, 0
for _name, _f in FEATURES.items():
    _SLICES[_name] = slice(_o, _o + len(_f))
    _o += len(_f)
N_COEF = _o
KINDS = ("ar", "draft", "verify", "sd")
FORMAT = "effroll.linear-nnls.v1"


def _ar_x(B, L):
    return np.array([1.0, B, B * L])


def _draft_x(B, L, K, catchup=0):
    return np.array([K, K * B, K * B * L, catchup, 1.0 if catchup > 0 else 0.0])


def _verify_x(B, L, T):
    return np.array([1.0, B * T, B * L, B * T * L])


class Sample(NamedTuple):
    kind: str        # "ar" | "draft" | "verify" | "sd" (joint draft+verify, no breakdown)
    x: np.ndarray    # full-width feature row (N_COEF,), zero outside its blocks
    y: float         # seconds
    w: float = 1.0   # extra weight (anchors < 1)
    B: float = 0.0
    L: float = 0.0
    K: int = 0


def _row(**blocks) -> np.ndarray:
    x = np.zeros(N_COEF)
    for name, v in blocks.items():
        x[_SLICES[name]] = v
    return x


def make_sample(kind: str, B: float, L: float, K: int, seconds: float, catchup_tokens: int = 0) -> Sample:
    """One measurement: kind "ar" (K = 0), "draft" (K forwards + catch-up), "verify" (T = K + 1)
    or "sd" (a whole SD step: draft + verify)."""
    if kind == "ar":
        x = _row(ar=_ar_x(B, L))
    elif kind == "draft":
        x = _row(draft=_draft_x(B, L, K, catchup_tokens))
    elif kind == "verify":
        x = _row(verify=_verify_x(B, L, K + 1))
    elif kind == "sd":
        x = _row(draft=_draft_x(B, L, K, catchup_tokens), verify=_verify_x(B, L, K + 1))
    else:
        raise ValueError(f"unknown sample kind {kind!r}")
    return Sample(kind, x, float(seconds), 1.0, float(B), float(L), int(K))


def record_samples(record) -> list[Sample]:
    """Samples from a StepRecord. AR step: one "ar" sample of ``seconds``. SD step (K = max k over
    rows): a "draft" sample of ``draft_s`` (with ``catchup_tokens``) and a "verify" sample of
    ``seconds - draft_s``; one joint "sd" sample of ``seconds`` if there is no draft_s breakdown."""
    B, secs = record.batch_size, float(record.seconds)
    if B == 0 or not secs > 0:
        return []
    L, K, d = record.mean_context_len, record.max_k, float(record.draft_s)
    if K == 0:
        return [make_sample("ar", B, L, 0, secs)]
    if 0 < d < secs:
        return [make_sample("draft", B, L, K, d, record.catchup_tokens),
                make_sample("verify", B, L, K, secs - d)]
    return [make_sample("sd", B, L, K, secs, record.catchup_tokens)]


class CostModel:
    """Linear step-time model fitted by NNLS on relative error (see module docstring)."""

    def __init__(self, window: int = 4096, refit_every: int = 16, min_samples: int = 3) -> None:
        if int(window) < 8:
            raise ValueError(f"window must be >= 8 samples, got {window!r}")
        if int(refit_every) < 1:
            raise ValueError(f"refit_every must be >= 1, got {refit_every!r}")
        self.window, self.refit_every, self.min_samples = int(window), int(refit_every), int(min_samples)
        # live samples: a ring buffer of feature rows, seconds and (kind, B, L, K)
        self._X = np.zeros((self.window, N_COEF))
        self._y = np.zeros(self.window)
        self._meta = np.zeros((self.window, 4))
        self._n = 0
        self._counts = dict.fromkeys(KINDS, 0)
        self.anchors: list[Sample] = []  # prior samples from a profile
        self.coef = np.zeros(N_COEF)
        self.fitted = False
        self._pending = 0
        self.n_fits = 0

    # ---------------------------------------------------------------- samples
    def add_ar(self, B: float, L: float, seconds: float) -> None:
        """``seconds`` of one whole AR step."""
        self._add(make_sample("ar", B, L, 0, seconds))

    def add_draft(self, B: float, L: float, K: int, seconds: float, catchup_tokens: int = 0) -> None:
        """``seconds`` of K drafter forwards (+ catch-up of ``catchup_tokens`` missed tokens)."""
        self._add(make_sample("draft", B, L, K, seconds, catchup_tokens))

    def add_verify(self, B: float, L: float, T: int, seconds: float) -> None:
        """``seconds`` of one target forward over B rows x T tokens (T = K + 1)."""
        self._add(make_sample("verify", B, L, T - 1, seconds))

    def add_samples(self, samples) -> None:
        """Add measured samples without refitting (e.g. a whole `effroll tune` sweep; call ``fit()`` after)."""
        for smp in samples:
            self._add(smp)

    def _add(self, s: Sample) -> None:
        if not (s.y > 0 and math.isfinite(s.y) and s.B > 0):
            return
        i = self._n % self.window
        if self._n >= self.window:
            self._counts[KINDS[int(self._meta[i, 0])]] -= 1
        self._X[i], self._y[i], self._meta[i] = s.x, s.y, (KINDS.index(s.kind), s.B, s.L, s.K)
        self._counts[s.kind] += 1
        self._n += 1
        self._pending += 1

    @property
    def n_live(self) -> int:
        return min(self._n, self.window)

    @property
    def samples(self) -> list[Sample]:
        """The live window as Sample tuples (oldest first is not guaranteed)."""
        n = self.n_live
        return [Sample(KINDS[int(m[0])], x, float(y), 1.0, m[1], m[2], int(m[3]))
                for x, y, m in zip(self._X[:n], self._y[:n], self._meta[:n])]

    def observe(self, record) -> None:
        """Add the samples of a live StepRecord (see ``record_samples``) and refit if due."""
        self.add_samples(record_samples(record))
        if self._pending >= self.refit_every or (self._pending and not self.ready):
            self.fit()

    # ---------------------------------------------------------------- fitting
    def counts(self) -> dict:
        """Live samples per kind."""
        return dict(self._counts)

    @property
    def ready(self) -> bool:
        """Fitted on enough AR and SD samples (live or anchors) to be used for decisions."""
        if not self.fitted:
            return False
        n, n_anchor = self._counts, len(self.anchors)
        return (n["ar"] + n_anchor >= self.min_samples
                and min(n["draft"], n["verify"]) + n["sd"] + n_anchor >= self.min_samples)

    def _data(self):
        n = self.n_live
        X, y, w = self._X[:n], self._y[:n], np.ones(n)
        if self.anchors:
            X = np.concatenate([X, np.stack([s.x for s in self.anchors])])
            y = np.concatenate([y, [s.y for s in self.anchors]])
            w = np.concatenate([w, [s.w for s in self.anchors]])
        return X, y, w

    def fit(self) -> "CostModel":
        X, y, w = self._data()
        self._pending = 0
        if not len(y):
            return self
        # relative error: weight 1/t^2 with t the previous fit's prediction (1/y^2 for the first
        # fit); weights that do not depend on the sample's own noise keep the fit unbiased for
        # the mean step time, which is what throughput depends on (1/y^2 would bias it low).
        t = np.clip(X @ self.coef, 0.5 * y, 2.0 * y) if self.fitted else y  # clip: a bad old fit
        sw = np.sqrt(w) / t
        A, b = X * sw[:, None], y * sw
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1.0
        reg = LinearRegression(fit_intercept=False, positive=True).fit(A / scale, b)
        self.coef = reg.coef_ / scale
        self.fitted = True
        self.n_fits += 1
        return self

    # ---------------------------------------------------------------- prediction
    def _dot(self, name: str, *cols) -> np.ndarray | float:
        c = self.coef[_SLICES[name]]
        out = sum(ci * col for ci, col in zip(c, cols))
        return out

    def predict_ar(self, B, L):
        B, L = np.asarray(B, float), np.asarray(L, float)
        return self._dot("ar", 1.0, B, B * L)

    def predict_draft(self, B, L):
        """One drafter forward of B rows, one token each."""
        B, L = np.asarray(B, float), np.asarray(L, float)
        return self._dot("draft", 1.0, B, B * L)

    def predict_catchup(self, tokens):
        t = np.asarray(tokens, float)
        c = self.coef[_SLICES["draft"]]
        return c[3] * t + c[4] * (t > 0)

    def predict_verify(self, B, L, T):
        B, L, T = (np.asarray(v, float) for v in (B, L, T))
        return self._dot("verify", 1.0, B * T, B * L, B * T * L)

    def predict_sd(self, B, L, K, catchup_tokens=0):
        """T_sd = K * T_draft(B, L) + T_verify(B, L, K + 1) + T_catchup(catchup_tokens)."""
        K = np.asarray(K, float)
        return (K * self.predict_draft(B, L) + self.predict_verify(B, L, K + 1)
                + self.predict_catchup(catchup_tokens))

    def predict(self, s: Sample) -> float:
        return float(self.coef @ s.x)

    def mape(self, samples=None) -> float:
        """Mean absolute percentage error (fraction, 0.05 = 5%) on ``samples`` (default: live window)."""
        if samples is None:
            X, y = self._X[: self.n_live], self._y[: self.n_live]
        else:
            samples = list(samples)
            X = np.stack([s.x for s in samples]) if samples else np.zeros((0, N_COEF))
            y = np.array([s.y for s in samples])
        if not len(y):
            return float("nan")
        return float(np.mean(np.abs(X @ self.coef - y) / y))

    def domain(self) -> dict:
        """[min, max] of B, L and K over the data (live and anchors)."""
        anchors = np.array([[0, s.B, s.L, s.K] for s in self.anchors]).reshape(-1, 4)
        m = np.concatenate([self._meta[: self.n_live], anchors])
        if not len(m):
            return {}
        K = m[m[:, 3] > 0, 3]

        def span(v):
            return [float(v.min()), float(v.max())] if len(v) else [1.0, 1.0]

        return {"B": span(m[:, 1]), "L": span(m[:, 2]), "K": span(K)}

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "features": {k: list(v) for k, v in FEATURES.items()},
            "coef": {k: [float(c) for c in self.coef[s]] for k, s in _SLICES.items()},
            "domain": self.domain(),
            "n_samples": self.n_live + len(self.anchors),
        }

    @classmethod
    def from_dict(cls, d: dict, prior_weight: float = 32.0, **kwargs) -> "CostModel":
        """Rebuild a fitted model. With ``prior_weight > 0`` anchor samples are generated on a grid
        over the stored domain (total weight ``prior_weight`` per block) so online refits stay close
        to the profile where live data is missing."""
        if not isinstance(d, dict):
            raise ValueError(f"cost_model must be a dict, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"cost_model format must be {FORMAT!r}, got {d.get('format')!r}")
        coef = d.get("coef")
        if not isinstance(coef, dict):
            raise ValueError("cost_model.coef missing or not a dict")
        m = cls(**kwargs)
        for name, f in FEATURES.items():
            c = coef.get(name)
            if not isinstance(c, list) or len(c) != len(f) or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in c):
                raise ValueError(f"cost_model.coef.{name} must be {len(f)} finite numbers >= 0, got {c!r}")
            m.coef[_SLICES[name]] = c
        m.fitted = True
        dom = d.get("domain") or {}
        if prior_weight > 0 and dom:
            m._make_anchors(dom, prior_weight)
        return m

    def _make_anchors(self, dom: dict, prior_weight: float) -> None:
        try:
            (b0, b1), (l0, l1), (k0, k1) = dom["B"], dom["L"], dom["K"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"cost_model.domain must have B, L, K as [min, max]: {dom!r}") from e
        Bs = np.unique(np.round(np.geomspace(max(b0, 1), max(b1, 1), 6)))
        Ls = np.unique([max(l0, 1.0), math.sqrt(max(l0, 1.0) * max(l1, 1.0)), max(l1, 1.0)])
        Ks = range(max(int(k0), 1), max(int(k1), 1) + 1)
        self.anchors = []
        for kind, ks in (("ar", [0]), ("draft", Ks), ("verify", Ks)):
            group = [make_sample(kind, B, L, K, 0.0) for B in Bs for L in Ls for K in ks]
            w = prior_weight / len(group)  # each block's anchors weigh prior_weight samples in all
            self.anchors += [s._replace(y=self.predict(s), w=w) for s in group if self.predict(s) > 0]


def sign_accuracy(model: CostModel, points) -> float:
    """Fraction of measured points where the model predicts the faster mode.

    ``points``: iterable of dicts with B, L, K, t_ar, t_sd (measured seconds) and E (expected
    tokens per row for that K). SD is faster iff E / t_sd > 1 / t_ar.
    """
    hits = n = 0
    for p in points:
        pred = p["E"] / float(model.predict_sd(p["B"], p["L"], p["K"])) > 1.0 / float(model.predict_ar(p["B"], p["L"]))
        true = p["E"] / p["t_sd"] > 1.0 / p["t_ar"]
        hits, n = hits + (pred == true), n + 1
    return hits / n if n else float("nan")
