"""GPTQ-style error compensation (Frantar et al. 2022) for the INT4 drafter.

For a linear ``y = W x`` with inputs ``x_t`` the layer-output error of a quantized ``Ŵ`` is
``sum_t ||(W - Ŵ) x_t||^2 = tr((W - Ŵ) H (W - Ŵ)^T)`` with ``H = sum_t x_t x_t^T``. GPTQ quantizes the
columns one at a time (group-wise, :mod:`effroll.drafter.int4`'s grid) and after quantizing column
``k`` spreads its error over the not-yet-quantized columns via the upper Cholesky factor ``U`` of
``H^{-1}`` (damped by ``damp * mean(diag H)``):

    e = (w_k - ŵ_k) / U_kk,    W[:, j] -= e * U_kj   for j > k.

Updates are applied lazily in blocks of columns; a group's scale/zero is computed from the
*updated* weights when its first column is reached (with ``act_order`` the columns go by decreasing
``H_kk`` and the groups are computed up front from the original weights, so the group layout stays
the kernel's contiguous one). ``refine_iters`` least-squares refits of each group's grid
(:func:`effroll.drafter.int4.refine_params`) apply to those group parameters.

``HessianCollector`` accumulates ``H`` from whatever forwards the target runs (forward hooks), so
the engine's verification passes on the policy's own rollouts can feed the next refresh. It is not
free: ``X^T X`` costs about as many FLOPs as the layer itself (a bf16 GEMM per flush for bf16
models), so sample a fraction of the forwards (``sample_every``); a few thousand tokens per refresh
suffice (SmolLM2: 4.4k tokens of chat rollouts vs 2k self-sampled ones, 0.818 vs 0.802 acceptance).
qkv (and gate_up) are fused, so their q/k/v (gate/up) parts share one Hessian. The pseudo-kind ``"lm_head"`` collects the LM head's
input (the final norm's output, hooked there so that forwards which stop before the head count too)
under the name ``"lm_head"``: a recipe with ``lm_head = "int4"`` and ``method = "gptq"`` uses it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..checkpoints import LINEAR_PATHS, linear_name
from .int4 import QuantizedWeight, group_params, pad_columns
from .recipe import LINEAR_KINDS, Recipe

HEAD = "lm_head"  # Hessian name (and collector pseudo-kind) of the LM head's input


class HessianCollector:
    """Forward hooks that accumulate ``sum_t x_t x_t^T`` (float32) and a token count per linear input.

    Inputs are buffered (in their own dtype) and folded into the sums ``flush_rows`` rows at a time:
    one GEMM per flush (bf16 for bf16 inputs, summed in float32) instead of a K x K read-modify-write
    per (small) verification pass.
    ``sample_every = n`` keeps only every n-th forward of each linear (Hessians need far fewer tokens
    than rollouts produce). ``hessians()`` returns the means ``H / n``. Use as a context manager
    (hooks removed on exit) or call ``remove()``; ``enabled = False`` pauses collection. Padded rows
    of a batched forward are counted like real tokens.
    """

    def __init__(self, model: torch.nn.Module, kinds: Iterable[str] = LINEAR_KINDS, *,
                 sample_every: int = 1, flush_rows: int = 256):
        if sample_every < 1 or flush_rows < 1:
            raise ValueError(f"sample_every and flush_rows must be >= 1, got {sample_every}, {flush_rows}")
        self.sample_every, self.flush_rows = sample_every, flush_rows
        self.sums: dict[str, torch.Tensor] = {}  # float32
        self.counts: dict[str, int] = {}
        self.enabled = True
        self._buf: dict[str, list[torch.Tensor]] = {}
        self._calls: dict[str, int] = {}
        self._handles = []
        kinds = list(kinds)
        for kind in kinds:
            if kind != HEAD and kind not in LINEAR_PATHS:
                raise ValueError(f"HessianCollector: unknown kind {kind!r} (use {', '.join((*LINEAR_PATHS, HEAD))})")
        for i, layer in enumerate(model.layers):
            for kind in kinds:
                if kind != HEAD:
                    mod = layer.get_submodule(LINEAR_PATHS[kind])
                    self._handles.append(mod.register_forward_hook(self._hook(linear_name(i, kind))))
        if HEAD in kinds:  # the head's input is the final norm's output
            self._handles.append(model.norm.register_forward_hook(self._hook(HEAD, use_output=True)))

    def _hook(self, name: str, use_output: bool = False):
        def hook(mod, args, out):
            if not self.enabled:
                return
            n = self._calls.get(name, 0)
            self._calls[name] = n + 1
            if n % self.sample_every:
                return
            x = (out if use_output else args[0]).detach()
            x = x.reshape(-1, x.shape[-1])
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]  # includes still-buffered rows
            buf = self._buf.setdefault(name, [])
            buf.append(x)
            if sum(b.shape[0] for b in buf) >= self.flush_rows:
                self._flush(name)

        return hook

    def _flush(self, name: str) -> None:
        buf = self._buf.pop(name, None)
        if not buf:
            return
        x = torch.cat(buf)
        # bf16 inputs: one bf16 GEMM per flush (its fp32 accumulation rounded to bf16 once per flush, then
        # summed in fp32): 5-6x cheaper than an fp32 GEMM on CPU; measured drafter acceptance 0.8172 vs
        # 0.8183 (gptq-asym-g64, SmolLM2). Other dtypes accumulate in fp32.
        xtx = (x.T @ x).float() if x.dtype == torch.bfloat16 else x.float().T @ x.float()
        # out of place: the sums may be inference tensors (forwards under torch.inference_mode)
        self.sums[name] = self.sums[name] + xtx if name in self.sums else xtx

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def _flush_all(self) -> None:
        for name in list(self._buf):
            self._flush(name)

    def hessians(self) -> dict[str, torch.Tensor]:
        self._flush_all()
        return {k: v / max(self.counts[k], 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self._buf.clear()
        self._calls.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def collect_hessians(model, sequences: Sequence[Sequence[int]], kinds: Iterable[str] = LINEAR_KINDS) -> dict[str, torch.Tensor]:
    """Run each token sequence through ``model`` (one fresh KV-cache forward each) and return mean Hessians."""
    from effroll.engine.kv_cache import KVCache

    with HessianCollector(model, kinds) as hc:
        for seq in sequences:
            ids = torch.as_tensor(list(seq), dtype=torch.long, device=model.device).view(1, -1)
            if ids.shape[1] == 0:
                continue
            cache = KVCache(model.cfg, 1, ids.shape[1], model.dtype, model.device)
            model(ids, torch.zeros(1, dtype=torch.long, device=model.device), cache, [0])
        return hc.hessians()


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^{-1}`` for a batch ``[L, K, K]``; more damping on failure."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-8)[:, None, None]
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if not bool(info.any()):
            break
        damp *= 10
    else:
        raise ValueError("GPTQ: Hessian is not positive definite even with heavy damping (NaN/Inf inputs?)")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


@torch.no_grad()
def gptq_quantize_batch(
    weights: torch.Tensor, hessians: torch.Tensor, group_size: int, symmetric: bool,
    damp: float = 0.01, block_size: int = 64, act_order: bool = False, refine_iters: int = 0,
) -> list[QuantizedWeight]:
    """GPTQ on a stack of same-shaped linears ``weights [L, N, K]`` with ``hessians [L, K, K]`` (one pass, batched)."""
    L, N, K = weights.shape
    dev = weights.device
    g = group_size
    W = pad_columns(weights.float(), g).clone()
    Kp = W.shape[-1]
    G = Kp // g
    H = torch.zeros(L, Kp, Kp, dtype=torch.float32, device=dev)
    H[:, :K, :K] = hessians.to(dev, torch.float32)
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag <= 0, 1.0)  # padding / never-active inputs: decoupled, quantized plain RTN
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)
        S, Z = group_params(W.view(L, N, G, g), symmetric, refine_iters)  # static groups, original weights
        W = W.gather(2, perm[:, None, :].expand(L, N, Kp))
        H = H.gather(1, perm[:, :, None].expand(L, Kp, Kp)).gather(2, perm[:, None, :].expand(L, Kp, Kp))
        gidx = (perm // g)[:, None, :].expand(L, N, Kp)  # group of each (permuted) column
        Sp, Zp = S.float().gather(2, gidx), Z.float().gather(2, gidx)
    else:
        perm = None
        S = torch.empty(L, N, G, dtype=torch.bfloat16, device=dev)
        Z = torch.empty_like(S)
    U = _inverse_cholesky_upper(H, damp)
    del H
    # Work on transposed copies [L, Kp, N] so that a column (all N rows of one input) is contiguous.
    WT = W.transpose(1, 2).contiguous()
    del W
    if perm is not None:
        Sp, Zp = Sp.transpose(1, 2).contiguous(), Zp.transpose(1, 2).contiguous()
    QT = torch.empty(L, Kp, N, dtype=torch.uint8, device=dev)
    for i1 in range(0, Kp, block_size):
        i2 = min(i1 + block_size, Kp)
        W1 = WT[:, i1:i2].clone()  # [L, B, N]
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if perm is None:
                if c % g == 0:  # group start: its columns as they stand now (pending block updates applied)
                    cols = W1[:, i : i + g]
                    if c + g > i2:
                        rest = WT[:, i2 : c + g] - U[:, i1:c, i2 : c + g].transpose(1, 2) @ E1[:, :i]
                        cols = torch.cat([cols, rest], dim=1)
                    s, z = group_params(cols.transpose(1, 2), symmetric, refine_iters)  # [L, N]
                    S[:, :, c // g], Z[:, :, c // g] = s, z
                    sf, zf = s.float(), z.float()
            else:
                sf, zf = Sp[:, c], Zp[:, c]
            w = W1[:, i]
            q = torch.round((w - zf) / sf).clamp_(-8, 7)  # = quantize_codes(w, s, z) - 8
            QT[:, c] = q + 8
            err = (w - (q * sf + zf)) / U1[:, i, i, None]
            W1[:, i:].addcmul_(U1[:, i, i:, None], err[:, None, :], value=-1.0)
            E1[:, i] = err
        if i2 < Kp:
            WT[:, i2:] -= U[:, i1:i2, i2:].transpose(1, 2) @ E1
    Q = QT.transpose(1, 2)
    if perm is not None:
        Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(L, N, Kp))
    Q = Q.contiguous()
    return [QuantizedWeight(Q[l], S[l], Z[l], g, K) for l in range(L)]


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, recipe: Recipe) -> QuantizedWeight:
    """GPTQ-quantize one ``weight [N, K]`` with input Hessian ``H [K, K]`` following ``recipe``."""
    if H.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected {(weight.shape[1], weight.shape[1])}")
    o = recipe.gptq
    return gptq_quantize_batch(weight[None], H[None], recipe.group_size, recipe.symmetric,
                               o.damp, o.block_size, o.act_order, recipe.refine_iters)[0]
