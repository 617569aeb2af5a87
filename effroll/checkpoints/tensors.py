"""The one weight validator: every tensor present, floating point, of its expected shape, finite."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch


def _finite(v: torch.Tensor) -> bool:
    # A sum is NaN/Inf if any element is (one cheap pass); confirm element-wise, since a finite sum can overflow.
    return bool(torch.isfinite(v.sum(dtype=torch.float32))) or bool(torch.isfinite(v).all())


def check_tensors(shapes: Mapping[str, tuple[int, ...]], sd: Mapping[str, Any], keys: Iterable[str],
                  check_finite: bool = True) -> None:
    """``sd[k]`` for every k in ``keys``: present, a floating-point tensor of ``shapes[k]``, finite. Raises
    ValueError/TypeError naming the first offending key."""
    for k in keys:
        if k not in sd:
            raise ValueError(f"policy weights are missing key {k!r}")
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"policy weight {k!r} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"policy weight {k!r} has dtype {v.dtype}; expected a floating-point tensor")
        if tuple(v.shape) != tuple(shapes[k]):
            raise ValueError(f"policy weight {k!r} has shape {tuple(v.shape)}, expected {tuple(shapes[k])}")
        if check_finite and not _finite(v):
            raise ValueError(f"policy weight {k!r} contains NaN or Inf")
