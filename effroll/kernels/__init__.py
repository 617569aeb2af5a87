"""effroll's CPU kernels (AVX2 + FMA): a build-on-first-use loader, INT4 packing, checked op wrappers.

* ``torch.ops.effroll.int4_mm`` (``int4_gemm.cpp``; the INT4 drafter's linears). Layout (see the C++ header
  comment): ``packed`` uint8 ``[T, Kp, 8]`` with ``T = ceil(N / 16)`` tiles of 16 output rows,
  ``scales_zeros`` bf16 ``[T, G, 2, 16]``.
* ``torch.ops.effroll.bf16_linear`` (``bf16_gemm.cpp``; the bf16 target's linears where oneDNN's bf16 linear
  does not run): ``x [M, K] @ w[N, K].T (+ bias)`` on the weight as it is, no packed copy.
* ``torch.ops.effroll.cache_attention``, ``rms_norm``, ``rope_cache_write``, ``silu_mul`` (``decode_ops.cpp``; the
  glue of bf16 models on the same CPUs): attention of each query over its row's cached keys 0..pos (GQA, fp32
  softmax), RMSNorm in one pass, RoPE with the cache writes, SiLU(gate) * up.

Each source is its own :class:`Library` (``INT4``, ``BF16``, ``DECODE``), compiled once per source/headers/flags/torch
version into ``<EFFROLL_CACHE or ~/.cache/effroll>/kernels/<stem>-<hash>/``; one that fails to build leaves
the other usable. :func:`choice` reads the env switches (``EFFROLL_INT4_KERNEL``, ``EFFROLL_BF16_KERNEL``,
``EFFROLL_GLUE_KERNEL``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

from ..fileio import cache_dir

TILE = 16
_DIR = Path(__file__).parent
_HEADERS = [_DIR / "simd.h"]  # included by every source: part of every library's key
_CFLAGS = ["-O3", "-DNDEBUG"]  # no -fopenmp: parallel_for is torch's (stable ABI), on torch's own thread pool
_LDFLAGS: list[str] = []


class Library:
    """One C++ source built on first use into one library of ``torch.ops.effroll`` ops, cached by content.

    The build goes to ``<cache_dir()>/kernels/<stem>-<hash of source, headers, flags, torch build>/`` and later
    processes load the cached library without invoking the compiler. Each library exports
    ``effroll_<probe>_cpu_supported()`` (checked through ctypes after loading) and its ops get fake
    implementations, so ``torch.compile`` keeps them as opaque nodes. A build or load failure makes
    :meth:`available` False with the first error line as :meth:`unavailable_reason`; callers fall back to torch.
    """

    def __init__(self, stem: str, probe: str, fakes: dict):
        self.src = _DIR / f"{stem}.cpp"
        self.stem, self.name, self.probe, self.fakes = stem, f"effroll_{stem}", probe, fakes
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}  # "ok": bool, "error": str, "build_s": float

    def build_dir(self) -> Path:
        """Where the compiled library lives: keyed by the sources, the flags and the torch build."""
        key = hashlib.sha256()
        for part in (self.src.read_bytes(), *(h.read_bytes() for h in _HEADERS), repr((_CFLAGS, _LDFLAGS)).encode(),
                     torch.__version__.encode(), str(torch.version.git_version).encode(), platform.machine().encode()):
            key.update(part)
        return cache_dir() / "kernels" / f"{self.stem}-{key.hexdigest()[:16]}"

    def _load(self) -> None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError(f"not an x86-64 CPU ({platform.machine()})")
        d = self.build_dir()
        lib = d / f"{self.name}.so"
        if lib.exists():
            torch.ops.load_library(str(lib))
        else:
            self._build(d, lib)
        for op, fake in self.fakes.items():
            torch.library.register_fake(f"effroll::{op}")(fake)
        if not getattr(ctypes.CDLL(str(lib)), f"effroll_{self.probe}_cpu_supported")():
            raise RuntimeError("this CPU lacks AVX2/FMA")

    def _build(self, d: Path, lib: Path) -> None:
        """Compile (and load) in a private directory, then move the library into ``d`` in one rename: a process
        that finds ``lib`` finds it complete, and a build that dies leaves no lock behind for others to wait on."""
        import shutil
        import tempfile
        import time

        from torch.utils import cpp_extension

        d.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=d))
        try:
            t0 = time.perf_counter()
            cpp_extension.load(self.name, [str(self.src)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                               build_directory=str(tmp), is_python_module=False, verbose=False)
            self._state["build_s"] = time.perf_counter() - t0
            os.replace(tmp / lib.name, lib)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def available(self) -> bool:
        """Whether this library's ops are built, loaded and usable on this CPU (builds on first call)."""
        with self._lock:
            if "ok" not in self._state:
                try:
                    self._load()
                    self._state["ok"] = True
                except Exception as e:  # noqa: BLE001 - any build/load failure means: use torch's kernel
                    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
                    err = next((ln for ln in lines if "error:" in ln),  # the compiler's first error, else
                               next((ln for ln in lines if "error" in ln.lower()), lines[0]))
                    self._state["ok"], self._state["error"] = False, f"{type(e).__name__}: {err.strip()[:300]}"
            return bool(self._state["ok"])

    def unavailable_reason(self) -> str | None:
        """Why :meth:`available` is False (first error line of the build or load), else None."""
        self.available()
        return self._state.get("error")  # type: ignore[return-value]

    def build_seconds(self) -> float | None:
        """Wall time of this process's build (None when the cached library was loaded)."""
        return self._state.get("build_s")  # type: ignore[return-value]


def _int4_mm_fake(x, packed, scales_zeros, group_size, n):
    return x.new_empty((x.shape[0], n))


def _bf16_linear_fake(x, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _cache_attention_fake(q, kc, vc, pos, row0, scale):
    return q.new_empty(q.shape)


def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


def _rope_cache_write_fake(qkv, cos, sin, kc, vc, pos, row0, h):
    return qkv.new_empty((*qkv.shape[:2], h, qkv.shape[3]))


def _silu_mul_fake(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


INT4 = Library("int4_gemm", "int4", {"int4_mm": _int4_mm_fake})
BF16 = Library("bf16_gemm", "bf16", {"bf16_linear": _bf16_linear_fake})
DECODE = Library("decode_ops", "decode", {"cache_attention": _cache_attention_fake, "rms_norm": _rms_norm_fake,
                                          "rope_cache_write": _rope_cache_write_fake, "silu_mul": _silu_mul_fake})


# The INT4 library's state under the names its callers have used since it was the only one.
def build_dir() -> Path:
    return INT4.build_dir()


def available() -> bool:
    """Whether ``torch.ops.effroll.int4_mm`` is built, loaded and usable on this CPU (builds on first call)."""
    return INT4.available()


def unavailable_reason() -> str | None:
    return INT4.unavailable_reason()


def build_seconds() -> float | None:
    return INT4.build_seconds()


def choice(env: str) -> str:
    """The kernel an env switch asks for: ``auto`` (unset or empty), ``effroll`` or ``torch`` (A/B runs); any
    other value is a ValueError naming it. What ``auto`` picks is each caller's rule."""
    c = os.environ.get(env, "auto").strip().lower() or "auto"
    if c not in ("auto", "effroll", "torch"):
        raise ValueError(f"{env}={c!r}: expected 'auto', 'effroll' or 'torch'")
    return c


# --------------------------------------------------------------------------- packing (vectorised, no row loops)


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` uint8 ``[N, Kp]`` (0..15), ``scales``/``zeros`` ``[N, G]`` -> (``packed [T, Kp, 8]``,
    ``scales_zeros [T, G, 2, 16]`` bf16). Rows are padded to a multiple of 16 with code 0, scale 0, zero 0."""
    n, kp = codes.shape
    pad = -n % TILE
    c = torch.nn.functional.pad(codes, (0, 0, 0, pad)).view(-1, TILE, kp).transpose(1, 2)  # [T, Kp, 16]
    packed = (c[..., :8] | (c[..., 8:] << 4)).contiguous()
    sz = torch.stack([scales.to(torch.bfloat16), zeros.to(torch.bfloat16)], 1)  # [N, 2, G]
    sz = torch.nn.functional.pad(sz, (0, 0, 0, 0, 0, pad)).view(-1, TILE, 2, sz.shape[-1]).permute(0, 3, 2, 1)
    return packed, sz.contiguous()


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight` for the codes: uint8 ``[n, Kp]``."""
    t, kp, _ = packed.shape
    return torch.cat([packed & 15, packed >> 4], -1).transpose(1, 2).reshape(t * TILE, kp)[:n]


def unpack_scales_zeros(scales_zeros: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_weight` for the group parameters: (scales, zeros) bf16 ``[n, G]``."""
    t, g = scales_zeros.shape[:2]
    sz = scales_zeros.permute(0, 3, 2, 1).reshape(t * TILE, 2, g)[:n]
    return sz[:, 0].contiguous(), sz[:, 1].contiguous()


# --------------------------------------------------------------------------- the op


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """``x [M, K]`` bf16 @ the packed INT4 weight's ``[n, K]`` transpose -> bf16 ``[M, n]`` (checked arguments)."""
    for name, t in (("x", x), ("packed", packed), ("scales_zeros", scales_zeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"int4_mm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"int4_mm: {name} must be on the CPU, got {t.device}")
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        raise TypeError(f"int4_mm: x must be a 2-D bfloat16 tensor, got {x.dim()}-D {x.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[2] != 8:
        raise ValueError(f"int4_mm: packed must be uint8 [T, Kp, 8], got {packed.dtype} {tuple(packed.shape)}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8 or packed.shape[1] % group_size:
        raise ValueError(f"int4_mm: group_size={group_size!r} must be a positive multiple of 8 dividing "
                         f"Kp={packed.shape[1]}")
    t, kp = packed.shape[:2]
    want = (t, kp // group_size, 2, TILE)
    if scales_zeros.dtype != torch.bfloat16 or tuple(scales_zeros.shape) != want:
        raise ValueError(f"int4_mm: scales_zeros must be bfloat16 {list(want)}, got {scales_zeros.dtype} "
                         f"{list(scales_zeros.shape)}")
    if -(-x.shape[1] // group_size) * group_size != kp:
        raise ValueError(f"int4_mm: x has {x.shape[1]} columns but the weight has {kp} (padded to groups of {group_size})")
    if not isinstance(n, int) or not (t - 1) * TILE < n <= t * TILE:
        raise ValueError(f"int4_mm: n={n!r} does not fit {t} tiles of {TILE} rows")
    if not available():
        raise RuntimeError(f"int4_mm: the effroll kernel is unavailable ({unavailable_reason()})")
    return torch.ops.effroll.int4_mm(x, packed.contiguous(), scales_zeros.contiguous(), group_size, n)


BF16_KERNEL_ENV = "EFFROLL_BF16_KERNEL"  # "torch": bf16 linears never run effroll's kernel (A/B runs); see Linear
GLUE_KERNEL_ENV = "EFFROLL_GLUE_KERNEL"  # "torch": the bf16 glue (norm, RoPE, attention, SiLU) is torch's; engine.glue


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` bf16 @ ``w [N, K]`` bf16 transposed (+ ``bias [N]`` bf16) -> bf16 ``[..., N]``, fp32
    accumulation and one rounding (checked arguments; ``x`` may have any strides)."""
    for name, t in (("x", x), ("w", w), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bf16_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"bf16_linear: {name} must be on the CPU, got {t.device}")
        if t.dtype != torch.bfloat16:
            raise TypeError(f"bf16_linear: {name} must be bfloat16, got {t.dtype}")
    if x.dim() < 2 or w.dim() != 2:
        raise ValueError(f"bf16_linear: x must have at least 2 dims and w 2, got x {tuple(x.shape)} and w "
                         f"{tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"bf16_linear: x has {x.shape[-1]} columns but w has {w.shape[1]}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bf16_linear: bias has shape {tuple(bias.shape)}, expected ({w.shape[0]},) (w's rows)")
    if not BF16.available():
        raise RuntimeError(f"bf16_linear: the effroll kernel is unavailable ({BF16.unavailable_reason()})")
    return torch.ops.effroll.bf16_linear(x, w if w.stride(1) == 1 else w.contiguous(), bias)
