"""Checkpoints: the one way in for weights (files, the HF name map in both directions, validation)."""

from .files import (KNOWN_MODELS, cache_dir, convert_gguf, default_device, fetch, hf_config_dict, load_model,
                    load_tokenizer, resolve_device, save_hf_checkpoint, write_checkpoint)
from .read import read_config, read_state_dict
from .names import LINEAR_PATHS, from_hf, hf_linear_parts, is_tied, linear_name, to_hf
from .tensors import check_tensors
from .state import check_state, copy_state, expected_shapes, load_state, policy_state

__all__ = [
    "KNOWN_MODELS", "cache_dir", "convert_gguf", "default_device", "fetch", "hf_config_dict", "load_model",
    "load_tokenizer", "read_config", "read_state_dict", "resolve_device", "save_hf_checkpoint", "write_checkpoint",
    "LINEAR_PATHS", "from_hf", "hf_linear_parts", "is_tied", "linear_name", "to_hf",
    "check_state", "check_tensors", "copy_state", "expected_shapes", "load_state", "policy_state",
]
