"""Reading a checkpoint directory: its ``config.json`` and all its tensors (HF names), each damaged file a
ValueError that names it. The lowest floor of ``checkpoints``: it knows files, not models."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import torch


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory (expected an HF checkpoint directory)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json")
    try:
        obj = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{cfg} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory, HF names. A file that cannot be read (truncated,
    empty, not a checkpoint) is a ValueError naming it."""
    p = Path(path)
    files = sorted(glob.glob(str(p / "*.safetensors")))
    sd: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            try:
                sd.update(load_file(f))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"cannot read weights file {f}: {_first_line(e)} (truncated or not safetensors?)") from None
        return sd
    bins = sorted(glob.glob(str(p / "pytorch_model*.bin")))
    if not bins:
        raise ValueError(f"model path {str(path)!r} has no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - pickle/zip errors of a damaged file
            raise ValueError(f"cannot read weights file {f}: {_first_line(e)}") from None
    return sd


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
