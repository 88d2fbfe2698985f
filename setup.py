"""Build of retrieval_attention: the Python package plus the `retrieval_attention._C` torch extension.

CPU-only by default; the CUDA kernels in csrc/cuda/*.cu are added when torch is a CUDA build and a CUDA
toolkit is found (set RA_FORCE_CPU=1 to skip them). Eigen headers are taken from EIGEN_INCLUDE_DIR,
/usr/include/eigen3 or .deps/eigen3 (in that order).
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    text = open(os.path.join(ROOT, "python", "retrieval_attention", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def eigen_include():
    for cand in (os.environ.get("EIGEN_INCLUDE_DIR"), "/usr/include/eigen3", os.path.join(ROOT, ".deps", "eigen3")):
        if cand and os.path.isfile(os.path.join(cand, "Eigen", "Core")):
            return cand
    sys.exit("retrieval_attention build: Eigen headers not found; install libeigen3-dev or set EIGEN_INCLUDE_DIR")


def shared_cxx_runtime_link_args():
    """Link arguments that make the extension load the C++ runtime (libstdc++.so.6) that torch runs with.

    Some toolchains (seen: a g++ wrapper on the GPU machine whose -B directory holds only libstdc++.a) link
    libstdc++ statically into the extension. That private copy shares its locale and iostream state with the
    process's libstdc++.so.6 half-way, and formatting a number into an error message inside a torch op then
    crashed the process instead of raising. When the compiler cannot find a shared libstdc++, link the one this
    process has loaded (the one torch uses) by path."""
    import shutil
    import subprocess

    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found):
        return []  # the toolchain links the shared runtime itself
    try:
        loaded = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libstdc++.so" in line})
    except OSError:
        loaded = []
    if not loaded:
        return []
    print(f"retrieval_attention build: {cxx} has no shared libstdc++; linking {loaded[0]} (the runtime torch uses)")
    return [loaded[0]]


def extensions():
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc"), eigen_include()]
    # no -std here: torch passes the standard its headers need (c++17, or c++20 from torch 2.10 on)
    # -g0 undoes the -g of Python's own CFLAGS: with debug info bindings.cpp compiled in 172 s instead of 110 s on a
    # 2-core CPU, and its object file held 47 MB instead of 2 MB (the C++ core's tests build with debug info: CMake)
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-DNDEBUG", "-Wno-unused-parameter"]
    use_cuda = (
        os.environ.get("RA_FORCE_CPU", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and glob.glob(os.path.join("csrc", "cuda", "*.cu"))
    )
    runtime_args = shared_cxx_runtime_link_args()
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = cpp_extension.CUDAExtension(
            "retrieval_attention._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DRA_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math", "-DRA_WITH_CUDA"]},
            extra_link_args=["-fopenmp"] + runtime_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "retrieval_attention._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] + runtime_args,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for its helpers
    ext_modules, cmdclass = extensions()

    setup(
        name="retrieval-attention",
        version=read_version(),
        description="RetrievalAttention: long-context decoding with a CPU KV cache searched by a query-guided proximity graph",
        long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
        long_description_content_type="text/markdown",
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "numpy", "transformers>=4.56", "tqdm"],
        zip_safe=False,
    )
