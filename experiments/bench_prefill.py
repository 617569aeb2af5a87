"""GRPO-shaped rollout with and without shared prompt prefill (issue 18), side by side in one process.

    python experiments/bench_prefill.py --model $(effroll fetch smollm2-135m | tail -1) --json out.json

Each rollout: ``--prompts`` prompts of ``--prompt-tokens``+ tokens (the chat template's system prompt, then a
long task text), ``--n`` samples each (one request with n, as GRPO asks), long-tailed response lengths up to
``--cap``. Modes ``ar`` and ``adaptive``, each with the engine's shared prefill on and off, interleaved
repeat by repeat on one LLM (the same weights, drafter and seeds); reported: wall time median [min-max],
prefill seconds and prompt tokens computed vs asked for.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effroll import AdaptiveSpecRollout  # noqa: E402
from effroll.bench import TOPICS, long_tail_lengths  # noqa: E402
from effroll.engine.sampling import derive_seed  # noqa: E402
from effroll.llm import LLM  # noqa: E402


def grpo_workload(llm: LLM, prompts: int, prompt_tokens: int, n: int, cap: int, seed: int):
    """(prompt token ids, one sampling-params dict with n per prompt): long prompts, long-tailed responses."""
    rng = random.Random(seed)
    tok = llm.tokenizer
    ids_all = []
    for _ in range(prompts):
        text = "Solve the following and explain each step."
        ids: list[int] = []
        while len(ids) < prompt_tokens:
            text += f" Consider {rng.choice(TOPICS)} and how it relates to {rng.choice(TOPICS)}."
            ids = list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
        ids_all.append([int(t) for t in ids])
    lengths = long_tail_lengths(prompts, cap, seed)
    params = [{"temperature": 1.0, "max_tokens": m, "ignore_eos": True, "n": n, "seed": derive_seed(seed, i)}
              for i, m in enumerate(lengths)]
    return ids_all, params


def run(llm: LLM, mode: str, share: bool, prompts, params, k: int) -> dict:
    llm.engine.share_prefill = share
    records = []
    wrapped = AdaptiveSpecRollout(None, llm=llm, mode=mode, k=k, profile=None)
    llm.listeners.append(records.append)
    try:
        t0 = time.perf_counter()
        outs = wrapped(prompts, params)
        wall = time.perf_counter() - t0
    finally:
        llm.listeners.remove(records.append)
    return {"wall_s": wall, "prefill_s": sum(r.prefill_s for r in records),
            "prefill_tokens": sum(r.prefill_tokens for r in records),
            "prefill_requested": sum(r.prefill_requested for r in records),
            "tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
            "digest": hash(tuple(tuple(c.token_ids) for o in outs for c in o.outputs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="ar,adaptive")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    llm = LLM(a.model, dtype=a.dtype, max_batch=a.max_batch, kmax=max(8, a.k))
    prompts, params = grpo_workload(llm, a.prompts, a.prompt_tokens, a.n, a.cap, a.seed)
    variants = [(m, s) for m in a.modes.split(",") for s in (False, True)]
    runs: dict[str, list[dict]] = {f"{m}-{'shared' if s else 'unshared'}": [] for m, s in variants}
    for r in range(a.repeats):
        for m, s in variants:
            name = f"{m}-{'shared' if s else 'unshared'}"
            runs[name].append(run(llm, m, s, prompts, params, a.k))
            x = runs[name][-1]
            print(f"repeat {r + 1}/{a.repeats} {name}: wall {x['wall_s']:.1f} s, prefill {x['prefill_s']:.1f} s, "
                  f"prompt tokens {x['prefill_tokens']}/{x['prefill_requested']}", file=sys.stderr, flush=True)
    out = {"workload": {"prompts": a.prompts, "prompt_tokens": [len(p) for p in prompts], "n": a.n, "cap": a.cap,
                        "max_batch": a.max_batch, "dtype": a.dtype, "k": a.k, "repeats": a.repeats,
                        "response_tokens": runs[next(iter(runs))][0]["tokens"]}}
    for name, xs in runs.items():
        walls = [x["wall_s"] for x in xs]
        out[name] = {"wall_s": statistics.median(walls), "wall_s_min": min(walls), "wall_s_max": max(walls),
                     "prefill_s": statistics.median(x["prefill_s"] for x in xs),
                     "prefill_tokens": xs[0]["prefill_tokens"], "prefill_requested": xs[0]["prefill_requested"],
                     "prefill_share_of_wall": statistics.median(x["prefill_s"] / x["wall_s"] for x in xs)}
    for m in a.modes.split(","):
        u, s = runs[f"{m}-unshared"], runs[f"{m}-shared"]
        out[f"{m}_shared_vs_unshared"] = {  # per repeat pair (interleaved), then min / median / max
            "wall_ratio": sorted(y["wall_s"] / x["wall_s"] for x, y in zip(u, s)),
            "same_tokens_ar": m == "ar" and all(x["digest"] == y["digest"] for x, y in zip(u, s))}
    for name, r in out.items():
        if name != "workload" and "wall_s" in r:
            print(f"{name:>18}: wall {r['wall_s']:.1f} s [{r['wall_s_min']:.1f}-{r['wall_s_max']:.1f}], prefill "
                  f"{r['prefill_s']:.1f} s ({100 * r['prefill_share_of_wall']:.0f}% of wall), prompt tokens "
                  f"{r['prefill_tokens']}/{r['prefill_requested']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
