"""Soak (issue 15): 200 rollouts of mixed valid and invalid requests, random interruptions and policy
updates, on one tiny LLM. Every completion that comes back must belong to its request (the same request
replayed alone gives the same tokens), memory must stay bounded, and the engine must end empty."""

from __future__ import annotations

import gc
import random

import pytest
import torch

from effroll.engine.sampling import SamplingParams
from effroll.engine.records import BatchInputError
from effroll import AdaptiveSpecRollout
from effroll.llm import LLM

from conftest import random_model, tiny_config

ROLLOUTS = int(__import__("os").environ.get("SOAK_ROLLOUTS", 200))
VOCAB = 97


class Interrupter:
    """A permanent step listener that raises KeyboardInterrupt at a chosen step of the next call."""

    def __init__(self):
        self.at = None

    def __call__(self, rec):
        if self.at is not None:
            self.at -= 1
            if self.at <= 0:
                self.at = None
                raise KeyboardInterrupt("soak interruption")


def random_request(rng: random.Random, i: int):
    """(prompt, sampling params, valid?) with a unique seed; about one in six is invalid."""
    prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 6))]
    sp = {"temperature": rng.choice([0.0, 0.7, 1.0]), "max_tokens": rng.randint(1, 24), "seed": 10_000 + i,
          "n": rng.choice([1, 1, 2])}
    kind = rng.random()
    if kind < 0.05:
        prompt = prompt + [VOCAB + 3]  # token out of range
    elif kind < 0.10:
        sp["max_tokens"] = 0
    elif kind < 0.13:
        sp["n"] = 0
    elif kind < 0.16:
        sp["temperature"] = "1.0"
    else:
        return prompt, sp, True
    return prompt, sp, False


@pytest.mark.slow
def test_soak_every_completion_belongs_to_its_request(monkeypatch):
    # effroll's INT4 kernel picks its summation order by the rows it multiplies at once (accumulator sets per
    # row block, a dequantized tile from 25 rows), so a row's drafts depend on the batch beside it; torch's
    # kernel computes each row the same way at any batch size, which the replay below needs.
    monkeypatch.setenv("EFFROLL_INT4_KERNEL", "torch")
    rng = random.Random(0)
    cfg = tiny_config(vocab=VOCAB, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                      eos=(1,))
    # float64: a row's numbers then do not depend on the rows beside it (batched float32 GEMMs differ in the
    # last bits with the batch size, which over 200 rollouts flips a sample), so a replay must match exactly.
    llm = LLM(random_model(cfg, seed=21, std=0.3).double(), recipe="rtn-sym-g32", max_batch=4, kmax=4)
    interrupt = Interrupter()
    llm.listeners.append(interrupt)
    # No watchdog: switching speculation off mid-rollout would change tokens between a call and its replay.
    wrappers = {m: AdaptiveSpecRollout(lambda ps, sps: llm.generate(ps, sps), llm=llm, mode=m, k=3, profile=None,
                                       watchdog=False)
                for m in ("ar", "sd")}
    n_req = checked = interrupted = updates = invalid = 0
    baseline = None
    for r in range(ROLLOUTS):
        if r == 40:
            baseline = live_objects(wrappers)
        if rng.random() < 0.08:
            state = {k: v + 0.01 * torch.randn_like(v) if "norm" not in k else v for k, v in llm.model.state_dict().items()}
            wrappers["ar"].update_policy(state)
            updates += 1
        reqs = [random_request(rng, n_req + j) for j in range(rng.randint(1, 7))]
        n_req += len(reqs)
        mode = rng.choice(["ar", "sd"])
        if rng.random() < 0.15:
            interrupt.at = rng.randint(1, 6)
        try:
            outs = wrappers[mode]([p for p, _, _ in reqs], [sp for _, sp, _ in reqs])
            bad = []
        except KeyboardInterrupt:
            interrupted += 1
            assert not llm.engine.has_unfinished() and not llm.engine.finished
            continue
        except BatchInputError as e:
            outs, bad = e.outputs, str(e)
        interrupt.at = None
        assert len(outs) == len(reqs)
        for (prompt, sp, valid), o in zip(reqs, outs):
            if not valid:
                invalid += 1
                assert all(c.finish_reason == "error" and c.error for c in o.outputs) and bad
                continue
            assert o.prompt_token_ids == prompt and len(o.outputs) == sp["n"]
            # Replay alone, same mode and policy: a row's tokens depend only on its own seed and draft lengths.
            replay = wrappers[mode]([prompt], [sp])[0]
            assert [c.token_ids for c in o.outputs] == [c.token_ids for c in replay.outputs]
            for c in o.outputs:
                assert len(c.token_ids) == len(c.logprobs) <= sp["max_tokens"]
                assert c.finish_reason in ("stop", "length")
            checked += 1
    assert not llm.engine.active and not llm.engine.waiting and not llm.engine.finished
    assert interrupted >= 10 and updates >= 5 and invalid >= 20 and checked >= 400, (interrupted, updates, invalid, checked)
    # Bounded: after warm-up nothing accumulates but the wrappers' history (one entry per call, by design;
    # cleared before each count), neither Python objects nor resident memory.
    objects, rss = live_objects(wrappers)
    assert objects - baseline[0] < 2000, f"{objects - baseline[0]} more live objects after {ROLLOUTS - 40} rollouts"
    assert rss - baseline[1] < 64 * 1024**2, f"resident memory grew {(rss - baseline[1]) / 1024**2:.0f} MiB"


def live_objects(wrappers) -> tuple[int, int]:
    """(live Python objects, resident bytes) with the wrappers' histories emptied."""
    import resource

    for w in wrappers.values():
        w.history.clear()
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    return len(gc.get_objects()), rss
