"""fastcl.momentum_update (fastcl::momentum_update_) on every backend against a float64 truth
computed from copies of the inputs: every target/online dtype pair, odd sizes and layouts, many
tensors, modules with and without buffers, momentum as a float and as a tensor (0 and 1 exactly),
no autograd history, torch.compile, opcheck, the Triton kernel with tiny chunks, bad input; and
fastcl.cosine_schedule."""
import math

import pytest
import torch
from torch import nn

from fastcl import cosine_schedule, momentum_update
from fastcl.ops.momentum import momentum_update_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes: 0-dim, 1 element, empty, primes, one tensor spanning several C++ chunks (32768).
SHAPES = [(), (1,), (0,), (3,), (7, 5), (127,), (64, 3, 3, 3), (100_003,)]
# The same on the Triton interpreter, which runs a program per chunk in Python: small sizes.
SMALL_SHAPES = [(), (1,), (0,), (3,), (7, 5), (127,), (16, 3, 3, 3)]


def shapes_for(device):
    from fastcl._backend import cpu_backend_name

    return SMALL_SHAPES if device == "cpu" and cpu_backend_name() == "triton" else SHAPES


def random_tensors(shapes, dtype, device):
    return [torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def truth(target, online, momentum):
    """The update in float64 from copies of the (rounded) inputs: (expected, |m t| + |(1 - m) o|)
    per pair, the second the scale of the fp32 rounding errors."""
    m = float(momentum)
    return [(m * t.double() + (1 - m) * o.double(),
             (m * t.double()).abs() + ((1 - m) * o.double()).abs()) for t, o in zip(target, online)]


def assert_updated(target, expected, what=""):
    """target (in its dtype) equals the float64 truth up to the fp32 computation (a few fp32 ulps
    of the terms) and the final rounding to target's dtype (an ulp, or the subnormal spacing)."""
    for i, (t, (e, scale)) in enumerate(zip(target, expected)):
        assert t.shape == e.shape, f"{what}[{i}] shape"
        if t.numel() == 0:
            continue
        e, scale = e.to(t.device), scale.to(t.device)
        info = torch.finfo(t.dtype)
        bound = (info.eps * e.abs() + info.eps * info.smallest_normal
                 + 4 * torch.finfo(torch.float32).eps * scale)
        err = (t.double() - e).abs()
        assert (err <= bound).all(), (f"{what}[{i}] {t.dtype}: error {err.max().item():.3g} "
                                      f"above the bound")


# --- against the float64 truth -----------------------------------------------------------------
@pytest.mark.parametrize("target_dtype", DTYPES)
@pytest.mark.parametrize("online_dtype", DTYPES)
def test_matches_float64(backend, target_dtype, online_dtype):
    shapes = shapes_for(backend)
    target = random_tensors(shapes, target_dtype, backend)
    online = random_tensors(shapes, online_dtype, backend)
    expected = truth(target, online, 0.9)
    momentum_update(target, online, 0.9)
    assert all(t.dtype == target_dtype for t in target)
    assert_updated(target, expected, f"{target_dtype} <- {online_dtype}")


def test_the_tolerance_can_tell(backend):
    """One wrong element (or momentum off by one fp32 ulp of 1 - m) is caught."""
    target = random_tensors([(127,)], torch.float32, backend)
    online = random_tensors([(127,)], torch.float32, backend)
    expected = truth(target, online, 0.9)
    momentum_update(target, online, 0.9)
    target[0][5] += 1e-5
    with pytest.raises(AssertionError):
        assert_updated(target, expected)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_momentum_values(backend, momentum, as_tensor):
    shapes = shapes_for(backend)
    target = random_tensors(shapes, torch.float32, backend)
    online = random_tensors(shapes, torch.bfloat16, backend)
    m = torch.tensor(momentum, device=backend) if as_tensor else momentum
    expected = truth(target, online, m)  # a float32 tensor holds float32(momentum)
    momentum_update(target, online, m)
    assert_updated(target, expected, f"momentum {momentum}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_edges_are_exact(backend, dtype):
    """Momentum 1 leaves the target bit for bit; momentum 0 makes it online rounded to its dtype."""
    shapes = shapes_for(backend)
    target = random_tensors(shapes, dtype, backend)
    online = random_tensors(shapes, torch.float32, backend)
    before = [t.clone() for t in target]
    momentum_update(target, online, 1.0)
    for t, b in zip(target, before):
        assert torch.equal(t, b)
    momentum_update(target, online, torch.tensor(0.0, device=backend))
    for t, o in zip(target, online):
        assert torch.equal(t, o.to(dtype))


def test_momentum_tensor_dtypes(backend):
    """A float64, float32 or bfloat16 0-dim momentum is used with its value (1 - m in float64)."""
    for m_dtype in (torch.float64, torch.float32, torch.bfloat16):
        m = torch.tensor(0.999, dtype=m_dtype, device=backend)
        target = random_tensors([(127,), (5, 5)], torch.float32, backend)
        online = random_tensors([(127,), (5, 5)], torch.float32, backend)
        expected = truth(target, online, m.double().item())
        momentum_update(target, online, m)
        assert_updated(target, expected, str(m_dtype))


def test_float64_runs_the_reference(backend):
    target = random_tensors([(3, 4), ()], torch.float64, backend)
    online = random_tensors([(3, 4), ()], torch.float32, backend)
    expected = truth(target, online, 0.7)
    momentum_update(target, online, 0.7)
    for t, (e, _) in zip(target, expected):
        torch.testing.assert_close(t, e, rtol=1e-15, atol=1e-15)


def test_many_tensors_mixed_groups(backend):
    """161 tensors (as many as ResNet-50 has parameters) of all sizes, with three (target,
    online) dtype groups mixed in one call, in any order."""
    sizes = [1, 2, 3, 64, 127, 256, 300, 1000] if backend == "cpu" else [1, 64, 1000, 50_000]
    pairs = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
             (torch.float16, torch.float32)]
    target, online = [], []
    for i in range(161):
        t_dtype, o_dtype = pairs[i % 3]
        shape = (sizes[(7 * i) % len(sizes)],)
        target += random_tensors([shape], t_dtype, backend)
        online += random_tensors([shape], o_dtype, backend)
    expected = truth(target, online, 0.996)
    momentum_update(target, online, 0.996)
    assert_updated(target, expected, "many")


# --- layouts -----------------------------------------------------------------------------------
def test_layouts(backend):
    """Dense non-contiguous pairs (channels_last, transposed) are updated in place; mismatched
    layouts and targets with gaps (slices) go through dense copies. All equal the truth."""
    base_t = torch.randn(8, 6, 4, 5, device=backend)
    base_o = torch.randn(8, 6, 4, 5, device=backend)
    cases = [
        (base_t.to(memory_format=torch.channels_last), base_o.to(memory_format=torch.channels_last)),
        (base_t[0, 0].T, base_o[0, 0].T),  # transposed, same layout
        (base_t[1, 0].clone(), base_o[1, 0].T.contiguous().T),  # online transposed only
        (base_t[2, 0].T, base_o[2, 0].T.clone()),  # target transposed only
        (base_t[3, :, ::2], base_o[3, :, ::2]),  # target with gaps
        (base_t[4, 0, 0, 0], base_o[4, 0, 0, 0]),  # 0-dim views at an offset
        # both contiguous, strides differ in a size-1 dim: (1, 1) and (1, 4)
        (base_t[5, 0, 0, :4].unsqueeze(1), base_o[5, 0, 0, :4].view(1, 4).T),
    ]
    target = [t for t, _ in cases]
    online = [o for _, o in cases]
    expected = truth(target, online, 0.75)
    pointers = [t.data_ptr() for t in target]
    momentum_update(target, online, 0.75)
    assert_updated(target, expected, "layouts")
    assert [t.data_ptr() for t in target] == pointers
    assert target[0].is_contiguous(memory_format=torch.channels_last)


def test_online_is_read_only(backend):
    target = random_tensors([(33,), (4, 4)], torch.bfloat16, backend)
    online = random_tensors([(33,), (4, 4)], torch.float32, backend)
    before = [o.clone() for o in online]
    momentum_update(target, online, 0.5)
    for o, b in zip(online, before):
        assert torch.equal(o, b)


# --- modules -----------------------------------------------------------------------------------
def small_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10), nn.BatchNorm1d(10))


def train_bn_stats(net):
    """Changes every BN buffer (running mean, var and num_batches_tracked) of net."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 6, 6, device=next(net.parameters()).device))


def modules(backend, online_dtype=torch.float32):
    target, online = small_net(0).to(backend), small_net(1).to(backend)
    train_bn_stats(online)
    return target, online.to(online_dtype)


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
def test_modules_parameters_only(backend, online_dtype):
    """buffers=False: every parameter updated, every buffer left alone; the same as the lists."""
    target, online = modules(backend, online_dtype)
    expected = truth(list(target.parameters()), list(online.parameters()), 0.99)
    buffers = [b.clone() for b in target.buffers()]
    momentum_update(target, online, 0.99)
    assert_updated(list(target.parameters()), expected, "parameters")
    for b, before in zip(target.buffers(), buffers):
        assert torch.equal(b, before)


def test_modules_with_buffers(backend):
    """buffers=True: floating buffers are updated like parameters, integer ones copied."""
    target, online = modules(backend)
    t_buffers, o_buffers = dict(target.named_buffers()), dict(online.named_buffers())
    floating = [n for n, b in t_buffers.items() if b.is_floating_point()]
    integer = [n for n, b in t_buffers.items() if not b.is_floating_point()]
    assert floating and integer  # running_mean / running_var, num_batches_tracked
    expected = truth([t_buffers[n] for n in floating], [o_buffers[n] for n in floating], 0.9)
    momentum_update(target, online, 0.9, buffers=True)
    assert_updated([t_buffers[n] for n in floating], expected, "buffers")
    for n in integer:
        assert t_buffers[n].dtype == torch.int64 and torch.equal(t_buffers[n], o_buffers[n])
        assert t_buffers[n].item() == 3


def test_targets_requiring_grad(backend):
    """Runs with grad mode on, on parameters that require grad: no history, still leaves."""
    target, online = modules(backend)
    loss = sum(p.sum() for p in online.parameters())  # online has a graph around it
    momentum_update(target, online, 0.5)
    for p in target.parameters():
        assert p.requires_grad and p.is_leaf and p.grad_fn is None
    loss.backward()  # the online graph is intact


# --- torch.compile, opcheck, Triton chunks -----------------------------------------------------
@pytest.mark.parametrize("as_tensor", [False, True])
def test_compile_fullgraph(backend, as_tensor):
    target, online = modules(backend)
    reference = small_net(0).to(backend)
    momentum = torch.tensor(0.9, dtype=torch.float64, device=backend) if as_tensor else 0.9

    def step(target, online, momentum):
        momentum_update(target, online, momentum, buffers=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(target, online, momentum)
    momentum_update(reference, online, 0.9, buffers=True)
    for (name, a), b in zip(target.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert all(p.grad_fn is None for p in target.parameters())


def test_opcheck(backend):
    target = random_tensors([(5, 3), (), (17,)], torch.float32, backend)
    online = random_tensors([(5, 3), (), (17,)], torch.bfloat16, backend)
    momentum = torch.tensor(0.9, dtype=torch.float64, device=backend)
    torch.library.opcheck(torch.ops.fastcl.momentum_update_.default, (target, online, momentum))
    half = random_tensors([(4,)], torch.float16, backend)
    torch.library.opcheck(torch.ops.fastcl.momentum_update_.default,
                          (half, [h.float() for h in half], momentum.float()))


@pytest.mark.parametrize("chunk,block", [(16, 4), (8, 8), (64, 16)])
def test_triton_small_chunks(chunk, block):
    """The Triton launcher with chunks far smaller than the tensors: several programs per tensor,
    partial last chunks, several blocks per program; unaligned offsets (sliced storage)."""
    pytest.importorskip("triton")
    from fastcl.kernels import momentum as kernels

    storage = torch.randn(1000)
    target = [storage[1:38], storage[40:41], storage[100:100 + 161].view(7, 23)]
    online = random_tensors([(37,), (1,), (7, 23)], torch.bfloat16, "cpu")
    expected = truth(target, online, 0.8)
    kernels.momentum_update_(target, online, torch.tensor(0.8), chunk=chunk, block=block)
    assert_updated(target, expected, "small chunks")


def test_triton_table_is_cached():
    """The second step over the same tensors reuses the device table (no host-to-device copy);
    other tensors get their own."""
    pytest.importorskip("triton")
    from fastcl.kernels import momentum as kernels

    target = random_tensors([(37,), (5,)], torch.float32, "cpu")
    online = random_tensors([(37,), (5,)], torch.float32, "cpu")
    table, _ = kernels._chunk_table(target, online, 16)
    assert kernels._chunk_table(target, online, 16)[0] is table
    assert table[2].tolist() == [16, 16, 5, 5]  # chunk lengths: 37 = 16 + 16 + 5, then 5
    assert kernels._chunk_table(target[:1], online[:1], 16)[0] is not table


# --- bad input ---------------------------------------------------------------------------------
def _lists(n=2, dtype=torch.float32):
    return random_tensors([(3,)] * n, dtype, "cpu")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(momentum="0.9"), TypeError, "momentum must be a float or a 0-dim tensor, got str"),
    (dict(momentum=True), TypeError, "momentum must be a float or a 0-dim tensor, got bool"),
    (dict(momentum=torch.tensor([0.9])), ValueError, r"0-dim tensor, got a tensor of shape \(1,\)"),
    (dict(momentum=torch.tensor(1)), TypeError, "momentum must be a floating tensor"),
    (dict(momentum=torch.tensor(0.9, device="meta")), ValueError,
     "momentum must be on the device of the targets, got momentum on meta and target"),
    (dict(online=_lists(3)), ValueError, "must have as many tensors, got 2 and 3"),
    (dict(online=[torch.randn(3), torch.randn(4)]), ValueError,
     r"target\[1\] and online\[1\] must have the same shape, got \(3,\) and \(4,\)"),
    (dict(target=_lists(2, torch.int64)), TypeError, r"target\[0\] must be float32, bfloat16"),
    (dict(online=[torch.randn(3), torch.ones(3, dtype=torch.int32)]), TypeError,
     r"online\[1\] must be float32"),
    (dict(online=[torch.randn(3), torch.randn(3, device="meta")]), ValueError,
     r"target\[1\] and online\[1\] must be on the same device, got cpu and meta"),
    (dict(online=[torch.randn(3), 1.0]), TypeError, r"online\[1\] must be a torch.Tensor"),
    (dict(target=torch.randn(2, 3)), TypeError, "target must be an nn.Module or a sequence of "
                                                "tensors, got Tensor"),
    (dict(online=nn.Linear(3, 3)), TypeError, "must both be nn.Modules or both sequences"),
    (dict(buffers=True), ValueError, "buffers=True applies to nn.Module arguments"),
    (dict(buffers=1), TypeError, "buffers must be a bool"),
])
def test_bad_input(kwargs, error, match):
    args = dict(target=_lists(), online=_lists(), momentum=0.9) | kwargs
    momentum = args.pop("momentum")
    with pytest.raises(error, match=match):
        momentum_update(args.pop("target"), args.pop("online"), momentum, **args)


def test_bad_modules():
    """Mismatched structures name the parameter (or buffer) that differs."""
    with pytest.raises(ValueError, match=r"parameters only in target: \['1.weight', '1.bias'\], "
                                         r"only in online: \[\]"):
        momentum_update(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)),
                        nn.Sequential(nn.Linear(3, 3)), 0.9)
    with pytest.raises(ValueError, match=r"target parameter '0.weight' and online parameter "
                                         r"'0.weight' must have the same shape, got \(4, 3\)"):
        momentum_update(nn.Sequential(nn.Linear(3, 4)), nn.Sequential(nn.Linear(3, 3)), 0.9)
    with pytest.raises(ValueError, match=r"buffers only in target: \['1.running_mean'"):
        momentum_update(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),
                        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)),
                        0.9, buffers=True)
    target, online = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    online.num_batches_tracked = online.num_batches_tracked.float()
    with pytest.raises(TypeError, match="online buffer 'num_batches_tracked' must be an integer"):
        momentum_update(target, online, 0.9, buffers=True)


def test_bad_input_leaves_targets_untouched():
    """Checks run before any update: a mismatch in the last pair changes nothing."""
    target = _lists(3)
    before = [t.clone() for t in target]
    with pytest.raises(ValueError):
        momentum_update(target, _lists(2) + [torch.randn(4)], 0.9)
    assert all(torch.equal(t, b) for t, b in zip(target, before))


def test_reference_is_the_formula():
    """momentum_update_ref in float64 is the formula itself."""
    t, o = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    expected = 0.3 * t + 0.7 * o
    momentum_update_ref([t], [o], torch.tensor(0.3, dtype=torch.float64))
    torch.testing.assert_close(t, expected, rtol=1e-15, atol=0)


# --- cosine_schedule ---------------------------------------------------------------------------
def test_cosine_schedule_values():
    assert cosine_schedule(0, 100, 0.996, 1.0) == 0.996
    assert cosine_schedule(100, 100, 0.996, 1.0) == 1.0
    assert math.isclose(cosine_schedule(50, 100, 0.996, 1.0), 0.998, rel_tol=1e-15)
    assert math.isclose(cosine_schedule(25, 100, 0.0, 1.0), (1 - math.cos(math.pi / 4)) / 2)
    assert cosine_schedule(30, 100, 0.2, 0.7) < cosine_schedule(31, 100, 0.2, 0.7)  # monotone
    assert cosine_schedule(30, 100, 0.7, 0.2) > cosine_schedule(31, 100, 0.7, 0.2)


@pytest.mark.parametrize("t", [0, 1, 17, 250, 499, 500])
def test_cosine_schedule_is_moco_v3(t):
    """MoCo v3: m = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0), i.e. start = m0, end = 1."""
    m0, total = 0.99, 500
    moco = 1 - (1 + math.cos(math.pi * t / total)) / 2 * (1 - m0)
    assert math.isclose(cosine_schedule(t, total, m0, 1.0), moco, rel_tol=1e-15)


@pytest.mark.parametrize("args,error,match", [
    ((0, 0, 0.9, 1.0), ValueError, "total_steps must be >= 1, got 0"),
    ((0, 10.0, 0.9, 1.0), TypeError, "total_steps must be an int, got float"),
    ((0, True, 0.9, 1.0), TypeError, "total_steps must be an int, got bool"),
    ((-1, 10, 0.9, 1.0), ValueError, r"step must be in \[0, total_steps\] = \[0, 10\], got -1"),
    ((11, 10, 0.9, 1.0), ValueError, r"step must be in \[0, total_steps\]"),
    (("1", 10, 0.9, 1.0), TypeError, "step must be an int or a float, got str"),
    ((1, 10, float("nan"), 1.0), ValueError, "start must be a finite number"),
    ((1, 10, 0.9, float("inf")), ValueError, "end must be a finite number"),
    ((1, 10, 0.9, None), TypeError, "end must be a float, got NoneType"),
])
def test_cosine_schedule_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        cosine_schedule(*args)


def test_schedule_drives_a_momentum_tensor(backend):
    """The pattern for compiled / captured steps: fill the momentum tensor from the schedule."""
    momentum = torch.zeros((), device=backend)
    target = random_tensors([(9,)], torch.float32, backend)
    online = random_tensors([(9,)], torch.float32, backend)
    for step in range(3):
        value = cosine_schedule(step, 10, 0.9, 1.0)
        expected = truth(target, online, value)
        momentum.fill_(value)
        momentum_update(target, online, momentum)
        assert_updated(target, expected, f"step {step}")
