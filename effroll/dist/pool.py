"""A pool of Ray actors, each holding its own LLM: engine, INT4 drafter and controller.

``RayRolloutPool(model, workers=N, **rollout_kwargs)`` starts N actors (``workers.py``); actor i builds
``AdaptiveSpecRollout(None, model=model, seed=seed + i, **rollout_kwargs)`` (``mode``, ``k``, ``recipe``,
``max_batch``, ``device``, ...), so each replica plans with its own controller and draws the seeds of
unseeded requests from its own stream. ``model`` is a checkpoint path every node can read, or an effroll
``Transformer`` (put in the object store once).

``engine="vllm"``: each actor holds a ``VLLMEngine`` instead (vLLM ``draft_model`` speculation with the
INT4 drafter the actor derives from the checkpoint and exports; ``model`` must then be an HF checkpoint
directory every node can read). ``mode`` "ar" / "sd" run K = 0 / K = ``k``; "adaptive" runs the profile's
batch-size schedule through vLLM's dynamic speculation (no profile: K = kmax); the other keyword
arguments go to ``VLLMEngine`` (``kmax``, ``max_batch``, ``max_seq_len``, ``dtype``, ``kv_cache_gib``,
``llm_kwargs``, ...). Prompts are token ids. Telemetry is vLLM's spec-decode counters (``spec_decode``:
drafts, drafted and accepted tokens, acceptance rate) instead of effroll's step records.

* ``generate(prompts, sampling_params)``: the inputs and outputs of ``LLM.generate``. Every request is
  checked first (an invalid one raises ValueError naming it, before anything runs); then requests are
  spread across the live actors by expected work (prompt tokens + n * max_tokens, largest first onto the
  least-loaded actor) and the outputs come back in the caller's order.
* Faults: an actor that dies, or that returns nothing for ``timeout_s`` seconds while it has work (it is
  then killed), is dropped and its unfinished requests are spread over the survivors. Each request's
  output is taken exactly once. With no actor left: ``WorkersLostError``, finished outputs in ``.outputs``.
* ``update_policy(weights)``: one ``ray.put``; every actor loads the weights from that object and
  re-derives its own drafter (vLLM actors: reload the target in vLLM, derive, export and reload the
  drafter). ``stats()``: the actors' telemetry merged, plus each actor's own.

A seeded request gives the same tokens on any actor as in one process whenever its tokens do not depend
on the batch: AR mode (``mode="ar"``) or greedy. Speculative sampling is lossless in distribution; its
exact tokens also depend on the draft length of the rows it shares a step with.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

try:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("effroll.dist needs Ray: pip install 'effroll[ray]'") from e

from ..engine.vllm import merge_spec_metrics
from ..requests import as_request_list
from ..telemetry import summarize_steps
from .workers import ENGINES


class WorkersLostError(RuntimeError):
    """No rollout worker is left; ``outputs`` holds the finished outputs in the caller's order (None: unfinished)."""

    def __init__(self, message: str, outputs: list | None = None):
        super().__init__(message)
        self.outputs = outputs or []


def expected_work(prompt: Any, sampling_params: Any) -> int:
    """A request's cost to an engine in tokens: prompt length + n * max_tokens (text: ~4 characters a token)."""
    sp = sampling_params
    get = sp.get if isinstance(sp, Mapping) else (lambda key, default=None: getattr(sp, key, default))
    if isinstance(prompt, Mapping):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt", ""))
    try:
        n_prompt = len(prompt) // 4 if isinstance(prompt, str) else len(prompt)
        return n_prompt + int(get("n", 1) or 1) * int(get("max_tokens", 128) or 128)
    except (TypeError, ValueError):
        return 1  # an invalid request: the check rejects it, any weight will do


def prompt_key(prompt: Any) -> Any:
    """What makes two requests one group: equal prompts (token ids or text) go to one worker, whose engine
    then prefills the prompt once for all of them."""
    if isinstance(prompt, Mapping):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    try:
        return prompt if isinstance(prompt, str) else tuple(int(t) for t in prompt)
    except (TypeError, ValueError):
        return id(prompt)  # an invalid prompt: its own group; the check rejects it


def assign(work: Sequence[float], loads: Mapping[int, float]) -> dict[int, list[int]]:
    """Largest first, each item (an index into ``work``) to the least-loaded worker; ``loads``: work already queued."""
    load = dict(loads)
    out: dict[int, list[int]] = {w: [] for w in load}
    for i in sorted(range(len(work)), key=lambda i: -work[i]):
        w = min(load, key=load.__getitem__)
        out[w].append(i)
        load[w] += work[i]
    return out


def connect(address: str | None, timeout_s: float | None, init_kwargs: Mapping[str, Any] | None = None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the running one; None: a local Ray unless connected already).

    An explicit ``host:port`` / ``ray://host:port`` is probed first, so an unreachable one fails in
    ``timeout_s`` with ConnectionError instead of Ray's minute of retries.
    """
    if address not in (None, "auto", "local"):
        host, _, port = str(address).removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"ray_address must be 'auto', 'host:port' or 'ray://host:port', got {address!r}")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except OSError as e:
            raise ConnectionError(f"cannot reach a Ray cluster at ray_address={address!r}: {e}") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, **dict(init_kwargs or {}))
    except ConnectionError as e:
        raise ConnectionError(f"cannot join a Ray cluster at ray_address={address!r}: {e} "
                              f"(start one with `ray start --head`, or leave ray_address=None for a local Ray)") from None


def _for_object_store(weights: Any) -> Any:
    """What goes into the object store: a path as it is (every node must read it), tensors on the CPU."""
    if isinstance(weights, (str, Path)):
        return str(weights)
    if hasattr(weights, "state_dict") and not isinstance(weights, Mapping):
        weights = weights.state_dict()
    if isinstance(weights, Mapping):
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    return weights  # the workers reject it with a TypeError naming the type


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _last_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def _check_vllm_model(model: Any) -> None:
    from ..engine.vllm import vllm_available

    ok, why = vllm_available()
    if not ok:
        raise ImportError(f"engine='vllm' needs vLLM on the driver and every node: {why}")
    if not isinstance(model, (str, Path)) or not (Path(model) / "config.json").is_file():
        raise ValueError(f"engine='vllm' needs model= to be an HF checkpoint directory (with config.json) every "
                         f"node can read, got {model if isinstance(model, (str, Path)) else type(model).__name__!r}")


class RayRolloutPool:
    """N Ray actors with one LLM each; ``generate``, ``update_policy`` and ``stats`` like the in-process ones.

    ``timeout_s``: a worker holding work that returns nothing for this long is declared lost (killed, its
    requests re-queued); it also bounds ``update_policy`` and ``stats``. A worker returns its whole share of
    a ``generate`` call at once, so set it well above one rollout's duration (None: wait forever).
    ``startup_timeout_s``: for the actors to load the model (a cluster short of the resources in
    ``actor_options`` never starts them). ``actor_options``: Ray actor options, default ``{"num_cpus": 1}``
    (GPUs: ``{"num_gpus": 1}`` with ``device="cuda"``). ``ray_init``: ``ray.init`` arguments when the pool
    starts or joins Ray itself. ``engine``: "torch" (effroll's engine) or "vllm" (see the module doc).
    """

    def __init__(
        self,
        model: str | Path | Any,
        *,
        workers: int = 2,
        ray_address: str | None = None,
        seed: int = 0,
        timeout_s: float | None = None,
        startup_timeout_s: float | None = 600.0,
        connect_timeout_s: float = 10.0,
        actor_options: Mapping[str, Any] | None = None,
        ray_init: Mapping[str, Any] | None = None,
        engine: str = "torch",
        **rollout_kwargs: Any,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        for name, v in (("timeout_s", timeout_s), ("startup_timeout_s", startup_timeout_s),
                        ("connect_timeout_s", connect_timeout_s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"{name} must be a number > 0 or None, got {v!r}")
        if model is None:
            raise ValueError("RayRolloutPool needs model= (a checkpoint path every node can read, or a Transformer)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if engine == "vllm":
            _check_vllm_model(model)
        connect(ray_address, connect_timeout_s, ray_init)
        self.timeout_s = timeout_s
        self.mode = rollout_kwargs.get("mode", "adaptive")
        self.engine = engine
        self.version = 0
        self.history: list[dict[str, Any]] = []
        self.lost: dict[int, str] = {}  # worker -> why it was dropped
        self.requeued = 0  # requests moved from a lost worker to the survivors
        self._in_run = False
        self._chunks: list[list] = []  # step records of each finished share during the current run()
        model_ref = str(model) if isinstance(model, (str, Path)) else ray.put(model)
        actor = ray.remote(ENGINES[engine]).options(**{"num_cpus": 1, **dict(actor_options or {})})
        self._actors = {i: actor.remote(model_ref, {**rollout_kwargs, "seed": seed + i}) for i in range(workers)}
        self.started = workers
        try:
            infos = ray.get([a.info.remote() for a in self._actors.values()], timeout=startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise TimeoutError(f"{workers} rollout workers did not start within startup_timeout_s={startup_timeout_s} s "
                               f"(does the cluster have the resources for {actor_options or {'num_cpus': 1}}?)") from None
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            raise RuntimeError(f"a rollout worker failed to start: {_last_line(e)}") from e
        self.kmax = infos[0]["kmax"]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> list:
        """``LLM.generate`` across the pool: outputs in the caller's order, each request's exactly once."""
        if self._in_run:
            return self._generate(prompts, sampling_params)
        return self.run(self._generate, prompts, sampling_params)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` (a rollout function generating through this pool); one history entry for the whole call."""
        self._in_run, self._chunks = True, []
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        finally:
            self._in_run = False
        wall = time.perf_counter() - t0
        steps = [c for c in self._chunks if isinstance(c, list)]  # torch workers: step records
        shares = [c for c in self._chunks if isinstance(c, Mapping)]  # vLLM workers: tokens and spec metrics
        entry = summarize_steps([r for c in steps for r in c], self.kmax)
        entry["tokens"] += sum(c["tokens"] for c in shares)
        entry["engine_s"] += sum(c["engine_s"] for c in shares)
        if shares:
            entry["spec_decode"] = merge_spec_metrics([c["spec_decode"] for c in shares])
        entry.update(toggles=sum(summarize_steps(c, self.kmax)["toggles"] for c in steps), mode=self.mode,
                     engine=self.engine, wall_s=wall, tok_per_s=entry["tokens"] / wall if wall > 0 else 0.0,
                     policy_version=self.version, workers=len(self._actors))
        self.history.append(entry)
        return result

    def _generate(self, prompts: Any, sampling_params: Any) -> list:
        prompts, sps = as_request_list(prompts, sampling_params)
        items = list(zip(prompts, sps))
        if not items:
            return []
        errors, _ = self._map("check", items)
        bad = [f"prompt {i}: {e}" for i, e in enumerate(errors) if e]
        if bad:
            raise ValueError("; ".join(bad))
        outs, chunks = self._map("generate", items)
        for i, o in enumerate(outs):
            o.request_id = str(i)
        self._chunks.extend(chunks)
        return outs

    def _map(self, method: str, items: list[tuple[Any, Any]]) -> tuple[list, list]:
        """``method`` over ``items`` on the live workers: per-item results in order, and each share's extra."""
        work = [expected_work(p, sp) for p, sp in items]
        results: list[Any] = [None] * len(items)
        extras: list[Any] = []
        pending: dict[Any, tuple[int, list[int]]] = {}  # object ref -> (worker, item indices)
        since: dict[int, float] = {}  # busy worker -> when it last returned something (or got work while idle)

        keys = [prompt_key(p) for p, _ in items]

        def dispatch(idx: list[int]) -> None:
            if not self._actors:
                left = sum(r is None for r in results) if method == "generate" else len(items)
                raise WorkersLostError(f"no rollout worker left ({self._lost_text()}); {left} of {len(items)} "
                                       f"requests unfinished, the finished ones are in .outputs",
                                       results if method == "generate" else None)
            loads = {w: 0.0 for w in self._actors}
            for w, part in pending.values():
                loads[w] += sum(work[i] for i in part)
            groups: dict[Any, list[int]] = {}
            for i in idx:
                groups.setdefault(keys[i], []).append(i)
            # A group stays on one actor unless it alone is more than an even share of the call's requests
            # (one prompt sampled 20,000 times): then it is split into even shares, one per actor.
            share = -(-len(idx) // len(self._actors))
            members = [g[j:j + share] for g in groups.values() for j in range(0, len(g), share)]
            for w, part in assign([sum(work[i] for i in g) for g in members], loads).items():
                if part:
                    part = sorted(i for j in part for i in members[j])
                    pending[getattr(self._actors[w], method).remote([items[i] for i in part])] = (w, part)
                    since.setdefault(w, time.monotonic())

        def drop(w: int, why: str) -> None:
            self._lose(w, why)
            since.pop(w, None)
            idx = [i for ref in [r for r, (v, _) in pending.items() if v == w] for i in pending.pop(ref)[1]]
            if idx:
                if self._actors:  # counted only when some worker takes them over (else dispatch raises)
                    self.requeued += len(idx)
                dispatch(idx)

        task_error: RayTaskError | None = None
        dispatch(list(range(len(items))))
        while pending:
            wait = None
            if self.timeout_s is not None:
                wait = max(0.0, min(since.values()) + self.timeout_s - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                now = time.monotonic()
                for w in [w for w, t in since.items() if now - t >= self.timeout_s]:
                    drop(w, f"returned nothing for timeout_s={self.timeout_s:g} s")
                continue
            w, part = pending[ready[0]]
            try:
                values, extra = ray.get(ready[0])
            except RayActorError as e:
                drop(w, f"died: {_first_line(e)}")
                continue
            except RayTaskError as e:  # the worker's code raised; it is alive and its engine clean
                del pending[ready[0]]
                task_error = task_error or e
                continue
            del pending[ready[0]]
            if any(v == w for v, _ in pending.values()):
                since[w] = time.monotonic()
            else:
                since.pop(w, None)
            for i, v in zip(part, values):
                results[i] = v
            extras.append(extra)
        if task_error is not None:  # raised once every other share is back, so no worker is left mid-call
            raise task_error.cause if isinstance(task_error.cause, Exception) else task_error
        return results, extras

    # ------------------------------------------------------------------ policy, telemetry, lifecycle
    def update_policy(self, weights: Any, *, keep_drafter: bool = False) -> float:
        """New policy weights to every worker through one ``ray.put``; each reloads its target and re-derives
        its own drafter (``keep_drafter``: see ``LLM.update_policy``). Returns the slowest worker's refresh
        seconds. Bad weights raise the workers' error (ValueError/TypeError) and change nothing."""
        ref = ray.put(_for_object_store(weights))
        secs = self._call_all("update_policy", ref, keep_drafter)
        if not secs:
            raise WorkersLostError(f"no rollout worker left ({self._lost_text()}); the policy update reached none")
        self.version += 1
        return max(secs.values())

    def stats(self) -> dict[str, Any]:
        per = self._call_all("stats") if self._actors else {}
        refresh = [max(ts) for ts in zip(*(s["refresh_s"] for s in per.values()))]
        out = {
            "mode": self.mode,
            "engine": self.engine,
            "policy_version": self.version,
            "rollouts": len(self.history),
            "last": self.history[-1] if self.history else {},
            "history": list(self.history),
            "refresh_s": refresh,  # per refresh, the slowest worker
            "drafter_error": next((s["drafter_error"] for s in per.values() if s["drafter_error"]), None),
            "pool": {"started": self.started, "alive": sorted(self._actors), "lost": dict(self.lost),
                     "requeued_requests": self.requeued},
            "workers": per,
        }
        if self.engine == "vllm":  # vLLM's counters since each actor started, summed
            out["spec_decode"] = merge_spec_metrics([s["spec_decode"] for s in per.values()])
        return out

    def _call_all(self, method: str, *args: Any) -> dict[int, Any]:
        """``method(*args)`` on every live worker: {worker: result}. Workers that die or time out are dropped;
        an error raised by the workers' code is re-raised (the first one) after all have answered."""
        refs = {getattr(a, method).remote(*args): w for w, a in self._actors.items()}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        for r in late:
            self._lose(refs[r], f"no answer to {method} within timeout_s={self.timeout_s:g} s")
        out: dict[int, Any] = {}
        error: RayTaskError | None = None
        for r in ready:
            try:
                out[refs[r]] = ray.get(r)
            except RayActorError as e:
                self._lose(refs[r], f"died during {method}: {_first_line(e)}")
            except RayTaskError as e:
                error = error or e
        if error is not None:
            raise error.cause if isinstance(error.cause, Exception) else error
        return out

    def _lose(self, w: int, why: str) -> None:
        ray.kill(self._actors.pop(w))
        self.lost[w] = why

    def _lost_text(self) -> str:
        return "; ".join(f"worker {w} {why}" for w, why in sorted(self.lost.items())) or "none started"

    @property
    def workers(self) -> dict[int, Any]:
        """Live workers: {index: Ray actor handle}."""
        return dict(self._actors)

    def shutdown(self) -> None:
        """Kill the actors (Ray itself stays up: it may be shared)."""
        for a in self._actors.values():
            ray.kill(a)
        self._actors.clear()

    def __enter__(self) -> "RayRolloutPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
