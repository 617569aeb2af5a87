"""Our forward pass matches HF transformers' logits for small random configs (float32)."""

from __future__ import annotations

import pytest
import torch
import transformers

from effroll.engine.kv_cache import KVCache, full_logits
from effroll.checkpoints import from_hf as convert_hf_state_dict, load_state
from effroll.engine.model import ModelConfig, Transformer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-rope-llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_scaling=LLAMA3_ROPE)),
    "llama-rope-linear": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
}


def build(case: str):
    Cfg, Model, extra = CASES[case]
    torch.manual_seed(0)
    hc = Cfg(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **extra)
    hm = Model(hc).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for name, p in hm.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    cfg = ModelConfig.from_hf(hc.to_dict())
    ours = Transformer(cfg).eval()
    load_state(ours, convert_hf_state_dict(cfg, hm.state_dict()))
    return hm, ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case):
    hm, ours = build(case)
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hm(ids).logits[0].float()
    got = full_logits(ours, ids[0])
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, f"{case}: relative error {rel:.2e}"


def test_incremental_decode_matches_full_forward():
    """Prefill + token-by-token decode through the KV cache equals one full forward."""
    _, ours = build("qwen3")
    ids = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(2))
    ref = full_logits(ours, ids)
    cache = KVCache(ours.cfg, 2, 64, torch.float32, "cpu")
    with torch.no_grad():
        h = ours(ids[:30].view(1, -1), torch.tensor([0]), cache, row0=1)
        steps = [ours.logits(h)[0]]
        for t in range(30, 40):
            steps.append(ours.logits(ours(ids[t].view(1, 1), torch.tensor([t]), cache, row0=1))[0])
    got = torch.cat(steps)
    assert (got - ref).abs().max().item() <= 1e-4


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf(dict(transformers.MistralConfig(sliding_window=16).to_dict()))
    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="unsupported rope scaling 'dynamic'"):
        ModelConfig.from_hf(transformers.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **small).to_dict())


def test_load_state_validates_before_copying():
    _, ours = build("llama")
    before = ours.embed.weight.clone()
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["embed.weight"] = sd["embed.weight"] + 1
    sd["layers.1.attn.o.weight"] = torch.full_like(sd["layers.1.attn.o.weight"], float("nan"))
    with pytest.raises(ValueError, match="layers.1.attn.o.weight"):
        load_state(ours, sd)
    assert torch.equal(ours.embed.weight, before)  # nothing copied
    del sd["layers.1.attn.o.weight"]
    with pytest.raises(ValueError, match="missing key 'layers.1.attn.o.weight'"):
        load_state(ours, sd)
    with pytest.raises(ValueError, match="missing key 'model.layers.0.self_attn.q_proj.weight'"):
        convert_hf_state_dict(ours.cfg, {"model.embed_tokens.weight": before, "model.norm.weight": torch.ones(64)})
