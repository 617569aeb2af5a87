"""The Ray rollout pool on a local Ray (2 CPUs): lossless and complete, in order, nothing lost when an actor
dies, one policy update reaching every actor, clear errors."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import ray
import torch

from effroll.checkpoints import save_hf_checkpoint
from effroll.digest import module_digest
from effroll.dist.pool import RayRolloutPool, WorkersLostError, assign, expected_work, prompt_key
from effroll.engine.sampling import SamplingParams, stream_seed
from effroll import AdaptiveSpecRollout
from effroll.llm import LLM

from conftest import random_model, tiny_config
from test_engine_distribution import DEPTH, PROMPT, chi_square_pvalue, exact_distribution

RECIPE = "rtn-sym-g32"
# Half a CPU per actor, so that two pools fit in the 2-CPU local Ray; no endless wait if they do not.
SMALL = dict(actor_options={"num_cpus": 0.5}, startup_timeout_s=120)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [16, 17, 18], [19], [20, 21, 22, 23], [24, 25]]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint on disk: what every node of a cluster would load."""
    cfg = tiny_config(vocab=97, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                      eos=(1,), max_position_embeddings=1024)
    return str(save_hf_checkpoint(random_model(cfg, seed=21, std=0.3), tmp_path_factory.mktemp("ray") / "ckpt"))


@pytest.fixture(scope="module")
def ar_pool(checkpoint):
    with RayRolloutPool(checkpoint, workers=2, mode="ar", recipe=RECIPE, dtype="fp32", max_batch=8, **SMALL) as pool:
        yield pool


def requests(n_rows=8, **kw):
    """Seeded sampling requests of different lengths (and so different expected work), some greedy / top-k."""
    sps = [SamplingParams(temperature=0.0 if i % 4 == 3 else 1.0, top_k=5 if i % 3 == 1 else 0,
                          max_tokens=6 + 5 * i, seed=100 + i, **kw) for i in range(n_rows)]
    return PROMPTS[:n_rows], sps


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_work_estimate_and_assignment():
    assert expected_work([1, 2, 3], SamplingParams(max_tokens=10)) == 13
    assert expected_work({"prompt_token_ids": [1, 2]}, {"max_tokens": 5, "n": 3}) == 17
    assert expected_work([1], {"max_tokens": "many"}) == 1  # invalid: the workers' check rejects it
    # Largest first onto the least-loaded worker, counting work already queued there.
    assert assign([10, 1, 4, 5], {0: 0.0, 1: 0.0}) == {0: [0], 1: [3, 2, 1]}
    assert assign([3, 3], {0: 5.0, 1: 0.0}) == {0: [], 1: [0, 1]}
    assert prompt_key([1, 2]) == prompt_key({"prompt_token_ids": (1, 2)}) != prompt_key([1, 3])
    assert prompt_key("hi") == prompt_key({"prompt": "hi"})


def test_outputs_match_in_process_engine_in_callers_order(ar_pool, checkpoint):
    prompts, sps = requests()
    sps[2] = SamplingParams(temperature=1.0, max_tokens=9, seed=7)
    ref_llm = LLM(checkpoint, recipe=None, dtype="fp32", max_batch=8)
    ref = ref_llm.generate(prompts, sps)
    before = {w: s["rollouts"] for w, s in ar_pool.stats()["workers"].items()}
    outs = ar_pool.generate(prompts, sps)
    assert [o.request_id for o in outs] == [str(i) for i in range(len(prompts))]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert tokens(outs) == tokens(ref)  # same per-request seeds, same tokens, whichever actor ran them
    for o, r in zip(outs, ref):
        assert o.outputs[0].finish_reason == r.outputs[0].finish_reason
        assert torch.allclose(torch.tensor(o.outputs[0].logprobs), torch.tensor(r.outputs[0].logprobs), atol=1e-5)
    st = ar_pool.stats()
    assert all(s["rollouts"] == before[w] + 1 for w, s in st["workers"].items())  # both actors took a share
    assert st["last"]["tokens"] == sum(len(t[0]) for t in tokens(outs)) and st["last"]["workers"] == 2
    assert st["pool"] == {"started": 2, "alive": [0, 1], "lost": {}, "requeued_requests": 0}

    # n > 1 stays on one actor, and so do equal prompts sent separately; unseeded copies are still independent.
    two = ar_pool.generate([{"prompt_token_ids": [5, 6]}], {"n": 2, "max_tokens": 5, "seed": 3})
    assert tokens(two) == tokens(ref_llm.generate([{"prompt_token_ids": [5, 6]}], {"n": 2, "max_tokens": 5, "seed": 3}))
    pair = ar_pool.generate([[5, 6, 7]] * 2, SamplingParams(max_tokens=24, ignore_eos=True))
    assert pair[0].outputs[0].token_ids != pair[1].outputs[0].token_ids  # each request its own seed
    # GRPO groups sent as equal prompts: each lands on one actor, which prefills its prompt once.
    ar_pool.generate([[30] * 12] * 4 + [[31, 32, 33]] * 4, SamplingParams(max_tokens=3, ignore_eos=True))
    last = ar_pool.stats()["last"]
    assert (last["prefill_tokens"], last["prefill_requested"]) == (11 + 2, 4 * 11 + 4 * 2)


def test_policy_update_reaches_every_actor(ar_pool, checkpoint):
    ref = LLM(checkpoint, recipe=RECIPE, dtype="fp32", max_batch=8)
    old = module_digest(ref.drafter)
    st = ar_pool.stats()
    version = st["policy_version"]
    assert {s["drafter_digest"] for s in st["workers"].values()} == {old}
    g = torch.Generator().manual_seed(5)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) if "norm" not in k else v
           for k, v in ref.model.state_dict().items()}
    secs = ar_pool.update_policy(new)
    ref.update_policy(new)
    want = module_digest(ref.drafter)
    assert secs > 0 and want != old
    st = ar_pool.stats()
    assert st["policy_version"] == version + 1 and len(st["workers"]) == 2
    for s in st["workers"].values():  # each actor re-derived exactly the drafter of the new weights
        assert s["policy_version"] == version + 1 and s["drafter_digest"] == want and s["drafter_error"] is None
    prompts, sps = requests()
    assert tokens(ar_pool.generate(prompts, sps)) == tokens(ref.generate(prompts, sps))  # the targets moved too

    bad = dict(new)
    bad["layers.0.mlp.down.weight"] = torch.full_like(bad["layers.0.mlp.down.weight"], float("nan"))
    with pytest.raises(ValueError, match="layers.0.mlp.down.weight"):
        ar_pool.update_policy(bad)
    with pytest.raises(TypeError, match="update_policy expects"):
        ar_pool.update_policy(42)
    st = ar_pool.stats()
    assert st["policy_version"] == version + 1
    assert all(s["drafter_digest"] == want and s["policy_version"] == version + 1 for s in st["workers"].values())


def test_invalid_requests_raise_before_anything_runs(ar_pool):
    rollouts = {w: s["rollouts"] for w, s in ar_pool.stats()["workers"].items()}
    prompts, sps = requests()
    prompts = prompts[:2] + [[5, 999]] + prompts[3:]
    sps[4] = SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError) as e:
        ar_pool.generate(prompts, sps)
    assert "prompt 2: prompt token id 999" in str(e.value) and "prompt 4: temperature" in str(e.value)
    assert "prompt 0" not in str(e.value)
    with pytest.raises(ValueError, match="text prompt given but the model has no tokenizer"):
        ar_pool.generate(["hello"], SamplingParams())
    with pytest.raises(ValueError, match="got 2 sampling params for 1 prompts"):
        ar_pool.generate([[5]], [SamplingParams()] * 2)
    assert {w: s["rollouts"] for w, s in ar_pool.stats()["workers"].items()} == rollouts  # nothing generated
    assert ar_pool.generate([], SamplingParams()) == []


def kill_during_generate(monkeypatch, pool, worker):
    """Kill ``worker`` once the pool waits for the shares of its next generate call: they have been handed
    out and run for 0.2 s, a fraction of what this workload takes (hundreds of engine steps per share)."""
    real_map, real_wait = pool._map, ray.wait

    def wait(*args, **kwargs):
        if worker in pool.workers:
            time.sleep(0.2)
            ray.kill(pool.workers[worker])
        return real_wait(*args, **kwargs)

    def mapped(method, items):
        if method == "generate":
            monkeypatch.setattr(ray, "wait", wait)
        return real_map(method, items)

    monkeypatch.setattr(pool, "_map", mapped)


def poisoner(poison):
    """A function for ``__ray_call__`` (nested, so Ray ships it by value): inside the actor, steps raise for
    rows seeded ``poison``; ``poisoner(None)`` undoes it."""

    def run(worker):
        from effroll.engine import spec_step as te

        real = te.__dict__.setdefault("_real_uniforms", te.uniforms)

        def uniforms(seeds, counters, n):
            if bool((seeds == poison).any()):
                raise RuntimeError(f"injected fault for seed {poison}")
            return real(seeds, counters, n)

        te.uniforms = real if poison is None else uniforms

    return run


def test_huge_seed_and_a_failing_request_fail_alone_in_the_pool(ar_pool):
    """A seed outside int64 runs (one reduction rule everywhere); a request that fails inside an actor's step
    comes back alone with finish_reason "error", the others complete and every actor stays."""
    prompts, sps = requests(4)
    sps[1] = SamplingParams(temperature=1.0, max_tokens=8, seed=stream_seed(2**70 + 3))
    ref = tokens(ar_pool.generate(prompts, sps))  # (earlier tests moved the pool's policy: compare with itself)
    sps[1] = SamplingParams(temperature=1.0, max_tokens=8, seed=2**70 + 3)
    assert tokens(ar_pool.generate(prompts, sps)) == ref
    actors = list(ar_pool.workers.values())
    ray.get([a.__ray_call__.remote(poisoner(102)) for a in actors])  # request 2's seed
    try:
        outs = ar_pool.generate(prompts, sps)
    finally:
        ray.get([a.__ray_call__.remote(poisoner(None)) for a in actors])
    bad = outs[2].outputs[0]
    assert bad.finish_reason == "error" and "injected fault for seed 102" in bad.error
    assert [t for i, t in enumerate(tokens(outs)) if i != 2] == [t for i, t in enumerate(ref) if i != 2]
    assert ar_pool.stats()["pool"]["alive"] == [0, 1]
    assert tokens(ar_pool.generate(prompts, sps)) == ref


def test_killed_actor_loses_no_request_then_clear_error(checkpoint, monkeypatch):
    prompts = [[5 + i, 6, 7][: 1 + i % 3] for i in range(8)]
    sps = [SamplingParams(temperature=1.0, max_tokens=600, ignore_eos=True, seed=i) for i in range(8)]
    ref = tokens(LLM(checkpoint, recipe=None, dtype="fp32", max_batch=8).generate(prompts, sps))
    pool = RayRolloutPool(checkpoint, workers=2, mode="ar", recipe=None, dtype="fp32", max_batch=8, **SMALL)
    try:
        kill_during_generate(monkeypatch, pool, 0)
        outs = pool.generate(prompts, sps)
        assert len(outs) == len(prompts) and tokens(outs) == ref  # every rollout once, same content
        monkeypatch.undo()
        st = pool.stats()["pool"]
        assert st["alive"] == [1] and "died" in st["lost"][0] and st["requeued_requests"] >= 1

        pool.timeout_s = 0.2  # the survivor cannot finish 8 x 600 tokens in 0.2 s: declared lost
        with pytest.raises(WorkersLostError, match="no rollout worker left") as e:
            pool.generate(prompts, sps)
        assert "returned nothing for timeout_s=0.2 s" in str(e.value) and "8 of 8 requests unfinished" in str(e.value)
        assert len(e.value.outputs) == 8
        assert pool.requeued == st["requeued_requests"]  # the last re-queue found no worker: not counted
        with pytest.raises(WorkersLostError, match="policy update reached none"):
            pool.update_policy(LLM(checkpoint, recipe=None, dtype="fp32").model)
    finally:
        pool.shutdown()


def test_adaptive_spec_rollout_workers_is_lossless(tiny_pair):
    """The engine's exact-distribution test through AdaptiveSpecRollout(workers=2): speculative, 2 actors."""
    target, drafter = tiny_pair
    params = SamplingParams(temperature=1.0, max_tokens=6)
    n = 20_000

    def rollout_fn(prompts):
        """completions only"""
        return [o.outputs[0].token_ids for o in rollout.llm.generate(prompts, params)]  # the pool's generate

    rollout = AdaptiveSpecRollout(rollout_fn, model=target, drafter=drafter, recipe=None, mode="sd", k=3,
                                  max_batch=500, kmax=5, workers=2, ray_address="auto", **SMALL)
    try:
        assert rollout.__doc__ == "completions only"
        outs = rollout([PROMPT] * n)
        assert len(outs) == n
        counts = Counter(tuple(o[:DEPTH]) for o in outs)
        assert chi_square_pvalue(counts, exact_distribution(target, PROMPT, params, DEPTH, eos={0}), n) > 1e-3
        st = rollout.stats()
        assert st["rollouts"] == 1 and st["last"]["tokens"] == sum(len(o) for o in outs)
        assert st["last"]["speculative_share"] > 0.5 and 0.1 < st["last"]["acceptance"] < 0.9
        assert all(s["rollouts"] == 1 for s in st["workers"].values()) and len(st["workers"]) == 2
    finally:
        rollout.pool.shutdown()


def test_bad_pool_arguments(tiny_pair):
    target, _ = tiny_pair
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        RayRolloutPool(target, workers=0)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        AdaptiveSpecRollout(None, model=target, workers=0)
    with pytest.raises(ValueError, match="pass model=, not llm="):
        AdaptiveSpecRollout(None, llm=LLM(target, recipe=None), workers=2)
    with pytest.raises(ValueError, match="timeout_s must be a number > 0 or None, got 0"):
        RayRolloutPool(target, timeout_s=0)
    with pytest.raises(ConnectionError, match=r"cannot reach a Ray cluster at ray_address='127.0.0.1:1'"):
        RayRolloutPool(target, ray_address="127.0.0.1:1", connect_timeout_s=2)
    with pytest.raises(ValueError, match="ray_address must be 'auto', 'host:port'"):
        AdaptiveSpecRollout(None, model=target, ray_address="nowhere")
