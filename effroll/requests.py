"""vLLM-shaped requests: prompts, sampling parameters and outputs, parsed and checked where they enter.

``LLM.generate`` (and the Ray pool) take vLLM-style inputs: prompts as strings, token-id sequences or
``{"prompt": ..., "prompt_token_ids": ...}`` dicts; sampling parameters as ours, a dict, or any object with
vLLM ``SamplingParams`` attributes (``n`` samples per request). They return ``GenerationOutput``s whose
``outputs[j]`` hold ``token_ids``, ``logprobs`` (the target's logprob of each sampled token, plain floats),
``text`` and ``finish_reason``.

The one seed rule (``engine.sampling``): sample j of a request seeded s is seeded s + j; a run seeded S
seeds its item i with ``derive_seed(S, i)``; every seed reaches the RNG through ``stream_seed``.
"""

from __future__ import annotations

import json
import numbers
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .engine.sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    text: str | None = None
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class GenerationOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


# What a dict of sampling parameters may hold (anything else is a typo or a feature we do not have).
SAMPLING_KEYS = ("n", "temperature", "top_k", "top_p", "max_tokens", "stop_token_ids", "ignore_eos", "seed")
# vLLM SamplingParams attributes that would change the distribution: refused unless at their neutral value.
_UNSUPPORTED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                "min_tokens": 0, "logit_bias": None, "allowed_token_ids": None, "bad_words": None, "stop": None}


def to_sampling_params(sp: Any, vocab_size: int) -> SamplingParams:
    """Our validated SamplingParams from ours, None, a dict, or any object with vLLM SamplingParams attributes.

    Values are taken as given, never coerced: ``max_tokens=0`` or ``temperature="0.5"`` is an error naming
    the value. vLLM's conventions hold: ``top_k`` -1 or None is off, ``max_tokens=None`` is 16.
    """
    if sp is None:
        return SamplingParams()
    if isinstance(sp, SamplingParams):
        sp.validate(vocab_size)
        return sp
    if isinstance(sp, Mapping):
        unknown = sorted(set(map(str, sp)) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))} (supported: "
                             f"{', '.join(SAMPLING_KEYS)})")
        get = sp.get
    else:
        get = lambda k, d=None: getattr(sp, k, d)  # noqa: E731
        for name, neutral in _UNSUPPORTED.items():
            v = get(name, neutral)
            if not (v is None or v == neutral or (isinstance(v, (list, tuple, dict, set)) and not v)):
                raise ValueError(f"sampling parameter {name}={v!r} is not supported by effroll's engine")
    top_k, max_tokens, stop = get("top_k", 0), get("max_tokens", 16), get("stop_token_ids", None)
    out = SamplingParams(
        temperature=_number("temperature", get("temperature", 1.0)),
        top_k=0 if top_k in (None, -1) else _integer("top_k", top_k),
        top_p=_number("top_p", get("top_p", 1.0)),
        max_tokens=16 if max_tokens is None else _integer("max_tokens", max_tokens),
        stop_token_ids=() if stop is None else tuple(_integer("stop token id", t) for t in _sequence("stop_token_ids", stop)),
        ignore_eos=get("ignore_eos", False),
        seed=None if get("seed", None) is None else _integer("seed", get("seed")),
    )
    out.validate(vocab_size)
    return out


def samples_per_request(sp: Any) -> int:
    """``n`` of a sampling-params object or dict (default 1); an int >= 1 or a ValueError/TypeError."""
    n = getattr(sp, "n", None) if not isinstance(sp, Mapping) else sp.get("n", None)
    n = 1 if n is None else _integer("n", n)
    if n < 1:
        raise ValueError(f"n (samples per request) must be >= 1, got {n!r}")
    return n


def _integer(name: str, v: Any) -> int:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {v!r}") from None


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r}")
    return float(v)


def _sequence(name: str, v: Any) -> Sequence[Any]:
    if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {v!r}")
    return list(v)


def as_request_list(prompts: Any, sampling_params: Any) -> tuple[list[Any], list[Any]]:
    """vLLM-style ``generate`` inputs -> (prompts, one sampling-params object per prompt)."""
    if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, (list, tuple)) and prompts
                                               and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    prompts = list(prompts)
    sps = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
    if len(sps) != len(prompts):
        raise ValueError(f"got {len(sps)} sampling params for {len(prompts)} prompts")
    return prompts, sps


def prompt_ids(p: Any, tokenizer: Any = None) -> tuple[str | None, list[Any]]:
    """A vLLM-style prompt (text, token ids, or a dict with ``prompt``/``prompt_token_ids``) -> (text, ids).

    Token ids may be any sequence of ints (list, tuple, 1-D numpy array or tensor); the engine checks them."""
    if isinstance(p, Mapping):
        if "prompt_token_ids" in p:
            return p.get("prompt"), _id_list(p["prompt_token_ids"])
        if "prompt" in p:
            p = p["prompt"]
        else:
            raise ValueError(f"prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
    if isinstance(p, str):
        if tokenizer is None:
            raise ValueError("text prompt given but the model has no tokenizer; pass token ids")
        return p, tokenizer.encode(p, add_special_tokens=False)
    return None, _id_list(p)


def _id_list(ids: Any) -> list[Any]:
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1:
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return list(ids)
    raise TypeError(f"unsupported prompt type {type(ids).__name__} (text, a sequence of token ids, or a dict "
                    "with 'prompt' / 'prompt_token_ids')")


def expand_requests(prompts: Any, sampling_params: Any, parse: Callable[[Any], tuple[str | None, list[int]]],
                    vocab_size: int) -> tuple[list[GenerationOutput], list[list[int]], list[SamplingParams], list,
                                              list[str]]:
    """vLLM-style ``generate`` inputs -> (one output per request, then the valid requests' ``n`` samples
    flattened: prompt ids, SamplingParams, (request, sample) owners; and one message per invalid request).

    ``parse(prompt)`` returns (text, checked token ids) or raises ValueError/TypeError. An invalid request's
    output already holds its ``n`` (or one) completions with ``finish_reason="error"``; the others run.
    Sample j of a request seeded ``s`` is seeded ``s + j`` (and reduced by the engine's one seed rule).
    """
    prompts, sps = as_request_list(prompts, sampling_params)
    flat, params, owners, errors = [], [], [], []
    results: list[GenerationOutput] = []
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        text, ids, n = None, [], 1
        try:
            n = samples_per_request(sp)
            text, ids = parse(p)
            base = to_sampling_params(sp, vocab_size)
        except (ValueError, TypeError) as e:
            errors.append(f"prompt {i}: {e}")
            results.append(GenerationOutput(f"{i}", text, list(ids) if isinstance(ids, list) else [],
                                            [CompletionOutput(j, [], [], "error", error=str(e)) for j in range(n)]))
            continue
        results.append(GenerationOutput(f"{i}", text, ids))
        for j in range(n):
            s = base if base.seed is None or j == 0 else SamplingParams(**{**base.__dict__, "seed": base.seed + j})
            flat.append(ids)
            params.append(s)
            owners.append((i, j))
    return results, flat, params, owners, errors


def fill_outputs(results: list[GenerationOutput], owners: list, outs: Sequence[Any],
                 tokenizer: Any) -> list[GenerationOutput]:
    """Engine outputs (``token_ids``, ``logprobs``, ``finish_reason``, ``error``) into the requests' completions."""
    for (i, j), o in zip(owners, outs):
        text = tokenizer.decode(o.token_ids) if tokenizer is not None else None
        results[i].outputs.append(CompletionOutput(j, o.token_ids, o.logprobs, o.finish_reason, text,
                                                   getattr(o, "error", None)))
    return results


def read_prompts_file(path: str | Path, tokenizer: Any = None) -> list[list[int]]:
    """Token ids of every prompt in a JSONL file (lines with ``prompt`` text or ``prompt_token_ids``), or a
    ValueError naming the file, the line and the problem."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    if not p.is_file():
        raise ValueError(f"prompts file {path!r} is not a file")
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
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
