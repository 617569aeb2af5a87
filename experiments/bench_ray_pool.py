"""Overhead of the Ray rollout pool vs one in-process engine on the same workload (issue 7).

    python experiments/bench_ray_pool.py --model $(effroll fetch smollm2-135m | tail -1) --workers 1 2
    python experiments/bench_ray_pool.py --model tiny --requests 8 --max-tokens 16 --repeats 2   # smoke run

Workload: N seeded requests, temperature 1.0, exactly M new tokens each (EOS ignored), one mode (default
``ar``). For each pool size, every repeat runs the in-process ``AdaptiveSpecRollout`` and the pool back to
back, so drift on a shared machine hits both alike. Reported: wall seconds median [min-max], the
pool / in-process ratio of medians, and one ``update_policy`` (pool: one ray.put, every actor reloads and
re-derives its drafter). Pool start-up is reported apart. The local Ray gets ``--ray-cpus`` CPUs and each
actor one (Ray then gives it one torch thread); the in-process engine uses ``--threads`` (default 1, so the
ratio at one worker is the pool's own overhead: serialization, RPC, the request check round trip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def tiny_model():
    """A random 4-layer model (vocabulary 512) for a quick run without a checkpoint."""
    from effroll.engine.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
    g = torch.Generator().manual_seed(0)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * 0.05)
    return m.eval().requires_grad_(False)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint directory, or 'tiny' for a random model")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=["ar", "sd", "adaptive"], default="ar")
    ap.add_argument("--recipe", default="rtn-sym-g64")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: max --workers)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine (default 1, as "
                    "each actor gets with one CPU: the ratio at --workers 1 is then the pool's overhead alone)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import ray

    from effroll.dist.pool import RayRolloutPool
    from effroll.engine.sampling import SamplingParams
    from effroll import AdaptiveSpecRollout
    from effroll.llm import LLM

    torch.set_num_threads(a.threads)
    model = tiny_model() if a.model == "tiny" else a.model
    kw = dict(recipe=a.recipe, max_batch=a.requests, max_seq_len=a.max_tokens + 64)
    g = torch.Generator().manual_seed(1)
    llm = LLM(model, **kw)
    vocab = llm.model.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (8 + i % 8,), generator=g).tolist() for i in range(a.requests)]
    sps = [SamplingParams(temperature=1.0, max_tokens=a.max_tokens, ignore_eos=True, seed=i) for i in range(a.requests)]
    weights = {k: v.clone() for k, v in llm.model.state_dict().items()}
    local = AdaptiveSpecRollout(None, llm=llm, mode=a.mode)
    local(prompts[:2], sps[:2])  # warm-up

    ray.init(num_cpus=a.ray_cpus or max(a.workers), include_dashboard=False, log_to_driver=False)
    rows = []
    for w in a.workers:
        t = time.perf_counter()
        pool = RayRolloutPool(model, workers=w, mode=a.mode, **kw)
        start_s = time.perf_counter() - t
        pool.generate(prompts[:2 * w], sps[:2 * w])  # warm-up every actor
        res = {"local": [], "pool": [], "local_update": [], "pool_update": []}
        for _ in range(a.repeats):
            res["local"].append(timed(local, prompts, sps))
            res["pool"].append(timed(pool.generate, prompts, sps))
            res["local_update"].append(timed(local.update_policy, weights))
            res["pool_update"].append(timed(pool.update_policy, weights))
        threads = sorted({s["torch_threads"] for s in pool.stats()["workers"].values()})
        pool.shutdown()
        rows.append({"workers": w, "start_s": start_s, "actor_threads": threads, **res,
                     "ratio": statistics.median(res["pool"]) / statistics.median(res["local"])})
    ray.shutdown()

    tokens = a.requests * a.max_tokens
    if a.json:
        print(json.dumps({"model": str(a.model), "mode": a.mode, "requests": a.requests, "max_tokens": a.max_tokens,
                          "repeats": a.repeats, "local_threads": torch.get_num_threads(), "rows": rows}))
        return
    print(f"{a.requests} requests x {a.max_tokens} tokens ({tokens} tokens), mode {a.mode}, median [min-max] of "
          f"{a.repeats}; in-process torch threads {torch.get_num_threads()}")
    print(f"{'workers':>7} | {'start s':>7} | {'in-process s':>22} | {'pool s':>22} | {'pool/in-proc':>12} | "
          f"{'update in-proc s':>22} | {'update pool s':>22}")
    for r in rows:
        print(f"{r['workers']:>7} | {r['start_s']:7.1f} | {spread(r['local']):>22} | {spread(r['pool']):>22} | "
              f"{r['ratio']:11.2f}x | {spread(r['local_update']):>22} | {spread(r['pool_update']):>22}")


if __name__ == "__main__":
    main()
