"""A block's glue (RMSNorm, RoPE with the cache writes, attention over the cache, SiLU * up): effroll's ops for bf16
on x86 CPUs with AVX2, else torch's.

``EFFROLL_GLUE_KERNEL`` ``auto`` (and ``effroll``) take ``torch.ops.effroll.*`` (``kernels/decode_ops.cpp``)
wherever the library builds: at batch 1 torch's RMSNorm and masked SDPA cost more per call than the linears they
sit between (experiments/README.md section 11). The attention op computes every
query on its own (its row's keys 0..pos, fp32 softmax), so a position gets the same output in decode, verify and
prefill, whatever the batch; the others work element by element (one rounding each). Inside torch.compile (the
compiled drafter) RoPE and the cache writes stay torch's, which inductor fuses: an op that writes the cache would be
functionalised there. ``torch`` keeps torch's ops (A/B runs; it is separate from
``EFFROLL_BF16_KERNEL``, the linears' switch), as does anything autograd must see.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import kernels
from ..once import warn_once
from .linear import bf16_linear_path

_PATHS: dict[str | None, bool] = {}  # EFFROLL_GLUE_KERNEL's value -> whether the glue runs effroll's ops


def effroll_glue() -> bool:
    """Whether the bf16 CPU glue takes effroll's ops (read at every call, resolved once per value)."""
    env = os.environ.get(kernels.GLUE_KERNEL_ENV)
    on = _PATHS.get(env)
    if on is None:
        wanted = kernels.choice(kernels.GLUE_KERNEL_ENV) != "torch"
        on = wanted and kernels.DECODE.available()
        if wanted and not on:
            warn_once(f"decode:{kernels.DECODE.unavailable_reason()}",
                      f"effroll's CPU glue ops (norm, RoPE, attention, SiLU) are unavailable "
                      f"({kernels.DECODE.unavailable_reason()}); bf16 models use torch's", stacklevel=3)
        _PATHS[env] = on
    return on


if hasattr(torch.compiler, "assume_constant_result"):  # traced as its value, so graphs hold no env lookup
    effroll_glue = torch.compiler.assume_constant_result(effroll_glue)


def bf16_positions_exact(device: torch.device) -> bool:
    """Whether a bf16 model on ``device`` gives a position the same logits bits in decode, verify and prefill:
    on the CPU where both effroll's bf16 linear (batch-invariant) and its glue ops run (tests/test_glue_ops.py)."""
    return torch.device(device).type == "cpu" and bf16_linear_path() == "effroll" and effroll_glue()


def _ours(*ts: torch.Tensor) -> bool:
    if not all(t.dtype == torch.bfloat16 and t.is_cpu for t in ts):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False  # the ops have no backward
    return effroll_glue()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm`` over the last dim (fp32 inside, one rounding)."""
    d = x.shape[-1]
    if d % 16 == 0 and _ours(x, weight):
        return torch.ops.effroll.rms_norm(x.reshape(-1, d), weight, eps).view(x.shape)
    return F.rms_norm(x, (d,), weight, eps)


def cache_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, row0: int, span: int,
                    mask: torch.Tensor | None, scale: float, gqa: bool) -> torch.Tensor:
    """``q [B, T, h, hd]``: each query (b, t) attends keys ``0..pos[b, t]`` of cache slot ``row0 + b``
    (``kc``/``vc [slots, hkv, cap, hd]``, already written for these positions) -> ``[B, T, h, hd]``.
    ``span``/``mask`` describe the same thing for SDPA (keys ``0..span-1``, ``mask [B, 1, T, span]`` or None
    when every key up to span is attended); ``gqa``: h != hkv, as a Python bool (shapes are symbolic under
    torch.compile, and SDPA takes no symbolic flag)."""
    B, T, h, hd = q.shape
    hkv = kc.shape[1]
    if hd % 8 == 0 and h % hkv == 0 and kc.is_contiguous() and vc.is_contiguous() and _ours(q, kc, vc):
        return torch.ops.effroll.cache_attention(q, kc, vc, pos, row0, scale)
    keys = kc[row0 : row0 + B, :, :span]
    vals = vc[row0 : row0 + B, :, :span]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, scale=scale,
                                         enable_gqa=gqa)
    return out.transpose(1, 2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as torch ops: x*cos + rotate_half(x)*sin, with rotate_half(x) = roll(x)*[-1..,+1..] (the sign is in
    the model's sin table)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     rows: torch.Tensor, pos: torch.Tensor, row0: int, h: int) -> torch.Tensor:
    """``qkv [B, T, h + 2 hkv, hd]``: RoPE on the query and key heads, keys and values written to cache slot
    ``row0 + b`` (``rows`` = that as a ``[B, 1]`` tensor) at positions ``pos [B, T]``; returns q ``[B, T, h, hd]``."""
    hkv = kc.shape[1]
    if (not torch.compiler.is_compiling() and qkv.shape[-1] % 2 == 0 and kc.is_contiguous() and vc.is_contiguous()
            and cos.stride(-1) == 1 and sin.stride(-1) == 1 and _ours(qkv, cos, sin, kc, vc)):
        return torch.ops.effroll.rope_cache_write(qkv, cos, sin, kc, vc, pos, row0, h)
    qk = rope(qkv[:, :, : h + hkv], cos, sin)
    # Cache layout [slot, kv_head, position, head_dim]; advanced indices (rows, pos) around a slice put their
    # broadcast dims first, so the assigned value is [B, T, kv_head, head_dim].
    kc[rows, :, pos] = qk[:, :, h:]
    vc[rows, :, pos] = qkv[:, :, h + hkv :]
    return qk[:, :, :h]


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [..., 2 inter]`` (gate first) -> ``[..., inter]``."""
    if inter % 8 == 0 and gate_up.stride(-1) == 1 and _ours(gate_up):
        return torch.ops.effroll.silu_mul(gate_up.reshape(-1, 2 * inter)).view(*gate_up.shape[:-1], inter)
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate) * up
