"""Nothing lost, nothing misattributed: interrupted calls, bad seeds, concurrent callers, bad weights and
engine faults (issue 15). Each test injects one fault and checks that every output belongs to its request."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from effroll.engine import spec_step as te  # the step module that draws the uniforms
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams, stream_seed
from effroll.engine.records import BatchInputError
from effroll.engine.torch_engine import TorchEngine
from effroll import AdaptiveSpecRollout
from effroll.llm import LLM
from effroll.requests import GenerationOutput

from conftest import random_model, tiny_config

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def make_llm(**kw):
    cfg = tiny_config(vocab=97, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                      eos=(1,))
    return LLM(random_model(cfg, seed=21, std=0.3), recipe=kw.pop("recipe", "rtn-sym-g32"), max_batch=4, **kw)


def seeded(n, max_tokens=12, base=100, **kw):
    return [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=base + i, **kw) for i in range(n)]


def ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


class Interrupt:
    """A step listener that raises ``exc`` at step ``at`` (a Ctrl-C or a failing hook mid-generation)."""

    def __init__(self, at, exc=KeyboardInterrupt):
        self.at, self.exc, self.n = at, exc, 0

    def __call__(self, rec):
        self.n += 1
        if self.n == self.at:
            raise self.exc("injected")


def assert_empty(engine):
    assert not engine.active and not engine.waiting and not engine.finished


# ----------------------------------------------------------------------------- 1. interrupted calls
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_generate_leaves_nothing_behind(exc):
    llm = make_llm()
    ref = ids(llm.generate(PROMPTS, seeded(4, max_tokens=5, base=7)))
    llm.listeners.append(hook := Interrupt(3, exc))
    with pytest.raises(exc, match="injected"):
        llm.generate(PROMPTS, seeded(4, max_tokens=100, ignore_eos=True))
    llm.listeners.remove(hook)
    assert_empty(llm.engine)
    got = llm.generate(PROMPTS, seeded(4, max_tokens=5, base=7))  # before the fix: the old 100-token completions
    assert ids(got) == ref and all(len(c.token_ids) <= 5 for o in got for c in o.outputs)
    assert llm.update_policy(llm.model.state_dict()) > 0  # no "requests in flight" left over


@pytest.mark.parametrize("mode", ["ar", "sd", "adaptive"])
def test_interrupted_wrapped_rollout_leaves_nothing_behind(mode):
    llm = make_llm()
    sp = seeded(4, max_tokens=6, base=3)
    rollout = AdaptiveSpecRollout(lambda ps, sps: llm.generate(ps, sps), llm=llm, mode=mode, k=3, profile=None)
    ref = ids(rollout(PROMPTS, sp))
    llm.listeners.append(hook := Interrupt(2))
    with pytest.raises(KeyboardInterrupt):
        rollout(PROMPTS, seeded(4, max_tokens=80, ignore_eos=True))
    llm.listeners.remove(hook)
    assert_empty(llm.engine)
    assert llm.planner == Plan(0) and llm.listeners == []  # the session ended with the call
    if mode == "ar":  # AR tokens do not depend on what else was in the batch
        assert ids(rollout(PROMPTS, sp)) == ref
    rollout.update_policy(llm.model.state_dict())


def test_engine_generate_matches_outputs_by_id_and_keeps_other_callers_requests():
    llm = make_llm(recipe=None)
    eng = llm.engine
    eng.add_request([20, 21], SamplingParams(max_tokens=7, seed=1, ignore_eos=True), request_id="theirs")
    outs = eng.generate([[5, 6]], SamplingParams(max_tokens=3, seed=2, ignore_eos=True))
    assert len(outs) == 1 and len(outs[0].token_ids) == 3
    rest = []
    while eng.has_unfinished():
        eng.step()
    rest = eng.pop_finished()
    assert [(o.request_id, len(o.token_ids)) for o in rest] == [("theirs", 7)]


def test_duplicate_request_id_is_refused():
    eng = make_llm(recipe=None).engine
    eng.add_request([5], request_id="a")
    with pytest.raises(ValueError, match="request id 'a' is already in flight"):
        eng.add_request([6], request_id="a")


# ----------------------------------------------------------------------------- 2. seeds and in-step faults
@pytest.mark.parametrize("seed", [2**63, 2**70 + 5, -(2**63) - 9, 10**30])
def test_seeds_outside_int64_use_the_one_reduction_rule(seed):
    llm = make_llm()
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=seed)
    same = SamplingParams(temperature=1.0, max_tokens=8, seed=stream_seed(seed))
    assert -(2**63) <= stream_seed(seed) < 2**63 and stream_seed(seed) == stream_seed(seed + 2**64)
    assert ids(llm.generate(PROMPTS[:2], sp)) == ids(llm.generate(PROMPTS[:2], same))
    assert stream_seed(12345) == 12345 and stream_seed(-7) == -7  # int64 seeds are unchanged
    assert_empty(llm.engine)
    llm.update_policy(llm.model.state_dict())


def poison_uniforms(monkeypatch, poison):
    real = te.uniforms

    def uniforms(seeds, counters, n):
        if bool((seeds == poison).any()):
            raise RuntimeError(f"injected fault for seed {poison}")
        return real(seeds, counters, n)

    monkeypatch.setattr(te, "uniforms", uniforms)


@pytest.mark.parametrize("plan", [Plan(0), Plan(3)], ids=["ar", "sd"])
def test_a_request_failing_inside_a_step_fails_alone(monkeypatch, plan):
    llm = make_llm()
    sps = seeded(4, max_tokens=10)
    ref = llm.engine.generate(PROMPTS, sps, plan=Plan(0))
    poison_uniforms(monkeypatch, 102)  # request 2's seed
    with pytest.warns(RuntimeWarning, match="1 request.s. failed inside the engine"):
        got = llm.engine.generate(PROMPTS, sps, plan=plan)
    assert got[2].finish_reason == "error" and "injected fault for seed 102" in got[2].error
    assert got[2].token_ids == []
    for i in (0, 1, 3):
        assert got[i].finish_reason in ("stop", "length")
        if plan.k == 0:
            assert got[i].token_ids == ref[i].token_ids
    assert_empty(llm.engine)
    monkeypatch.undo()
    assert [o.token_ids for o in llm.engine.generate(PROMPTS, sps)] == [o.token_ids for o in ref]


def test_a_request_failing_in_prefill_fails_alone(monkeypatch):
    eng = make_llm(recipe=None).engine
    real = TorchEngine._prefill

    def prefill(self, row0, rows):
        if any(r.prompt[0] == 10 for r in rows):
            raise RuntimeError("injected prefill fault")
        return real(self, row0, rows)

    monkeypatch.setattr(TorchEngine, "_prefill", prefill)
    with pytest.warns(RuntimeWarning):
        got = eng.generate(PROMPTS, seeded(4))
    assert [o.finish_reason == "error" for o in got] == [False, False, True, False]
    assert "injected prefill fault" in got[2].error
    assert_empty(eng)


def test_error_output_keeps_the_tokens_already_generated(monkeypatch):
    eng = make_llm(recipe=None).engine
    steps = {"n": 0}
    real = te.uniforms

    def uniforms(seeds, counters, n):
        steps["n"] += 1
        if steps["n"] > 3 and bool((seeds == 55).any()):
            raise RuntimeError("late fault")
        return real(seeds, counters, n)

    monkeypatch.setattr(te, "uniforms", uniforms)
    with pytest.warns(RuntimeWarning):
        out = eng.generate([[5, 6]], SamplingParams(max_tokens=20, seed=55, ignore_eos=True))[0]
    assert out.finish_reason == "error" and len(out.token_ids) == len(out.logprobs) == 3


# ----------------------------------------------------------------------------- 3. concurrent callers
def run_threads(fns):
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_two_threads_on_one_llm_both_get_their_own_outputs():
    llm = make_llm()
    a, b = (PROMPTS, seeded(4, max_tokens=30, base=1)), (PROMPTS[::-1], seeded(4, max_tokens=20, base=50))
    ref = [ids(llm.generate(*a)), ids(llm.generate(*b))]
    got = run_threads([lambda: ids(llm.generate(*a)), lambda: ids(llm.generate(*b))])
    assert got == ref
    assert_empty(llm.engine)


def test_two_threads_on_one_wrapped_rollout_both_get_their_own_outputs():
    llm = make_llm()
    rollout = AdaptiveSpecRollout(lambda ps, sps: ids(llm.generate(ps, sps)), llm=llm, mode="ar")
    a, b = (PROMPTS, seeded(4, max_tokens=30, base=1)), (PROMPTS[::-1], seeded(4, max_tokens=20, base=50))
    ref = [rollout(*a), rollout(*b)]
    assert run_threads([lambda: rollout(*a), lambda: rollout(*b)]) == ref
    st = rollout.stats()
    assert st["rollouts"] == 4 and [h["tokens"] for h in st["history"][2:]] in (
        [st["history"][0]["tokens"], st["history"][1]["tokens"]],
        [st["history"][1]["tokens"], st["history"][0]["tokens"]])


# ----------------------------------------------------------------------------- 4. weights vs architecture
def hf_state(layers, seed=0, vocab=64):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    return cfg, transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def two_layer_llm(tmp_path_factory):
    cfg, m = hf_state(2)
    path = tmp_path_factory.mktemp("hf2") / "ckpt"
    m.save_pretrained(str(path))
    return LLM(str(path), recipe="rtn-sym-g32", dtype="fp32")


def test_update_policy_refuses_another_architecture(two_layer_llm):
    llm = two_layer_llm
    before = {k: v.clone() for k, v in llm.model.state_dict().items()}
    _, deeper = hf_state(3, seed=5)
    with pytest.raises(ValueError, match=r"model\.layers\.2\..*layers 2\.\.2: the target has 2 layers"):
        llm.update_policy(deeper.state_dict())
    good = hf_state(2, seed=6)[1].state_dict()
    with pytest.raises(ValueError, match="'model.extra.weight' that the target does not have"):
        llm.update_policy({**good, "model.extra.weight": torch.zeros(3)})
    bad = dict(good)
    bad["model.norm.weight"] = bad["model.norm.weight"].long()
    with pytest.raises(TypeError, match="dtype torch.int64; expected a floating-point tensor"):
        llm.update_policy(bad)
    with pytest.raises(ValueError, match="'layers.2.attn.qkv.weight' that the target does not have"):
        llm.update_policy({**llm.model.state_dict(), "layers.2.attn.qkv.weight": torch.zeros(1)})
    assert llm.version == 0
    assert all(torch.equal(v, before[k]) for k, v in llm.model.state_dict().items())
    assert llm.update_policy(good) > 0 and llm.version == 1  # the right architecture loads


# ----------------------------------------------------------------------------- 8. requests and parameters
def test_sampling_params_are_validated_not_coerced():
    llm = make_llm(recipe=None)
    for sp, msg in [({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
                    ({"n": 0}, "n .samples per request. must be >= 1, got 0"),
                    ({"n": -1}, "must be >= 1, got -1"),
                    ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
                    ({"temprature": 0.5}, "unknown sampling parameter.s. 'temprature'"),
                    ({"seed": 1.5}, "seed must be an int, got 1.5")]:
        with pytest.raises(BatchInputError, match=msg) as e:
            llm.generate([PROMPTS[0], PROMPTS[1]], [sp, {"max_tokens": 3}])
        outs = e.value.outputs
        assert all(isinstance(o, GenerationOutput) for o in outs)  # vLLM-shaped, like generate's result
        assert outs[0].outputs[0].finish_reason == "error" and outs[1].outputs[0].finish_reason != "error"

    class Penalised:
        temperature, max_tokens, repetition_penalty = 1.0, 4, 1.3

    with pytest.raises(BatchInputError, match="repetition_penalty=1.3 is not supported"):
        llm.generate([PROMPTS[0]], Penalised())
    assert_empty(llm.engine)


def test_numpy_and_tensor_prompts_are_token_ids():
    llm = make_llm(recipe=None)
    sp = SamplingParams(max_tokens=6, seed=4)
    ref = ids(llm.generate([PROMPTS[2]], sp))
    for p in (np.array(PROMPTS[2]), np.array(PROMPTS[2], dtype=np.int32), torch.tensor(PROMPTS[2]),
              [np.int64(t) for t in PROMPTS[2]], {"prompt_token_ids": np.array(PROMPTS[2])}):
        assert ids(llm.generate([p], sp)) == ref
    with pytest.raises(BatchInputError, match="prompt token id 1.5 is not an int"):
        llm.generate([[1.5, 2]], sp)
    with pytest.raises(BatchInputError, match="prompt token id True is not an int"):
        llm.generate([[True, 2]], sp)


@pytest.mark.parametrize("bad", [-5, 0, 1, 2.5, True])
def test_engine_arguments_are_checked_at_construction(bad):
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 2"):
        make_llm(recipe=None, max_seq_len=bad)
