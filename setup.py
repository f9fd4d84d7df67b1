"""Build script: the fastcl package, its Triton kernels (shipped as ``fastcl.kernels``) and the
C++ extension ``fastcl._C`` compiled from csrc/ with torch's extension tooling.

The extension holds CPU kernels only: the GPU path is Triton (kernels/), so the build needs no
CUDA toolkit. Environment variable (also listed in README.md):
  FASTCL_SKIP_EXT=1   do not build the C++ extension (fastcl then falls back to the PyTorch reference)
"""
import glob
import os

from setuptools import find_packages, setup

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

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """One object folder for every build of this checkout: pip's editable builds otherwise
        compile in a fresh temporary folder each time, so the README's second command (-e ".[test]"
        after -e .) and the wheel that .ci/wheel_smoke.sh builds after it would recompile it all;
        here ninja recompiles only what changed (sources, headers, flags) and the rest relinks."""

        def initialize_options(self):
            super().initialize_options()
            self.build_temp = os.path.join("build", "ext-objects")  # --build-temp still overrides

    cmdclass["build_ext"] = BuildExt

# Every package under fastcl/ is found, not listed (a hand-kept list once left fastcl.methods out
# of the wheel). The top-level kernels/ ships as fastcl.kernels (the set keeps it once).
packages = sorted(set(find_packages(include=["fastcl", "fastcl.*"])) | {"fastcl.kernels"})

setup(
    packages=packages,
    package_dir={"fastcl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
