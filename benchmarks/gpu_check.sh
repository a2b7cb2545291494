#!/usr/bin/env bash
# The one script for a lent GPU machine, which comes for 15 minutes from its start (2-4 of them starting it): it
# says the most per second first, and always ends with a summary, whatever stops a step.
#
# Device tool call, from the repository root (no network there; Python 3.12, torch 2.11, triton 3.6):
#   run(command="RESNET_FUSED_GIT_SHA=<sha of HEAD> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
# Wheels the machine lacks go into .whl/ first, here (git-ignored; every wheel there is pip-installed, no deps):
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0            # CUTLASS headers (~6 MB)
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl nvidia-cudnn-frontend==1.32.0
#                                  # cuDNN frontend headers (the cuDNN engine); a CPython-specific wheel: the
#                                  # device machine runs Python 3.12
# A build without CUTLASS or without the cuDNN frontend FAILS the test step unless RESNET_FUSED_ALLOW_NO_CUTLASS=1 /
# RESNET_FUSED_ALLOW_NO_CUDNN_FRONTEND=1 is set; a failed or CPU-only extension build fails it too (tests/conftest.py,
# RESNET_FUSED_REQUIRE_EXTENSION=1): a broken build never turns the GPU tests into skips that exit 0.
#
# Steps, in order of information per second; each has a hard limit, and no step runs past GPU_CHECK_TOTAL=510 s
# (8.5 minutes) from the start: a step's limit is cut to what is left, so a 15-minute window keeps time to rerun one.
#   1. install  -> env.txt: nvidia-smi, the header wheels, `pip install --no-deps --no-build-isolation -e .` building
#               the extension for this GPU's architecture only (the install log's tail and error lines), versions
#               and build_info(). Plan 110 s, limit INSTALL_TIMEOUT=180 s.
#   2. contact  -> first_contact.txt: `python -m benchmarks.first_contact`, every op on every engine (triton; cuda's
#               cudnn, cutlass, plain; reference) once on ResNet-50 shapes in bf16/fp16/fp32, eval and training
#               forward+backward: one line per (op, engine, dtype) — ran (and its error against the fp64 oracle),
#               declined (why) or failed (the error) — flushed as it comes. Plan 70 s; budget CONTACT_BUDGET=85 s,
#               limit 100 s.
#   3. bench    -> bench.log, bench_<gpu>_<time>.{json,md,png}: `python -m benchmarks --quick`, the headline groups
#               (ResNet-50, ResNet-18, eval and train) first; no row starts after BENCH_BUDGET=70 s from the
#               benchmark's own start, SIGTERM at BENCH_TIMEOUT=90 s still writes what it measured. Plan 90 s.
#   4. tests    -> tests.log (every group, one after the other): pytest -m "gpu or cuda_device" with pytest-xdist
#               (-n = the core count; serial when xdist is missing), -v, -rfEs, --maxfail=30, --durations=15, one
#               Triton tile per shape (RESNET_FUSED_AUTOTUNE=0), RESNET_FUSED_TEST_TIMEOUT=40 s per test, each group
#               under `timeout -s INT` (pytest then still prints its failures and durations; SIGKILL 10 s later).
#               Planned from the collected counts and the compile costs measured cold in one process, over ~10
#               effective workers of 16 cores plus ~15 s of workers' start:
#                 cuda   646 tests, ~250-300 cuDNN graphs to build, 150-400 s in one process -> plan 55 s;
#                 triton 305 tests, 200-300 s in one process (the kernels of steps 2-3 are cached) -> plan 40 s;
#                 device 192 tests, >= 330 Triton binaries, inductor, gloo workers, 400-700 s -> plan 75 s.
#               A group's limit is its plan's share of the time left for the groups not run yet.
#   5. summary  -> summary.txt (and the end of stdout): each step's status and time, first contact's counts and
#               its failed / BEYOND-tolerance lines, each test group's result line, the files in $OUT.
# Planned: 110 + 70 + 90 + 170 + ~10 = 450 s (7.5 min); at most 510 s (8.5 min). At most 8 files in $OUT (the device
# tool returns 8): env.txt first_contact.txt bench.log bench_*.json bench_*.md bench_*.png tests.log summary.txt —
# commit the bench JSON, Markdown and PNG under benchmarks/results/.
#
# GPU_CHECK_STEPS="contact bench tests" (default: all four) reruns steps, GPU_CHECK_GROUPS="cuda device" some test
# groups. A failing step is recorded and the next one still runs; the exit status is the first failure's. A CUDA
# fault is sticky for its process: first contact runs each engine in its own processes, each test group and the
# benchmark run in their own, and RESNET_FUSED_CUTLASS=0 (passed through) reruns everything with the CUTLASS kernels
# off, to isolate them. GPU_CHECK_DRY=1 prints the plan (groups, files) and exits.
#
# Without a GPU (a rehearsal on the GPUs' software stack: PYTHON=<its python> OUT=<dir> bash benchmarks/gpu_check.sh)
# every step still runs to the summary: no install unless GPU_CHECK_STEPS names it (it builds for a GPU), first
# contact runs the reference backend and declines every GPU path, the benchmark says there is no GPU, and the test
# groups run their GPU selection, which skips.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/local/gpu_check}"
PYTHON="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_TOTAL:-510}"
SUMMARY_RESERVE=10  # seconds kept for the summary
PLAN_install=110 PLAN_contact=70 PLAN_bench=90  # seconds, as the header says; the test groups' below
OUT_FILES=(env.txt first_contact.txt bench.log "bench_*.json" "bench_*.md" "bench_*.png" tests.log summary.txt)

# Test groups: the plan in seconds, then the test modules (tests/test_gpu_check.py checks these lists).
GROUP_NAMES=(cuda triton device)
GROUP_cuda=(55 tests/test_cuda_ext.py tests/test_cuda_train.py tests/test_cutlass.py tests/test_cutlass_stats.py
            tests/test_cudnn_graph.py)
GROUP_triton=(40 tests/test_triton_blocks.py tests/test_triton_conv.py tests/test_triton_train.py
              tests/test_triton_finalize.py tests/test_autoselect.py tests/test_launch_counts.py)
GROUP_device=(75 tests/test_device_blocks.py tests/test_eval_live_bn.py tests/test_training.py
              tests/test_coverage_gaps.py tests/test_fuse_frozen.py tests/test_fuse_detection.py)

PLAN_tests=0
for g in "${GROUP_NAMES[@]}"; do
    declare -n spec="GROUP_$g"
    PLAN_tests=$((PLAN_tests + spec[0]))
done
PLAN=$((PLAN_install + PLAN_contact + PLAN_bench + PLAN_tests + SUMMARY_RESERVE))
if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then
    echo "out ${OUT_FILES[*]}"
    echo "plan install $PLAN_install contact $PLAN_contact bench $PLAN_bench tests $PLAN_tests" \
        "summary $SUMMARY_RESERVE total $PLAN limit $TOTAL"
    for g in "${GROUP_NAMES[@]}"; do
        declare -n spec="GROUP_$g"
        echo "group $g ${spec[*]}"
    done
    exit 0
fi

mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
# The Triton and reference backends import from the source tree even if the extension build fails.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS=()  # one line per step, for the summary
first_rc=0
record() {  # record <step> <rc> <seconds> <text>
    STATUS+=("$(printf '%-14s rc=%-3s %4ss  %s' "$1" "$2" "$3" "$4")")
    if [[ $first_rc == 0 && $2 != 0 ]]; then first_rc=$2; fi
}
cap() {  # cap <limit>: the limit, or what is left of the total before the summary (at least 5 s)
    local left=$((TOTAL - SUMMARY_RESERVE - SECONDS)) limit=$1
    ((limit <= left)) || limit=$left
    ((limit >= 5)) || limit=5
    echo "$limit"
}
wants() { [[ " ${GPU_CHECK_STEPS:-install contact bench tests} " == *" $1 "* ]]; }

HAVE_GPU="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
GPU_TEXT="$([[ $HAVE_GPU == 1 ]] && echo yes || echo 'none (a rehearsal)')"
if [[ $HAVE_GPU == 0 ]] && nvidia-smi -L >/dev/null 2>&1; then
    GPU_TEXT="none for torch, although nvidia-smi lists one (see env.txt)"
fi
echo "== gpu_check: $(date -u +%FT%TZ), GPU: $GPU_TEXT, plan ${PLAN} s, limit ${TOTAL} s, out $OUT =="

# ------------------------------------------------------------------------------------------ 1. install -> env.txt
ENV_TXT="$OUT/env.txt"
{
    echo "== gpu_check $(date -u +%FT%TZ), git" \
        "${RESNET_FUSED_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available here"
} >"$ENV_TXT"
if [[ -z "${CUDA_HOME:-}" ]]; then
    CUDA_HOME=/usr/local/cuda
    if command -v nvcc >/dev/null; then
        nvcc_root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
        if [[ -f "$nvcc_root/include/cuda_runtime.h" ]]; then
            CUDA_HOME="$nvcc_root"
        else  # a wrapper script: the toolkit root nvcc itself reports
            top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
            if [[ -n "$top" && -d "$top" ]]; then CUDA_HOME="$(cd "$top" && pwd)"; fi
        fi
    fi
fi
export CUDA_HOME
if [[ -z "${RESNET_FUSED_CUDA_ARCHS:-}" ]]; then  # this GPU's only (e.g. "90"): half the compile time of "80;90"
    RESNET_FUSED_CUDA_ARCHS="$( (nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true) \
        | head -n 1 | tr -d '. ')"
fi
export RESNET_FUSED_CUDA_ARCHS="${RESNET_FUSED_CUDA_ARCHS:-90}"
echo "CUDA_HOME=$CUDA_HOME RESNET_FUSED_CUDA_ARCHS=$RESNET_FUSED_CUDA_ARCHS MAX_JOBS=$MAX_JOBS" >>"$ENV_TXT"

start=$SECONDS
if wants install && [[ $HAVE_GPU == 1 || -n "${GPU_CHECK_STEPS:-}" ]]; then
    install_log="$(mktemp "${TMPDIR:-/tmp}/gpu_check_install.XXXXXX")"
    limit="$(cap "${INSTALL_TIMEOUT:-180}")"
    echo "== install (limit ${limit}s) =="
    rc=0
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install --no-index --no-deps .whl/*.whl >>"$install_log" 2>&1 || rc=$?
    fi
    timeout -k 10 "$limit" "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >>"$install_log" 2>&1 || rc=$?
    {
        echo "== install: rc=$rc in $((SECONDS - start)) s (limit ${limit}s; 124: stopped by it)"
        echo "== its log's error lines:"
        grep -n -E "error|FAILED|Traceback" "$install_log" | head -n 30
        echo "== its last 40 lines:"
        tail -n 40 "$install_log"
    } >>"$ENV_TXT"
    echo "install: rc=$rc, $((SECONDS - start)) s"
    install_text="log ${install_log}"
else
    rc=0
    install_text="skipped ($([[ $HAVE_GPU == 1 ]] && echo 'not in GPU_CHECK_STEPS' \
        || echo 'no GPU: it builds the extension for one'))"
    echo "== install: $install_text" | tee -a "$ENV_TXT"
fi
"$PYTHON" - >>"$ENV_TXT" 2>&1 <<'PY' || echo "resnet_fused does not import" >>"$ENV_TXT"
import importlib.util, os, platform, sys
import torch, triton, torchvision, numpy
print("python", platform.python_version(), sys.executable, "| torch", torch.__version__, "| torchvision",
      torchvision.__version__, "| triton", triton.__version__, "| numpy", numpy.__version__, "| cuda",
      torch.version.cuda, "| cudnn", torch.backends.cudnn.version(), "| pytest-xdist",
      importlib.util.find_spec("xdist") is not None, "| cores", os.cpu_count())
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
import resnet_fused as rf
from resnet_fused.backends import cuda
print("resnet_fused", rf.__file__, "| backends", rf.available_backends())
print("extension", cuda.build_info() or cuda.unsupported(torch.empty(0)))
PY
build="$(grep -E "^extension " "$ENV_TXT" | tail -n 1)"
record install "$rc" $((SECONDS - start)) "${build:-extension: not reported} | $install_text"

# ---------------------------------------------------------------------------- 2. first contact -> first_contact.txt
if wants contact; then
    start=$SECONDS
    limit="$(cap 100)"
    budget="${CONTACT_BUDGET:-85}"
    ((budget < limit - 10)) || budget=$((limit - 10))
    echo "== first contact (budget ${budget}s, limit ${limit}s) =="
    rc=0
    timeout -k 10 "$limit" "$PYTHON" -m benchmarks.first_contact --out "$OUT/first_contact.txt" --budget "$budget" \
        >/dev/null 2>"${TMPDIR:-/tmp}/gpu_check_contact.err" || rc=$?
    done_line="$(grep -E "^# first contact done" "$OUT/first_contact.txt" 2>/dev/null | tail -n 1)"
    rows="$(grep -c -v -E "^#" "$OUT/first_contact.txt" 2>/dev/null)"
    if [[ -z "$done_line" ]]; then
        done_line="cut short: ${rows:-0} lines written; $(tail -n 1 "${TMPDIR:-/tmp}/gpu_check_contact.err")"
    fi
    echo "${done_line#\# }"
    record contact "$rc" $((SECONDS - start)) "${done_line#\# }"
fi

# ------------------------------------------------------------------------------------------ 3. benchmark -> bench.*
if wants bench; then
    start=$SECONDS
    if [[ $HAVE_GPU == 1 ]]; then
        limit="$(cap "${BENCH_TIMEOUT:-90}")"
        budget="${BENCH_BUDGET:-70}"
        ((budget < limit - 15)) || budget=$((limit - 15))
        echo "== benchmark --quick (budget ${budget}s from its start, limit ${limit}s) =="
        rc=0
        timeout -k 20 "$limit" "$PYTHON" -m benchmarks --quick --time-budget "$budget" --out "$OUT" \
            >"$OUT/bench.log" 2>&1 || rc=$?
        tail -n 12 "$OUT/bench.log"
        record bench "$rc" $((SECONDS - start)) "$(grep -E "^wrote " "$OUT/bench.log" | tail -n 1 | cut -c1-200)"
    else
        echo "no CUDA GPU: the benchmark times GPU kernels; skipped (python -m benchmarks runs a CPU smoke run)" \
            | tee "$OUT/bench.log"
        record bench 0 0 "skipped: no GPU"
    fi
fi

# ---------------------------------------------------------------------------------------- 4. test groups -> tests.log
if wants tests; then
    TESTS_LOG="$OUT/tests.log"
    : >"$TESTS_LOG"
    xdist=()
    workers="$(nproc 2>/dev/null || echo 1)"
    ((workers <= 16)) || workers=16
    if "$PYTHON" -c "import xdist" 2>/dev/null && ((workers > 1)); then
        xdist=(-n "$workers")
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"  # the workers share the cores
    fi
    require=$([[ $HAVE_GPU == 1 ]] && echo 1 || echo 0)
    selected=()
    for g in ${GPU_CHECK_GROUPS:-${GROUP_NAMES[*]}}; do selected+=("$g"); done
    for i in "${!selected[@]}"; do
        g="${selected[$i]}"
        declare -n spec="GROUP_$g"
        plan="${spec[0]}" files=()
        for f in "${spec[@]:1}"; do [[ ! -e "$f" ]] || files+=("$f"); done
        rest=0  # the plans of this group and those after it share the time left
        for h in "${selected[@]:$i}"; do declare -n s2="GROUP_$h"; rest=$((rest + s2[0])); done
        share=$(( (TOTAL - SUMMARY_RESERVE - SECONDS) * plan / rest - 10 ))
        limit="$(cap "$share")"
        start=$SECONDS
        echo "== tests: $g (plan ${plan}s, limit ${limit}s, ${xdist[*]:-serial}): ${files[*]} ==" | tee -a "$TESTS_LOG"
        rc=0
        RESNET_FUSED_AUTOTUNE=0 RESNET_FUSED_REQUIRE_EXTENSION=$require \
            RESNET_FUSED_TEST_TIMEOUT="${RESNET_FUSED_TEST_TIMEOUT:-40}" \
            timeout -s INT -k 10 "$limit" "$PYTHON" -m pytest -m "gpu or cuda_device" -p no:cacheprovider -v -rfEs \
            --maxfail=30 --durations=15 "${xdist[@]}" "${files[@]}" >>"$TESTS_LOG" 2>&1 || rc=$?
        result="$(grep -E "^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$" "$TESTS_LOG" \
            | tail -n 1 | tr -d '=' | xargs)"
        if [[ $rc == 124 || $rc == 137 ]]; then
            result="stopped by its ${limit}s limit; ${result:-no result line}"
        elif [[ $rc == 5 && $HAVE_GPU == 0 ]]; then  # nothing selected runs without a GPU (or the extension)
            rc=0 result="no GPU: ${result:-no tests ran}"
        fi
        build_check="$(sed -n "/== tests: $g /,\$p" "$TESTS_LOG" | grep -m 1 "BUILD CHECK FAILED" || true)"
        echo "tests $g: rc=$rc, $((SECONDS - start)) s: ${result}${build_check:+ | $build_check}"
        record "tests $g" "$rc" $((SECONDS - start)) "${result}${build_check:+ | $build_check}"
    done
fi

# -------------------------------------------------------------------------------------------- 5. summary.txt
rm -f "$OUT/summary.txt"
files=("$OUT"/*)
listing="$(cd "$OUT" && ls | tr '\n' ' ')summary.txt"
{
    echo "== gpu_check summary: ${SECONDS} s (plan ${PLAN} s, limit ${TOTAL} s), GPU: $GPU_TEXT," \
        "exit status ${first_rc} =="
    printf '%s\n' "${STATUS[@]}"
    if [[ -f "$OUT/first_contact.txt" ]]; then
        bad="$(grep -E "^\S+ +\S+ +\S+ +(failed|ran +BEYOND)" "$OUT/first_contact.txt")"
        if [[ -n "$bad" ]]; then
            echo "first contact, failed or beyond tolerance ($(grep -c . <<<"$bad")):"
            head -n 25 <<<"$bad"
        fi
    fi
    echo "files in \$OUT: $((${#files[@]} + 1)) (the device tool returns 8): $listing"
    if ((${#files[@]} + 1 > 8)); then
        echo "WARNING: more than 8 files in \$OUT: some will not come back"
    fi
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$first_rc"
