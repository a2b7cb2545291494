#!/usr/bin/env bash
# The one script for a lent GPU machine: install the package (building the CUDA extension), run the GPU
# tests, run the quick benchmark; logs, JSON, Markdown table and PNG plot land in $OUT.
#
# Device tool call, from the repository root (no network there; Python 3.12, torch 2.11, triton 3.6):
#   run(command="RESNET_FUSED_GIT_SHA=<sha of HEAD> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The CUDA backend's tensor-core convolutions need the CUTLASS headers, which that machine lacks: first, here,
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0
# (.whl/ is git-ignored; the wheel is ~6 MB). Wheels for other packages missing there (rich, matplotlib, ...)
# go into .whl/ too. Without it the extension still builds, with cuDNN in place of the CUTLASS convolutions.
# Files back from $OUT: nvidia-smi.txt, install.log, tests_cuda.log, tests_triton.log, bench.log,
# bench_<gpu>_<time>.{json,md,png}. Commit the last three under benchmarks/results/.
#
# About 7.5 minutes, 9.5 at worst: each step has a time limit (seconds, overridable): INSTALL_TIMEOUT=240
# (the extension is built for this GPU's architecture only), TESTS_TIMEOUT=90 for each of the two test
# groups, BENCH_TIMEOUT=150 (the quick sweep itself stops starting rows after BENCH_BUDGET=120 s, and writes
# what it measured when the limit stops it).
# A failing step is recorded and the next one still runs; the exit status is the first failure's.
# A CUDA fault is sticky for the process it happens in: the tests and the benchmark run in separate processes, and
# RESNET_FUSED_CUTLASS=0 (passed through) reruns everything with the CUTLASS kernels off, to isolate them.
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

# Build for this GPU only (e.g. "90"): half the compile time of the default "80;90".
if [[ -z "${RESNET_FUSED_CUDA_ARCHS:-}" ]]; then
    RESNET_FUSED_CUDA_ARCHS="$( (nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true) \
        | head -n 1 | tr -d '. ')"
fi
export RESNET_FUSED_CUDA_ARCHS="${RESNET_FUSED_CUDA_ARCHS:-90}"
echo "RESNET_FUSED_CUDA_ARCHS=$RESNET_FUSED_CUDA_ARCHS"

install_rc=0
: >"$OUT/install.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps .whl/*.whl >>"$OUT/install.log" 2>&1 || install_rc=$?
fi
timeout -k 10 "${INSTALL_TIMEOUT:-240}" "$PYTHON" -m pip install --no-deps --no-build-isolation -e . \
    >>"$OUT/install.log" 2>&1 || install_rc=$?
tail -n 5 "$OUT/install.log"
# The Triton and reference backends import from the source tree even if the extension build failed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, triton, resnet_fused as rf; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'backends', rf.available_backends()); \
from resnet_fused.backends import cuda; print('extension', cuda.build_info())" \
    || echo "resnet_fused does not import"

tests_rc=0
# Correctness only: one Triton tile config per shape (no autotuning). Two groups, each with its own limit, so a
# slow one cannot starve the other: the C++/CUDA backend (no JIT), then everything else (Triton compiles).
CUDA_TESTS="tests/test_cuda_ext.py tests/test_cuda_train.py tests/test_cutlass.py tests/test_cutlass_stats.py tests/test_autoselect.py"
run_tests() {  # run_tests <log name> <pytest args...>
    local log="$1"
    shift
    RESNET_FUSED_AUTOTUNE=0 timeout -k 10 "${TESTS_TIMEOUT:-90}" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
        --durations=5 "$@" 2>&1 | tee "$OUT/$log"
}
# shellcheck disable=SC2086
run_tests tests_cuda.log $CUDA_TESTS || tests_rc=$?
deselect=()
for f in $CUDA_TESTS; do deselect+=(--ignore "$f"); done
run_tests tests_triton.log tests "${deselect[@]}" || { rc=$?; [[ $tests_rc != 0 ]] || tests_rc=$rc; }

bench_rc=0
timeout -k 20 "${BENCH_TIMEOUT:-150}" "$PYTHON" -m benchmarks --quick --time-budget "${BENCH_BUDGET:-120}" --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" || bench_rc=$?

echo "== gpu_check: install rc=$install_rc, tests rc=$tests_rc, bench rc=$bench_rc (124: timed out) =="
for log in tests_cuda.log tests_triton.log; do
    echo "$log: $(grep -E "passed|failed|error" "$OUT/$log" | tail -n 1)"
done
ls -l "$OUT"
for rc in "$install_rc" "$tests_rc" "$bench_rc"; do
    if [[ "$rc" != 0 ]]; then
        exit "$rc"
    fi
done
