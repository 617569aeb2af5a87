"""Never worse at a fixed batch size: adaptive vs AR vs static K with B rows decoding together.

For each B: B chat prompts, every response exactly ``--tokens`` long (EOS ignored), ``max_batch=B``,
so the active batch stays at B for the whole run. Modes interleaved per repeat; median [min-max].
Each repeat draws new request seeds (the same for every mode within a repeat): with one fixed seed a
B=1 run is a single sampled path, and one mode's lucky acceptance on it decided the "best" mode.
Issue 4's goal: adaptive <= 1.03x the wall time of the better of AR and the best static K.

    python experiments/bench_fixed_b.py --model M --batch 1 2 4 8 16 32 64 --k 1 2 4 --json
"""

from __future__ import annotations

import argparse
import json
import statistics

from effroll.bench import Workload, make_workload, run_mode
from effroll.engine.sampling import SamplingParams
from effroll.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", default="rtn-sym-g64")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile-drafter", action="store_true", help="as LLM(compile_drafter=True)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    llm = LLM(a.model, recipe=a.recipe, max_batch=max(a.batch), kmax=max(8, max(a.k)), compile_drafter=a.compile_drafter)
    rows = []
    for B in a.batch:
        base = make_workload(llm, n=B, cap=a.tokens, seed=B)
        modes = ["ar"] + [f"sd_k{k}" for k in a.k] + ["adaptive"]
        walls: dict[str, list[float]] = {m: [] for m in modes}
        acc: dict[str, list[float]] = {m: [] for m in modes}
        spec: list[float] = []
        for r in range(a.repeats):
            wl = Workload(base.prompts, [SamplingParams(temperature=1.0, max_tokens=a.tokens, ignore_eos=True,
                                                        seed=(B * 1000 + r) * 1000 + i) for i in range(B)])
            for m in modes:
                mode, k = ("sd", int(m[4:])) if m.startswith("sd_k") else (m, 4)
                res = run_mode(llm, wl, mode, k=k, profile="auto" if m == "adaptive" else None)
                walls[m].append(res["wall_s"])
                if res["acceptance"] is not None:
                    acc[m].append(res["acceptance"])
                if m == "adaptive":
                    spec.append(res["speculative_share"])
        med = {m: statistics.median(v) for m, v in walls.items()}
        best = min(med[m] for m in modes if m != "adaptive")
        rows.append({"B": B, "wall_s": med, "min": {m: min(v) for m, v in walls.items()},
                     "max": {m: max(v) for m, v in walls.items()}, "adaptive_vs_best": med["adaptive"] / best,
                     "best_mode": min((m for m in modes if m != "adaptive"), key=med.get),
                     "acceptance": {m: statistics.median(v) for m, v in acc.items() if v},
                     "adaptive_speculative_share": statistics.median(spec)})
        r = rows[-1]
        print(f"B={B:3d}  " + "  ".join(f"{m} {med[m]:.2f}" for m in modes)
              + f"  | best {r['best_mode']}, adaptive/best {r['adaptive_vs_best']:.3f}"
              + f" (adaptive speculated {r['adaptive_speculative_share']:.0%})", flush=True)
    if a.json:
        print(json.dumps({"recipe": a.recipe, "tokens": a.tokens, "repeats": a.repeats,
                          "drafter_compiled": a.compile_drafter, "rows": rows}))


if __name__ == "__main__":
    main()
