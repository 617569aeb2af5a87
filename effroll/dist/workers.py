"""The members of a rollout pool (Ray actors): a torch worker (an AdaptiveSpecRollout over its own LLM) or a
vLLM worker (a VLLMEngine with the INT4 drafter it derives and exports itself)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import ray
import torch

from ..checkpoints import load_model, load_state, policy_state
from ..digest import module_digest
from ..drafter.export import export_drafter
from ..engine.rows import check_prompt_ids
from ..llm import profile_for, push_policy_to_vllm
from ..requests import expand_requests, fill_outputs, prompt_ids, samples_per_request, to_sampling_params
from ..rollout import MODES, AdaptiveSpecRollout


class _Worker:
    """One pool member (a Ray actor); the kinds differ in the engine they hold (``ENGINES``)."""

    def check_request(self, prompt: Any, sp: Any) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "torch_threads": torch.get_num_threads()}

    def check(self, items: list[tuple[Any, Any]]) -> tuple[list[str | None], None]:
        errors: list[str | None] = []
        for prompt, sp in items:
            try:
                self.check_request(prompt, sp)
                errors.append(None)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        return errors, None


class _TorchWorker(_Worker):
    """An AdaptiveSpecRollout over its own LLM (effroll's TorchEngine, INT4 drafter, controller)."""

    def __init__(self, model: Any, rollout_kwargs: dict[str, Any]):
        self.rollout = AdaptiveSpecRollout(None, model=model, **rollout_kwargs)
        self.records: list = []
        self.rollout.llm.listeners.append(self.records.append)

    def info(self) -> dict[str, Any]:
        llm = self.rollout.llm
        return {**super().info(), "engine": "torch", "device": str(llm.model.device), "kmax": llm.engine.kmax,
                "policy_version": llm.version, "drafter_digest": module_digest(llm.drafter)}

    def check_request(self, prompt: Any, sp: Any) -> None:
        self.rollout.llm.check_request(prompt, sp)

    def generate(self, items: list[tuple[Any, Any]]) -> tuple[list, list]:
        self.records.clear()
        outs = self.rollout([p for p, _ in items], [sp for _, sp in items])
        return outs, list(self.records)

    def update_policy(self, weights: Any, keep_drafter: bool = False) -> float:
        return self.rollout.update_policy(weights, keep_drafter=keep_drafter)

    def stats(self) -> dict[str, Any]:
        st = self.rollout.stats()
        st.pop("history", None)
        st.update(self.info())
        return st


VLLM_UNSUPPORTED = ("trace", "audit", "controller_kwargs", "compile_drafter")  # options of effroll's own engine
VLLM_IGNORED = ("policy", "watchdog", "device", "score_drafter")  # vLLM's scheduler runs the schedule; vLLM picks its platform


def _vllm_dtype(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)


class _VLLMWorker(_Worker):
    """A VLLMEngine (vLLM ``draft_model`` speculation) with the INT4 drafter this actor derives and exports.

    ``mode``: "ar" runs K = 0, "sd" K = ``k``, "adaptive" the batch-size schedule of ``profile`` (vLLM's
    dynamic speculation; without a profile: K = kmax at every batch size). The actor keeps an effroll copy
    of the target on the CPU: it validates new weights and is what the drafter is derived from.
    """

    def __init__(self, model: str, kw: dict[str, Any]):
        from ..engine.vllm import VLLMEngine

        kw = dict(kw)
        for name in VLLM_IGNORED:
            kw.pop(name, None)
        for name in VLLM_UNSUPPORTED:
            if kw.pop(name, None):
                raise ValueError(f"engine='vllm' workers do not support {name}= (vLLM runs the steps itself)")
        self.mode, self.k = kw.pop("mode", "adaptive"), int(kw.pop("k", 4))
        self.recipe, profile = kw.pop("recipe", "rtn-sym-g64"), kw.pop("profile", "auto")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        kw["dtype"] = _vllm_dtype(kw.get("dtype", "bfloat16"))
        self.model = load_model(model, dtype="fp32" if kw["dtype"] == "float32" else "bf16", device="cpu")
        self.profile_path, self.profile = profile_for(profile, self.model)
        self.version, self.refresh_s, self.rollouts, self.fmt = 0, [], 0, None
        # The export only lives until vLLM has loaded it (a killed actor leaves nothing behind); updates
        # export again in the same format (push_policy_to_vllm).
        with tempfile.TemporaryDirectory(prefix="effroll-drafter-") as d:
            if self.recipe is not None:
                t0 = time.perf_counter()
                self.fmt = export_drafter(self.model, d, self.recipe).format
                self.refresh_s.append(time.perf_counter() - t0)
            self.engine = VLLMEngine(model, d if self.recipe is not None else None, **kw)
        if self.profile is not None and self.engine.speculative:
            self.engine.set_profile(self.profile)

    def info(self) -> dict[str, Any]:
        from ..engine.vllm import SpecMetrics

        eng = self.engine
        m = eng.spec_metrics() if eng.speculative else SpecMetrics()
        return {**super().info(), "engine": "vllm", "device": eng.backend, "kmax": eng.kmax,
                "policy_version": self.version, "schedule": eng.schedule, "spec_decode": m.to_dict()}

    def weight_digests(self) -> dict[str, str | None]:
        """Digests of the target and draft weights vLLM holds now (hashes every byte: for tests and checks)."""
        from ..engine.vllm.hooks import worker_digests

        return dict(zip(("target", "drafter"), self.engine.llm.collective_rpc(worker_digests)[0]))

    def _parse(self, prompt: Any) -> tuple[None, list[int]]:
        _, ids = prompt_ids(prompt)  # token ids only: the engine runs with skip_tokenizer_init
        return None, check_prompt_ids(ids, self.model.cfg.vocab_size, self.engine.max_seq_len)  # the torch checks

    def check_request(self, prompt: Any, sp: Any) -> None:
        samples_per_request(sp)
        self._parse(prompt)
        to_sampling_params(sp, self.model.cfg.vocab_size)

    def generate(self, items: list[tuple[Any, Any]]) -> tuple[list, dict]:
        results, flat, params, owners, _ = expand_requests([p for p, _ in items], [sp for _, sp in items],
                                                           self._parse, self.model.cfg.vocab_size)
        plan = 0 if self.mode == "ar" else self.k if self.mode == "sd" else None
        t0 = time.perf_counter()
        outs = self.engine.generate(flat, params, plan=plan if self.engine.speculative else None)
        self.rollouts += 1
        return fill_outputs(results, owners, outs, None), {
            "tokens": sum(len(o.token_ids) for o in outs), "engine_s": time.perf_counter() - t0,
            "spec_decode": self.engine.last_metrics.to_dict() if self.engine.speculative else None}

    def update_policy(self, weights: Any, keep_drafter: bool = False) -> float:
        """Load the weights into the CPU copy (invalid ones: ValueError, nothing changes), push them into vLLM,
        then derive, export and push the drafter in the format vLLM loaded (unless ``keep_drafter``)."""
        t0 = time.perf_counter()
        load_state(self.model, policy_state(weights, self.model.cfg))
        self.version += 1
        push_policy_to_vllm(self.engine, self.model, None if keep_drafter else self.recipe, self.fmt)
        self.refresh_s.append(time.perf_counter() - t0)
        return self.refresh_s[-1]

    def stats(self) -> dict[str, Any]:
        return {"mode": self.mode, "rollouts": self.rollouts, "refresh_s": list(self.refresh_s),
                "drafter_error": None, "profile": self.profile_path, **self.info()}


ENGINES = {"torch": _TorchWorker, "vllm": _VLLMWorker}
