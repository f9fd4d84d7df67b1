"""The DINO loss on every backend against the official formula in float64: loss and student gradient
under a random upstream scalar, awkward shapes, every dtype, extreme logits, no gradient into the
teacher or the center; the Triton kernels' block/split merging; the op's registration (opcheck,
torch.compile); DINOLoss's center update and temperature schedule against the official code's
formulas and lightly's; the center all-reduce over 2 gloo processes; bad input."""

import pytest
import torch
import torch.distributed as dist

from conftest import run_on_ranks
from fastcl.losses.dino import (DINOLoss, dino_loss, dino_loss_ref, dino_loss_sinkhorn,
                                teacher_temp_schedule)
from fastcl.ops import dino as ops

# Error allowed vs the float64 truth, relative to max(|truth|, 1). 16-bit inputs are rounded
# before both computations, so the loss differs by accumulation only; the gradient is rounded to
# the input dtype.
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(2, 2, 1, 1), (3, 2, 3, 7), (10, 2, 5, 300), (4, 1, 2, 1000)]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| relative to max(|expected|, 1)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = max(expected.abs().max().item(), 1.0)
    return (actual - expected).abs().max().item() / scale


def make_inputs(s, t, b, k, scale=3.0, dtype=torch.float64):
    """Student / teacher logits and a center, float64 rounded to dtype (so both sides see the
    same numbers)."""
    student = (scale * torch.randn(s, b, k, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(t, b, k, dtype=torch.float64)).to(dtype)
    center = (scale * 0.5 * torch.randn(1, k, dtype=torch.float64))
    return student, teacher, center


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
    loss64, grad64 = loss_and_grad(dino_loss_ref, student.to(dtype).double(),
                                   teacher.to(dtype).double(), center.float().double(), upstream,
                                   "cpu", temps)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype
    assert max_error(loss, loss64) <= (loss_tol or LOSS_TOL[dtype]), "loss"
    assert max_error(grad, grad64) <= (grad_tol or GRAD_TOL[dtype]), "student gradient"


# --- against the official formula --------------------------------------------------------------
@pytest.mark.parametrize("s,t,b,k", SHAPES)
def test_loss_and_gradient(backend, s, t, b, k):
    student, teacher, center = make_inputs(s, t, b, k)
    check_against_truth(backend, torch.float32, student, teacher, center)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    student, teacher, center = make_inputs(5, 2, 3, 130, dtype=dtype)
    check_against_truth(backend, dtype, student, teacher, center, temps=(0.1, 0.07))


def test_float64_runs_the_reference(backend):
    student, teacher, center = make_inputs(3, 2, 4, 20)
    loss, grad = loss_and_grad(dino_loss, student, teacher, center, 1.0, backend, (0.1, 0.04))
    loss64, grad64 = loss_and_grad(dino_loss_ref, student, teacher, center, 1.0, "cpu", (0.1, 0.04))
    assert loss.dtype == grad.dtype == torch.float64
    assert max_error(loss, loss64) < 1e-12 and max_error(grad, grad64) < 1e-12


def test_long_rows_merge_chunks(backend):
    """K over several of the C++ kernel's chunks (and its K ranges, B being small)."""
    student, teacher, center = make_inputs(3, 2, 2, 2500)
    check_against_truth(backend, torch.float32, student, teacher, center)


def test_extreme_logits(backend):
    """Logits x100 (teacher exponents up to ~1e4): finite, and no further from the float64 truth
    than PyTorch's official formula computing in fp32 (plus a small floor)."""
    student, teacher, center = make_inputs(4, 2, 3, 200, scale=300.0)
    upstream = torch.randn(()).item()
    temps = (0.1, 0.04)
    loss, grad = loss_and_grad(dino_loss, student.float(), teacher.float(), center.float(),
                               upstream, backend, temps)
    loss32, grad32 = loss_and_grad(dino_loss_ref, student.float(), teacher.float(),
                                   center.float(), upstream, "cpu", temps)
    loss64, grad64 = loss_and_grad(dino_loss_ref, student.float().double(),
                                   teacher.float().double(), center.float().double(), upstream,
                                   "cpu", temps)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert max_error(loss, loss64) <= 2 * max_error(loss32, loss64) + 1e-6
    assert max_error(grad, grad64) <= 2 * max_error(grad32, grad64) + 1e-6


def test_no_gradient_into_teacher_or_center(backend):
    student, teacher, center = make_inputs(3, 2, 2, 16, dtype=torch.float32)
    student = student.to(backend).requires_grad_()
    teacher = teacher.to(backend).requires_grad_()
    center = center.float().to(backend).requires_grad_()
    loss = dino_loss(student, teacher, center)
    loss.backward()
    assert student.grad is not None
    assert teacher.grad is None and center.grad is None
    assert not ops.dino_loss(student.detach(), teacher.detach(), center.detach().reshape(-1),
                             torch.tensor(10.0), torch.tensor(25.0))[0].requires_grad


def test_non_contiguous_inputs(backend):
    student, teacher, center = make_inputs(4, 2, 3, 50)
    # (B, S, K) storage viewed as (S, B, K), and a teacher with a strided K axis.
    student = student.transpose(0, 1).contiguous().transpose(0, 1)
    teacher = torch.cat([teacher, teacher], dim=2)[:, :, ::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check_against_truth(backend, torch.float32, student, teacher, center)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_input_gives_nan_loss(backend, where):
    """A NaN in sample 1 makes the loss and sample 1's gradient NaN; sample 0's stays finite."""
    student, teacher, center = make_inputs(3, 2, 2, 40, dtype=torch.float32)
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
    student, teacher, center = make_inputs(5, 3, 2, 150)
    scales = (torch.tensor(10.0, device=device), torch.tensor(1 / 0.07, device=device))
    args = (student.float().to(device), teacher.float().to(device),
            center.float().reshape(-1).to(device), *scales)
    loss, student_stats, teacher_stats = kernels.dino_loss_fwd(*args, block_k=block_k, split=split)
    scales64 = [x.double() for x in scales]
    truth = ops.dino_loss_fwd_ref(student, teacher, center.reshape(-1), *scales64)
    assert max_error(loss, truth[0]) < 1e-5
    assert max_error(student_stats, truth[1]) < 1e-5
    assert max_error(teacher_stats, truth[2]) < 1e-5
    grad = torch.tensor(0.3, device=device)
    dstudent = kernels.dino_loss_bwd(*args, student_stats, teacher_stats, grad, block_k=block_k,
                                     split=split)
    dstudent64 = ops.dino_loss_bwd_ref(student, teacher, center.reshape(-1), *scales64,
                                       *truth[1:], grad.double())
    assert max_error(dstudent, dstudent64) < 1e-5


def test_cpp_gradient_buffer_is_reused_only_when_free():
    """The C++ backward hands the last gradient's memory out again only once nothing refers to it
    (a training loop's zero_grad(set_to_none=True)): a gradient still held, or a view of it, is
    never overwritten by a later backward."""
    from fastcl.ops import cpu_backend

    inputs = [(s, t, c.float()) for s, t, c in
              (make_inputs(4, 2, 3, 500, dtype=torch.float32) for _ in range(3))]
    truth = [loss_and_grad(dino_loss_ref, *(x.double() for x in xs), 1.0, "cpu", (0.1, 0.04))[1]
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
    student, teacher, center = make_inputs(5, 3, 2, 30)
    scales = (torch.tensor(10.0, dtype=torch.float64), torch.tensor(20.0, dtype=torch.float64))
    _, student_stats, teacher_stats = ops.dino_loss_fwd_ref(student, teacher, center.reshape(-1),
                                                            *scales)
    grad = torch.tensor(-1.7, dtype=torch.float64)
    closed = ops.dino_loss_bwd_ref(student, teacher, center.reshape(-1), *scales, student_stats,
                                   teacher_stats, grad)
    _, autograd = loss_and_grad(dino_loss_ref, student, teacher, center, grad, "cpu", (0.1, 0.05))
    assert max_error(closed, autograd) < 1e-12


def test_opcheck():
    student, teacher, center = make_inputs(4, 2, 3, 9, dtype=torch.float32)
    scales = (torch.tensor(10.0), torch.tensor(25.0))
    center = center.float().reshape(-1)
    torch.library.opcheck(ops.dino_loss, (student.requires_grad_(), teacher, center, *scales))
    _, student_stats, teacher_stats = ops.dino_loss(student.detach(), teacher, center, *scales)
    torch.library.opcheck(ops.dino_loss_backward, (student.detach(), teacher, center, *scales,
                                                   student_stats, teacher_stats,
                                                   torch.tensor(0.5)))


def test_compile_fullgraph():
    student, teacher, center = make_inputs(4, 2, 3, 33, dtype=torch.float32)
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


# --- DINOLoss ----------------------------------------------------------------------------------
def test_teacher_temperature_schedule():
    """The official schedule: np.linspace(0.04, 0.07, 30) then 0.07 constant."""
    loss_fn = DINOLoss(8, teacher_temp=0.07, warmup_teacher_temp=0.04,
                       warmup_teacher_temp_epochs=30, num_epochs=100)
    official = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(official) == 100
    assert [loss_fn.teacher_temperature(e) for e in range(100)] == official.tolist()
    assert loss_fn.teacher_temperature(0) == 0.04 and loss_fn.teacher_temperature(29) == 0.07
    assert loss_fn.teacher_temperature(15) == pytest.approx(0.04 + 0.03 * 15 / 29, abs=1e-15)
    assert loss_fn.teacher_temperature(None) == 0.07
    with pytest.raises(ValueError, match="num_epochs"):
        loss_fn.teacher_temperature(100)
    assert DINOLoss(8, teacher_temp=0.06).teacher_temperature(500) == 0.06  # no warm-up


def test_module_matches_official_across_steps():
    """Three steps in the warm-up: each loss is the official formula with the schedule's
    temperature and the center before the step; the center follows the official EMA."""
    s, t, b, k = 4, 2, 3, 24
    loss_fn = DINOLoss(k, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                       warmup_teacher_temp_epochs=5, num_epochs=10, center_momentum=0.8)
    center = torch.zeros(1, k, dtype=torch.float64)
    for epoch in range(3):
        student, teacher, _ = make_inputs(s, t, b, k)
        student.requires_grad_()
        loss = loss_fn(student.float(), teacher.float(), epoch)
        temp = teacher_temp_schedule(0.04, 0.07, 5, 10)[epoch]
        expected = dino_loss_ref(student.float().double(), teacher.float().double(), center, 0.1,
                                 temp)
        assert max_error(loss, expected) < 1e-5
        batch_center = teacher.float().double().reshape(-1, k).sum(0, keepdim=True) / (t * b)
        center = center * 0.8 + batch_center * (1 - 0.8)
        assert max_error(loss_fn.center, center) < 1e-6


def test_module_float64_is_float64_exact():
    """A float64 module on float64 crops: losses and the center within 1e-12 of the official
    formula and EMA in float64 (the temperatures are not rounded to float32 on the way)."""
    s, t, b, k = 4, 2, 3, 24
    loss_fn = DINOLoss(k, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                       warmup_teacher_temp_epochs=5, num_epochs=10, center_momentum=0.8).double()
    center = torch.zeros(1, k, dtype=torch.float64)
    for epoch in range(3):
        student, teacher, _ = make_inputs(s, t, b, k)
        loss = loss_fn(student, teacher, epoch)
        temp = teacher_temp_schedule(0.04, 0.07, 5, 10)[epoch].item()
        assert max_error(loss, dino_loss_ref(student, teacher, center, 0.1, temp)) < 1e-12
        center = center * 0.8 + teacher.reshape(-1, k).mean(0, keepdim=True) * (1 - 0.8)
        assert max_error(loss_fn.center, center) < 1e-12


def test_equals_lightly_dino_formula():
    """lightly's DINOLoss: one einsum over (t, b, d) x (s, b, d), diagonal zeroed."""
    student, teacher, center = make_inputs(6, 2, 5, 40)
    t_out = torch.softmax((teacher - center) / 0.04, dim=-1)
    s_out = torch.log_softmax(student / 0.1, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    theirs = loss.sum() / (n_terms * student.shape[1])
    assert max_error(dino_loss(student.float(), teacher.float(), center.float()), theirs) < 1e-5


def test_module_compiles():
    loss_fn = DINOLoss(16, warmup_teacher_temp_epochs=3, teacher_temp=0.07)
    student, teacher, _ = make_inputs(3, 2, 2, 16, dtype=torch.float32)
    eager_fn = DINOLoss(16, warmup_teacher_temp_epochs=3, teacher_temp=0.07)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        assert max_error(compiled(student, teacher, 1), eager_fn(student, teacher, 1)) < 1e-6
    assert max_error(loss_fn.center, eager_fn.center) < 1e-7


# --- distributed: the center is all-reduced ----------------------------------------------------
WORLD = 2


def _worker(rank, results, students, teachers):
    loss_fn = DINOLoss(teachers.shape[-1], center_momentum=0.7)
    losses = [loss_fn(students[step, rank], teachers[step, rank]) for step in range(2)]
    results[rank] = (torch.stack(losses).detach(), loss_fn.center.clone())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_center_all_reduce():
    """Each rank's center after two steps is the EMA of the teacher mean over both ranks' rows;
    the second step's loss already uses that shared center."""
    steps, s, t, b, k = 2, 3, 2, 2, 12
    students = torch.randn(steps, WORLD, s, b, k)
    teachers = torch.randn(steps, WORLD, t, b, k)
    results = run_on_ranks(_worker, students, teachers, world=WORLD)

    center = torch.zeros(1, k, dtype=torch.float64)
    for step in range(steps):
        for rank in range(WORLD):
            expected = dino_loss_ref(students[step, rank].double(), teachers[step, rank].double(),
                                     center)
            assert max_error(results[rank][0][step], expected) < 1e-5
        rows = teachers[step].double().reshape(-1, k)  # both ranks' T * B rows
        center = center * 0.7 + rows.mean(0, keepdim=True) * (1 - 0.7)
    for rank in range(WORLD):
        assert max_error(results[rank][1], center) < 1e-6


# --- Sinkhorn-Knopp centering (DINOv2) ---------------------------------------------------------
def sinkhorn_centered_truth(student, teacher, student_temp, teacher_temp, iterations):
    """DINOv2's sinkhorn_knopp_teacher over all T * B teacher rows, then DINO's cross-entropy
    averaged over the (t, s != t) pairs, written out in float64."""
    t, b, k = teacher.shape
    q = torch.exp(teacher.double().reshape(t * b, k) / teacher_temp).t()  # (K, T * B)
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / (t * b)
    codes = (q * t * b).t().reshape(t, b, k)
    log_q = torch.log_softmax(student.double() / student_temp, dim=-1)
    pairs = [(i, j) for i in range(t) for j in range(student.shape[0]) if i != j]
    return sum(-(codes[i] * log_q[j]).sum(-1).mean() for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("s,t,b,k,iterations", [(2, 2, 3, 5, 3), (5, 2, 4, 33, 1),
                                                (3, 1, 6, 17, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_centering_matches_formula(s, t, b, k, iterations, dtype):
    student, teacher, _ = make_inputs(s, t, b, k, scale=0.3)
    student, teacher = student.to(dtype).requires_grad_(), teacher.to(dtype)
    upstream = torch.randn(()).item()
    loss = dino_loss_sinkhorn(student, teacher, 0.2, 0.05, iterations)
    (grad,) = torch.autograd.grad(loss * upstream, student)
    truth_student = student.detach().double().requires_grad_()
    truth = sinkhorn_centered_truth(truth_student, teacher, 0.2, 0.05, iterations)
    (truth_grad,) = torch.autograd.grad(truth * upstream, truth_student)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert max_error(loss, truth) < tol and max_error(grad, truth_grad) < tol
    assert grad.dtype == dtype


def test_sinkhorn_centering_16_bit_student():
    student, teacher, _ = make_inputs(4, 2, 3, 20, scale=0.3, dtype=torch.bfloat16)
    student.requires_grad_()
    loss = dino_loss_sinkhorn(student, teacher, 0.1, 0.04)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert max_error(loss, sinkhorn_centered_truth(student.detach(), teacher, 0.1, 0.04, 3)) < 1e-5


def test_sinkhorn_centering_compiles():
    student, teacher, _ = make_inputs(3, 2, 4, 16, scale=0.3, dtype=torch.float32)
    student.requires_grad_()
    call = lambda s, t: dino_loss_sinkhorn(s, t, 0.1, 0.05)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    eager, out = call(student, teacher), compiled(student, teacher)
    (grad,) = torch.autograd.grad(eager, student)
    (grad2,) = torch.autograd.grad(out, student)
    assert max_error(out, eager) < 1e-6 and max_error(grad2, grad) < 1e-6


def test_module_sinkhorn_centering_uses_the_schedule_and_no_center():
    """DINOLoss(centering="sinkhorn"): epsilon follows the teacher-temperature warm-up; the
    center buffer stays untouched."""
    loss_fn = DINOLoss(24, student_temp=0.2, teacher_temp=0.07, warmup_teacher_temp=0.04,
                       warmup_teacher_temp_epochs=4, centering="sinkhorn", sinkhorn_iterations=2)
    for epoch in (0, 2, 7):
        student, teacher, _ = make_inputs(3, 2, 4, 24, scale=0.3)
        loss = loss_fn(student.float(), teacher.float(), epoch)
        truth = sinkhorn_centered_truth(student.float(), teacher.float(), 0.2,
                                        loss_fn.teacher_temperature(epoch), 2)
        assert max_error(loss, truth) < 1e-5
    assert torch.equal(loss_fn.center, torch.zeros(1, 24))


# --- bad input ---------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: dino_loss(_x(4, 3), _x(2, 3, 5), _x(5)), ValueError, "student"),
    (lambda: dino_loss(_x(4, 3, 5), _x(3, 5), _x(5)), ValueError, "teacher"),
    (lambda: dino_loss(_x(2, 3, 5), _x(3, 3, 5), _x(5)), ValueError, "T <= S"),
    (lambda: dino_loss(_x(1, 3, 5), _x(1, 3, 5), _x(5)), ValueError, "S >= 2"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 2, 5), _x(5)), ValueError, "B = 3"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 6), _x(5)), ValueError, "K = 5"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(6)), ValueError, "center"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(2, 5)), ValueError, "center"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), [0.0] * 5), TypeError, "center"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), torch.zeros(5, dtype=torch.long)), TypeError,
     "center"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5), 0.0), ValueError, "student_temp"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5), -0.1), ValueError, "student_temp"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5), 0.1, float("inf")), ValueError,
     "teacher_temp"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5), 0.1, float("nan")), ValueError,
     "teacher_temp"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5), 0.1, torch.tensor(-1.0)), ValueError,
     "teacher_temp"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5), "warm"), TypeError, "student_temp"),
    (lambda: dino_loss(torch.ones(4, 3, 5, dtype=torch.long), _x(2, 3, 5), _x(5)), TypeError,
     "student"),
    (lambda: dino_loss(_x(4, 3, 5), torch.ones(2, 3, 5, dtype=torch.int32), _x(5)), TypeError,
     "teacher"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5, dtype=torch.float16), _x(5)), TypeError, "dtype"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5, device="meta"), _x(5)), ValueError, "device"),
    (lambda: dino_loss(_x(4, 3, 5), _x(2, 3, 5), _x(5, device="meta")), ValueError, "center on"),
    (lambda: dino_loss(_x(4, 0, 5), _x(2, 0, 5), _x(5)), ValueError, "empty"),
    (lambda: DINOLoss(0), ValueError, "out_dim"),
    (lambda: DINOLoss(8, student_temp=0.0), ValueError, "student_temp"),
    (lambda: DINOLoss(8, warmup_teacher_temp_epochs=-1), ValueError, "warmup_teacher_temp_epochs"),
    (lambda: DINOLoss(8, warmup_teacher_temp_epochs=30, num_epochs=10), ValueError, "num_epochs"),
    (lambda: DINOLoss(8, center_momentum=1.5), ValueError, "center_momentum"),
    (lambda: DINOLoss(8)(_x(3, 2, 8), _x(2, 2, 8), epoch=-1), ValueError, "epoch"),
    (lambda: DINOLoss(8, centering="mean"), ValueError, "centering"),
    (lambda: DINOLoss(8, sinkhorn_iterations=0), ValueError, "sinkhorn_iterations"),
    (lambda: dino_loss_sinkhorn(_x(3, 2, 8), _x(2, 2, 8), 0.1, torch.tensor(0.04)), TypeError,
     "teacher_temp"),
    (lambda: dino_loss_sinkhorn(_x(3, 2, 8), _x(2, 2, 8), 0.1, 0.0), ValueError, "epsilon"),
    (lambda: dino_loss_sinkhorn(_x(3, 2, 8), _x(2, 3, 8)), ValueError, "B = 2"),
])
def test_bad_input_is_named(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
