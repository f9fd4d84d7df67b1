"""Queue / memory-bank family on every backend: fastcl::sampled_lse (outputs and d f vs the float64
reference under random upstream gradients), the sampled softmax and NCE losses vs InstDisc's naive
formulas, InstDisc's Z estimate, the ring queue vs a Python list model (wrap-around, B == size,
state_dict round trip), the bank update vs a Python loop model (duplicate indices: the last
occurrence wins), input checks, torch.compile, opcheck and gather=True over 2 gloo processes."""
import io
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastcl
from fastcl import formulas
from fastcl.ops.bank import sampled_lse, sampled_lse_ref
from tests.helpers import assert_close, run_on_ranks, unit_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 arithmetic vs the float64 truth on the same rounded inputs; d f is rounded to its dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NORMALIZED_16BIT_TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2}
SHAPES = [(1, 1, 1), (3, 5, 7), (17, 100, 128), (3, 100, 1), (17, 1, 7), (1, 5, 128)]  # B, K, D


def sampled_case(b, k, d, device, dtype, n=50):
    f = torch.randn(b, d, dtype=torch.float64).to(device=device, dtype=dtype)
    bank = unit_rows(n, d, device, dtype)
    indices = torch.randint(0, n, (b, k + 1), device=device)
    return f, bank, indices


# --- fastcl::sampled_lse -----------------------------------------------------------------------
@pytest.mark.parametrize("b,k,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [-4.0, 3.0])
def test_sampled_lse(backend, b, k, d, dtype, shift):
    f, bank, indices = sampled_case(b, k, d, backend, dtype)
    scale = torch.tensor(1 / 0.07, device=backend)
    nce_shift = torch.tensor(shift, device=backend)
    upstream = torch.randn(3, b, dtype=torch.float64, device=backend)

    x = f.detach().requires_grad_()
    outs = sampled_lse(x, bank, indices, scale, nce_shift)
    (df,) = torch.autograd.grad(sum((o * g.float()).sum() for o, g in zip(outs, upstream)), x)
    x64 = f.double().requires_grad_()
    outs64 = sampled_lse_ref(x64, bank.double(), indices, scale.double(), nce_shift.double())
    (df64,) = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs64, upstream)), x64)

    assert all(o.dtype == torch.float32 for o in outs) and df.dtype == dtype
    for name, out, out64 in zip(["positive", "lse", "nce"], outs, outs64):
        assert_close(out, out64, 2e-5, name)
    assert_close(df, df64, TOL[dtype], "df")


def test_sampled_lse_one_output_used(backend):
    """One output reaching the loss: the others' gradients are zero."""
    f, bank, indices = sampled_case(4, 9, 5, backend, torch.float32)
    scale, shift = torch.tensor(2.0, device=backend), torch.tensor(1.0, device=backend)
    for which in (0, 1, 2):
        x, x64 = f.clone().requires_grad_(), f.double().requires_grad_()
        sampled_lse(x, bank, indices, scale, shift)[which].sum().backward()
        sampled_lse_ref(x64, bank.double(), indices, scale.double(), shift.double())[which].sum().backward()
        assert_close(x.grad, x64.grad, 2e-5, f"df of output {which}")


def test_sampled_lse_triton_small_blocks():
    """Several BLOCK_K steps per anchor, the last one partly padding."""
    pytest.importorskip("triton")
    from fastcl.kernels import bank as kernels

    f, bank, indices = sampled_case(5, 40, 7, "cpu", torch.float32)
    scale, shift = torch.tensor(1 / 0.07), torch.tensor(2.0)
    outs = kernels.sampled_lse_fwd(f, bank, indices, scale, shift, block_k=16)
    f64 = f.double().requires_grad_()
    outs64 = sampled_lse_ref(f64, bank.double(), indices, scale.double(), shift.double())
    for name, out, out64 in zip(["positive", "lse", "nce"], outs, outs64):
        assert_close(out, out64, 2e-5, name)
    grads = torch.randn(3, 5, dtype=torch.float64)
    df = kernels.sampled_lse_bwd(f, bank, indices, scale, shift, outs64[1].float(),
                                 *grads.float(), block_k=16)
    (df64,) = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs64, grads)), f64)
    assert_close(df, df64, 2e-5, "df")


# --- the losses vs InstDisc's formulas ------------------------------------------------------------
@pytest.mark.parametrize("b,k,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_sampled_losses(backend, b, k, d, dtype, normalize):
    n = 50
    f, bank, indices = sampled_case(b, k, d, backend, dtype, n)
    z = 3.0 * n  # a Z of InstDisc's order (mean exp(s) * n)
    upstream = torch.randn(b, dtype=torch.float64, device=backend)
    # normalize=True rounds the unit features to the input dtype (as every fastcl loss does)
    # before the logits, which are 1 / 0.07 times larger: 16-bit losses differ by that rounding.
    loss_tol = NORMALIZED_16BIT_TOL[dtype] if normalize and dtype != torch.float32 else 5e-5
    for name, fused, naive in [
        ("softmax", fastcl.sampled_info_nce, formulas.sampled_info_nce),
        ("nce", lambda x, b, i, t, **kw: fastcl.sampled_nce(x, b, i, z, t, **kw),
         lambda x, b, i, t, **kw: formulas.sampled_nce(x, b, i, z, t, **kw)),
    ]:
        x, x64 = f.clone().requires_grad_(), f.double().requires_grad_()
        loss = fused(x, bank, indices, 0.07, normalize=normalize, reduction="none")
        loss64 = naive(x64, bank.double(), indices, 0.07, normalize=normalize, reduction="none")
        (loss * upstream.float()).sum().backward()
        (loss64 * upstream).sum().backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        assert_close(loss, loss64, loss_tol, name)
        if normalize and d == 1:
            # n(f) = sign(f) for one feature: the exact gradient is 0, ours is fp32 cancellation
            # of the projection (I - n n^T) applied to a d n(f) of about 1 / temperature.
            assert x64.grad.abs().max() < 1e-12 and x.grad.abs().max() < 1e-3
        else:
            assert_close(x.grad, x64.grad, max(loss_tol, 2 * TOL[dtype]), f"{name} grad")
        mean = fused(f, bank, indices, 0.07, normalize=normalize)
        assert_close(mean, loss64.mean(), loss_tol, f"{name} mean")


def test_float64_runs_the_reference():
    f, bank, indices = sampled_case(3, 6, 5, "cpu", torch.float64)
    torch.testing.assert_close(fastcl.sampled_info_nce(f, bank, indices),
                               formulas.sampled_info_nce(f, bank, indices), rtol=1e-12, atol=1e-12)


def test_instdisc_z_estimate_and_freeze(backend):
    """Z = mean exp(s) * n on the first batch (InstDisc's NCEAverage), then frozen; restored Z
    stays frozen."""
    n = 60
    criterion = fastcl.InstDiscNCELoss(n, 0.07)
    bank = unit_rows(n, 16, backend)
    f, idx = unit_rows(8, 16, backend), torch.randint(0, n, (8, 11), device=backend)
    loss = criterion(f, bank, idx)
    rows = bank[idx].double()
    z = torch.exp(torch.einsum("bd,bkd->bk", f.double(), rows) / 0.07).mean() * n
    torch.testing.assert_close(criterion.z.double(), z, rtol=1e-5, atol=0)
    assert_close(loss, formulas.sampled_nce(f.double(), bank.double(), idx, z), 5e-5, "first loss")
    f2 = unit_rows(8, 16, backend)
    criterion(f2, bank, idx)
    torch.testing.assert_close(criterion.z.double(), z, rtol=1e-5, atol=0)

    restored = fastcl.InstDiscNCELoss(n, 0.07)
    restored.load_state_dict(criterion.state_dict())
    assert_close(restored(f2, bank, idx),
                 formulas.sampled_nce(f2.double(), bank.double(), idx, z), 5e-5, "restored")
    torch.testing.assert_close(restored.z, criterion.z, rtol=0, atol=0)


# --- the queue ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("size,batches", [(10, [3, 3, 3, 3, 7, 10, 1, 9]), (7, [7, 7, 2]),
                                          (1, [1, 1]), (33, [17, 17, 17, 5, 33, 16])])
def test_queue_ring_model(backend, dtype, size, batches):
    """Successive enqueues of batch sizes that do not divide size (and B == size) against a Python
    list model of the ring: contents, pointer and count after every step."""
    dim = 5
    queue = fastcl.Queue(size, dim, dtype=dtype).to(backend)
    model = [row.clone() for row in queue.tensor.cpu()]
    pointer = count = 0
    for b in batches:
        keys = torch.randn(b, dim, device=backend, requires_grad=True)
        queue.enqueue(keys)
        for row in keys.detach().cpu().to(dtype):
            model[pointer] = row
            pointer = (pointer + 1) % size
        count = min(count + b, size)
        assert torch.equal(queue.tensor.cpu(), torch.stack(model))
        assert queue.pointer.item() == pointer and queue.count.item() == count
        assert len(queue) == count and queue.tensor.device.type == backend
    assert not queue.tensor.requires_grad


def test_queue_initial_state():
    queue = fastcl.Queue(100, 12)
    torch.testing.assert_close(queue.tensor.norm(dim=1), torch.ones(100))
    assert len(queue) == 0 and queue.pointer.item() == 0
    assert queue.tensor.data_ptr() == queue.contents.data_ptr()  # no copy


def test_queue_state_dict_round_trip(backend):
    queue = fastcl.Queue(11, 4).to(backend)
    for b in (4, 5, 6):
        queue.enqueue(torch.randn(b, 4, device=backend))
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)
    restored = fastcl.Queue(11, 4).to(backend)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.tensor, queue.tensor)
    assert restored.pointer.item() == 4 and restored.count.item() == 11
    keys = torch.randn(9, 4, device=backend)
    queue.enqueue(keys)
    restored.enqueue(keys)
    assert torch.equal(restored.tensor, queue.tensor)
    assert torch.equal(restored.pointer, queue.pointer)


def test_queue_feeds_info_nce():
    queue = fastcl.Queue(64, 8)
    q, k = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    loss = fastcl.info_nce(q, k, queue.tensor, 0.2)
    torch.testing.assert_close(loss, formulas.info_nce(q, k, queue.tensor, 0.2))


# --- the memory bank ---------------------------------------------------------------------------
def loop_model(bank, indices, features, momentum):
    """Python loop: each row from its value before the update, the last occurrence winning."""
    old, new = bank.double().clone(), bank.double().clone()
    for i, f in zip(indices.tolist(), features.double()):
        new[i] = F.normalize(momentum * old[i] + (1 - momentum) * f, dim=0)
    return new


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("d", [1, 7, 128])
@pytest.mark.parametrize("momentum", [0.5, 0.0, 1.0, 0.87])
def test_bank_update(backend, dtype, d, momentum):
    n = 40
    memory = fastcl.MemoryBank(n, d, momentum=momentum, dtype=dtype).to(backend)
    before = memory.tensor.clone()
    indices = torch.tensor([3, 17, 3, 0, 39, 17, 3, 8], device=backend)  # duplicates
    features = torch.randn(8, d, device=backend, dtype=dtype, requires_grad=True)
    memory.update(indices, features)
    truth = loop_model(before.cpu(), indices.cpu(), features.detach().cpu(), momentum)
    rounding = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3,
                torch.float16: 1e-3}[dtype]
    assert memory.tensor.dtype == dtype
    assert_close(memory.tensor, truth, rounding, "bank")
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[indices.cpu()] = False
    assert torch.equal(memory.tensor.cpu()[untouched], before.cpu()[untouched])


def test_bank_duplicate_rule_identical_on_every_backend():
    """The last occurrence wins (not the average, not the first): the rule can fail."""
    from fastcl.ops import cpu_backend

    before = fastcl.MemoryBank(5, 3).tensor
    indices = torch.tensor([2, 2, 2])
    features = torch.eye(3)
    results = []
    for name in ("cpp", "reference", "triton"):
        with cpu_backend(name):
            memory = fastcl.MemoryBank(5, 3)
            memory.memory.copy_(before)
            memory.update(indices, features)
            results.append(memory.tensor.clone())
    expected = F.normalize(0.5 * before[2] + 0.5 * features[2], dim=0)
    first_wins = F.normalize(0.5 * before[2] + 0.5 * features[0], dim=0)
    averaged = F.normalize(0.5 * before[2] + 0.5 * features.mean(0), dim=0)
    assert (expected - first_wins).abs().max() > 0.1 and (expected - averaged).abs().max() > 0.1
    for got in results:
        torch.testing.assert_close(got[2], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(got, results[0], rtol=0, atol=1e-6)  # fp32 rounding only


def test_bank_sample():
    memory = fastcl.MemoryBank(1000, 4)
    anchors = torch.tensor([5, 7, 999])
    idx = memory.sample(anchors, 4096)
    assert idx.shape == (3, 4097) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 0], anchors)
    assert idx.min() >= 0 and idx.max() < 1000 and idx[:, 1:].unique().numel() > 900


def test_bank_state_dict():
    memory = fastcl.MemoryBank(20, 6)
    memory.update(torch.tensor([1, 2]), torch.randn(2, 6))
    restored = fastcl.MemoryBank(20, 6)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.tensor, memory.tensor)
    torch.testing.assert_close(memory.tensor.norm(dim=1), torch.ones(20))


# --- bad input ---------------------------------------------------------------------------------
def test_bad_queue_input():
    queue = fastcl.Queue(8, 4)
    cases = [
        (dict(keys=torch.randn(9, 4)), ValueError, "at most size = 8 rows"),
        (dict(keys=torch.randn(3, 5)), ValueError, r"keys must have shape \(B, 4\)"),
        (dict(keys=torch.randn(3)), ValueError, "keys must have 2 dimensions"),
        (dict(keys=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "keys must be float32"),
        (dict(keys=torch.randn(3, 4, device="meta")), ValueError, "keys must be on the queue"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            queue.enqueue(**kwargs)
    with pytest.raises(ValueError, match="size must be >= 1"):
        fastcl.Queue(0, 4)
    with pytest.raises(TypeError, match="dim must be an int"):
        fastcl.Queue(8, 4.0)
    with pytest.raises(TypeError, match="dtype must be"):
        fastcl.Queue(8, 4, dtype=torch.int32)


def test_bad_bank_input():
    memory = fastcl.MemoryBank(10, 4)
    good_idx, good_f = torch.tensor([1, 2]), torch.randn(2, 4)
    cases = [
        (dict(indices=torch.tensor([1, 10])), ValueError, r"indices must lie in \[0, 10\)"),
        (dict(indices=torch.tensor([-1, 2])), ValueError, r"indices must lie in \[0, 10\)"),
        (dict(indices=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "indices must be an int64"),
        (dict(indices=torch.tensor([1, 2, 3])), ValueError, r"indices must have shape \(2\)"),
        (dict(indices=[1, 2]), TypeError, "indices must be a torch.Tensor"),
        (dict(features=torch.randn(2, 5)), ValueError, r"features must have shape \(B, 4\)"),
    ]
    for kwargs, error, match in cases:
        args = dict(indices=good_idx, features=good_f) | kwargs
        with pytest.raises(error, match=match):
            memory.update(**args)
    for momentum, error in [(1.5, ValueError), (-0.1, ValueError), ("0.5", TypeError)]:
        with pytest.raises(error, match="momentum"):
            fastcl.MemoryBank(10, 4, momentum=momentum)
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        memory.sample(good_idx, 0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(indices=torch.zeros(3, 1, dtype=torch.int64)), ValueError, "K >= 1"),
    (dict(indices=torch.zeros(3, 5, dtype=torch.int32)), TypeError, "indices must be an int64"),
    (dict(indices=torch.zeros(4, 5, dtype=torch.int64)), ValueError, r"indices must have shape \(3, \*\)"),
    (dict(indices=torch.full((3, 5), 20)), ValueError, r"indices must lie in \[0, 20\)"),
    (dict(bank=torch.randn(20, 7)), ValueError, "bank must have shape"),
    (dict(bank=torch.randn(20, 6, device="meta")), ValueError, "same device"),
    (dict(features=torch.randn(3, 6, dtype=torch.float64).int()), TypeError, "features must be"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=torch.tensor(0.1)), TypeError, "temperature must be a float"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
])
def test_bad_loss_input(kwargs, error, match):
    args = dict(features=torch.randn(3, 6), bank=torch.randn(20, 6),
                indices=torch.zeros(3, 5, dtype=torch.int64), temperature=0.07) | kwargs
    with pytest.raises(error, match=match):
        fastcl.sampled_info_nce(**args)


def test_bad_nce_input():
    f, bank, idx = sampled_case(3, 4, 5, "cpu", torch.float32, n=20)
    with pytest.raises(ValueError, match="z must be a finite number > 0"):
        fastcl.sampled_nce(f, bank, idx, z=-1.0)
    with pytest.raises(ValueError, match="bank must have num_items = 30 rows"):
        fastcl.InstDiscNCELoss(30)(f, bank, idx)


# --- torch.compile, opcheck ----------------------------------------------------------------------
def test_compile_enqueue_and_update(backend):
    queue = fastcl.Queue(10, 4).to(backend)
    eager = fastcl.Queue(10, 4).to(backend)
    eager.load_state_dict(queue.state_dict())
    step = torch.compile(lambda keys: queue.enqueue(keys), fullgraph=True, backend="aot_eager")
    for _ in range(4):
        keys = torch.randn(3, 4, device=backend)
        step(keys)
        eager.enqueue(keys)
    assert torch.equal(queue.tensor, eager.tensor) and torch.equal(queue.pointer, eager.pointer)
    assert queue.count.item() == 10

    memory, twin = fastcl.MemoryBank(12, 4).to(backend), fastcl.MemoryBank(12, 4).to(backend)
    twin.load_state_dict(memory.state_dict())
    update = torch.compile(lambda i, f: memory.update(i, f), fullgraph=True, backend="aot_eager")
    indices, features = torch.tensor([1, 5, 1], device=backend), torch.randn(3, 4, device=backend)
    update(indices, features)
    twin.update(indices, features)
    torch.testing.assert_close(memory.tensor, twin.tensor, rtol=0, atol=0)


def test_compile_sampled_losses(backend):
    f, bank, indices = sampled_case(5, 9, 8, backend, torch.float32)

    def losses(x):
        return (fastcl.sampled_info_nce(x, bank, indices, 0.07)
                + fastcl.sampled_nce(x, bank, indices, torch.tensor(100.0, device=backend)))

    x, y = f.clone().requires_grad_(), f.clone().requires_grad_()
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    eager = losses(y)
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x.grad, y.grad)


def test_opcheck(backend):
    f, bank, indices = sampled_case(3, 6, 5, backend, torch.float32)
    scale, shift = torch.tensor(2.0, device=backend), torch.tensor(0.5, device=backend)
    torch.library.opcheck(torch.ops.fastcl.sampled_lse.default,
                          (f.requires_grad_(), bank, indices, scale, shift))
    torch.library.opcheck(torch.ops.fastcl.sampled_lse.default,
                          (f.detach().bfloat16(), bank, indices, scale, shift))
    lse = torch.randn(3, device=backend)
    torch.library.opcheck(torch.ops.fastcl.sampled_lse_backward.default,
                          (f.detach(), bank, indices, scale, shift, lse, lse.sin(), lse.exp(),
                           lse.cos()))
    queue, pointer, count = unit_rows(7, 5, backend), torch.tensor(5, device=backend), torch.tensor(
        0, device=backend)
    torch.library.opcheck(torch.ops.fastcl.ring_enqueue_.default,
                          (queue, pointer, count, torch.randn(4, 5, device=backend)))
    torch.library.opcheck(torch.ops.fastcl.bank_update_.default,
                          (unit_rows(9, 5, backend), torch.tensor([1, 4, 1], device=backend),
                           torch.randn(3, 5, device=backend), 0.5))


# --- gather=True over 2 processes ----------------------------------------------------------------
WORLD = 2


def _worker(rank, results, keys, indices, features, start_queue, start_bank):
    from fastcl.ops import cpu_backend

    for name in ("cpp", "reference"):
        with cpu_backend(name):
            queue = fastcl.Queue(10, 4)
            queue.load_state_dict(start_queue)
            memory = fastcl.MemoryBank(12, 4)
            memory.load_state_dict(start_bank)
            for step in range(3):  # 3 x 2 ranks x 3 rows = 18: wraps around the 10 rows
                queue.enqueue(keys[step, rank], gather=True)
                memory.update(indices[step, rank], features[step, rank], gather=True)
            results[(name, rank)] = SimpleNamespace(queue=queue.state_dict(),
                                                    bank=memory.tensor.clone()).__dict__


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gather():
    """Both ranks end with the same queue and bank, equal to one process enqueuing / updating the
    rank-ordered concatenation (duplicates across ranks: the higher rank's row wins)."""
    keys = torch.randn(3, WORLD, 3, 4)
    indices = torch.randint(0, 12, (3, WORLD, 3))
    indices[0, 0, 0] = indices[0, 1, 2] = 5  # a duplicate across ranks
    features = torch.randn(3, WORLD, 3, 4)
    queue, memory = fastcl.Queue(10, 4), fastcl.MemoryBank(12, 4)
    results = run_on_ranks(_worker, keys, indices, features, queue.state_dict(),
                           memory.state_dict(), world=WORLD)
    for step in range(3):
        queue.enqueue(keys[step].reshape(-1, 4))
        memory.update(indices[step].reshape(-1), features[step].reshape(-1, 4))
    for name in ("cpp", "reference"):
        for rank in range(WORLD):
            got = results[(name, rank)]
            for key, value in queue.state_dict().items():
                assert torch.equal(got["queue"][key], value), (name, rank, key)
            torch.testing.assert_close(got["bank"], memory.tensor, rtol=0, atol=1e-6)
        assert torch.equal(results[(name, 0)]["bank"], results[(name, 1)]["bank"])
