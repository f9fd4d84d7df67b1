"""DINOLoss and dino_loss_sinkhorn: the center update and temperature schedule against the official
code's formulas and lightly's; the center all-reduce over 2 gloo processes; Sinkhorn-Knopp
centering (DINOv2) against its formula; bad input named."""

import pytest
import torch
import torch.distributed as dist

from fastcl import formulas
from fastcl.losses.dino import DINOLoss, dino_loss, dino_loss_sinkhorn, teacher_temp_schedule
from tests.helpers import dino_inputs, max_error, run_on_ranks


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
        student, teacher, _ = dino_inputs(s, t, b, k)
        student.requires_grad_()
        loss = loss_fn(student.float(), teacher.float(), epoch)
        temp = teacher_temp_schedule(0.04, 0.07, 5, 10)[epoch]
        expected = formulas.dino_loss(student.float().double(), teacher.float().double(), center,
                                      0.1, temp)
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
        student, teacher, _ = dino_inputs(s, t, b, k)
        loss = loss_fn(student, teacher, epoch)
        temp = teacher_temp_schedule(0.04, 0.07, 5, 10)[epoch].item()
        assert max_error(loss, formulas.dino_loss(student, teacher, center, 0.1, temp)) < 1e-12
        center = center * 0.8 + teacher.reshape(-1, k).mean(0, keepdim=True) * (1 - 0.8)
        assert max_error(loss_fn.center, center) < 1e-12


def test_equals_lightly_dino_formula():
    """lightly's DINOLoss: one einsum over (t, b, d) x (s, b, d), diagonal zeroed."""
    student, teacher, center = dino_inputs(6, 2, 5, 40)
    t_out = torch.softmax((teacher - center) / 0.04, dim=-1)
    s_out = torch.log_softmax(student / 0.1, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    theirs = loss.sum() / (n_terms * student.shape[1])
    assert max_error(dino_loss(student.float(), teacher.float(), center.float()), theirs) < 1e-5


def test_module_compiles():
    loss_fn = DINOLoss(16, warmup_teacher_temp_epochs=3, teacher_temp=0.07)
    student, teacher, _ = dino_inputs(3, 2, 2, 16, dtype=torch.float32)
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
            expected = formulas.dino_loss(students[step, rank].double(),
                                          teachers[step, rank].double(), center)
            assert max_error(results[rank][0][step], expected) < 1e-5
        rows = teachers[step].double().reshape(-1, k)  # both ranks' T * B rows
        center = center * 0.7 + rows.mean(0, keepdim=True) * (1 - 0.7)
    for rank in range(WORLD):
        assert max_error(results[rank][1], center) < 1e-6


# --- Sinkhorn-Knopp centering (DINOv2) ---------------------------------------------------------
@pytest.mark.parametrize("s,t,b,k,iterations", [(2, 2, 3, 5, 3), (5, 2, 4, 33, 1),
                                                (3, 1, 6, 17, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_centering_matches_formula(s, t, b, k, iterations, dtype):
    student, teacher, _ = dino_inputs(s, t, b, k, scale=0.3)
    student, teacher = student.to(dtype).requires_grad_(), teacher.to(dtype)
    upstream = torch.randn(()).item()
    loss = dino_loss_sinkhorn(student, teacher, 0.2, 0.05, iterations)
    (grad,) = torch.autograd.grad(loss * upstream, student)
    truth_student = student.detach().double().requires_grad_()
    truth = formulas.dino_loss_sinkhorn(truth_student, teacher.double(), 0.2, 0.05, iterations)
    (truth_grad,) = torch.autograd.grad(truth * upstream, truth_student)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert max_error(loss, truth) < tol and max_error(grad, truth_grad) < tol
    assert grad.dtype == dtype


def test_sinkhorn_centering_16_bit_student():
    student, teacher, _ = dino_inputs(4, 2, 3, 20, scale=0.3, dtype=torch.bfloat16)
    student.requires_grad_()
    loss = dino_loss_sinkhorn(student, teacher, 0.1, 0.04)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    truth = formulas.dino_loss_sinkhorn(student.detach().double(), teacher.double(), 0.1, 0.04, 3)
    assert max_error(loss, truth) < 1e-5


def test_sinkhorn_centering_compiles():
    student, teacher, _ = dino_inputs(3, 2, 4, 16, scale=0.3, dtype=torch.float32)
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
        student, teacher, _ = dino_inputs(3, 2, 4, 24, scale=0.3)
        loss = loss_fn(student.float(), teacher.float(), epoch)
        truth = formulas.dino_loss_sinkhorn(student.float().double(), teacher.float().double(), 0.2,
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
