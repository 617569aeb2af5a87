"""Shared prompt prefill (engine/prefill.py): groups and common prefixes are prefilled once, losslessly.

Exactness: in float64 a row's numbers do not depend on the rows beside it, so the same seeded requests must
give the same tokens with and without sharing, token for token, on every path (AR, fixed K, per-row K,
toggled, with the drafter on the target's cache or its own). Logprobs must equal a fresh full forward.
The distribution suite (test_engine_distribution.py) samples one prompt 20,000 times, so it runs through
the exact-copy path; its ``-noshare`` setting keeps the unshared path covered.
"""

from __future__ import annotations

import pytest
import torch

from effroll.engine.prefill import MIN_SHARED, Share, plan_shares
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams
from effroll.engine.torch_engine import TorchEngine

from conftest import perturbed_copy, random_model, tiny_config
from test_engine_paths import reference_logprobs

SYSTEM = list(range(10, 10 + MIN_SHARED + 4))  # a shared "system prompt" long enough to be copied
GROUP_PROMPT = SYSTEM + [3, 4, 5]


def test_plan_shares_groups_prefixes_and_old_rows():
    p = list(range(10, 30))
    shares = plan_shares([p, p, p + [1], p + [2], [1, 2], [1, 2], [], [3] * 5], [])
    assert shares == [Share(None, 0), Share(0, 20), Share(0, 20), Share(0, 20), Share(None, 0), Share(4, 2),
                      Share(None, 0), Share(None, 0)]
    # Old rows are sources too (a group split over two admissions), and a short whole prompt is still copied.
    assert plan_shares([p, p[:12] + [9], [1, 2]], [p + [5, 6], [1, 2, 3]]) == [Share(0, 20), Share(0, 12), Share(1, 2)]
    # A partial prefix shorter than MIN_SHARED is computed: the remainder's extra forward would cost more.
    short = [7] * (MIN_SHARED - 1)
    assert plan_shares([short + [1], short + [2]], []) == [Share(None, 0), Share(None, 0)]
    assert plan_shares([short + [1, 1], short + [1, 2]], []) == [Share(None, 0), Share(0, MIN_SHARED)]


@pytest.fixture(scope="module")
def f64_pair():
    cfg = tiny_config(vocab=97, layers=2, eos=(1,), hidden_size=64, intermediate_size=128, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    target = random_model(cfg, seed=5, std=0.3).double()
    return target, perturbed_copy(target, seed=6, scale=0.3).double()


def mixed_k(view):  # K by request, not by slot: sharing moves rows between slots
    return Plan(0, per_row={rid: 1 + sum(map(ord, rid)) % 3 for rid in view.request_ids})


def toggled():
    n = [0]

    def plan(view):
        n[0] += 1
        return Plan(3 if n[0] % 3 else 0)

    return plan


PLANS = {"ar": lambda: Plan(0), "k3": lambda: Plan(3), "mixedK": lambda: mixed_k, "toggled": toggled}


def requests():
    """A GRPO-shaped batch: a group of 6 samples of one prompt (as the n samples of a request, or TRL's equal
    prompts sent separately), prompts sharing only the system prompt, an unrelated prompt; seeded, T = 1."""
    prompts = [GROUP_PROMPT] * 6 + [SYSTEM + [6], SYSTEM + [7, 8, 9, 2], [40, 41, 42]]
    params = [SamplingParams(temperature=1.0, max_tokens=8 + i, seed=100 + i) for i in range(len(prompts))]
    return prompts, params


@pytest.mark.parametrize("share_kv", [True, False], ids=["shared-kv", "own-cache"])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("max_batch", [16, 3], ids=["one-admission", "rows-join-mid-batch"])
def test_sharing_changes_no_token_and_no_logprob(f64_pair, plan, share_kv, max_batch):
    target, drafter = f64_pair
    prompts, params = requests()
    runs, prefill = {}, {}
    for share in (False, True):
        eng = TorchEngine(target, drafter, max_batch=max_batch, kmax=4, share_kv=share_kv, share_prefill=share)
        recs = []
        runs[share] = eng.generate(prompts, params, plan=PLANS[plan](), on_step=recs.append)
        prefill[share] = (sum(r.prefill_tokens for r in recs), sum(r.prefill_requested for r in recs))
    assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    for prompt, sp, o in zip(prompts, params, runs[True]):
        ref = reference_logprobs(target, prompt, o, sp)
        assert (ref - torch.tensor(o.logprobs, dtype=ref.dtype)).abs().max().item() <= 1e-9
    asked = sum(len(p) - 1 for p in prompts)
    assert prefill[False] == (asked, asked)
    # Shared: the group prompt once, the system prompt once, each row's own suffix, the unrelated prompt.
    # GROUP_PROMPT's feed holds SYSTEM; SYSTEM+[6] feeds SYSTEM only (copied), SYSTEM+[7,8,9,2] its 3 more.
    unique = len(GROUP_PROMPT) - 1 + 3 + 2
    computed, requested = prefill[True]
    assert requested == asked
    if max_batch >= 16:
        assert computed == unique, (computed, unique)
    else:  # a row that joins later copies from an active row of its group, if one is still running
        assert computed < asked / 2, (computed, asked)


def test_group_of_n_prefills_one_prompt(f64_pair):
    """n = 8 samples of a 40-token prompt: 39 prompt tokens computed, not 8 x 39; the telemetry says so."""
    target, drafter = f64_pair
    prompt = [int(t) for t in torch.randint(2, 97, (40,), generator=torch.Generator().manual_seed(0))]
    eng = TorchEngine(target, drafter, max_batch=8, kmax=4)
    recs = []
    outs = eng.generate([prompt] * 8, [SamplingParams(temperature=1.0, max_tokens=6, seed=3 + s) for s in range(8)],
                        plan=Plan(2), on_step=recs.append)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # eight samples, not one copied eight times
    assert sum(r.prefill_tokens for r in recs) == 39 and sum(r.prefill_requested for r in recs) == 8 * 39


def test_share_prefill_must_be_a_bool(f64_pair):
    with pytest.raises(TypeError, match="share_prefill must be a bool, got 'yes'"):
        TorchEngine(f64_pair[0], share_prefill="yes")
