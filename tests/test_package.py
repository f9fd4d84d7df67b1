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
    from fastcl import _backend, nt_xent, nt_xent_ref

    monkeypatch.setitem(sys.modules, "fastcl._C", None)  # makes the import fail
    monkeypatch.setitem(_backend._state, "warned", False)
    monkeypatch.setitem(_backend._state, "cpu", "cpp")
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        loss = nt_xent(z1, z2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt_xent(z1, z2)  # no second warning
    torch.testing.assert_close(loss, nt_xent_ref(z1, z2))


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
