"""TorchEngine: the embedded pure-PyTorch engine (CPU and CUDA).

Continuous batching over a fixed number of KV-cache slots; every ``step(plan)``
advances each active row once, with its own draft length K (K = 0: plain AR).

Per-row invariants between steps (``n = len(row.tokens)``, prompt + output):
  * the last token is *pending*: the target cache holds positions 0..n-2 (``t_len = n-1``);
  * the drafter cache holds the first ``d_len <= n`` tokens; a speculative step first
    feeds ``tokens[d_len:]`` to the drafter (the catch-up, merged with the first draft
    forward: normally 1 token, 2 after a fully accepted draft, more after AR steps).
A step: [catch-up + draft K tokens] -> one target forward over [pending, x_1..x_K]
-> batched rejection sampling -> emit, stop checks, roll both caches back by
setting the row's lengths.

Shared KV (``share_kv``, the default whenever the drafter has the target's cache geometry, as
every self-derived INT4 drafter does): the drafter has no cache of its own. It attends to the
*target's* K/V for the committed prefix and writes its own K/V only at the draft positions
t_len..t_len+K-1, which the verify forward then overwrites (a layer writes its new K/V before
it attends). So there is no catch-up at all (turning speculation on after AR steps is free, and
so is a new drafter), the drafter sees the exact prefix, and the drafter cache's memory is
saved. The target's computation never reads a drafter-written entry. Lossless either way: the
acceptance rule only needs q to be the distribution each draft was sampled from.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .kv_cache import KVCache
from .model import Transformer
from .records import AR, BatchView, Plan, StepRecord
from .sampling import (SamplingParams, greedy_accept, process_logits, process_probs, sample_inverse_cdf,
                       speculative_accept, stream_seed, uniforms)


def check_prompt_ids(prompt_token_ids: Sequence[int], vocab: int, max_seq_len: int) -> list[int]:
    """The prompt as a list of Python ints, or a ValueError/TypeError naming what is wrong with it.

    Any sequence of integers is accepted (lists, tuples, 1-D numpy arrays or tensors, numpy ints)."""
    if isinstance(prompt_token_ids, (str, bytes)):
        raise TypeError("prompt_token_ids must be a sequence of ints, got a string (tokenize it first)")
    if getattr(prompt_token_ids, "ndim", 1) != 1:
        raise ValueError(f"prompt_token_ids must be 1-D, got shape {tuple(prompt_token_ids.shape)}")
    if hasattr(prompt_token_ids, "tolist") and not isinstance(prompt_token_ids, (list, tuple)):
        prompt_token_ids = prompt_token_ids.tolist()  # numpy / torch: one conversion, Python ints out
    try:
        raw = list(prompt_token_ids)
    except TypeError:
        raise TypeError(f"prompt_token_ids must be a sequence of ints, got {type(prompt_token_ids).__name__}") from None
    if not raw:
        raise ValueError("empty prompt: prompt_token_ids has no tokens")
    ids = []
    for t in raw:
        try:
            v = None if isinstance(t, bool) or type(t).__name__ == "bool_" else operator.index(t)
        except TypeError:
            v = None
        if v is None or not (0 <= v < vocab):
            raise ValueError(f"prompt token id {t!r} is not an int in [0, {vocab})")
        ids.append(v)
    if len(ids) >= max_seq_len:
        raise ValueError(
            f"prompt of {len(ids)} tokens is longer than the context: max_seq_len is {max_seq_len} "
            f"(prompt + at least one generated token must fit)"
        )
    return ids


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # "stop" | "length" | "error"
    error: str | None = None
    index: int = 0  # position in the caller's input (generate())

    def to_dict(self) -> dict:
        d = {"request_id": self.request_id, "token_ids": self.token_ids, "logprobs": self.logprobs,
             "finish_reason": self.finish_reason}
        if self.error:
            d["error"] = self.error
        return d


class BatchInputError(ValueError):
    """Some requests of a batch were invalid; ``outputs`` holds every result, the valid ones complete."""

    def __init__(self, message: str, outputs: list[RequestOutput]):
        super().__init__(message)
        self.outputs = outputs


@dataclass
class _Row:
    rid: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    t_len: int = 0  # target cache valid length
    d_len: int = 0  # drafter cache valid length
    rng_used: int = 0  # uniforms consumed from this request's stream
    finish: str | None = None
    error: str | None = None  # why a step failed for this request (finish == "error")

    def remaining(self, max_seq_len: int) -> int:
        return min(self.params.max_tokens - len(self.out), max_seq_len - len(self.tokens))


PlanLike = Plan | int | None | Callable[[BatchView], Plan]


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
    ):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be an effroll Transformer, got {type(model).__name__}")
        if not isinstance(compile_drafter, bool):
            raise TypeError(f"compile_drafter must be a bool, got {compile_drafter!r}")
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
        self.active: list[_Row] = []
        self.waiting: deque[_Row] = deque()
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
        self._pending_prefill = (0.0, 0, 0)  # seconds, tokens, rows admitted since last record
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
            self._compile_drafter_now()

    @torch.no_grad()
    def _compile_drafter_now(self) -> None:
        """Run the drafter's decode graphs once (batch 1 and, if it can occur, one batch > 1) so that compiling
        happens here, timed as ``compile_s``, not inside the first speculative steps (where it would also
        mislead the controller's step-time estimates). Cheap once compiled: graphs outlive drafters.

        The forwards write K/V at position ``capacity - 2`` of the first slots, past every row's valid
        data (``t_len <= max_seq_len - 1 < capacity - 2`` for ``kmax >= 1``), where nothing is read
        before it is rewritten. Sizes are picked to differ from every other size the graph sees
        (``span = capacity - 1``; a batch size other than the head counts, head dim, layer and slot
        counts, which the cache tensor and its base carry): dynamo's duck sizing would otherwise tie
        them together, and the next batch size would recompile.
        """
        if self.kmax < 1:
            return
        t0 = time.perf_counter()
        d, cache = self.drafter.cfg, self.cache if self.share_kv else self.dcache
        p = self.capacity - 2
        taken = {d.num_kv_heads, d.num_heads, d.head_dim, d.hidden_size, d.num_layers, self.max_batch, p, p + 1, p + 2}
        batches = [1] + [next((b for b in range(2, self.max_batch + 1) if b not in taken), self.max_batch)]
        for b in sorted(set(batches)):
            tok = torch.zeros(b, 1, dtype=torch.long, device=self.drafter.device)
            self.drafter(tok, torch.full((b,), p, device=tok.device), cache, [p] * b)
        self.compile_s = time.perf_counter() - t0

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
            self.waiting.append(_Row(rid=rid, prompt=ids, params=params, seed=seed,
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
        new: list[_Row] = []
        while self.waiting and len(self.active) < self.max_batch:
            r = self.waiting.popleft()
            self.active.append(r)
            new.append(r)
        if not new:
            return
        t0 = time.perf_counter()
        row0 = len(self.active) - len(new)
        try:
            ntok = self._prefill(row0, new)
        except Exception as e:  # noqa: BLE001 - isolate the request that fails, the others go on
            ntok = 0
            for i, r in enumerate(new):
                try:
                    ntok += self._prefill(row0 + i, [r])
                except Exception as e1:  # noqa: BLE001
                    r.finish, r.error = "error", f"prefill failed: {_describe(e1)}"
            if not any(r.finish for r in new):  # a batch-shape failure only: every row prefilled alone
                warnings.warn(f"effroll: batched prefill failed ({_describe(e)}); rows were prefilled one at a time",
                              RuntimeWarning, stacklevel=2)
        except BaseException:
            del self.active[row0:]
            self.waiting.extendleft(reversed(new))
            raise
        for r in new:
            r.t_len = len(r.tokens) - 1
            r.d_len = 0
        s, n, a = self._pending_prefill
        self._pending_prefill = (s + time.perf_counter() - t0, n + ntok, a + len(new))
        if any(r.finish for r in new):
            self._retire()

    def _prefill(self, row0: int, rows: list[_Row]) -> int:
        """Target forward over every row's prompt but its last token, into slots row0..; returns tokens fed."""
        feeds = [r.tokens[:-1] for r in rows]
        ntok = sum(len(f) for f in feeds)
        if ntok:
            self._forward(self.model, self.cache, row0, feeds, [0] * len(rows))
        return ntok

    def _forward(self, model: Transformer, cache: KVCache, row0: int, feeds: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Right-padded batched forward; returns final hidden [B, T, D]."""
        T = max(len(f) for f in feeds)
        dev = model.device
        tok = torch.tensor([f + [0] * (T - len(f)) for f in feeds], dtype=torch.long, device=dev)
        start = torch.tensor(starts, dtype=torch.long, device=dev)
        return model(tok, start, cache, starts, row0=row0)

    # ------------------------------------------------------------------ one step
    def _resolve_plan(self, plan: PlanLike) -> Plan:
        if plan is None:
            return Plan(0)
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, int) and not isinstance(plan, bool):
            return Plan(plan)
        if callable(plan):
            p = plan(self.batch_view())
            if not isinstance(p, Plan):
                raise TypeError(f"planner returned {type(p).__name__}, expected Plan")
            return p
        raise TypeError(f"plan must be a Plan, an int K, None or a callable, got {plan!r}")

    @torch.no_grad()
    def step(self, plan: PlanLike = None) -> StepRecord:
        """Advance every active row by one (AR or speculative) step.

        A step that raises is retried one row at a time (a speculative row once more as AR), so a
        request that still fails finishes alone with ``finish_reason="error"`` and the tokens it had;
        the other rows and the engine go on. A row's state changes only once its step has succeeded.
        """
        with self.lock:
            self.admit()
            plan = self._resolve_plan(plan)
            rows = self.active
            B = len(rows)
            ps, pn, pa = self._pending_prefill
            self._pending_prefill = (0.0, 0, 0)
            rec = StepRecord(step=self.step_index, request_ids=[r.rid for r in rows], k=[], accepted=[], emitted=[],
                             context_lens=[len(r.tokens) for r in rows], seconds=0.0, prefill_s=ps, prefill_tokens=pn,
                             admitted=pa, waiting=len(self.waiting), policy_version=self.policy_version)
            self.step_index += 1
            if B == 0:
                return rec
            t0 = time.perf_counter()
            # Never draft with a drafter derived from another policy version (unversioned drafters pass):
            # the step runs AR and says so; whoever owns the drafter re-derives it (AdaptiveSpecRollout).
            dv = getattr(self.drafter, "policy_version", self.policy_version)
            can_draft = self.drafter is not None and dv == self.policy_version
            if self.drafter is not None and not can_draft:
                rec.events.append(f"stale_drafter: drafter from policy v{dv}, target at v{self.policy_version}; AR step")
            try:
                self._step_rows(plan if can_draft else AR, 0, B, rec)
            except Exception as e:  # noqa: BLE001 - find the row that fails; the others go on
                rec.k, rec.accepted, rec.emitted = [], [], []
                rec.events.append(f"step_error: {_describe(e)}; rows retried one at a time")
                for i, r in enumerate(rows):
                    for p in ((plan, AR) if can_draft else (AR,)):
                        try:
                            self._step_rows(p, i, i + 1, rec)
                            break
                        except Exception as e1:  # noqa: BLE001
                            err = e1
                    else:
                        r.finish, r.error = "error", f"step failed: {_describe(err)}"
                        rec.k.append(0)
                        rec.accepted.append(0)
                        rec.emitted.append(0)
            rec.finished = sum(1 for r in rows if r.finish)
            self._retire()
            rec.seconds = time.perf_counter() - t0
            return rec

    def _step_rows(self, plan: Plan, lo: int, hi: int, rec: StepRecord) -> None:
        """One step for the rows in slots lo..hi-1 (draft, verify, accept, emit); appends their entries to ``rec``.

        Everything that can fail runs before the first row is changed (the emit loop at the end only
        appends), so a failed call leaves every row as it was and can be retried.
        """
        rows = self.active[lo:hi]
        B = len(rows)
        ks = [max(0, min(plan.k_for(r.rid), self.kmax, r.remaining(self.max_seq_len) - 1)) for r in rows]
        K = max(ks)
        dev = self.model.device
        greedy = torch.tensor([r.params.greedy for r in rows])
        any_greedy = bool(greedy.any())
        temp = torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows])
        topk = torch.tensor([r.params.top_k for r in rows], dtype=torch.long)
        topp = torch.tensor([float(r.params.top_p) for r in rows])
        # Per-row uniforms from each request's own stream, laid out by the row's OWN k: [0:k) draft
        # sampling, [k:2k) acceptance, [2k] final, and the stream advances by 2k+1. So a row's draws
        # depend on its seed and its own draft lengths, never on the rest of the batch.
        kt = torch.tensor(ks, dtype=torch.long)
        u = uniforms(torch.tensor([r.seed for r in rows]), torch.tensor([r.rng_used for r in rows]), 2 * K + 1)
        u_acc = u.gather(1, (kt.view(-1, 1) + torch.arange(K).view(1, -1)).clamp(max=2 * K))
        u_fin = u.gather(1, (2 * kt).view(-1, 1)).view(-1)

        # ---- draft (with catch-up merged into the first drafter forward)
        draft = torch.zeros(B, K, dtype=torch.long)
        q = None
        d_lens = [r.d_len for r in rows]
        t_d = time.perf_counter()
        if K > 0:
            assert self.drafter is not None and (self.share_kv or self.dcache is not None)
            q = torch.zeros(B, K, self.vocab)
            if self.share_kv:  # the target cache holds the prefix: feed just the pending token
                dcache, feeds, starts = self.cache, [r.tokens[-1:] for r in rows], [r.t_len for r in rows]
            else:
                dcache, feeds, starts = self.dcache, [r.tokens[r.d_len :] for r in rows], [r.d_len for r in rows]
            catchup = sum(len(f) - 1 for f in feeds)
            h = self._forward(self.drafter, dcache, lo, feeds, starts)
            last = torch.tensor([len(f) - 1 for f in feeds], device=h.device)
            hl = h[torch.arange(B, device=h.device), last]
            d_lens = [len(r.tokens) for r in rows]
            for j in range(K):
                logits = self.drafter.logits(hl).cpu()
                probs = process_probs(logits, temp, topk, topp)
                x = sample_inverse_cdf(probs, u[:, j])
                if any_greedy:
                    x = torch.where(greedy, logits.argmax(-1), x)
                q[:, j] = probs
                draft[:, j] = x
                if j + 1 < K:
                    start = [len(r.tokens) + j for r in rows]
                    h = self.drafter(x.view(B, 1).to(dev), torch.tensor(start, device=dev), dcache, start, row0=lo)
                    hl = h[:, 0]
            rec.catchup_tokens += catchup
        rec.draft_s += time.perf_counter() - t_d

        # ---- verify: one target forward over [pending, x_1..x_k]
        t_v = time.perf_counter()
        feeds = [[r.tokens[-1]] + draft[i, : ks[i]].tolist() for i, r in enumerate(rows)]
        h = self._forward(self.model, self.cache, lo, feeds, [r.t_len for r in rows])
        logits = self.model.logits(h).cpu()  # [B, K+1, V]
        rec.verify_s += time.perf_counter() - t_v

        # ---- accept / sample
        t_s = time.perf_counter()
        K1 = K + 1
        lp = process_logits(logits.view(B * K1, -1), temp.repeat_interleave(K1), topk.repeat_interleave(K1),
                            topp.repeat_interleave(K1)).view(B, K1, -1)
        j = torch.zeros(B, dtype=torch.long)
        final = torch.zeros(B, dtype=torch.long)
        if bool((~greedy).any()):
            idx = (~greedy).nonzero().flatten()
            p = lp[idx].exp()
            qq = q[idx] if q is not None else torch.zeros(len(idx), 0, self.vocab)
            jj, ff = speculative_accept(p, qq, draft[idx], kt[idx], u_acc[idx], u_fin[idx])
            j[idx], final[idx] = jj, ff
        if any_greedy:
            idx = greedy.nonzero().flatten()
            jj, ff = greedy_accept(logits[idx].argmax(-1), draft[idx], kt[idx])
            j[idx], final[idx] = jj, ff
        # Returned logprobs: the processed target distribution (greedy rows: plain log-softmax, T=1).
        if any_greedy:
            lp = torch.where(greedy.view(B, 1, 1), torch.log_softmax(logits, dim=-1), lp)
        emitted = torch.cat([draft, torch.zeros(B, 1, dtype=torch.long)], dim=1)
        emitted[torch.arange(B), j] = final
        lps_all = lp.gather(2, emitted.unsqueeze(-1)).squeeze(-1).tolist()
        em_all = emitted.tolist()
        jl = j.tolist()

        # ---- emit: the only part that changes rows
        for i, r in enumerate(rows):
            n_before = len(r.tokens)
            cnt = 0
            for tok, lpv in zip(em_all[i][: jl[i] + 1], lps_all[i]):
                r.tokens.append(tok)
                r.out.append(tok)
                r.logprobs.append(lpv)
                cnt += 1
                if tok in r.stop_ids:
                    r.finish = "stop"
                elif r.remaining(self.max_seq_len) <= 0:
                    r.finish = "length"
                if r.finish:
                    break
            r.rng_used += 2 * ks[i] + 1
            r.t_len = n_before + jl[i]
            if K > 0:
                r.d_len = min(d_lens[i] + min(jl[i], K - 1), len(r.tokens))
            rec.k.append(ks[i])
            rec.accepted.append(jl[i])
            rec.emitted.append(cnt)
        rec.sample_s += time.perf_counter() - t_s

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


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception, for error fields and events."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
