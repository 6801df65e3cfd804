"""Build of hcd_fast: the Python package, the Triton kernels (``kernels/`` installed as
``hcd_fast.kernels``) and the C++/CUDA extension ``hcd_fast._C`` (csrc/).

The extension:
- CPU kernels always (csrc/cpu/*.cpp, -O3, OpenMP through at::parallel_for). The vectorised kernel bodies
  are compiled twice, a portable default and an AVX2+FMA copy chosen at run time (csrc/cpu/dispatch.cpp), so
  no -march=native: the machine that builds need not be the one that runs.
- CUDA kernels (csrc/cuda/*.cu) when torch is a CUDA build and nvcc exists under CUDA_HOME; a GPU need not
  be visible. TORCH_CUDA_ARCH_LIST is honoured (default 9.0).
- HCD_FAST_NO_CUDA=1 skips the CUDA kernels, HCD_FAST_NO_EXT=1 the whole extension. A failed or skipped
  build never breaks ``import hcd_fast``: ``hcd_fast.backends()`` then says why.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cublas_dirs(cuda_home):
    """(include dir, lib dir, lib files) of cuBLAS and cuBLASLt: the toolkit's own, else torch's nvidia wheel."""
    candidates = [(os.path.join(cuda_home, "include"), os.path.join(cuda_home, "lib64"))]
    for site in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cu12", "nvidia/cublas"):
            base = os.path.join(site, sub)
            candidates.append((os.path.join(base, "include"), os.path.join(base, "lib")))
    for inc, lib in candidates:
        if os.path.exists(os.path.join(inc, "cublas_v2.h")):
            libs = sorted(glob.glob(os.path.join(lib, "libcublas.so*")))
            lt_libs = sorted(glob.glob(os.path.join(lib, "libcublasLt.so*")))
            if libs and lt_libs:
                return inc, lib, [os.path.basename(libs[0]), os.path.basename(lt_libs[0])]
    return None


def _extensions():
    if _flag("HCD_FAST_NO_EXT"):
        print("hcd_fast: HCD_FAST_NO_EXT=1, building without the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time: pure-Python install
        print(f"hcd_fast: torch not importable ({exc}), building without the extension")
        return [], {}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/hcd_fast.cpp"]
    cxx = ["-O3", "-fopenmp", "-DHCD_FAST_EXTENSION"]
    define_macros = []
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    want_cuda = not _flag("HCD_FAST_NO_CUDA")
    has_cuda = want_cuda and torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    cublas = _cublas_dirs(cuda_home) if has_cuda else None
    if has_cuda and cublas is None:
        print("hcd_fast: cublas_v2.h not found (toolkit or nvidia-cublas wheel), building CPU kernels only")
        has_cuda = False
    if not want_cuda:
        print("hcd_fast: HCD_FAST_NO_CUDA=1, CUDA kernels skipped")
    elif not has_cuda:
        print(f"hcd_fast: CUDA kernels skipped (torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})")
    if has_cuda:
        inc, lib, libfiles = cublas
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("HCD_FAST_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "hcd_fast._C", sources,
            include_dirs=[os.path.join(ROOT, "csrc"), inc],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp", f"-L{lib}"] + [f"-l:{f}" for f in libfiles] + [f"-Wl,-rpath,{lib}"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "hcd_fast._C", cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["hcd_fast", "hcd_fast.ops", "hcd_fast.distill", "hcd_fast.distill.data", "hcd_fast.distill.engine",
              "hcd_fast.distill.methods", "hcd_fast.distill.teacher", "hcd_fast.kernels"],
    package_dir={"hcd_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
