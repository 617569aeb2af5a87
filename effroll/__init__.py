"""effroll: lossless, adaptive self-speculative decoding for LLM RL rollouts.

Public names load lazily so that `effroll.control` (pure logic) never imports torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptiveSpecRollout": "effroll.dist.front",  # the local wrapper of effroll.rollout, plus workers=N
    "LLM": "effroll.llm",
    "SamplingParams": "effroll.engine.sampling",
    "TorchEngine": "effroll.engine.torch_engine",
    "Plan": "effroll.engine.records",
    "StepRecord": "effroll.engine.records",
    "Controller": "effroll.control",
    "derive_drafter": "effroll.drafter.derive",
    "load_model": "effroll.checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'effroll' has no attribute {name!r}")
