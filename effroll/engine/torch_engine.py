"""TorchEngine: the embedded pure-PyTorch engine (CPU and CUDA).

Continuous batching over a fixed number of KV-cache slots; every ``step(plan)`` advances each
active row once, with its own draft length K (K = 0: plain AR), through the phases of
``spec_step``: draft K tokens (a drafter with its own cache first catches up on the tokens it
missed, merged into its first forward), verify them in one target forward over
[pending, x_1..x_K], accept by batched rejection sampling, emit; both caches roll back by
setting the row's lengths (the invariants are on ``rows.Row``).

Shared KV (``share_kv``, the default whenever the drafter has the target's cache geometry, as
every self-derived INT4 drafter does): the drafter has no cache of its own. It attends to the
*target's* K/V for the committed prefix and writes its own K/V only at the draft positions
t_len..t_len+K-1, which the verify forward then overwrites (a layer writes its new K/V before
it attends). So there is no catch-up: turning speculation on after AR steps is free, and so is
a new drafter. Lossless either way: the acceptance rule only needs q to be the distribution
each draft was sampled from.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections import deque
from typing import Callable, Iterable, Sequence

import torch

from . import compiled, spec_step
from .kv_cache import KVCache
from .model import Transformer
from .prefill import shared_prefill
from .records import (AR, STALE_DRAFTER, STEP_ERROR, BatchInputError, BatchView, Plan, PlanLike, RequestOutput,
                      StepRecord, event, resolve_plan)
from .rows import Row, RowSnapshot, check_prompt_ids, describe
from .sampling import SamplingParams, stream_seed




class TorchEngine:
    """Embedded engine: a target model, an optional drafter, continuous batching."""

    def __init__(
        self,
        model: Transformer,
        drafter: Transformer | None = None,
        *,
        max_batch: int = 32,
        max_seq_len: int | None = None,
        kmax: int = 8,
        seed: int = 0,
        share_kv: bool | None = None,
        compile_drafter: bool = False,
        share_prefill: bool = True,
    ):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be an effroll Transformer, got {type(model).__name__}")
        for name, v in (("compile_drafter", compile_drafter), ("share_prefill", share_prefill)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r}")
        for name, v, lo in (("max_batch", max_batch, 1), ("kmax", kmax, 0), ("max_seq_len", max_seq_len, 2)):
            if v is None and name == "max_seq_len":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.model = model
        self.cfg = model.cfg
        self.vocab = model.cfg.vocab_size
        self.max_batch = max_batch
        self.kmax = kmax
        self.max_seq_len = max_seq_len if max_seq_len is not None else min(model.cfg.max_position_embeddings, 2048)
        self.capacity = self.max_seq_len + kmax + 1
        self.cache = KVCache(model.cfg, max_batch, self.capacity, model.dtype, model.device)
        self.drafter: Transformer | None = None
        self.dcache: KVCache | None = None
        self.active: list[Row] = []
        self.waiting: deque[Row] = deque()
        self.finished: list[RequestOutput] = []
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(stream_seed(seed))
        # One call at a time: generate/step/add_request/abort take this lock, so concurrent callers
        # queue up instead of interleaving their requests (re-entrant for listeners that call back).
        self.lock = threading.RLock()
        self.share_kv_option = share_kv  # None: share whenever the geometry allows
        # Draft steps through torch.compile'd layer chunks (Transformer.compile_decode; CPU only, opt-in:
        # set_drafter compiles the batch-1 and batch>1 graphs once per process, tens of seconds).
        self.compile_drafter = compile_drafter
        self.compile_s = 0.0  # last drafter swap's compile warm-up (compile_drafter)
        self.share_kv = False
        self.step_index = 0
        self.policy_version = 0
        # Rows whose prompts share a prefix with a cached row copy its KV instead of computing it (prefill.py).
        self.share_prefill = share_prefill
        self._pending_prefill = (0.0, 0, 0, 0)  # seconds, tokens computed, tokens requested, rows admitted
        if drafter is not None:
            self.set_drafter(drafter)

    # ------------------------------------------------------------------ drafter
    def check_drafter(self, drafter: Transformer) -> None:
        if not isinstance(drafter, Transformer):
            raise TypeError(f"drafter must be an effroll Transformer, got {type(drafter).__name__}")
        if drafter.cfg.vocab_size != self.vocab:
            raise ValueError(
                f"drafter vocabulary size {drafter.cfg.vocab_size} does not match the target's {self.vocab}"
            )
        if drafter.cfg.max_position_embeddings < self.max_seq_len:
            raise ValueError(
                f"drafter max_position_embeddings {drafter.cfg.max_position_embeddings} is below the engine's "
                f"max_seq_len {self.max_seq_len}"
            )

    def set_drafter(self, drafter: Transformer | None) -> None:
        """Swap the drafter (between steps). Drafter caches restart: the next speculative step catches up."""
        if drafter is None:
            self.drafter, self.dcache = None, None
            return
        self.check_drafter(drafter)
        if self.compile_drafter and drafter.device.type != "cpu":
            raise ValueError(f"compile_drafter is implemented (and measured) for CPU drafters only; "
                             f"this drafter is on {drafter.device}")
        if drafter is not self.model:  # the target's own forward always stays eager
            drafter.compile_decode = self.compile_drafter
        t, d = self.model.cfg, drafter.cfg
        shareable = ((d.num_layers, d.num_kv_heads, d.head_dim) == (t.num_layers, t.num_kv_heads, t.head_dim)
                     and drafter.dtype == self.model.dtype and drafter.device == self.model.device)
        if self.share_kv_option and not shareable:
            raise ValueError("share_kv=True needs a drafter with the target's KV-cache geometry, dtype and device "
                             f"(layers, kv heads, head dim: drafter {(d.num_layers, d.num_kv_heads, d.head_dim)}, "
                             f"target {(t.num_layers, t.num_kv_heads, t.head_dim)})")
        self.share_kv = shareable if self.share_kv_option is None else bool(self.share_kv_option)
        if self.share_kv:
            self.drafter, self.dcache = drafter, None
        else:
            same_shape = (
                self.dcache is not None
                and self.drafter is not None
                and (drafter.cfg.num_layers, drafter.cfg.num_kv_heads, drafter.cfg.head_dim)
                == (self.drafter.cfg.num_layers, self.drafter.cfg.num_kv_heads, self.drafter.cfg.head_dim)
            )
            if not same_shape:
                self.dcache = KVCache(drafter.cfg, self.max_batch, self.capacity, drafter.dtype, drafter.device)
            self.drafter = drafter
            for r in self.active:
                r.d_len = 0
        if drafter.compile_decode:
            if self.kmax >= 1:
                self.compile_s = compiled.warm_up(self.drafter, self.cache if self.share_kv else self.dcache,
                                                  self.capacity, self.max_batch)

    # ------------------------------------------------------------------ requests
    def validate_prompt(self, prompt_token_ids: Sequence[int]) -> list[int]:
        return check_prompt_ids(prompt_token_ids, self.vocab, self.max_seq_len)

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, index: int = 0) -> str:
        """Queue one request; invalid input raises ValueError/TypeError and queues nothing."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate(self.vocab)
        ids = self.validate_prompt(prompt_token_ids)
        with self.lock:
            rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
            if any(r.rid == rid for r in itertools.chain(self.active, self.waiting)):
                raise ValueError(f"request id {rid!r} is already in flight")
            if params.seed is None:
                seed = int(torch.randint(-(2**62), 2**62, (1,), generator=self._seed_rng))
            else:
                seed = stream_seed(params.seed)
            stop = set(params.stop_token_ids)
            if not params.ignore_eos:
                stop.update(self.cfg.eos_token_ids)
            self.waiting.append(Row(rid=rid, prompt=ids, params=params, seed=seed,
                                     stop_ids=frozenset(stop), index=index, tokens=list(ids)))
        return rid

    def abort(self, request_ids: Iterable[str]) -> int:
        """Remove these requests wherever they are (queued, running, finished but not popped); returns how
        many were found. Their slots are freed at once: nothing of them reaches a later output."""
        ids = set(request_ids)
        with self.lock:
            n = len(self.waiting) + len(self.active) + len(self.finished)
            self.waiting = deque(r for r in self.waiting if r.rid not in ids)
            self.finished = [o for o in self.finished if o.request_id not in ids]
            i = 0
            while i < len(self.active):
                if self.active[i].rid in ids:
                    self._remove_active(i)
                else:
                    i += 1
            return n - len(self.waiting) - len(self.active) - len(self.finished)

    def has_unfinished(self) -> bool:
        return bool(self.active or self.waiting)

    def pop_finished(self) -> list[RequestOutput]:
        out, self.finished = self.finished, []
        return out

    def snapshot(self, request_ids: Iterable[str] | None = None) -> dict[str, RowSnapshot]:
        """Copies of the running and finished-but-unpopped requests (those in ``request_ids``, or all), by id:
        what checks outside the engine (the online audit) may read."""
        want = None if request_ids is None else set(request_ids)
        out = {}
        with self.lock:
            for r in self.active:
                if want is None or r.rid in want:
                    out[r.rid] = RowSnapshot(r.rid, tuple(r.prompt), tuple(r.out), tuple(r.logprobs), r.params, False)
            for o in self.finished:
                if want is None or o.request_id in want:
                    out[o.request_id] = RowSnapshot(o.request_id, tuple(o.prompt_token_ids), tuple(o.token_ids),
                                                    tuple(o.logprobs), None, True)
        return out

    def batch_view(self) -> BatchView:
        self.admit()
        return BatchView(
            request_ids=tuple(r.rid for r in self.active),
            context_lens=tuple(len(r.tokens) for r in self.active),
            remaining=tuple(r.remaining(self.max_seq_len) for r in self.active),
            waiting=len(self.waiting),
            has_drafter=self.drafter is not None,
            greedy=tuple(r.params.greedy for r in self.active),
        )

    # ------------------------------------------------------------------ admission / prefill
    @torch.no_grad()
    def admit(self) -> None:
        """Move queued requests into free slots and prefill their prompts (all but the pending last token).

        A prefill that raises is retried one request at a time, so a request that cannot be prefilled
        finishes alone with ``finish_reason="error"``; an interrupt puts the new requests back in the queue.
        """
        new: list[Row] = []
        while self.waiting and len(self.active) < self.max_batch:
            r = self.waiting.popleft()
            self.active.append(r)
            new.append(r)
        if not new:
            return
        t0 = time.perf_counter()
        row0 = len(self.active) - len(new)
        try:
            ntok, nreq = self._prefill(row0, new)
        except Exception as e:  # noqa: BLE001 - isolate the request that fails, the others go on
            ntok = nreq = 0
            self.active[row0:] = new  # the shared prefill may have reordered the slots
            for i, r in enumerate(new):
                try:
                    c, q = self._prefill(row0 + i, [r])
                    ntok, nreq = ntok + c, nreq + q
                except Exception as e1:  # noqa: BLE001
                    r.finish, r.error = "error", f"prefill failed: {describe(e1)}"
            if not any(r.finish for r in new):  # a batch-shape failure only: every row prefilled alone
                warnings.warn(f"effroll: batched prefill failed ({describe(e)}); rows were prefilled one at a time",
                              RuntimeWarning, stacklevel=2)
        except BaseException:
            del self.active[row0:]
            self.waiting.extendleft(reversed(new))
            raise
        for r in new:
            r.t_len = len(r.tokens) - 1
            r.d_len = 0
        s, n, q, a = self._pending_prefill
        self._pending_prefill = (s + time.perf_counter() - t0, n + ntok, q + nreq, a + len(new))
        if any(r.finish for r in new):
            self._retire()

    def _prefill(self, row0: int, rows: list[Row]) -> tuple[int, int]:
        """Target KV of every row's prompt but its last token, into slots row0..: (tokens computed, requested).

        With ``share_prefill`` the rows take slots in the order of ``plan_shares``' three kinds: leaders
        (computed in one forward), partial rows (prefix copied, the rest in a second forward), copies."""
        feeds = [r.tokens[:-1] for r in rows]
        requested = sum(len(f) for f in feeds)
        if not self.share_prefill:
            if requested:
                self.forward(self.model, self.cache, row0, feeds, [0] * len(rows))
            return requested, requested
        order, computed = shared_prefill(feeds, [r.tokens[:r.t_len] for r in self.active[:row0]], row0,
                                         self.cache.move,
                                         lambda r0, fs, st: self.forward(self.model, self.cache, r0, fs, st))
        self.active[row0:row0 + len(rows)] = [rows[i] for i in order]
        return computed, requested

    def forward(self, model: Transformer, cache: KVCache, row0: int, feeds: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Right-padded batched forward; returns final hidden [B, T, D]."""
        T = max(len(f) for f in feeds)
        dev = model.device
        tok = torch.tensor([f + [0] * (T - len(f)) for f in feeds], dtype=torch.long, device=dev)
        start = torch.tensor(starts, dtype=torch.long, device=dev)
        return model(tok, start, cache, starts, row0=row0)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, plan: PlanLike = None) -> StepRecord:
        """Advance every active row by one (AR or speculative) step.

        A step that raises is retried one row at a time (a speculative row once more as AR), so a
        request that still fails finishes alone with ``finish_reason="error"`` and the tokens it had;
        the other rows and the engine go on. A row's state changes only once its step has succeeded.
        """
        with self.lock:
            self.admit()
            plan = resolve_plan(plan, self.batch_view)
            rows = self.active
            B = len(rows)
            ps, pn, pq, pa = self._pending_prefill
            self._pending_prefill = (0.0, 0, 0, 0)
            rec = StepRecord(step=self.step_index, request_ids=[r.rid for r in rows], k=[], accepted=[], emitted=[],
                             context_lens=[len(r.tokens) for r in rows], seconds=0.0, prefill_s=ps, prefill_tokens=pn,
                             prefill_requested=pq, admitted=pa, waiting=len(self.waiting), policy_version=self.policy_version)
            self.step_index += 1
            if B == 0:
                return rec
            t0 = time.perf_counter()
            # Never draft with a drafter derived from another policy version (unversioned drafters pass):
            # the step runs AR and says so; whoever owns the drafter re-derives it (AdaptiveSpecRollout).
            meta = getattr(self.drafter, "meta", None)
            dv = self.policy_version if meta is None or meta.policy_version is None else meta.policy_version
            can_draft = self.drafter is not None and dv == self.policy_version
            if self.drafter is not None and not can_draft:
                rec.events.append(event(STALE_DRAFTER, f"drafter from policy v{dv}, target at v{self.policy_version}; "
                                                       "AR step"))
            try:
                self._step_rows(plan if can_draft else AR, 0, B, rec)
            except Exception as e:  # noqa: BLE001 - find the row that fails; the others go on
                rec.k, rec.accepted, rec.emitted = [], [], []
                rec.events.append(event(STEP_ERROR, f"{describe(e)}; rows retried one at a time"))
                for i, r in enumerate(rows):
                    for p in ((plan, AR) if can_draft else (AR,)):
                        try:
                            self._step_rows(p, i, i + 1, rec)
                            break
                        except Exception as e1:  # noqa: BLE001
                            err = e1
                    else:
                        r.finish, r.error = "error", f"step failed: {describe(err)}"
                        rec.k.append(0)
                        rec.accepted.append(0)
                        rec.emitted.append(0)
            rec.finished = sum(1 for r in rows if r.finish)
            self._retire()
            rec.seconds = time.perf_counter() - t0
            return rec

    def _step_rows(self, plan: Plan, lo: int, hi: int, rec: StepRecord) -> None:
        """One step for the rows in slots lo..hi-1: draft, verify, accept, emit (``spec_step``)."""
        b = spec_step.plan_batch(self.active[lo:hi], lo, plan, self.kmax, self.max_seq_len)
        toks, q, d_lens = spec_step.draft(self, b, rec)
        logits = spec_step.verify(self, b, toks, rec)
        t0 = time.perf_counter()
        accepted, tokens, logprobs = spec_step.accept(b, logits, toks, q, self.vocab)
        spec_step.emit(b, accepted, tokens, logprobs, d_lens, self.max_seq_len, rec)
        rec.sample_s += time.perf_counter() - t0

    def _retire(self) -> None:
        """Remove finished rows, keeping active rows in slots 0..B-1 (move the last row into a hole)."""
        i = 0
        while i < len(self.active):
            r = self.active[i]
            if not r.finish:
                i += 1
                continue
            self.finished.append(RequestOutput(r.rid, r.prompt, r.out, r.logprobs, r.finish, error=r.error,
                                               index=r.index))
            self._remove_active(i)

    def _remove_active(self, i: int) -> None:
        """Free slot i: the last active row moves into it (one row copy), so rows stay in slots 0..B-1."""
        last = len(self.active) - 1
        if i != last:
            m = self.active[last]
            self.cache.move(last, i, m.t_len)
            if self.dcache is not None:
                self.dcache.move(last, i, m.d_len)
            self.active[i] = m
        self.active.pop()

    # ------------------------------------------------------------------ convenience
    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        plan: PlanLike = None,
        on_step: Callable[[StepRecord], None] | None = None,
        raise_on_error: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in input order, matched to requests by id.

        Invalid requests do not stop the others: they get ``finish_reason="error"``; after the
        valid ones finish, a ``BatchInputError`` (a ValueError) names the bad values and carries
        all outputs (unless ``raise_on_error=False``). A request that fails inside a step also ends
        with ``finish_reason="error"`` (its ``error`` says why; one warning per call).

        Transactional: whatever ends the call early (an exception from ``plan`` or ``on_step``, a
        KeyboardInterrupt) removes this call's requests from the engine, so no later call sees them.
        Requests queued by others through ``add_request`` keep running and keep their outputs.
        Calls from several threads run one after another (``self.lock``).
        """
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        with self.lock:
            results: dict[int, RequestOutput] = {}
            mine: dict[str, int] = {}
            errors, others, done = [], [], False
            try:
                for n, (pr, sp) in enumerate(zip(prompts, plist)):
                    try:
                        mine[self.add_request(pr, sp, index=n, request_id=f"gen-{next(self._ids)}")] = n
                    except (ValueError, TypeError) as e:
                        errors.append(f"prompt {n}: {e}")
                        results[n] = RequestOutput(f"invalid-{n}", [], [], [], "error", error=str(e), index=n)
                pending = set(mine)
                while pending:
                    if not self.has_unfinished():
                        raise RuntimeError(f"engine lost {len(pending)} requests of this call")  # a bug, never silent
                    rec = self.step(plan)
                    if on_step is not None:
                        on_step(rec)
                    for o in self.pop_finished():
                        if o.request_id in pending:
                            pending.discard(o.request_id)
                            results[mine[o.request_id]] = o
                        else:
                            others.append(o)
                done = True
            finally:
                self.finished[:0] = others  # outputs of requests added by others stay for their owner
                if not done:
                    self.abort(mine)
        outs = [results[n] for n in range(len(prompts))]
        failed = [o for o in outs if o.finish_reason == "error" and o.request_id in mine]
        if failed:
            warnings.warn(f"effroll: {len(failed)} request(s) failed inside the engine and finished with "
                          f"finish_reason='error' (first: {failed[0].error})", RuntimeWarning, stacklevel=2)
        if errors and raise_on_error:
            raise BatchInputError("; ".join(errors), outs)
        return outs

