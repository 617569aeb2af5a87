"""`effroll bench`: AR vs static-K speculation vs adaptive on one long-tail rollout workload.

The workload is what makes RL rollouts slow: many prompts, response lengths with a long tail
(a few long responses decide when the batch finishes), a queue and continuous batching. Lengths
are fixed per request (``ignore_eos`` with a seeded long-tail ``max_tokens``), so every mode
generates exactly the same number of tokens and wall times compare like for like. Modes run
one after another on the same model in one process, repeated ``--repeats`` times (interleaved);
we report the median and min/max.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from .engine.records import StepRecord
from .engine.sampling import SamplingParams
from .llm import LLM
from .rollout import AdaptiveSpecRollout
from .telemetry import summarize_steps

TOPICS = ["the ocean", "a lost robot", "prime numbers", "photosynthesis", "the moon landing", "a dragon who cooks",
          "binary search", "the French revolution", "volcanoes", "a haunted library", "compound interest",
          "migrating birds", "the water cycle", "a chess tournament", "black holes", "baking bread"]
TASKS = ["Write a short story about {}.", "Explain {} to a ten-year-old.", "List five facts about {}.",
         "Write a poem about {}.", "Describe {} in detail.", "What is the most surprising thing about {}?"]


@dataclass
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]

    @property
    def tokens(self) -> int:
        return sum(p.max_tokens for p in self.params)


def long_tail_lengths(n: int, cap: int, seed: int, median: int | None = None) -> list[int]:
    """Log-normal response lengths (sigma 1.0) capped at ``cap``: most short, a few at the cap."""
    rng = random.Random(seed)
    med = median or max(8, cap // 8)
    return [max(4, min(cap, int(rng.lognormvariate(math.log(med), 1.0)))) for _ in range(n)]


def make_workload(llm: LLM, n: int = 64, cap: int = 512, temperature: float = 1.0, seed: int = 0,
                  median: int | None = None) -> Workload:
    rng = random.Random(seed)
    tok = llm.tokenizer
    prompts = []
    for i in range(n):
        text = rng.choice(TASKS).format(rng.choice(TOPICS))
        if tok is not None and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        elif tok is not None:
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = [rng.randrange(1, llm.model.cfg.vocab_size) for _ in range(12)]
        prompts.append(ids)
    lengths = long_tail_lengths(n, cap, seed, median)
    params = [SamplingParams(temperature=temperature, max_tokens=m, ignore_eos=True, seed=seed * 100_003 + i)
              for i, m in enumerate(lengths)]
    return Workload(prompts, params)


def run_mode(llm: LLM, wl: Workload, mode: str, k: int = 4, controller_kwargs: dict | None = None,
             profile=None, on_step: Callable[[StepRecord], None] | None = None, audit: bool = False) -> dict[str, Any]:
    wrapped = AdaptiveSpecRollout(None, llm=llm, mode=mode, k=k, profile=profile,
                                  controller_kwargs=controller_kwargs,
                                  audit={"on_failure": "ar"} if audit else False)  # report a failure, go on
    records: list[StepRecord] = []
    if on_step is not None:
        llm.listeners.append(on_step)
    llm.listeners.append(records.append)
    try:
        t0 = time.perf_counter()
        outs = wrapped(wl.prompts, wl.params)
        wall = time.perf_counter() - t0
    finally:
        llm.listeners.remove(records.append)
        if on_step is not None:
            llm.listeners.remove(on_step)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    s = summarize_steps(records, llm.engine.kmax)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "acceptance": s["acceptance"],
            "speculative_share": s["speculative_share"], "toggles": s["toggles"], "k_histogram": s["k_histogram"],
            "steps": s["steps"], "records": records, "prefill_tokens": s["prefill_tokens"],
            "prefill_requested": s["prefill_requested"], "prefill_s": s["prefill_s"], "controller": wrapped.controller.stats() if mode == "adaptive" else None,
            # watchdog / audit: seconds spent in them as a share of wall time, and what they reported
            "overhead": {k: v / wall for k, v in wrapped.guard_s.items()},
            "events": sum(len(r.events) for r in records), "audit": wrapped.stats()["audit"]}


def bench(llm: LLM, wl: Workload, ks: list[int], repeats: int = 1, progress: Callable[[str], None] | None = None,
          profile=None, audit: bool = False) -> dict[str, Any]:
    modes = ["ar"] + [f"sd_k{k}" for k in ks] + ["adaptive"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for m in modes:
            if progress:
                progress(f"repeat {r + 1}/{repeats}: {m}")
            if m == "ar":
                runs[m].append(run_mode(llm, wl, "ar"))
            elif m.startswith("sd_k"):
                runs[m].append(run_mode(llm, wl, "sd", k=int(m[4:]), audit=audit))
            else:
                runs[m].append(run_mode(llm, wl, "adaptive", profile=profile, audit=audit))
    out: dict[str, Any] = {"workload": {"requests": len(wl.prompts), "tokens": wl.tokens,
                                        "max_tokens_cap": max(p.max_tokens for p in wl.params),
                                        "max_batch": llm.engine.max_batch, "repeats": repeats,
                                        "recipe": llm.recipe, "audit": audit}}
    for m in modes:
        walls = [x["wall_s"] for x in runs[m]]
        best = runs[m][walls.index(statistics.median(walls))] if len(walls) % 2 else runs[m][0]
        acc = [x["acceptance"] for x in runs[m] if x["acceptance"] is not None]
        out[m] = {"wall_s": statistics.median(walls), "wall_s_min": min(walls), "wall_s_max": max(walls),
                  "tokens": runs[m][0]["tokens"], "tok_per_s": runs[m][0]["tokens"] / statistics.median(walls),
                  "acceptance": statistics.median(acc) if acc else None,
                  "speculative_share": statistics.median(x["speculative_share"] for x in runs[m]),
                  "toggles": statistics.median(x["toggles"] for x in runs[m]),
                  "k_histogram": best["k_histogram"],
                  "watchdog_overhead": statistics.median(x["overhead"]["watchdog"] for x in runs[m]),
                  "audit_overhead": statistics.median(x["overhead"]["audit"] for x in runs[m]) if audit and m != "ar"
                  else None,
                  "events": best["events"], "audit": best["audit"],
                  "prefill_tokens": best["prefill_tokens"], "prefill_requested": best["prefill_requested"],
                  "prefill_s": statistics.median(x["prefill_s"] for x in runs[m])}
        out.setdefault("_records", {})[m] = best["records"]
    ar = out["ar"]["wall_s"]
    for m in modes[1:]:
        out[m]["speedup_vs_ar"] = ar / out[m]["wall_s"]
    out["speedup_adaptive_vs_ar"] = ar / out["adaptive"]["wall_s"]
    best_static = min(out[m]["wall_s"] for m in modes if m.startswith("sd_k"))
    out["adaptive_vs_best_static"] = out["adaptive"]["wall_s"] / best_static
    return out


def plot_timeline(records_by_mode: dict[str, list[StepRecord]], path: str, title: str = "") -> None:
    """PNG: active batch size, chosen K and tokens/s over the rollout, per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for m, recs in records_by_mode.items():
        t, b, k, tps = [], [], [], []
        now = 0.0
        for r in recs:
            now += r.seconds + r.prefill_s
            t.append(now)
            b.append(r.batch_size)
            k.append(r.max_k)
            tps.append(r.tokens / max(r.seconds + r.prefill_s, 1e-9))
        win = 9
        sm = [statistics.mean(tps[max(0, i - win):i + 1]) for i in range(len(tps))]
        axes[0].plot(t, b, label=m)
        axes[1].step(t, k, where="post", label=m)
        axes[2].plot(t, sm, label=m)
    axes[0].set_ylabel("active batch size")
    axes[1].set_ylabel("draft length K (0 = AR)")
    axes[2].set_ylabel("tokens/s (10-step mean)")
    axes[2].set_xlabel("engine time (s)")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="upper right")
    fig.suptitle(title or "effroll bench: long-tail rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _checks_line(res: dict) -> str:
    """Watchdog and audit: their worst overhead (share of wall time) and what they reported, per mode."""
    modes = {m: r for m, r in res.items() if isinstance(r, dict) and "watchdog_overhead" in r and m != "ar"}
    wd = max((r["watchdog_overhead"] for r in modes.values()), default=0.0)
    au = [r["audit_overhead"] for r in modes.values() if r.get("audit_overhead") is not None]
    said = [f"{m}: {r['events']} events" + (" (AUDIT FAILED)" if (r.get("audit") or {}).get("failed") else "")
            for m, r in modes.items() if r["events"] or (r.get("audit") or {}).get("failed")]
    return (f"health checks: watchdog overhead <= {100 * wd:.3f}% of wall time; audit "
            + (f"overhead <= {100 * max(au):.3f}%" if au else "off (--audit)") + "; " + ("; ".join(said) or "no events"))


def report_lines(res: dict) -> tuple[Any, list[str]]:
    """``bench``'s result as a rich Table of the modes and the summary lines below it (``effroll bench``)."""
    from pathlib import Path

    from rich.table import Table

    w = res["workload"]
    t = Table(title=f"long-tail rollout: {w['requests']} requests, {w['tokens']} tokens, cap {w['max_tokens_cap']}, "
                    f"max batch {w['max_batch']}, drafter {w['recipe']}, median of {w['repeats']}; controller "
                    f"profile: {Path(w['profile']).name if w.get('profile') else 'none (learns online)'}")
    for col in ("mode", "wall s [min-max]", "tok/s", "acceptance", "speculated", "toggles", "prefill s",
                "prompt tok computed/asked", "vs AR"):
        t.add_column(col, justify="right")
    for m, r in res.items():
        if not isinstance(r, dict) or "wall_s" not in r:
            continue
        acc = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
        t.add_row(m, f"{r['wall_s']:.1f} [{r['wall_s_min']:.1f}-{r['wall_s_max']:.1f}]", f"{r['tok_per_s']:.1f}", acc,
                  f"{100 * r['speculative_share']:.0f}%", f"{r['toggles']:.0f}", f"{r['prefill_s']:.1f}",
                  f"{r['prefill_tokens']}/{r['prefill_requested']}", f"{r.get('speedup_vs_ar', 1.0):.2f}x")
    return t, [f"adaptive vs AR speed: {res['speedup_adaptive_vs_ar']:.2f}x (>1 = faster); "
               f"adaptive / best static wall time: {res['adaptive_vs_best_static']:.2f}", _checks_line(res)]

