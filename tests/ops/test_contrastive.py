"""fastcl::gram_contrastive and fastcl::cross_contrastive on every backend against the float64
reference: losses, statistics and the gradients of every input (scale included) under a random
upstream gradient, with labels that repeat (several positives), never match (none) or are unique."""
import pytest
import torch

from fastcl.ops.contrastive import (
    backward_coefficients,
    bank_lse,
    bank_lse_ref,
    cross_contrastive,
    cross_contrastive_ref,
    exact_softplus,
    gram_contrastive,
    gram_contrastive_ref,
)
from tests.helpers import assert_close, unit_rows

# fp32 kernels vs the float64 truth; 16-bit inputs are rounded first, so only accumulation differs.
TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def random_labels(m, kind, device):
    """'repeat': classes of a few rows; 'unique': no two rows alike; 'pairs': two views of m/2."""
    if kind == "repeat":
        return torch.randint(0, m // 3 + 1, (m,), device=device)
    if kind == "pairs":
        return torch.arange(m, device=device) % ((m + 1) // 2)
    return torch.randperm(m, device=device)


def run_and_grad(fn, inputs, upstream):
    """Outputs of fn(*inputs) and the gradients of sum(upstream * outputs) w.r.t. every floating
    input (integer inputs, the labels, get None)."""
    inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    total = sum((o * g).sum() for o, g in zip(outputs, upstream) if o.numel())
    wanted = [x for x in inputs if x.requires_grad]
    return outputs, torch.autograd.grad(total, wanted)


@pytest.mark.parametrize("m,d", [(2, 1), (3, 60), (127, 257), (300, 16)])
@pytest.mark.parametrize("temperature,norm", [(0.5, 1.0), (0.07, 1.0), (0.01, 1.0), (1.0, 6.0)])
@pytest.mark.parametrize("labels", ["repeat", "unique", "pairs"])
def test_gram_contrastive(backend, m, d, temperature, norm, labels):
    u = unit_rows(m, d, backend, norm=norm)
    y = random_labels(m, labels, backend)
    scale = torch.tensor(1.0 / temperature, device=backend)
    upstream = [torch.randn(m, dtype=torch.float64, device=backend)]
    (loss, stats), (du, dscale) = run_and_grad(gram_contrastive, [u, y, scale],
                                               [upstream[0].float()])
    (loss64, stats64), (du64, dscale64) = run_and_grad(
        gram_contrastive_ref, [u.double(), y, scale.double()], upstream)
    assert loss.dtype == torch.float32 and du.dtype == u.dtype
    assert_close(loss, loss64, 2e-5, "loss")
    assert_close(stats, stats64, 2e-5, "stats")
    assert_close(du, du64, 2e-5, "du")
    assert_close(dscale, dscale64, 2e-5, "dscale")


@pytest.mark.parametrize("m,n,d", [(2, 5, 1), (3, 3, 60), (127, 70, 257), (65, 300, 16)])
@pytest.mark.parametrize("diag_offset", [None, 0, 2, -1, 1000])
@pytest.mark.parametrize("with_col", [False, True])
@pytest.mark.parametrize("labels", ["repeat", "unique"])
def test_cross_contrastive(backend, m, n, d, diag_offset, with_col, labels):
    q, k = unit_rows(m, d, backend), unit_rows(n, d, backend)
    # "unique": row i's positive is column i (CLIP), where that column exists.
    yq, yk = random_labels(m, labels, backend), random_labels(n, labels, backend)
    if labels == "unique":
        yq, yk = torch.arange(m, device=backend), torch.arange(n, device=backend)
    scale = torch.tensor(1 / 0.07, device=backend)
    upstream = [torch.randn(m, dtype=torch.float64, device=backend),
                torch.randn(n, dtype=torch.float64, device=backend)]

    def fused(q, k, scale):
        return cross_contrastive(q, k, yq, yk, scale, diag_offset, with_col)

    def reference(q, k, scale):
        return cross_contrastive_ref(q, k, yq, yk, scale, diag_offset, with_col)

    outs, grads = run_and_grad(fused, [q, k, scale], [g.float() for g in upstream])
    outs64, grads64 = run_and_grad(reference, [q.double(), k.double(), scale.double()], upstream)
    assert outs[1].shape == ((n,) if with_col else (0,))
    for name, a, b in zip(["loss", "col_loss", "stats", "col_stats"], outs, outs64):
        assert_close(a, b, 2e-5, name)
    for name, a, b in zip(["dq", "dk", "dscale"], grads, grads64):
        assert_close(a, b, 2e-5, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(backend, dtype):
    if backend == "cpu" and dtype == torch.bfloat16:
        from fastcl._backend import cpu_backend_name

        if cpu_backend_name() == "triton":
            pytest.skip("the Triton interpreter has no bfloat16 dot")
    u = unit_rows(70, 33, backend, dtype)
    y = random_labels(70, "pairs", backend)
    scale = torch.tensor(1 / 0.07, device=backend)
    upstream = torch.randn(70, device=backend)
    (loss, _), (du, _) = run_and_grad(gram_contrastive, [u, y, scale], [upstream])
    (loss64, _), (du64, _) = run_and_grad(gram_contrastive_ref, [u.double(), y, scale.double()],
                                          [upstream.double()])
    assert loss.dtype == torch.float32 and du.dtype == dtype
    assert_close(loss, loss64, TOL[dtype], "loss")
    assert_close(du, du64, 1e-2, "du")  # du is rounded to the input dtype


def test_single_positive_loss_is_exact_when_small(backend):
    """One positive per anchor, far ahead of the negatives (late training): the loss is
    log1p(sum_n exp(s_n - s_p)), 1e-10 to 1e-4 here, which "lse - positive" in fp32 would get as 0
    or +-1e-6."""
    u = unit_rows(40, 16, backend)
    u = torch.cat([u, u + 1e-3 * unit_rows(40, 16, backend)])
    y = torch.arange(80, device=backend) % 40
    scale = torch.tensor(1 / 0.03, device=backend)
    loss, _ = gram_contrastive(u, y, scale)
    loss64, _ = gram_contrastive_ref(u.double(), y, scale.double())
    assert loss64.max() < 1e-3 and loss64.min() < 1e-8
    assert (loss >= 0).all()
    assert ((loss.double() - loss64).abs() / loss64).max() < 1e-4


def _triton_contrastive():
    pytest.importorskip("triton")
    from fastcl._backend import triton_module

    return triton_module("contrastive")


def _close_or_equal(x, truth, tol, name):
    """|x - truth| <= tol (1 + |truth|) elementwise, infinities equal."""
    x = x.double()
    err = torch.where(x == truth, 0.0, (x - truth).abs() / (1 + truth.abs()))
    assert err.max() <= tol, f"{name}: {err.max().item():.3g} > {tol}"


@pytest.mark.parametrize("temperature,norm", [(0.07, 1.0), (1.0, 6.0), (0.01, 1.0), (0.5, 8.0)])
@pytest.mark.parametrize("labels", ["pairs", "repeat", "unique"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gram_forward_schemes(temperature, norm, labels, dtype):
    """The Triton Gram forward over half the tiles: unshifted where |s| is bounded (the first
    two cases; R = 20.6 and 51.9 in log2 units against 57.7) and the general kernel where it is
    not (the last two), chosen on the device; stats against float64, a single positive's lse
    equal to its logit."""
    kernels = _triton_contrastive()
    u = unit_rows(75, 24, "cpu", norm=norm).to(dtype)
    y = random_labels(75, labels, "cpu")
    scale = torch.tensor(1 / temperature)
    stats = kernels.gram_stats_fwd(u, y, scale, symmetric=True, block_m=16, block_n=16)
    truth = gram_contrastive_ref(u.double(), y, scale.double())[1]
    _close_or_equal(stats, truth, 3e-6 if dtype == torch.float32 else 2e-5, "stats")
    single = stats[3] == 1
    assert torch.equal(stats[1][single], stats[2][single])


def test_triton_gram_unshifted_small_losses():
    """Near-duplicate positives at T = 0.03 (unshifted: R = 48.1): losses of 1e-10 to 1e-4 to
    1e-4 relative, never negative."""
    kernels = _triton_contrastive()
    u = unit_rows(40, 16, "cpu")
    u = torch.cat([u, u + 1e-3 * unit_rows(40, 16, "cpu")])
    y = torch.arange(80) % 40
    scale = torch.tensor(1 / 0.03)
    from fastcl.ops.contrastive import loss_from_stats

    loss = loss_from_stats(kernels.gram_stats_fwd(u, y, scale, symmetric=True, block_m=16,
                                                  block_n=16))
    loss64 = gram_contrastive_ref(u.double(), y, scale.double())[0]
    assert loss64.max() < 1e-3 and loss64.min() < 1e-8
    assert (loss >= 0).all()
    assert ((loss.double() - loss64).abs() / loss64).max() < 1e-4


def test_triton_gram_forward_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms the atomics of the unshifted scheme never run."""
    kernels = _triton_contrastive()
    u, y, scale = unit_rows(40, 8, "cpu"), torch.arange(40) % 20, torch.tensor(5.0)
    expected = kernels.gram_stats_fwd(u, y, scale, symmetric=True, block_m=16, block_n=16)

    class Forbidden:
        fn = property(lambda self: pytest.fail("the unshifted kernel ran"))

    monkeypatch.setattr(kernels, "_gram_unshifted_kernel", Forbidden())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        stats = kernels.gram_stats_fwd(u, y, scale, symmetric=True, block_m=16, block_n=16)
    finally:
        torch.use_deterministic_algorithms(previous)
    _close_or_equal(stats, expected.double(), 1e-6, "stats")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_softplus(dtype):
    """log(1 + exp(x)) to rounding at every x, tiny and huge, and the gradient sigmoid(x) (1/2 at
    an exact tie x = 0, where a clamp-based form gives 1)."""
    x = torch.tensor([-1e30, -1000.0, -40.0, -14.0, -1e-3, 0.0, 1e-3, 14.0, 40.0, 1e30],
                     dtype=dtype, requires_grad=True)
    y = exact_softplus(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double()
    truth = torch.where(x64 > 0, x64 + torch.log1p(torch.exp(-x64)), torch.log1p(torch.exp(x64)))
    eps = torch.finfo(dtype).eps
    assert ((y.double() - truth).abs() <= eps * truth.abs()).all()
    assert torch.allclose(grad.double(), torch.sigmoid(x64), rtol=eps, atol=0)


def test_nan_propagates(backend):
    u = unit_rows(20, 8, backend)
    u[3, 2] = float("nan")
    loss, _ = gram_contrastive(u, torch.arange(20, device=backend) % 10,
                               torch.tensor(2.0, device=backend))
    assert torch.isnan(loss).any()


def test_opcheck():
    u = unit_rows(19, 5, "cpu").requires_grad_()
    q, k = unit_rows(7, 5, "cpu").requires_grad_(), unit_rows(11, 5, "cpu").requires_grad_()
    y, yq, yk = torch.arange(19) % 7, torch.arange(7), torch.arange(11) % 5
    scale = torch.tensor(3.0, requires_grad=True)
    torch.library.opcheck(gram_contrastive, (u, y, scale))
    torch.library.opcheck(cross_contrastive, (q, k, yq, yk, scale, 1, True))
    torch.library.opcheck(cross_contrastive, (q, k, yq, yk, scale, None, False))
    torch.library.opcheck(bank_lse, (q, k.detach(), scale))
    stats = gram_contrastive(u, y, scale)[1].detach()
    coef = backward_coefficients(stats, torch.randn(19))
    torch.library.opcheck(torch.ops.fastcl.gram_contrastive_backward,
                          (u.detach(), y, scale.detach(), coef))
    _, _, stats, col_stats = cross_contrastive(q, k, yq, yk, scale, 1, True)
    torch.library.opcheck(torch.ops.fastcl.cross_contrastive_backward,
                          (q.detach(), k.detach(), yq, yk, scale.detach(), 1,
                           backward_coefficients(stats.detach(), torch.randn(7)),
                           backward_coefficients(col_stats.detach(), torch.randn(11)), True))


def _available_gib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.skipif(_available_gib() < 14, reason="needs ~9 GiB of free memory")
def test_cross_contrastive_64bit_offsets():
    """k with N * D > 2**31 elements: a periodic k (one block repeated) gives an exact analytic
    reference, and the excluded pair sits at the very last element of the matrix."""
    block = unit_rows(1024, 128, "cpu").double()
    repeats = 2**31 // block.numel() + 1
    k = block.float().repeat(repeats, 1)
    n = k.shape[0]
    assert k.numel() > 2**31
    q = unit_rows(2, 128, "cpu").requires_grad_()
    scale = torch.tensor(1 / 0.07)
    # No positives (labels never match): the loss is the lse over all kept pairs.
    row_lse = cross_contrastive(q, k, torch.ones(2, dtype=torch.long),
                                torch.zeros(n, dtype=torch.long), scale, n - 1, False)[0]
    (dq,) = torch.autograd.grad(row_lse.sum(), q)

    s = scale.double() * q.detach().double() @ block.T  # (2, 1024): one period
    p = torch.exp(s - s.max(1, keepdim=True).values)
    total = p.sum(1) * repeats
    total[0] -= p[0, (n - 1) % 1024]
    expected = s.max(1).values + torch.log(total)
    assert_close(row_lse, expected, 1e-5, "row_lse")
    weights = torch.exp(s - expected[:, None]) * repeats
    weights[0, (n - 1) % 1024] -= torch.exp(s[0, (n - 1) % 1024] - expected[0])
    # fp32 sums over 16.8 M columns: 5e-5 relative; a wrong index would be off by O(1).
    assert_close(dq, scale.double() * weights @ block, 5e-5, "dq")


@pytest.mark.parametrize("m,k,d", [(1, 1, 1), (3, 70, 60), (127, 300, 257)])
@pytest.mark.parametrize("temperature,norm", [(0.07, 1.0), (0.01, 1.0), (1.0, 6.0)])
def test_bank_lse(backend, m, k, d, temperature, norm):
    """lse over a bank and its gradient w.r.t. q and scale (the bank gets none); mean is the
    auxiliary output that the backward uses."""
    q, bank = unit_rows(m, d, backend, norm=norm), unit_rows(k, d, backend, norm=norm)
    scale = torch.tensor(1 / temperature, device=backend)
    upstream = [torch.randn(m, dtype=torch.float64, device=backend)]

    def fused(q, scale):
        return bank_lse(q, bank, scale)[0]

    def reference(q, scale):
        return torch.logsumexp(scale * q @ bank.double().T, dim=1)

    (lse,), grads = run_and_grad(fused, [q, scale], [upstream[0].float()])
    (lse64,), grads64 = run_and_grad(reference, [q.double(), scale.double()], upstream)
    assert_close(lse, lse64, 2e-5, "lse")
    for name, a, b in zip(["dq", "dscale"], grads, grads64):
        assert_close(a, b, 2e-5, name)
    mean = bank_lse(q, bank, scale)[1]
    assert_close(mean, bank_lse_ref(q.double(), bank.double(), scale.double())[1], 2e-5, "mean")
