"""GRPO experiment (effroll.rl): reward parsing, task answers, the TRL rollout hook through
AdaptiveSpecRollout, per-group advantages, and policy sync after an optimizer step (fresh vs stale drafter).

Tiny setting: a random 2-layer HF Llama and a character-level tokenizer built in memory, saved to a
temporary checkpoint directory that effroll loads like any HF checkpoint.
"""

from __future__ import annotations

import re
import string

import pytest
import torch

from effroll.rl.tasks import completion_text, correctness_reward, final_number, make_problems
from effroll.llm import LLM

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------- tasks and reward
@pytest.mark.parametrize("text,value", [
    ("The answer is 12.", 12.0), ("3 + 4 = 7", 7.0), ("1,200 apples", 1200.0), ("it is -3", -3.0),
    ("12.5 then 12.0", 12.0), ("#### 17\nThe answer is 17.", 17.0), ("no number here", None), ("", None),
])
def test_final_number(text, value):
    assert final_number(text) == value


def test_correctness_reward_accepts_text_and_chat_messages_and_checks_lengths():
    comps = ["so 5 + 3 = 8", [{"role": "assistant", "content": "8.0"}], "I think 9", "nothing"]
    assert correctness_reward(comps, [8, 8, 8, 8]) == [1.0, 1.0, 0.0, 0.0]
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    with pytest.raises(ValueError, match="3 completions for 2 answers"):
        correctness_reward(comps[:3], [1, 2])
    with pytest.raises(TypeError, match="completion must be"):
        correctness_reward([42], [1])
    with pytest.raises(TypeError, match="expects a str"):
        final_number(42)


def _recompute(question: str) -> int:
    """Answer re-derived from the question text alone (independent of the generator's arithmetic)."""
    a, b = map(int, re.findall(r"\d+", question)[:2])
    if "+" in question or "more" in question:
        return a + b
    if "-" in question or "away" in question:
        return a - b
    assert "times" in question or "boxes" in question, question
    return a * b


def test_problems_are_seeded_and_answers_exact():
    p1, p2 = make_problems(60, seed=3), make_problems(60, seed=3)
    assert p1 == p2 and make_problems(60, seed=4) != p1
    for p in p1:
        assert p["answer"] == _recompute(p["question"])
        assert p["prompt"][0]["role"] == "user" and p["question"] in p["prompt"][0]["content"]
    assert len({p["question"].split()[0] for p in p1}) > 3  # a mix of templates
    with pytest.raises(ValueError, match="n must be"):
        make_problems(-1, seed=0)


# ----------------------------------------------------------------------------- tiny checkpoint
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_llm(path, recipe="rtn-sym-g32"):
    return LLM(path, recipe=recipe, dtype="fp32", max_batch=16, kmax=4)


PROBLEMS = make_problems(4, seed=1)


def test_keep_drafter_pins_the_old_drafter_and_stays_lossless(tiny_ckpt):
    llm = tiny_llm(tiny_ckpt)
    old = llm.drafter
    embed_before = old.embed.weight.detach().clone()
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in llm.model.state_dict().items()}
    secs = llm.update_policy(new, keep_drafter=True)
    assert secs >= 0 and llm.version == 1
    assert llm.drafter is old and old.meta.pinned_from == 0 and old.meta.policy_version == 1  # explicitly approved
    assert old.embed.weight is not llm.model.embed.weight  # private copy: not moved by the new weights
    assert torch.equal(old.embed.weight, embed_before)
    assert not torch.equal(llm.model.embed.weight, embed_before)
    llm.update_policy(new, keep_drafter=True)  # idempotent pinning, still the step-0 drafter
    assert llm.drafter is old and old.meta.pinned_from == 0 and old.meta.policy_version == 2
    llm.update_policy(new)  # default: a fresh drafter derived from the current weights
    assert llm.drafter is not old and llm.drafter.meta.policy_version == 3
    assert llm.drafter.meta.pinned_from is None
    assert llm.drafter.embed.weight is llm.model.embed.weight


def test_rollouts_are_grouped_seeded_and_greedy_identical_across_modes(tiny_ckpt):
    from effroll.rl.grpo import MODES, GreedyProbe, build_rollout, chat_prompt_ids, make_rollout_func

    llm = tiny_llm(tiny_ckpt)
    tok = llm.tokenizer
    prompts = [p["prompt"] for p in PROBLEMS for _ in range(3)]  # TRL passes each prompt group_size times
    sampled = make_rollout_func(llm, tok, max_tokens=12, temperature=1.0, seed=5)
    a, b = sampled(prompts), sampled(prompts)
    assert a["prompt_ids"] == [chat_prompt_ids(tok, p) for p in prompts]  # order kept: groups stay aligned
    assert all(len(c) == len(lp) and all(x <= 0 for x in lp) for c, lp in zip(a["completion_ids"], a["logprobs"]))
    assert a["completion_ids"] != b["completion_ids"]  # the call counter (TRL: global_step) moves the seeds
    assert len({tuple(c) for c in a["completion_ids"][:3]}) > 1  # one group: different samples

    greedy = make_rollout_func(llm, tok, max_tokens=24, temperature=0.0)
    outs = {m: build_rollout(llm, m, greedy, k=3)(prompts)["completion_ids"] for m in MODES}
    assert all(outs[m] == outs["ar"] for m in MODES), "greedy rollouts differ between modes"
    probe = GreedyProbe(llm, a["prompt_ids"][:4], "sd", max_tokens=16, k=3)
    res = probe.check()
    assert res["greedy_identical"] is True and len(res["greedy_digest"]) == 12 and res["greedy_divergence"] == []
    ref = probe.ar(probe.prompt_ids)[0]
    wrong = ref[:3] + [(ref[3] + 1) % llm.model.cfg.vocab_size] + ref[4:]  # what a broken sampler would emit
    div = probe._divergence(0, ref, wrong)
    assert div["pos"] == 3 and div["margin"] > 0 and div["near_tie"] is False  # fp32: a clear margin = a bug
    assert 0 <= div["numerics"] < 1e-3 < div["margin"]  # fp32: the two forward shapes agree closely
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        build_rollout(llm, "fast", greedy)


def varied_reward(completions, **kw):
    """The tiny random model never answers right: a reward that varies within groups."""
    # By the characters, not the length: with a character-level tokenizer most completions have the same length.
    return [float(sum(map(ord, c[-1]["content"])) % 5) for c in completions]


def _trainer(tiny_ckpt, mode, tmp_path, lr=1e-2):
    pytest.importorskip("trl")
    import datasets
    from transformers import AutoModelForCausalLM

    from effroll.rl.grpo import (DrafterDrift, StepLog, build_rollout, build_trainer, make_rollout_func,
                                 make_telemetry_callback)

    llm = tiny_llm(tiny_ckpt, recipe=None if mode == "ar" else "rtn-sym-g32")
    rollout = build_rollout(llm, mode, make_rollout_func(llm, llm.tokenizer, max_tokens=10, seed=1), k=3)
    log = StepLog(rollout, reward=varied_reward)
    policy = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    log.drift = DrafterDrift(llm, recipe="rtn-sym-g32")
    cb = make_telemetry_callback(log, mode, out=tmp_path / "log.jsonl", drift=log.drift, group_size=4, progress=False)
    trainer = build_trainer(policy, llm.tokenizer, log, datasets.Dataset.from_list(make_problems(8, seed=2)),
                            callbacks=[cb], group_size=4, prompts_per_step=2, micro_batch=4, max_tokens=10,
                            steps=1, lr=lr, seed=0, output_dir=tmp_path / "trainer")
    return llm, log, policy, cb, trainer


def test_advantages_are_normalised_per_group(tiny_ckpt, tmp_path):
    llm, log, policy, cb, trainer = _trainer(tiny_ckpt, "sd", tmp_path)
    rows = make_problems(3, seed=9)
    inputs = [dict(r) for r in rows for _ in range(4)]  # TRL's sampler order: each prompt group_size times
    out = trainer._generate_and_score_completions(inputs)  # TRL internals (trl 1.x): where advantages are made
    assert len(log.lengths) == 12
    r = torch.tensor(log.rewards).view(3, 4)
    adv = out["advantages"].view(3, 4)
    want = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv, want, atol=1e-4)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-5)
    assert any(float(g.std()) > 0 for g in r), "test needs a group with varied rewards"


@pytest.mark.parametrize("mode", ["sd", "sd-stale"])
def test_optimizer_step_syncs_policy_and_refreshes_or_keeps_drafter(tiny_ckpt, tmp_path, mode):
    import json

    llm, log, policy, cb, trainer = _trainer(tiny_ckpt, mode, tmp_path)
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    drafter0 = llm.drafter
    q0 = drafter0.layers[0].attn.qkv.state_dict()
    trainer.train()
    after = policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the optimizer step changed nothing"
    assert llm.version == 1
    w = torch.cat([after[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(llm.model.layers[0].attn.qkv.weight, w)  # the engine runs the new policy
    if mode == "sd":
        assert llm.drafter is not drafter0 and llm.drafter.meta.policy_version == 1
        q1 = llm.drafter.layers[0].attn.qkv.state_dict()
        assert any(not torch.equal(q0[k], q1[k]) for k in q0), "drafter not re-derived from the new weights"
    else:
        assert llm.drafter is drafter0 and drafter0.meta.pinned_from == 0
        assert all(torch.equal(q0[k], v) for k, v in drafter0.layers[0].attn.qkv.state_dict().items())
    # the kept (stale) drafter is still used: the engine's stale-drafter guard accepts the explicit request
    after_sync = log.rollout([p["prompt"] for p in PROBLEMS])
    last = log.rollout.stats()["last"]
    assert last["speculative_share"] > 0 and not any("stale_drafter" in e for e in last["events"])
    assert len(after_sync["completion_ids"]) == len(PROBLEMS)
    (rec,) = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert rec["mode"] == mode and rec["step"] == 1 and rec["policy_version"] == 1
    assert len(rec["rewards"]) == len(rec["lengths"]) == 8 and rec["speculative_share"] > 0
    assert rec["step_s"] >= rec["rollout_wall_s"] > 0 and rec["refresh_s"] > 0
    assert rec["drafter_from_version"] == (1 if mode == "sd" else 0)
    assert (rec["derive_s"] is not None) == (mode == "sd")
    # drift scoring ran on the step's rollouts under the policy that sampled them: both drafters from v0
    assert rec["accept_fresh"] == rec["accept_step0"] and 0 < rec["accept_fresh"] < 1 and rec["positions"] > 0
    moved = log.drift.measure(log.last, every=4)  # now under v1: the step-0 drafter is the stale one
    assert moved["accept_fresh"] > moved["accept_step0"]
