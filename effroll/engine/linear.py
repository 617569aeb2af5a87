"""``Linear``: nn.Linear whose bf16 CPU path takes the fastest kernel this CPU runs (pre-packed oneDNN,
effroll's AVX2 bf16 GEMM, or ``F.linear``), chosen once per ``EFFROLL_BF16_KERNEL`` value."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..once import warn_once


_MKLDNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
_PACKED_BF16: bool | None = None


def packed_bf16_ok() -> bool:
    """Whether oneDNN's pre-packed bf16 linear runs on this CPU (probed once: it needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT, and raises on e.g. an AVX2-only EPYC)."""
    global _PACKED_BF16
    if _PACKED_BF16 is None:
        _PACKED_BF16 = False
        if _MKLDNN_LINEAR:
            try:
                w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
                torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 16, dtype=torch.bfloat16), w, None, "none", [], "")
                _PACKED_BF16 = True
            except RuntimeError:
                pass
    return _PACKED_BF16


_BF16_PATHS: dict[str | None, str] = {}  # EFFROLL_BF16_KERNEL's value -> the path bf16 CPU linears take
_BF16_OP: Any = None  # torch.ops.effroll.bf16_linear.default once a path resolved to it (the library is loaded)


def bf16_linear_path() -> str:
    """How ``Linear`` runs a bf16 weight on the CPU: ``"onednn"`` (pre-packed oneDNN), ``"effroll"``
    (``torch.ops.effroll.bf16_linear`` on the weight as it is) or ``"torch"`` (``F.linear``).

    ``EFFROLL_BF16_KERNEL`` (:func:`effroll.kernels.choice`): ``auto`` takes oneDNN where it runs, else effroll's
    kernel (AVX2 CPUs without AVX512-BW or AVX-NE-CONVERT, where bf16 ``F.linear`` is several times slower than
    both the weight bandwidth and the FMA peak); ``effroll`` takes effroll's kernel even where oneDNN runs;
    ``torch`` never takes effroll's. Where effroll's kernel is wanted but cannot build or run, warn once and
    use torch's path. Read at every call (A/B runs flip it), resolved once per value."""
    env = os.environ.get(kernels.BF16_KERNEL_ENV)
    path = _BF16_PATHS.get(env)
    if path is None:
        choice = kernels.choice(kernels.BF16_KERNEL_ENV)
        onednn = packed_bf16_ok()
        path = "onednn" if onednn else "torch"
        if choice == "effroll" or (choice == "auto" and not onednn):
            if kernels.BF16.available():
                global _BF16_OP
                path, _BF16_OP = "effroll", torch.ops.effroll.bf16_linear.default
            else:
                warn_once(f"bf16:{kernels.BF16.unavailable_reason()}",
                          f"effroll's CPU bf16 kernel is unavailable ({kernels.BF16.unavailable_reason()}); "
                          f"bf16 linears use {'oneDNN' if onednn else 'F.linear'}", stacklevel=3)
        _BF16_PATHS[env] = path
    return path


if hasattr(torch.compiler, "assume_constant_result"):  # traced as its value, so graphs hold no env lookup
    bf16_linear_path = torch.compiler.assume_constant_result(bf16_linear_path)


class Linear(nn.Linear):
    """nn.Linear that, for bf16 on CPU, runs a faster kernel than ``F.linear`` (:func:`bf16_linear_path`):

    * oneDNN with a pre-packed weight where it runs (measured on an AVX512 machine, M=1: 1.7-2.2x faster than
      F.linear, e.g. the 49152x576 LM head 4.8 -> 2.8 ms). The packed copy is rebuilt whenever the weight
      changes in place (its ``_version`` moves) or is replaced, so loading new policy weights needs no extra call;
    * else effroll's AVX2 kernel on the weight itself (no copy, nothing to invalidate), except when autograd
      needs the result (the op has no backward). No row count sends it back to F.linear: bf16 F.linear was
      slower at every M measured, 1 to 2048 (experiments/README.md, section 9).
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and w.is_cpu:  # eager decode: ~210 calls a step
            path = bf16_linear_path()
            if (path == "effroll" and (b is None or b.dtype == w.dtype) and w.stride(1) == 1 and x.dim() >= 2
                    and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                          or (b is not None and b.requires_grad)))):
                return _BF16_OP(x, w, b)  # x [..., K] -> [..., N] in the op: no reshape/view round trip
            if path == "onednn":
                key = (id(w), w._version, w.data_ptr())
                if self._packed_key != key:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
                    self._packed_key = key
                return torch.ops.mkldnn._linear_pointwise(x, self._packed, b, "none", [], "")
        return F.linear(x, w, b)
