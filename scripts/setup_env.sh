#!/usr/bin/env bash
# Sets up a fresh machine for resnet_fused: a virtual environment in .venv with torch + torchvision, the
# test/bench extras, and the package installed in editable mode with its C++/CUDA extension built.
#
#   bash scripts/setup_env.sh            # then: .venv/bin/python -m pytest tests -q -n 2 --dist loadscope
#
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC / TORCHVISION_SPEC / TIMM_SPEC (default
# the versions this project is tested with; timm is an optional test dependency), EXTRA_SPECS (more requirements
# installed with torch, space-separated: the GPU-stack venv pins triton and numpy there), CUDA_HOME (default: the toolkit
# that `nvcc` on PATH belongs to), MAX_JOBS (default: the number of cores) and the build switches of setup.py
# (RESNET_FUSED_SKIP_EXT, ...).
#
# A run reuses the extension built by an earlier one (building it takes minutes) when nothing it is built from
# changed — see ext_build_key below; RESNET_FUSED_REBUILD=1 builds it again regardless.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}
TIMM_SPEC=${TIMM_SPEC:-timm==1.0.31}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# setuptools >= 77 reads pyproject's SPDX license string; timm is pinned with torch so pip keeps torch's version.
# shellcheck disable=SC2086  # EXTRA_SPECS is a list of requirement specifiers
"$PY" -m pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC" "$TIMM_SPEC" "setuptools>=77" ${EXTRA_SPECS:-}
"$PY" -m pip install -q setuptools wheel ninja pybind11
# CUTLASS headers for the tensor-core convolutions (csrc/cutlass/): the nvidia-cutlass wheel, pinned, without
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

# What the extension is built from: the contents of csrc/ and setup.py, torch's version, the header wheels'
# versions, CUDA_HOME and setup.py's build switches. Recorded in build/ after a build; contents, not file times
# (a checkout or a copy changes those without changing anything).
ext_build_key() {
    "$PY" - <<'KEY'
import hashlib, os, pathlib
from importlib import metadata

import torch

h = hashlib.sha256()
for path in sorted(p for p in pathlib.Path("csrc").rglob("*") if p.is_file()) + [pathlib.Path("setup.py")]:
    h.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
wheels = []
for name in ("nvidia-cutlass", "nvidia-cudnn-frontend"):
    try:
        wheels.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        wheels.append(f"{name}: none")
switches = {k: os.environ.get(k) for k in ("CUDA_HOME", "CUTLASS_PATH", "CUDNN_FRONTEND_PATH",
                                           "RESNET_FUSED_CUDA_ARCHS", "RESNET_FUSED_FORCE_CPU_EXT",
                                           "RESNET_FUSED_NO_CUDNN_FRONTEND")}
h.update(repr((torch.__version__, torch.version.cuda, wheels, sorted(switches.items()))).encode())
print(h.hexdigest())
KEY
}

# Whether the venv imports resnet_fused and its built extension from this checkout (run outside it, so that
# the current directory does not stand in for the installed package).
ext_installed_here() {
    local py_abs here
    py_abs="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
    here=$(pwd -P)
    (cd / && "$py_abs" - "$here" <<'HERE'
import pathlib, sys

import resnet_fused
from resnet_fused.backends import cuda

pkg = pathlib.Path(sys.argv[1]) / "resnet_fused"
ok = pathlib.Path(resnet_fused.__file__).resolve().parent == pkg and cuda.is_built()
ok = ok and pathlib.Path(sys.modules["resnet_fused._C"].__file__).resolve().parent == pkg
sys.exit(0 if ok else 1)
HERE
    ) >/dev/null 2>&1
}

# One record per venv: two venvs (two Pythons, two torches) build side by side from one checkout.
STAMP="build/resnet_fused_ext.$(basename "$VENV").key"
key=$(ext_build_key)
if [ "${RESNET_FUSED_REBUILD:-0}" != "1" ] && [ -z "${RESNET_FUSED_SKIP_EXT:-}" ] && [ -f "$STAMP" ] \
        && [ "$(cat "$STAMP")" = "$key" ] && ext_installed_here; then
    echo "setup_env: resnet_fused._C is up to date (nothing it is built from changed): not rebuilding it"
    RESNET_FUSED_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation -e '.[test,bench]'
else
    rm -f "$STAMP"
    "$PY" -m pip install --no-build-isolation -e '.[test,bench]'
    if [ -z "${RESNET_FUSED_SKIP_EXT:-}" ]; then
        mkdir -p build && echo "$key" > "$STAMP"
    fi
fi
"$PY" - <<'PY'
import resnet_fused
from resnet_fused.backends import cuda
print("setup_env: resnet_fused", resnet_fused.__version__, "| extension:", cuda.build_info() or "not built",
      "| backends here:", resnet_fused.available_backends())
PY
