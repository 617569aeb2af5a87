"""Drafter recipes: how the INT4 drafter is derived from the policy weights (TOML, see quant/README.md).

``load_recipe("rtn-sym-g128")`` reads ``quant/rtn-sym-g128.toml``; a path to any ``.toml`` file works
too. Every error (unknown key, bad value, unreadable TOML) is a ValueError naming the file and value.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .int4 import GROUP_SIZES

LINEAR_KINDS = ("qkv", "o", "gate_up", "down")
LM_HEAD_MODES = ("shared", "int8", "int4")
METHODS = ("rtn", "gptq")
QUANT_DIR = Path(__file__).resolve().parents[2] / "quant"


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # added to H's diagonal, relative to mean(diag H)
    block_size: int = 64  # columns per lazy-update block
    act_order: bool = False  # quantize columns by decreasing H_kk (groups stay static, in column order)
    calib_sequences: int = 16  # self-sampled calibration when no Hessians are supplied
    calib_tokens: int = 128  # tokens per calibration sequence


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str = "rtn"
    symmetric: bool = True
    group_size: int = 128
    linears: tuple[str, ...] = LINEAR_KINDS
    lm_head: str = "shared"
    refine_iters: int = 0  # least-squares refits of each group's (scale, zero), see int4.refine_params
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    source: str = "<dict>"


def _check(cond: bool, src: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"recipe {src}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def recipe_from_dict(d: Mapping[str, Any], name: str = "custom", source: str = "<dict>") -> Recipe:
    """Validate a parsed recipe table and build a :class:`Recipe`."""
    top = {f.name for f in fields(Recipe)} - {"source"}
    for k in d:
        _check(k in top, source, f"unknown key {k!r} (allowed: {', '.join(sorted(top))})")
    method = d.get("method", "rtn")
    _check(method in METHODS, source, f"unknown method {method!r} (use one of {', '.join(METHODS)})")
    sym = d.get("symmetric", True)
    _check(isinstance(sym, bool), source, f"symmetric must be true or false, got {sym!r}")
    g = d.get("group_size", 128)
    _check(_is_int(g) and g in GROUP_SIZES, source, f"group_size must be one of {GROUP_SIZES}, got {g!r}")
    lin = d.get("linears", list(LINEAR_KINDS))
    _check(isinstance(lin, list) and all(isinstance(x, str) for x in lin), source,
           f"linears must be a list of names, got {lin!r}")
    for x in lin:
        _check(x in LINEAR_KINDS, source, f"unknown linear {x!r} in linears (use {', '.join(LINEAR_KINDS)})")
    head = d.get("lm_head", "shared")
    _check(head in LM_HEAD_MODES, source, f"lm_head must be one of {', '.join(LM_HEAD_MODES)}, got {head!r}")
    gd = d.get("gptq", {})
    _check(isinstance(gd, Mapping), source, f"[gptq] must be a table, got {gd!r}")
    gkeys = {f.name for f in fields(GPTQOptions)}
    for k in gd:
        _check(k in gkeys, source, f"unknown key gptq.{k} (allowed: {', '.join(sorted(gkeys))})")
    damp = gd.get("damp", GPTQOptions.damp)
    _check(isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 < damp < 1, source,
           f"gptq.damp must be a number in (0, 1), got {damp!r}")
    for k in ("block_size", "calib_sequences", "calib_tokens"):
        v = gd.get(k, getattr(GPTQOptions, k))
        _check(_is_int(v) and v > 0, source, f"gptq.{k} must be a positive integer, got {v!r}")
    ao = gd.get("act_order", False)
    _check(isinstance(ao, bool), source, f"gptq.act_order must be true or false, got {ao!r}")
    ri = d.get("refine_iters", 0)
    _check(_is_int(ri) and 0 <= ri <= 20, source, f"refine_iters must be an integer in 0..20, got {ri!r}")
    nm = d.get("name", name)
    _check(isinstance(nm, str) and nm != "", source, f"name must be a non-empty string, got {nm!r}")
    return Recipe(
        name=nm, method=method, symmetric=sym, group_size=g, linears=tuple(dict.fromkeys(lin)), lm_head=head,
        refine_iters=ri,
        gptq=GPTQOptions(damp=float(damp), block_size=gd.get("block_size", GPTQOptions.block_size), act_order=ao,
                         calib_sequences=gd.get("calib_sequences", GPTQOptions.calib_sequences),
                         calib_tokens=gd.get("calib_tokens", GPTQOptions.calib_tokens)),
        source=source,
    )


def recipe_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return QUANT_DIR / f"{name_or_path}.toml"


def load_recipe(name_or_path: str | Path | Recipe | Mapping[str, Any]) -> Recipe:
    """A Recipe from a shipped name (``quant/<name>.toml``), a TOML path, a dict, or a Recipe (returned as is)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return recipe_from_dict(name_or_path)
    p = recipe_path(name_or_path)
    if not p.is_file():
        known = ", ".join(list_recipes()) or "none"
        raise ValueError(f"recipe {str(name_or_path)!r} not found (no file {p}; shipped recipes: {known})")
    try:
        d = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe {p}: invalid TOML: {e}") from None
    return recipe_from_dict(d, name=p.stem, source=str(p))


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``quant/``."""
    return sorted(p.stem for p in QUANT_DIR.glob("*.toml")) if QUANT_DIR.is_dir() else []
