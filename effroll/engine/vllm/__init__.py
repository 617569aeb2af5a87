"""vLLM as effroll's second engine (``VLLMEngine``): schedule, worker hooks and metrics in their own files."""

from .engine import VLLMEngine, vllm_available, vllm_int4_draft_support
from .metrics import SPEC_METRICS, SpecMetrics, merge_spec_metrics, read_spec_metrics
from .schedule import Schedule, dense_lookup, normalize_schedule, schedule_from_profile

__all__ = ["VLLMEngine", "vllm_available", "vllm_int4_draft_support", "SPEC_METRICS", "SpecMetrics",
           "merge_spec_metrics", "read_spec_metrics", "Schedule", "dense_lookup", "normalize_schedule",
           "schedule_from_profile"]
