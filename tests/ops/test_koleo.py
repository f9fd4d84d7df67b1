"""The KoLeo op family on every backend against the float64 formula (fastcl.formulas.koleo, itself
checked against DINOv2's KoLeoLoss retyped below): loss and gradient under a random upstream scalar,
odd shapes, every dtype, duplicate rows and tied neighbours, bad input; the Triton kernels' tiles;
the op's registration (opcheck, torch.compile)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastcl
from fastcl import formulas
from fastcl.ops import koleo as ops
from tests.helpers import max_error

LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(2, 1), (3, 7), (33, 5), (100, 60), (130, 33)]


class DINOv2KoLeoLoss(nn.Module):
    """DINOv2's KoLeoLoss, retyped from facebookresearch/dinov2 dinov2/loss/koleo_loss.py (the
    autocast guard left out: these tests run on CPU)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # Trick to fill diagonal with -1
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])
        return -torch.log(distances + eps).mean()


def loss_and_grad(fn, x, upstream, device="cpu"):
    x = x.detach().to(device).requires_grad_()
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss, grad


def check_against_truth(device, x, dtype=torch.float32):
    """x float64 (B, D), rounded to dtype for both sides."""
    x = x.to(dtype)
    upstream = torch.randn(()).item()
    loss, grad = loss_and_grad(fastcl.koleo, x, upstream, device)
    loss64, grad64 = loss_and_grad(formulas.koleo, x.double(), upstream)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype
    assert max_error(loss, loss64) <= LOSS_TOL[dtype], "loss"
    assert max_error(grad, grad64) <= GRAD_TOL[dtype], "gradient"


# --- the formula is DINOv2's -------------------------------------------------------------------
@pytest.mark.parametrize("b,d", SHAPES + [(64, 384)])
def test_formula_is_dinov2(b, d):
    x = torch.randn(b, d, dtype=torch.float64)
    x[b // 2] = x[0]  # a duplicate: DINOv2's eps inside the distance keeps it finite
    official, ours = loss_and_grad(DINOv2KoLeoLoss(), x, 0.7), loss_and_grad(formulas.koleo, x, 0.7)
    assert max_error(ours[0], official[0]) < 1e-12 and max_error(ours[1], official[1]) < 1e-12
    loss = fastcl.koleo(x.float())
    assert max_error(loss, official[0]) < 1e-5


# --- against the formula -----------------------------------------------------------------------
@pytest.mark.parametrize("b,d", SHAPES)
def test_loss_and_gradient(backend, b, d):
    check_against_truth(backend, torch.randn(b, d, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    if backend == "cpu" and dtype == torch.bfloat16:
        from fastcl._backend import cpu_backend_name

        if cpu_backend_name() == "triton":
            pytest.skip("the Triton interpreter has no bfloat16 dot")
    check_against_truth(backend, torch.randn(70, 40, dtype=torch.float64), dtype)


def test_float64_runs_the_reference(backend):
    x = torch.randn(9, 5, dtype=torch.float64)
    loss, grad = loss_and_grad(fastcl.koleo, x, 1.3, backend)
    loss64, grad64 = loss_and_grad(formulas.koleo, x, 1.3)
    assert loss.dtype == grad.dtype == torch.float64
    assert max_error(loss, loss64) < 1e-12 and max_error(grad, grad64) < 1e-12


def test_scaled_and_non_contiguous(backend):
    """Rows of very different norms (normalization), a strided view, a zero row (norm < eps)."""
    x = torch.randn(40, 2 * 17, dtype=torch.float64)
    x = (x * torch.logspace(-3, 3, 40, dtype=torch.float64)[:, None])[:, ::2]
    x[5] = 0.0
    assert not x.is_contiguous()
    check_against_truth(backend, x)


def test_duplicates_finite(backend):
    """Duplicate rows: loss log(sqrt(D) eps + eps) terms, finite gradient equal to the formula's
    (mutual duplicates cancel, a third copy does not)."""
    x = torch.randn(12, 8, dtype=torch.float64)
    x[3] = x[7] = x[0]  # row 0 ties between 3 and 7, and takes 3; 3 and 7 take 0
    x[9] = x[1]
    check_against_truth(backend, x)
    x[5] = x[2] * 2.0  # the same direction: a duplicate up to the rounding of the normalization
    loss, grad = loss_and_grad(fastcl.koleo, x.float(), 1.0, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    all_same = torch.ones(4, 6)
    loss, grad = loss_and_grad(fastcl.koleo, all_same, 1.0, backend)
    expected = -torch.log(torch.tensor(6.0).sqrt() * 1e-8 + 1e-8)
    assert abs(loss.item() - expected.item()) < 1e-4 * expected.item()
    assert torch.isfinite(grad).all()


def test_ties_lowest_index(backend):
    """Two rows at the same distance from row 0: row 0's neighbour is the lower one, as torch.max
    in DINOv2's code; the gradient is that of the formula with that neighbour."""
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.5]],
                     dtype=torch.float64)
    _, neighbour = ops._koleo(x.float().to(backend), 1e-8)
    assert neighbour[0].item() == 1
    check_against_truth(backend, x)


def test_two_opposite_rows_are_each_others_neighbour(backend):
    """B = 2, x_1 = -x_0: every other score is -1; the neighbour is still the other row (DINOv2's
    -1 on the diagonal would pick the row itself)."""
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    _, neighbour = ops._koleo(x.to(backend), 1e-8)
    assert neighbour.tolist() == [1, 0]
    assert abs(fastcl.koleo(x.to(backend)).item() + torch.log(torch.tensor(2.0)).item()) < 1e-5


def test_nan_input_gives_nan_loss(backend):
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    assert torch.isnan(fastcl.koleo(x.to(backend)))


def test_bad_input():
    with pytest.raises(ValueError, match="B >= 2"):
        fastcl.koleo(torch.randn(1, 4))
    with pytest.raises(ValueError, match="x"):
        fastcl.koleo(torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        fastcl.koleo(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises((TypeError, ValueError), match="eps"):
        fastcl.koleo(torch.randn(4, 3), eps=0.0)


# --- Triton kernels: several row and column tiles, and the backward's CSR ----------------------
def test_triton_tiles_and_backward():
    pytest.importorskip("triton")
    from fastcl.kernels import koleo as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(150, 70, dtype=torch.float64)  # 5 row programs, 3 column tiles, 3 D slices
    x[100] = x[3]
    loss, neighbour = kernels.koleo_fwd(x.float().to(device), 1e-8)
    loss64, neighbour64 = ops.koleo_ref(x.float().double(), 1e-8)
    assert torch.equal(neighbour.cpu(), neighbour64) and max_error(loss, loss64) < 1e-5
    grad = torch.tensor(0.3, device=device)
    dx = kernels.koleo_bwd(x.float().to(device), neighbour, grad, 1e-8)
    dx64 = ops.koleo_backward_ref(x.float().double(), neighbour64, grad.double().cpu(), 1e-8)
    assert max_error(dx, dx64) < 1e-5


# --- op registration ---------------------------------------------------------------------------
def test_backward_formula_matches_autograd():
    x = torch.randn(17, 6, dtype=torch.float64)
    x[4] = x[11]
    _, neighbour = ops.koleo_ref(x, 1e-8)
    closed = ops.koleo_backward_ref(x, neighbour, torch.tensor(-1.7, dtype=torch.float64), 1e-8)
    _, autograd = loss_and_grad(formulas.koleo, x, -1.7)
    assert max_error(closed, autograd) < 1e-12


def test_opcheck():
    x = torch.randn(11, 5)
    torch.library.opcheck(ops._koleo, (x.requires_grad_(), 1e-8))
    _, neighbour = ops._koleo(x.detach(), 1e-8)
    torch.library.opcheck(ops._koleo_backward, (x.detach(), neighbour, torch.tensor(0.5), 1e-8))


def test_compile_fullgraph():
    x = torch.randn(20, 9, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(fastcl.koleo, fullgraph=True, backend="aot_eager")
    eager = fastcl.koleo(x)
    (grad,) = torch.autograd.grad(eager, x)
    out = compiled(x)
    (grad2,) = torch.autograd.grad(out, x)
    assert max_error(out, eager) < 1e-6 and max_error(grad2, grad) < 1e-6
