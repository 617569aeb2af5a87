"""Our own forward pass for the Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3).

One module tree, HF-compatible maths, a few deliberate layout choices for speed:
q/k/v are fused into one ``qkv`` linear and gate/up into one ``gate_up`` linear
(fewer kernel calls per layer at batch 1, and the INT4 drafter quantizes the
fused matrices; ``checkpoints.names`` maps HF parameter names onto ours).

The forward works on a batch of rows that occupy KV-cache slots ``0..B-1``;
row ``i`` feeds ``T`` new tokens at absolute positions ``start[i] .. start[i]+T-1``
(rows with fewer real tokens are right-padded; padded positions write cache
entries past the row's valid length, which later writes overwrite and the causal
mask hides). Rolling back a row is just lowering its length in the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled, glue
from .linear import Linear
from .records import DrafterMeta

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (or a transformers config's ``to_dict()``); a missing
        or malformed entry is a ValueError naming it."""
        if not isinstance(hf, Mapping):
            raise ValueError(f"a model config must be a JSON object, got {type(hf).__name__}")
        try:
            return cls._from_hf(hf)
        except KeyError as e:
            raise ValueError(f"config.json lacks the required key {e.args[0]!r}") from None
        except TypeError as e:
            raise ValueError(f"config.json has a malformed entry: {e}") from None

    @classmethod
    def _from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {mt!r}: effroll's engine runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        # transformers >= 5 keeps rope settings in `rope_parameters`; older configs use rope_theta/rope_scaling.
        rp = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or None
        theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if rp and rp.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                "(supported: default, linear, llama3)"
            )
        if mt in ("mistral", "qwen2", "qwen3"):
            sw = hf.get("sliding_window")
            if sw and hf.get("use_sliding_window", mt == "mistral"):
                raise ValueError(
                    f"sliding-window attention (sliding_window={sw}) is not supported by effroll's engine"
                )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())
        qkv_bias = bool(hf.get("attention_bias", False)) or mt == "qwen2"
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=bool(hf.get("attention_bias", False)) and mt in ("llama", "qwen3"),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            model_type=mt,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
        )


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE variant."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv.float(), 1.0
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return (inv / float(sc["factor"])).float(), 1.0
    if kind == "llama3":
        factor = float(sc["factor"])
        lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old / lo, old / hi
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= hi_wl) & (wavelen <= lo_wl)
        return torch.where(is_mid, mid, scaled).float(), 1.0
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same as HF's maths: normalise in float32, scale, round once (glue.rms_norm picks the kernel).
        return glue.rms_norm(x, self.weight, self.eps)


@dataclass
class ForwardCtx:
    """Per-forward indexing shared by all layers (built once per forward)."""

    rows: torch.Tensor  # [B, 1] row (slot) index for cache writes
    row0: int  # rows occupy slots row0 .. row0+B-1
    pos: torch.Tensor  # [B, T] absolute positions
    span: int  # keys 0..span-1 are read from the cache
    mask: torch.Tensor | None  # [B, 1, T, span] bool, True = attend (None: attend all)
    cos: torch.Tensor  # [B, T, 1, hd]
    sin: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.hd, bias=cfg.qkv_bias)
        self.o = Linear(self.h * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = 1.0 / math.sqrt(self.hd)

    def project(self, x: torch.Tensor, ctx: ForwardCtx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, h, hd], k and v [B, T, hkv, hd] of ``x``, RoPE (and qk-norm) applied."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.h + 2 * self.hkv, self.hd)
        v = qkv[:, :, self.h + self.hkv :]
        if self.q_norm is None:
            qk = glue.rope(qkv[:, :, : self.h + self.hkv], ctx.cos, ctx.sin)  # q and k together
            q, k = qk[:, :, : self.h], qk[:, :, self.h :]
        else:
            q = glue.rope(self.q_norm(qkv[:, :, : self.h]), ctx.cos, ctx.sin)
            k = glue.rope(self.k_norm(qkv[:, :, self.h : self.h + self.hkv]), ctx.cos, ctx.sin)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: ForwardCtx, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.q_norm is None:  # RoPE and the cache writes in one pass (glue.rope_cache_write)
            qkv = self.qkv(x).view(B, T, self.h + 2 * self.hkv, self.hd)
            q = glue.rope_cache_write(qkv, ctx.cos, ctx.sin, kc, vc, ctx.rows, ctx.pos, ctx.row0, self.h)
        else:
            q, k, v = self.project(x, ctx)
            kc[ctx.rows, :, ctx.pos] = k  # cache layout [slot, kv_head, position, head_dim]
            vc[ctx.rows, :, ctx.pos] = v
        out = glue.cache_attention(q, kc, vc, ctx.pos, ctx.row0, ctx.span, ctx.mask, self.scale,
                                   self.h != self.hkv)
        return self.o(out.reshape(B, T, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(glue.silu_mul(self.gate_up(x), self.inter))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx, kc, vc):
        x = x + self.attn(self.attn_norm(x), ctx, kc, vc)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only Llama-family model that reads and writes an external KV cache.

    ``compile_decode = True`` runs single-token forwards (T = 1: decode and draft steps) through
    ``torch.compile``d chunks of layers (``engine.compiled``; CPU; the engine's ``compile_drafter``).
    Inductor fuses the blocks' glue (norms, RoPE, cache writes, residuals, SiLU) into C++ loops.
    Numerically it is a different (equally valid) forward, which is why the engine offers it for
    drafters only: any draft distribution is lossless, and the target's logprobs stay those of the
    eager forward. A TorchEngine sets the flag on each drafter it adopts, from its option.
    """

    compile_decode: bool = False
    _compile_key: str | None = None
    meta: DrafterMeta | None = None  # set on derived drafters (drafter.derive)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv, self.rope_attn_scale = rope_inv_freq(cfg)  # validates the RoPE variant before allocating
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", inv, persistent=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def fingerprint(self) -> str:
        """Architecture + dtype + device type (not the weights: a tuned profile stays valid across policy updates)."""
        import hashlib
        import json

        c = self.cfg
        arch = [c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                c.num_kv_heads, c.head_dim, str(self.dtype), self.device.type]
        return hashlib.sha1(json.dumps(arch).encode()).hexdigest()[:16]

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._rope_cache  # rebuilt when short, or when the model moved or changed dtype (Module.to skips it)
        if c is None or c[0].shape[0] < n or c[0].device != self.device or c[0].dtype != self.dtype:
            # Grow geometrically: decoding past the table would otherwise rebuild it at every step.
            # Each position's entry is computed on its own, so a bigger table changes no value.
            old = 0 if self._rope_cache is None else self._rope_cache[0].shape[0]
            t = torch.arange(max(n, 256, 2 * old), dtype=torch.float32, device=self.device)
            freqs = torch.outer(t, self.inv_freq.to(self.device).float())
            emb = torch.cat((freqs, freqs), dim=-1)
            s = self.rope_attn_scale
            sin = emb.sin()
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # folds rotate_half's sign into sin
            self._rope_cache = ((emb.cos() * s).to(self.dtype), (sin * s).to(self.dtype))
        return self._rope_cache

    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor,
        cache: "KVCacheLike",
        start_list: list[int] | None = None,
        row0: int = 0,
    ) -> torch.Tensor:
        """Run ``tokens`` [B, T] for cache slots row0..row0+B-1 starting at ``start`` [B]; return final hidden [B, T, D].

        ``start_list`` is ``start`` as Python ints (saves a device sync when the caller has it).
        """
        B, T = tokens.shape
        dev = self.device
        if start_list is None:
            start_list = start.tolist()
        span = max(start_list) + T
        if span > cache.capacity:
            raise ValueError(f"KV cache overflow: need {span} positions, cache holds {cache.capacity}")
        ar = torch.arange(T, device=dev)
        pos = start.view(B, 1) + ar.view(1, T)
        cos, sin = self._rope_at(pos, span)
        if B == 1 and T == 1:
            mask = None  # single query attends to everything up to itself
        else:
            keys = torch.arange(span, device=dev).view(1, 1, 1, span)
            mask = keys <= pos.view(B, 1, T, 1)
        rows = torch.arange(row0, row0 + B, device=dev).view(B, 1)
        ctx = ForwardCtx(rows=rows, row0=row0, pos=pos, span=span, mask=mask, cos=cos, sin=sin)
        x = self.embed(tokens)
        if self.compile_decode and T == 1:
            if self._compile_key is None:  # partitions dynamo's caches only (guards keep every graph correct)
                self._compile_key = repr(self.layers[0])  # names every submodule with its shapes
            x = compiled.run_layers(self._compile_key, tuple(self.layers), x, ctx, cache)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, ctx, cache.k[i], cache.v[i])
        return self.norm(x)

    def _rope_at(self, pos: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos_t, sin_t = self.rope_tables(span)
        return cos_t[pos].unsqueeze(2), sin_t[pos].unsqueeze(2)

    def forward_first_draft(self, tokens: torch.Tensor, target_cache: "KVCacheLike", positions: torch.Tensor | None = None,
                            row: int = 0) -> torch.Tensor:
        """Final hidden [1, n, D] at ``positions`` (default: all T), where position t attends the *target's*
        keys 0..t-1 (slot ``row`` of ``target_cache``, already filled for ``tokens`` [1, T]) and its own key at t.

        That is exactly a shared-KV draft step at t (the first draft position: the drafter reads the
        target's K/V for the prefix, its own for the token it is fed). Each position depends only on the
        target's cache and its own token, so any subset can be scored in one pass, teacher-forced, at a
        cost that grows with the subset, not T. Writes nothing to the cache.
        """
        B, T = tokens.shape
        if B != 1:
            raise ValueError(f"forward_first_draft takes one sequence, got a batch of {B}")
        if T > target_cache.capacity:
            raise ValueError(f"forward_first_draft: {T} tokens, the target cache holds {target_cache.capacity}")
        dev = self.device
        pos = torch.arange(T, device=dev) if positions is None else torch.as_tensor(positions, device=dev).long()
        n = pos.numel()
        if n == 0 or int(pos.min()) < 0 or int(pos.max()) >= T:
            raise ValueError(f"forward_first_draft: positions must be non-empty and within 0..{T - 1}")
        span = int(pos.max())  # target keys 0..span-1 are read
        cos, sin = self._rope_at(pos.view(1, n), span + 1)
        ctx = ForwardCtx(rows=pos.view(1, n)[:, :1], row0=row, pos=pos.view(1, n), span=span, mask=None, cos=cos, sin=sin)
        past = torch.arange(span, device=dev).view(1, span) < pos.view(n, 1)
        mask = torch.cat([past, torch.eye(n, dtype=torch.bool, device=dev)], -1).view(1, 1, n, span + n)
        x = self.embed(tokens[:, pos])
        for i, layer in enumerate(self.layers):
            a = layer.attn
            q, k, v = a.project(layer.attn_norm(x), ctx)
            keys = torch.cat([target_cache.k[i][row : row + 1, :, :span], k.transpose(1, 2)], 2)
            vals = torch.cat([target_cache.v[i][row : row + 1, :, :span], v.transpose(1, 2)], 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, scale=a.scale,
                                                 enable_gqa=a.h != a.hkv)
            x = x + a.o(out.transpose(1, 2).reshape(1, n, a.h * a.hd))
            x = x + layer.mlp(layer.mlp_norm(x))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class KVCacheLike:  # documentation only: what Transformer.forward needs from a cache
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    capacity: int
