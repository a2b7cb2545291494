#!/usr/bin/env bash
# The one script for a lent GPU machine: install the package (building the CUDA extension), run the GPU
# tests, run the quick benchmark; logs, JSON, Markdown table and PNG plot land in $OUT.
#
# Device tool call, from the repository root (no network there; Python 3.12, torch 2.11, triton 3.6):
#   run(command="RESNET_FUSED_GIT_SHA=<sha of HEAD> bash benchmarks/gpu_check.sh", timeout_s=480)
# Wheels for packages missing there (rich, matplotlib, ...): download them into .whl/ (listed in
# .git/info/exclude) and add carry=[".whl"]. Files back from $OUT (7 at most): nvidia-smi.txt,
# install.log, tests.log, bench.log, bench_<gpu>_<time>.{json,md,png}. Commit the last three under
# benchmarks/results/.
#
# About 6 minutes, 7.5 at worst: each step has a time limit (seconds, overridable): INSTALL_TIMEOUT=150,
# TESTS_TIMEOUT=90, BENCH_TIMEOUT=200 (the quick sweep itself stops starting rows after 170 s, and writes
# what it measured when the limit stops it).
# A failing step is recorded and the next one still runs; the exit status is the first failure's.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || echo "nvidia-smi failed"

if [[ -z "${CUDA_HOME:-}" ]]; then
    CUDA_HOME=/usr/local/cuda
    if command -v nvcc >/dev/null; then
        nvcc_root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
        if [[ -f "$nvcc_root/include/cuda_runtime.h" ]]; then  # not a wrapper script's folder
            CUDA_HOME="$nvcc_root"
        fi
    fi
fi
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME"

install_rc=0
: >"$OUT/install.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps .whl/*.whl >>"$OUT/install.log" 2>&1 || install_rc=$?
fi
timeout -k 10 "${INSTALL_TIMEOUT:-150}" "$PYTHON" -m pip install --no-deps --no-build-isolation -e . \
    >>"$OUT/install.log" 2>&1 || install_rc=$?
tail -n 5 "$OUT/install.log"
# The Triton and reference backends import from the source tree even if the extension build failed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, triton, resnet_fused as rf; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'backends', rf.available_backends())" \
    || echo "resnet_fused does not import"

tests_rc=0
# Correctness only: one Triton tile config per shape (no autotuning) keeps the GPU tests inside their limit.
RESNET_FUSED_AUTOTUNE=0 timeout -k 10 "${TESTS_TIMEOUT:-90}" "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" || tests_rc=$?

bench_rc=0
timeout -k 20 "${BENCH_TIMEOUT:-200}" "$PYTHON" -m benchmarks --quick --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" || bench_rc=$?

echo "== gpu_check: install rc=$install_rc, tests rc=$tests_rc, bench rc=$bench_rc (124: timed out) =="
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1 || true
ls -l "$OUT"
for rc in "$install_rc" "$tests_rc" "$bench_rc"; do
    if [[ "$rc" != 0 ]]; then
        exit "$rc"
    fi
done
