"""Build lora_kernels and its optional C++/CUDA extensions.

Extensions (both optional; the package imports and falls back without them):
  lora_kernels._C       C++ CPU kernels (csrc/cpu, csrc/bindings_cpu.cpp): built whenever torch
                        is importable at build time (use `pip install --no-build-isolation`).
  lora_kernels._C_cuda  CUDA kernels (csrc/cuda, csrc/bindings_cuda.cpp): built when torch has
                        CUDA and nvcc is found.
Environment: LORA_KERNELS_BUILD_CUDA=1 forces the CUDA extension (error if it cannot build),
=0 skips it; LORA_KERNELS_BUILD_CPP=0 skips the CPU extension too; LORA_KERNELS_CUDA_ARCHS
(default "8.0;9.0") picks the GPU targets.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"lora_kernels setup: {msg}", file=sys.stderr)


def _extensions():
    if os.environ.get("LORA_KERNELS_BUILD_CPP", "1") == "0":
        _log("LORA_KERNELS_BUILD_CPP=0: building no extension (pure Python + Triton)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time (build isolation?): no C++/CUDA extension; "
             "install with `pip install --no-build-isolation -e .` to build them")
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    exts = [
        CppExtension(
            "lora_kernels._C",
            rel("csrc/cpu/*.cpp") + ["csrc/bindings_cpu.cpp"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda = os.environ.get("LORA_KERNELS_BUILD_CUDA", "auto")
    cuda_ok = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not cuda_ok:
        raise RuntimeError("LORA_KERNELS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
    if want_cuda != "0" and cuda_ok:
        archs = os.environ.get("LORA_KERNELS_CUDA_ARCHS", "8.0;9.0").split(";")
        gencode = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" for a in archs]
        exts.append(
            CUDAExtension(
                "lora_kernels._C_cuda",
                rel("csrc/cuda/*.cu") + ["csrc/bindings_cuda.cpp"],
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--fmad=false", *gencode]},
            )
        )
    else:
        _log(f"CUDA extension skipped (LORA_KERNELS_BUILD_CUDA={want_cuda}, torch.version.cuda="
             f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
