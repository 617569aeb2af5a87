"""The one way in for policy weights: convert them to our names, check them against an architecture as a
whole, then copy them in place. Nothing changes unless every tensor passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..engine.model import ModelConfig, Transformer
from .names import _layers_hint, from_hf
from .read import read_state_dict
from .tensors import check_tensors


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names of ``cfg`` with their shapes (a tied head is left out)."""
    with torch.device("meta"):
        ref = Transformer(cfg)
    shapes = {k: tuple(p.shape) for k, p in ref.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def is_hf(sd: Mapping[str, Any]) -> bool:
    return any(str(k).startswith(("model.", "module.model.")) for k in sd)


def policy_state(weights: Any, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """New policy weights as our state dict: a Transformer, an HF- or internal-name state dict, an object with
    ``state_dict()`` (e.g. the trainer's HF model) or an HF checkpoint directory. HF names are converted
    (every key must map onto ``cfg``); check the result with :func:`check_state` / :func:`check_tensors`."""
    if isinstance(weights, Transformer):
        return dict(weights.state_dict())
    if isinstance(weights, (str, Path)):
        weights = read_state_dict(weights)
    if hasattr(weights, "state_dict") and not isinstance(weights, Mapping):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping):
        raise TypeError(f"update_policy expects a state dict, a checkpoint path or a model, got {type(weights).__name__}")
    return from_hf(cfg, weights) if is_hf(weights) else dict(weights)


def check_state(model: Transformer, sd: Mapping[str, Any], check_finite: bool = True) -> dict[str, nn.Parameter]:
    """Check our-name weights against ``model``'s architecture as a whole: exactly its keys (a tied head may be
    given or left out), shapes, floating dtypes, finite values. Returns ``model``'s parameters to copy into."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if model.cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)  # the embedding's own parameter object
    missing = [k for k in params if k not in sd]
    if missing:
        raise ValueError(f"policy weights are missing key {missing[0]!r} ({len(missing)} missing)")
    extra = [k for k in sd if k not in params and not (k == "lm_head.weight" and model.cfg.tie_word_embeddings)]
    if extra:
        raise ValueError(f"policy weights hold key {extra[0]!r} that the target does not have"
                         f"{_layers_hint(extra, model.cfg, 1)} ({len(extra)} unexpected)")
    check_tensors({k: tuple(p.shape) for k, p in params.items()}, sd, params, check_finite)
    return params


def copy_state(params: Mapping[str, nn.Parameter], sd: Mapping[str, torch.Tensor]) -> None:
    """Copy ``sd`` into the parameters :func:`check_state` returned (in place; casts to their dtype)."""
    with torch.no_grad():
        for k, t in params.items():
            t.copy_(sd[k])


def load_state(model: Transformer, sd: Mapping[str, torch.Tensor], check_finite: bool = True) -> None:
    """Check, then copy: a bad state dict leaves ``model`` untouched."""
    copy_state(check_state(model, sd, check_finite), sd)
