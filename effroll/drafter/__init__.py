"""The INT4 self-drafter: quantization, recipes, GPTQ, derivation and reports."""

from .derive import derive_drafter, drafter_nbytes, hessian_kinds, model_nbytes
from .gptq import HessianCollector, collect_hessians, gptq_quantize, gptq_quantize_batch
from .int4 import Int4Linear, Int8Linear, QuantizedWeight, dequantize, quantize_rtn
from .recipe import GPTQOptions, Recipe, list_recipes, load_recipe
from .report import acceptance_kl, decode_step_seconds, drafter_report, weight_rel_err
from .sampling import sample_continuations

__all__ = [
    "derive_drafter", "drafter_nbytes", "hessian_kinds", "model_nbytes",
    "HessianCollector", "collect_hessians", "gptq_quantize", "gptq_quantize_batch",
    "Int4Linear", "Int8Linear", "QuantizedWeight", "dequantize", "quantize_rtn",
    "GPTQOptions", "Recipe", "list_recipes", "load_recipe",
    "acceptance_kl", "decode_step_seconds", "drafter_report", "weight_rel_err", "sample_continuations",
]
