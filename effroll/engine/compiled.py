"""Compiled decode: a model's single-token forwards through ``torch.compile``d chunks of layers.

Inductor fuses the blocks' glue (norms, RoPE, cache writes, residuals, SiLU) into C++ loops. Parameters
are graph inputs, so other chunks of the same length, and a new drafter (a new policy version), reuse
the compiled code. If compiling or running fails (no C++ compiler, an inductor error), warn once and run
eagerly from then on; a chunk that failed part-way is simply rerun (its cache writes are idempotent).
"""

from __future__ import annotations

import math
import time
import types
import warnings
from typing import Any

import torch

# Layers per compiled graph: a compiled call costs tens of microseconds of Python, so a few big graphs
# beat one per layer; past ~10 layers compile time grows faster than the step shrinks (experiments/README.md).
COMPILE_CHUNK = 10
_compiled: dict[str, Any] = {}  # block structure -> compiled _blocks_step
compile_error: str | None = None  # set when compiling failed once: every model decodes eagerly from then on


def _blocks_step(layers, x, ctx, ks, vs):
    for layer, kc, vc in zip(layers, ks, vs):
        x = layer(x, ctx, kc, vc)
    return x


def _compiled_for(key: str):
    """The compiled ``_blocks_step`` for one block structure. Each structure gets its own code object:
    dynamo caches graphs (and caps recompiles, 8 by default) per code object, and one process may hold
    several drafter recipes or test models."""
    fn = _compiled.get(key)
    if fn is None:
        code = _blocks_step.__code__.replace(co_name=f"_blocks_step_{len(_compiled)}")
        fn = _compiled[key] = torch.compile(types.FunctionType(code, _blocks_step.__globals__), dynamic=True)
    return fn


def run_layers(key: str, layers: tuple, x, ctx, cache) -> torch.Tensor:
    """Every layer over ``x``, in equal chunks of at most COMPILE_CHUNK layers (one graph for all chunks)."""
    global compile_error
    n = len(layers)
    c = math.ceil(n / math.ceil(n / COMPILE_CHUNK))
    for i in range(0, n, c):
        ks, vs = cache.k[i : i + c], cache.v[i : i + c]
        if compile_error is None:
            try:
                x = _compiled_for(key)(layers[i : i + c], x, ctx, ks, vs)
                continue
            except Exception as e:  # noqa: BLE001 - any failure of the compiler stack falls back to eager
                compile_error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                warnings.warn(f"compiled decode failed, decoding eagerly from now on ({compile_error})",
                              RuntimeWarning, stacklevel=3)
        x = _blocks_step(layers[i : i + c], x, ctx, ks, vs)
    return x


@torch.no_grad()
def warm_up(model, cache, capacity: int, max_batch: int) -> float:
    """Run ``model``'s decode graphs once (batch 1 and one batch > 1) so that compiling happens here, not in
    the first speculative steps (where it would also mislead the controller's step-time estimates); returns
    the seconds it took. Cheap once compiled: graphs outlive drafters.

    The forwards write K/V at position ``capacity - 2`` of the first slots, past every row's valid data
    (``t_len <= max_seq_len - 1 < capacity - 2`` for ``kmax >= 1``), where nothing is read before it is
    rewritten. Sizes are picked to differ from every other size the graph sees (``span = capacity - 1``; a
    batch size other than the head counts, head dim, layer and slot counts, which the cache tensor and its
    base carry): dynamo's duck sizing would otherwise tie them together, and the next batch size would
    recompile.
    """
    t0 = time.perf_counter()
    d, p = model.cfg, capacity - 2
    taken = {d.num_kv_heads, d.num_heads, d.head_dim, d.hidden_size, d.num_layers, max_batch, p, p + 1, p + 2}
    batches = [1] + [next((b for b in range(2, max_batch + 1) if b not in taken), max_batch)]
    for b in sorted(set(batches)):
        tok = torch.zeros(b, 1, dtype=torch.long, device=model.device)
        model(tok, torch.full((b,), p, device=tok.device), cache, [p] * b)
    return time.perf_counter() - t0
