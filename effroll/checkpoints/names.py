"""The name map between HF Llama-family checkpoints and our modules, in both directions.

Ours fuses q/k/v into one ``qkv`` linear and gate/up into one ``gate_up`` linear (``engine.model``);
``from_hf`` fuses (checking every HF tensor's shape and refusing keys it does not use), ``to_hf``
splits back. Every other module that names a linear by kind (GPTQ Hessians, the export) uses
``LINEAR_PATHS`` and ``hf_linear_parts`` from here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..engine.model import ModelConfig, Transformer
from .tensors import check_tensors

LINEAR_PATHS = {"qkv": "attn.qkv", "o": "attn.o", "gate_up": "mlp.gate_up", "down": "mlp.down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
         "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}


def linear_name(layer: int, kind: str) -> str:
    """Module name of a target linear, e.g. ``layers.3.attn.qkv`` (also the key of its GPTQ Hessian)."""
    return f"layers.{layer}.{LINEAR_PATHS[kind]}"


def hf_linear_parts(cfg: ModelConfig, kind: str) -> tuple[list[str], list[int]]:
    """The HF linears one of ours is made of, and their output rows (in fusion order)."""
    hd = cfg.head_dim
    if kind == "qkv":
        return (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd])
    if kind == "gate_up":
        return ["mlp.gate_proj", "mlp.up_proj"], [cfg.intermediate_size, cfg.intermediate_size]
    if kind == "o":
        return ["self_attn.o_proj"], [cfg.hidden_size]
    return ["mlp.down_proj"], [cfg.hidden_size]


def _has_bias(cfg: ModelConfig, kind: str) -> bool:
    return {"qkv": cfg.qkv_bias, "o": cfg.o_bias, "gate_up": cfg.mlp_bias, "down": cfg.mlp_bias}[kind]


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of ``cfg`` holds, with its shape (``lm_head.weight`` only untied)."""
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    in_features = {"qkv": D, "o": cfg.num_heads * hd, "gate_up": D, "down": I}
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for kind in LINEAR_PATHS:
            for name, rows in zip(*hf_linear_parts(cfg, kind)):
                out[f"{p}{name}.weight"] = (rows, in_features[kind])
                if _has_bias(cfg, kind):
                    out[f"{p}{name}.bias"] = (rows,)
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (D,)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (hd,)
    return out


def _layers_hint(keys: list[str], cfg: ModelConfig, at: int) -> str:
    layers = sorted({int(k.split(".")[at]) for k in keys if len(k.split(".")) > at and k.split(".")[at].isdigit()
                     and k.split(".")[at - 1] == "layers"})
    return f" (layers {layers[0]}..{layers[-1]}: the target has {cfg.num_layers} layers)" if layers else ""


def from_hf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF Llama-family state dict as ours (q/k/v and gate/up fused). Raises ValueError naming the first
    missing key, a wrong shape, or a key the target does not have (a deeper model, a renamed tensor)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    shapes = hf_shapes(cfg)
    # Derived buffers (HF's rotary inv_freq) and a tied head's second name carry no weights of their own.
    extra = [k for k in sd if k not in shapes and not k.endswith("rotary_emb.inv_freq")
             and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
        raise ValueError(f"policy weights hold key {extra[0]!r} that the target does not have"
                         f"{_layers_hint(extra, cfg, 2)} ({len(extra)} unexpected)")
    check_tensors(shapes, sd, shapes)  # HF names in any error: the caller's own keys
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for kind, path in LINEAR_PATHS.items():
            names = hf_linear_parts(cfg, kind)[0]
            out[f"{q}{path}.weight"] = torch.cat([sd[f"{p}{n}.weight"] for n in names], 0)
            if _has_bias(cfg, kind):
                out[f"{q}{path}.bias"] = torch.cat([sd[f"{p}{n}.bias"] for n in names], 0)
        for hf, ours in NORMS.items():
            if f"{p}{hf}.weight" in shapes:
                out[f"{q}{ours}.weight"] = sd[f"{p}{hf}.weight"]
    return out


def dense_weight(module: Any, dtype: torch.dtype) -> torch.Tensor:
    """A linear's weight as the model computes with it (INT4/INT8 linears dequantize), in ``dtype``."""
    if hasattr(module, "dequantize"):
        return module.dequantize(dtype)
    return module.weight.detach().to(dtype)


LinearWriter = Callable[[str, Any, list[str], list[int]], dict[str, torch.Tensor]]


def split_rows(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    """``t`` split into row blocks of ``sizes``, each with its own storage (safetensors refuses shared ones)."""
    if t is None:
        return [None] * len(sizes)
    return [p.clone() for p in torch.split(t, sizes, dim=0)]


def dense_writer(dtype: torch.dtype) -> LinearWriter:
    """The default writer of ``to_hf``: a linear's dense weight (and bias), split into its HF parts."""
    def write(prefix: str, module: Any, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
        b = getattr(module, "bias", None)
        out = {}
        for n, w, x in zip(names, split_rows(dense_weight(module, dtype), sizes),
                           split_rows(None if b is None else b.detach().to(dtype), sizes)):
            out[f"{prefix}{n}.weight"] = w
            if x is not None:
                out[f"{prefix}{n}.bias"] = x
        return out

    return write


def _submodule(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


def to_hf(model: Transformer, linear: LinearWriter | None = None) -> dict[str, torch.Tensor]:
    """``model``'s tensors under HF names, in the model dtype. ``linear(prefix, module, hf_names, rows)``
    writes one fused linear's HF tensors (default: dense, rows split). ``lm_head.weight`` is written only
    when the head is not the embedding itself."""
    dt, cfg = model.dtype, model.cfg
    write = linear or dense_writer(dt)
    sd: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for kind, path in LINEAR_PATHS.items():
            sd.update(write(p, layer.get_submodule(path), *hf_linear_parts(cfg, kind)))
        for hf, ours in NORMS.items():
            norm = _submodule(layer, ours)
            if norm is not None:
                sd[f"{p}{hf}.weight"] = norm.weight.detach().to(dt).contiguous()
    sd["model.embed_tokens.weight"] = model.embed.weight.detach().to(dt).contiguous()
    sd["model.norm.weight"] = model.norm.weight.detach().to(dt).contiguous()
    if not is_tied(model):
        sd["lm_head.weight"] = dense_weight(model.lm_head, dt).contiguous()
    return sd


def is_tied(model: Transformer) -> bool:
    """The LM head is the embedding's own parameter (shared by reference)."""
    return getattr(model.lm_head, "weight", None) is model.embed.weight
