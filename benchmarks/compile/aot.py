"""Ahead-of-time compilation of recorded Triton launches for a GPU this machine need not have, and what the
compiler made of them.

The route matches a real launch (DESIGN.md, "Engines on Hopper"): a launcher runs on ``meta`` tensors inside
:func:`resnet_fused.backends.triton._launch.capture`, which records each kernel with the arguments the launcher
bound; the JIT's own signature binder (``create_function_from_signature`` + ``JITFunction._pack_args``) turns
them into the signature, constexprs and specialization attributes (integers equal to 1 become constants,
multiples of 16 and 16-byte aligned pointers carry that hint) a launch would compile; ``triton.compile`` then
builds them for ``GPUTarget("cuda", 90, 32)`` (sm_90a) and the bundled ``ptxas -v`` reports registers, spills,
stack and its performance notes (every line of its log is kept: ``info (C75xx)`` lines such as C7515, "wgmma.mma_async
instructions are serialized", are info lines, not warnings).

The verdict on the main loop is read from the SASS (the cubin disassembled with the bundled ``cuobjdump -sass``),
because ptxas may serialize a pipeline the PTX keeps in flight: the innermost loop holding HGMMA and the
``WARPGROUP.DEPBAR.LE gsb0, 0xN`` waits in it (N = 0: every K step waits for all its MMAs). The PTX's
``wgmma.wait_group`` depth is kept beside it (``ptx_wait_in_loop``) to show where the two disagree, and the TTGIR
tells operand tiles from per-channel vectors for the asynchronous-load check.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
HOPPER_SMEM = 232448  # bytes of shared memory a CTA may use on sm_90 (227 KiB)


@dataclass
class Variant:
    """One compilable variant of a recorded launch: the JIT function, its arguments and launch options."""

    jit: JITFunction
    args: tuple
    kwargs: dict  # constexpr keyword arguments, the config's meta-parameters included
    num_warps: int
    num_stages: int
    config: str  # the config as text ("-" for a kernel without configs)
    meta: dict = field(default_factory=dict)  # the config's meta-parameters alone
    configs_all: int = 1  # configs of the kernel's autotuner before pruning
    configs_kept: int = 1  # ... and after: the variants of this launch


def _config_text(meta: dict, num_warps: int, num_stages: int) -> str:
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "GROUP_M": "GM", "BLOCK_R": "BR", "BLOCK_C": "BC",
             "BLOCK_P": "BP"}
    parts = [f"{short.get(k, k)}{v}" for k, v in meta.items()]
    return " ".join(parts + [f"w{num_warps}", f"s{num_stages}"])


def variants(launch) -> list[Variant]:
    """Every variant a launch may run: each config the autotuner may choose (after its ``prune_configs_by``
    pruning, with the launch's arguments), or the launch itself for a plain kernel."""
    kernel, args, kwargs = launch.kernel, launch.args, dict(launch.kwargs)
    if isinstance(kernel, Autotuner):
        nargs = dict(zip(kernel.arg_names, args))
        configs = kernel.configs
        if kernel.early_config_prune is not None:
            configs = kernel.early_config_prune(configs, nargs, **kwargs)
        out = []
        for cfg in configs:
            meta = dict(cfg.kwargs)
            out.append(Variant(kernel.fn, args, {**kwargs, **meta}, cfg.num_warps, cfg.num_stages,
                               _config_text(meta, cfg.num_warps, cfg.num_stages), meta, len(kernel.configs),
                               len(configs)))
        return out
    warps = kwargs.pop("num_warps", 4)
    stages = kwargs.pop("num_stages", 3)
    meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")}
    return [Variant(kernel, args, kwargs, warps, stages, _config_text(meta, warps, stages), meta)]


_BACKEND = None
_BINDERS: dict[int, Any] = {}


def _backend():
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = triton.compiler.make_backend(TARGET)
    return _BACKEND


def specialize(v: Variant):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` would compile ``v``."""
    backend = _backend()
    binder = _BINDERS.get(id(v.jit))
    if binder is None:
        binder = _BINDERS[id(v.jit)] = create_function_from_signature(v.jit.signature, v.jit.params, backend)
    kwargs = dict(v.kwargs, num_warps=v.num_warps, num_stages=v.num_stages)
    bound, spec, opts = binder(*v.args, **kwargs)
    options, signature, constexprs, attrs = v.jit._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def cache_key(v: Variant) -> str:
    """Identity of the compiled binary: two variants with the same key compile to the same code."""
    signature, constexprs, attrs, options = specialize(v)
    return repr((v.jit.fn.__module__, v.jit.fn.__qualname__, sorted(signature.items()),
                 sorted((str(k), repr(c)) for k, c in constexprs.items()),
                 sorted((str(k), repr(a)) for k, a in attrs.items()), sorted(options.__dict__.items(), key=str)))


def compile_variant(v: Variant) -> dict:
    """Compile ``v`` for sm_90a; returns the compiler's facts (see :func:`analyze_sass`, :func:`analyze_ttgir`,
    :func:`parse_ptxas`; :func:`analyze_ptx` for ``ptx_wait_in_loop``)."""
    from triton import knobs

    signature, constexprs, attrs, options = specialize(v)
    src = triton.compiler.ASTSource(fn=v.jit, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # ptxas -v runs inside triton.compile; its log is printed when asked for (never from the cache)
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    facts = {"shared_bytes": int(compiled.metadata.shared), **parse_ptxas(log.getvalue())}
    ptx = analyze_ptx(compiled.asm["ptx"])
    sass = disassemble(compiled.asm["cubin"])
    facts.update(analyze_sass(sass, facts["ptxas_info"]))
    facts["arrive_sites"] = arrive_sites(sass)
    facts["ptx_wait_in_loop"] = ptx["wgmma_wait_in_loop"]
    facts["loop_loads"] = ptx["loop_loads"]
    operands = analyze_ttgir(compiled.asm["ttgir"])
    facts["operand_loads_async"] = operands["operand_loads_async"] if facts["mma"] != "none" else None
    facts["operand_loads"] = operands["operand_loads"]
    return facts


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


_PTXAS_NOTE = re.compile(r"\(C75\d\d\)")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame, spill stores/loads from a ``ptxas -v`` log, and its lines: ``ptxas_info`` every
    ``ptxas info``/``ptxas warning`` line (a continuation line, e.g. the stack frame's, joined to its head),
    ``ptxas_warnings`` the warnings' text,
    ``ptxas_c75`` the ``(C75xx)`` performance notes (e.g. C7515: the wgmma pipeline is serialized), violations
    on the targeted rows."""
    regs = _PTXAS_REGS.search(log)
    frame = _PTXAS_FRAME.search(log)
    lines: list[str] = []
    for ln in log.splitlines():
        if ln.startswith("ptxas"):
            lines.append(" ".join(ln.split()))
        elif ln.strip() and lines:
            lines[-1] += " | " + " ".join(ln.split())
    warnings = sorted({ln.split("warning :", 1)[1].strip() for ln in lines if ln.startswith("ptxas warning")})
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(frame.group(1)) if frame else None,
        "spill_bytes": int(frame.group(2)) if frame else None,
        "spill_load_bytes": int(frame.group(3)) if frame else None,
        "ptxas_warnings": warnings,
        "ptxas_c75": [ln for ln in lines if _PTXAS_NOTE.search(ln)],
        "ptxas_info": lines,
    }


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, from the ``cuobjdump`` Triton ships (``TRITON_CUOBJDUMP_PATH`` overrides it)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


_SASS_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_BRA = re.compile(r"(?:^|\s)BRA(?:\.[\w.]+)?\s+(?:`\()?0x([0-9a-f]+)")
_SASS_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)")
_SASS_LOAD = re.compile(r"(?:^|\s)(LDGSTS|LDG|UTMALDG|UBLKCP)((?:\.[\w]+)*)\s")


def _sass_functions(sass: str) -> list[list[tuple[int, str]]]:
    """Each function's ``(address, instruction)`` list (addresses restart per function)."""
    funcs: list[list[tuple[int, str]]] = []
    for ln in sass.splitlines():
        if "Function :" in ln or not funcs:
            funcs.append([])
        m = _SASS_INSN.search(ln)
        if m:
            funcs[-1].append((int(m.group(1), 16), m.group(2)))
    return [f for f in funcs if f]


def analyze_sass(sass: str, ptxas_info: list[str] = ()) -> dict:
    """What the main loops (every innermost loop holding an MMA: a backward ``BRA`` and its target; where ptxas
    unrolled the K loop completely, ``sass_loop_unrolled``, the run from the first MMA to the last) do, in SASS:

    * ``mma``: ``wgmma`` (HGMMA in a loop), ``mma.sync`` (HMMA) or ``none``;
    * ``wgmma_wait_in_loop``: the smallest N of the ``WARPGROUP.DEPBAR.LE gsb0, 0xN`` in those loops (None: no
      wait there);
    * ``wgmma_serialized``: the loop keeps no wgmma group in flight (N = 0) or ptxas said it serialized the
      wgmma pipeline (a C75xx line); None without wgmma;
    * ``sass_loop_loads``: the loops' global loads by opcode and width, e.g. ``{"LDGSTS.128": 8, "LDG.32": 2}``
      (LDGSTS: an asynchronous copy to shared memory, UTMALDG: TMA, LDG: a synchronous load to registers).
    """
    kinds = set()
    waits = []
    loads: dict[str, int] = {}
    unrolled = False
    for insns in _sass_functions(sass):
        loops = []
        for i, (addr, text) in enumerate(insns):
            b = _SASS_BRA.search(text)
            if b and int(b.group(1), 16) <= addr:
                start = next((j for j, (a, _) in enumerate(insns) if a >= int(b.group(1), 16)), i)
                loops.append((start, i))
        mma_loops = set()
        mmas = [i for i, (_, text) in enumerate(insns) if "HGMMA" in text or re.search(r"(?:^|\s)HMMA", text)]
        for i in mmas:
            inner = [lp for lp in loops if lp[0] <= i <= lp[1]]
            if inner:
                mma_loops.add(min(inner, key=lambda lp: lp[1] - lp[0]))
        if mmas and not mma_loops:
            # a K loop ptxas unrolled completely (the stem's 7 filter rows): the run from the first MMA to the
            # last stands for it, with the waits between MMAs (not the drain after the last)
            mma_loops.add((mmas[0], mmas[-1]))
            unrolled = True
        for first, last in sorted(mma_loops):
            for _, text in insns[first:last + 1]:
                if "HGMMA" in text:
                    kinds.add("wgmma")
                elif re.search(r"(?:^|\s)HMMA", text):
                    kinds.add("mma.sync")
                w = _SASS_DEPBAR.search(text)
                if w:
                    waits.append(int(w.group(1), 16))
                ld = _SASS_LOAD.search(text)
                if ld:
                    width = re.search(r"\.(128|64|32|U16|S16|U8|S8)\b", ld.group(2))
                    bits = {"U16": "16", "S16": "16", "U8": "8", "S8": "8"}.get(width.group(1), width.group(1)) \
                        if width else "32"
                    key = ld.group(1) if ld.group(1) in ("UTMALDG", "UBLKCP") else f"{ld.group(1)}.{bits}"
                    loads[key] = loads.get(key, 0) + 1
    mma = "wgmma" if "wgmma" in kinds else ("mma.sync" if kinds else "none")
    wait = min(waits) if waits else None
    serialized = None
    if mma == "wgmma":
        serialized = wait == 0 or any("serialized" in ln for ln in ptxas_info if _PTXAS_NOTE.search(ln))
    return {"mma": mma, "wgmma_wait_in_loop": wait, "wgmma_serialized": serialized,
            "sass_loop_loads": dict(sorted(loads.items())), "sass_loop_unrolled": unrolled}


_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+);")
_CP_ASYNC = re.compile(r"cp\.async\.(ca|cg)\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*"
                       r"(0x[0-9a-f]+|\d+)")
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.(v[248]\.)?([bfsu])(\d+)\s")


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every loop: a label and a later branch back to it."""
    labels = {}
    loops = []
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln.strip())
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(ln)
        if b and b.group(1) in labels and labels[b.group(1)] < i:
            loops.append((labels[b.group(1)], i))
    return loops


_ELEM_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "f8E4M3FN": 1, "f8E5M2": 1, "i8": 1, "i64": 8, "f64": 8}
_TTG_TENSOR = re.compile(r"tensor<((?:\d+x)+)!tt\.ptr<(\w+)>")
_TTG_CONTIG = re.compile(r"contiguity = (\d+)")


def _ttgir_loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every ``scf.for`` body (brace matching; attribute braces close on their line)."""
    loops = []
    for i, ln in enumerate(lines):
        if "scf.for" not in ln:
            continue
        depth = 0
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            if depth <= 0 and j > i:
                loops.append((i, j))
                break
    return loops


def analyze_ttgir(ttgir: str) -> dict:
    """The operand tiles the innermost loops holding an MMA (``warp_group_dot`` or ``tt.dot``) load, from the
    TTGIR after pipelining: each 2-D global load is a tile of an MMA operand (the 1-D ones are per-channel
    vectors, e.g. the prologue's scale and shift) and is either an asynchronous copy into shared memory
    (``async_copy_global_to_local`` with its contiguity, or a TMA copy) or a synchronous ``tt.load``.
    ``operand_loads_async``: every operand tile is a TMA copy or an async copy of >= 16 contiguous bytes;
    ``operand_loads``: counts by kind, e.g. ``{"async16B": 2, "vector4B": 2}``."""
    lines = ttgir.splitlines()
    loops = _ttgir_loops(lines)
    mma_loops = set()
    for i, ln in enumerate(lines):
        if "ttng.warp_group_dot " in ln or "tt.dot " in ln:
            inner = [lp for lp in loops if lp[0] < i <= lp[1]]
            if inner:
                mma_loops.add(min(inner, key=lambda lp: lp[1] - lp[0]))
    kinds: dict[str, int] = {}
    ok = True
    tiles = 0
    for first, last in sorted(mma_loops):
        for ln in lines[first + 1:last + 1]:
            tma = "async_tma_copy_global_to_local" in ln
            copy = "async_copy_global_to_local" in ln and not tma
            load = re.search(r"=\s*tt\.load\b", ln) is not None
            if not (tma or copy or load):
                continue
            t = _TTG_TENSOR.search(ln)
            rank = t.group(1).count("x") if t else 2
            if tma:
                key, tiles = "tma", tiles + 1
            else:
                contig = int(_TTG_CONTIG.search(ln).group(1)) if _TTG_CONTIG.search(ln) else 1
                nbytes = contig * _ELEM_BYTES.get(t.group(2), 4) if t else 0
                if rank < 2:
                    key = f"vector{nbytes}B" + ("" if copy else "-sync")
                else:
                    tiles += 1
                    key = f"async{nbytes}B" if copy else f"sync{nbytes}B"
                    ok &= copy and nbytes >= 16
            kinds[key] = kinds.get(key, 0) + 1
    return {"operand_loads_async": ok and tiles > 0, "operand_loads": dict(sorted(kinds.items()))}


def analyze_ptx(ptx: str) -> dict:
    """What the main loops (every innermost loop holding an MMA) do:

    * ``mma``: ``wgmma``, ``mma.sync`` or ``none`` (no MMA instruction in any loop);
    * ``wgmma_wait_in_loop``: the smallest N of the ``wgmma.wait_group N`` inside those loops (0: every K step
      waits for all its MMAs, nothing stays in flight), None when no loop waits;
    * ``operand_loads_async``: every global load in those loops is a 16-byte ``cp.async`` or a TMA copy (the
      report takes it from :func:`analyze_ttgir` instead, which tells operand tiles from per-channel vectors);
    * ``loop_loads``: counts of the loops' global loads by kind and bytes, e.g. ``{"cp.async16": 8,
      "ld.b16": 16}``.
    """
    lines = ptx.splitlines()
    loops = _loops(lines)
    mma_loops = set()
    for i, ln in enumerate(lines):
        if "wgmma.mma_async" in ln or re.search(r"\bmma\.sync", ln):
            inner = [lp for lp in loops if lp[0] <= i <= lp[1]]
            if inner:
                mma_loops.add(min(inner, key=lambda lp: lp[1] - lp[0]))
    kinds = set()
    waits = []
    loads: dict[str, int] = {}
    for first, last in sorted(mma_loops):
        for ln in lines[first:last + 1]:
            if "wgmma.mma_async" in ln:
                kinds.add("wgmma")
            elif re.search(r"\bmma\.sync", ln):
                kinds.add("mma.sync")
            w = _WAIT.search(ln)
            if w:
                waits.append(int(w.group(1)))
            c = _CP_ASYNC.search(ln)
            if c:
                key = f"cp.async{int(c.group(2), 0)}"
                loads[key] = loads.get(key, 0) + 1
            elif "cp.async.bulk.tensor" in ln:
                loads["tma"] = loads.get("tma", 0) + 1
            else:
                g = _LD_GLOBAL.search(ln)
                if g:
                    vec = int(g.group(1)[1]) if g.group(1) else 1
                    key = f"ld.{vec * int(g.group(3)) // 8}B"
                    loads[key] = loads.get(key, 0) + 1
    mma = "wgmma" if "wgmma" in kinds else ("mma.sync" if kinds else "none")
    async_ok = bool(loads) and all(k in ("cp.async16", "tma") for k in loads)
    return {
        "mma": mma,
        "wgmma_wait_in_loop": min(waits) if waits else None,
        "operand_loads_async": async_ok if mma != "none" else None,
        "loop_loads": dict(sorted(loads.items())),
    }


def arrive_sites(sass: str) -> list[dict]:
    """Each arrival of :func:`resnet_fused.backends.triton.stats.arrive` in the SASS (a gpu-scope atomic add,
    ``ATOMG.E.ADD.STRONG.GPU``), with what surrounds it in program order:

    * ``stores_then_barrier``: the program's global stores (STG) before it all precede a CTA barrier (BAR.SYNC)
      that precedes the atomic;
    * ``release``: a gpu-scope ``MEMBAR`` between the last store and the atomic (the release half of acq_rel);
    * ``one_thread``: the atomic is predicated and skipped by a conditional branch around it (one thread of the
      program arrives; ptxas aggregates it to one lane per warp);
    * ``barrier_after``: a CTA barrier after it before any global load (its result reaches the other threads
      through shared memory);
    * ``loads``: the global loads after it up to the next arrival, in order (``LDG.E.128.STRONG.GPU``: read at
      gpu scope, past the non-coherent L1, as ``ld.global.cg`` compiles)."""
    out = []
    for insns in _sass_functions(sass):
        texts = [re.sub(r"^@!?U?P\w+\s+", "", t) for _, t in insns]
        atoms = [i for i, t in enumerate(texts) if t.startswith("ATOMG") and ".ADD" in t and ".GPU" in t]
        for n, a in enumerate(atoms):
            stores = [i for i in range(a) if texts[i].startswith("STG")]
            start = stores[-1] if stores else 0  # from the last store before the arrival
            bar = any(texts[i].startswith("BAR.SYNC") for i in range(start, a))
            release = any(texts[i].startswith("MEMBAR") and ".GPU" in texts[i] for i in range(start, a))
            guard = insns[a][1].startswith("@") and any(
                re.match(r"@!?P\w+\s+BRA", insns[i][1]) and int(_SASS_BRA.search(insns[i][1]).group(1), 16)
                > insns[a][0] for i in range(start, a))
            end = atoms[n + 1] if n + 1 < len(atoms) else len(texts)
            loads = [(i, texts[i].split()[0]) for i in range(a + 1, end) if texts[i].startswith("LDG")
                     and not texts[i].startswith("LDGDEPBAR") and not texts[i].startswith("LDGSTS")]
            first_load = loads[0][0] if loads else end
            barrier_after = any(texts[i].startswith("BAR.SYNC") for i in range(a + 1, first_load))
            out.append({"stores_then_barrier": bool(stores) and bar, "release": release,
                        "one_thread": guard, "barrier_after": barrier_after, "loads": [op for _, op in loads]})
    return out
