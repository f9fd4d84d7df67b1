"""Packaging behaviour: importing fastcl is cheap and CPU-safe; a missing extension falls back to
the reference with one actionable warning."""
import subprocess
import sys
import warnings

import pytest
import torch


def test_import_touches_neither_cuda_nor_triton():
    """Nor do fastcl.compat's adapters import the libraries they stand in for."""
    code = (
        "import sys, torch, fastcl\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized at import'\n"
        "assert 'triton' not in sys.modules, 'triton imported at import'\n"
        "assert 'fastcl._C' not in sys.modules, 'extension loaded at import'\n"
        "import fastcl.compat.open_clip, fastcl.compat.lightly, fastcl.compat.pml\n"
        "peers = [m for m in ('open_clip', 'lightly', 'pytorch_metric_learning', 'triton')\n"
        "         if m in sys.modules]\n"
        "assert not peers, f'the adapters imported {peers}'\n"
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


# --- backends registered with the dispatcher ---------------------------------------------------
OPS = ["gram_contrastive", "gram_contrastive_backward", "cross_contrastive",
       "cross_contrastive_backward", "bank_lse", "ring_enqueue_", "bank_update_", "sampled_lse",
       "sampled_lse_backward", "dino_cross_entropy", "dino_cross_entropy_backward",
       "head_cross_entropy", "head_cross_entropy_backward", "sinkhorn", "momentum_update_"]


class _Spy:
    """Forwards to a kernels module, recording the launchers looked up on it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.module, name)


def _op_case(name: str, dtype):
    """(custom op, its arguments in `dtype`, the launcher it calls first on the C++ backend)."""
    from fastcl.ops import bank, contrastive, dino, dino_head, momentum, sinkhorn

    def x(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype), dim=-1)

    scale = torch.tensor(2.0, dtype=dtype)
    cases = {
        "gram_contrastive": (contrastive.gram_contrastive, (x(6, 4), torch.arange(6) % 3, scale),
                             "gram_stats_fwd"),
        "bank_lse": (contrastive.bank_lse, (x(3, 4), x(5, 4), scale), "bank_lse_fwd"),
        "sampled_lse": (bank.sampled_lse,
                        (x(2, 4), x(5, 4), torch.randint(5, (2, 3)), scale, scale),
                        "sampled_lse_fwd"),
        "bank_update_": (bank.bank_update_, (x(5, 4), torch.tensor([1, 3]), x(2, 4), 0.5),
                         "bank_update"),
        "ring_enqueue_": (bank.ring_enqueue_,
                          (x(4, 3), torch.tensor(3), torch.tensor(3), x(2, 3)), "ring_enqueue"),
        "dino_cross_entropy": (dino.dino_cross_entropy, (x(3, 2, 5), x(2, 2, 5), x(5), scale, scale),
                               "dino_cross_entropy_fwd"),
        "head_cross_entropy": (dino_head.head_cross_entropy,
                               (x(3, 2, 4), x(2, 2, 4), x(5, 4), x(5, 4), x(5), scale, scale,
                                x(2), False), "dino_head_fwd"),
        "sinkhorn": (sinkhorn._sinkhorn, (x(6, 5), 0.5, 3, False), "sinkhorn_init_fwd"),
        "momentum_update_": (momentum._momentum_update_,
                             ([x(3, 2)], [x(3, 2)], torch.tensor(0.9)), "momentum_update_"),
    }
    return cases[name]


def _outputs(op, args):
    """op's outputs on a copy of args, or the copies of the arguments it mutates."""
    args = tuple([t.clone() for t in a] if isinstance(a, list) else
                 a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    out = op(*args)
    return args if out is None else out


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_cpu_and_cuda_kernels(name):
    """Each op: its body as the default kernel, plus kernels registered for CPU and CUDA."""
    import fastcl.ops.bank  # noqa: F401  (registers the ops)
    import fastcl.ops.momentum  # noqa: F401

    for key in ("CompositeExplicitAutograd", "CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcl::{name}", key), key


def test_dino_op_does_not_share_the_public_name():
    import fastcl

    assert not torch._C._dispatch_has_kernel("fastcl::dino_loss")
    assert fastcl.dino_loss is not fastcl.ops.dino.dino_cross_entropy


@pytest.mark.parametrize("name", ["gram_contrastive", "bank_lse", "sampled_lse", "bank_update_",
                                  "ring_enqueue_", "dino_cross_entropy", "head_cross_entropy",
                                  "sinkhorn", "momentum_update_"])
def test_cpu_float32_runs_cpp_and_float64_the_reference(name, monkeypatch):
    """The dispatcher sends CPU tensors to the registered CPU kernel: float32 reaches the C++
    launcher; float64, cpu_backend("reference") and the CPU kernel switched off run the op's body
    (the reference) without touching the extension; all agree."""
    from fastcl import _backend
    from fastcl.ops import cpu_backend

    spy = _Spy(_backend.cpp_extension())
    monkeypatch.setattr(_backend, "cpp_extension", lambda: spy)
    op, args, launcher = _op_case(name, torch.float32)
    fast = _outputs(op, args)
    assert spy.calls[:1] == [launcher]
    spy.calls.clear()
    with cpu_backend("reference"):
        reference = _outputs(op, args)
    with op.set_kernel_enabled("cpu", enabled=False):
        body = _outputs(op, args)
    op64, args64, _ = _op_case(name, torch.float64)
    _outputs(op64, args64)
    assert spy.calls == []
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(body, reference, atol=0, rtol=0)


def test_wide_rows_skip_triton_on_the_triton_backend(monkeypatch):
    """On the Triton backend (the interpreter on CPU), rows wider than TRITON_MAX_DIM run the
    reference; narrower ones reach the Triton launcher."""
    pytest.importorskip("triton")
    from fastcl import _backend
    from fastcl.ops import contrastive, cpu_backend

    spies = {}
    monkeypatch.setattr(_backend, "triton_module",
                        lambda family: spies.setdefault(family, _Spy(
                            __import__(f"fastcl.kernels.{family}", fromlist=["_"]))))
    u, labels, scale = torch.randn(5, 3), torch.arange(5), torch.tensor(2.0)
    wide = torch.randn(3, contrastive.TRITON_MAX_DIM + 1)
    with cpu_backend("triton"):
        contrastive.gram_contrastive(wide, labels[:3], scale)
        assert spies == {}
        contrastive.gram_contrastive(u, labels, scale)
    assert spies["contrastive"].calls == ["gram_stats_fwd"]


def test_many_crops_skip_triton_on_the_triton_backend(monkeypatch):
    """DINO with more crops than the Triton kernels' buckets runs the reference on the Triton
    backend (the interpreter on CPU), equal to the official formula."""
    pytest.importorskip("triton")
    from fastcl import dino_loss, formulas
    from fastcl.kernels import dino as dino_kernels
    from fastcl.ops import cpu_backend

    s = dino_kernels.CONFIGS["student_crops"][-1] + 1
    student = torch.randn(s, 2, 7, dtype=torch.float64).float().requires_grad_()
    teacher, center = torch.randn(2, 2, 7), torch.randn(1, 7)
    launched = []
    monkeypatch.setattr(dino_kernels, "dino_cross_entropy_fwd",
                        lambda *a, **k: launched.append(a))
    with cpu_backend("triton"):
        loss = dino_loss(student, teacher, center)
    assert launched == [] and not dino_kernels.fits(s, 2) and dino_kernels.fits(s - 1, 2)
    truth = formulas.dino_loss(student.detach().double(), teacher.double(), center.double())
    torch.testing.assert_close(loss.double(), truth, atol=1e-6, rtol=1e-6)


def test_compiled_call_reaches_the_cpp_kernel(monkeypatch):
    """torch.compile(fullgraph=True) keeps the op in the graph; at run time the dispatcher still
    sends CPU tensors to the C++ kernel, and the gradient matches eager."""
    import fastcl
    from fastcl import _backend

    spy = _Spy(_backend.cpp_extension())
    monkeypatch.setattr(_backend, "cpp_extension", lambda: spy)
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    torch._dynamo.reset()
    compiled = torch.compile(fastcl.nt_xent, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(z1, z2), z1)
    assert "gram_stats_fwd" in spy.calls and "gram_stats_bwd" in spy.calls
    (expected,) = torch.autograd.grad(fastcl.nt_xent(z1, z2), z1)
    torch.testing.assert_close(grad, expected)
