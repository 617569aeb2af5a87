"""Derive the INT4 self-drafter from the policy weights (run after every policy update).

The drafter is an ordinary :class:`~effroll.engine.model.Transformer` (same config, same KV-cache
forward ``drafter(tokens, start, cache, start_list)`` and ``drafter.logits(h)``) whose four linear
kinds (qkv, o, gate_up, down) are :class:`~effroll.drafter.int4.Int4Linear`. The embedding, all
norms and (with ``lm_head = "shared"``) the LM head are the target's own parameter objects, shared
by reference: no copy, and always as fresh as the target. Linears a recipe leaves out are shared
the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from effroll.engine.model import ModelConfig, Transformer, convert_hf_state_dict, rope_inv_freq

from .gptq import HEAD, LINEAR_PATHS, collect_hessians, gptq_quantize, gptq_quantize_batch, linear_name
from .int4 import Int4Linear, Int8Linear, quantize_rtn
from .recipe import LINEAR_KINDS, Recipe, load_recipe
from .sampling import sample_continuations

WeightsLike = Transformer | Mapping[str, torch.Tensor] | str | Path


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        ref = Transformer(cfg)
    shapes = {k: tuple(p.shape) for k, p in ref.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _is_shared_name(name: str) -> bool:
    return name.startswith(("embed.", "lm_head.", "norm.")) or "_norm." in name


def _resolve(weights: WeightsLike, target: Transformer | None, cfg: ModelConfig | None):
    """(cfg, internal-name tensors)."""
    if isinstance(weights, Transformer):
        return weights.cfg, dict(weights.named_parameters(remove_duplicate=False))
    if isinstance(weights, (str, Path)):
        from effroll.checkpoints import read_config, read_state_dict

        cfg = ModelConfig.from_hf(read_config(weights))
        return cfg, convert_hf_state_dict(cfg, read_state_dict(weights))
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a Transformer, a state dict or a checkpoint path, got {type(weights).__name__}")
    cfg = cfg or (target.cfg if target is not None else None)
    if cfg is None:
        raise ValueError("derive_drafter: a state dict needs cfg= or target= to know the architecture")
    if any(k.startswith(("model.", "module.model.")) for k in weights):
        _validate_hf(cfg, weights)
        return cfg, convert_hf_state_dict(cfg, weights)
    return cfg, dict(weights)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shapes of the HF tensors that get fused (q/k/v, gate/up) or renamed."""
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per = {"self_attn.q_proj.weight": (cfg.num_heads * hd, D), "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, D),
           "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, D), "self_attn.o_proj.weight": (D, cfg.num_heads * hd),
           "mlp.gate_proj.weight": (I, D), "mlp.up_proj.weight": (I, D), "mlp.down_proj.weight": (D, I),
           "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,)}
    out = {f"model.layers.{i}.{k}": v for i in range(cfg.num_layers) for k, v in per.items()}
    out.update({"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,),
                "lm_head.weight": (cfg.vocab_size, D)})
    return out


def _check_tensor(k: str, v: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"policy weight {k!r} must be a torch.Tensor, got {type(v).__name__}")
    if tuple(v.shape) != shape:
        raise ValueError(f"policy weight {k!r} has shape {tuple(v.shape)}, expected {shape}")
    # a sum is NaN/Inf if any element is (cheap); confirm element-wise, since a finite sum can overflow
    if not bool(torch.isfinite(v.sum(dtype=torch.float32))) and not bool(torch.isfinite(v).all()):
        raise ValueError(f"policy weight {k!r} contains NaN or Inf")


def _validate_hf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> None:
    """Shapes and values of the HF tensors present (missing ones are reported by the conversion)."""
    for k, shape in _hf_shapes(cfg).items():
        for name in (k, "module." + k):
            if name in sd:
                _check_tensor(name, sd[name], shape)


def _validate(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], needed: Sequence[str]) -> None:
    shapes = _expected_shapes(cfg)
    for k in needed:
        if k not in tensors:
            raise ValueError(f"policy weights are missing key {k!r}")
    for k in needed:
        _check_tensor(k, tensors[k], shapes[k])


def _param(t: torch.Tensor, device, dtype) -> nn.Parameter:
    if isinstance(t, nn.Parameter) and t.device == device and t.dtype == dtype:
        return t  # shared by reference
    return nn.Parameter(t.detach().to(device=device, dtype=dtype), requires_grad=False)


def _self_calibration(model: Transformer, recipe: Recipe, seed: int) -> list[list[int]]:
    """Calibration sequences sampled from the model itself (BOS-prompted, temperature 1)."""
    o = recipe.gptq
    bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else 0
    conts = sample_continuations(model, [[bos]] * o.calib_sequences, o.calib_tokens, seed=seed, stop_at_eos=False)
    return [[bos] + c for c in conts]


@torch.no_grad()
def derive_drafter(
    weights: WeightsLike,
    recipe: str | Path | Recipe | Mapping[str, Any],
    *,
    target: Transformer | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    calibration: Sequence[Sequence[int]] | None = None,
    cfg: ModelConfig | None = None,
    device: torch.device | str | None = None,
    layer_chunk: int = 8,
    seed: int = 0,
) -> Transformer:
    """Build the INT4 drafter of ``weights`` following ``recipe``.

    ``weights``: the target Transformer (usual case), an internal- or HF-name state dict (needs
    ``target=`` or ``cfg=``), or an HF checkpoint directory. With a target module (``weights`` itself
    or ``target=``) the embedding, norms and shared LM head are the target's parameter objects.
    GPTQ recipes use ``hessians`` (``{linear_name: H}``, e.g. from a HessianCollector on the
    target's verification passes); else they are collected on ``calibration`` token sequences, else
    on sequences self-sampled from the target. Everything is validated first (missing keys, shapes,
    NaN/Inf -> ValueError naming the key). Sets ``derive_seconds`` (wall time, including any
    Hessian collection, which is also in ``calib_seconds``), ``recipe_name``, ``recipe``, ``shared_names``.
    """
    t0 = time.perf_counter()
    recipe = load_recipe(recipe)
    if target is None and isinstance(weights, Transformer):
        target = weights
    cfg, tensors = _resolve(weights, target, cfg)
    shapes = _expected_shapes(cfg)
    if target is not None:
        if _expected_shapes(target.cfg) != shapes:
            raise ValueError("derive_drafter: the target's architecture does not match the weights' config")
        cfg = target.cfg
    linear_keys = [k for k in shapes if not _is_shared_name(k)]
    needed = linear_keys if target is not None else list(shapes)
    if recipe.lm_head != "shared" and target is not None:
        needed = needed + ["embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    src = dict(tensors)
    if target is not None:  # shared tensors come from the target module
        for k, p in target.named_parameters(remove_duplicate=False):
            if _is_shared_name(k):
                src[k] = p
    _validate(cfg, src, needed)

    dev = torch.device(device) if device is not None else (target.device if target is not None else src["embed.weight"].device)
    dtype = target.dtype if target is not None else src["embed.weight"].dtype

    # GPTQ Hessians (before building anything, so a failure leaves nothing half-built)
    calib_s = 0.0
    if recipe.method == "gptq":
        if hessians is None:
            if target is None:
                raise ValueError("derive_drafter: a GPTQ recipe needs hessians= or a target module to calibrate on")
            tc = time.perf_counter()
            seqs = calibration if calibration is not None else _self_calibration(target, recipe, seed)
            hessians = collect_hessians(target, seqs, hessian_kinds(recipe))
            calib_s = time.perf_counter() - tc
        wanted = {linear_name(i, kind): shapes[f"{linear_name(i, kind)}.weight"][1]
                  for i in range(cfg.num_layers) for kind in recipe.linears}
        if HEAD in hessian_kinds(recipe):
            wanted[HEAD] = cfg.hidden_size
        for name, k_in in wanted.items():
            if name not in hessians:
                raise ValueError(f"GPTQ: no Hessian for {name!r}"
                                 + (" (collect it with HessianCollector(model, hessian_kinds(recipe)))" if name == HEAD else ""))
            if tuple(hessians[name].shape) != (k_in, k_in):
                raise ValueError(f"GPTQ: Hessian for {name!r} has shape {tuple(hessians[name].shape)}, expected {(k_in, k_in)}")

    with torch.device("meta"):
        d = Transformer(cfg)
    shared_names = []
    for k in shapes:
        if _is_shared_name(k) and not (k == "lm_head.weight" and recipe.lm_head != "shared"):
            mod_name, _, pname = k.rpartition(".")
            setattr(d.get_submodule(mod_name), pname, _param(src[k], dev, dtype))
            shared_names.append(k)
    if cfg.tie_word_embeddings and recipe.lm_head == "shared":
        d.lm_head.weight = d.embed.weight
        shared_names.append("lm_head.weight")
    d.inv_freq = rope_inv_freq(cfg)[0].to(dev)

    def bias_of(i: int, kind: str):
        return src.get(f"{linear_name(i, kind)}.bias")

    for kind in LINEAR_KINDS:
        if kind in recipe.linears:
            continue
        for i in range(cfg.num_layers):  # not quantized: the target's linear, shared
            lin = d.layers[i].get_submodule(LINEAR_PATHS[kind])
            lin.weight = _param(src[f"{linear_name(i, kind)}.weight"], dev, dtype)
            shared_names.append(f"{linear_name(i, kind)}.weight")
            if lin.bias is not None:
                lin.bias = _param(bias_of(i, kind), dev, dtype)
                shared_names.append(f"{linear_name(i, kind)}.bias")

    step = max(1, layer_chunk) if recipe.method == "gptq" else 1  # GPTQ runs a chunk of layers as one batch
    for kind in recipe.linears:
        parent, attr = LINEAR_PATHS[kind].split(".")
        for c0 in range(0, cfg.num_layers, step):
            idx = list(range(c0, min(cfg.num_layers, c0 + step)))
            ws = [src[f"{linear_name(i, kind)}.weight"] for i in idx]
            if recipe.method == "gptq":
                o = recipe.gptq
                qws = gptq_quantize_batch(
                    torch.stack([w.detach().float() for w in ws]),
                    torch.stack([hessians[linear_name(i, kind)].float() for i in idx]),
                    recipe.group_size, recipe.symmetric, o.damp, o.block_size, o.act_order, recipe.refine_iters,
                )
            else:
                qws = [quantize_rtn(w, recipe.group_size, recipe.symmetric, recipe.refine_iters) for w in ws]
            for i, qw in zip(idx, qws):
                setattr(d.layers[i].get_submodule(parent), attr, Int4Linear(qw, bias_of(i, kind), device=dev))

    if recipe.lm_head != "shared":
        w = src["embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        if recipe.lm_head == "int8":
            d.lm_head = Int8Linear(w.to(dev))
        elif recipe.method == "gptq":  # error compensation on the final hidden states' Hessian
            qw = gptq_quantize(w.detach().to(dev).float(), hessians[HEAD].to(dev).float(), recipe)
            d.lm_head = Int4Linear(qw, device=dev)
        else:
            qw = quantize_rtn(w.to(dev), recipe.group_size, recipe.symmetric, recipe.refine_iters)
            d.lm_head = Int4Linear(qw, device=dev)

    leftover = [n for n, t in list(d.named_parameters()) + list(d.named_buffers()) if t.is_meta]
    assert not leftover, f"drafter has unbuilt tensors: {leftover}"
    d.eval()
    d.recipe, d.recipe_name, d.shared_names = recipe, recipe.name, shared_names
    d.calib_seconds = calib_s
    d.derive_seconds = time.perf_counter() - t0
    return d


def hessian_kinds(recipe: str | Path | Recipe | Mapping[str, Any]) -> tuple[str, ...]:
    """What a HessianCollector must collect for ``recipe``: its linears, plus the LM head's input when the
    recipe GPTQ-quantizes the head to INT4 (an INT8 head is per-channel RTN and needs none)."""
    recipe = load_recipe(recipe)
    head = (HEAD,) if recipe.method == "gptq" and recipe.lm_head == "int4" else ()
    return tuple(recipe.linears) + head


def _unique_tensors(model: nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    out: dict[int, tuple[str, torch.Tensor]] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if t is not None and id(t) not in out:
            out[id(t)] = (n, t)
    return out


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied tensors counted once)."""
    return sum(t.numel() * t.element_size() for _, t in _unique_tensors(model).values())


def drafter_nbytes(drafter: Transformer, exclude_shared: bool = True) -> int:
    """Bytes the drafter holds; with ``exclude_shared`` the tensors it shares with its target
    (embedding, norms, shared LM head, unquantized linears: ``drafter.shared_names``) are not counted."""
    shared = set(getattr(drafter, "shared_names", ())) if exclude_shared else set()
    tensors = _unique_tensors(drafter).values()
    skip = {id(t) for n, t in drafter.named_parameters(remove_duplicate=False) if n in shared}
    return sum(t.numel() * t.element_size() for _, t in tensors if id(t) not in skip)
