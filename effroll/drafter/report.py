"""Drafter report: how good, how big, how fast, and how cheap to refresh a recipe's drafter is.

* acceptance: the mean over positions of ``alpha = sum_x min(p(x), q(x))`` (= 1 - TV(p, q)), the
  expected probability that speculative sampling accepts one drafted token, with ``p`` the target's
  and ``q`` the drafter's next-token distribution at temperature 1, on continuations sampled from
  the target (temperature 1) after a fixed prompt set;
* kl: the mean of ``KL(p || q) = sum_x p(x) (log p(x) - log q(x))`` over the same positions;
* weight_rel_err: ``sqrt(sum ||W - W_q||_F^2) / sqrt(sum ||W||_F^2)`` over the quantized linears;
* refresh_s: wall time of ``derive_drafter`` (steady state: one warm-up derivation runs first);
* drafter_bytes (excluding tensors shared with the target; ``drafter_bytes_total`` includes them)
  vs target_bytes;
* drafter_step_s / target_step_s: median wall time of one batch-1 decode step (forward of one
  token on a KV cache holding ``context`` tokens, plus the LM head), the two models alternating
  every step (as in a K=1 draft: conservative, the drafter's weights are evicted each time);
  ``*_run4``: the same with 4 consecutive steps per turn (a K=4 draft run);
* ``compile=True``: the drafter's decode runs through a ``torch.compile``d block (the engine's
  ``compile_drafter``): ``drafter_step_s`` is then the compiled drafter's, measured in the same
  rotation as the eager drafter (``drafter_step_s_eager``) and the (always eager) target;
  ``compile_s`` is the one-off compile time of the batch-1 decode graph (shorter when inductor's
  on-disk cache already holds it).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Mapping, Sequence

import torch

from effroll.engine.kv_cache import KVCache

from .derive import derive_drafter, drafter_nbytes, model_nbytes
from ..checkpoints import LINEAR_PATHS
from .int4 import Int4Linear
from .recipe import Recipe, load_recipe
from .sampling import sample_continuations


def _paired_logits(target, drafter, seq: Sequence[int], s: int, shared_kv: bool, per_sequence: int | None):
    """Target and drafter logits [n, V] at the positions predicting ``seq[s:]`` (``per_sequence`` of them,
    evenly spaced, if given): one target forward; the drafter reads the target's K/V for the prefix
    (``shared_kv``, :meth:`Transformer.forward_first_draft` at those positions only) or runs its own
    full forward."""
    ids = torch.as_tensor(list(seq[:-1]), dtype=torch.long, device=target.device).view(1, -1)
    pos = torch.arange(s - 1, ids.shape[1], device=target.device)  # position t predicts seq[t + 1]
    if per_sequence is not None and pos.numel() > per_sequence:
        pos = pos[torch.linspace(0, pos.numel() - 1, per_sequence, device=pos.device).round().long()]
    zero = torch.zeros(1, dtype=torch.long, device=target.device)
    cache = KVCache(target.cfg, 1, ids.shape[1], target.dtype, target.device)
    lp = target.logits(target(ids, zero, cache, [0])[0, pos])
    if shared_kv:
        return lp, drafter.logits(drafter.forward_first_draft(ids, cache, pos)[0])
    cache_d = KVCache(drafter.cfg, 1, ids.shape[1], drafter.dtype, drafter.device)
    return lp, drafter.logits(drafter(ids, zero, cache_d, [0])[0, pos])


@torch.no_grad()
def acceptance_kl(target, drafter, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> dict[str, float]:
    """Mean ``sum_x min(p, q)`` and ``KL(p || q)`` over the positions predicting ``seq[starts[i]:]``
    (temperature 1, each model on its own full forward)."""
    accs, kls = [], []
    for seq, s in zip(sequences, starts):
        if len(seq) <= s or s < 1:
            continue
        lp, lq = (torch.log_softmax(x, -1) for x in _paired_logits(target, drafter, seq, s, False, None))
        accs.append(torch.minimum(lp, lq).exp().sum(-1))
        kls.append((lp.exp() * (lp - lq)).sum(-1))
    if not accs:
        raise ValueError("acceptance_kl: no positions to evaluate")
    a, k = torch.cat(accs), torch.cat(kls)
    return {"acceptance": float(a.mean()), "kl": float(k.mean()), "positions": int(a.numel())}


@torch.no_grad()
def first_draft_acceptance(target, drafter, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                           params: Sequence[Any] | None = None, shared_kv: bool = True,
                           per_sequence: int | None = None) -> dict[str, float]:
    """Teacher-forced acceptance of a draft's first position as the engine sees it, on finished sequences.

    Mean over the positions predicting ``seq[starts[i]:]`` (``per_sequence``: that many of them, evenly
    spaced) of ``sum_x min(p(x), q(x))`` under each sequence's sampling parameters (``params[i]``:
    temperature, top-k, top-p; default temperature 1; greedy: ``1[argmax p == argmax q]``). With
    ``shared_kv`` the drafter reads the target's K/V for the prefix, as the engine's shared-cache
    drafter does; else it runs on its own cache. No sampling.
    """
    from effroll.engine.sampling import SamplingParams, process_probs

    vals = []
    for i, (seq, s) in enumerate(zip(sequences, starts)):
        if len(seq) <= s or s < 1:
            continue
        sp = params[i] if params is not None else SamplingParams()
        lp, lq = _paired_logits(target, drafter, seq, s, shared_kv, per_sequence)
        n = lp.shape[0]
        if sp.temperature == 0:
            vals.append((lp.argmax(-1) == lq.argmax(-1)).float())
            continue
        t = torch.full((n,), float(sp.temperature), device=lp.device)
        k = torch.full((n,), max(int(sp.top_k), 0), dtype=torch.long, device=lp.device)
        tp = torch.full((n,), float(sp.top_p), device=lp.device)
        vals.append(torch.minimum(process_probs(lp, t, k, tp), process_probs(lq, t, k, tp)).sum(-1))
    if not vals:
        raise ValueError("first_draft_acceptance: no positions to score")
    a = torch.cat(vals)
    return {"acceptance": float(a.mean()), "positions": int(a.numel())}


@torch.no_grad()
def weight_rel_err(target, drafter) -> float:
    """``sqrt(sum ||W - W_q||^2) / sqrt(sum ||W||^2)`` over the drafter's Int4Linear layers."""
    num = den = 0.0
    for i in range(target.cfg.num_layers):
        for path in LINEAR_PATHS.values():
            q = drafter.layers[i].get_submodule(path)
            if isinstance(q, Int4Linear):
                w = target.layers[i].get_submodule(path).weight.float()
                num += float((w - q.dequantize()).pow(2).sum())
                den += float(w.pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


@torch.no_grad()
def decode_step_seconds(models: Sequence, context: int = 128, iters: int = 16, seed: int = 0, block: int = 1) -> list[float]:
    """Median seconds of a batch-1 decode step (1 token on a ``context``-token KV cache + LM head) per model.

    The models take turns, ``block`` consecutive steps each per round, so background load hits them
    alike. ``block = 1`` alternates every step (a K=1 draft: each drafter step follows a target
    forward that evicted its weights from the caches); ``block = K`` is a K-token draft run.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block!r}")
    g = torch.Generator().manual_seed(seed)
    cfg = models[0].cfg
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=g)
    states = []
    for m in models:
        cache = KVCache(m.cfg, 1, context + (iters + 2) * block + 4, m.dtype, m.device)
        m(prompt.to(m.device), torch.zeros(1, dtype=torch.long, device=m.device), cache, [0])
        states.append(cache)
    times: list[list[float]] = [[] for _ in models]
    tok = torch.zeros(1, 1, dtype=torch.long)
    for j in range(iters + 2):  # two warm-up rounds
        for mi, m in enumerate(models):
            for b in range(block):
                pos = context + j * block + b
                t0 = time.perf_counter()
                h = m(tok.to(m.device), torch.tensor([pos], device=m.device), states[mi], [pos])
                m.logits(h[:, -1]).argmax(-1).item()
                if j >= 2:
                    times[mi].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


_WARM = False


def drafter_report(
    target,
    recipe: str | Recipe | Mapping[str, Any],
    prompts: Sequence[Sequence[int]],
    *,
    n_tokens: int = 64,
    seed: int = 0,
    continuations: Sequence[Sequence[int]] | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    calibration: Sequence[Sequence[int]] | None = None,
    step_context: int = 128,
    step_iters: int = 16,
    compile: bool = False,
) -> dict[str, Any]:
    """Derive ``recipe``'s drafter from ``target`` and measure it (see the module docstring).

    Pass the same ``continuations`` (``sample_continuations(target, prompts, n_tokens)``) to compare
    recipes on identical positions. GPTQ recipes take ``hessians``/``calibration`` as
    :func:`derive_drafter` does; keep calibration data disjoint from ``prompts`` for honest numbers.
    """
    global _WARM
    recipe = load_recipe(recipe)
    if not _WARM:  # first derivation in a process pays one-off import/initialisation costs
        derive_drafter(target, Recipe(name="warmup", group_size=recipe.group_size))
        _WARM = True
    drafter = derive_drafter(target, recipe, hessians=hessians, calibration=calibration, seed=seed)
    if continuations is None:
        continuations = sample_continuations(target, prompts, n_tokens, seed=seed)
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    ak = acceptance_kl(target, drafter, seqs, [len(p) for p in prompts])
    extra: dict[str, Any] = {}
    models = [drafter, target]
    if compile:
        eager = drafter
        drafter = copy.copy(eager)  # shares every module and tensor; only the flag differs
        drafter.compile_decode = True
        t0 = time.perf_counter()
        decode_step_seconds([drafter], step_context, iters=1, seed=seed)  # compiles the batch-1 decode graph
        extra["compile_s"] = time.perf_counter() - t0
        # Rotation compiled, eager, target: the compiled drafter follows the target's step (as a real draft
        # step follows a verify); the eager one follows the compiled one over the same weights, a warmer
        # (slightly flattering) turn for the eager baseline.
        models = [drafter, eager, target]
    steps = decode_step_seconds(models, step_context, step_iters, seed)
    runs = decode_step_seconds(models, step_context, max(4, step_iters // 4), seed, block=4)
    (d_step, t_step), (d_run, t_run) = (steps[0], steps[-1]), (runs[0], runs[-1])
    if compile:
        extra.update(drafter_step_s_eager=steps[1], step_speedup_eager=t_step / steps[1],
                     drafter_step_s_run4_eager=runs[1], step_speedup_run4_eager=t_run / runs[1])
    t_bytes = model_nbytes(target)
    d_bytes, d_total = drafter_nbytes(drafter, True), drafter_nbytes(drafter, False)
    return {
        "recipe": recipe.name,
        "acceptance": ak["acceptance"],
        "kl": ak["kl"],
        "positions": ak["positions"],
        "weight_rel_err": weight_rel_err(target, drafter),
        "refresh_s": drafter.meta.derive_seconds,
        "calib_s": drafter.meta.calib_seconds,
        "drafter_bytes": d_bytes,
        "drafter_bytes_total": d_total,
        "target_bytes": t_bytes,
        "bytes_ratio": d_bytes / t_bytes,
        "bytes_ratio_total": d_total / t_bytes,
        "drafter_step_s": d_step,
        "target_step_s": t_step,
        "step_speedup": t_step / d_step,
        "drafter_step_s_run4": d_run,  # the same, 4 consecutive steps per turn (a K=4 draft run)
        "target_step_s_run4": t_run,
        "step_speedup_run4": t_run / d_run,
        "compiled": bool(compile),
        **extra,
    }


def report_table(rows: Sequence[dict], title: str, compiled: bool = False):
    """``drafter_report`` rows as a rich Table (``effroll drafter-report``)."""
    from rich.table import Table

    t = Table(title=title)
    cols = ["recipe", "acceptance", "KL", "weight err", "refresh s", "bytes vs target", "step speedup (K=1 / K=4)"]
    if compiled:
        cols[-1] = "compiled step speedup (K=1 / K=4)"
        cols.append("eager step speedup (K=1 / K=4)")
    for col in cols:
        t.add_column(col, justify="right")
    for rep in rows:
        cells = [rep["recipe"], f"{rep['acceptance']:.3f}", f"{rep['kl']:.3f}", f"{rep['weight_rel_err']:.3f}",
                 f"{rep['refresh_s']:.2f}", f"{rep['drafter_bytes'] / rep['target_bytes']:.2f}x",
                 f"{rep['step_speedup']:.2f}x / {rep['step_speedup_run4']:.2f}x"]
        if compiled:
            cells.append(f"{rep['step_speedup_eager']:.2f}x / {rep['step_speedup_run4_eager']:.2f}x")
        t.add_row(*cells)
    return t

