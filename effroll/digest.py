"""A short digest of a module's weights: equal digests, equal weights (checks across processes and engines)."""

from __future__ import annotations

import hashlib

import torch


def module_digest(module: torch.nn.Module | None) -> str | None:
    """Short SHA-256 of a module's state dict (names and raw bytes); None for None."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
