"""``effroll.AdaptiveSpecRollout``: the wrapper of ``rollout.py``, which with ``workers=`` / ``ray_address=`` runs on
a pool of Ray actors instead (each actor holds its own LLM, drafter and controller: ``pool.py``).

The pooled wrapper keeps the local one's call signature, ``update_policy`` and ``stats``; ``rollout_fn``
generates through ``self.llm``, which is then the pool.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from .. import rollout


class AdaptiveSpecRollout(rollout.AdaptiveSpecRollout):
    """``rollout.AdaptiveSpecRollout``; ``workers=N`` / ``ray_address=`` spread it over Ray actors (``model=``
    a checkpoint path every node can read, or a Transformer; every other argument goes to each actor)."""

    def __init__(self, rollout_fn: Callable[..., Any] | None = None, *, workers: int | None = None,
                 ray_address: str | None = None, **kwargs: Any):
        self.pool = None
        if workers is None and ray_address is None:
            super().__init__(rollout_fn, **kwargs)
            return
        rollout.check_wrapper_args(rollout_fn, kwargs.get("mode", "adaptive"), kwargs.get("k", 4))
        model = kwargs.pop("model", None)
        if kwargs.pop("llm", None) is not None or model is None:
            raise ValueError("workers=/ray_address= build one LLM per Ray actor: pass model=, not llm=")
        from .pool import RayRolloutPool

        self.pool = self.llm = RayRolloutPool(model, workers=1 if workers is None else workers,
                                              ray_address=ray_address, **kwargs)
        self.rollout_fn, self.mode, self.history = rollout_fn, kwargs.get("mode", "adaptive"), self.pool.history
        if rollout_fn is not None:
            functools.update_wrapper(self, rollout_fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pool is None:
            return super().__call__(*args, **kwargs)
        return self.pool.run(self.rollout_fn or self.pool.generate, *args, **kwargs)  # the actors plan and record

    def update_policy(self, weights_or_path: Any, *, keep_drafter: bool = False) -> float:
        if self.pool is None:
            return super().update_policy(weights_or_path, keep_drafter=keep_drafter)
        return self.pool.update_policy(weights_or_path, keep_drafter=keep_drafter)

    def stats(self) -> dict[str, Any]:
        return super().stats() if self.pool is None else self.pool.stats()
