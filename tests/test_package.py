"""Packaging behaviour: importing fastcl is cheap and CPU-safe; a missing extension falls back to
the reference with one actionable warning."""
import subprocess
import sys
import warnings

import pytest
import torch


def test_import_touches_neither_cuda_nor_triton():
    code = (
        "import sys, torch, fastcl\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized at import'\n"
        "assert 'triton' not in sys.modules, 'triton imported at import'\n"
        "assert 'fastcl._C' not in sys.modules, 'extension loaded at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    from fastcl import _backend, formulas, nt_xent

    monkeypatch.setitem(sys.modules, "fastcl._C", None)  # makes the import fail
    monkeypatch.setitem(_backend._state, "warned", False)
    monkeypatch.setitem(_backend._state, "cpu", "cpp")
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        loss = nt_xent(z1, z2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt_xent(z1, z2)  # no second warning
    torch.testing.assert_close(loss, formulas.nt_xent(z1, z2))


@pytest.mark.skipif(bool(__import__("os").environ.get("FASTCL_SKIP_EXT")),
                    reason="FASTCL_SKIP_EXT is set")
def test_cpp_extension_is_built():
    from fastcl._backend import cpp_extension

    assert cpp_extension() is not None, "pip install --no-build-isolation -e . builds fastcl._C"


def test_backend_name_is_checked():
    from fastcl.ops import cpu_backend

    with pytest.raises(ValueError, match="name"):
        with cpu_backend("cuda"):
            pass


def test_wheel_holds_every_module(tmp_path):
    """The wheel (built here without the C++ extension, which takes minutes) holds every module of
    fastcl/ and of kernels/ (as fastcl/kernels/): a hand-kept package list once left out
    fastcl.methods. .ci/wheel_smoke.sh builds the full wheel and trains from it."""
    import pathlib
    import shutil
    import zipfile

    root = pathlib.Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to setup.py
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("fastcl", "kernels", "csrc"):
        shutil.copytree(root / name, src / name, ignore=skip, symlinks=True)
    (src / "fastcl" / "kernels").unlink(missing_ok=True)  # a checkout's symlink to ../kernels
    env = dict(__import__("os").environ, FASTCL_SKIP_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=env)
    (wheel,) = (tmp_path / "dist").glob("fastcl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(root).as_posix() for p in (root / "fastcl").rglob("*.py")
            if p.relative_to(root).parts[1] != "kernels"}
    want |= {"fastcl/kernels/" + p.name for p in (root / "kernels").glob("*.py")}
    assert want - names == set(), "modules missing from the wheel"
    assert {"fastcl/methods/__init__.py", "fastcl/kernels/__init__.py"} <= names
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)
