#!/usr/bin/env bash
# Sets up a fresh machine for resnet_fused: a virtual environment in .venv with torch + torchvision, the
# test/bench extras, and the package installed in editable mode with its C++/CUDA extension built.
#
#   bash scripts/setup_env.sh            # then: .venv/bin/python -m pytest tests -q
#
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC / TORCHVISION_SPEC (default the
# versions this project is tested with), CUDA_HOME (default: the toolkit that `nvcc` on PATH belongs to),
# MAX_JOBS (default: the number of cores) and the build switches of setup.py (RESNET_FUSED_SKIP_EXT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
"$PY" -m pip install -q setuptools wheel ninja pybind11
# CUTLASS headers for the tensor-core convolutions (csrc/conv_cutlass.cu): the nvidia-cutlass wheel, pinned, without
# its Python dependencies (only its headers are used). setup.py finds them, or the checkout named by CUTLASS_PATH.
"$PY" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
# cudnn-frontend headers (header-only) for the cuDNN graph engine (csrc/cudnn/), pinned, without its Python deps.
"$PY" -m pip install -q --no-deps "nvidia-cudnn-frontend==1.32.0"

# The nvcc on PATH may be a wrapper script: ask nvcc itself where its toolkit lives.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    if [ -n "$top" ] && [ -d "$top" ]; then
        CUDA_HOME=$(cd "$top" && pwd)
        export CUDA_HOME
    fi
fi
echo "setup_env: CUDA_HOME=${CUDA_HOME:-<none: the extension is built without CUDA>}"

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" -m pip install --no-build-isolation -e '.[test,bench]'
"$PY" - <<'PY'
import resnet_fused
from resnet_fused.backends import cuda
print("setup_env: resnet_fused", resnet_fused.__version__, "| extension:", cuda.build_info() or "not built",
      "| backends here:", resnet_fused.available_backends())
PY
