"""Build script: the fastcl package, its Triton kernels (shipped as ``fastcl.kernels``) and the
C++ extension ``fastcl._C`` compiled from csrc/ with torch's extension tooling.

Environment variables (also listed in README.md):
  FASTCL_SKIP_EXT=1   do not build the C++ extension (fastcl then falls back to the PyTorch reference)
  FASTCL_CUDA=0|1     force CUDA sources off/on (default: on when nvcc and a CUDA build of torch exist;
                      no CUDA sources exist yet, the GPU path is Triton)
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTCL_SKIP_EXT", "0") != "1":
    # Torch must come from the environment (pip install --no-build-isolation), never from a build sandbox.
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extra = ["-O3", "-std=c++17", "-fopenmp"]
    ext_modules.append(
        CppExtension(
            "fastcl._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": extra},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=["fastcl", "fastcl.ops", "fastcl.losses", "fastcl.kernels"],
    package_dir={"fastcl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
