"""Optional native build.

Everything in loraga_fast works without compiling anything. Set ``LORAGA_FAST_BUILD_CUDA=1`` to build the
CUDA C++ ops in ``csrc/`` (needs a CUDA toolkit and torch in the build environment, so install with
``pip install --no-build-isolation -e .``). Nothing here probes the hardware.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("LORAGA_FAST_BUILD_CUDA", "0") == "1":
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        raise SystemExit("LORAGA_FAST_BUILD_CUDA=1 but csrc/ holds no sources yet: install without it.")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(CUDAExtension("loraga_fast._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
