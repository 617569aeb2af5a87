"""The front door: ``LLM`` (a vLLM-style generator over TorchEngine) and ``AdaptiveSpecRollout``.

Wrapping contract
-----------------
``AdaptiveSpecRollout(rollout_fn, llm=llm)`` returns a callable with ``rollout_fn``'s signature and
return value. ``rollout_fn`` generates through ``llm`` (by closure, or as an argument the caller
passes); for the duration of each call the wrapper points ``llm`` at its planner (``ar``: K=0
always; ``sd``: fixed K; ``adaptive``: the runtime controller) and collects one telemetry entry.
``rollout_fn=None`` makes the wrapper call ``llm.generate`` directly. ``update_policy(weights)``
reloads the target in place and re-derives the INT4 drafter from the new weights.

Health checks: ``watchdog=True`` (default; a dict passes options to ``control.watchdog.Watchdog``)
checks the first speculative steps after every ``update_policy`` and at the start of every rollout;
a collapsed acceptance re-derives the drafter from the current weights once, and if that does not
help, speculation is off for the rest of the rollout (one warning, a ``watchdog_disable`` event).
The engine itself never drafts with a drafter whose ``policy_version`` differs from the target's
(it runs the step AR with a ``stale_drafter`` event; the watchdog then re-derives). ``audit=True``
(opt-in; a dict passes options to ``audit.LosslessAudit``) runs the online lossless audit. Both show
up in ``stats()``, in each history entry (``events``, ``guard_s``) and in the JSONL trace (``events``).

``LLM.generate(prompts, sampling_params)`` takes vLLM-style inputs (strings, token-id lists or
``{"prompt_token_ids": [...]}`` dicts; any object with vLLM ``SamplingParams`` attributes) and
returns vLLM-shaped outputs (``.prompt_token_ids``, ``.outputs[i].token_ids / .logprobs / .text /
.finish_reason``). ``logprobs`` are plain floats: the target's logprob of each sampled token.
"""

from __future__ import annotations

import contextlib
import functools
import json
import numbers
import operator
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .audit import LosslessAuditError
from .checkpoints import policy_state
from .engine.model import Transformer, check_state, copy_state
from .engine.records import BatchView, Plan, StepRecord
from .engine.sampling import SamplingParams
from .engine.torch_engine import BatchInputError, TorchEngine

MODES = ("ar", "sd", "adaptive")


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    text: str | None = None
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class GenerationOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


# What a dict of sampling parameters may hold (anything else is a typo or a feature we do not have).
SAMPLING_KEYS = ("n", "temperature", "top_k", "top_p", "max_tokens", "stop_token_ids", "ignore_eos", "seed")
# vLLM SamplingParams attributes that would change the distribution: refused unless at their neutral value.
_UNSUPPORTED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                "min_tokens": 0, "logit_bias": None, "allowed_token_ids": None, "bad_words": None, "stop": None}


def to_sampling_params(sp: Any, vocab_size: int) -> SamplingParams:
    """Our validated SamplingParams from ours, None, a dict, or any object with vLLM SamplingParams attributes.

    Values are taken as given, never coerced: ``max_tokens=0`` or ``temperature="0.5"`` is an error naming
    the value. vLLM's conventions hold: ``top_k`` -1 or None is off, ``max_tokens=None`` is 16.
    """
    if sp is None:
        return SamplingParams()
    if isinstance(sp, SamplingParams):
        sp.validate(vocab_size)
        return sp
    if isinstance(sp, Mapping):
        unknown = sorted(set(map(str, sp)) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))} (supported: "
                             f"{', '.join(SAMPLING_KEYS)})")
        get = sp.get
    else:
        get = lambda k, d=None: getattr(sp, k, d)  # noqa: E731
        for name, neutral in _UNSUPPORTED.items():
            v = get(name, neutral)
            if not (v is None or v == neutral or (isinstance(v, (list, tuple, dict, set)) and not v)):
                raise ValueError(f"sampling parameter {name}={v!r} is not supported by effroll's engine")
    top_k, max_tokens, stop = get("top_k", 0), get("max_tokens", 16), get("stop_token_ids", None)
    out = SamplingParams(
        temperature=_number("temperature", get("temperature", 1.0)),
        top_k=0 if top_k in (None, -1) else _integer("top_k", top_k),
        top_p=_number("top_p", get("top_p", 1.0)),
        max_tokens=16 if max_tokens is None else _integer("max_tokens", max_tokens),
        stop_token_ids=() if stop is None else tuple(_integer("stop token id", t) for t in _sequence("stop_token_ids", stop)),
        ignore_eos=get("ignore_eos", False),
        seed=None if get("seed", None) is None else _integer("seed", get("seed")),
    )
    out.validate(vocab_size)
    return out


def samples_per_request(sp: Any) -> int:
    """``n`` of a sampling-params object or dict (default 1); an int >= 1 or a ValueError/TypeError."""
    n = getattr(sp, "n", None) if not isinstance(sp, Mapping) else sp.get("n", None)
    n = 1 if n is None else _integer("n", n)
    if n < 1:
        raise ValueError(f"n (samples per request) must be >= 1, got {n!r}")
    return n


def _integer(name: str, v: Any) -> int:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {v!r}") from None


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r}")
    return float(v)


def _sequence(name: str, v: Any) -> Sequence[Any]:
    if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {v!r}")
    return list(v)


def as_request_list(prompts: Any, sampling_params: Any) -> tuple[list[Any], list[Any]]:
    """vLLM-style ``generate`` inputs -> (prompts, one sampling-params object per prompt)."""
    if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, (list, tuple)) and prompts
                                               and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    prompts = list(prompts)
    sps = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
    if len(sps) != len(prompts):
        raise ValueError(f"got {len(sps)} sampling params for {len(prompts)} prompts")
    return prompts, sps


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
    drafter.shared_names = []


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
                                  seed=seed, compile_drafter=compile_drafter)
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
        d.policy_version = self.version
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
        the caller explicitly approved it for this policy (``drafter.pinned_from`` keeps the version
        it was derived for). Sampling stays lossless; only acceptance can suffer.
        """
        with self._session_lock, self.engine.lock:  # never between the generate calls of a rollout
            if self.engine.has_unfinished():
                raise RuntimeError("update_policy called while requests are in flight; call it between rollouts")
            t0 = time.perf_counter()
            state = policy_state(weights, self.model)
            params = check_state(self.model, state)  # the whole architecture, before anything changes
            kept = self.engine.drafter if keep_drafter else None
            if kept is not None:
                pin_drafter(kept, self.model)
                kept.pinned_from = getattr(kept, "pinned_from", kept.policy_version)
            copy_state(params, state)
            self.version += 1
            self.engine.policy_version = self.version
            if kept is not None:
                kept.policy_version = self.version
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
            warnings.warn(f"effroll: drafter derivation failed ({self.drafter_error}); speculation is off", stacklevel=3)
            self.engine.set_drafter(None)
            return False
        self.drafter_error = None
        self.engine.set_drafter(d)
        return True

    # ------------------------------------------------------------------ generation
    def _on_step(self, rec: StepRecord) -> None:
        for fn in self.listeners:
            fn(rec)

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

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> list[GenerationOutput]:
        """vLLM-style generation; outputs in the caller's order. Invalid requests do not stop the others:
        after the valid ones finish, ``BatchInputError`` (a ValueError) names them and carries every output
        in ``.outputs``. Calls from several threads run one after another."""
        results, flat, params, owners, errors = expand_requests(prompts, sampling_params, self._parse,
                                                                self.model.cfg.vocab_size)
        with self.engine.lock:
            outs = self.engine.generate(flat, params, plan=self.planner, on_step=self._on_step)
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


def prompt_ids(p: Any, tokenizer: Any = None) -> tuple[str | None, list[Any]]:
    """A vLLM-style prompt (text, token ids, or a dict with ``prompt``/``prompt_token_ids``) -> (text, ids).

    Token ids may be any sequence of ints (list, tuple, 1-D numpy array or tensor); the engine checks them."""
    if isinstance(p, Mapping):
        if "prompt_token_ids" in p:
            return p.get("prompt"), _id_list(p["prompt_token_ids"])
        if "prompt" in p:
            p = p["prompt"]
        else:
            raise ValueError(f"prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
    if isinstance(p, str):
        if tokenizer is None:
            raise ValueError("text prompt given but the model has no tokenizer; pass token ids")
        return p, tokenizer.encode(p, add_special_tokens=False)
    return None, _id_list(p)


def _id_list(ids: Any) -> list[Any]:
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1:
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return list(ids)
    raise TypeError(f"unsupported prompt type {type(ids).__name__} (text, a sequence of token ids, or a dict "
                    "with 'prompt' / 'prompt_token_ids')")


def expand_requests(prompts: Any, sampling_params: Any, parse: Callable[[Any], tuple[str | None, list[int]]],
                    vocab_size: int) -> tuple[list[GenerationOutput], list[list[int]], list[SamplingParams], list,
                                              list[str]]:
    """vLLM-style ``generate`` inputs -> (one output per request, then the valid requests' ``n`` samples
    flattened: prompt ids, SamplingParams, (request, sample) owners; and one message per invalid request).

    ``parse(prompt)`` returns (text, checked token ids) or raises ValueError/TypeError. An invalid request's
    output already holds its ``n`` (or one) completions with ``finish_reason="error"``; the others run.
    Sample j of a request seeded ``s`` is seeded ``s + j`` (and reduced by the engine's one seed rule).
    """
    prompts, sps = as_request_list(prompts, sampling_params)
    flat, params, owners, errors = [], [], [], []
    results: list[GenerationOutput] = []
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        text, ids, n = None, [], 1
        try:
            n = samples_per_request(sp)
            text, ids = parse(p)
            base = to_sampling_params(sp, vocab_size)
        except (ValueError, TypeError) as e:
            errors.append(f"prompt {i}: {e}")
            results.append(GenerationOutput(f"{i}", text, list(ids) if isinstance(ids, list) else [],
                                            [CompletionOutput(j, [], [], "error", error=str(e)) for j in range(n)]))
            continue
        results.append(GenerationOutput(f"{i}", text, ids))
        for j in range(n):
            s = base if base.seed is None or j == 0 else SamplingParams(**{**base.__dict__, "seed": base.seed + j})
            flat.append(ids)
            params.append(s)
            owners.append((i, j))
    return results, flat, params, owners, errors


def fill_outputs(results: list[GenerationOutput], owners: list, outs: Sequence[Any],
                 tokenizer: Any) -> list[GenerationOutput]:
    """Engine outputs (``token_ids``, ``logprobs``, ``finish_reason``, ``error``) into the requests' completions."""
    for (i, j), o in zip(owners, outs):
        text = tokenizer.decode(o.token_ids) if tokenizer is not None else None
        results[i].outputs.append(CompletionOutput(j, o.token_ids, o.logprobs, o.finish_reason, text,
                                                   getattr(o, "error", None)))
    return results


# ---------------------------------------------------------------------------- telemetry
def summarize_steps(records: Sequence[StepRecord], kmax: int = 16) -> dict[str, Any]:
    """Per-rollout telemetry from its step records."""
    verified = [0] * (kmax + 1)
    accepted = [0] * (kmax + 1)
    khist: Counter = Counter()
    toggles, prev = 0, None
    drafts = acc_total = 0
    for r in records:
        spec = r.speculative
        if prev is not None and spec != prev:
            toggles += 1
        prev = spec
        khist[r.max_k] += 1
        for k, a in zip(r.k, r.accepted):
            if k <= 0:
                continue
            drafts += 1
            acc_total += a
            for pos in range(1, min(a + 1, k) + 1):
                verified[min(pos, kmax)] += 1
                if pos <= a:
                    accepted[min(pos, kmax)] += 1
    per_pos = {str(p): round(accepted[p] / verified[p], 4) for p in range(1, kmax + 1) if verified[p]}
    nver = sum(verified)
    return {
        "steps": len(records),
        "tokens": sum(r.tokens for r in records),
        "engine_s": sum(r.seconds + r.prefill_s for r in records),
        "speculative_share": (sum(r.speculative for r in records) / len(records)) if records else 0.0,
        "acceptance": (sum(accepted) / nver) if nver else None,
        "verified_positions": nver,
        "acceptance_per_position": per_pos,
        "mean_accepted_per_draft": (acc_total / drafts) if drafts else None,
        "k_histogram": {str(k): v for k, v in sorted(khist.items())},
        "toggles": toggles,
    }


def _options(name: str, value: Any) -> dict[str, Any]:
    """``True`` (defaults) or a mapping of keyword arguments for the watchdog / audit."""
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{name} must be True, False or a dict of options, got {value!r}")


def runtime_hardware(model: Transformer) -> dict[str, Any]:
    """This machine as a profile records it: CPU, cores, device type, torch threads."""
    from .control import hardware_fingerprint

    return hardware_fingerprint(torch_threads=torch.get_num_threads(), device=model.device.type)


def resolve_profile(profile: Any, model: Transformer) -> tuple[str | None, dict | None]:
    """``profile`` may be None, "auto" (a shipped/EFFROLL_POLICIES profile tuned for this model
    architecture on this kind of machine, if any), a path or a dict. Returns (source, validated
    profile or None); a profile tuned for another architecture is a ValueError."""
    from .control import find_profile, load_profile, validate_profile

    if profile is None:
        return None, None
    if isinstance(profile, str) and profile == "auto":
        path = find_profile(model.fingerprint(), runtime_hardware(model))
        if path is None:
            return None, None
        profile = path
    source = str(profile) if isinstance(profile, (str, Path)) else "<dict>"
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else validate_profile(profile)
    fp = profile["model"].get("fingerprint")
    if fp and fp != model.fingerprint():
        raise ValueError(f"profile is for model {profile['model']['name']!r} (fingerprint {fp}), not this "
                         f"model {getattr(model, 'name', None)!r} (fingerprint {model.fingerprint()}); "
                         "run `effroll tune` for it")
    return source, profile


class AdaptiveSpecRollout:
    """Wrap a rollout function so its generation runs AR, fixed-K speculative, or adaptive."""

    def __init__(
        self,
        rollout_fn: Callable[..., Any] | None = None,
        *,
        llm: LLM | None = None,
        model: str | Path | Transformer | None = None,
        mode: str = "adaptive",
        k: int = 4,
        policy: str = "cost_model",
        profile: str | Path | dict | None = "auto",
        recipe: str | None = "rtn-sym-g64",
        trace: str | Path | None = None,
        controller_kwargs: Mapping[str, Any] | None = None,
        watchdog: bool | Mapping[str, Any] = True,
        audit: bool | Mapping[str, Any] = False,
        score_drafter: bool = True,
        workers: int | None = None,
        ray_address: str | None = None,
        **llm_kwargs: Any,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if rollout_fn is not None and not callable(rollout_fn):
            raise TypeError(f"rollout_fn must be callable, got {type(rollout_fn).__name__}")
        self.pool = None
        if workers is not None or ray_address is not None:
            # Scale-out (effroll/dist/ray_pool.py): each Ray actor builds its own LLM, drafter and controller
            # from model= and every other argument of this call; rollout_fn generates through self.llm (the pool).
            opts = dict(locals())  # first: every argument of this call, for the actors
            for name in ("self", "rollout_fn", "llm", "model", "workers", "ray_address", "llm_kwargs"):
                del opts[name]
            if llm is not None or model is None:
                raise ValueError("workers=/ray_address= build one LLM per Ray actor: pass model=, not llm=")
            from .dist.ray_pool import RayRolloutPool

            self.pool = self.llm = RayRolloutPool(model, workers=1 if workers is None else workers,
                                                  ray_address=ray_address, **opts, **llm_kwargs)
            self.rollout_fn, self.mode, self.history = rollout_fn, mode, self.pool.history
            if rollout_fn is not None:
                functools.update_wrapper(self, rollout_fn)
            return
        if llm is None:
            if model is None:
                raise ValueError("AdaptiveSpecRollout needs llm= (an effroll.LLM) or model= (a checkpoint path)")
            llm = LLM(model, recipe=recipe, **llm_kwargs)
        self.rollout_fn = rollout_fn
        self.llm = llm
        self.mode = mode
        self.k = min(k, llm.engine.kmax)
        from .control import Controller

        self.profile_path, profile = resolve_profile(profile, llm.model)
        self.controller = Controller(policy=policy, profile=profile, **dict(controller_kwargs or {}))
        from .control.watchdog import Watchdog

        # Health checks (effroll/control/watchdog.py, effroll/audit.py): watchdog on by default, audit opt-in.
        self.watchdog = Watchdog(**_options("watchdog", watchdog)) if watchdog is not False else None
        if audit is not False:
            from .audit import LosslessAudit

            self.audit = LosslessAudit(**_options("audit", audit))
        else:
            self.audit = None
        self.guard_s = {"watchdog": 0.0, "audit": 0.0}  # seconds spent in the checks (overhead)
        self.score_drafter = bool(score_drafter)
        self.score_s = 0.0  # seconds spent scoring drafters for the acceptance prior
        self._warned: set[str] = set()
        self.trace_path = Path(trace) if trace else None
        self.history: list[dict[str, Any]] = []
        self._records: list[StepRecord] = []
        self._trace = None
        if rollout_fn is not None:
            functools.update_wrapper(self, rollout_fn)

    def _planner(self) -> Plan | Callable[[BatchView], Plan]:
        if self.mode == "ar":
            return Plan(0)
        base = Plan(self.k) if self.mode == "sd" else self.controller.plan

        def plan(view: BatchView) -> Plan:
            if (self.watchdog is not None and self.watchdog.disabled) or (self.audit is not None and self.audit.failed):
                return Plan(0)
            p = base if isinstance(base, Plan) else base(view)
            if self.audit is not None and p.speculative:
                t0 = time.perf_counter()
                p = self.audit.assign(view, p)
                self.guard_s["audit"] += time.perf_counter() - t0
            return p

        return plan

    def _check(self, rec: StepRecord) -> None:
        """Watchdog and audit after one step; their events go into the step record (and so the trace)."""
        wd, au = self.watchdog, self.audit
        t0 = time.perf_counter()
        if wd is not None and self.mode != "ar":
            action = wd.observe(rec)
            if action == "rederive":
                if self.llm.rederive_drafter():
                    wd.rederived(self.llm.version)
                    self.controller.reset_acceptance()
                else:
                    action = wd.give_up(rec.step, f"re-derivation failed: {self.llm.drafter_error}")
            if action == "disable":
                self._warn("watchdog", f"effroll watchdog: drafter acceptance collapsed and re-deriving it from "
                                       f"the current policy did not restore it ({wd.events[-1]['detail']}); "
                                       f"speculation is off for the rest of this rollout")
            rec.events.extend(wd.pending)
            wd.pending.clear()
        t1 = time.perf_counter()
        if au is not None and self.mode != "ar":
            msg = au.observe(rec, self.llm.engine)
            if msg is not None:
                rec.events.append(f"audit_failed: {msg}; speculation is off")
                if au.on_failure == "ar":
                    self._warn("audit", f"effroll lossless audit failed: {msg}; falling back to AR decoding")
        t2 = time.perf_counter()
        self.guard_s["watchdog"] += t1 - t0
        self.guard_s["audit"] += t2 - t1

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:  # one warning per kind and rollout
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _on_step(self, rec: StepRecord) -> None:
        self._records.append(rec)
        if self.mode == "adaptive":
            self.controller.observe(rec)
        self._check(rec)
        if self._trace is not None:
            d = rec.to_dict()
            d.update(rollout=len(self.history), mode=self.mode)
            self._trace.write(json.dumps(d) + "\n")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pool is not None:  # the actors plan, check and record; the pool merges their telemetry
            return self.pool.run(self.rollout_fn or self.pool.generate, *args, **kwargs)
        with self.llm.session(self._planner(), self._on_step):  # calls from several threads queue up here
            return self._rollout(*args, **kwargs)

    def _rollout(self, *args: Any, **kwargs: Any) -> Any:
        llm = self.llm
        self._records = []
        self._warned = set()
        if self.watchdog is not None:
            self.watchdog.arm("rollout start", llm.version)
        if self.audit is not None:
            self.audit.start_rollout()
        audit_failed = self.audit is not None and self.audit.failed
        if self.mode == "adaptive" and self.score_drafter and self.controller.acceptance.verified == 0:
            # Nothing observed since the drafter changed: start from its teacher-forced score on the
            # latest rollouts instead of the profile's prior (in AR the controller never observes a).
            ts = time.perf_counter()
            try:
                a = llm.acceptance_estimate()
            except Exception as e:  # noqa: BLE001 - a failed estimate must not cost the rollout
                a = None
                self._warn("score", f"effroll: scoring the drafter failed ({type(e).__name__}: {e}); "
                                    "the controller keeps its prior acceptance")
            if a is not None:
                self.controller.reset_acceptance(prior=a, source="scored")
            self.score_s += time.perf_counter() - ts
        guard0 = dict(self.guard_s)
        self._trace = open(self.trace_path, "a") if self.trace_path else None
        t0 = time.perf_counter()
        try:
            fn = self.rollout_fn or llm.generate
            result = fn(*args, **kwargs)
        finally:
            wall = time.perf_counter() - t0
            if self._trace is not None:
                self._trace.close()
                self._trace = None
        entry = summarize_steps(self._records, llm.engine.kmax)
        entry.update(mode=self.mode, wall_s=wall, tok_per_s=entry["tokens"] / wall if wall > 0 else 0.0,
                     policy_version=llm.version,
                     events=[e for r in self._records for e in r.events],
                     guard_s={k: v - guard0[k] for k, v in self.guard_s.items()})
        if self.watchdog is not None:
            self.watchdog.end_rollout(entry["acceptance"], entry["verified_positions"])
        self.history.append(entry)
        if self.audit is not None and self.audit.failed and not audit_failed and self.audit.on_failure == "raise":
            raise LosslessAuditError(f"effroll lossless audit failed: {self.audit.failure}; the rollout finished in "
                                     f"AR after the detection (its result is in .result) and speculation stays off",
                                     result=result, stats=self.stats())
        return result

    def update_policy(self, weights_or_path: Any, *, keep_drafter: bool = False) -> float:
        """Reload the policy, re-derive the drafter (``keep_drafter=True``: keep the old one, see
        ``LLM.update_policy``), reset acceptance estimates; returns refresh seconds."""
        if self.pool is not None:
            return self.pool.update_policy(weights_or_path, keep_drafter=keep_drafter)
        s = self.llm.update_policy(weights_or_path, keep_drafter=keep_drafter)
        self.controller.reset_acceptance()
        if self.watchdog is not None:
            self.watchdog.arm("update_policy", self.llm.version)
        return s

    def stats(self) -> dict[str, Any]:
        if self.pool is not None:
            return self.pool.stats()
        last = self.history[-1] if self.history else {}
        return {
            "mode": self.mode,
            "policy_version": self.llm.version,
            "rollouts": len(self.history),
            "last": last,
            "history": list(self.history),
            "refresh_s": list(self.llm.refresh_s),
            "drafter_error": self.llm.drafter_error,
            "controller": self.controller.stats(),
            "profile": self.profile_path,
            "watchdog": self.watchdog.stats() if self.watchdog is not None else None,
            "audit": self.audit.stats() if self.audit is not None else None,
            "guard_s": dict(self.guard_s),
            "score_s": self.score_s,
        }
