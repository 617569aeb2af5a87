"""Versioned controller profiles (``policies/*.json``), written by ``effroll tune``.

    {"schema_version": 1,
     "hardware": {"cpu": ..., "cores": ..., "system": ..., ...},   # hardware_fingerprint() + extras
     "model": {"name": ..., "fingerprint": ...},
     "dtype": "bfloat16", "drafter_recipe": "rtn-int4-g128",
     "cost_model": CostModel.to_dict(),
     "fit": {"mape": ..., "sign_accuracy": ..., "n_points": ...},
     "toggle": {"batch_threshold": ..., "k": ..., "threshold_by_k": {"1": ..., ...}, ...},
     "created": "2025-01-01T00:00:00+00:00"}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

from ..fileio import atomic_write
from .cost_model import CostModel

SCHEMA_VERSION = 1
# Shipped profiles live in the repository's policies/ (editable installs); EFFROLL_POLICIES adds
# more directories (os.pathsep-separated), searched first.
POLICIES_DIR = Path(__file__).resolve().parents[2] / "policies"
MATCH_HARDWARE = ("cpu", "cores", "machine", "device", "torch_threads", "isa")
# The widest SIMD level the kernels can use: CPU names are generic in VMs ("AMD EPYC" is Zen 3 with AVX2 or Zen 4
# with AVX512) and the step times follow the instructions, not the name.
ISA_LEVELS = (("amx", ("amx_bf16",)), ("avx512", ("avx512f", "avx512bw")), ("avx2", ("avx2", "fma")))
REQUIRED = {"schema_version": int, "hardware": dict, "model": dict, "dtype": str, "drafter_recipe": str,
            "cost_model": dict, "fit": dict, "toggle": dict, "created": str}


def hardware_fingerprint(**extra) -> dict:
    """Torch-free description of this machine; callers add accelerator info via ``extra``."""
    cpu, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu is None:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and flags is None:
                    flags = set(line.split(":", 1)[1].split())
                if cpu is not None and flags is not None:
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor()
    hw = {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), "machine": platform.machine(),
          "system": platform.system(), "release": platform.release(), "python": platform.python_version()}
    if flags is not None:
        hw["isa"] = next((name for name, need in ISA_LEVELS if all(f in flags for f in need)), "baseline")
    hw.update(extra)
    return hw


def _model_id(m) -> dict:
    return {"name": m, "fingerprint": None} if isinstance(m, str) else dict(m)


def validate_profile(d, source: str = "<profile>", expect_model=None) -> dict:
    """Check structure, schema version and (optionally) the model; return ``d``.

    ``expect_model``: a model name, or ``{"name": ..., "fingerprint": ...}``; a mismatch of the name,
    or of the fingerprint when both sides have one, raises ValueError naming both.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: profile must be a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{source}: profile is missing key(s) {', '.join(missing)}")
    if d["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{source}: unsupported schema_version {d['schema_version']!r} "
                         f"(this effroll reads {SCHEMA_VERSION})")
    for k, t in REQUIRED.items():
        if not isinstance(d[k], t) or (t is int and isinstance(d[k], bool)):
            raise ValueError(f"{source}: {k!r} must be {t.__name__}, got {type(d[k]).__name__}")
    if not isinstance(d["model"].get("name"), str) or not d["model"]["name"]:
        raise ValueError(f"{source}: model.name missing or empty")
    try:
        CostModel.from_dict(d["cost_model"], prior_weight=0)
    except ValueError as e:
        raise ValueError(f"{source}: bad cost_model: {e}") from None
    if expect_model is not None:
        want, have = _model_id(expect_model), d["model"]
        fp_w, fp_h = want.get("fingerprint"), have.get("fingerprint")
        if want.get("name") != have["name"] or (fp_w and fp_h and fp_w != fp_h):
            raise ValueError(f"{source}: profile is for model {have['name']!r} (fingerprint {fp_h!r}), "
                             f"not {want.get('name')!r} (fingerprint {fp_w!r})")
    return d


def load_profile(path, expect_model=None) -> dict:
    """Read and validate a profile; every problem is a ValueError naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read profile: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from None
    return validate_profile(d, source=str(path), expect_model=expect_model)


def save_profile(profile: dict, path) -> Path:
    """Validate and write ``profile`` as indented JSON; returns the path."""
    path = Path(path)
    validate_profile(profile, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(json.dumps(profile, indent=2, sort_keys=False) + "\n")
    return path


def make_profile(cost_model: CostModel, *, model_name: str, model_fingerprint: str | None = None,
                 dtype: str, drafter_recipe: str, fit: dict | None = None, toggle: dict | None = None,
                 hardware: dict | None = None) -> dict:
    """Assemble a schema-v1 profile dict (``fit`` defaults to the model's own window MAPE)."""
    if fit is None:
        mape = cost_model.mape()
        fit = {"mape": None if mape != mape else mape, "sign_accuracy": None,
               "n_points": cost_model.n_live}
    return validate_profile({
        "schema_version": SCHEMA_VERSION,
        "hardware": hardware if hardware is not None else hardware_fingerprint(),
        "model": {"name": model_name, "fingerprint": model_fingerprint},
        "dtype": dtype,
        "drafter_recipe": drafter_recipe,
        "cost_model": cost_model.to_dict(),
        "fit": dict(fit),
        "toggle": dict(toggle or {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def policy_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EFFROLL_POLICIES", "").split(os.pathsep) if p]
    return extra + [POLICIES_DIR]


def find_profile(model_fingerprint: str, hardware: dict, dirs=None) -> Path | None:
    """The first valid profile in ``dirs`` (default: ``policy_dirs()``) tuned for this model
    architecture (``model.fingerprint``) on this kind of machine (same ``MATCH_HARDWARE`` fields
    wherever both sides record them); None when there is none. Invalid files are skipped."""
    for d in dirs if dirs is not None else policy_dirs():
        for path in sorted(Path(d).glob("*.json")):
            try:
                prof = load_profile(path)
            except ValueError:
                continue
            hw = prof["hardware"]
            if prof["model"].get("fingerprint") != model_fingerprint:
                continue
            if all(hw.get(k) == hardware.get(k) for k in MATCH_HARDWARE if k in hw and k in hardware):
                return path
    return None


def resolve_profile(profile, model_fingerprint: str, hardware: dict,
                    model_name: str | None = None) -> tuple[str | None, dict | None]:
    """``profile`` may be None, "auto" (a shipped/EFFROLL_POLICIES profile tuned for this model architecture
    on this kind of machine, if any), a path or a dict. Returns (source, validated profile or None); a
    profile tuned for another architecture is a ValueError."""
    if profile is None:
        return None, None
    if isinstance(profile, str) and profile == "auto":
        path = find_profile(model_fingerprint, hardware)
        if path is None:
            return None, None
        profile = path
    source = str(profile) if isinstance(profile, (str, Path)) else "<dict>"
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else validate_profile(profile)
    fp = profile["model"].get("fingerprint")
    if fp and fp != model_fingerprint:
        raise ValueError(f"profile is for model {profile['model']['name']!r} (fingerprint {fp}), not this "
                         f"model {model_name!r} (fingerprint {model_fingerprint}); run `effroll tune` for it")
    return source, profile
