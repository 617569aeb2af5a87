"""``LLM``: a target model, its INT4 self-drafter and a TorchEngine, with a vLLM-style ``generate``.

It owns the drafter's lifecycle: derived from the policy at start, re-derived after every
``update_policy`` (or kept, pinned), re-derived on request (the watchdog's repair), scored for the
controller's acceptance prior (``acceptance_estimate``); GPTQ recipes calibrate on the policy's own
rollouts (a Hessian collector on the target's forwards).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoints import check_state, copy_state, policy_state
from .engine.model import Transformer
from .engine.records import BatchInputError, BatchView, DrafterMeta, Plan, StepRecord
from .engine.torch_engine import PlanLike, TorchEngine
from .requests import GenerationOutput, expand_requests, fill_outputs, prompt_ids, samples_per_request, to_sampling_params


def pin_drafter(drafter: Transformer, target: Transformer) -> None:
    """Give ``drafter`` private copies of the tensors it shares with ``target`` (embedding, norms, shared
    head), so loading new target weights in place leaves the drafter exactly as it was. Idempotent."""
    own = {id(p) for p in target.parameters()}
    copies: dict[int, torch.nn.Parameter] = {}
    for name, p in list(drafter.named_parameters(remove_duplicate=False)):
        if id(p) in own:
            if id(p) not in copies:
                copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            mod, _, attr = name.rpartition(".")
            setattr(drafter.get_submodule(mod), attr, copies[id(p)])
    if drafter.meta is not None:
        drafter.meta.shared_names = ()


class LLM:
    """Target model + INT4 self-drafter + TorchEngine, with a vLLM-style ``generate``."""

    def __init__(
        self,
        model: str | Path | Transformer,
        *,
        recipe: str | None = "rtn-sym-g64",
        drafter: Transformer | None = None,
        max_batch: int = 32,
        max_seq_len: int | None = None,
        kmax: int = 8,
        dtype: str = "bf16",
        device: str | None = None,
        tokenizer: Any = None,
        hessian_every: int = 4,
        seed: int = 0,
        compile_drafter: bool = False,
        share_prefill: bool = True,
    ):
        from .checkpoints import load_model, load_tokenizer

        if isinstance(model, Transformer):
            self.model = model
        else:
            self.model = load_model(model, dtype=dtype, device=device)
            if tokenizer is None:
                tokenizer = load_tokenizer(model)
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.version = 0
        self.refresh_s: list[float] = []
        self.recent: deque = deque(maxlen=16)  # (prompt + output ids, prompt length, params) of finished requests
        self._estimate: tuple | None = None
        self.drafter_error: str | None = None
        self._collector = None
        if drafter is None and recipe is not None:
            drafter = self._derive()
        # seed: the stream that seeds requests sent without one (give each replica its own).
        self.engine = TorchEngine(self.model, drafter, max_batch=max_batch, max_seq_len=max_seq_len, kmax=kmax,
                                  seed=seed, compile_drafter=compile_drafter, share_prefill=share_prefill)
        self.planner: Plan | Callable[[BatchView], Plan] = Plan(0)
        self.listeners: list[Callable[[StepRecord], None]] = []
        self._session_lock = threading.RLock()  # one AdaptiveSpecRollout call at a time (see session)
        if recipe is not None and self._recipe_obj().method == "gptq":
            from .drafter.derive import hessian_kinds
            from .drafter.gptq import HessianCollector

            # GPTQ calibrates on the policy's own rollouts: the target's verify passes feed X^T X.
            self._collector = HessianCollector(self.model, hessian_kinds(self.recipe),
                                               sample_every=max(1, int(hessian_every)))

    # ------------------------------------------------------------------ drafter
    def _recipe_obj(self):
        from .drafter.recipe import load_recipe

        return load_recipe(self.recipe)

    def _derive(self) -> Transformer:
        from .drafter.derive import derive_drafter

        hess = None
        if self._collector is not None and self._collector.counts:
            hess = self._collector.hessians()
        t0 = time.perf_counter()
        d = derive_drafter(self.model, self.recipe, hessians=hess)
        self.refresh_s.append(time.perf_counter() - t0)
        d.meta.policy_version = self.version
        if self._collector is not None:
            self._collector.reset()
        return d

    @property
    def drafter(self) -> Transformer | None:
        return self.engine.drafter

    def update_policy(self, weights: Any, *, keep_drafter: bool = False) -> float:
        """Load new policy weights in place and re-derive the drafter; returns refresh seconds.

        Invalid weights (missing keys, shape mismatch, NaN/Inf) raise ValueError and change nothing.
        If only the drafter derivation fails, speculation is switched off with a warning.
        ``keep_drafter=True`` deliberately keeps the current drafter as it is (e.g. the never-refreshed
        baseline of an experiment): it gets private copies of the tensors it shared with the target, so
        it stays exactly the old drafter, and it is re-stamped with the new ``policy_version`` because
        the caller explicitly approved it for this policy (``drafter.meta.pinned_from`` keeps the version
        it was derived for). Sampling stays lossless; only acceptance can suffer.
        """
        with self._session_lock, self.engine.lock:  # never between the generate calls of a rollout
            if self.engine.has_unfinished():
                raise RuntimeError("update_policy called while requests are in flight; call it between rollouts")
            t0 = time.perf_counter()
            state = policy_state(weights, self.model.cfg)
            params = check_state(self.model, state)  # the whole architecture, before anything changes
            kept = self.engine.drafter if keep_drafter else None
            if kept is not None:
                pin_drafter(kept, self.model)
                kept.meta = kept.meta or DrafterMeta()
                if kept.meta.pinned_from is None:
                    kept.meta.pinned_from = kept.meta.policy_version
            copy_state(params, state)
            self.version += 1
            self.engine.policy_version = self.version
            if kept is not None:
                kept.meta.policy_version = self.version
            elif self.recipe is None:
                self.engine.set_drafter(None)
            else:
                self._install_drafter()
            return time.perf_counter() - t0

    def rederive_drafter(self) -> bool:
        """Derive the drafter again from the *current* policy weights (the watchdog's repair; safe between
        engine steps). Returns False, with speculation off, when there is no recipe or derivation fails."""
        if self.recipe is None:
            self.drafter_error = "no drafter recipe to re-derive from"
            return False
        return self._install_drafter()

    def _install_drafter(self) -> bool:
        try:
            d = self._derive()
        except Exception as e:  # noqa: BLE001 - any failure must not take rollouts down
            self.drafter_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"effroll: drafter derivation failed ({self.drafter_error}); speculation is off",
                          RuntimeWarning, stacklevel=3)
            self.engine.set_drafter(None)
            return False
        self.drafter_error = None
        self.engine.set_drafter(d)
        return True

    # ------------------------------------------------------------------ generation
    def check_request(self, prompt: Any, sampling_params: Any = None) -> None:
        """Raise ValueError/TypeError naming the bad value if ``generate`` would reject this request."""
        samples_per_request(sampling_params)
        self._parse(prompt)
        to_sampling_params(sampling_params, self.model.cfg.vocab_size)

    def _parse(self, prompt: Any) -> tuple[str | None, list[int]]:
        text, ids = prompt_ids(prompt, self.tokenizer)
        return text, self.engine.validate_prompt(ids)

    @contextlib.contextmanager
    def session(self, planner: Plan | Callable[[BatchView], Plan], listener: Callable[[StepRecord], None]):
        """While the ``with`` block runs, ``generate`` plans with ``planner`` and reports each step to
        ``listener`` (AdaptiveSpecRollout's call). Sessions from several threads run one after another."""
        with self._session_lock:
            saved = self.planner, self.listeners
            self.planner, self.listeners = planner, [*self.listeners, listener]
            try:
                yield self
            finally:
                self.planner, self.listeners = saved

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False, *,
                 plan: PlanLike = None, on_step: Callable[[StepRecord], None] | None = None) -> list[GenerationOutput]:
        """vLLM-style generation; outputs in the caller's order. ``plan`` / ``on_step`` (default: the current
        session's, see ``session``) plan each step and receive its record. Invalid requests do not stop the
        others: after the valid ones finish, ``BatchInputError`` (a ValueError) names them and carries every
        output in ``.outputs``. Calls from several threads run one after another."""
        results, flat, params, owners, errors = expand_requests(prompts, sampling_params, self._parse,
                                                                self.model.cfg.vocab_size)
        listeners = self.listeners if on_step is None else [*self.listeners, on_step]
        with self.engine.lock:
            outs = self.engine.generate(flat, params, plan=self.planner if plan is None else plan,
                                        on_step=lambda rec: [fn(rec) for fn in listeners])
        for ids, sp, o in zip(flat, params, outs):  # kept to score the next drafter on (acceptance_estimate)
            if o.finish_reason in ("stop", "length") and o.token_ids:
                self.recent.append((list(ids) + list(o.token_ids), len(ids), sp))
        fill_outputs(results, owners, outs, self.tokenizer)
        if errors:
            raise BatchInputError("; ".join(errors), results)
        return results

    def acceptance_estimate(self, positions: int = 48, sequences: int = 2, max_len: int = 256) -> float | None:
        """The current drafter's first-position acceptance, teacher-forced on the latest finished requests
        (``positions`` evenly spaced over the first ``max_len`` generated tokens of the newest ``sequences``,
        sampled ones preferred over greedy ones),
        as the engine would see it (shared KV or not; each request's sampling parameters). None without a
        drafter or history. Computed once per drafter: on this CPU ~0.2 s for the defaults (one target
        forward per sequence and a drafter pass over the scored positions only, see
        ``Transformer.forward_first_draft``), within ~0.04 of the acceptance the engine then measures."""
        d = self.engine.drafter
        if d is None or not self.recent:
            return None
        key = (id(d), self.version, len(self.refresh_s))
        if self._estimate is not None and self._estimate[0] == key:
            return self._estimate[1]
        from .drafter.report import first_draft_acceptance

        # Sampled requests first: greedy ones are typically checks and evals (e.g. the GRPO greedy probe),
        # and their argmax agreement says little about the sampled rollouts the controller serves.
        recent = ([r for r in self.recent if r[2].temperature > 0] or list(self.recent))[-max(1, sequences):]
        seqs = [seq[: start + max_len] for seq, start, _ in recent]
        a = first_draft_acceptance(self.model, d, seqs, [start for _, start, _ in recent], [sp for *_, sp in recent],
                                   shared_kv=self.engine.share_kv,
                                   per_sequence=-(-max(1, positions) // len(recent)))["acceptance"]
        self._estimate = (key, a)
        return a


def runtime_hardware(model: Transformer) -> dict[str, Any]:
    """This machine as a profile records it: CPU, cores, device type, torch threads."""
    from .control import hardware_fingerprint

    return hardware_fingerprint(torch_threads=torch.get_num_threads(), device=model.device.type)


def profile_for(profile: Any, model: Transformer) -> tuple[str | None, dict | None]:
    """``control.resolve_profile`` for ``model`` on this machine: (source, validated profile or None)."""
    from .control import resolve_profile

    return resolve_profile(profile, model.fingerprint(), runtime_hardware(model), getattr(model, "name", None))


def push_policy_to_vllm(engine: Any, model: Transformer, recipe: Any = None, fmt: str | None = None) -> dict[str, Any]:
    """The vLLM side of ``update_policy``: push ``model``'s weights into a VLLMEngine, then (with a drafter
    loaded and a ``recipe``) derive its INT4 drafter, export it in ``fmt`` (the format vLLM loaded: tensor
    names must match) and push that too. Returns timings."""
    import tempfile

    from .checkpoints import to_hf
    from .drafter.export import export_drafter

    out = {"target_s": engine.update_weights(to_hf(model))}
    if engine.speculative and recipe is not None:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="effroll-drafter-") as d:
            rep = export_drafter(model, d, recipe, **({"fmt": fmt} if fmt else {}))
            out["derive_export_s"] = time.perf_counter() - t0
            out["drafter_s"] = engine.update_drafter(d)
            out["format"] = rep.format
    return out


def load_drafter(spec: str, model: Transformer, dtype: str = "bf16", device: str | None = None) -> Transformer:
    """A drafter from a CLI spec: ``int4:<recipe>`` (derived from ``model``) or an HF checkpoint directory."""
    if spec.startswith("int4:"):
        from .drafter.derive import derive_drafter

        return derive_drafter(model, spec[len("int4:"):])
    from .checkpoints import load_model

    return load_model(spec, dtype=dtype, device=device)

