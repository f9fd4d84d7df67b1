"""Build script: the fastcl package, its Triton kernels (shipped as ``fastcl.kernels``) and the
C++ extension ``fastcl._C`` compiled from csrc/ with torch's extension tooling.

The extension holds CPU kernels only: the GPU path is Triton (kernels/), so the build needs no
CUDA toolkit. Environment variable (also listed in README.md):
  FASTCL_SKIP_EXT=1   do not build the C++ extension (fastcl then falls back to the PyTorch reference)
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
