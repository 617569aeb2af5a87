"""GRPO with TRL's ``GRPOTrainer``, every rollout through ``AdaptiveSpecRollout``.

How it fits together (one optimizer step):

1. TRL draws ``prompts_per_step`` problems, repeats each ``group_size`` times and calls our
   ``rollout_func(prompts, trainer)`` (TRL's hook for custom generation, experimental in TRL 1.x).
   That function is wrapped by ``AdaptiveSpecRollout``: it tokenizes with the chat template and calls
   ``llm.generate`` (our embedded TorchEngine, bf16), which runs AR, fixed-K speculative or adaptive
   under the wrapper's planner, and returns completions with the target's per-token logprobs.
2. TRL scores the completions (``correctness_reward``: the final number equals the answer), normalises
   rewards per group (``scale_rewards="group"``), recomputes the policy's logprobs with the HF model
   it trains (fp32 master weights, bf16 autocast) and takes one AdamW step on the clipped-ratio GRPO
   loss (TRL's default ``dapo`` token normalisation; ``beta=0``: no KL to a reference, TRL's default).
3. Our callback (``GRPOTelemetry``) then calls ``rollout.update_policy(model.state_dict())``: the
   engine's target is reloaded in place and the INT4 drafter re-derived (``sd-stale``: the step-0
   drafter is kept, ``keep_drafter=True``), and writes one JSONL record per step.

Why TRL fits here (no vLLM, no network, 2-core CPU): with ``rollout_func`` TRL never generates
itself, so it needs neither vLLM nor a GPU; the model and tokenizer are passed as objects (nothing is
fetched); the HF model trains on CPU (``use_cpu=True``, bf16 autocast over fp32 weights, no
gradient checkpointing).

What TRL does with the rollout logprobs: without vLLM, nothing by default (only its optional
off-policy mask reads them). With one generation per optimizer step (``steps_per_generation`` =
gradient accumulation steps, ``num_iterations=1``) its "old" logprobs are the trainer's own detached
ones and the parameters do not change within the accumulated step, so the ratio is exactly 1 and
the clipped objective reduces to the policy gradient with group-normalised advantages (TRL's
default set-up). The engine-vs-trainer logprob mismatch is not importance-corrected (TRL does that
only for vLLM).
The engine samples in bf16 while TRL trains fp32 master weights; the policy the engine runs is the
bf16 rounding of those weights (the usual trainer/inference-engine split; small learning rates can
leave it unchanged, see experiments/grpo_run.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..engine.sampling import SamplingParams, derive_seed
from ..llm import LLM
from ..rollout import AdaptiveSpecRollout
from .tasks import correctness_reward

MODES = ("ar", "sd", "sd-stale", "adaptive")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def chat_prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt: chat messages get the chat template (with the assistant header), text is encoded."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(t) for t in ids]


def sample_seed(seed: int, step: int, index: int) -> int:
    """Seed of completion ``index`` at optimizer step ``step``: the same in every mode (the one seed rule)."""
    return derive_seed(seed, step, index)


def _pinned(drafter: Any) -> bool:
    return drafter.meta is not None and drafter.meta.pinned_from is not None


def _derived_for(drafter: Any) -> int | None:
    """The policy version a drafter was derived for (a pinned one: where it was pinned from)."""
    if drafter is None or drafter.meta is None:
        return None
    return drafter.meta.pinned_from if drafter.meta.pinned_from is not None else drafter.meta.policy_version


def make_rollout_func(llm: LLM, tokenizer: Any, *, max_tokens: int, temperature: float = 1.0,
                      seed: int = 0) -> Callable[..., dict[str, list]]:
    """A TRL ``rollout_func(prompts, trainer)``: one completion per (already repeated) prompt.

    Returns ``prompt_ids``, ``completion_ids`` and ``logprobs`` (the target's logprob of every
    sampled token). Seeds depend on (``seed``, optimizer step, position in the batch) only.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    calls = [0]

    def rollout_func(prompts: Sequence[Any], trainer: Any = None) -> dict[str, list]:
        step = trainer.state.global_step if trainer is not None else calls[0]
        calls[0] += 1
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=sample_seed(seed, step, i))
                  for i in range(len(ids))]
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params)
        comps = [o.outputs[0] for o in outs]
        return {"prompt_ids": ids, "completion_ids": [c.token_ids for c in comps],
                "logprobs": [c.logprobs for c in comps]}

    return rollout_func


def build_rollout(llm: LLM, mode: str, rollout_func: Callable[..., Any], *, k: int = 4,
                  controller_kwargs: dict | None = None) -> AdaptiveSpecRollout:
    """The wrapper for a run mode: ``sd-stale`` is fixed-K ``sd`` whose drafter is never refreshed (the
    watchdog, which would re-derive a decaying drafter, is off there: staleness is the point)."""
    check_mode(mode)
    if mode == "sd-stale":
        return AdaptiveSpecRollout(rollout_func, llm=llm, mode="sd", k=k, watchdog=False)
    return AdaptiveSpecRollout(rollout_func, llm=llm, mode=mode, k=k, controller_kwargs=controller_kwargs)


class StepLog:
    """What the last optimizer step generated and scored, for the step record.

    ``rollout_func`` is what TRL calls (it calls the wrapped rollout and keeps the completion
    lengths); ``reward_func`` is the TRL reward function: ``reward`` (default: exact-answer
    correctness), keeping the rewards it returns.
    """

    def __init__(self, rollout: AdaptiveSpecRollout, reward: Callable[..., list[float]] = correctness_reward) -> None:
        self.rollout = rollout
        self.lengths: list[int] = []
        self.rewards: list[float] = []
        self.last: dict[str, list] = {}

        def reward_func(completions: Sequence[Any], **kw: Any) -> list[float]:
            self.rewards = [float(r) for r in reward(completions, **kw)]
            return self.rewards

        reward_func.__name__ = getattr(reward, "__name__", "reward")  # TRL logs rewards/<name>
        self.reward_func = reward_func

    def rollout_func(self, prompts: Sequence[Any], trainer: Any = None) -> dict[str, list]:
        res = self.rollout(prompts, trainer)
        self.last = res
        self.lengths = [len(c) for c in res["completion_ids"]]
        return res


def token_digest(seqs: Sequence[Sequence[int]]) -> str:
    return hashlib.sha1(json.dumps([list(s) for s in seqs]).encode()).hexdigest()[:12]


class GreedyProbe:
    """Greedy rollouts of a few fixed prompts, AR and speculative, at the current policy.

    ``check()`` returns ``greedy_identical`` (did fixed-K speculation with the run's current drafter,
    fresh or stale, reproduce AR's tokens exactly; None when the run has no drafter),
    ``greedy_digest`` (a digest of AR's tokens: equal across runs that share a policy, e.g. at step
    0) and, per row that differs, where and how close the target's top two logits were there
    (``greedy_divergence``: row, position, margin, ``numerics`` and ``near_tie``). ``numerics`` is
    how far the target's logits at that position move between two shapes of the same computation:
    one forward over the whole prefix vs a one-token decode step after it (max over the vocabulary).
    ``near_tie`` when the top-two margin is within twice that (or two units in the last place): the
    order of the top two can flip between AR's one-token steps and a K+1-token verify. In bf16 this
    is routine (SmolLM2: the two shapes' logits differ by 0.125-0.44; a 0.19 margin flipped once in a
    GRPO run); a divergence at a clear margin would be a bug.
    """

    def __init__(self, llm: LLM, prompt_ids: Sequence[Sequence[int]], mode: str, *, max_tokens: int, k: int = 4):
        self.prompt_ids = [list(p) for p in prompt_ids]
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)

        def greedy(ps):
            return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], sp)]

        self.llm = llm
        self.ar = AdaptiveSpecRollout(greedy, llm=llm, mode="ar")
        # fixed K in every mode: speculation on at every step is the strictest identity check
        self.spec = AdaptiveSpecRollout(greedy, llm=llm, mode="sd", k=k, watchdog=check_mode(mode) != "sd-stale")

    def _divergence(self, row: int, ref: list[int], got: list[int]) -> dict[str, Any]:
        import torch

        from ..engine.kv_cache import KVCache, full_logits

        pos = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        m = self.llm.model
        seq = self.prompt_ids[row] + ref[:pos]
        with torch.no_grad():
            logits = full_logits(m, seq)[-1]
            ids = torch.as_tensor(seq, dtype=torch.long, device=m.device).view(1, -1)
            n = ids.shape[1]
            numerics = 0.0
            if n >= 2:
                cache = KVCache(m.cfg, 1, n, m.dtype, m.device)
                m(ids[:, :-1], torch.zeros(1, dtype=torch.long, device=m.device), cache, [0])
                step = m.logits(m(ids[:, -1:], torch.tensor([n - 1], device=m.device), cache, [n - 1]))[0, -1]
                numerics = float((logits - step).abs().max())
        top = torch.topk(logits, 2).values
        ulp = torch.finfo(m.dtype).eps * 2.0 ** math.floor(math.log2(max(abs(float(top[0])), 1e-30)))
        margin = float(top[0] - top[1])
        return {"row": row, "pos": pos, "margin": margin, "numerics": numerics,
                "near_tie": margin <= max(2 * ulp, 2 * numerics)}

    def check(self) -> dict[str, Any]:
        ref = self.ar(self.prompt_ids)
        out: dict[str, Any] = {"greedy_identical": None, "greedy_digest": token_digest(ref)}
        if self.llm.drafter is not None:
            got = self.spec(self.prompt_ids)
            out["greedy_identical"] = got == ref
            out["greedy_divergence"] = [self._divergence(i, a, b) for i, (a, b) in enumerate(zip(ref, got)) if a != b]
        return out


class DrafterDrift:
    """Paired drafter quality: the fresh drafter (derived from the current policy) and the step-0
    drafter (derived before training, pinned), scored on the same sequences: this step's own
    rollouts, under the policy that sampled them.

    ``measure(res, every)`` scores every ``every``-th (prompt, completion) of a rollout result
    (``every`` = group size: one completion per prompt) with ``acceptance_kl`` (expected acceptance
    ``sum_x min(p, q)`` at temperature 1, and KL) and returns ``accept_fresh``, ``accept_step0``,
    ``kl_fresh``, ``kl_step0``, ``positions``. It runs in every mode (AR runs derive the drafters
    only for this), outside the timed step.
    """

    def __init__(self, llm: LLM, recipe: str | None = None, max_sequences: int = 8):
        from ..drafter.derive import derive_drafter
        from ..llm import pin_drafter

        self.llm, self.recipe, self.max_sequences = llm, recipe or llm.recipe, max_sequences
        if self.recipe is None:
            raise ValueError("DrafterDrift needs a drafter recipe (the LLM has none: pass recipe=)")
        self.step0 = derive_drafter(llm.model, self.recipe)
        pin_drafter(self.step0, llm.model)

    def measure(self, res: dict[str, list], every: int = 1) -> dict[str, float]:
        from ..drafter.derive import derive_drafter
        from ..drafter.report import acceptance_kl

        cur = self.llm.drafter
        fresh = cur if cur is not None and not _pinned(cur) else derive_drafter(
            self.llm.model, self.recipe)
        idx = list(range(0, len(res["prompt_ids"]), max(1, every)))[: self.max_sequences]
        seqs = [list(res["prompt_ids"][i]) + list(res["completion_ids"][i]) for i in idx]
        starts = [len(res["prompt_ids"][i]) for i in idx]
        f = acceptance_kl(self.llm.model, fresh, seqs, starts)
        z = acceptance_kl(self.llm.model, self.step0, seqs, starts)
        return {"accept_fresh": f["acceptance"], "accept_step0": z["acceptance"], "kl_fresh": f["kl"],
                "kl_step0": z["kl"], "positions": f["positions"]}


def _try_import_trl():
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
        from transformers import TrainerCallback  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the GRPO experiment needs TRL: pip install 'effroll[rl]'") from e


def make_telemetry_callback(log: StepLog, mode: str, *, out: str | Path | None = None,
                            probe: GreedyProbe | None = None, drift: DrafterDrift | None = None,
                            group_size: int = 1, progress: bool = True):
    """A transformers ``TrainerCallback`` that syncs the policy into the engine after every optimizer
    step, times the step and writes one JSONL record per step (and TRL's own logs) to ``out``.

    ``step_s`` runs from the step's start (before its rollout) to the end of the policy sync; the
    optional ``drift`` measurement (before the sync, on the step's rollouts) and greedy ``probe``
    (after it) are excluded from it."""
    _try_import_trl()
    from transformers import TrainerCallback

    keep = check_mode(mode) == "sd-stale"
    rollout = log.rollout

    class GRPOTelemetry(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []
            self.path = Path(out) if out is not None else None
            self._t0 = 0.0
            self._bar = None

        def _write(self, rec: dict[str, Any]) -> None:
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

        def on_train_begin(self, args, state, control, **kw):
            if progress:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=state.max_steps, desc=f"GRPO {mode}", unit="step")

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            t_opt = time.perf_counter()
            drift_rec = {}
            if drift is not None and log.last:  # policy that sampled this step's rollouts, before the sync
                drift_rec = drift.measure(log.last, every=group_size)
                drift_rec["drift_s"] = time.perf_counter() - t_opt
            t_sync = time.perf_counter()
            refresh = rollout.update_policy(model.state_dict(), keep_drafter=keep)
            step_s = (t_opt - self._t0) + (time.perf_counter() - t_sync)
            last = rollout.history[-1] if rollout.history else {}
            llm = rollout.llm
            derived = llm.drafter is not None and not _pinned(llm.drafter)
            rec = {
                "kind": "step", "mode": mode, "step": state.global_step, "policy_version": llm.version,
                "rollout_wall_s": last.get("wall_s"), "step_s": step_s, "refresh_s": refresh,
                "derive_s": llm.refresh_s[-1] if derived and llm.refresh_s else None,
                "train_s": step_s - (last.get("wall_s") or 0.0) - refresh,
                "tokens": last.get("tokens"), "tok_per_s": last.get("tok_per_s"),
                "acceptance": last.get("acceptance"), "acceptance_per_position": last.get("acceptance_per_position"),
                "speculative_share": last.get("speculative_share"), "k_histogram": last.get("k_histogram"),
                "toggles": last.get("toggles"), "events": last.get("events", []),
                "drafter_from_version": _derived_for(llm.drafter),
            }
            rec.update(drift_rec)
            rec["rewards"], rec["lengths"] = list(log.rewards), list(log.lengths)
            rec["reward_mean"] = sum(log.rewards) / len(log.rewards) if log.rewards else None
            if probe is not None:  # outside the timed step
                t = time.perf_counter()
                rec.update(probe.check())
                rec["probe_s"] = time.perf_counter() - t
            self.records.append(rec)
            self._write(rec)
            if self._bar is not None:
                self._bar.update(1)
                acc = rec["acceptance"]
                self._bar.set_postfix(reward=f"{rec.get('reward_mean') or 0.0:.2f}",
                                      rollout=f"{rec['rollout_wall_s'] or 0:.1f}s", step=f"{step_s:.1f}s",
                                      acc="-" if acc is None else f"{acc:.2f}")

        def on_log(self, args, state, control, logs=None, **kw):
            self._write({"kind": "trl_log", "mode": mode, "step": state.global_step, **(logs or {})})

        def on_train_end(self, args, state, control, **kw):
            if self._bar is not None:
                self._bar.close()

    return GRPOTelemetry()


def build_trainer(model: Any, tokenizer: Any, log: StepLog, dataset: Any, *, callbacks: Sequence[Any] = (),
                  group_size: int = 4, prompts_per_step: int = 8, micro_batch: int = 8, max_tokens: int = 96, steps: int = 10,
                  lr: float = 1e-5, beta: float = 0.0, epsilon: float = 0.2, temperature: float = 1.0,
                  bf16: bool = True, seed: int = 0, output_dir: str | Path = "grpo_trainer", **config_overrides: Any):
    """TRL ``GRPOTrainer`` for this experiment: CPU, one generation per optimizer step, fp32 master weights
    with bf16 autocast (``bf16=False``: plain fp32; autocast measured ~1.6x faster per forward+backward
    here), our callbacks instead of TRL's progress printing."""
    _try_import_trl()
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    for name, v in (("group_size", group_size), ("prompts_per_step", prompts_per_step),
                    ("micro_batch", micro_batch), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (GRPO normalises rewards within a group), got {group_size}")
    batch = group_size * prompts_per_step
    if batch % micro_batch:
        raise ValueError(f"micro_batch {micro_batch} must divide prompts_per_step x group_size = {batch}")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=bf16, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=batch // micro_batch,
        num_generations=group_size, max_completion_length=max_tokens, temperature=temperature,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        beta=beta, epsilon=epsilon, scale_rewards="group", num_iterations=1, max_steps=steps, seed=seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    cfg.update(config_overrides)
    trainer = GRPOTrainer(model=model, reward_funcs=[log.reward_func], args=GRPOConfig(**cfg), train_dataset=dataset,
                          processing_class=tokenizer, rollout_func=log.rollout_func, callbacks=list(callbacks))
    for cb in (ProgressCallback, PrinterCallback):  # our telemetry callback draws the bar and logs to JSONL
        trainer.remove_callback(cb)
    return trainer
