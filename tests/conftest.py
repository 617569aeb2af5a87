"""Shared fixtures: tiny random Llama-family models (float32) with small vocabularies."""

from __future__ import annotations

import pytest
import torch

from effroll.engine.model import ModelConfig, Transformer


def _cxx_reason() -> str | None:
    """Why torch.compile cannot build CPU kernels here (None: it can)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means no usable compiler
        return f"no C++ compiler for torch.compile ({type(e).__name__}: {e})"


NO_CXX = _cxx_reason()
# compile_drafter tests: without a compiler the engine warns and drafts eagerly (tested with a stand-in failure)
needs_cxx = pytest.mark.skipif(NO_CXX is not None, reason=NO_CXX or "")


def tiny_config(vocab: int = 8, layers: int = 2, eos: tuple[int, ...] = (), **kw) -> ModelConfig:
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=eos, rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int, std: float = 0.4) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval().requires_grad_(False)


def perturbed_copy(m: Transformer, seed: int, scale: float) -> Transformer:
    """A drafter that differs from the target: same architecture, weights + relative noise."""
    g = torch.Generator().manual_seed(seed)
    d = Transformer(m.cfg)
    d.load_state_dict(m.state_dict())
    with torch.no_grad():
        for name, p in d.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return d.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_pair():
    """(target, drafter) with vocabulary 8 and EOS = 0; acceptance well below 1."""
    cfg = tiny_config(vocab=8, eos=(0,))
    target = random_model(cfg, seed=1, std=0.5)
    drafter = perturbed_copy(target, seed=2, scale=0.3)
    return target, drafter


@pytest.fixture(scope="session")
def small_pair():
    """(target, drafter) with a larger vocabulary for greedy / logprob tests."""
    cfg = tiny_config(vocab=97, layers=3, eos=(1,))
    target = random_model(cfg, seed=3, std=0.3)
    drafter = perturbed_copy(target, seed=4, scale=0.3)
    return target, drafter
