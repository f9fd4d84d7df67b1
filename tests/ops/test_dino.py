"""The DINO op family on every backend against the official formula in float64: loss and student
gradient under a random upstream scalar, awkward shapes, every dtype, extreme logits, no gradient
into the teacher or the center; the Triton kernels' block/split merging; the op's registration
(opcheck, torch.compile)."""

import pytest
import torch

from fastcl import formulas
from fastcl.losses.dino import dino_loss
from fastcl.ops import dino as ops
from tests.helpers import dino_inputs, max_error

# Error allowed vs the float64 truth, relative to max(|truth|, 1). 16-bit inputs are rounded
# before both computations, so the loss differs by accumulation only; the gradient is rounded to
# the input dtype.
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(2, 2, 1, 1), (3, 2, 3, 7), (10, 2, 5, 300), (4, 1, 2, 1000)]


def loss_and_grad(fn, student, teacher, center, upstream, device, temps):
    """fn's loss on (copies of) the inputs and d(upstream * loss) / d student."""
    student = student.detach().to(device).requires_grad_()
    loss = fn(student, teacher.to(device), center.to(device), *temps)
    (grad,) = torch.autograd.grad(loss * upstream, student)
    return loss, grad


def check_against_truth(device, dtype, student, teacher, center, temps=(0.1, 0.04), loss_tol=None,
                        grad_tol=None):
    upstream = torch.randn(()).item()
    loss, grad = loss_and_grad(dino_loss, student.to(dtype), teacher.to(dtype), center.float(),
                               upstream, device, temps)
    loss64, grad64 = loss_and_grad(formulas.dino_loss, student.to(dtype).double(),
                                   teacher.to(dtype).double(), center.float().double(), upstream,
                                   "cpu", temps)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype
    assert max_error(loss, loss64) <= (loss_tol or LOSS_TOL[dtype]), "loss"
    assert max_error(grad, grad64) <= (grad_tol or GRAD_TOL[dtype]), "student gradient"


# --- against the official formula --------------------------------------------------------------
@pytest.mark.parametrize("s,t,b,k", SHAPES)
def test_loss_and_gradient(backend, s, t, b, k):
    student, teacher, center = dino_inputs(s, t, b, k)
    check_against_truth(backend, torch.float32, student, teacher, center)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    student, teacher, center = dino_inputs(5, 2, 3, 130, dtype=dtype)
    check_against_truth(backend, dtype, student, teacher, center, temps=(0.1, 0.07))


def test_float64_runs_the_reference(backend):
    student, teacher, center = dino_inputs(3, 2, 4, 20)
    loss, grad = loss_and_grad(dino_loss, student, teacher, center, 1.0, backend, (0.1, 0.04))
    loss64, grad64 = loss_and_grad(formulas.dino_loss, student, teacher, center, 1.0, "cpu",
                                   (0.1, 0.04))
    assert loss.dtype == grad.dtype == torch.float64
    assert max_error(loss, loss64) < 1e-12 and max_error(grad, grad64) < 1e-12


def test_long_rows_merge_chunks(backend):
    """K over several of the C++ kernel's chunks (and its K ranges, B being small)."""
    student, teacher, center = dino_inputs(3, 2, 2, 2500)
    check_against_truth(backend, torch.float32, student, teacher, center)


def test_extreme_logits(backend):
    """Logits x100 (teacher exponents up to ~1e4): finite, and no further from the float64 truth
    than PyTorch's official formula computing in fp32 (plus a small floor)."""
    student, teacher, center = dino_inputs(4, 2, 3, 200, scale=300.0)
    upstream = torch.randn(()).item()
    temps = (0.1, 0.04)
    loss, grad = loss_and_grad(dino_loss, student.float(), teacher.float(), center.float(),
                               upstream, backend, temps)
    loss32, grad32 = loss_and_grad(formulas.dino_loss, student.float(), teacher.float(),
                                   center.float(), upstream, "cpu", temps)
    loss64, grad64 = loss_and_grad(formulas.dino_loss, student.float().double(),
                                   teacher.float().double(), center.float().double(), upstream,
                                   "cpu", temps)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert max_error(loss, loss64) <= 2 * max_error(loss32, loss64) + 1e-6
    assert max_error(grad, grad64) <= 2 * max_error(grad32, grad64) + 1e-6


def test_no_gradient_into_teacher_or_center(backend):
    student, teacher, center = dino_inputs(3, 2, 2, 16, dtype=torch.float32)
    student = student.to(backend).requires_grad_()
    teacher = teacher.to(backend).requires_grad_()
    center = center.float().to(backend).requires_grad_()
    loss = dino_loss(student, teacher, center)
    loss.backward()
    assert student.grad is not None
    assert teacher.grad is None and center.grad is None
    assert not ops.dino_cross_entropy(student.detach(), teacher.detach(),
                                      center.detach().reshape(-1), torch.tensor(10.0),
                                      torch.tensor(25.0))[0].requires_grad


def test_non_contiguous_inputs(backend):
    student, teacher, center = dino_inputs(4, 2, 3, 50)
    # (B, S, K) storage viewed as (S, B, K), and a teacher with a strided K axis.
    student = student.transpose(0, 1).contiguous().transpose(0, 1)
    teacher = torch.cat([teacher, teacher], dim=2)[:, :, ::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check_against_truth(backend, torch.float32, student, teacher, center)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_input_gives_nan_loss(backend, where):
    """A NaN in sample 1 makes the loss and sample 1's gradient NaN; sample 0's stays finite."""
    student, teacher, center = dino_inputs(3, 2, 2, 40, dtype=torch.float32)
    (student if where == "student" else teacher)[1, 1, 7] = float("nan")
    student = student.to(backend).requires_grad_()
    loss = dino_loss(student, teacher.to(backend), center.float().to(backend))
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(student.grad[:, 1]).any() and torch.isfinite(student.grad[:, 0]).all()


# --- Triton kernels: block and split merging ---------------------------------------------------
@pytest.mark.parametrize("block_k,split", [(16, 1), (16, 3), (32, 5)])
def test_triton_blocks_and_splits(block_k, split):
    """Several blocks per program and several programs per sample, merged (interpreter on CPU)."""
    pytest.importorskip("triton")
    from fastcl.kernels import dino as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher, center = dino_inputs(5, 3, 2, 150)
    scales = (torch.tensor(10.0, device=device), torch.tensor(1 / 0.07, device=device))
    args = (student.float().to(device), teacher.float().to(device),
            center.float().reshape(-1).to(device), *scales)
    loss, student_stats, teacher_stats = kernels.dino_cross_entropy_fwd(*args, block_k=block_k,
                                                                        split=split)
    scales64 = [x.double() for x in scales]
    truth = ops.dino_cross_entropy_ref(student, teacher, center.reshape(-1), *scales64)
    assert max_error(loss, truth[0]) < 1e-5
    assert max_error(student_stats, truth[1]) < 1e-5
    assert max_error(teacher_stats, truth[2]) < 1e-5
    grad = torch.tensor(0.3, device=device)
    dstudent = kernels.dino_cross_entropy_bwd(*args, student_stats, teacher_stats, grad,
                                              block_k=block_k, split=split)
    dstudent64 = ops.dino_cross_entropy_backward_ref(student, teacher, center.reshape(-1),
                                                     *scales64, *truth[1:], grad.double())
    assert max_error(dstudent, dstudent64) < 1e-5


def test_cpp_gradient_buffer_is_reused_only_when_free():
    """The C++ backward hands the last gradient's memory out again only once nothing refers to it
    (a training loop's zero_grad(set_to_none=True)): a gradient still held, or a view of it, is
    never overwritten by a later backward."""
    from fastcl.ops import cpu_backend

    inputs = [(s, t, c.float()) for s, t, c in
              (dino_inputs(4, 2, 3, 500, dtype=torch.float32) for _ in range(3))]
    truth = [loss_and_grad(formulas.dino_loss, *(x.double() for x in xs), 1.0, "cpu", (0.1, 0.04))[1]
             for xs in inputs]
    with cpu_backend("cpp"):
        grads = [loss_and_grad(dino_loss, *xs, 1.0, "cpu", (0.1, 0.04))[1] for xs in inputs[:2]]
        view = loss_and_grad(dino_loss, *inputs[2], 1.0, "cpu", (0.1, 0.04))[1][1:]
        assert len({g.data_ptr() for g in grads} | {view.data_ptr()}) == 3
        for grad, expected in zip(grads, truth):
            assert max_error(grad, expected) <= GRAD_TOL[torch.float32], "held gradient"
        assert max_error(view, truth[2][1:]) <= GRAD_TOL[torch.float32], "held view"
        address = view.data_ptr() - view.storage_offset() * view.element_size()
        del view
        other = torch.empty(4, 3, 500)  # malloc would hand it the freed block; the op keeps it
        student = torch.nn.Parameter(inputs[0][0].clone())
        optimizer = torch.optim.SGD([student], lr=0.0)
        for _ in range(2):  # a training loop: the gradient storage goes round
            optimizer.zero_grad(set_to_none=True)
            dino_loss(student, *inputs[0][1:]).backward()
            assert student.grad.data_ptr() == address != other.data_ptr()
            assert max_error(student.grad, truth[0]) <= GRAD_TOL[torch.float32], "reused buffer"


# --- op registration ---------------------------------------------------------------------------
def test_backward_formula_matches_autograd():
    """The closed-form backward of the reference vs autograd through the official formula."""
    student, teacher, center = dino_inputs(5, 3, 2, 30)
    scales = (torch.tensor(10.0, dtype=torch.float64), torch.tensor(20.0, dtype=torch.float64))
    _, student_stats, teacher_stats = ops.dino_cross_entropy_ref(student, teacher,
                                                                 center.reshape(-1), *scales)
    grad = torch.tensor(-1.7, dtype=torch.float64)
    closed = ops.dino_cross_entropy_backward_ref(student, teacher, center.reshape(-1), *scales,
                                                 student_stats, teacher_stats, grad)
    _, autograd = loss_and_grad(formulas.dino_loss, student, teacher, center, grad, "cpu",
                                (0.1, 0.05))
    assert max_error(closed, autograd) < 1e-12


def test_opcheck():
    student, teacher, center = dino_inputs(4, 2, 3, 9, dtype=torch.float32)
    scales = (torch.tensor(10.0), torch.tensor(25.0))
    center = center.float().reshape(-1)
    torch.library.opcheck(ops.dino_cross_entropy,
                          (student.requires_grad_(), teacher, center, *scales))
    _, student_stats, teacher_stats = ops.dino_cross_entropy(student.detach(), teacher, center,
                                                             *scales)
    torch.library.opcheck(ops.dino_cross_entropy_backward,
                          (student.detach(), teacher, center, *scales, student_stats,
                           teacher_stats, torch.tensor(0.5)))


def test_compile_fullgraph():
    student, teacher, center = dino_inputs(4, 2, 3, 33, dtype=torch.float32)
    student.requires_grad_()
    center = center.float()
    temp = torch.tensor(0.05)

    def call(x, y, c, t):
        return dino_loss(x, y, c, 0.1, t)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    eager = call(student, teacher, center, temp)
    (grad,) = torch.autograd.grad(eager, student)
    out = compiled(student, teacher, center, temp)
    (grad2,) = torch.autograd.grad(out, student)
    assert max_error(out, eager) < 1e-6 and max_error(grad2, grad) < 1e-6
