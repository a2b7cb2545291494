"""The sm_90a compile report's ``--quick`` subset (``python -m benchmarks.compile_report --quick``) meets issues 10
and 18's targets for every config autotune may choose: each kernel compiles for Hopper within its shared memory; on
the ResNet-18/50 shapes in bf16/fp16, 0 spill bytes, no ptxas C75xx performance note, and every convolution uses
wgmma with at least one MMA group in flight across K steps in its SASS (not serialized by ptxas), loads its operands
with 16-byte asynchronous copies, and the stem issues at least 40% useful MACs; the kernels that merge with
``stats.arrive`` order it correctly in their SASS. No GPU is needed: the report compiles ahead of time
(``benchmarks/compile/aot.py``); it runs in a subprocess because the test session runs triton under its
interpreter. The CI gate runs it with the lent GPUs' triton (3.6) as well as the development one.

The SASS, PTX, TTGIR and ptxas-log analyses themselves are checked on small hand-written inputs, so a report that
silently stopped seeing loops, waits, loads or barriers would fail here too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _triton_can_compile() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        return f"triton cannot compile here: {err}"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = _triton_can_compile()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("RESNET_FUSED_")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--quick", "--jobs", "2", "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    files = list(out.glob("*-quick.json"))
    assert files, f"no report written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(files[0].read_text())


GPU_TRITON = "3.6."  # the lent GPUs' Triton (torch 2.11's)


def _pipelining(violation: str) -> bool:
    """Whether a missed target is ptxas's verdict on the wgmma pipeline (a C75xx note, or serialized)."""
    return violation.startswith("(C75") or violation.startswith("wgmma serialized")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU runs compile and run the kernels for real")
def test_quick_report_meets_targets(report):
    from benchmarks.compile.cases import QUICK

    rows = report["rows"]
    assert {(r["case"], r["mode"], r["dtype"], r["layout"]) for r in rows} == set(QUICK)
    failed = [(r["kernel"], r["case"], r["config"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, failed
    # ptxas's pipelining verdict depends on the Triton that emitted the PTX: it is a target for the lent GPUs'
    # Triton only (another one, e.g. the development venv's, may serialize other configs; the report shows them)
    gpu_triton = report["meta"]["triton"].startswith(GPU_TRITON)
    missed = [(r["kernel"], r["case"], r["mode"], r["config"], r["violations"]) for r in rows
              if [v for v in r["violations"] if gpu_triton or not _pipelining(v)]]
    assert not missed, "\n".join(map(str, missed))
    convs = [r for r in rows if r["kernel"] == "_conv_fwd_kernel"]
    for case in {(r["case"], r["mode"]) for r in convs}:
        mine = [r for r in convs if (r["case"], r["mode"]) == case]
        # one row per config the autotuner may choose for this launch, each config once
        assert len({r["config"] for r in mine}) == len(mine) == mine[0]["configs_kept"] >= 1, case
    targeted = [r for r in convs if r["target"]]
    assert targeted and all(r["mma"] == "wgmma" and r["operand_loads_async"] and r["spill_bytes"] == 0
                            for r in targeted)
    if gpu_triton:
        assert all(r["wgmma_wait_in_loop"] != 0 and r["wgmma_serialized"] is False and not r["ptxas_c75"]
                   for r in targeted)
    assert all(r["ptxas_info"] for r in rows if r["ok"])  # the log is kept (at least the register line)
    stem = [r for r in convs if r["stem"]]
    assert stem and min(r["mac_util"] for r in stem) >= 0.40
    # the elementwise kernels of training were compiled too (the statistics merge runs inside the training conv)
    assert {"_bn_train_bwd_kernel", "_tail_bwd_kernel", "_affine_relu_bwd_kernel"} <= {r["kernel"] for r in rows}


_PTX = """
$L__BB0_1:
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd2, %rd3, 1, 1, 1, 0, 0;
\twgmma.wait_group.sync.aligned {wait};
\t{load}
\t@%p1 bra $L__BB0_1;
\twgmma.wait_group.sync.aligned 0;
"""


@pytest.mark.parametrize("wait,load,expect_wait,expect_async", [
    (1, "", 1, True),
    (0, "", 0, True),
    (1, "@%p2 ld.global.b16 { %rs1 }, [ %rd4 + 0 ];", 1, False),
    (1, "cp.async.ca.shared.global [ %r5 + 0 ], [ %rd5 + 0 ], 0x4, %r6;", 1, False),
])
def test_ptx_analysis(wait, load, expect_wait, expect_async):
    from benchmarks.compile import aot

    facts = aot.analyze_ptx(_PTX.replace("{wait}", str(wait)).replace("{load}", load))
    assert facts["mma"] == "wgmma"
    assert facts["wgmma_wait_in_loop"] == expect_wait  # the wait after the loop does not count
    assert facts["operand_loads_async"] is expect_async
    no_loop = aot.analyze_ptx("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd2, %rd3;\n")
    assert no_loop["mma"] == "none"


def test_ptxas_log_parsing():
    """Every ptxas info/warning line is kept, the (C75xx) performance notes (info lines, not warnings) apart."""
    from benchmarks.compile import aot

    c7515 = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
             "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
             "stage in the function 'k'")
    log = (f"{c7515}\nptxas info    : Function properties for k\n    16 bytes stack frame, 24 bytes spill stores, "
           "20 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\nptxas warning : Registers are "
           "spilled\n")
    facts = aot.parse_ptxas(log)
    assert facts["ptxas_c75"] == [" ".join(c7515.split())]
    assert facts.pop("ptxas_info") == [" ".join(c7515.split()),
                                       "ptxas info : Function properties for k | 16 bytes stack frame, 24 bytes "
                                       "spill stores, 20 bytes spill loads",
                                       "ptxas info : Used 255 registers, used 1 barriers",
                                       "ptxas warning : Registers are spilled"]
    assert facts == {"registers": 255, "stack_bytes": 16, "spill_bytes": 24, "spill_load_bytes": 20,
                     "ptxas_warnings": ["Registers are spilled"], "ptxas_c75": [" ".join(c7515.split())]}


# cuobjdump -sass of a K loop: the wgmma group, the wait after it, the operand copies, the branch back.
_SASS = """
        Function : k
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                         /* 0x00008000000079c5 */
        /*0110*/                   LDGSTS.E.BYPASS.128 [R42+0x8000], desc[UR14][R48.64], P2 ;  /* 0x08000000302a7fae */
        /*0120*/                   WARPGROUP.ARRIVE ;                                     /* 0x00000000000079c5 */
        /*0130*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;         /* 0x00e00000081879f0 */
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;  /* 0x00e00000081879f0 */
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x{wait} ;                    /* 0x00008000000079c5 */
        /*0160*/                   {load} ;                                               /* 0x0 */
        /*0170*/               @P5 BRA 0x110 ;                                            /* 0xfffffff000cc5947 */
        /*0180*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                         /* 0x00008000000079c5 */
        /*0190*/                   EXIT ;                                                 /* 0x000000000000794d */
"""


@pytest.mark.parametrize("wait,load,serialized,loads", [
    (1, "NOP", False, {"LDGSTS.128": 1}),
    (0, "NOP", True, {"LDGSTS.128": 1}),
    (1, "@!P2 LDG.E.U16 R5, desc[UR14][R6.64]", False, {"LDG.16": 1, "LDGSTS.128": 1}),
])
def test_sass_analysis(wait, load, serialized, loads):
    """The wait depth is read inside the innermost loop holding HGMMA (the waits before and after it do not
    count); serialized: a 0 there, or ptxas's C75xx note about wgmma."""
    from benchmarks.compile import aot

    sass = _SASS.replace("{wait}", str(wait)).replace("{load}", load)
    facts = aot.analyze_sass(sass)
    assert facts == {"mma": "wgmma", "wgmma_wait_in_loop": wait, "wgmma_serialized": serialized,
                     "sass_loop_loads": loads, "sass_loop_unrolled": False}
    note = ["ptxas info : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized ..."]
    assert aot.analyze_sass(sass, note)["wgmma_serialized"] is True
    unrolled = aot.analyze_sass(sass.replace("@P5 BRA 0x110", "NOP"))  # no loop: the run of MMAs stands for it
    assert unrolled["mma"] == "wgmma" and unrolled["sass_loop_unrolled"] and unrolled["wgmma_wait_in_loop"] is None
    no_mma = aot.analyze_sass(sass.replace("HGMMA", "NOP"))
    assert no_mma["mma"] == "none" and no_mma["wgmma_serialized"] is None


_TTGIR = """
    %a0 = ttg.async_copy_global_to_local %p0, %s0 mask %m0 : tensor<64x32x!tt.ptr<bf16>, #blocked> -> <64x32xbf16>
    %r = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<64x64xf32, #mma>) : i32 {
      %a = ttg.async_copy_global_to_local %p1, %s1 mask %m1 {contiguity = 8 : i32} : tensor<64x32x!tt.ptr<bf16>, #b>
      %sc = ttg.async_copy_global_to_local %p2, %s2 mask %m2 : tensor<32x!tt.ptr<f32>, #b2> -> <32xf32>
      {operand_b}
      %d = ttng.warp_group_dot %x, %y, %acc {isAsync = true} : tensor<64x16xbf16> * !ttg.memdesc<16x64xbf16>
      scf.yield %d : tensor<64x64xf32, #mma>
    }
"""


@pytest.mark.parametrize("operand_b,expect_async,kinds", [
    ('%b = ttg.async_copy_global_to_local %p3, %s3 {contiguity = 8 : i32} : tensor<32x64x!tt.ptr<bf16>, #b1>', True,
     {"async16B": 2, "vector4B": 1}),
    ('%b = ttg.async_copy_global_to_local %p3, %s3 {contiguity = 4 : i32} : tensor<32x64x!tt.ptr<bf16>, #b1>', False,
     {"async16B": 1, "async8B": 1, "vector4B": 1}),
    ('%b = tt.load %p3, %m3 : tensor<32x64x!tt.ptr<bf16>, #b1>', False, {"async16B": 1, "sync2B": 1, "vector4B": 1}),
])
def test_ttgir_operand_analysis(operand_b, expect_async, kinds):
    """Operand tiles (2-D) are told from per-channel vectors (1-D); loads before the loop do not count."""
    from benchmarks.compile import aot

    facts = aot.analyze_ttgir(_TTGIR.replace("{operand_b}", operand_b))
    assert facts == {"operand_loads_async": expect_async, "operand_loads": kinds}


# The kernels whose last-arriving programs merge what the others stored (stats.arrive): the training conv with its
# BatchNorm finalized in the launch, and the backward's channel sums.
ARRIVE_KERNELS = {"_conv_fwd_kernel", "_tail_bwd_kernel", "_affine_relu_bwd_kernel"}


def _arrive_ok(site: dict) -> bool:
    return site["stores_then_barrier"] and site["release"] and site["one_thread"] and site["barrier_after"]


def test_arrive_order_in_the_compiled_kernels(report):
    """The last-arriving-program merges (``stats.arrive``: the conv's in-launch BatchNorm finalize, the backward's
    channel sums) are correct on a GPU only if, in the binaries the GPU runs (sm_90a SASS of the quick report's
    kernels, compiled as launched), every thread's global stores precede a CTA barrier, one thread then arrives
    with a gpu-scope atomic add released by a gpu-scope fence, its result reaches the others through a second
    barrier, and the last program reads the other programs' partials at gpu scope, past L1
    (``LDG.E.*.STRONG.GPU``). The interpreter runs programs one after another, so this is what the test suite can
    check of it; it runs with or without a GPU."""
    rows = [r for r in report["rows"] if r["ok"] and r["arrive_sites"]]
    assert ARRIVE_KERNELS <= {r["kernel"] for r in rows}, {r["kernel"] for r in rows}
    convs = [r for r in report["rows"] if r["kernel"] == "_conv_fwd_kernel" and r["mode"] == "train"]
    assert convs and all(r["arrive_sites"] for r in convs)  # every finalizing conv config
    for r in rows:
        where = (r["kernel"], r["case"], r["config"])
        assert all(_arrive_ok(site) for site in r["arrive_sites"]), (where, r["arrive_sites"])
        merging = [site for site in r["arrive_sites"] if any(ld.endswith(".STRONG.GPU") for ld in site["loads"])]
        assert merging, (where, r["arrive_sites"])  # the merge reads past L1
        # the reads right after an arrival are of the partials: at gpu scope (num_batches_tracked, which no other
        # program writes, is the only plain load a finalize makes before its strong ones)
        assert all(site["loads"][0].endswith(".STRONG.GPU") for site in merging), (where, r["arrive_sites"])


_ARRIVE_SASS = """
        Function : k
        /*0100*/                   STG.E desc[UR14][R8.64], R11 ;
        /*0110*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0120*/              @!P1 BRA 0x170 ;
        /*0130*/               @P2 MEMBAR.ALL.GPU ;
        /*0140*/               @P2 ATOMG.E.ADD.STRONG.GPU PT, R9, desc[UR14][R14.64], R9 ;
        /*0150*/               @P2 CCTL.IVALL ;
        /*0160*/               @P1 STS [UR6], R16 ;
        /*0170*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0180*/                   LDS R8, [UR6] ;
        /*0190*/               @P5 LDG.E.128.STRONG.GPU R4, desc[UR14][R2.64] ;
        /*01a0*/                   EXIT ;
"""


@pytest.mark.parametrize("edit,broken", [
    (None, None),
    (("/*0110*/                   BAR.SYNC.DEFER_BLOCKING 0x0", "/*0110*/                   NOP"), "stores_then_barrier"),
    (("@P2 MEMBAR.ALL.GPU", "NOP"), "release"),
    (("@!P1 BRA 0x170", "NOP"), "one_thread"),
    (("/*0170*/                   BAR.SYNC.DEFER_BLOCKING 0x0", "/*0170*/                   NOP"), "barrier_after"),
])
def test_arrive_sites_analysis(edit, broken):
    """Each ordering fact is seen, and its absence is (a store after the barrier, no fence, every thread
    arriving, no broadcast barrier)."""
    from benchmarks.compile import aot

    sass = _ARRIVE_SASS if edit is None else _ARRIVE_SASS.replace(*edit)
    (site,) = aot.arrive_sites(sass)
    assert site["loads"] == ["LDG.E.128.STRONG.GPU"]
    assert {k for k, v in site.items() if v is False} == ({broken} if broken else set())
