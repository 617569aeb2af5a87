"""compile_drafter: the drafter's single-token forwards through torch.compile'd layer chunks.

The engine-level lossless checks (exact distribution, target logprobs, greedy identity) run the
compiled path in test_engine_distribution.py and test_engine_paths.py; here: the compiled forward
computes the same function as the eager one, its graphs are reused across drafters and batch
sizes, a compiler failure falls back to eager without losing anything, and bad options are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from effroll.drafter.derive import derive_drafter
from effroll.engine import compiled as compiled_mod
from effroll.engine.kv_cache import KVCache
from effroll.engine.records import Plan
from effroll.engine.sampling import SamplingParams
from effroll.engine.torch_engine import TorchEngine

from conftest import needs_cxx, random_model, tiny_config

PROMPTS = [[1, 2, 3], [4, 5], [6] * 9, [7, 8, 9, 10], [11]]


def graphs(model) -> int:
    """Graphs dynamo holds for ``model``'s block structure (0 if it never compiled one)."""
    fn = compiled_mod._compiled.get(repr(model.layers[0]))
    return 0 if fn is None else len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))


def decode_steps(model, compiled: bool, batch: int, steps: int = 3):
    """Hidden states of ``steps`` single-token forwards after a 5-token prefill, and the KV cache."""
    m = copy.copy(model)
    m.compile_decode = compiled
    g = torch.Generator().manual_seed(batch)
    cache = KVCache(m.cfg, 6, 32, m.dtype, m.device)
    prompt = torch.randint(0, m.cfg.vocab_size, (batch, 5), generator=g)
    m(prompt, torch.zeros(batch, dtype=torch.long), cache, [0] * batch)
    hs = []
    for i in range(steps):
        tok = torch.randint(0, m.cfg.vocab_size, (batch, 1), generator=g)
        start = [5 + i + r for r in range(batch)]  # rows at different lengths
        hs.append(m(tok, torch.tensor(start), cache, start))
    return torch.cat(hs, 1), cache


@needs_cxx
@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_decode_matches_eager_float32(batch):
    m = random_model(tiny_config(vocab=50, layers=3), seed=11, std=0.3)
    h_e, c_e = decode_steps(m, False, batch)
    h_c, c_c = decode_steps(m, True, batch)
    assert compiled_mod.compile_error is None and graphs(m) >= 1
    torch.testing.assert_close(h_c, h_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c_c.k_all, c_e.k_all, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c_c.v_all, c_e.v_all, rtol=1e-4, atol=1e-4)


@needs_cxx
@torch.no_grad()
def test_compiled_int4_drafter_matches_eager_bf16():
    target = random_model(tiny_config(vocab=64, layers=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                      num_kv_heads=2, head_dim=32), seed=12, std=0.1).to(torch.bfloat16)
    d = derive_drafter(target, "rtn-sym-g64")
    h_e, _ = decode_steps(d, False, 3)
    h_c, _ = decode_steps(d, True, 3)
    assert compiled_mod.compile_error is None and graphs(d) >= 1
    p_e, p_c = (torch.softmax(d.logits(h), -1) for h in (h_e, h_c))
    # bf16: the fused kernels round differently; the draft distributions must still agree closely
    assert (p_e - p_c).abs().sum(-1).max().item() / 2 < 0.02


@needs_cxx
@torch.no_grad()
def test_graphs_are_reused_across_drafters_and_batch_sizes():
    cfg = tiny_config(vocab=40, layers=2, num_heads=4, num_kv_heads=4, head_dim=8)
    target = random_model(cfg, seed=13, std=0.3)
    d1 = random_model(cfg, seed=14, std=0.3)
    eng = TorchEngine(target, d1, max_batch=5, kmax=4, compile_drafter=True)  # compiles batch 1 and batch > 1
    n = graphs(d1)
    assert 1 <= n <= 2
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3)
    eng.generate(PROMPTS, params, plan=Plan(3))  # batch sizes 5 down to 1
    eng.set_drafter(random_model(cfg, seed=15, std=0.3))  # a new policy's drafter: same structure
    eng.generate(PROMPTS[:2], params, plan=Plan(2))
    assert graphs(d1) == n, "a new drafter or batch size recompiled"
    assert compiled_mod.compile_error is None


@torch.no_grad()
def test_compiler_failure_falls_back_to_eager(monkeypatch):
    m = random_model(tiny_config(vocab=30, layers=2), seed=16, std=0.3)
    h_e, c_e = decode_steps(m, False, 2)

    def broken(key):
        def fn(*args):
            raise RuntimeError("no C++ compiler")
        return fn

    monkeypatch.setattr(compiled_mod, "_compiled_for", broken)
    monkeypatch.setattr(compiled_mod, "compile_error", None)
    with pytest.warns(RuntimeWarning, match="decoding eagerly.*no C\\+\\+ compiler"):
        h_c, c_c = decode_steps(m, True, 2)
    assert "no C++ compiler" in compiled_mod.compile_error
    assert torch.equal(h_c, h_e) and torch.equal(c_c.k_all, c_e.k_all)  # eager, bit for bit


def test_bad_compile_option_is_refused():
    cfg = tiny_config(vocab=20, layers=1)
    target = random_model(cfg, seed=17)
    with pytest.raises(TypeError, match="compile_drafter must be a bool, got 'yes'"):
        TorchEngine(target, random_model(cfg, seed=18), compile_drafter="yes")


def test_the_target_is_never_compiled_even_as_its_own_drafter():
    cfg = tiny_config(vocab=20, layers=1)
    target = random_model(cfg, seed=19)
    eng = TorchEngine(target, target, compile_drafter=True)
    assert not target.compile_decode and eng.compile_s == 0.0
