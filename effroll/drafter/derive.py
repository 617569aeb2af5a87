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

from ..checkpoints import LINEAR_PATHS, check_tensors, expected_shapes, linear_name, policy_state, read_config
from ..engine.model import ModelConfig, Transformer, rope_inv_freq
from ..engine.records import DrafterMeta
from .gptq import HEAD, collect_hessians, gptq_quantize, gptq_quantize_batch
from .int4 import Int4Linear, Int8Linear, quantize_rtn
from .recipe import LINEAR_KINDS, Recipe, load_recipe
from .sampling import sample_continuations

WeightsLike = Transformer | Mapping[str, torch.Tensor] | str | Path


def _is_shared_name(name: str) -> bool:
    return name.startswith(("embed.", "lm_head.", "norm.")) or "_norm." in name


def _resolve(weights: WeightsLike, target: Transformer | None, cfg: ModelConfig | None):
    """(cfg, our-name tensors): checkpoints' one conversion (HF names are fused and checked there)."""
    if isinstance(weights, Transformer):
        return weights.cfg, dict(weights.named_parameters(remove_duplicate=False))
    if isinstance(weights, (str, Path)):
        cfg = ModelConfig.from_hf(read_config(weights))
        return cfg, policy_state(weights, cfg)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a Transformer, a state dict or a checkpoint path, got {type(weights).__name__}")
    cfg = cfg or (target.cfg if target is not None else None)
    if cfg is None:
        raise ValueError("derive_drafter: a state dict needs cfg= or target= to know the architecture")
    return cfg, policy_state(weights, cfg)


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
    NaN/Inf -> ValueError naming the key). The drafter's ``meta`` (a ``DrafterMeta``) records the recipe,
    the shared tensors and the derivation's wall time (``policy_version`` is the caller's to set).
    """
    t0 = time.perf_counter()
    recipe = load_recipe(recipe)
    if target is None and isinstance(weights, Transformer):
        target = weights
    cfg, tensors = _resolve(weights, target, cfg)
    shapes = expected_shapes(cfg)
    if target is not None:
        if expected_shapes(target.cfg) != shapes:
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
    check_tensors(shapes, src, needed)

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
    d.meta = DrafterMeta(recipe=recipe, shared_names=tuple(shared_names), calib_seconds=calib_s,
                         derive_seconds=time.perf_counter() - t0)
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
    (embedding, norms, shared LM head, unquantized linears: ``drafter.meta.shared_names``) are not counted."""
    shared = set(drafter.meta.shared_names if drafter.meta is not None else ()) if exclude_shared else set()
    tensors = _unique_tensors(drafter).values()
    skip = {id(t) for n, t in drafter.named_parameters(remove_duplicate=False) if n in shared}
    return sum(t.numel() * t.element_size() for _, t in tensors if id(t) not in skip)
