"""The DINO head op family (the head's last layer fused with the DINO / iBOT losses) on every
backend against the official formulas on materialized logits in float64: loss and the gradients
of the student features and prototypes under a random upstream scalar, K over several tiles and
not a multiple of them, every dtype, near-uniform and near-one-hot teachers, EMA and Sinkhorn
centering, no gradient into the teacher or the center; the center update without logits; bad
inputs; the ops' registration (opcheck, torch.compile)."""

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import formulas
from fastcl.ops import dino_head as ops
from tests.helpers import max_error

LOSS_TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def head_inputs(s, t, b, h, k, *, logit_scale=1.0, dtype=torch.float64):
    """DINOHead-like inputs: unit bottleneck features (S, B, H) / (T, B, H), unit prototype rows
    (K, H) (weight-normalized with g = 1) times logit_scale, a (K,) center; float64 rounded to
    dtype."""
    def unit(*shape):
        return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)

    student, teacher = unit(s, b, h), unit(t, b, h)
    # The teacher close to the student, as after training: its softmax is peaked.
    teacher = F.normalize(teacher + 0.5 * student[:t], dim=-1)
    student_weight = logit_scale * unit(k, h)
    teacher_weight = F.normalize(student_weight + 0.05 * unit(k, h), dim=-1) * logit_scale
    center = 0.1 * logit_scale * torch.randn(k, dtype=torch.float64)
    return [x.to(dtype) for x in (student, teacher, student_weight, teacher_weight)] + [center]


def head_then_formula(student, teacher, student_weight, teacher_weight, center, student_temp=0.1,
                      teacher_temp=0.04, centering="ema", sinkhorn_iterations=3):
    """The official formulas on the materialized logits."""
    x, u = student @ student_weight.T, teacher @ teacher_weight.T
    if centering == "sinkhorn":
        return formulas.dino_loss_sinkhorn(x, u, student_temp, teacher_temp, sinkhorn_iterations)
    return formulas.dino_loss(x, u, center, student_temp, teacher_temp)


def loss_and_grads(fn, inputs, upstream, device, **kwargs):
    """fn's loss on copies of inputs on device, and d(upstream * loss) / d (student,
    student_weight)."""
    student, teacher, student_weight, teacher_weight, center = (x.detach().to(device)
                                                                for x in inputs)
    student.requires_grad_()
    student_weight.requires_grad_()
    temps = kwargs.pop("temps", (0.1, 0.04))
    loss = fn(student, teacher, student_weight, teacher_weight, center, *temps, **kwargs)
    grads = torch.autograd.grad(loss * upstream, (student, student_weight))
    return loss, grads


def _interpreted(backend) -> bool:
    from fastcl._backend import cpu_backend_name

    return backend == "cpu" and cpu_backend_name() == "triton"


def skip_interpreter_bf16(backend, dtype):
    if dtype == torch.bfloat16 and _interpreted(backend):
        pytest.skip("the Triton interpreter has no bfloat16 dot (bf16 runs on a GPU)")


def check(device, dtype, inputs, loss_tol=None, grad_tol=None, **kwargs):
    upstream = torch.randn(()).item()
    rounded = [x.to(dtype) for x in inputs[:4]] + [inputs[4].float()]
    loss, grads = loss_and_grads(fastcl.dino_head_loss, rounded, upstream, device, **kwargs)
    truth = loss_and_grads(head_then_formula, [x.double() for x in rounded], upstream, "cpu",
                           **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grads[0].dtype == grads[1].dtype == dtype
    assert max_error(loss, truth[0]) <= (loss_tol or LOSS_TOL[dtype]), "loss"
    assert max_error(grads[0], truth[1][0]) <= (grad_tol or GRAD_TOL[dtype]), "d student"
    assert max_error(grads[1], truth[1][1]) <= (grad_tol or GRAD_TOL[dtype]), "d student_weight"


# --- DINO: against the official formula on the head's logits ----------------------------------
@pytest.mark.parametrize("s,t,b,h,k", [(2, 2, 1, 1, 1), (3, 2, 3, 7, 33), (10, 2, 5, 16, 300),
                                       (4, 1, 2, 9, 1000), (3, 2, 2, 24, 4500),
                                       (2, 1, 2100, 8, 2100)])
def test_loss_and_gradients(backend, s, t, b, h, k):
    """K = 4500: several of the C++ kernels' chunks of 1024 columns; (S + T) B = 6300 rows: three
    of its tiles (4M logits, whole chunks: 1024 columns here), the last a partial one."""
    if b * k > 10**6 and _interpreted(backend):
        pytest.skip("the interpreter is slow: the large shape runs on the C++ and reference")
    check(backend, torch.float32, head_inputs(s, t, b, h, k, logit_scale=5.0),
          temps=(0.1, 0.04))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    skip_interpreter_bf16(backend, dtype)
    check(backend, dtype, head_inputs(5, 2, 3, 24, 130, logit_scale=3.0), temps=(0.1, 0.07))


def test_float64_runs_the_reference(backend):
    inputs = head_inputs(3, 2, 4, 8, 20)
    loss, grads = loss_and_grads(fastcl.dino_head_loss, inputs, 1.0, backend)
    truth = loss_and_grads(head_then_formula, inputs, 1.0, "cpu")
    assert loss.dtype == grads[0].dtype == grads[1].dtype == torch.float64
    assert max_error(loss, truth[0]) < 1e-12
    assert max(max_error(g, g64) for g, g64 in zip(grads, truth[1])) < 1e-12


@pytest.mark.parametrize("logit_scale,teacher_temp", [(1e-3, 1.0), (40.0, 0.04)],
                         ids=["near-uniform", "near-one-hot"])
def test_teacher_extremes(backend, logit_scale, teacher_temp):
    check(backend, torch.float32, head_inputs(4, 2, 3, 16, 257, logit_scale=logit_scale),
          temps=(0.1, teacher_temp))


def test_weight_normalized_last_layer(backend):
    """DINOHead's last layer, W = g v / ||v|| (g = 1, frozen): the gradient reaches v through W."""
    student, teacher, _, teacher_weight, center = head_inputs(4, 2, 3, 16, 70)
    v = torch.randn(70, 16, dtype=torch.float64)
    g = torch.ones(70, 1, dtype=torch.float64)

    def loss_and_dv(fn, device):
        v_ = v.to(device).float().requires_grad_()
        w = torch._weight_norm(v_, g.to(device).float(), 0)
        loss = fn(student.float().to(device), teacher.float().to(device), w,
                  teacher_weight.float().to(device), center.float().to(device))
        return loss, torch.autograd.grad(loss, v_)[0]

    loss, dv = loss_and_dv(fastcl.dino_head_loss, backend)
    loss32, dv32 = loss_and_dv(head_then_formula, "cpu")
    assert max_error(loss, loss32) < 1e-5 and max_error(dv, dv32) < 1e-5


def test_no_gradient_into_teacher_or_center(backend):
    student, teacher, student_weight, teacher_weight, center = (
        x.float().to(backend).requires_grad_() for x in head_inputs(3, 2, 2, 8, 16))
    fastcl.dino_head_loss(student, teacher, student_weight, teacher_weight, center).backward()
    assert student.grad is not None and student_weight.grad is not None
    assert teacher.grad is None and teacher_weight.grad is None and center.grad is None


def test_gradient_of_one_input_only(backend):
    """Only the prototypes (a frozen backbone) or only the features require grad."""
    inputs = [x.float().to(backend) for x in head_inputs(3, 2, 2, 8, 16)]
    weight = inputs[2].clone().requires_grad_()
    fastcl.dino_head_loss(inputs[0], inputs[1], weight, *inputs[3:]).backward()
    features = inputs[0].clone().requires_grad_()
    fastcl.dino_head_loss(features, *inputs[1:]).backward()
    assert weight.grad is not None and features.grad is not None


def test_non_contiguous_inputs(backend):
    student, teacher, student_weight, teacher_weight, center = head_inputs(4, 2, 3, 8, 50)
    student = student.transpose(0, 1).contiguous().transpose(0, 1)
    student_weight = student_weight.T.contiguous().T
    assert not student.is_contiguous() and not student_weight.is_contiguous()
    check(backend, torch.float32, [student, teacher, student_weight, teacher_weight, center])


def test_wide_features_run_the_tiled_path(monkeypatch):
    """H over the Triton kernels' MAX_DIM: the Triton backend (CUDA, or the interpreter on CPU)
    runs the tiled PyTorch path instead of the kernels; H within it reaches the launchers."""
    pytest.importorskip("triton")
    from fastcl.kernels import dino_head as kernels
    from fastcl.ops import cpu_backend

    launched = []
    for name in ("dino_head_fwd", "dino_head_bwd"):
        def spy(*args, _launcher=getattr(kernels, name), _name=name):
            launched.append(_name)
            return _launcher(*args)
        monkeypatch.setattr(kernels, name, spy)
    wide = kernels.MAX_DIM + 88
    with cpu_backend("triton"):
        check("cpu", torch.float32, head_inputs(3, 2, 2, wide, 40, logit_scale=2.0))
        assert launched == []
        check("cpu", torch.float32, head_inputs(3, 2, 2, kernels.MAX_DIM, 40, logit_scale=2.0))
        assert launched == ["dino_head_fwd", "dino_head_bwd"]


# --- Triton kernels: tiles, splits and pairings against the float64 op reference ------------
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("teacher", [(4.0, 25.0), (1e-3, 1.0), (40.0, 25.0)],
                         ids=["peaked", "near-uniform", "near-one-hot"])
@pytest.mark.parametrize("block,split", [(None, None), (16, 3)], ids=["default", "tiles16-split3"])
def test_triton_kernels(diagonal, dtype, teacher, block, split):
    """The launchers of kernels/dino_head.py on S = 3, T = 2, B = 5, H = 24, K = 70 (no dimension
    a multiple of a tile): loss, both stats and both gradients under a random upstream gradient
    and row weights, every K tile and split merged (interpreter on CPU)."""
    pytest.importorskip("triton")
    from fastcl.kernels import dino_head as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 dot (bf16 runs on a GPU)")
    logit_scale, teacher_scale = teacher
    *features, center = head_inputs(3, 2, 5, 24, 70, logit_scale=logit_scale)
    features = [x.to(dtype) for x in features]
    scales = [torch.tensor(10.0), torch.tensor(teacher_scale)]
    row_weight, grad = torch.rand(5), torch.randn(())
    args = [*features, center.float(), *scales, row_weight]
    tiles = dict(block_m=block, block_n=block, split=split)
    loss, student_stats, teacher_stats = kernels.dino_head_fwd(
        *(x.to(device) for x in args), diagonal, **tiles)
    args64 = [x.double() for x in args]
    truth = ops.dino_head_ref(*args64, diagonal)
    assert loss.dtype == student_stats.dtype == teacher_stats.dtype == torch.float32
    assert max_error(loss, truth[0]) <= LOSS_TOL[dtype], "loss"
    assert max_error(student_stats, truth[1]) <= LOSS_TOL[dtype], "student stats"
    assert max_error(teacher_stats, truth[2]) <= LOSS_TOL[dtype], "teacher stats"
    dstudent, dweight = kernels.dino_head_bwd(*(x.to(device) for x in args), diagonal,
                                              student_stats, teacher_stats, grad.to(device),
                                              **tiles)
    truth = ops.dino_head_backward_ref(*args64, diagonal, *truth[1:], grad.double())
    assert dstudent.dtype == dweight.dtype == dtype
    assert max_error(dstudent, truth[0]) <= GRAD_TOL[dtype], "d student"
    assert max_error(dweight, truth[1]) <= GRAD_TOL[dtype], "d student_weight"


# --- Sinkhorn centering -------------------------------------------------------------------------
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_centering(backend, iterations):
    check(backend, torch.float32, head_inputs(4, 2, 5, 16, 300, logit_scale=2.0),
          centering="sinkhorn", sinkhorn_iterations=iterations)


def test_tiles(monkeypatch, backend):
    """The Sinkhorn passes and the tiled (CUDA) path over several tiles of K, the last one
    partial."""
    monkeypatch.setattr(ops, "_SINKHORN_TILE", 64 * 10)
    monkeypatch.setattr(ops, "_TILE", 64 * 10)
    check(backend, torch.float32, head_inputs(3, 2, 2, 8, 150, logit_scale=2.0))
    check(backend, torch.float32, head_inputs(3, 2, 5, 8, 150, logit_scale=2.0),
          centering="sinkhorn")


def test_sinkhorn_finite_where_dinov2_overflows(backend):
    """Logits up to 10 at teacher_temp 0.04: DINOv2's exp(logits / 0.04) overflows fp32 (inf /
    NaN codes), the fused loss stays equal to the float64 truth."""
    inputs = head_inputs(4, 2, 3, 16, 200, logit_scale=10.0)
    rounded = [x.float() for x in inputs]
    assert not torch.isfinite(head_then_formula(*rounded, centering="sinkhorn"))
    check(backend, torch.float32, inputs, centering="sinkhorn", loss_tol=1e-4, grad_tol=1e-4)


# --- iBOT ---------------------------------------------------------------------------------------
def ibot_formula(student, teacher, student_weight, teacher_weight, center, masks_weight, n_images,
                 student_temp=0.1, teacher_temp=0.04, centering="ema"):
    """DINOv2's iBOT formula on the head's logits."""
    return formulas.ibot_patch_loss(student @ student_weight.T, teacher @ teacher_weight.T, center,
                                    masks_weight, n_images, student_temp, teacher_temp, centering)


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ibot_patch_loss(backend, centering, dtype):
    """Masks of 4 images, one with no masked token (it counts in n_images as in DINOv2)."""
    skip_interpreter_bf16(backend, dtype)
    masks = torch.zeros(4, 12, dtype=torch.bool)
    masks[0, :5] = masks[1, 3:4] = masks[3, 2:11] = True
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0))[:, None].expand_as(masks)[masks].double()
    n = int(masks.sum())
    student, _, student_weight, teacher_weight, center = head_inputs(1, 1, n, 16, 333,
                                                                     logit_scale=3.0)
    teacher = F.normalize(student[0] + 0.3 * torch.randn_like(student[0]), dim=-1).to(dtype)
    student = student[0].to(dtype)
    student_weight, teacher_weight = student_weight.to(dtype), teacher_weight.to(dtype)
    center = center.to(dtype)
    upstream = torch.randn(()).item()

    def run(fn, device, cast):
        s, w = cast(student).to(device).requires_grad_(), cast(student_weight).to(device)
        w.requires_grad_()
        args = [cast(x).to(device) for x in (teacher, teacher_weight, center)] + [
            masks_weight.to(device)]
        loss = fn(s, args[0], w, *args[1:], n_images=masks.shape[0], centering=centering)
        return loss, torch.autograd.grad(loss * upstream, (s, w))

    loss, grads = run(fastcl.ibot_patch_loss, backend, lambda x: x)
    loss64, grads64 = run(ibot_formula, "cpu", lambda x: x.double())
    assert max_error(loss, loss64) <= LOSS_TOL[dtype]
    assert max_error(grads[0], grads64[0]) <= GRAD_TOL[dtype]
    assert max_error(grads[1], grads64[1]) <= GRAD_TOL[dtype]


def test_ibot_default_divides_by_the_weights(backend):
    student, teacher, student_weight, teacher_weight, center = (
        x[0] if x.dim() == 3 else x for x in head_inputs(1, 1, 6, 8, 40))
    masks_weight = torch.rand(6, dtype=torch.float64)
    args = (student, teacher, student_weight, teacher_weight, center, masks_weight)
    expected = ibot_formula(*args, n_images=masks_weight.sum())
    assert max_error(fastcl.ibot_patch_loss(*(x.to(backend) for x in args)), expected) < 1e-12


# --- the center update without logits ----------------------------------------------------------
def test_teacher_mean_and_center_update():
    _, teacher, _, teacher_weight, _ = head_inputs(3, 2, 5, 8, 40)
    logits = teacher @ teacher_weight.T
    assert max_error(fastcl.teacher_mean(teacher, teacher_weight),
                     logits.reshape(-1, 40).mean(0, keepdim=True)) < 1e-12
    with_logits, with_features = fastcl.DINOLoss(40), fastcl.DINOLoss(40)
    with_logits.center.normal_()
    with_features.center.copy_(with_logits.center)
    with_logits.update_center(logits.float())
    with_features.update_center(teacher.float(), teacher_weight.float())
    assert max_error(with_features.center, with_logits.center) < 1e-6


# --- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    student, teacher, student_weight, teacher_weight, center = (
        x.float() for x in head_inputs(3, 2, 2, 8, 16))
    cases = [
        ((student[0], teacher, student_weight, teacher_weight, center), {}, ValueError, "student"),
        ((student, teacher[:, :1], student_weight, teacher_weight, center), {}, ValueError,
         "teacher"),
        ((student, teacher, student_weight[:, :4], teacher_weight, center), {}, ValueError,
         "student_weight"),
        ((student, teacher, student_weight, teacher_weight[:8], center), {}, ValueError,
         "prototype matrices"),
        ((student, teacher, student_weight, teacher_weight.double(), center), {}, TypeError,
         "teacher_weight"),
        ((student, teacher, student_weight, teacher_weight, center[:3]), {}, ValueError, "center"),
        ((student, teacher, student_weight, teacher_weight, None), {}, TypeError, "center"),
        ((student, teacher, student_weight, teacher_weight, center), {"centering": "mean"},
         ValueError, "centering"),
        ((student, teacher, student_weight, teacher_weight, center, 0.1, torch.tensor(0.04)),
         {"centering": "sinkhorn"}, TypeError, "teacher_temp"),
        ((student, teacher, student_weight, teacher_weight, center, -0.1), {}, ValueError,
         "student_temp"),
    ]
    for args, kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            fastcl.dino_head_loss(*args, **kwargs)
    with pytest.raises(ValueError, match="masks_weight"):
        fastcl.ibot_patch_loss(student[0], teacher[0], student_weight, teacher_weight, center,
                               torch.ones(3))
    with pytest.raises(ValueError, match="n_images"):
        fastcl.ibot_patch_loss(student[0], teacher[0], student_weight, teacher_weight, center,
                               torch.ones(2), n_images=0)


# --- op registration ----------------------------------------------------------------------------
def _op_args(diagonal=False):
    student, teacher, student_weight, teacher_weight, center = (
        x.float() for x in head_inputs(3, 2, 4, 8, 9))
    return (student.requires_grad_(), teacher, student_weight.requires_grad_(), teacher_weight,
            center, torch.tensor(10.0), torch.tensor(25.0), torch.rand(4), diagonal)


@pytest.mark.parametrize("diagonal", [False, True])
def test_opcheck(diagonal):
    args = _op_args(diagonal)
    torch.library.opcheck(ops.head_cross_entropy, args)
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
    _, student_stats, teacher_stats = ops.head_cross_entropy(*detached)
    torch.library.opcheck(ops.head_cross_entropy_backward,
                          (*detached, student_stats, teacher_stats, torch.tensor(0.5)))
    torch.library.opcheck(ops.head_sinkhorn_center,
                          (detached[1].reshape(-1, 8), detached[3], 0.05, 3, False))


def test_compile_fullgraph():
    student, teacher, student_weight, teacher_weight, center = (
        x.float() for x in head_inputs(4, 2, 3, 8, 33))
    student.requires_grad_()
    student_weight.requires_grad_()

    def call(x, y, ws, wt, c, centering):
        return fastcl.dino_head_loss(x, y, ws, wt, c, 0.1, 0.05, centering=centering)

    for centering in ["ema", "sinkhorn"]:
        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        eager = call(student, teacher, student_weight, teacher_weight, center, centering)
        grads = torch.autograd.grad(eager, (student, student_weight))
        out = compiled(student, teacher, student_weight, teacher_weight, center, centering)
        grads2 = torch.autograd.grad(out, (student, student_weight))
        assert max_error(out, eager) < 1e-6
        assert max(max_error(a, b) for a, b in zip(grads2, grads)) < 1e-6
