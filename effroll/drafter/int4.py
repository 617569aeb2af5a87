"""Group-wise INT4 weight quantization and an ``nn.Linear`` drop-in on torch's native INT4 kernels.

Quantization grid (the "tinygemm" convention of ``_weight_int4pack_mm``): a weight row is split
into groups of ``g`` consecutive input columns; group ``j`` of output row ``n`` has a scale
``s[n, j]`` and a *float-domain* zero ``z[n, j]``, and codes ``q`` in ``0..15`` dequantize as

    w[n, k] ≈ (q[n, k] - 8) * s[n, k // g] + z[n, k // g]

* symmetric:  ``s = max|w| / 7.5`` and ``z = 0``  (grid ``-8s .. 7s``; ``+max|w|`` rounds to ``7s``,
  an error of exactly ``s/2``);
* asymmetric: ``s = (max w - min w) / 15`` and ``z = min w + 8 s`` (code 0 is ``min w``, 15 is ``max w``).

``q = clamp(round((w - z) / s) + 8, 0, 15)`` (round to nearest), so every element is within
``s/2`` of its dequantized value (up to the bf16 rounding of ``z``; ``s`` is rounded *up* to bf16,
the kernel's dtype). When ``g`` does not divide ``in_features`` the last group is ragged: columns
are padded up to a multiple of ``g`` by repeating the last column (which leaves every group's
min/max unchanged) and activations are zero-padded at run time, so the padding contributes 0.

Kernels (``Int4Linear.backend``):

* ``"effroll"`` (CPU default): effroll's own AVX2 kernel, :mod:`effroll.kernels`
  (``torch.ops.effroll.int4_mm``), built on first use; any N. It reads each weight tile once for all
  rows of x, where torch's CPU kernel re-dequantizes it for every few rows.
* ``"cpu"``: torch's ``_convert_weight_to_int4pack_for_cpu(int32 codes [N, K], 1)`` packs and
  ``_weight_int4pack_mm_for_cpu(x_bf16 [M, K], packed, g, sz)`` multiplies, with
  ``sz = stack([s, z], -1).transpose(0, 1)`` of shape ``[K/g, N, 2]`` (bf16). Used when effroll's kernel
  cannot build or the CPU lacks AVX2/FMA (warned once), or when ``EFFROLL_INT4_KERNEL=torch``.
* ``"cuda"``: the packer takes ``uint8 [N, K/2]`` with the even column in the high nibble and
  ``innerKTiles`` in {2, 4, 8}.

Shapes no kernel takes (torch's CPU kernel: N % 16; CUDA: N % 8 or pre-sm80 GPUs; other devices) fall
back to a dequantize-then-``F.linear`` path (warned once per process and reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..once import warn_once
from .. import kernels

GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernels accept


def _warn(reason: str) -> None:
    warn_once(reason, f"effroll INT4: {reason}", stacklevel=4)


# --------------------------------------------------------------------------- quantization maths


@dataclass
class QuantizedWeight:
    """Codes ``uint8 [N, Kp]`` in 0..15, ``scales``/``zeros`` bf16 ``[N, Kp // g]``; Kp = K rounded up to g."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - 8) * s + z`` for the real (unpadded) columns, ``[N, K]``."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)[:, : self.in_features].to(dtype)


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pad ``w [..., N, K]`` to a multiple of ``group_size`` columns by repeating the last column."""
    pad = -w.shape[-1] % group_size
    if pad == 0:
        return w
    return torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x (elementwise, x float32)."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    return torch.where(low, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


def group_params(wg: torch.Tensor, symmetric: bool, refine_iters: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (bf16) of groups ``wg [..., g]`` (float32): the min/max grid of the module
    docstring, then ``refine_iters`` least-squares refits (:func:`refine_params`)."""
    if symmetric:
        s = wg.abs().amax(-1) / 7.5
        s = _round_up_bf16(s.clamp_min(1e-12))
        z = torch.zeros_like(s)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = _round_up_bf16(((hi - lo) / 15).clamp_min(1e-12))
        z = (lo + 8 * s.float()).to(torch.bfloat16)
    if refine_iters > 0:
        s, z = refine_params(wg, s, z, symmetric, refine_iters)
    return s, z


def refine_params(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, symmetric: bool, iters: int):
    """Alternate ``q = round((w - z) / s)`` with the least-squares ``(s, z)`` for fixed codes, per group.

    With ``u = q - 8`` (sums over the group's g elements): symmetric ``s = Σuw / Σu²``; asymmetric
    ``[[Σu², Σu], [Σu, g]] [s, z]^T = [Σuw, Σw]^T``. Each group keeps its lowest-error iterate, so the
    squared error never exceeds the min/max grid's (the per-element ``s/2`` bound no longer holds:
    the refit may clip outliers).
    """
    def sse(s, z):
        c = quantize_codes(wg, s[..., None], z[..., None])
        return ((c.float() - 8) * s.float()[..., None] + z.float()[..., None] - wg).pow(2).sum(-1), c

    best_e, c = sse(s, z)
    best_s, best_z = s, z
    g = wg.shape[-1]
    for _ in range(iters):
        u = c.float() - 8
        suu, suw = (u * u).sum(-1), (u * wg).sum(-1)
        if symmetric:
            sf, zf = suw / suu.clamp_min(1e-12), torch.zeros_like(suw)
        else:
            su, sw = u.sum(-1), wg.sum(-1)
            det = suu * g - su * su
            ok = det > 1e-6
            sf = torch.where(ok, (suw * g - su * sw) / det.clamp_min(1e-12), s.float())
            zf = torch.where(ok, (suu * sw - su * suw) / det.clamp_min(1e-12), z.float())
        ok = sf > 1e-12
        s = torch.where(ok, sf, s.float()).to(torch.bfloat16)
        z = torch.where(ok, zf, z.float()).to(torch.bfloat16)
        e, c = sse(s, z)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantize_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``clamp(round((w - z) / s) + 8, 0, 15)`` with broadcasting; float32 in, uint8 out."""
    return (torch.round((w - z.float()) / s.float()) + 8).clamp_(0, 15).to(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 ``(q - 8) * s + z`` for codes ``[N, Kp]`` and per-group ``s, z [N, Kp / g]``."""
    n, kp = codes.shape
    q = codes.float().view(n, kp // group_size, group_size)
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(n, kp)


def quantize_rtn(weight: torch.Tensor, group_size: int, symmetric: bool = True, refine_iters: int = 0) -> QuantizedWeight:
    """Round-to-nearest group-wise INT4 quantization of ``weight [N, K]`` (optionally refined grids)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    n, k = weight.shape
    wp = pad_columns(weight.detach().float(), group_size)
    wg = wp.view(n, -1, group_size)
    s, z = group_params(wg, symmetric, refine_iters)
    if symmetric:  # z = 0
        codes = (torch.round(wg / s.float()[..., None]) + 8).clamp_(0, 15).to(torch.uint8).view(n, -1)
    else:
        codes = quantize_codes(wg, s[..., None], z[..., None]).view(n, -1)
    return QuantizedWeight(codes, s, z, group_size, k)


# --------------------------------------------------------------------------- packing


KERNEL_ENV = "EFFROLL_INT4_KERNEL"  # "torch": torch's CPU kernel even where effroll's works (A/B runs)


def _backend(device: torch.device, n: int) -> str | None:
    """'effroll' / 'cpu' / 'cuda': the kernel for this shape on ``device`` (None: dequantized matmul)."""
    if device.type == "cpu":
        if kernels.choice(KERNEL_ENV) != "torch":
            if kernels.available():
                return "effroll"
            _warn(f"effroll's CPU INT4 kernel is unavailable ({kernels.unavailable_reason()}); "
                      "using torch's _weight_int4pack_mm_for_cpu")
    if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and n % 16 == 0:
        return "cpu"
    if device.type == "cuda" and n % 8 == 0 and torch.cuda.get_device_capability(device) >= (8, 0):
        return "cuda"  # tinygemm needs sm80+
    return None


def _inner_k_tiles(kp: int) -> int:
    return 8 if kp % 128 == 0 else 4 if kp % 64 == 0 else 2


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Plain nibble packing ``uint8 [N, K/2]``: column 2i in the low nibble, 2i+1 in the high one."""
    return codes[:, ::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def _decode_cpu_layout(packed: torch.Tensor, n: int, kp: int, cap: str) -> torch.Tensor:
    """Codes ``[N, Kp]`` from ``_convert_weight_to_int4pack_for_cpu``'s layout (see int4mm_kernel.cpp).

    Rows are packed in blocks of BLOCK_N (64 with AVX512, else 32), each block stored ``[K, nb/2]``.
    A full AVX512 block puts rows 0..31 in the low nibbles and rows 32..63 in the high ones (AVX2:
    rows 0..15 / 16..31); partial blocks and other CPUs pack row pairs (2i low, 2i+1 high).
    """
    block = 64 if cap.startswith("AVX512") else 32
    lanes = cap.startswith("AVX512") or cap.startswith("AVX2")
    flat = packed.reshape(-1)
    out = torch.empty(n, kp, dtype=torch.uint8, device=packed.device)
    nfull = n // block if lanes else 0
    if nfull:
        b = flat[: nfull * block * kp // 2].view(nfull, kp, block // 2)
        rows = torch.cat([b & 15, b >> 4], dim=-1)  # [nfull, K, block]
        out[: nfull * block] = rows.transpose(1, 2).reshape(nfull * block, kp)
    for b0 in range(nfull * block, n, block):
        nb = min(block, n - b0)
        b = flat[b0 * kp // 2 : (b0 + nb) * kp // 2].view(kp, nb // 2)
        out[b0 : b0 + nb] = torch.stack([b & 15, b >> 4], dim=-1).view(kp, nb).T
    return out


def _probe_codes(packed: torch.Tensor, n: int, kp: int, backend: str, chunk: int = 256) -> torch.Tensor:
    """Codes read back through the kernel itself: with s = 1, z = 8 the kernel's weight is q exactly,
    so ``I_K @ W^T`` returns the codes (small integers are exact in bf16). Layout-agnostic, O(K^2 N)."""
    dev = packed.device
    sz = torch.empty(kp // 32, n, 2, dtype=torch.bfloat16, device=dev)
    sz[..., 0], sz[..., 1] = 1.0, 8.0
    out = torch.empty(n, kp, dtype=torch.uint8, device=dev)
    for k0 in range(0, kp, chunk):
        k1 = min(kp, k0 + chunk)
        eye = torch.zeros(k1 - k0, kp, dtype=torch.bfloat16, device=dev)
        eye[:, k0:k1] = torch.eye(k1 - k0, dtype=torch.bfloat16, device=dev)
        out[:, k0:k1] = _mm(backend, eye, packed, 32, sz).T.round().to(torch.uint8)
    return out


_CPU_DECODER_OK: bool | None = None


def _cpu_decoder_ok() -> bool:
    """Check once per process that ``_decode_cpu_layout`` matches this CPU's packer (else probe)."""
    global _CPU_DECODER_OK
    if _CPU_DECODER_OK is None:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (112, 64), generator=g, dtype=torch.uint8)  # one full block + a partial one
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        cap = torch.backends.cpu.get_cpu_capability()
        _CPU_DECODER_OK = bool(torch.equal(_decode_cpu_layout(p, 112, 64, cap), q)) and bool(
            torch.equal(_probe_codes(p, 112, 64, "cpu"), q)
        )
    return _CPU_DECODER_OK


def _pack(backend: str | None, codes: torch.Tensor) -> torch.Tensor:
    if backend == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    if backend == "cuda":
        b = ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(b, _inner_k_tiles(codes.shape[1]))
    return pack_nibbles(codes).contiguous()


def _mm(backend: str, x: torch.Tensor, packed: torch.Tensor, g: int, sz: torch.Tensor) -> torch.Tensor:
    if backend == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, g, sz)


# --------------------------------------------------------------------------- modules


class Int4Linear(nn.Module):
    """``y = x @ W_q^T + b`` with ``W_q`` group-wise INT4 (drop-in for ``nn.Linear``).

    Activations are cast to bf16 for the kernel and the result back to the input dtype.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, device: torch.device | str | None = None):
        super().__init__()
        dev = torch.device(device) if device is not None else qw.codes.device
        n, kp = qw.codes.shape
        self.in_features, self.out_features = qw.in_features, n
        self.padded_in_features, self.group_size = kp, qw.group_size
        self.backend = _backend(dev, n)
        if self.backend is None:
            _warn(
                f"no native INT4 kernel for out_features={n} on {dev.type} (needs a multiple of "
                f"{16 if dev.type == 'cpu' else 8} on cpu / sm80+ cuda); using a dequantized matmul"
            )
        codes = qw.codes.to(dev)
        if self.backend == "effroll":  # packed [ceil(N/16), Kp, 8], scales_and_zeros [ceil(N/16), Kp/g, 2, 16]
            packed, sz = kernels.pack_weight(codes, qw.scales.to(dev), qw.zeros.to(dev))
        else:
            packed = _pack(self.backend, codes)
            sz = torch.stack([qw.scales, qw.zeros], dim=-1).transpose(0, 1).contiguous()  # [Kp/g, N, 2]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz.to(device=dev, dtype=torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dev).clone())
        if self.backend == "effroll":
            self._op = torch.ops.effroll.int4_mm.default
        elif self.backend == "cpu":
            self._op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
        elif self.backend == "cuda":
            self._op = torch.ops.aten._weight_int4pack_mm.default

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = True) -> "Int4Linear":
        qw = quantize_rtn(linear.weight, group_size, symmetric)
        return cls(qw, linear.bias, device=linear.weight.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"backend={self.backend or 'fallback'}, bias={self.bias is not None}")

    # -- inspection
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``uint8 [N, Kp]`` exactly as the kernel sees them."""
        n, kp = self.out_features, self.padded_in_features
        if self.backend is None:
            return unpack_nibbles(self.packed)
        if self.backend == "effroll":
            return kernels.unpack_codes(self.packed, n)
        if self.backend == "cpu" and _cpu_decoder_ok():
            return _decode_cpu_layout(self.packed, n, kp, torch.backends.cpu.get_cpu_capability())
        return _probe_codes(self.packed, n, kp, self.backend)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, zeros)`` bf16 ``[N, Kp / g]``."""
        if self.backend == "effroll":
            return kernels.unpack_scales_zeros(self.scales_and_zeros, self.out_features)
        return self.scales_and_zeros[..., 0].T, self.scales_and_zeros[..., 1].T

    def quantized_weight(self) -> QuantizedWeight:
        s, z = self.scales_zeros()
        return QuantizedWeight(self.codes(), s.contiguous(), z.contiguous(), self.group_size, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    # -- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "effroll":  # first and lean: eager decode steps call this ~120 times (M = 0 is fine too)
            x2 = x.reshape(-1, self.in_features)
            y = self._op(x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16), self.packed,
                         self.scales_and_zeros, self.group_size, self.out_features).view(*x.shape[:-1], self.out_features)
            if x.dtype != torch.bfloat16:
                y = y.to(x.dtype)
            bias = self.bias
            return y if bias is None else y + bias.to(x.dtype)
        out_shape = x.shape[:-1] + (self.out_features,)
        if self.backend is None:
            s, z = self.scales_zeros()
            w = dequantize(unpack_nibbles(self.packed), s, z, self.group_size)[:, : self.in_features]
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(out_shape)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if self.padded_in_features != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in_features - self.in_features))
        y = self._op(x2.contiguous(), self.packed, self.group_size, self.scales_and_zeros).view(out_shape)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Linear(nn.Module):
    """Per-output-channel symmetric INT8 linear: ``w[n, k] ≈ q[n, k] * s[n]``, ``s = max|w[n]| / 127``.

    Runs ``aten._weight_int8pack_mm`` on CPU when ``in_features % 16 == 0``; otherwise a dequantized matmul.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        s = (w.abs().amax(1) / 127).clamp_min(1e-12).to(torch.bfloat16)
        q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self.out_features, self.in_features = w.shape
        self.native = w.device.type == "cpu" and self.in_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        if not self.native:
            _warn(f"no native INT8 kernel for in_features={self.in_features} on {w.device.type}; "
                      "using a dequantized matmul")
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", s)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * s`` as ``[N, K]`` in ``dtype``."""
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.native and x2.shape[0] > 0:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.scales)
        else:
            y = F.linear(x2.to(torch.bfloat16), (self.weight.float() * self.scales.float()[:, None]).to(torch.bfloat16))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)
