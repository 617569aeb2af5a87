"""INT4 self-drafter: packing, RTN/GPTQ maths, derivation, refresh, validation, fallback (tiny random models)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from effroll.drafter import (
    HessianCollector, Int4Linear, Int8Linear, collect_hessians, derive_drafter, drafter_nbytes, gptq_quantize,
    hessian_kinds, list_recipes, load_recipe, model_nbytes, quantize_rtn,
)
from effroll.drafter import int4 as I
from effroll.checkpoints import linear_name
from effroll.drafter.report import acceptance_kl, decode_step_seconds, drafter_report, weight_rel_err
from effroll.drafter.sampling import sample_continuations
from effroll.engine.kv_cache import KVCache, full_logits
from effroll.engine.model import ModelConfig, Transformer

from conftest import needs_cxx


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops are far faster single-threaded (and immune to OpenMP stalls on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(cfg: ModelConfig, seed: int = 0, std: float = 0.15, dtype=torch.float32) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.to(dtype).eval().requires_grad_(False)


PROMPTS = [[1, 5, 9, 200], [1, 77, 3], [1, 42, 42, 8, 100, 13], [1, 250]]


def to_hf(cfg: ModelConfig, m: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under HF names (splitting the fused qkv / gate_up)."""
    sd = {"model.embed_tokens.weight": m.embed.weight, "model.norm.weight": m.norm.weight}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = m.lm_head.weight
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, layer in enumerate(m.layers):
        p = f"model.layers.{i}."
        for n, w in zip("qkv", layer.attn.qkv.weight.split([q, kv, kv])):
            sd[p + f"self_attn.{n}_proj.weight"] = w
        gate, up = layer.mlp.gate_up.weight.split(cfg.intermediate_size)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
        sd[p + "mlp.down_proj.weight"] = layer.mlp.down.weight
        sd[p + "self_attn.o_proj.weight"] = layer.attn.o.weight
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ----------------------------------------------------------------------------- INT4 maths and packing


@pytest.mark.parametrize("kernel", ["effroll", "torch"])
@pytest.mark.parametrize("n,k,g,sym", [(64, 128, 32, True), (112, 96, 32, False), (48, 200, 64, False),
                                       (256, 64, 128, True), (80, 256, 128, False)])
def test_pack_roundtrip_and_kernel(n, k, g, sym, kernel, monkeypatch):
    monkeypatch.setenv(I.KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = quantize_rtn(w, g, sym)
    kp = qw.codes.shape[1]
    assert kp % g == 0 and kp >= k
    lin = Int4Linear(qw)
    assert lin.backend == ("cpu" if kernel == "torch" else "effroll")
    # exact round trip: codes (two independent decoders for torch's layout), scales and zeros
    assert torch.equal(lin.codes(), qw.codes)
    if kernel == "torch":
        assert torch.equal(I._probe_codes(lin.packed, n, kp, "cpu"), qw.codes)
        cap = torch.backends.cpu.get_cpu_capability()
        if cap.startswith(("AVX512", "AVX2")):  # layouts documented in ATen's int4mm_kernel.cpp
            assert torch.equal(I._decode_cpu_layout(lin.packed, n, kp, cap), qw.codes)
    s, z = lin.scales_zeros()
    assert torch.equal(s, qw.scales) and torch.equal(z, qw.zeros)
    assert torch.equal(lin.dequantize(), qw.dequantize())
    # the kernel computes x @ dequantized^T (bf16 activations)
    for m in (1, 3, 5):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        ref = x.float() @ qw.dequantize().T
        y = lin(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert float((y.float() - ref).norm() / ref.norm()) <= 1e-2
    # float32 activations are cast for the kernel and back
    x = torch.randn(2, 3, k, generator=gen)
    assert lin(x).dtype == torch.float32 and lin(x).shape == (2, 3, n)


def test_nibble_roundtrip():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(I.unpack_nibbles(I.pack_nibbles(q)), q)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_rtn_error_bound(sym, g):
    gen = torch.Generator().manual_seed(g)
    w = torch.randn(32, 256, generator=gen) * 0.02 + (0.0 if sym else 0.01)  # asym case: shifted groups
    qw = quantize_rtn(w, g, sym)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15
    s = qw.scales.float().repeat_interleave(g, 1)
    z = qw.zeros.float().repeat_interleave(g, 1)
    if sym:
        assert torch.equal(qw.zeros, torch.zeros_like(qw.zeros))
    err = (w - qw.dequantize()).abs()
    # |w - w_q| <= s/2, up to float32 arithmetic and the bf16 rounding of the zero point
    assert bool((err <= s / 2 * (1 + 1e-4) + z.abs() * 2**-8 + 1e-8).all())
    # asymmetric grids use their end points: each group's min -> code 0, max -> code 15
    if not sym:
        codes = qw.codes.view(32, -1, g)
        assert bool((codes.amin(-1) == 0).all()) and bool((codes.amax(-1) == 15).all())
    # asym never worse than sym on shifted data
    if not sym:
        assert float(err.pow(2).mean()) < float((w - quantize_rtn(w, g, True).dequantize()).pow(2).mean())


@pytest.mark.parametrize("sym", [True, False])
def test_refined_grids_never_worse(sym):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen) ** 3 * 0.02  # heavy tails: min/max grids waste levels
    plain, ref = quantize_rtn(w, 64, sym), quantize_rtn(w, 64, sym, refine_iters=3)
    e_plain = (w - plain.dequantize()).pow(2).view(64, 2, 64).sum(-1)
    e_ref = (w - ref.dequantize()).pow(2).view(64, 2, 64).sum(-1)
    assert bool((e_ref <= e_plain * (1 + 1e-6)).all())
    assert float(e_ref.sum()) < (0.97 if sym else 0.9) * float(e_plain.sum())
    assert sym == bool((ref.zeros == 0).all())
    torch.testing.assert_close(Int4Linear(ref)(w[:3]), w[:3] @ ref.dequantize().T, rtol=2e-2, atol=1e-3)


def test_ragged_last_group_ignores_padding():
    """in_features not a multiple of g: the padded (repeated) columns don't change any group's range."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 80, generator=gen)
    qw = quantize_rtn(w, 64, False)  # groups: 64 real columns, then 16 real + 48 padding
    last = w[:, 64:]
    assert torch.allclose(qw.scales[:, 1].float(), (last.amax(1) - last.amin(1)) / 15, rtol=1e-2)
    lin = Int4Linear(qw)
    x = torch.randn(4, 80, generator=gen)
    ref = x.bfloat16().float() @ qw.dequantize().T  # the kernel sees bf16 activations
    assert float((lin(x) - ref).norm() / ref.norm()) < 1e-2


def test_fallback_for_unsupported_shape_warns_once(monkeypatch):
    monkeypatch.setenv(I.KERNEL_ENV, "torch")  # effroll's kernel takes any N; torch's needs a multiple of 16
    __import__('effroll.once').once.forget()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=gen)  # out_features 40: the CPU packer needs a multiple of 16
    with pytest.warns(RuntimeWarning, match="out_features=40"):
        lin = Int4Linear(quantize_rtn(w, 32, True), bias=torch.randn(40, generator=gen))
    assert lin.backend is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin2 = Int4Linear(quantize_rtn(w, 32, False))  # same reason: no second warning
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(lin(x), x @ lin.dequantize().T + lin.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(lin2.codes(), quantize_rtn(w, 32, False).codes)
    assert lin.packed.numel() == 40 * 64 // 2  # still 4 bits per weight


def test_int8_linear():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 64, generator=gen)
    lin = Int8Linear(w)
    x = torch.randn(3, 64, generator=gen)
    ref = x @ w.T
    assert float((lin(x) - ref).norm() / ref.norm()) < 1e-2


# ----------------------------------------------------------------------------- GPTQ


def test_gptq_beats_rtn_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    n, k = 64, 128
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = (torch.randn(4096, k, generator=gen) * torch.linspace(0.1, 3, k)) @ mix  # anisotropic, correlated
    w = torch.randn(n, k, generator=gen) * 0.05
    H = x.T @ x / x.shape[0]

    def out_err(qw):
        return float((x @ (w - qw.dequantize()).T).pow(2).mean())

    for name in ("gptq-sym-g128", "gptq-asym-g64"):
        r = load_recipe(name)
        rtn = quantize_rtn(w, r.group_size, r.symmetric)
        gq = gptq_quantize(w, H, r)
        assert gq.codes.shape == rtn.codes.shape and gq.scales.shape == rtn.scales.shape
        assert out_err(gq) < 0.8 * out_err(rtn), name
        # compatible with the kernel
        lin = Int4Linear(gq)
        xb = x[:8].to(torch.bfloat16)
        ref = xb.float() @ gq.dequantize().T
        assert float((lin(xb).float() - ref).norm() / ref.norm()) < 1e-2
    import dataclasses
    r = load_recipe("gptq-sym-g128")
    r = dataclasses.replace(r, gptq=dataclasses.replace(r.gptq, act_order=True))
    assert out_err(gptq_quantize(w, H, r)) < 0.8 * out_err(quantize_rtn(w, 128, True))


def _textbook_gptq(w, H, g, sym, damp=0.01):
    """Unblocked GPTQ, one column at a time, group params from the updated weights at each group start."""
    W = w.clone().float()
    H = H + damp * H.diagonal().mean() * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(W.shape, dtype=torch.uint8)
    for c in range(W.shape[1]):
        if c % g == 0:
            s, z = I.group_params(W[:, c : c + g], sym)
        codes[:, c] = q = I.quantize_codes(W[:, c], s, z)
        err = (W[:, c] - ((q.float() - 8) * s.float() + z.float())) / U[c, c]
        W[:, c:] -= err[:, None] * U[c, c:][None]
    return codes


@pytest.mark.parametrize("g,block,sym", [(32, 32, True), (64, 32, False), (32, 48, False)])
def test_blocked_gptq_matches_textbook_algorithm(g, block, sym):
    gen = torch.Generator().manual_seed(g + block)
    x = torch.randn(1024, 128, generator=gen) @ (torch.eye(128) + torch.randn(128, 128, generator=gen) / 8)
    w = torch.randn(32, 128, generator=gen) * 0.05
    H = x.T @ x / 1024
    from effroll.drafter.gptq import gptq_quantize_batch

    ours = gptq_quantize_batch(w[None], H[None], g, sym, 0.01, block)[0].codes
    ref = _textbook_gptq(w, H, g, sym)
    assert float((ours != ref).float().mean()) < 1e-3  # equal up to float summation order


def test_hessian_collector_matches_layer_inputs():
    cfg = tiny_cfg()
    m = tiny_model(cfg)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with HessianCollector(m) as hc:
        cache = KVCache(cfg, 1, 8, m.dtype, "cpu")
        m(ids, torch.zeros(1, dtype=torch.long), cache, [0])
        assert hc.counts["layers.0.attn.o"] == 5 and not hc.sums  # buffered (flush_rows=256), counted
        H = hc.hessians()
    assert set(H) == {linear_name(i, k) for i in range(2) for k in ("qkv", "o", "gate_up", "down")}
    x = m.layers[0].attn_norm(m.embed(ids))[0]
    torch.testing.assert_close(H["layers.0.attn.qkv"], x.T @ x / 5, rtol=1e-5, atol=1e-6)
    assert hc.counts["layers.1.mlp.down"] == 5 and H["layers.1.mlp.down"].shape == (128, 128)
    # flushes under inference_mode and no_grad feed the same sums; sample_every=2 skips every other forward
    with HessianCollector(m, sample_every=2, flush_rows=3) as hc2:
        for ctx in (torch.inference_mode, torch.no_grad, torch.no_grad, torch.no_grad):
            with ctx():
                m(ids, torch.zeros(1, dtype=torch.long), KVCache(cfg, 1, 8, m.dtype, "cpu"), [0])
        assert hc2.tokens == 10 and hc2.counts["layers.1.mlp.down"] == 10  # buffered rows count too
        torch.testing.assert_close(hc2.hessians()["layers.0.attn.qkv"], H["layers.0.attn.qkv"])
    # hooks are gone after the context
    m(ids, torch.zeros(1, dtype=torch.long), KVCache(cfg, 1, 8, m.dtype, "cpu"), [0])
    assert hc.counts["layers.1.mlp.down"] == 5
    assert set(collect_hessians(m, [[1, 2, 3]], kinds=("o",))) == {"layers.0.attn.o", "layers.1.attn.o"}


def test_hessian_collector_bf16_model_sums_in_float32():
    cfg = tiny_cfg()
    m = tiny_model(cfg, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 3, 8]])
    with HessianCollector(m, ("qkv",), flush_rows=3) as hc:  # several bf16 flushes
        for _ in range(3):
            m(ids, torch.zeros(1, dtype=torch.long), KVCache(cfg, 1, 8, m.dtype, "cpu"), [0])
        H = hc.hessians()["layers.0.attn.qkv"]
    assert H.dtype == torch.float32
    x = m.layers[0].attn_norm(m.embed(ids))[0].float()
    torch.testing.assert_close(H, x.T @ x / 8, rtol=2e-2, atol=2e-2 * float(H.abs().max()))


# ----------------------------------------------------------------------------- derivation


def _acc(target, drafter, prompts=PROMPTS, n=24, seed=0):
    conts = sample_continuations(target, prompts, n, seed=seed)
    seqs = [p + c for p, c in zip(prompts, conts)]
    return acceptance_kl(target, drafter, seqs, [len(p) for p in prompts])["acceptance"]


@pytest.mark.parametrize("tied", [True, False])
def test_derive_shares_tensors_and_matches_target(tied):
    cfg = tiny_cfg(tie_word_embeddings=tied, qkv_bias=True)
    target = tiny_model(cfg, seed=1)
    d = derive_drafter(target, "rtn-sym-g32")
    assert isinstance(d, Transformer) and d.meta.recipe_name == "rtn-sym-g32" and d.meta.derive_seconds > 0
    assert d.embed.weight is target.embed.weight and d.norm.weight is target.norm.weight
    assert d.lm_head.weight is target.lm_head.weight
    for a, b in zip(d.layers, target.layers):
        assert a.attn_norm.weight is b.attn_norm.weight and a.mlp_norm.weight is b.mlp_norm.weight
        for kind in ("qkv", "o"):
            assert isinstance(getattr(a.attn, kind), Int4Linear)
        assert isinstance(a.mlp.gate_up, Int4Linear) and isinstance(a.mlp.down, Int4Linear)
        assert a.attn.qkv.bias is not None
    assert 0 < drafter_nbytes(d) < drafter_nbytes(d, exclude_shared=False) < model_nbytes(target)
    ids = list(range(1, 40, 3))
    lt, ld = full_logits(target, ids), full_logits(d, ids)
    # the drafter is exactly the model with dequantized weights (up to bf16 activations in the kernel) ...
    deq = tiny_model(cfg, seed=1)
    with torch.no_grad():
        for a, b in zip(d.layers, deq.layers):
            for path in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
                b.get_submodule(path).weight.copy_(a.get_submodule(path).dequantize())
    lq = full_logits(deq, ids)
    assert float((ld - lq).norm() / lq.norm()) < 0.03
    # ... which is close to the target (random tiny models amplify the ~10% weight error ~3x)
    assert 0.05 < weight_rel_err(target, d) < 0.12
    assert float((lt - ld).norm() / lt.norm()) < 0.4
    assert float((lt - full_logits(tiny_model(cfg, seed=11), ids)).norm() / lt.norm()) > 1.0  # vs unrelated
    assert _acc(target, d) > 0.8
    # shared means live: an in-place update of the target's embedding is seen by the drafter
    with torch.no_grad():
        target.embed.weight[3] += 1.0
    assert torch.equal(d.embed.weight[3], target.embed.weight[3])


def test_drafter_kv_cache_forward_matches_full_forward():
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=2)
    d = derive_drafter(target, "rtn-asym-g64")
    ids = torch.tensor([[1, 8, 30, 99, 4, 17, 3]])
    full = full_logits(d, ids[0])
    cache = KVCache(d.cfg, 1, 16, d.dtype, "cpu")
    h = d(ids[:, :4], torch.tensor([0]), cache, [0])
    steps = [d.logits(h)[0]]
    for t in range(4, 7):
        steps.append(d.logits(d(ids[:, t : t + 1], torch.tensor([t]), cache, [t]))[0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)


def test_derive_bf16_target_and_lm_head_modes():
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=3, dtype=torch.bfloat16)
    base = derive_drafter(target, "rtn-sym-g64")
    assert base.dtype == torch.bfloat16
    for head, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        d = derive_drafter(target, {"group_size": 64, "lm_head": head})
        assert isinstance(d.lm_head, cls) and d.embed.weight is target.embed.weight
        assert "lm_head.weight" not in d.meta.shared_names
        assert drafter_nbytes(d) > drafter_nbytes(base)  # the quantized head is the drafter's own
        assert _acc(target, d) > 0.75  # int4 head on a 64-wide toy model: ~0.79-0.82 depending on the samples
    # leaving linears out shares them with the target
    d = derive_drafter(target, {"group_size": 64, "linears": ["qkv", "gate_up"]})
    assert d.layers[0].attn.o.weight is target.layers[0].attn.o.weight
    assert isinstance(d.layers[0].mlp.gate_up, Int4Linear)
    dt, tt = decode_step_seconds([d, target], context=16, iters=2)
    assert dt > 0 and tt > 0
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        decode_step_seconds([d, target], context=16, iters=2, block=0)


def test_drafter_report_keys():
    target = tiny_model(tiny_cfg(), seed=3)
    rep = drafter_report(target, "rtn-sym-g32", PROMPTS, n_tokens=8, step_context=8, step_iters=2)
    for k in ("acceptance", "kl", "refresh_s", "drafter_bytes", "target_bytes", "drafter_step_s", "target_step_s",
              "drafter_step_s_run4", "target_step_s_run4"):
        assert rep[k] > 0, k
    assert 0 < rep["acceptance"] <= 1 and rep["drafter_bytes"] < rep["target_bytes"]
    assert rep["compiled"] is False and "compile_s" not in rep


@needs_cxx
def test_drafter_report_compiled_times_compiled_and_eager_drafter():
    target = tiny_model(tiny_cfg(), seed=3)
    plain = drafter_report(target, "rtn-sym-g32", PROMPTS, n_tokens=8, step_context=8, step_iters=2)
    rep = drafter_report(target, "rtn-sym-g32", PROMPTS, n_tokens=8, step_context=8, step_iters=2, compile=True)
    assert rep["compiled"] is True and rep["compile_s"] > 0
    for k in ("drafter_step_s_eager", "step_speedup_eager", "drafter_step_s_run4_eager", "step_speedup_run4_eager"):
        assert rep[k] > 0, k
    assert rep["acceptance"] == plain["acceptance"]  # scored by the same eager teacher-forced pass


def test_derive_from_state_dicts_and_checkpoint_dir(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=4)
    ref = full_logits(derive_drafter(target, "rtn-sym-g32"), [1, 2, 3, 4, 5])
    internal = {k: v.clone() for k, v in target.state_dict().items()}
    hf = to_hf(cfg, target)
    for w in (internal, hf):
        d = derive_drafter(w, "rtn-sym-g32", cfg=cfg)
        torch.testing.assert_close(full_logits(d, [1, 2, 3, 4, 5]), ref)
        assert d.embed.weight is not target.embed.weight
    d = derive_drafter(internal, "rtn-sym-g32", target=target)  # new linears, the target's shared tensors
    assert d.embed.weight is target.embed.weight
    torch.testing.assert_close(full_logits(d, [1, 2, 3, 4, 5]), ref)
    hf_cfg = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=True, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    save_file(hf, str(tmp_path / "model.safetensors"))
    d = derive_drafter(tmp_path, "rtn-sym-g32")
    torch.testing.assert_close(full_logits(d, [1, 2, 3, 4, 5]), ref)


def test_derive_gptq_with_hessians_and_calibration():
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=5)
    calib = [[1] + c for c in sample_continuations(target, [[1]] * 16, 32, seed=7)]
    H = collect_hessians(target, calib)
    d = derive_drafter(target, "gptq-sym-g128", hessians=H)
    assert isinstance(d.layers[1].mlp.down, Int4Linear) and d.meta.calib_seconds == 0
    d2 = derive_drafter(target, "gptq-sym-g128", calibration=calib)
    torch.testing.assert_close(full_logits(d, [1, 2, 3]), full_logits(d2, [1, 2, 3]))
    assert d2.meta.calib_seconds > 0
    a_gptq, a_rtn = _acc(target, d), _acc(target, derive_drafter(target, "rtn-sym-g128"))
    assert a_gptq > 0.75 and a_gptq > a_rtn - 0.02, (a_gptq, a_rtn)
    H.pop("layers.1.mlp.down")
    with pytest.raises(ValueError, match="layers.1.mlp.down"):
        derive_drafter(target, "gptq-sym-g128", hessians=H)


def test_gptq_int4_head_uses_the_final_hidden_states():
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=5)
    calib = [[1] + c for c in sample_continuations(target, [[1]] * 16, 32, seed=7)]
    recipe = {"method": "gptq", "symmetric": False, "group_size": 32, "lm_head": "int4"}
    assert hessian_kinds(recipe)[-1] == "lm_head" and "lm_head" not in hessian_kinds("gptq-sym-g128")
    assert "lm_head" not in hessian_kinds({**recipe, "method": "rtn"})
    H = collect_hessians(target, calib, hessian_kinds(recipe))
    # the head's Hessian is that of the final norm's output (the head's input)
    ids = torch.tensor([calib[0]])
    x = target(ids, torch.zeros(1, dtype=torch.long), KVCache(cfg, 1, ids.shape[1], target.dtype, "cpu"), [0])[0]
    H1 = collect_hessians(target, calib[:1], ("lm_head",))
    assert set(H1) == {"lm_head"}
    torch.testing.assert_close(H1["lm_head"], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    d = derive_drafter(target, recipe, hessians=H)
    d_rtn = derive_drafter(target, {**recipe, "method": "rtn"})
    assert isinstance(d.lm_head, Int4Linear) and "lm_head.weight" not in d.meta.shared_names
    # GPTQ minimises the head's output error on the calibration states: tr((W - Wq) H (W - Wq)^T)
    w = target.lm_head.weight.float()

    def out_err(m):
        e = w - m.lm_head.dequantize()
        return float(torch.einsum("nk,kl,nl->", e, H["lm_head"], e))

    assert out_err(d) < 0.8 * out_err(d_rtn), (out_err(d), out_err(d_rtn))
    # self-calibration collects the head's Hessian too; a Hessian set without it is refused by name
    assert isinstance(derive_drafter(target, recipe, calibration=calib).lm_head, Int4Linear)
    H.pop("lm_head")
    with pytest.raises(ValueError, match="no Hessian for 'lm_head'"):
        derive_drafter(target, recipe, hessians=H)
    with pytest.raises(ValueError, match="unknown kind 'head'"):
        HessianCollector(target, ("qkv", "head"))


def test_refresh_beats_stale_drafter_after_policy_step():
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=6)
    stale = derive_drafter(target, "rtn-sym-g32")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # simulated optimizer step on every weight (shared ones included)
        for p in target.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    fresh = derive_drafter(target, "rtn-sym-g32")
    a_fresh, a_stale = _acc(target, fresh), _acc(target, stale)
    assert a_fresh > a_stale + 0.05, (a_fresh, a_stale)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("hf", [False, True])
def test_bad_weights_raise_value_error_naming_the_key(hf):
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=7)
    good = to_hf(cfg, target) if hf else {k: v.clone() for k, v in target.state_dict().items()}
    key = "model.layers.1.mlp.down_proj.weight" if hf else "layers.1.mlp.down.weight"

    missing = dict(good)
    missing.pop(key)
    with pytest.raises(ValueError, match="missing key.*" + re.escape(key)):
        derive_drafter(missing, "rtn-sym-g32", cfg=cfg)
    bad = dict(good)
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=re.escape(key) + ".*shape"):
        derive_drafter(bad, "rtn-sym-g32", cfg=cfg)
    for val in (float("nan"), float("inf")):
        bad = dict(good)
        bad[key] = good[key].clone()
        bad[key][0, 5] = val
        with pytest.raises(ValueError, match=re.escape(key) + ".*NaN or Inf"):
            derive_drafter(bad, "rtn-sym-g32", cfg=cfg)
    if hf:  # a fused part with the wrong shape is named by its HF key
        bad = dict(good)
        bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 64)
        with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
            derive_drafter(bad, "rtn-sym-g32", cfg=cfg)
    with pytest.raises(ValueError, match="cfg= or target="):
        derive_drafter(good, "rtn-sym-g32")


def test_nan_in_target_module_raises():
    cfg = tiny_cfg()
    target = tiny_model(cfg, seed=8)
    with torch.no_grad():
        target.layers[0].attn.qkv.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.qkv\.weight.*NaN"):
        derive_drafter(target, "rtn-sym-g128")


# ----------------------------------------------------------------------------- recipes


def test_shipped_recipes_load():
    names = list_recipes()
    for n in ("rtn-sym-g128", "rtn-sym-g64", "rtn-sym-g32", "rtn-asym-g128", "rtn-asym-g64", "rtn-asym-g32",
              "gptq-sym-g128"):
        assert n in names
    for n in names:
        r = load_recipe(n)
        assert r.name == n and r.method in ("rtn", "gptq") and r.group_size in (32, 64, 128)
        assert r.method == n.split("-")[0] and r.symmetric == (n.split("-")[1] == "sym")
        g, _, head = n.split("-g")[1].partition("-")  # e.g. gptq-asym-g64-int4head
        assert r.group_size == int(g) and r.lm_head == (head.removesuffix("head") or "shared")


@pytest.mark.parametrize("text,needle", [
    ('method = "rtn"\nbits = 4\n', "'bits'"),
    ('method = "rtn"\ngroup_size = 48\n', "48"),
    ('method = "awq"\n', "'awq'"),
    ('lm_head = "fp8"\n', "'fp8'"),
    ('symmetric = "yes"\n', "'yes'"),
    ('linears = ["qkv", "lm"]\n', "'lm'"),
    ('method = "gptq"\n[gptq]\ndamp = 0.01\nblocksize = 64\n', "gptq.blocksize"),
    ('method = "gptq"\n[gptq]\ndamp = -1\n', "-1"),
    ('refine_iters = -2\n', "-2"),
    ('method = "rtn\n', "invalid TOML"),
])
def test_bad_recipe_raises(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_unknown_recipe_name():
    with pytest.raises(ValueError, match="no-such-recipe.*rtn-sym-g128"):
        load_recipe("no-such-recipe")
