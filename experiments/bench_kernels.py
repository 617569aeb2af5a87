"""Per-linear microseconds vs rows M: bf16 vs torch's INT4 vs effroll's INT4 kernel, against the machine's limits.

Weights come from DRAM as in a real layer stack: each variant cycles through enough copies of the
weight (more than twice the L3 size in total) that none is still cached when it is used again; x stays
the same (activations are small). Variants are interleaved within each repeat; a repeat's value is the
median per-call time of its calls, and the table shows the median [min-max] over repeats, and, measured
in the same run:

* DRAM read bandwidth: the faster of ``torch.sum`` over a 1 GiB bf16 and a 1 GiB fp32 tensor;
* bandwidth limit of a variant: its weight bytes (scales and zeros included) / that bandwidth;
* compute limit: ``2 M N K`` / the peak fp32 FMA rate, measured as an in-cache fp32 ``torch.mm`` of
  two 1024 x 1024 matrices (the effroll kernel on an in-cache weight at M=64 is reported beside it);
* per M: us, us / bandwidth limit, us / max(bandwidth limit, compute limit).

"effroll op" calls ``torch.ops.effroll.int4_mm`` on the same weights as "effroll int4" (the module):
the difference is Int4Linear's eager Python overhead, which torch.compile'd decode steps do not pay.
bf16: "bf16 F.linear", "bf16 Linear (<path>)" (what the engine's Linear runs here, see
``model.bf16_linear_path``), "effroll bf16 op" (``torch.ops.effroll.bf16_linear`` on the plain weights),
and "weight read (sum)": ``torch.sum`` over the same bytes, the read bandwidth this run actually got.

``--target MODEL_DIR`` times the target's decode step with ``EFFROLL_BF16_KERNEL=torch`` vs ``auto``,
alternating every step in one process.

``--drafter MODEL_DIR`` adds one decode step (B tokens on a 128-token KV cache, plus the LM head) of
the target and of its INT4 drafters (shared bf16 LM head / INT4 LM head) with torch's kernel and with
effroll's, all interleaved.

    python experiments/bench_kernels.py --json experiments/results/bench_kernels.json \\
        --drafter ~/.cache/effroll/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effroll.drafter import int4 as I  # noqa: E402
from effroll import kernels  # noqa: E402
from effroll.drafter.int4 import Int4Linear, quantize_rtn  # noqa: E402
from effroll.engine import linear as linear_mod  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
MS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
L3_BYTES = 32 << 20


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict[str, float], scale: float = 1e6) -> str:
    return f"{s['median'] * scale:.0f} [{s['min'] * scale:.0f}-{s['max'] * scale:.0f}]"


def cpu_summary() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"model": info.get("Model name", platform.processor()).strip(), "cpus": info.get("CPU(s)", "?").strip(),
            "isa": " ".join(isa) or "?", "torch_capability": torch.backends.cpu.get_cpu_capability()}


def dram_bandwidth(repeats: int = 5) -> dict[str, float]:
    """Bytes/s of reading 1 GiB (median of repeats) for bf16 and fp32 ``torch.sum``; the faster is the limit."""
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        a = torch.ones((1 << 30) // torch.tensor([], dtype=dt).element_size(), dtype=dt)
        a.sum()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.sum()
            ts.append(time.perf_counter() - t0)
        out[str(dt).split(".")[-1]] = (1 << 30) / statistics.median(ts)
        del a
    out["limit"] = max(out.values())
    return out


def peak_flops(repeats: int = 7) -> float:
    """Median fp32 FLOP/s of an in-cache 1024^3 ``torch.mm`` (MKL/oneDNN sgemm: close to the FMA peak)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * 1024**3 / statistics.median(ts)


class Variant:
    """A linear of one kind with ``copies`` weights, called round-robin (each call reads a cold weight)."""

    def __init__(self, name: str, fns: list, weight_bytes: int):
        self.name, self.fns, self.weight_bytes, self.next = name, fns, weight_bytes, 0

    def time_calls(self, x: torch.Tensor, calls: int) -> float:
        """Median seconds per call over ``calls`` consecutive calls: robust to the multi-ms stalls a shared
        machine inflicts on some parallel regions (when another process holds the cores)."""
        fns, i, ts = self.fns, self.next, []
        for _ in range(calls):
            t0 = time.perf_counter()
            fns[i](x)
            ts.append(time.perf_counter() - t0)
            i = (i + 1) % len(fns)
        self.next = i
        return statistics.median(ts)


def build_variants(n: int, k: int, g: int, copies: int, only: list[str] | None) -> list[Variant]:
    gen = torch.Generator().manual_seed(n + k)
    ws = [torch.randn(n, k, generator=gen).mul_(0.05).bfloat16() for _ in range(copies)]
    int4_names = ("torch int4", "effroll int4", "effroll op")
    qws = [quantize_rtn(w, g, True) for w in ws] if only is None or set(only) & set(int4_names) else []
    out = []

    def add(name, fns, nbytes):
        if only is None or name in only:
            out.append(Variant(name, fns, nbytes))

    lins = []
    for w in ws:
        lin = linear_mod.Linear(k, n, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        lins.append(lin)
    add("bf16 F.linear", [lambda x, w=w: F.linear(x, w) for w in ws], n * k * 2)
    add(f"bf16 Linear ({linear_mod.bf16_linear_path()})", lins, n * k * 2)  # what the engine runs
    if kernels.BF16.available():  # the op without Linear's Python
        bf16_op = torch.ops.effroll.bf16_linear.default
        add("effroll bf16 op", [lambda x, w=w: bf16_op(x, w, None) for w in ws], n * k * 2)
    # The same bytes streamed by torch.sum (fp32 view): the bandwidth this machine gives a reader in this run.
    add("weight read (sum)", [lambda x, w=w.view(torch.float32): w.sum() for w in ws], n * k * 2)
    saved = os.environ.get(I.KERNEL_ENV)
    try:
        os.environ[I.KERNEL_ENV] = "torch"
        torch_lins = [Int4Linear(q) for q in qws] if n % 16 == 0 and qws else []
    finally:
        os.environ.pop(I.KERNEL_ENV) if saved is None else os.environ.__setitem__(I.KERNEL_ENV, saved)
    if torch_lins:
        tl = torch_lins[0]
        add("torch int4", torch_lins, tl.packed.numel() * tl.packed.element_size() + tl.scales_and_zeros.numel() * 2)
    if kernels.available() and qws:
        ours = [Int4Linear(q) for q in qws]
        o = ours[0]
        add("effroll int4", ours, o.packed.numel() + o.scales_and_zeros.numel() * 2)
        op = torch.ops.effroll.int4_mm.default  # the same weights without Int4Linear's Python (eager) overhead
        add("effroll op", [lambda x, m=m: op(x, m.packed, m.scales_and_zeros, g, n) for m in ours],
            o.packed.numel() + o.scales_and_zeros.numel() * 2)
    return out


def bench_shape(kind: str, g: int, ms, repeats: int, bw: float, flops: float, only, target_s: float) -> dict:
    n, k = SHAPES[kind]
    smallest = n * k // 2  # an INT4 copy
    copies = max(4, math.ceil(2 * L3_BYTES / smallest))  # INT4 copies alone fill the L3 twice
    variants = build_variants(n, k, g, copies, only)
    xs = {m: torch.randn(m, k).bfloat16() for m in ms}
    calls = {}
    for v in variants:  # warm-up round: one call per copy, and a call count per (variant, M) from a first timing
        for m in ms:
            est = v.time_calls(xs[m], min(3, copies))
            calls[(v.name, m)] = max(3, min(copies, math.ceil(target_s / max(est, 1e-7))))
    times = {(v.name, m): [] for v in variants for m in ms}
    for _ in range(repeats):
        for m in ms:
            for v in variants:
                times[(v.name, m)].append(v.time_calls(xs[m], calls[(v.name, m)]))
    res = {"n": n, "k": k, "group_size": g, "copies": copies, "variants": {}}
    for v in variants:
        bw_limit = v.weight_bytes / bw
        rows = {}
        for m in ms:
            s = stats(times[(v.name, m)])
            comp = 2 * m * n * k / flops
            rows[m] = {**s, "calls_per_repeat": calls[(v.name, m)], "bw_limit_s": bw_limit, "compute_limit_s": comp,
                       "x_bw_limit": s["median"] / bw_limit, "x_binding_limit": s["median"] / max(bw_limit, comp)}
        res["variants"][v.name] = {"weight_bytes": v.weight_bytes, "rows": rows}
    return res


def print_shape(kind: str, r: dict) -> None:
    names = list(r["variants"])
    first = r["variants"][names[0]]["rows"]
    print(f"\n{kind} {r['n']}x{r['k']} g{r['group_size']}, {r['copies']} copies cycled; us median [min-max] "
          f"(x its bandwidth limit / x max(bandwidth, compute) limit)")
    for nm in names:
        v = r["variants"][nm]
        bw_us = next(iter(v["rows"].values()))["bw_limit_s"] * 1e6
        print(f"  {nm}: {v['weight_bytes'] / 1e6:.2f} MB -> bandwidth limit {bw_us:.0f} us")
    cells = {m: [f"{fmt(r['variants'][nm]['rows'][m])} ({r['variants'][nm]['rows'][m]['x_bw_limit']:.1f}/"
                 f"{r['variants'][nm]['rows'][m]['x_binding_limit']:.1f})" for nm in names] for m in first}
    widths = [max(len(nm), *(len(c[i]) for c in cells.values())) for i, nm in enumerate(names)]
    print("    M | " + " | ".join(nm.rjust(w) for nm, w in zip(names, widths)) + " | compute limit")
    for m, row in cells.items():
        print(f"  {m:>3} | " + " | ".join(c.rjust(w) for c, w in zip(row, widths))
              + f" | {first[m]['compute_limit_s'] * 1e6:.0f} us")


def in_cache_kernel_flops(repeats: int = 7) -> float | None:
    """FLOP/s of effroll's kernel at M=64 on one in-cache 3072x576 weight (an achieved-peak reference)."""
    if not kernels.available():
        return None
    lin = Int4Linear(quantize_rtn(torch.randn(3072, 576) * 0.05, 64, True))
    x = torch.randn(64, 576).bfloat16()
    lin(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lin(x)
        ts.append(time.perf_counter() - t0)
    return 2 * 64 * 3072 * 576 / statistics.median(ts)


def in_cache_bf16_flops(repeats: int = 7) -> float | None:
    """FLOP/s of effroll's bf16 op at M=64 on one in-cache (L3) 3072x576 weight."""
    if not kernels.BF16.available():
        return None
    w, x = (torch.randn(3072, 576) * 0.05).bfloat16(), torch.randn(64, 576).bfloat16()
    op = torch.ops.effroll.bf16_linear.default
    op(x, w, None)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op(x, w, None)
        ts.append(time.perf_counter() - t0)
    return 2 * 64 * 3072 * 576 / statistics.median(ts)


def drafter_steps(model_dir: str, batches, repeats: int, steps: int, compiled: bool, context: int = 128) -> dict:
    """One decode step (B tokens + LM head) of the target, the torch-INT4 drafter and the effroll-INT4 drafter,
    for two recipes (shared bf16 LM head / INT4 LM head); models alternate every step. ``compiled``: the
    drafters decode through torch.compile'd layer chunks (the engine's compile_drafter); the target never."""
    from effroll.checkpoints import load_model
    from effroll.drafter import derive_drafter
    from effroll.engine.kv_cache import KVCache

    target = load_model(model_dir)
    recipes = {"rtn-sym-g64": "rtn-sym-g64",
               "rtn-sym-g64 + int4 head": {"method": "rtn", "symmetric": True, "group_size": 64, "lm_head": "int4"}}
    models = {"target": target}
    for rname, rec in recipes.items():
        for kern in ("torch", "effroll"):
            os.environ[I.KERNEL_ENV] = kern
            d = models[f"{rname} [{kern} int4]"] = derive_drafter(target, rec)
            d.compile_decode = compiled
    os.environ.pop(I.KERNEL_ENV, None)
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in batches:
            prompt = torch.randint(0, target.cfg.vocab_size, (b, context), generator=g)
            caches = {}
            for name, m in models.items():
                caches[name] = KVCache(m.cfg, b, context + repeats * steps + 8, m.dtype, m.device)
                m(prompt, torch.zeros(b, dtype=torch.long), caches[name], [0] * b)
            times = {name: [] for name in models}
            tok = torch.zeros(b, 1, dtype=torch.long)
            for j in range(repeats * steps + 2):
                pos = context + j
                for name, m in models.items():
                    t0 = time.perf_counter()
                    h = m(tok, torch.full((b,), pos), caches[name], [pos] * b)
                    m.logits(h[:, -1]).argmax(-1).tolist()
                    if j >= 2:
                        times[name].append(time.perf_counter() - t0)
            out[b] = {name: stats(ts) for name, ts in times.items()}
            print(f"\ndecode step{' (compiled drafters)' if compiled else ''}, batch {b} (ms median [min-max] over {repeats * steps} steps):")
            for name, s in out[b].items():
                ratio = s["median"] / out[b]["target"]["median"]
                print(f"  {name:>36}: {fmt(s, 1e3)}   {ratio:.2f}x the target")
    return out


def target_steps(model_dir: str, batches, repeats: int, steps: int, context: int = 128) -> dict:
    """One target decode step (B tokens on a ``context``-token KV cache, plus the LM head and argmax) with
    ``EFFROLL_BF16_KERNEL=torch`` (F.linear here) and ``auto`` (effroll's bf16 kernel where oneDNN's does not
    run), alternating every step in one process; each mode keeps its own cache."""
    from effroll.checkpoints import load_model
    from effroll.engine.kv_cache import KVCache

    target = load_model(model_dir)
    env = kernels.BF16_KERNEL_ENV
    saved = os.environ.get(env)
    modes = ("torch", "auto")
    out = {"paths": {}}
    g = torch.Generator().manual_seed(0)
    try:
        for mode in modes:
            os.environ[env] = mode
            out["paths"][mode] = linear_mod.bf16_linear_path()
        with torch.no_grad():
            for b in batches:
                prompt = torch.randint(0, target.cfg.vocab_size, (b, context), generator=g)
                caches = {}
                for mode in modes:
                    os.environ[env] = mode
                    caches[mode] = KVCache(target.cfg, b, context + repeats * steps + 8, target.dtype, target.device)
                    target(prompt, torch.zeros(b, dtype=torch.long), caches[mode], [0] * b)
                times = {mode: [] for mode in modes}
                tok = torch.zeros(b, 1, dtype=torch.long)
                for j in range(repeats * steps + 2):
                    pos = context + j
                    for mode in modes:
                        os.environ[env] = mode
                        t0 = time.perf_counter()
                        h = target(tok, torch.full((b,), pos), caches[mode], [pos] * b)
                        target.logits(h[:, -1]).argmax(-1).tolist()
                        if j >= 2:
                            times[mode].append(time.perf_counter() - t0)
                out[b] = {mode: stats(ts) for mode, ts in times.items()}
                r = out[b]["torch"]["median"] / out[b]["auto"]["median"]
                print(f"target decode step, batch {b} (ms median [min-max] over {repeats * steps} steps): "
                      + ", ".join(f"{m} ({out['paths'][m]}) {fmt(out[b][m], 1e3)}" for m in modes)
                      + f"  -> {r:.2f}x faster", flush=True)
    finally:
        os.environ.pop(env) if saved is None else os.environ.__setitem__(env, saved)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["gate_up"], choices=[*SHAPES, "all"])
    ap.add_argument("--ms", nargs="+", type=int, default=list(MS))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", default=None, help="only these variant names")
    ap.add_argument("--target-ms", type=float, default=30.0, help="time per (variant, M, repeat) measurement")
    ap.add_argument("--drafter", default=None, metavar="MODEL_DIR", help="also time whole decode steps")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--no-linears", action="store_true", help="only the decode steps (with --drafter / --target)")
    ap.add_argument("--compiled", action="store_true", help="drafters decode through torch.compile (compile_drafter)")
    ap.add_argument("--target", default=None, metavar="MODEL_DIR",
                    help="also time the target's decode step with EFFROLL_BF16_KERNEL=torch vs auto, interleaved")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = list(SHAPES) if "all" in a.shapes else a.shapes
    cpu = cpu_summary()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['isa']}; torch capability {cpu['torch_capability']}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; effroll kernel: "
          f"{'available' if kernels.available() else kernels.unavailable_reason()}")
    bw = dram_bandwidth()
    flops = peak_flops()
    kflops, bflops = in_cache_kernel_flops(), in_cache_bf16_flops()
    print(f"DRAM read bandwidth {bw['limit'] / 1e9:.1f} GB/s (torch.sum 1 GiB: bf16 {bw['bfloat16'] / 1e9:.1f}, "
          f"fp32 {bw['float32'] / 1e9:.1f}); fp32 peak (in-cache 1024^3 torch.mm) {flops / 1e9:.0f} GFLOP/s; "
          f"effroll kernels in-cache 3072x576 M=64: int4 {kflops / 1e9 if kflops else float('nan'):.0f}, "
          f"bf16 {bflops / 1e9 if bflops else float('nan'):.0f} GFLOP/s")
    result = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "dram_bytes_per_s": bw,
              "peak_flops_mm": flops, "kernel_in_cache_flops_m64": kflops, "bf16_in_cache_flops_m64": bflops,
              "load_avg_start": os.getloadavg(), "shapes": {}}
    for kind in [] if a.no_linears else shapes:
        r = bench_shape(kind, a.group_size, a.ms, a.repeats, bw["limit"], flops, a.variants, a.target_ms / 1e3)
        print_shape(kind, r)
        result["shapes"][kind] = r
    if a.target:
        result["target_steps_bf16_kernel"] = target_steps(a.target, a.batches, a.repeats, 3)
    if a.drafter:
        key = "decode_steps_compiled" if a.compiled else "decode_steps"
        result[key] = drafter_steps(a.drafter, a.batches, a.repeats, 3, a.compiled)
    result["load_avg_end"] = os.getloadavg()  # other processes on this machine (2 CPUs): > 0 means shared
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
