"""`effroll tune`: measure step times on this machine, fit the cost model, write a profile.

The sweep runs the real engine and drafter over a grid of batch size B x context length L and,
in each (B, L) cell, interleaves AR steps with speculative steps at every K of the ladder for a
few rounds (interleaving spreads machine noise evenly over modes). Every step's ``StepRecord``
becomes cost-model samples exactly as the live controller sees them, so the profile is a warm
start for the same model the controller refines online.

Honest evaluation: whole batch sizes are held out (by default every other interior B of the
grid), the model is fitted on the rest, and we report on the held-out cells
  * MAPE of step times: per grid point (B, L, K; K = 0 for AR), the median of its measured
    steps against the prediction; and the per-step MAPE as well (includes step-to-step noise);
  * toggle sign accuracy: at the sweep's measured acceptance ``a``, does the model pick the
    faster of AR and SD at that point (E(a, K) / T_sd versus 1 / T_ar, "true" from the measured
    median times)?
The written profile is then refitted on all points. Its ``toggle`` section (K per batch size,
the batch threshold) is computed at ``a`` and the median context of the sweep.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .control.acceptance import AcceptanceEstimator, expected_tokens
from .control.controller import toggle_table
from .control.cost_model import CostModel, record_samples, sign_accuracy
from .control.profile import make_profile
from .engine.model import Transformer
from .engine.records import StepRecord
from .engine.sampling import SamplingParams
from .engine.torch_engine import TorchEngine
from .llm import runtime_hardware

DEFAULT_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
DEFAULT_CONTEXTS = (64, 256, 640)
DEFAULT_KS = (1, 2, 3, 4, 6, 8)


@dataclass
class Grid:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES
    context_lens: tuple[int, ...] = DEFAULT_CONTEXTS
    ks: tuple[int, ...] = DEFAULT_KS
    rounds: int = 3
    holdout: tuple[int, ...] | None = None  # None: every other interior batch size

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "context_lens", "ks"):
            v = tuple(getattr(self, name))
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {v!r}")
            setattr(self, name, tuple(sorted(set(v))))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if self.holdout is None:
            inner = self.batch_sizes[1:-1]
            self.holdout = tuple(inner[::2]) if len(self.batch_sizes) >= 4 else ()
        self.holdout = tuple(self.holdout)
        bad = [b for b in self.holdout if b not in self.batch_sizes]
        if bad:
            raise ValueError(f"holdout batch sizes {bad} are not in the grid {list(self.batch_sizes)}")
        if len(set(self.batch_sizes) - set(self.holdout)) < 2:
            raise ValueError("need at least two batch sizes outside the holdout set to fit the cost model")


@dataclass
class Sweep:
    records: list[StepRecord] = field(default_factory=list)
    cell_of: list[tuple[int, int]] = field(default_factory=list)  # (B, L cell) of each record
    skipped: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0


def _filler_ids(tokenizer, vocab: int, n: int, seed: int) -> list[int]:
    """``n`` tokens of plain text (real language where a tokenizer exists) to build long contexts."""
    rng = random.Random(seed)
    if tokenizer is None:
        return [rng.randrange(1, vocab) for _ in range(n)]
    from .bench import TASKS, TOPICS

    ids: list[int] = []
    while len(ids) < n:
        text = " ".join(rng.choice(TASKS).format(rng.choice(TOPICS)) for _ in range(16))
        ids += tokenizer.encode(text, add_special_tokens=False)
    return ids[:n]


def _prompt(tokenizer, vocab: int, length: int, seed: int) -> list[int]:
    """A prompt of exactly ``length`` tokens: plain-text filler, then a chat-formatted question."""
    tail: list[int] = []
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from .bench import TASKS, TOPICS

        rng = random.Random(seed)
        msg = [{"role": "user", "content": rng.choice(TASKS).format(rng.choice(TOPICS))}]
        out = tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
        tail = list(out["input_ids"] if hasattr(out, "keys") else out)
    tail = tail[-(length // 2):] if len(tail) > length // 2 else tail
    return _filler_ids(tokenizer, vocab, length - len(tail), seed) + tail


def sweep(model: Transformer, drafter: Transformer, grid: Grid, *, tokenizer=None, budget_s: float = 300.0,
          temperature: float = 1.0, seed: int = 0, progress: Callable[[str, int, int], None] | None = None,
          compile_drafter: bool = False) -> Sweep:
    """Measure AR and SD steps on every (B, L) cell of ``grid`` (see module docstring).

    Cells run in order of increasing cost; when ``budget_s`` is spent the remaining cells are
    skipped (listed in ``Sweep.skipped``, with a warning), never cut in the middle.
    """
    cells = sorted(((B, L) for B in grid.batch_sizes for L in grid.context_lens), key=lambda c: (c[0] * c[1], c))
    per_round = [0] * 2 + list(grid.ks)  # two AR steps, then each K (rotated per round)
    kmax = max(grid.ks)
    out = Sweep()
    t_start = time.perf_counter()
    for n, (B, L) in enumerate(cells):
        if time.perf_counter() - t_start > budget_s:
            out.skipped = cells[n:]
            warnings.warn(f"effroll tune: budget of {budget_s:.0f} s spent; skipped {len(out.skipped)} cells "
                          f"(B, L) = {out.skipped}", stacklevel=2)
            break
        if progress:
            progress(f"B={B} L={L}", n, len(cells))
        new_tokens = (grid.rounds + 1) * sum(k + 1 for k in per_round) + kmax + 2
        eng = TorchEngine(model, drafter, max_batch=B, max_seq_len=L + new_tokens, kmax=kmax,
                          compile_drafter=compile_drafter)
        for i in range(B):
            eng.add_request(_prompt(tokenizer, model.cfg.vocab_size, L, seed * 1000 + i),
                            SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True,
                                           seed=seed * 1000 + i))
        eng.step(0)  # admission + prefill + first AR step: not measured
        eng.step(grid.ks[0])  # first SD step (a drafter with its own cache catches up the prompt): not measured
        for r in range(grid.rounds):
            # rotate the K order each round: the first SD step after the AR steps pays the drafter
            # catch-up, and per-point medians should not charge it to the same K every round
            ks = list(grid.ks[r % len(grid.ks):]) + list(grid.ks[:r % len(grid.ks)])
            for k in [0, 0] + ks:
                rec = eng.step(k)
                if rec.batch_size != B:
                    raise RuntimeError(f"effroll tune: a row finished early in cell B={B} L={L} (engine bug?)")
                out.records.append(rec)
                out.cell_of.append((B, L))
        del eng
    out.seconds = time.perf_counter() - t_start
    return out


def _point_key(rec: StepRecord, cell: tuple[int, int]) -> tuple[int, int, int]:
    return cell[0], cell[1], rec.max_k


def point_table(sw: Sweep) -> dict[tuple[int, int, int], dict[str, float]]:
    """Per grid point (B, L cell, K): median seconds, median context, median catch-up tokens, count."""
    groups: dict[tuple[int, int, int], list[StepRecord]] = {}
    for rec, cell in zip(sw.records, sw.cell_of):
        groups.setdefault(_point_key(rec, cell), []).append(rec)
    return {key: {"seconds": statistics.median(r.seconds for r in rs),
                  "L": statistics.median(r.mean_context_len for r in rs),
                  "catchup": statistics.median(r.catchup_tokens for r in rs), "n": len(rs)}
            for key, rs in groups.items()}


def fit(sw: Sweep, exclude_batches=()) -> CostModel:
    cm = CostModel(window=max(64, 4 * len(sw.records)))
    for rec, (B, _) in zip(sw.records, sw.cell_of):
        if B not in exclude_batches:
            cm.add_samples(record_samples(rec))
    return cm.fit()


def _predict(cm: CostModel, B: int, L: float, K: int, catchup: float = 0.0) -> float:
    return float(cm.predict_ar(B, L)) if K == 0 else float(cm.predict_sd(B, L, K, catchup))


def evaluate(cm: CostModel, sw: Sweep, a: float, batches) -> dict[str, Any]:
    """MAPE (per point and per step) and toggle sign accuracy on the cells with B in ``batches``."""
    batches = set(batches)
    pts = {k: v for k, v in point_table(sw).items() if k[0] in batches}
    if not pts:
        return {"mape": None, "mape_steps": None, "sign_accuracy": None, "n_points": 0, "n_steps": 0}
    errs = [abs(_predict(cm, B, v["L"], K, v["catchup"]) - v["seconds"]) / v["seconds"] for (B, _, K), v in pts.items()]
    steps = [(r, c) for r, c in zip(sw.records, sw.cell_of) if c[0] in batches]
    step_errs = [abs(_predict(cm, r.batch_size, r.mean_context_len, r.max_k, r.catchup_tokens) - r.seconds) / r.seconds
                 for r, _ in steps]
    signs = [{"B": B, "L": v["L"], "K": K, "E": float(expected_tokens(a, K)), "t_sd": v["seconds"],
              "t_ar": pts[(B, Lc, 0)]["seconds"]} for (B, Lc, K), v in pts.items() if K > 0 and (B, Lc, 0) in pts]
    n = len(signs)
    return {"mape": float(np.mean(errs)), "mape_steps": float(np.mean(step_errs)),
            "sign_accuracy": sign_accuracy(cm, signs) if n else None, "n_points": len(pts), "n_steps": len(steps),
            "n_sign": n}


def measured_acceptance(sw: Sweep) -> float:
    est = AcceptanceEstimator(prior=0.5, prior_weight=1.0, half_life=1e9, change_z=None)
    for r in sw.records:
        est.observe(r)
    return est.rate


def breakeven_acceptance(cm: CostModel, batch_sizes, L: float, ks, margin: float = 0.0) -> dict[str, float | None]:
    """Per batch size: the lowest acceptance rate at which SD (best K of ``ks``) beats AR by ``margin``
    under ``cm``; None where even a = 0.99 does not pay. Tells what drafter quality this machine needs."""
    ks = np.array(sorted(ks), dtype=float)

    def pays(B, a):
        return float(np.max(expected_tokens(a, ks) / cm.predict_sd(B, L, ks))) * float(cm.predict_ar(B, L)) > 1 + margin

    out: dict[str, float | None] = {}
    for B in batch_sizes:
        if not pays(B, 0.99):
            out[str(B)] = None
            continue
        lo, hi = 0.0, 0.99
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if pays(B, mid) else (mid, hi)
        out[str(B)] = round(hi, 4)
    return out


def speedup_curves(cm: CostModel, sw: Sweep, a: float) -> dict[int, dict[int, dict[str, list]]]:
    """For each L cell and K: batch sizes with the measured and the predicted SD/AR goodput ratio
    (both at the point's median drafter catch-up, so they compare like for like)."""
    pts = point_table(sw)
    curves: dict[int, dict[int, dict[str, list]]] = {}
    for (B, Lc, K), v in sorted(pts.items()):
        ar = pts.get((B, Lc, 0))
        if K == 0 or ar is None:
            continue
        E = float(expected_tokens(a, K))
        c = curves.setdefault(Lc, {}).setdefault(K, {"B": [], "measured": [], "predicted": []})
        c["B"].append(B)
        c["measured"].append(E * ar["seconds"] / v["seconds"])
        c["predicted"].append(E * _predict(cm, B, ar["L"], 0) / _predict(cm, B, v["L"], K, v["catchup"]))
    return curves


def plot(cm: CostModel, sw: Sweep, a: float, toggle: dict, path: str, title: str = "") -> None:
    """PNG: measured (markers) and predicted (lines) speedup of SD over AR vs batch size, per K,
    one panel per context length, with the chosen toggle threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = speedup_curves(cm, sw, a)
    Ls = sorted(curves)
    fig, axes = plt.subplots(1, len(Ls), figsize=(5 * len(Ls), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    ks = sorted({k for c in curves.values() for k in c})
    for ax, Lc in zip(axes[0], Ls):
        for i, K in enumerate(ks):
            c = curves[Lc].get(K)
            if not c:
                continue
            col = cmap(i / max(1, len(ks) - 1))
            ax.plot(c["B"], c["predicted"], "-", color=col, label=f"K={K} predicted")
            ax.plot(c["B"], c["measured"], "o", color=col, ms=4, label=f"K={K} measured")
        ax.axhline(1.0, color="k", lw=0.8)
        thr = toggle.get("batch_threshold", 0)
        if thr:
            ax.axvline(thr, color="r", ls="--", lw=1.2, label=f"toggle: SD for B <= {thr}")
        else:
            ax.plot([], [], "r--", label="toggle: SD never pays at this a")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("active batch size B")
        ax.set_title(f"context L ~ {Lc}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"SD / AR goodput at acceptance a = {a:.2f}")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title or "effroll tune: speculative speedup vs batch size")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(model: Transformer, drafter: Transformer, *, recipe: str, grid: Grid | None = None, tokenizer=None,
         budget_s: float = 300.0, temperature: float = 1.0, seed: int = 0, model_name: str | None = None,
         margin: float = 0.05, plot_path: str | None = None,
         progress: Callable[[str, int, int], None] | None = None, compile_drafter: bool = False) -> tuple[dict, dict]:
    """Sweep, fit, evaluate on held-out batch sizes, refit on everything; return (profile, report).

    ``compile_drafter``: time the drafter as ``LLM(compile_drafter=True)`` runs it (a profile is only
    right for the drafter configuration it was measured with; the profile's ``fit`` records which)."""
    grid = grid or Grid()
    sw = sweep(model, drafter, grid, tokenizer=tokenizer, budget_s=budget_s, temperature=temperature, seed=seed,
               progress=progress, compile_drafter=compile_drafter)
    measured_b = sorted({c[0] for c in sw.cell_of})
    holdout = [b for b in grid.holdout if b in measured_b]
    if len(set(measured_b) - set(holdout)) < 2:
        raise ValueError(f"effroll tune: too few batch sizes measured within the budget ({measured_b}); "
                         f"raise --budget-s or shrink the grid")
    a = measured_acceptance(sw)
    held = fit(sw, exclude_batches=holdout)
    heldout_eval = evaluate(held, sw, a, holdout)
    full = fit(sw)
    train_eval = evaluate(full, sw, a, measured_b)
    L_mid = float(statistics.median(r.mean_context_len for r in sw.records))
    toggle = toggle_table(full, a, L_mid, k_ladder=grid.ks, batch_sizes=tuple(measured_b), margin=margin)
    toggle["breakeven_a_by_batch"] = breakeven_acceptance(full, measured_b, L_mid, grid.ks, margin)
    fitinfo = {"mape": heldout_eval["mape"], "mape_steps": heldout_eval["mape_steps"],
               "sign_accuracy": heldout_eval["sign_accuracy"], "holdout_batch_sizes": holdout,
               "n_points": heldout_eval["n_points"], "train_mape": train_eval["mape"],
               "train_sign_accuracy": train_eval["sign_accuracy"], "acceptance": a,
               "sweep_seconds": sw.seconds, "n_steps": len(sw.records), "skipped_cells": [list(c) for c in sw.skipped],
               "drafter_compiled": compile_drafter,
               "grid": {"batch_sizes": list(grid.batch_sizes), "context_lens": list(grid.context_lens),
                        "ks": list(grid.ks), "rounds": grid.rounds}}
    hw = runtime_hardware(model)
    profile = make_profile(full, model_name=model_name or getattr(model, "name", None) or "model",
                           model_fingerprint=model.fingerprint(), dtype=str(model.dtype).replace("torch.", ""),
                           drafter_recipe=recipe, fit=fitinfo, toggle=toggle, hardware=hw)
    if plot_path:
        plot(full, sw, a, toggle, plot_path, title=f"effroll tune: {profile['model']['name']}, drafter {recipe}")
    return profile, {"heldout": heldout_eval, "train": train_eval, "acceptance": a, "toggle": toggle,
                     "sweep_seconds": sw.seconds, "skipped": sw.skipped}
