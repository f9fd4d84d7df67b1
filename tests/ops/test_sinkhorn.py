"""fastcl::sinkhorn (SwAV's Sinkhorn-Knopp codes) on every backend against the float64 references:
SwAV's literal code wherever it is finite, the log-domain math everywhere (overflow cases
included); 16-bit and strided inputs, NaN, input checks, no gradient, torch.compile, opcheck, the
Triton kernels with tiny blocks, and gather=True over 2 gloo processes; finite and equal to a
float64 log-domain truth for any finite scores, epsilon and iterations."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcl.ops.sinkhorn as sinkhorn_ops
from fastcl import formulas
from fastcl._backend import cpu_backend_name
from fastcl.ops import cpu_backend
from fastcl.losses.dino import DINOLoss, dino_loss_sinkhorn
from fastcl.ops.sinkhorn import _sinkhorn_fused, sinkhorn, sinkhorn_log_ref
from tests.helpers import max_error, run_on_ranks

# Codes vs the float64 truth computed from the same (rounded) inputs: |err| <= RTOL * |truth| +
# ATOL. fp32 rounding of scores / eps and of the log scalings gives a few 1e-6 relative; entries
# below ~1e-38 flush to 0, hence the tiny ATOL. 16-bit inputs only differ in rounding before it.
RTOL, ATOL = 5e-5, 1e-30


def similarities(b, k, scale=1.0, device="cpu", dtype=torch.float32):
    """SwAV-like scores (b, k): cosine similarities of random unit embeddings and prototypes,
    times scale, rounded to dtype."""
    z = F.normalize(torch.randn(b, 32, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, 32, dtype=torch.float64), dim=1)
    return (scale * z @ c.T).to(device=device, dtype=dtype)


def assert_codes(codes, truth, what="codes", rtol=RTOL):
    """codes (B, K) float32 against the float64 truth, elementwise, and rows summing to 1."""
    assert codes.dtype == torch.float32 and codes.shape == truth.shape, what
    assert not codes.requires_grad, what
    codes = codes.detach().double().cpu()
    truth = truth.cpu()
    err = ((codes - truth).abs() - rtol * truth.abs()).max().item()
    assert err <= ATOL, f"{what}: error {err:.3g} above rtol {rtol}"
    assert (codes.sum(1) - 1).abs().max().item() < 1e-5, f"{what}: rows do not sum to 1"


# --- against the references --------------------------------------------------------------------
@pytest.mark.parametrize("b,k", [(1, 1), (3, 7), (127, 300), (64, 3000)])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_matches_swav(backend, b, k, iterations, epsilon):
    """fp32 scores in SwAV's range: equal to SwAV's code run in float64, and to the log-domain
    reference (which must equal SwAV's code: it is the truth of the overflow tests)."""
    scores = similarities(b, k, device=backend)
    swav64 = formulas.sinkhorn(scores.double(), epsilon, iterations)
    torch.testing.assert_close(sinkhorn_log_ref(scores.double(), epsilon, iterations), swav64,
                               rtol=1e-10, atol=1e-14)
    assert_codes(sinkhorn(scores, epsilon, iterations), swav64)


def test_iterations_matter():
    """The tolerance above is far below what one iteration more or less changes."""
    scores = similarities(127, 300)
    q3, q4 = formulas.sinkhorn(scores.double(), 0.05, 3), formulas.sinkhorn(scores.double(), 0.05, 4)
    assert ((q4 - q3).abs() / q3).max() > 1e3 * RTOL


def planted_scores(b, k, scale, device="cpu", dtype=torch.float32):
    """scale * cosine similarities where row i matches prototype i exactly (score = scale)."""
    z = F.normalize(torch.randn(b, 32, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, 32, dtype=torch.float64), dim=1)
    c[: min(b, k)] = z[: min(b, k)]
    return (scale * z @ c.T).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_scores_do_not_overflow(backend, dtype):
    """SwAV's code computes in the scores' dtype: in fp16 at eps 0.05 it overflows as soon as a
    score exceeds 0.55. Ours computes in fp32 from the rounded scores."""
    scores = planted_scores(127, 300, 1.0, backend, dtype)
    if dtype == torch.float16:
        assert not formulas.sinkhorn(scores).isfinite().all()
    assert_codes(sinkhorn(scores), formulas.sinkhorn(scores.double()))


@pytest.mark.parametrize("iterations", [1, 3])
def test_fp32_overflow_of_swav_code(backend, iterations):
    """Scores up to 5 at eps 0.05: exp(100) overflows fp32, so SwAV's code gives NaN; it does not
    overflow in float64, and ours equals that."""
    scores = planted_scores(64, 300, 5.0, backend)
    assert formulas.sinkhorn(scores, 0.05, iterations).isnan().any()
    swav64 = formulas.sinkhorn(scores.double(), 0.05, iterations)
    assert swav64.isfinite().all()
    assert_codes(sinkhorn(scores, 0.05, iterations), swav64)


def test_extreme_magnitudes(backend):
    """Scores of +-50 at eps 0.05 (exp(1000) overflows even float64), plus a sample far below
    every other one and a prototype far below every other one: with a single global max shift,
    their exps would underflow to 0 and give 0/0. Compared with the float64 log-domain truth;
    fp32 holds scores / eps ~ 1000 to ~6e-5, so exps are relatively that accurate."""
    scores = planted_scores(127, 300, 50.0, backend)
    scores[5] -= 60.0  # a sample whose best score is far below everyone else's
    scores[:, 7] -= 60.0  # a prototype that no sample is close to
    assert formulas.sinkhorn(scores.double(), 0.05, 3).isnan().any()
    assert_codes(sinkhorn(scores, 0.05, 3), sinkhorn_log_ref(scores.double(), 0.05, 3),
                 rtol=1e-3)


# --- finite for any finite scores, any epsilon, any number of iterations ----------------------
def sinkhorn_log64(scores, epsilon, iterations):
    """The truth for any magnitude: SwAV's algorithm in log domain in float64, written with the
    scaling of prototype k split into exact parts. Its logits x_bk = scores_bk / eps reach 1e42
    (scores 1e30, eps 1e-12), where float64 rounds away the O(1) updates of the scalings (ulp
    of 1e16 is 2) and ties between equal differences break by rounding; so the logits are taken
    relative to the column max (which the scalings absorb) and to the row max (which the row
    normalization absorbs): d_bk = ((s_bk - colmax_k) - rowmax_b) / eps, differences of float32
    scores that float64 holds exactly, and P_b = softmax_k(d_bk + log_u_k) as in the op."""
    s = scores.double()
    a = s - s.amax(0)
    log_u = -torch.logsumexp(a / epsilon, 0)
    d = (a - a.amax(1, keepdim=True)) / epsilon
    for _ in range(iterations - 1):
        log_u = log_u - torch.softmax(d + log_u, 1).sum(0).log()
    return torch.softmax(d + log_u, 1)


# Codes vs sinkhorn_log64, absolute: float32 kernels round each score difference to 6e-8 of
# itself and the scalings to 6e-8 of iterations * log(B K); a code's error is its value times
# that, a few 1e-6 at 200 iterations. 16-bit scores are exact in float32 and the truth gets the
# same rounded scores, so they get the same bound.
EXTREME_ATOL = 1e-5


def assert_close_to_log64(codes, scores, epsilon, iterations, what="codes"):
    assert codes.dtype == torch.float32, what
    assert bool(codes.isfinite().all()), f"{what}: not finite"
    truth = sinkhorn_log64(scores.cpu(), epsilon, iterations)
    err = (codes.double().cpu() - truth).abs().max().item()
    assert err <= EXTREME_ATOL, f"{what}: error {err:.3g} vs float64 log domain"


@pytest.mark.parametrize("b,k,iterations", [(256, 3000, 38), (8, 65536, 11)])
def test_many_iterations(backend, b, k, iterations):
    """Regression: the C++ path's column weights grew ~K/B per iteration without renormalization
    and overflowed to inf (all-NaN codes) past a shape-dependent count: 38 at B 256, K 3000."""
    if triton_interpreted(backend):
        pytest.skip("too slow under the Triton interpreter; test_iterations_property covers it")
    z = F.normalize(torch.randn(b, 128), dim=1)
    c = F.normalize(torch.randn(k, 128), dim=1)
    scores = (z @ c.T).to(backend)
    assert_close_to_log64(sinkhorn(scores, 0.05, iterations), scores, 0.05, iterations)


@pytest.mark.parametrize("epsilon", [1e-10, 1e-12])
@pytest.mark.parametrize("iterations", [3, 30])
def test_tiny_epsilon(backend, epsilon, iterations):
    """Regression: randn(16, 8) at epsilon 1e-10 gave NaN on the C++ path; the float32 reference
    lost the scalings' O(1) updates next to logits of 1e10 (codes off by 0.3)."""
    scores = torch.randn(16, 8, device=backend)
    assert_close_to_log64(sinkhorn(scores, epsilon, iterations), scores, epsilon, iterations)


@pytest.mark.parametrize("scale", [1e8, 1e30])
def test_huge_scores(backend, scale):
    """Regression: scores * 1e8 at epsilon 0.05 gave wrong codes on the C++ path (off by 0.95),
    scores * 1e30 gave NaN."""
    scores = similarities(64, 300, scale, backend)
    assert_close_to_log64(sinkhorn(scores, 0.05, 3), scores, 0.05, 3)


def triton_interpreted(device):
    return device == "cpu" and cpu_backend_name() == "triton"


@st.composite
def extreme_problems(draw, max_iterations=200):
    """(scores, epsilon, iterations): B, K in 1..12, scores = a base matrix times 10**(-3..30),
    epsilon 10**(-12..0), iterations 1..max_iterations, float32 or a 16-bit dtype. The base is
    either continuous (normal) or small integers times a power of 2, whose differences are exact in
    float32: ties that only the scalings can break."""
    b, k = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):
        scores = torch.randn(b, k, generator=generator) * 10.0 ** draw(st.floats(-3, 30))
    else:
        scores = torch.randint(-4, 5, (b, k), generator=generator) * 2.0 ** draw(
            st.integers(-10, 99))
    limit = torch.finfo(dtype).max / 2
    scores = scores.clamp(-limit, limit).to(dtype)
    return scores, 10.0 ** draw(st.floats(-12, 0)), draw(st.integers(1, max_iterations))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_iterations_property(backend, data):
    """Finite and equal to the float64 log-domain truth over the whole range: iterations 1..200,
    epsilon down to 1e-12, scores up to 1e30. Under the Triton interpreter (about 0.1 s per kernel
    launch) fewer examples run, with iterations up to 30; the passes are the same at any count,
    and the driver between them is shared with the C++ path's exact passes."""
    if triton_interpreted(backend) and data.draw(st.integers(0, 4), label="subsample"):
        return
    max_iterations = 30 if triton_interpreted(backend) else 200
    scores, epsilon, iterations = data.draw(extreme_problems(max_iterations))
    scores = scores.to(backend)
    assert_close_to_log64(sinkhorn(scores, epsilon, iterations), scores, epsilon, iterations)


def test_dino_sinkhorn_centering_many_iterations():
    """Regression through DINO: dino_loss_sinkhorn(iterations=40) and DINOLoss(centering=
    "sinkhorn", sinkhorn_iterations=40) on 8 teacher rows x 4096 prototypes were NaN; they equal
    the float64 formula (SwAV's code in float64, finite here)."""
    student = 0.3 * torch.randn(3, 4, 4096)
    teacher = 0.3 * torch.randn(2, 4, 4096)
    truth = formulas.dino_loss_sinkhorn(student.double(), teacher.double(), 0.1, 0.05, 40)
    assert truth.isfinite()
    loss = dino_loss_sinkhorn(student, teacher, 0.1, 0.05, iterations=40)
    assert loss.isfinite() and max_error(loss, truth) < 1e-5
    module = DINOLoss(4096, student_temp=0.1, teacher_temp=0.05, centering="sinkhorn",
                      sinkhorn_iterations=40)
    loss = module(student, teacher)
    assert loss.isfinite() and max_error(loss, truth) < 1e-5


# --- the C++ path's rescaling of the stored codes ---------------------------------------------
def _count_exact_fallbacks(monkeypatch):
    """Counts the C++ path's falls back to exact passes over the scores (_sinkhorn_steps)."""
    calls = []
    original = sinkhorn_ops._sinkhorn_steps
    monkeypatch.setattr(sinkhorn_ops, "_sinkhorn_steps",
                        lambda *args: calls.append(args[5]) or original(*args))
    return calls


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_cpp_rescales_the_stored_codes(monkeypatch, iterations):
    """Normalized embeddings: after two passes over the scores every further column step only
    reweights the stored codes, and the result is SwAV's to the same tolerance."""
    fallbacks = _count_exact_fallbacks(monkeypatch)
    scores = similarities(127, 300)
    with cpu_backend("cpp"):
        codes = sinkhorn(scores, 0.05, iterations)
    assert fallbacks == []
    assert_codes(codes, formulas.sinkhorn(scores.double(), 0.05, iterations))


@pytest.mark.parametrize("iterations", [2, 3, 5])
def test_cpp_falls_back_to_exact_passes(monkeypatch, iterations):
    """When the column weights span more than the stored codes can represent (forced here with a
    limit of 1: real inputs stay far inside 2**60), the C++ path goes on with exact passes over the
    scores from the scaling it reached, and the result is unchanged (extreme scores included)."""
    fallbacks = _count_exact_fallbacks(monkeypatch)
    monkeypatch.setattr(sinkhorn_ops, "_MAX_WEIGHT_RATIO", 1.0)
    scores = planted_scores(127, 300, 50.0)
    scores[:, 7] -= 60.0  # a prototype that no sample is close to
    with cpu_backend("cpp"):
        codes = sinkhorn(scores, 0.05, iterations)
    assert fallbacks == [iterations - 2]
    assert_codes(codes, sinkhorn_log_ref(scores.double(), 0.05, iterations), rtol=1e-3)


def test_cpp_codes_buffer_is_reused_only_when_free():
    """The C++ path hands the last codes' memory out again only once nothing refers to it: codes
    (or a view of them) still held are never overwritten by a later call."""
    first_scores, second_scores = similarities(127, 300), similarities(127, 300)
    with cpu_backend("cpp"):
        first = sinkhorn(first_scores)
        view = sinkhorn(first_scores)[::2]  # only a view of the second result stays alive
        expected_view = view.clone()
        second = sinkhorn(second_scores)
        assert first.data_ptr() != second.data_ptr() != view.data_ptr()
        assert_codes(first, formulas.sinkhorn(first_scores.double()), "held codes")
        assert torch.equal(view, expected_view)
        address = second.data_ptr()
        del second
        third = sinkhorn(second_scores)
    assert third.data_ptr() == address  # recycled once free
    assert_codes(third, formulas.sinkhorn(second_scores.double()), "recycled codes")


# --- inputs ------------------------------------------------------------------------------------
def test_strided_scores(backend):
    """A transposed (column-major) view and a row-strided slice give the contiguous result."""
    base = similarities(300, 127, device=backend)
    for scores in (base.T, base[::2]):
        assert_codes(sinkhorn(scores), formulas.sinkhorn(scores.contiguous().double()), "strided")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
def test_nan_propagates(backend, bad):
    """As in SwAV's code, a NaN or +inf score makes every code NaN (it enters every
    normalization); a -inf score only gets weight 0."""
    scores = similarities(20, 30, device=backend)
    scores[3, 4] = bad
    assert sinkhorn(scores).isnan().all()
    scores[3, 4] = float("-inf")
    codes = sinkhorn(scores)
    assert codes[3, 4] == 0
    assert_codes(codes, formulas.sinkhorn(scores.double()))


def test_no_gradient(backend):
    scores = similarities(5, 9, device=backend).requires_grad_()
    codes = sinkhorn(scores)
    assert not codes.requires_grad and codes.grad_fn is None


def test_float64_runs_the_reference():
    scores = similarities(9, 11, dtype=torch.float64)
    codes = sinkhorn(scores)
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes, formulas.sinkhorn(scores), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scores=torch.zeros(3)), ValueError, "scores must have 2 dimensions"),
    (dict(scores=torch.zeros(2, 3, 4)), ValueError, "scores must have 2 dimensions"),
    (dict(scores=torch.zeros(0, 3)), ValueError, "scores must not be empty"),
    (dict(scores=torch.zeros(3, 0)), ValueError, "scores must not be empty"),
    (dict(scores=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "scores must be float32"),
    (dict(scores=[[1.0, 2.0]]), TypeError, "scores must be a torch.Tensor"),
    (dict(epsilon=0.0), ValueError, "epsilon must be a finite number > 0"),
    (dict(epsilon=-0.1), ValueError, "epsilon must be a finite number > 0"),
    (dict(epsilon=float("inf")), ValueError, "epsilon must be a finite number > 0"),
    (dict(epsilon=float("nan")), ValueError, "epsilon must be a finite number > 0"),
    (dict(epsilon="0.05"), TypeError, "epsilon must be a float"),
    (dict(epsilon=torch.tensor(0.05)), TypeError, "epsilon must be a float"),
    (dict(iterations=0), ValueError, "iterations must be >= 1"),
    (dict(iterations=3.0), TypeError, "iterations must be an int"),
    (dict(iterations=True), TypeError, "iterations must be an int"),
])
def test_bad_input(kwargs, error, match):
    args = dict(scores=torch.randn(4, 5), epsilon=0.05, iterations=3) | kwargs
    with pytest.raises(error, match=match):
        sinkhorn(**args)


# --- torch.compile, opcheck, Triton block sizes -------------------------------------------------
def test_compile_fullgraph(backend):
    scores = similarities(33, 70, device=backend)

    def codes_of(x):
        return sinkhorn(x, 0.05, 3)

    codes = torch.compile(codes_of, fullgraph=True, backend="aot_eager")(scores.requires_grad_())
    assert not codes.requires_grad
    torch.testing.assert_close(codes, sinkhorn(scores), rtol=0, atol=0)


def test_opcheck(backend):
    scores = similarities(19, 33, device=backend)
    torch.library.opcheck(torch.ops.fastcl.sinkhorn.default, (scores, 0.05, 3, False))
    torch.library.opcheck(torch.ops.fastcl.sinkhorn.default, (scores.half(), 0.5, 1, True))


def test_triton_small_blocks():
    """The Triton launchers with blocks far smaller than the matrix: several row splits in the
    first pass, several row blocks per program (and partial-sum rows) in the others."""
    pytest.importorskip("triton")
    from fastcl.kernels import sinkhorn as kernels

    small = SimpleNamespace(
        sinkhorn_init_fwd=partial(kernels.sinkhorn_init_fwd, block_b=4, block_k=16,
                                  max_programs=20),
        sinkhorn_step_fwd=partial(kernels.sinkhorn_step_fwd, block_b=4, block_k=16,
                                  max_programs=3),
        sinkhorn_codes_fwd=partial(kernels.sinkhorn_codes_fwd, block_b=4, block_k=16),
    )
    scores = similarities(61, 45)
    assert_codes(_sinkhorn_fused(small, scores, 0.05, 3, False), formulas.sinkhorn(scores.double()))


# --- gather=True over 2 processes ---------------------------------------------------------------
WORLD, ROWS, PROTOTYPES = 2, 9, 20


def _worker(rank, results, scores):
    from fastcl.ops import cpu_backend

    mine = scores[rank * ROWS : (rank + 1) * ROWS]
    for name in ("cpp", "reference"):
        with cpu_backend(name):
            results[(name, rank)] = sinkhorn(mine, 0.05, 3, gather=True)
    results[("swav", rank)] = formulas.sinkhorn(mine, 0.05, 3, gather=True)
    results[("log", rank)] = sinkhorn_log_ref(mine, 0.05, 3, gather=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gather_equals_one_process():
    """Each rank's codes with gather=True are its rows of the single-process codes of all rows,
    for the fused op (C++ kernels and reference backend) and for both references."""
    scores = planted_scores(WORLD * ROWS, PROTOTYPES, 1.0, "cpu")
    results = run_on_ranks(_worker, scores, world=WORLD)
    truth = formulas.sinkhorn(scores.double(), 0.05, 3)
    for name in ("cpp", "reference", "swav", "log"):
        gathered = torch.cat([results[(name, r)] for r in range(WORLD)])
        assert_codes(gathered.float(), truth, name)
        # gather=False on a rank's rows alone is a different problem: the test can tell.
        alone = formulas.sinkhorn(scores[:ROWS].double(), 0.05, 3)
        assert (results[(name, 0)].double() - alone).abs().max() > 1e3 * RTOL
