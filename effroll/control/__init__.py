"""Runtime controller (pure logic, no torch): toggle speculation and pick the draft length K.

    ctrl = Controller(profile="policies/h100-qwen.json")   # or Controller() to learn online
    plan = ctrl.plan(batch_view)      # -> Plan(k)
    ctrl.observe(step_record)         # after every engine step
    ctrl.reset_acceptance()           # after update_policy
"""

from .acceptance import AcceptanceEstimator, expected_tokens
from .controller import POLICIES, Controller, toggle_table
from .cost_model import CostModel, Sample, make_sample, record_samples, sign_accuracy
from .profile import (SCHEMA_VERSION, find_profile, hardware_fingerprint, load_profile, make_profile, resolve_profile,
                      save_profile, validate_profile)

__all__ = [
    "AcceptanceEstimator", "expected_tokens",
    "Controller", "POLICIES", "toggle_table",
    "CostModel", "Sample", "make_sample", "record_samples", "sign_accuracy",
    "SCHEMA_VERSION", "find_profile", "hardware_fingerprint", "load_profile", "make_profile", "resolve_profile",
    "save_profile", "validate_profile",
]
