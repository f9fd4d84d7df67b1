"""fastcl::sigmoid_pairs on every backend against the float64 reference: row losses and the
gradients of x, y, scale and bias under a random upstream gradient, with the positive diagonal
inside, at the edge of and outside the block; the backward op alone; tiny losses and huge logits.
fastcl::sigmoid_pairs_sum (gradients from the forward's pass, normalization inside) against the
float64 autograd of F.normalize and the reference."""
import pytest
import torch

from fastcl.ops.siglip import (
    sigmoid_pairs,
    sigmoid_pairs_backward,
    sigmoid_pairs_backward_ref,
    sigmoid_pairs_ref,
    sigmoid_pairs_sum,
)
from tests.helpers import assert_close, unit_rows

# Relative to max(|expected|, 1): fp32 kernels against the float64 truth on the same inputs.
TOL = 2e-5


def _skip_interpreter_bf16(backend, dtype):
    from fastcl._backend import cpu_backend_name

    if backend == "cpu" and dtype == torch.bfloat16 and cpu_backend_name() == "triton":
        pytest.skip("the Triton interpreter has no bfloat16 dot")


def run_and_grad(fn, x, y, scale, bias, upstream):
    """fn(x, y, scale, bias) and the gradients of <upstream, output> w.r.t. all four."""
    inputs = [t.detach().requires_grad_() for t in (x, y, scale, bias)]
    out = fn(*inputs)
    return out, torch.autograd.grad((out * upstream).sum(), inputs)


def check_against_float64(backend, x, y, scale, bias, offset, tol_loss=TOL, tol_grad=TOL):
    m = x.shape[0]
    upstream = torch.randn(m, dtype=torch.float64, device=backend)
    scale = torch.tensor(float(scale), device=backend)
    bias = torch.tensor(float(bias), device=backend)

    def fused(x, y, s, b):
        return sigmoid_pairs(x, y, s, b, offset)

    def reference(x, y, s, b):
        return sigmoid_pairs_ref(x, y, s, b, offset)

    loss, grads = run_and_grad(fused, x, y, scale, bias, upstream.float())
    loss64, grads64 = run_and_grad(reference, x.double(), y.double(), scale.double(),
                                   bias.double(), upstream)
    assert loss.dtype == torch.float32 and loss.shape == (m,)
    assert grads[0].dtype == x.dtype and grads[1].dtype == y.dtype
    assert grads[2].dtype == grads[3].dtype == torch.float32
    assert_close(loss, loss64, tol_loss, "row_loss")
    for name, a, b in zip(["dx", "dy", "dscale", "dbias"], grads, grads64):
        assert_close(a, b, tol_grad, name)
    return loss, loss64


@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (3, 5, 60), (127, 70, 257), (300, 1100, 16)])
@pytest.mark.parametrize("offset", [0, 2, -1, 1000, -1000])
def test_sigmoid_pairs(backend, m, n, d, offset):
    if backend == "cpu" and m * n > 20000:
        from fastcl._backend import cpu_backend_name

        if cpu_backend_name() == "triton":
            pytest.skip("the interpreter is slow: the large shapes run on the C++ and reference")
    x, y = unit_rows(m, d, backend), unit_rows(n, d, backend)
    check_against_float64(backend, x, y, 10.0, -10.0, offset)


@pytest.mark.parametrize("scale,bias,norm", [(1.0, 0.0, 1.0), (100.0, -10.0, 1.0),
                                             (3.0, 2.0, 5.0), (1e4, 50.0, 1.0)])
def test_scales_and_huge_logits(backend, scale, bias, norm):
    """SigLIP's start (10, -10), its trained regime (100, -10), raw rows and logits ~1e4 whose
    exp overflows fp32: every loss and gradient finite and exact."""
    x, y = unit_rows(40, 24, backend, norm=norm), unit_rows(33, 24, backend, norm=norm)
    loss, _ = check_against_float64(backend, x, y, scale, bias, 0)
    assert torch.isfinite(loss).all()


def test_small_losses_are_exact(backend):
    """The trained regime: near-duplicate positives (cosine ~1, t ~ 70) and orthogonal negatives
    (t = -30) at scale 100, bias -30: pair losses of 1e-31 and 1e-13, row losses ~3e-12, where
    -log(sigmoid(t)) in fp32 rounds to 0. Losses and gradients keep their relative precision."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    x64 = q[:32]  # orthonormal rows
    y64 = torch.nn.functional.normalize(x64 + 1e-3 * torch.randn(32, 64, dtype=torch.float64),
                                        dim=1)
    x, y = x64.float().to(backend), y64.float().to(backend)
    upstream = torch.rand(32, device=backend) + 0.5
    scale, bias = torch.tensor(100.0, device=backend), torch.tensor(-30.0, device=backend)
    loss, grads = run_and_grad(lambda *a: sigmoid_pairs(*a, 0), x, y, scale, bias, upstream)
    loss64, grads64 = run_and_grad(lambda *a: sigmoid_pairs_ref(*a, 0), x.double(), y.double(),
                                   scale.double(), bias.double(), upstream.double())
    assert loss64.max() < 1e-10 and (loss64 > 0).all()
    assert ((loss.double() - loss64).abs() / loss64).max() < 1e-5
    for name, a, b in zip(["dx", "dy", "dscale", "dbias"], grads, grads64):
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 1e-5, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(backend, dtype):
    _skip_interpreter_bf16(backend, dtype)
    x, y = unit_rows(70, 33, backend, dtype), unit_rows(50, 33, backend, dtype)
    # 16-bit inputs are rounded already; only the accumulation and the gradients' rounding differ.
    check_against_float64(backend, x, y, 10.0, -10.0, 0, tol_loss=2e-5, tol_grad=1e-2)


def test_backward_op_matches_reference(backend):
    """The backward op alone, as a ring exchange calls it on a travelling block."""
    x, y = unit_rows(45, 20, backend), unit_rows(61, 20, backend)
    scale, bias = torch.tensor(7.0, device=backend), torch.tensor(-4.0, device=backend)
    grad = torch.randn(45, device=backend)
    for offset in (0, 16, -44, 61):
        got = sigmoid_pairs_backward(x, y, scale, bias, offset, grad)
        want = sigmoid_pairs_backward_ref(x.double(), y.double(), scale.double(), bias.double(),
                                          offset, grad.double())
        for name, a, b in zip(["dx", "dy", "dscale", "dbias"], got, want):
            assert a.dtype == torch.float32
            assert_close(a, b, TOL, name)


def test_blocks_add_up(backend):
    """The loss of (x, [y_0; y_1]) is that of (x, y_0) plus that of (x, y_1) with the diagonal
    offset moved by the block's start: what a ring exchange relies on."""
    x, y = unit_rows(30, 16, backend), unit_rows(50, 16, backend)
    scale, bias = torch.tensor(10.0, device=backend), torch.tensor(-5.0, device=backend)
    whole = sigmoid_pairs(x, y, scale, bias, 20)
    parts = sigmoid_pairs(x, y[:20], scale, bias, 20) + sigmoid_pairs(x, y[20:], scale, bias, 0)
    assert_close(parts, whole, 1e-6, "blocks")


def test_strided_inputs(backend):
    x = unit_rows(40, 64, backend)[:, ::2]
    y = unit_rows(20, 32, backend).T.contiguous().T  # column-major
    check_against_float64(backend, x, y, 10.0, -10.0, 1)


def test_nan_propagates(backend):
    x, y = unit_rows(20, 8, backend), unit_rows(20, 8, backend)
    x[3, 2] = float("nan")
    loss = sigmoid_pairs(x, y, torch.tensor(2.0, device=backend),
                         torch.tensor(0.0, device=backend), 0)
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(20) != 3]).all()


def test_opcheck():
    x, y = unit_rows(7, 5, "cpu").requires_grad_(), unit_rows(11, 5, "cpu").requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    for offset in (0, 4, 100):
        torch.library.opcheck(sigmoid_pairs, (x, y, scale, bias, offset))
    torch.library.opcheck(sigmoid_pairs_backward, (x.detach(), y.detach(), scale.detach(),
                                                   bias.detach(), 2, torch.randn(7)))


def test_compile_fullgraph():
    x, y = unit_rows(9, 6, "cpu").requires_grad_(), unit_rows(9, 6, "cpu").requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)

    def loss_fn(x, y, scale, bias):
        return sigmoid_pairs(x, y, scale, bias, 0).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, y, scale, bias), [x, y, scale, bias])
    want = torch.autograd.grad(loss_fn(x, y, scale, bias), [x, y, scale, bias])
    for a, b in zip(got, want):
        assert_close(a, b, 1e-6, "compiled gradient")


# ----------------------------------------------------------------------------------------------
# fastcl::sigmoid_pairs_sum
# ----------------------------------------------------------------------------------------------
def _sum_formula(x, y, scale, bias, offset, normalize):
    if normalize:
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return sigmoid_pairs_ref(x, y, scale, bias, offset).sum()


def check_sum(backend, x, y, scale, bias, offset, normalize, tol=TOL):
    """sigmoid_pairs_sum's loss and gradients under a random upstream scalar against the float64
    autograd of the formula (F.normalize included)."""
    upstream = float(torch.randn(()))
    scalars = [torch.tensor(float(v), device=backend) for v in (scale, bias)]
    inputs = [t.detach().requires_grad_() for t in [x, y, *scalars]]
    out = sigmoid_pairs_sum(*inputs, offset, normalize)
    loss = out[0]
    assert not any(t.requires_grad for t in out[1:])
    grads = torch.autograd.grad(loss * upstream, inputs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    loss64 = _sum_formula(*inputs64, offset, normalize)
    grads64 = torch.autograd.grad(loss64 * upstream, inputs64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss64, tol, "loss")
    for name, a, b, t in zip(["dx", "dy", "dscale", "dbias"], grads, grads64, inputs):
        assert a.dtype == t.dtype
        assert_close(a, b, tol if t.dtype == torch.float32 else 1e-2, name)


@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (3, 5, 60), (127, 70, 257), (600, 1100, 16)])
@pytest.mark.parametrize("offset", [0, 2, -1, 1000])
@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_pairs_sum(backend, m, n, d, offset, normalize):
    if backend == "cpu" and m * n > 20000:
        from fastcl._backend import cpu_backend_name

        if cpu_backend_name() == "triton":
            pytest.skip("the interpreter is slow: the large shapes run on the C++ and reference")
    # Raw rows of norms 0.1 to 3 (normalize) or unit rows (the logits of SigLIP's start).
    x = torch.randn(m, d, device=backend) * (torch.rand(m, 1, device=backend) * 3 + 0.1)
    y = torch.randn(n, d, device=backend) * (torch.rand(n, 1, device=backend) * 3 + 0.1)
    if not normalize:
        x, y = unit_rows(m, d, backend), unit_rows(n, d, backend)
    check_sum(backend, x, y, 10.0, -10.0, offset, normalize)


@pytest.mark.parametrize("scale,bias", [(100.0, -10.0), (1e4, 50.0)])
def test_sum_scales_and_huge_logits(backend, scale, bias):
    x, y = torch.randn(40, 24, device=backend), torch.randn(33, 24, device=backend)
    y[:10] = x[:10] + 1e-3 * torch.randn(10, 24, device=backend)  # near-duplicate positives
    check_sum(backend, x, y, scale, bias, 0, True)


def test_sum_zero_row(backend):
    """A zero row is clamped at F.normalize's eps: scaled, no projection, as F.normalize."""
    x, y = torch.randn(12, 8, device=backend), torch.randn(12, 8, device=backend)
    x[4] = 0
    check_sum(backend, x, y, 10.0, -10.0, 0, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sum_half_inputs(backend, dtype):
    _skip_interpreter_bf16(backend, dtype)
    x, y = torch.randn(70, 33, device=backend), torch.randn(50, 33, device=backend)
    check_sum(backend, x.to(dtype), y.to(dtype), 10.0, -10.0, 0, True, tol=1e-3)


def test_sum_half_inputs_normalized_in_fp32(backend):
    """16-bit rows are normalized in fp32 and never rounded again: the scale's gradient, a sum of
    N^2 terms W_ij <x_i, y_j> that largely cancel, stays within fp32 accumulation error of the
    float64 formula on the same 16-bit rows (rounding the normalized rows to fp16 makes it 1e-4
    of the terms' magnitude)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = (torch.randn(40, 16, generator=gen).half().to(backend) for _ in range(2))
        scale = torch.tensor(10.0, device=backend, requires_grad=True)
        bias = torch.tensor(-10.0, device=backend, requires_grad=True)
        dscale, = torch.autograd.grad(sigmoid_pairs_sum(x, y, scale, bias, 0, True)[0], scale)
        x64, y64 = (torch.nn.functional.normalize(t.double(), dim=1) for t in (x, y))
        s = x64 @ y64.T
        t = (s * 10.0 - 10.0).requires_grad_()
        z = 2 * torch.eye(40, dtype=torch.float64, device=backend) - 1
        dt, = torch.autograd.grad(torch.nn.functional.softplus(-z * t).sum(), t)
        terms = dt * s  # d loss / d scale = sum of the terms
        assert abs(float(dscale) - float(terms.sum())) <= 1e-5 * float(terms.abs().sum())


def test_sum_matches_two_passes(backend):
    """The one-pass op and sigmoid_pairs' forward + backward agree (same fp32 kernels' sums)."""
    x, y = unit_rows(50, 20, backend), unit_rows(61, 20, backend)
    scale, bias = torch.tensor(7.0, device=backend), torch.tensor(-4.0, device=backend)
    loss, *grads = sigmoid_pairs_sum(x, y, scale, bias, 3, False)
    ones = torch.ones(50, device=backend)
    assert_close(loss, sigmoid_pairs(x, y, scale, bias, 3).sum(), 1e-6, "loss")
    for name, a, b in zip(["dx", "dy", "dscale", "dbias"], grads,
                          sigmoid_pairs_backward(x, y, scale, bias, 3, ones)):
        assert_close(a, b, 1e-6, name)


def test_sum_opcheck():
    x = torch.randn(7, 5, requires_grad=True)
    y = torch.randn(11, 5, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    for offset, normalize in [(0, True), (4, False), (100, True)]:
        torch.library.opcheck(sigmoid_pairs_sum, (x, y, scale, bias, offset, normalize))


def test_sum_compile_fullgraph():
    x, y = torch.randn(9, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    scale = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)

    def loss_fn(x, y, scale, bias):
        return sigmoid_pairs_sum(x, y, scale, bias, 0, True)[0] / 9

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, y, scale, bias), [x, y, scale, bias])
    want = torch.autograd.grad(loss_fn(x, y, scale, bias), [x, y, scale, bias])
    for a, b in zip(got, want):
        assert_close(a, b, 1e-6, "compiled gradient")
