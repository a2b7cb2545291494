#!/usr/bin/env bash
# The one script for a lent GPU machine: install the package (building the CUDA extension), check the build, run
# the GPU tests in three groups, run the quick benchmark; logs, JSON, Markdown table and PNG plot land in $OUT.
#
# Device tool call, from the repository root (no network there; Python 3.12, torch 2.11, triton 3.6):
#   run(command="RESNET_FUSED_GIT_SHA=<sha of HEAD> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
# Wheels the machine lacks go into .whl/ first, here (git-ignored; every wheel there is pip-installed, no deps):
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0            # CUTLASS headers (~6 MB)
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl nvidia-cudnn-frontend==1.32.0
#                                  # cuDNN frontend headers (the cuDNN engine); a CPython-specific wheel: the
#                                  # device machine runs Python 3.12
# (rich, matplotlib, ... likewise when missing). A build without CUTLASS or without the cuDNN frontend FAILS the
# test step unless RESNET_FUSED_ALLOW_NO_CUTLASS=1 / RESNET_FUSED_ALLOW_NO_CUDNN_FRONTEND=1 is set; a failed or
# CPU-only extension build fails it too (tests/conftest.py, RESNET_FUSED_REQUIRE_EXTENSION=1): a broken build
# never turns the GPU tests into skips that exit 0.
#
# What runs (pytest -m "gpu or cuda_device": the gpu-marked tests, and every test of a module whose DEVICE
# switches to cuda on a GPU — conftest marks those cuda_device):
#   1. cuda   — the C++/CUDA extension and its engines: test_cuda_*.py, test_cutlass*.py, test_cudnn*.py;
#   2. device — fused blocks (plain, downsample, grouped, dilated), depth-reduced models, torch.compile and
#               fp16/bf16 autocast in eval and training on both GPU backends (test_device_blocks.py), one autotuned
#               Triton shape, eval with live BN (test_eval_live_bn.py), training (test_training.py), SyncBN through
#               DDP and auto's fallback (test_coverage_gaps.py), frozen BN (test_fuse_frozen.py), a detection
#               backbone (test_fuse_detection.py);
#   3. triton — the Triton kernels (test_triton_*.py), auto's measured choice (test_autoselect.py) and the launch
#               counts (test_launch_counts.py).
# Tests run with one Triton tile per shape (RESNET_FUSED_AUTOTUNE=0; the autotuned shape runs its own process)
# and a per-test limit (RESNET_FUSED_TEST_TIMEOUT, default 45 s: the test fails, the group goes on; a test hung in
# a kernel ends its group 30 s later with every thread's stack in the log).
#
# Time plan (seconds, each a hard limit, overridable): INSTALL_TIMEOUT=200 (extension built for this GPU's
# architecture only), CUDA_TESTS_TIMEOUT=60, DEVICE_TESTS_TIMEOUT=130, TRITON_TESTS_TIMEOUT=60, BENCH_TIMEOUT=110
# (the sweep starts no row after BENCH_BUDGET=90 s from its process start and writes what it measured when stopped;
# headline groups — ResNet-50 and ResNet-18, eval and train — run first). About 7 minutes, 9.7 at worst, leaving the
# rest of a 15-minute device window for the machine's start. GPU_CHECK_STEPS="tests bench" (default) selects the
# steps after the install (e.g. "bench" for a rerun of the benchmark alone).
# A failing step is recorded and the next one still runs; the exit status is the first failure's.
# A CUDA fault is sticky for the process it happens in: each test group and the benchmark run in their own process,
# and RESNET_FUSED_CUTLASS=0 (passed through) reruns everything with the CUTLASS kernels off, to isolate them.
# Files back from $OUT: nvidia-smi.txt, install.log, build.txt, tests_{cuda,device,triton}.log, bench.log,
# bench_<gpu>_<time>.{json,md,png}. Commit the last three under benchmarks/results/.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
STEPS="${GPU_CHECK_STEPS:-tests bench}"
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
timeout -k 10 "${INSTALL_TIMEOUT:-200}" "$PYTHON" -m pip install --no-deps --no-build-isolation -e . \
    >>"$OUT/install.log" 2>&1 || install_rc=$?
tail -n 5 "$OUT/install.log"
# The Triton and reference backends import from the source tree even if the extension build failed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, triton, resnet_fused as rf; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'backends', rf.available_backends()); \
from resnet_fused.backends import cuda; print('extension', cuda.build_info())" 2>&1 | tee "$OUT/build.txt" \
    || echo "resnet_fused does not import" | tee -a "$OUT/build.txt"

tests_rc=0
run_tests() {  # run_tests <group> <timeout> <test files...>: the files that exist (another branch may add some)
    local group="$1" limit="$2" rc=0 f
    shift 2
    local files=()
    for f in "$@"; do [[ ! -e "$f" ]] || files+=("$f"); done
    if [[ ${#files[@]} == 0 ]]; then
        echo "== tests: $group: none of its files exist =="
        return
    fi
    echo "== tests: $group (limit ${limit}s): ${files[*]} =="
    RESNET_FUSED_AUTOTUNE=0 RESNET_FUSED_REQUIRE_EXTENSION=1 \
        RESNET_FUSED_TEST_TIMEOUT="${RESNET_FUSED_TEST_TIMEOUT:-45}" \
        timeout -k 10 "$limit" "$PYTHON" -m pytest -m "gpu or cuda_device" -q -p no:cacheprovider -rfE \
        --durations=8 "${files[@]}" >"$OUT/tests_$group.log" 2>&1 || rc=$?
    tail -n 25 "$OUT/tests_$group.log"
    if [[ $rc == 124 || $rc == 137 ]]; then
        echo "tests $group: stopped by its ${limit}s limit"
    fi
    [[ $tests_rc != 0 ]] || tests_rc=$rc
}
if [[ " $STEPS " == *" tests "* ]]; then
    run_tests cuda "${CUDA_TESTS_TIMEOUT:-60}" tests/test_cuda_ext.py tests/test_cuda_train.py tests/test_cutlass.py \
        tests/test_cutlass_stats.py tests/test_cudnn_graph.py
    run_tests device "${DEVICE_TESTS_TIMEOUT:-130}" tests/test_device_blocks.py tests/test_eval_live_bn.py \
        tests/test_training.py tests/test_coverage_gaps.py tests/test_fuse_frozen.py tests/test_fuse_detection.py
    run_tests triton "${TRITON_TESTS_TIMEOUT:-60}" tests/test_triton_blocks.py tests/test_triton_conv.py \
        tests/test_triton_train.py tests/test_triton_finalize.py tests/test_autoselect.py tests/test_launch_counts.py
fi

bench_rc=0
if [[ " $STEPS " == *" bench "* ]]; then
    echo "== benchmark (limit ${BENCH_TIMEOUT:-110}s, budget ${BENCH_BUDGET:-90}s) =="
    timeout -k 20 "${BENCH_TIMEOUT:-110}" "$PYTHON" -m benchmarks --quick --time-budget "${BENCH_BUDGET:-90}" \
        --out "$OUT" >"$OUT/bench.log" 2>&1 || bench_rc=$?
    tail -n 40 "$OUT/bench.log"
fi

echo "== gpu_check: install rc=$install_rc, tests rc=$tests_rc, bench rc=$bench_rc (124: timed out), ${SECONDS}s =="
for group in cuda device triton; do
    if [[ -f "$OUT/tests_$group.log" ]]; then
        summary="$(grep -E "passed|failed|error|skipped|no tests ran" "$OUT/tests_$group.log" | tail -n 1)"
        echo "tests_$group.log: $summary"
        grep -E "BUILD CHECK FAILED" "$OUT/tests_$group.log" | head -n 3 || true
    fi
done
ls -l "$OUT"
for rc in "$install_rc" "$tests_rc" "$bench_rc"; do
    if [[ "$rc" != 0 ]]; then
        exit "$rc"
    fi
done
