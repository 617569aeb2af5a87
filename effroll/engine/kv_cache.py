"""Slot-based KV cache with per-row lengths (rollback = lower the length).

Active rows always occupy slots ``0..B-1`` so every forward reads a contiguous
view; when a row leaves, the last active row is moved into its slot
(``move``), one row copy per departure instead of a gather every step.
"""

from __future__ import annotations

import torch

from .model import ModelConfig, Transformer


class KVCache:
    def __init__(self, cfg: ModelConfig, slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str):
        if slots < 1 or capacity < 1:
            raise ValueError(f"KVCache needs slots >= 1 and capacity >= 1, got slots={slots}, capacity={capacity}")
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k = list(self.k_all.unbind(0))  # per-layer views
        self.v = list(self.v_all.unbind(0))
        self.slots, self.capacity = slots, capacity

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for t in (self.k_all, self.v_all):
            t[:, dst, :, :length].copy_(t[:, src, :, :length])


@torch.no_grad()
def full_logits(model: Transformer, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Logits [T, V] (float32) of a fresh full-sequence forward over ``token_ids`` (a reference path)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device).view(1, -1)
    cache = KVCache(model.cfg, 1, ids.shape[1], model.dtype, model.device)
    h = model(ids, torch.zeros(1, dtype=torch.long, device=model.device), cache, [0])
    return model.logits(h)[0]
