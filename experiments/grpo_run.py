"""GRPO on SmolLM2-135M-Instruct with rollouts through AdaptiveSpecRollout (issue 8).

One run = one mode:
  ar        plain autoregressive rollouts (no drafter at all: the reference)
  sd        fixed-K speculative rollouts, INT4 drafter re-derived after every optimizer step
  sd-stale  fixed-K speculative rollouts, drafter derived once at step 0 and never refreshed
  adaptive  the runtime controller toggles speculation and picks K; drafter re-derived every step

Same --seed => same problems, same prompt order, same per-completion sampling seeds in every mode.
Writes OUT/grpo_<mode>.jsonl: a "config" line, an "eval" line (temperature-1 samples of held-out
problems at the step-0 policy, with a mode-specific seed so the modes' samples are independent; the
lossless distribution test in grpo_plots.py compares them), a "probe" line (greedy AR vs fixed-K
speculation at step 0), then per optimizer step a "step" line (rollout wall s, end-to-end step s,
train s, refresh s, acceptance, share speculated, K histogram, rewards, lengths, greedy probe, and
accept_fresh / accept_step0: the fresh and the step-0 drafter scored on the same rollouts of this
step) and TRL's own "trl_log" line. Eval, greedy probe and drift scoring run outside the timed steps.

Learning rate: TRL trains fp32 master weights; the engine samples with their bf16 rounding. SmolLM2's
linear weights have median |w| = 0.12, where half a bf16 ulp is ~2.4e-4: one AdamW step of lr 1e-5
can change only ~2% of them (~14% after 8 same-sign steps), so at TRL-typical learning rates the
rollout policy barely moves within a short run. The default 5e-5 moves ~7% per step (~50% after 8);
--engine-dtype fp32 follows the master weights exactly at a slower decode.

Example (the four runs of issue 8, then the plots):
  for m in ar sd sd-stale adaptive; do
    nice -n 19 python experiments/grpo_run.py --mode $m --steps 8 --out experiments/out/grpo; done
  python experiments/grpo_plots.py experiments/out/grpo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

DEFAULT_MODEL = "/root/.cache/effroll/SmolLM2-135M-Instruct"


def parse_args(argv=None) -> argparse.Namespace:
    from effroll.rl.grpo import MODES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.environ.get("EFFROLL_MODEL", DEFAULT_MODEL), help="HF checkpoint directory")
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt (GRPO group)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (gradient accumulation)")
    ap.add_argument("--max-tokens", type=int, default=96, help="max new tokens per completion")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-5,
                    help="AdamW learning rate; the bf16 engine only sees updates above half a bf16 ulp (see docstring)")
    ap.add_argument("--fp32", action="store_true", help="train in plain fp32 (default: fp32 weights + bf16 autocast)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient to the reference model (0 = off)")
    ap.add_argument("--k", type=int, default=4, help="draft length for sd / sd-stale (adaptive: the controller's)")
    ap.add_argument("--explore-z", type=float, default=None,
                    help="adaptive: the controller's acceptance-probe optimism (default: the controller's, 0 = off)")
    ap.add_argument("--tag", default="", help="suffix of the output file name (grpo_<mode><tag>.jsonl)")
    ap.add_argument("--recipe", default="rtn-asym-g64", help="drafter recipe (quant/*.toml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-dtype", default="bf16", choices=("bf16", "fp32"), help="rollout engine dtype")
    ap.add_argument("--eval-samples", type=int, default=32, help="step-0 temperature-1 samples for the lossless test (0 = skip)")
    ap.add_argument("--probe-prompts", type=int, default=4, help="greedy identity probe prompts per step (0 = skip)")
    ap.add_argument("--probe-tokens", type=int, default=32)
    ap.add_argument("--drift-sequences", type=int, default=4,
                    help="rollouts per step scored by the fresh and the step-0 drafter (0 = skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", required=True, help="output directory")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM

    from effroll.rl.grpo import (DrafterDrift, GreedyProbe, StepLog, build_rollout, build_trainer, chat_prompt_ids,
                                 make_rollout_func, make_telemetry_callback)
    from effroll.rl.tasks import correctness_reward, make_problems
    from effroll.llm import LLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grpo_{args.mode}{args.tag}.jsonl"
    path.write_text("")

    def write(rec):
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    torch.manual_seed(args.seed)
    batch = args.prompts_per_step * args.group_size
    t_load = time.perf_counter()
    llm = LLM(args.model, recipe=None if args.mode == "ar" else args.recipe, max_batch=max(batch, 8), kmax=8,
              dtype=args.engine_dtype)
    tok = llm.tokenizer
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer; the GRPO experiment needs one (chat template)")
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    load_s = time.perf_counter() - t_load
    write({"kind": "config", **vars(args), "batch": batch, "load_s": load_s, "torch": torch.__version__,
           "trl": trl.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "initial_refresh_s": llm.refresh_s[:1]})

    # Lossless distribution check data: held-out problems, step-0 policy, mode-specific (independent) seeds.
    if args.eval_samples:
        probs = make_problems(args.eval_samples, args.seed + 100_003)
        eval_seed = zlib.crc32(f"eval:{args.seed}:{args.mode}".encode())
        ev = build_rollout(llm, args.mode, make_rollout_func(llm, tok, max_tokens=args.max_tokens,
                                                              temperature=args.temperature, seed=eval_seed), k=args.k)
        res = ev([p["prompt"] for p in probs])
        texts = tok.batch_decode(res["completion_ids"], skip_special_tokens=True)
        st = ev.stats()["last"]
        write({"kind": "eval", "mode": args.mode, "step": 0, "rewards": correctness_reward(texts, [p["answer"] for p in probs]),
               "lengths": [len(c) for c in res["completion_ids"]], "wall_s": st["wall_s"],
               "acceptance": st["acceptance"], "speculative_share": st["speculative_share"]})

    probe = None
    if args.probe_prompts:
        pp = [chat_prompt_ids(tok, p["prompt"]) for p in make_problems(args.probe_prompts, args.seed + 200_003)]
        probe = GreedyProbe(llm, pp, args.mode, max_tokens=args.probe_tokens, k=args.k)
        write({"kind": "probe", "mode": args.mode, "step": 0, **probe.check()})

    ckw = None if args.explore_z is None else {"explore_z": args.explore_z}
    rollout = build_rollout(llm, args.mode, make_rollout_func(llm, tok, max_tokens=args.max_tokens,
                                                               temperature=args.temperature, seed=args.seed), k=args.k,
                            controller_kwargs=ckw)
    log = StepLog(rollout)
    dataset = datasets.Dataset.from_list(make_problems(args.prompts_per_step * args.steps, args.seed))
    drift = DrafterDrift(llm, recipe=args.recipe, max_sequences=args.drift_sequences) if args.drift_sequences else None
    cb = make_telemetry_callback(log, args.mode, out=path, probe=probe, drift=drift, group_size=args.group_size)
    trainer = build_trainer(policy, tok, log, dataset, callbacks=[cb], group_size=args.group_size,
                            prompts_per_step=args.prompts_per_step, micro_batch=args.micro_batch,
                            max_tokens=args.max_tokens, steps=args.steps, lr=args.lr, beta=args.beta,
                            temperature=args.temperature, bf16=not args.fp32, seed=args.seed,
                            output_dir=out / f"trainer_{args.mode}")
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    recs = cb.records
    mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
    summary = {"kind": "summary", "mode": args.mode, "steps": len(recs), "train_wall_s": total,
               "mean_rollout_wall_s": mean("rollout_wall_s"), "mean_step_s": mean("step_s"),
               "mean_refresh_s": mean("refresh_s"), "mean_reward": mean("reward_mean"),
               "greedy_identical_steps": sum(r.get("greedy_identical") is True for r in recs),
               "greedy_clear_margin_divergences": sum(not d["near_tie"] for r in recs
                                                      for d in r.get("greedy_divergence", []))}
    write(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
