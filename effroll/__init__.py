"""effroll: lossless, adaptive self-speculative decoding for LLM RL rollouts."""

__version__ = "0.1.0"
