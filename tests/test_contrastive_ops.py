"""fastcl::gram_lse and fastcl::cross_lse on every backend against the float64 reference:
outputs and the gradients of every input (scale included) under a random upstream gradient."""
import pytest
import torch

from fastcl.ops.contrastive import (
    bank_lse,
    bank_lse_ref,
    cross_lse,
    cross_lse_ref,
    gram_lse,
    gram_lse_ref,
)

# fp32 kernels vs the float64 truth; 16-bit inputs are rounded first, so only accumulation differs.
TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def unit_rows(m, d, device, dtype=torch.float32, norm=1.0):
    x = torch.randn(m, d, dtype=torch.float64)
    return (norm * x / x.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)


def assert_close(actual, expected, tol, what):
    expected = expected.to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not expected.numel():
        return
    err = (actual.double().cpu() - expected.cpu()).abs().max().item()
    scale = expected.abs().max().item() + 1e-12
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def run_and_grad(fn, inputs, upstream):
    """Outputs of fn(*inputs) and the gradients of sum(upstream * outputs) w.r.t. every input."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    total = sum((o * g).sum() for o, g in zip(outputs, upstream) if o.numel())
    return outputs, torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("m,d", [(2, 1), (3, 60), (127, 257), (300, 16)])
@pytest.mark.parametrize("temperature,norm", [(0.5, 1.0), (0.07, 1.0), (0.01, 1.0), (1.0, 6.0)])
def test_gram_lse(backend, m, d, temperature, norm):
    u = unit_rows(m, d, backend, norm=norm)
    scale = torch.tensor(1.0 / temperature, device=backend)
    upstream = [torch.randn(m, dtype=torch.float64, device=backend)]
    (lse,), (du, dscale) = run_and_grad(gram_lse, [u, scale], [upstream[0].float()])
    (lse64,), (du64, dscale64) = run_and_grad(gram_lse_ref, [u.double(), scale.double()], upstream)
    assert lse.dtype == torch.float32 and du.dtype == u.dtype
    assert_close(lse, lse64, 2e-5, "lse")
    assert_close(du, du64, 2e-5, "du")
    assert_close(dscale, dscale64, 2e-5, "dscale")


@pytest.mark.parametrize("m,n,d", [(2, 5, 1), (3, 3, 60), (127, 70, 257), (65, 300, 16)])
@pytest.mark.parametrize("diag_offset", [None, 0, 2, -1, 1000])
@pytest.mark.parametrize("with_col", [False, True])
def test_cross_lse(backend, m, n, d, diag_offset, with_col):
    q, k = unit_rows(m, d, backend), unit_rows(n, d, backend)
    scale = torch.tensor(1 / 0.07, device=backend)
    upstream = [torch.randn(m, dtype=torch.float64, device=backend),
                torch.randn(n, dtype=torch.float64, device=backend)]

    def fused(q, k, scale):
        return cross_lse(q, k, scale, diag_offset, with_col)

    def reference(q, k, scale):
        return cross_lse_ref(q, k, scale, diag_offset, with_col)

    outs, grads = run_and_grad(fused, [q, k, scale], [g.float() for g in upstream])
    outs64, grads64 = run_and_grad(reference, [q.double(), k.double(), scale.double()], upstream)
    assert outs[1].shape == ((n,) if with_col else (0,))
    for name, a, b in zip(["row_lse", "col_lse"], outs, outs64):
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
    scale = torch.tensor(1 / 0.07, device=backend)
    upstream = torch.randn(70, device=backend)
    (lse,), (du, _) = run_and_grad(gram_lse, [u, scale], [upstream])
    (lse64,), (du64, _) = run_and_grad(gram_lse_ref, [u.double(), scale.double()], [upstream.double()])
    assert lse.dtype == torch.float32 and du.dtype == dtype
    assert_close(lse, lse64, TOL[dtype], "lse")
    assert_close(du, du64, 1e-2, "du")  # du is rounded to the input dtype


def test_nan_propagates(backend):
    u = unit_rows(20, 8, backend)
    u[3, 2] = float("nan")
    lse = gram_lse(u, torch.tensor(2.0, device=backend))
    assert torch.isnan(lse).any()


def test_opcheck():
    u = unit_rows(19, 5, "cpu").requires_grad_()
    q, k = unit_rows(7, 5, "cpu").requires_grad_(), unit_rows(11, 5, "cpu").requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    torch.library.opcheck(gram_lse, (u, scale))
    torch.library.opcheck(cross_lse, (q, k, scale, 1, True))
    torch.library.opcheck(cross_lse, (q, k, scale, None, False))
    torch.library.opcheck(bank_lse, (q, k.detach(), scale))
    lse = gram_lse(u, scale).detach()
    torch.library.opcheck(torch.ops.fastcl.gram_lse_backward, (u.detach(), scale.detach(), lse,
                                                               torch.randn(19)))


def _available_gib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.skipif(_available_gib() < 14, reason="needs ~9 GiB of free memory")
def test_cross_lse_64bit_offsets():
    """k with N * D > 2**31 elements: a periodic k (one block repeated) gives an exact analytic
    reference, and the excluded pair sits at the very last element of the matrix."""
    block = unit_rows(1024, 128, "cpu").double()
    repeats = 2**31 // block.numel() + 1
    k = block.float().repeat(repeats, 1)
    n = k.shape[0]
    assert k.numel() > 2**31
    q = unit_rows(2, 128, "cpu").requires_grad_()
    scale = torch.tensor(1 / 0.07)
    row_lse, _ = cross_lse(q, k, scale, n - 1, False)  # leaves out (0, n - 1) only
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
        return cross_lse_ref(q, bank.double(), scale, None, False)[0]

    (lse,), grads = run_and_grad(fused, [q, scale], [upstream[0].float()])
    (lse64,), grads64 = run_and_grad(reference, [q.double(), scale.double()], upstream)
    assert_close(lse, lse64, 2e-5, "lse")
    for name, a, b in zip(["dq", "dscale"], grads, grads64):
        assert_close(a, b, 2e-5, name)
    mean = bank_lse(q, bank, scale)[1]
    assert_close(mean, bank_lse_ref(q.double(), bank.double(), scale.double())[1], 2e-5, "mean")
