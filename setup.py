"""Build script for the ``resnet_fused._C`` extension (project metadata lives in pyproject.toml).

The extension is built from ``csrc/`` with ``torch.utils.cpp_extension.BuildExtension`` (ninja). Sources, one folder
per part (:data:`SOURCE_DIRS`): ``csrc/module.cpp`` (the Python module), ``csrc/common/`` (shared argument checks,
build info), ``csrc/ops/`` (schemas and CPU kernels), ``csrc/cuda/`` (the CUDA kernels and the ops' CUDA entry
points, which choose among the engines) and ``csrc/cutlass/`` (the CUTLASS kernels); ``csrc/cudnn/`` (the cuDNN
graph engine) adds its own sources. The extension is:

* a ``CUDAExtension`` (CPU + CUDA kernels, macro ``RESNET_FUSED_WITH_CUDA``) when a CUDA toolkit is found
  and torch is a CUDA build;
* a ``CppExtension`` (CPU kernels only) otherwise.

Environment switches:

``RESNET_FUSED_SKIP_EXT=1``        build no extension at all (the pure-Python backends still work).
``RESNET_FUSED_FORCE_CPU_EXT=1``   build the CPU-only extension even when a toolkit is present.
``RESNET_FUSED_CUDA_ARCHS``        semicolon-separated SM list, default ``"80;90"`` (``"8.0;9.0"`` also works);
                                   an entry may end in ``+PTX`` (e.g. ``"90+PTX"``) to also embed PTX for
                                   newer GPUs.
``MAX_JOBS``                       parallel compile jobs (honoured by BuildExtension / ninja).
``RESNET_FUSED_PTXAS_VERBOSE=1``   pass ``-Xptxas -v`` to nvcc: ptxas's report of every kernel (registers, spills,
                                   stack, shared memory, per arch) in the build log, the offline evidence of what the
                                   compiler made of the kernels.
``RESNET_FUSED_NO_CUTLASS=1``      build without the CUTLASS kernels even when their headers are installed (the
                                   configuration of a machine without them; conv_bn_act and conv_stats then run
                                   their cuDNN path).
``CUTLASS_PATH``                   a CUTLASS checkout whose ``include/`` holds the headers of the tensor-core conv
                                   kernels (csrc/cutlass/). Unset: the headers of the ``nvidia-cutlass``
                                   wheel (package ``cutlass_library``, ``source/include``) when it is installed
                                   (``pip install --no-deps nvidia-cutlass==4.2.0.0``, headers only). With CUDA
                                   and CUTLASS headers the extension is built with ``RESNET_FUSED_WITH_CUTLASS``;
                                   without the headers it still builds, and conv_bn_act keeps its cuDNN path
                                   (``build_info()["cutlass"]`` is None).
``CUDNN_FRONTEND_PATH``            a cudnn-frontend checkout whose ``include/`` holds ``cudnn_frontend.h``
                                   (header-only). Unset: the ``include/`` of the ``nvidia-cudnn-frontend`` wheel
                                   when it is installed (``pip install --no-deps nvidia-cudnn-frontend==1.32.0``).
                                   With CUDA, the frontend headers and torch's own cuDNN (``nvidia/cudnn``: headers,
                                   ``libcudnn.so.9``) the extension gains the cuDNN graph engine ``csrc/cudnn/``
                                   (macro ``RESNET_FUSED_WITH_CUDNN_FRONTEND``, ``build_info()["cudnn_frontend"]``).
``RESNET_FUSED_NO_CUDNN_FRONTEND=1`` build without that engine even when the headers are there.

Install: ``CUDA_HOME=/usr/local/cuda-13.0 pip install --no-build-isolation -e .`` (after torch).
"""

import os
import re
from pathlib import Path

from setuptools import setup

CSRC = "csrc"
# Folders of csrc/ whose .cpp and .cu files build into the extension, and whether they need CUDA (a folder that
# needs it is left out of a CPU-only build). Other folders (csrc/cudnn/) are added by their own code below.
SOURCE_DIRS = {"common": False, "ops": False, "cuda": True, "cutlass": True}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_archs() -> list[tuple[str, bool]]:
    """Parse RESNET_FUSED_CUDA_ARCHS into (sm, with_ptx) pairs, e.g. "80;9.0+PTX" -> [("80", False), ("90", True)]."""
    spec = os.environ.get("RESNET_FUSED_CUDA_ARCHS", "80;90")
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_)?(\d+\.\d|\d{2,})([a-z]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(
                f"RESNET_FUSED_CUDA_ARCHS entry {item!r} is not an SM version such as '90', '9.0', '90a' or '90+PTX'"
            )
        archs.append((m.group(1).replace(".", "") + m.group(2).lower(), m.group(3) is not None))
    if not archs:
        raise ValueError("RESNET_FUSED_CUDA_ARCHS is empty")
    return archs


def _gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for sm, ptx in archs:
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


def _torch_arch_list(archs: list[tuple[str, bool]]) -> str:
    """The same list in TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0+PTX")."""
    out = []
    for sm, ptx in archs:
        digits, suffix = re.fullmatch(r"(\d+)([a-z]?)", sm).groups()
        out.append(f"{digits[:-1]}.{digits[-1]}{suffix}" + ("+PTX" if ptx else ""))
    return ";".join(out)


def _wheel_cuda_include_dirs() -> list[str]:
    """Headers the CUDA toolkit may lack (cusparse.h, cublas_v2.h, cusolverDn.h, ...) that torch's CUDA headers
    include.

    CUDA wheels of torch depend on ``nvidia-*`` packages that ship them under ``site-packages/nvidia/cu<N>/include``
    (or one ``nvidia/<lib>/include`` per library in older layouts). They are added as *system* include dirs, which
    the compilers search after every ``-I`` dir, so the toolkit's own headers keep priority.
    """
    import importlib.util

    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    import torch

    roots.append(Path(torch.__file__).resolve().parent.parent / "nvidia")
    dirs = []
    for root in roots:
        if not root.is_dir():
            continue
        for inc in sorted(root.glob("*/include")):
            if str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def _cutlass_include_dir() -> str | None:
    """The CUTLASS include dir: ``$CUTLASS_PATH/include``, else ``source/include`` of the ``cutlass_library``
    package (nvidia-cutlass wheel), located with ``find_spec`` without importing it; None when neither exists or
    ``RESNET_FUSED_NO_CUTLASS`` is set."""
    import importlib.util

    if _env_flag("RESNET_FUSED_NO_CUTLASS"):
        return None
    root = os.environ.get("CUTLASS_PATH", "").strip()
    if root:
        inc = Path(root, "include")
        if not Path(inc, "cutlass", "cutlass.h").is_file():
            raise ValueError(f"CUTLASS_PATH={root!r}: {inc}/cutlass/cutlass.h does not exist")
        return str(inc)
    spec = importlib.util.find_spec("cutlass_library")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        inc = Path(loc, "source", "include")
        if Path(inc, "cutlass", "cutlass.h").is_file():
            return str(inc)
    return None


def _cudnn_frontend() -> dict | None:
    """What the cuDNN graph engine (csrc/cudnn/) needs to build, or None to build without it.

    The frontend is header-only: ``$CUDNN_FRONTEND_PATH/include`` or the ``include/`` of the ``nvidia-cudnn-frontend``
    wheel. cuDNN itself is torch's own (the ``nvidia/cudnn`` wheel torch depends on): its headers, and its
    ``libcudnn.so.9`` and the ``libnvrtc.so.<N>`` next to torch's CUDA libraries linked by their exact sonames, which
    are the libraries libtorch_cuda already loads (never a second copy). Returns dict(include, version, sources,
    include_dirs, extra_link_args).
    """
    import importlib.metadata
    import importlib.util

    if _env_flag("RESNET_FUSED_NO_CUDNN_FRONTEND"):
        print("resnet_fused: RESNET_FUSED_NO_CUDNN_FRONTEND set, building without the cuDNN graph engine")
        return None
    root = os.environ.get("CUDNN_FRONTEND_PATH", "").strip()
    if root:
        inc = Path(root, "include")
        if not Path(inc, "cudnn_frontend.h").is_file():
            raise ValueError(f"CUDNN_FRONTEND_PATH={root!r}: {inc}/cudnn_frontend.h does not exist")
    else:
        try:
            inc = Path(importlib.metadata.distribution("nvidia-cudnn-frontend").locate_file("include"))
        except importlib.metadata.PackageNotFoundError:
            inc = None
        if inc is None or not Path(inc, "cudnn_frontend.h").is_file():
            print("resnet_fused: no cudnn-frontend headers (set CUDNN_FRONTEND_PATH or pip install --no-deps "
                  "nvidia-cudnn-frontend==1.32.0): building without the cuDNN graph engine")
            return None
    version_h = Path(inc, "cudnn_frontend_version.h").read_text()
    version = ".".join(re.search(rf"#define CUDNN_FRONTEND_{part}_VERSION (\d+)", version_h).group(1)
                       for part in ("MAJOR", "MINOR", "PATCH"))
    import torch

    roots = [Path(torch.__file__).resolve().parent.parent / "nvidia"]
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    cudnn = next((r / "cudnn" for r in roots if Path(r, "cudnn", "include", "cudnn.h").is_file()
                  and Path(r, "cudnn", "lib", "libcudnn.so.9").is_file()), None)
    nvrtc = sorted(p for r in roots for p in r.glob("cu*/lib/libnvrtc.so.*")
                   if re.fullmatch(r"libnvrtc\.so\.\d+", p.name))
    if cudnn is None or not nvrtc:
        print("resnet_fused: torch's cuDNN 9 wheel (nvidia/cudnn: include/cudnn.h, lib/libcudnn.so.9) or its "
              "libnvrtc.so was not found: building without the cuDNN graph engine")
        return None
    cudnn_lib, nvrtc_lib = cudnn / "lib", nvrtc[0]
    return {
        "include": str(inc),
        "version": version,
        "sources": sorted(str(p) for p in Path(CSRC, "cudnn").glob("*.cpp")),
        # -isystem: after every -I dir, so the toolkit's headers keep priority; cuDNN's own include dir is among
        # _wheel_cuda_include_dirs() already and is named again in case torch's wheel layout differs.
        "include_dirs": ["-isystem", str(inc), "-isystem", str(cudnn / "include")],
        "extra_link_args": [f"-L{cudnn_lib}", "-l:libcudnn.so.9", f"-L{nvrtc_lib.parent}", f"-l:{nvrtc_lib.name}"],
    }


def _sources(with_cuda: bool) -> list[str]:
    """csrc/module.cpp and every .cpp (and, with CUDA, .cu) file under the folders of SOURCE_DIRS, recursively; the
    CUDA-only folders only with CUDA."""
    sources = [str(Path(CSRC, "module.cpp"))]
    for folder, needs_cuda in SOURCE_DIRS.items():
        if needs_cuda and not with_cuda:
            continue
        for pattern in ("*.cpp", "*.cu") if with_cuda else ("*.cpp",):
            sources += sorted(str(p) for p in Path(CSRC, folder).rglob(pattern))
    return sources


def _extensions():
    if _env_flag("RESNET_FUSED_SKIP_EXT"):
        print("resnet_fused: RESNET_FUSED_SKIP_EXT set, not building resnet_fused._C")
        return [], {}

    import torch
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = (
        cuda_home is not None
        and Path(cuda_home, "bin", "nvcc").exists()
        and torch.version.cuda is not None
        and not _env_flag("RESNET_FUSED_FORCE_CPU_EXT")
    )

    sources = _sources(with_cuda)
    # -g0: Python's default CFLAGS carry -g, and debug info for torch-header-heavy units costs ~40% build time.
    cxx_flags = ["-O3", "-g0"]
    define_macros = []
    if with_cuda:
        archs = _cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = _torch_arch_list(archs)
        define_macros.append(("RESNET_FUSED_WITH_CUDA", None))
        system_includes = []
        for inc in _wheel_cuda_include_dirs():
            system_includes += ["-isystem", inc]
        # --threads: nvcc compiles the per-arch device code of each .cu file in parallel.
        nvcc_flags = ["-O3", f"--threads={min(len(archs), 4)}", *_gencode_flags(archs), *system_includes]
        if _env_flag("RESNET_FUSED_PTXAS_VERBOSE"):
            nvcc_flags += ["-Xptxas", "-v"]
        cutlass_inc = _cutlass_include_dir()
        if cutlass_inc is not None:
            define_macros.append(("RESNET_FUSED_WITH_CUTLASS", None))
            # CUTLASS needs constexpr host functions in device code (torch adds this flag too) and C++17 or
            # later (torch's -std=c++20 covers it).
            nvcc_flags += ["-isystem", cutlass_inc, "--expt-relaxed-constexpr"]
            print(f"resnet_fused: CUTLASS tensor-core convolutions on (headers: {cutlass_inc})")
        else:
            print("resnet_fused: no CUTLASS headers (set CUTLASS_PATH or pip install --no-deps "
                  "nvidia-cutlass==4.2.0.0): building without the CUTLASS convolutions (conv_bn_act uses cuDNN)")
        frontend = _cudnn_frontend()
        extra_link_args = []
        if frontend is not None:
            define_macros.append(("RESNET_FUSED_WITH_CUDNN_FRONTEND", None))
            # Frontend headers only for the C++ units (csrc/cudnn/ includes them; nvcc never sees them).
            sources += frontend["sources"]
            system_includes += frontend["include_dirs"]
            extra_link_args += frontend["extra_link_args"]
            print(f"resnet_fused: cuDNN graph engine on (cudnn-frontend {frontend['version']}: {frontend['include']})")
        ext = cpp_extension.CUDAExtension(
            name="resnet_fused._C",
            sources=sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags + system_includes, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
        print(f"resnet_fused: building resnet_fused._C with CUDA ({cuda_home}), "
              f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = cpp_extension.CppExtension(
            name="resnet_fused._C",
            sources=sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
        print("resnet_fused: building CPU-only resnet_fused._C "
              "(no CUDA toolkit, CPU torch, or RESNET_FUSED_FORCE_CPU_EXT)")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
