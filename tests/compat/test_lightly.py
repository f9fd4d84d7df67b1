"""fastcl.compat.lightly against lightly 1.6's loss classes: lightly's own test cases (files named
below, from github.com/lightly-ai/lightly tests/loss/), then values, gradients and state (memory
bank, DINO center) against the real classes in fp32 / bf16 / fp16, and 2 gloo processes."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastcl.compat import lightly as compat
from tests.compat.peers import DTYPES, TOL, compare, lightly_loss
from tests.helpers import assert_close, run_on_ranks


@pytest.fixture
def peer():
    return lightly_loss()


# ----------------------------------------------------------------------------------------------
# lightly's tests/loss/test_ntx_ent_loss.py, run against the adapter (memory_bank_size as the
# (num_features, dim) tuple that lightly 1.6 requires)
# ----------------------------------------------------------------------------------------------
def _ntxent_manual(out0, out1, temperature):
    """The test file's _calc_ntxent_loss_manual (SimCLR's Algorithm 1), in float64 matrices."""
    z = F.normalize(torch.cat([out0, out1]).double(), dim=1)
    n = out0.shape[0]
    e = torch.exp(z @ z.T / temperature)
    denominator = e.sum(1) - e.diagonal()
    index = torch.arange(2 * n)
    return -torch.log(e[index, (index + n) % (2 * n)] / denominator).mean().item()


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    compat.NTXentLoss(gather_distributed=True)
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        compat.NTXentLoss(gather_distributed=True)
    with pytest.raises(ValueError, match="sinkhorn_gather_distributed"):
        compat.SwaVLoss(sinkhorn_gather_distributed=True)


@pytest.mark.parametrize("n_samples", [1, 2, 4])
@pytest.mark.parametrize("dimension", [1, 2, 16, 64])
@pytest.mark.parametrize("temperature", [0.1, 1, 10])
@pytest.mark.parametrize("gather_distributed", [False, True])
def test_ntxent_with_values(n_samples, dimension, temperature, gather_distributed):
    out0 = torch.tensor(np.random.normal(0, 1, size=(n_samples, dimension)), dtype=torch.float32)
    out1 = torch.tensor(np.random.normal(0, 1, size=(n_samples, dimension)), dtype=torch.float32)
    loss_fn = compat.NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)
    l1, l2 = float(loss_fn(out0, out1)), float(loss_fn(out1, out0))
    assert l1 == pytest.approx(l2, abs=1e-5)
    assert l1 == pytest.approx(_ntxent_manual(out0, out1, temperature), abs=1e-5)


@pytest.mark.parametrize("n_samples", [1, 2, 8, 16])
@pytest.mark.parametrize("memory_bank_size", [0, 1, 2, 8, 15, 16, 17])
@pytest.mark.parametrize("temperature", [0.1, 1, 7])
@pytest.mark.parametrize("gather_distributed", [False, True])
def test_ntxent_with_correlated_embedding(n_samples, memory_bank_size, temperature,
                                          gather_distributed):
    out0 = np.random.random((n_samples, 1))
    out1 = np.random.random((n_samples, 1))
    out0 = torch.tensor(np.concatenate([out0, 2 * out0], axis=1), dtype=torch.float32)
    out1 = torch.tensor(np.concatenate([out1, 2 * out1], axis=1), dtype=torch.float32)
    out0.requires_grad = True
    bank = (memory_bank_size, 2) if memory_bank_size else 0
    loss_fn = compat.NTXentLoss(temperature=temperature, memory_bank_size=bank,
                                gather_distributed=gather_distributed)
    if memory_bank_size > 0:
        for _ in range(memory_bank_size // n_samples + 2):  # fill the bank over several rounds
            loss = loss_fn(out0, out1).item()
        expected = -np.log(1 / (memory_bank_size + 1))
    else:
        loss = loss_fn(out0, out1).item()
        expected = -np.log(1 / (2 * n_samples - 1))
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dim", [32, 1])
def test_ntxent_forward_pass_symmetric(dim):
    loss_fn = compat.NTXentLoss(memory_bank_size=0)
    for bsz in range(1, 20):
        batch_1, batch_2 = torch.randn(bsz, dim), torch.randn(bsz, dim)
        assert (loss_fn(batch_1, batch_2) - loss_fn(batch_2, batch_1)).pow(2).item() == \
            pytest.approx(0.0)


def test_ntxent_negative_temperature_raises():
    # lightly's test_forward_pass_neg_temp: fastcl takes temperatures > 0 only.
    with pytest.raises(ValueError, match="temperature"):
        compat.NTXentLoss(temperature=-1.0, memory_bank_size=0)


def test_ntxent_forward_pass_memory_bank():
    loss_fn = compat.NTXentLoss(memory_bank_size=(64, 32))
    for bsz in range(1, 20):
        loss = loss_fn(torch.randn(bsz, 32), torch.randn(bsz, 32))
        assert math.isfinite(loss.item())


@pytest.mark.parametrize("size", [1, 5, (5,), (5, 2, 3), (-1, 2)])
def test_ntxent_bad_memory_bank_size(size):
    with pytest.raises(ValueError, match="memory_bank_size"):
        compat.NTXentLoss(memory_bank_size=size)


# ----------------------------------------------------------------------------------------------
# lightly's tests/loss/test_dino_loss.py, run against the adapter: OriginalDINOLoss is that
# file's copy of DINO's code (facebookresearch/dino main_dino.py, DINOLoss), retyped
# ----------------------------------------------------------------------------------------------
class OriginalDINOLoss(torch.nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        with torch.no_grad():
            batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (
                1 - self.center_momentum)
        return total_loss


def _assert_dino_equal_to_original(batch_size=3, n_global=2, n_local=6, output_dim=4,
                                   warmup_teacher_temp=0.04, teacher_temp=0.04,
                                   warmup_teacher_temp_epochs=30, student_temp=0.1,
                                   center_momentum=0.9, epoch=0, n_epochs=100):
    loss_fn = compat.DINOLoss(output_dim=output_dim, teacher_temp=teacher_temp,
                              student_temp=student_temp, center_momentum=center_momentum)
    orig_loss_fn = OriginalDINOLoss(output_dim, n_global + n_local, warmup_teacher_temp,
                                    teacher_temp, warmup_teacher_temp_epochs, n_epochs,
                                    student_temp, center_momentum)
    teacher = torch.nn.Linear(output_dim, output_dim).requires_grad_(False)
    student = torch.nn.Linear(output_dim, output_dim)
    orig_student = torch.nn.Linear(output_dim, output_dim)
    orig_student.load_state_dict(student.state_dict())
    optimizer = torch.optim.SGD(student.parameters(), lr=1)
    orig_optimizer = torch.optim.SGD(orig_student.parameters(), lr=1)

    torch.manual_seed(0)
    teacher_in = [torch.rand(batch_size, output_dim) for _ in range(n_global)]
    torch.manual_seed(1)
    student_in = [torch.rand(batch_size, output_dim) for _ in range(n_global + n_local)]
    loss = loss_fn(teacher_out=[teacher(v) for v in teacher_in],
                   student_out=[student(v) for v in student_in],
                   teacher_temp=orig_loss_fn.teacher_temp_schedule[epoch])
    orig_loss = orig_loss_fn(orig_student(torch.cat(student_in)), teacher(torch.cat(teacher_in)),
                             epoch)
    optimizer.zero_grad()
    orig_optimizer.zero_grad()
    loss.backward()
    orig_loss.backward()
    optimizer.step()
    orig_optimizer.step()
    assert torch.allclose(loss_fn.center.squeeze(), orig_loss_fn.center.squeeze())
    assert torch.allclose(loss, orig_loss)
    for param, orig_param in zip(student.parameters(), orig_student.parameters()):
        torch.testing.assert_close(param, orig_param)


@pytest.mark.parametrize("batch_size", range(1, 4))
@pytest.mark.parametrize("n_local", range(0, 4))
@pytest.mark.parametrize("output_dim", range(1, 4))
def test_dino_different_input_sizes(batch_size, n_local, output_dim):
    _assert_dino_equal_to_original(batch_size=batch_size, n_local=n_local, output_dim=output_dim)


@pytest.mark.parametrize("warmup_teacher_temp", [0.01, 0.04, 0.07])
@pytest.mark.parametrize("teacher_temp", [0.01, 0.04, 0.07])
@pytest.mark.parametrize("warmup_teacher_temp_epochs", [0, 1, 10])
@pytest.mark.parametrize("epoch", [0, 1, 10, 20])
def test_dino_teacher_temperature_warmup(warmup_teacher_temp, teacher_temp,
                                         warmup_teacher_temp_epochs, epoch):
    _assert_dino_equal_to_original(warmup_teacher_temp=warmup_teacher_temp,
                                   teacher_temp=teacher_temp,
                                   warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
                                   epoch=epoch)


@pytest.mark.parametrize("student_temp", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("center_momentum", [0.5, 0.9, 0.95])
def test_dino_other_parameters(student_temp, center_momentum):
    _assert_dino_equal_to_original(student_temp=student_temp, center_momentum=center_momentum)


def test_dino_single_view_raises():
    with pytest.raises(ValueError, match="at least two views"):
        compat.DINOLoss(output_dim=8)([torch.randn(4, 8)], [torch.randn(4, 8)])


def test_dino_more_teacher_than_student_views_raises():
    with pytest.raises(ValueError, match="teacher_out has 3 views"):
        compat.DINOLoss(output_dim=8)([torch.randn(4, 8)] * 3, [torch.randn(4, 8)] * 2)


def test_dino_center_equivalence(peer):
    """update_center equals lightly's Center.update (test_center__equivalence), on the
    documented (views, batch, output_dim) input (a 2-D one raises)."""
    criterion = compat.DINOLoss(output_dim=32, center_momentum=0.9)
    center = peer.Center(size=(1, 1, 32), momentum=0.9)
    x = torch.rand(2, 3, 32)
    criterion.update_center(teacher_out=x)
    center.update(x=x)
    assert torch.allclose(criterion.center, center.value)
    with pytest.raises(ValueError, match="teacher_out must have 3 dimensions"):
        criterion.update_center(teacher_out=torch.rand(2, 32))


# ----------------------------------------------------------------------------------------------
# lightly's tests/loss/test_swav_loss.py and test_negative_cosine_similarity.py, run against the
# adapters (sinkhorn_iterations=0, which leaves the codes unnormalized, raises)
# ----------------------------------------------------------------------------------------------
def test_swav_zero_iterations_raises():
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        compat.SwaVLoss(sinkhorn_iterations=0)


@pytest.mark.parametrize("n_low_res", range(6))
@pytest.mark.parametrize("sinkhorn_iterations", [1, 2])
@pytest.mark.parametrize("case", ["plain", "queue", "bsz_1", "1d"])
def test_swav_forward_pass(n_low_res, sinkhorn_iterations, case):
    n = 32
    shape = {"plain": (n, n), "queue": (n, n), "bsz_1": (1, n), "1d": (n, 1)}[case]
    high_res = [torch.eye(*shape) for _ in range(2)]
    low_res = [torch.eye(*shape) for _ in range(n_low_res)]
    queue = [torch.eye(128, 32) for _ in range(2)] if case == "queue" else None
    loss = compat.SwaVLoss(sinkhorn_iterations=sinkhorn_iterations)(high_res, low_res, queue)
    assert loss.shape == (1,)
    if case != "bsz_1":
        assert loss.item() < 0.5  # almost zero for unit matrices


def test_negative_cosine_similarity_symmetric():
    loss_fn = compat.NegativeCosineSimilarity()
    for bsz in range(1, 20):
        x0, x1 = torch.randn(bsz, 32), torch.randn(bsz, 32)
        assert torch.allclose(loss_fn(x0, x1), loss_fn(x1, x0))


# ----------------------------------------------------------------------------------------------
# Against lightly's classes: values, gradients, state
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, temperature", [(7, 13, 0.5), (2, 3, 0.07), (33, 65, 0.2)])
def test_ntxent_equals_lightly(peer, dtype, n, d, temperature):
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    compare(compat.NTXentLoss(temperature), peer.NTXentLoss(temperature), [z1, z2], dtype,
            f"NTXentLoss {dtype}")
    # near-duplicate positives: a small loss stays exact
    compare(compat.NTXentLoss(0.05), peer.NTXentLoss(0.05), [z1, z1 + 1e-3 * z2], dtype,
            f"NTXentLoss near-duplicates {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent_memory_bank_equals_lightly_over_steps(peer, dtype):
    size, d = 11, 6
    torch.manual_seed(3)
    ours = compat.NTXentLoss(0.2, memory_bank_size=(size, d))
    torch.manual_seed(3)
    theirs = peer.NTXentLoss(0.2, memory_bank_size=(size, d)).double()
    assert torch.equal(ours.memory_bank.tensor.double(), theirs.memory_bank.bank)
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # the bank is not saved
    # batches that fit, that run past the end (rows dropped, pointer back to 0), one larger than
    # the bank, and one without gradient (no update)
    for step, (b, update) in enumerate([(4, True), (4, True), (5, True), (3, False), (13, True),
                                        (2, True)]):
        z1, z2 = torch.randn(b, d), torch.randn(b, d)
        compare(ours, theirs, [z1, z2], dtype, f"step {step} {dtype}", grads=update)
        assert_close(ours.memory_bank.tensor, theirs.memory_bank.bank, TOL[dtype],
                     f"bank after step {step}")
        assert int(ours.memory_bank.pointer) == int(theirs.memory_bank.bank_ptr), step


@pytest.mark.parametrize("dtype", DTYPES)
def test_dino_equals_lightly_over_steps(peer, dtype):
    k, b = 37, 5
    ours = compat.DINOLoss(k, warmup_teacher_temp=0.02, teacher_temp=0.06,
                           warmup_teacher_temp_epochs=3, center_momentum=0.8)
    theirs = peer.DINOLoss(k, warmup_teacher_temp=0.02, teacher_temp=0.06,
                           warmup_teacher_temp_epochs=3, center_momentum=0.8).double()
    for epoch, (t, s, teacher_temp) in enumerate([(2, 6, None), (2, 2, None), (1, 3, 0.05),
                                                  (2, 4, None), (2, 3, None)]):
        teacher = [3 * torch.randn(b, k) for _ in range(t)]
        student = [3 * torch.randn(b, k) for _ in range(s)]

        def run(loss_fn):
            return lambda *views: loss_fn(list(views[:t]), list(views[t:]), teacher_temp, epoch)

        compare(run(ours), run(theirs), teacher + student, dtype, f"epoch {epoch} {dtype}",
                detached=range(t))  # the teacher gets no gradient
        assert ours.center.shape == theirs.center.shape == (1, 1, k)
        assert_close(ours.center, theirs.center, 1e-6, f"center after epoch {epoch}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_high, n_low, queue", [(2, 0, 0), (2, 4, 0), (3, 1, 9), (1, 2, 5)])
def test_swav_equals_lightly(peer, dtype, n_high, n_low, queue):
    b, k = 6, 11
    scores = [F.normalize(torch.randn(b, 8), dim=1) @ F.normalize(torch.randn(k, 8), dim=1).T
              for _ in range(n_high + n_low)]
    queues = [F.normalize(torch.randn(queue, k), dim=1) for _ in range(n_high)] if queue else None

    def run(loss_fn):
        def call(*views):
            q = None if queues is None else [x.to(views[0].dtype) for x in queues]
            return loss_fn(list(views[:n_high]), list(views[n_high:]), q)
        return call

    ours, theirs = compare(run(compat.SwaVLoss(0.1, 3, 0.05)), run(peer.SwaVLoss(0.1, 3, 0.05)),
                           scores, dtype, f"SwaVLoss {dtype}")
    assert ours.shape == theirs.shape == (1,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((9, 17), 1), ((4, 5, 3), 2), ((6, 3), 0)])
def test_negative_cosine_similarity_equals_lightly(peer, dtype, shape, dim):
    compare(compat.NegativeCosineSimilarity(dim), peer.NegativeCosineSimilarity(dim),
            [torch.randn(shape), torch.randn(shape)], dtype, f"cosine {dtype}")


# ----------------------------------------------------------------------------------------------
# 2 gloo processes: gather_distributed, the gathered bank, the all-reduced center and codes
# ----------------------------------------------------------------------------------------------
WORLD, N = 2, 5


def _distributed_cases(peer_classes, side):
    """name -> (loss_fn, call(loss_fn, inputs of this rank) -> loss, state(loss_fn) -> tensor)."""
    classes = compat if side == "ours" else peer_classes
    torch.manual_seed(7)
    bank = classes.NTXentLoss(0.3, memory_bank_size=(7, 4), gather_distributed=True)
    return {
        "ntxent": (classes.NTXentLoss(0.3, gather_distributed=True),
                   lambda f, x: f(x[0], x[1]), None),
        "ntxent_bank": (bank, lambda f, x: f(x[0], x[1]),
                        lambda f: (f.memory_bank.tensor if side == "ours" else f.memory_bank.bank)),
        "dino": (classes.DINOLoss(9, warmup_teacher_temp_epochs=2),
                 lambda f, x: f([x[2].detach(), x[3].detach()], [x[3], x[2], x[4]], epoch=1),
                 lambda f: f.center),
        "swav": (classes.SwaVLoss(sinkhorn_gather_distributed=True),
                 lambda f, x: f([x[2], x[3]], [x[4]]), None),
    }


def _rank_inputs(inputs, rank):
    return [x[rank * N:(rank + 1) * N].clone().requires_grad_() for x in inputs]


def _worker(rank, results, inputs):
    peer_classes = lightly_loss()
    for side in ["ours", "theirs"]:
        for name, (loss_fn, call, state) in _distributed_cases(peer_classes, side).items():
            for step in range(2):  # the bank and the center carry over
                x = _rank_inputs(inputs[step], rank)
                loss = call(loss_fn, x)
                loss.sum().backward()
                results[(side, name, step, rank)] = (
                    loss.detach().reshape(()), [t.grad for t in x],
                    None if state is None else state(loss_fn).detach().clone())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_options_equal_lightly():
    lightly_loss()  # skips here when lightly is not installed
    inputs = [[torch.randn(WORLD * N, 4), torch.randn(WORLD * N, 4)]
              + [torch.randn(WORLD * N, 9) for _ in range(3)] for _ in range(2)]
    results = run_on_ranks(_worker, inputs, world=WORLD)
    for key, (loss, grads, state) in results.items():
        if key[0] != "ours":
            continue
        _, theirs_grads, theirs_state = results[("theirs",) + key[1:]]
        theirs_loss = results[("theirs",) + key[1:]][0]
        assert_close(loss, theirs_loss, 1e-5, f"{key}: loss")
        for i, (g, h) in enumerate(zip(grads, theirs_grads)):
            if h is None:
                assert g is None or not g.any(), f"{key}: gradient {i}"
            else:
                assert_close(g, h, 1e-5, f"{key}: gradient {i}")
        if state is not None:
            assert_close(state, theirs_state, 1e-6, f"{key}: state")
