"""Queue / memory-bank benchmark: fastcl's sampled-negative losses, queue enqueue and bank update
against the naive formulas of InstDisc's and MoCo's code (and, on a GPU, torch.compile of the
naive losses), measured in the same process.

    python benchmarks/bank.py                 # this machine's default device
    python benchmarks/bank.py --quick         # small sizes, a smoke test
    python benchmarks/bank.py --csv out.csv --plot out.png

Cases: InstDisc's NCE and full-softmax losses over K sampled bank rows, forward + backward (naive:
index_select of B (K + 1) rows -> bmm -> loss, fastcl.formulas.sampled_*); MoCo's enqueue
(naive: ``queue[:, ptr:ptr + B] = keys.T`` with its int(ptr) host sync, MoCo's (D, K) layout);
InstDisc's bank update (naive: index_select, momentum, normalize, index_copy_). Prints median
time and peak memory above the inputs (measured as in benchmarks/contrastive.py, whose helpers
this script uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcl
from contrastive import bench_main, forward_backward, measure_case
from fastcl import formulas


def loss_cases(device, quick):
    """(name, inputs builder, {impl: loss_fn}): InstDisc's setting, tau 0.07."""
    b, k, d, n = (64, 1024, 128, 10000) if quick else (256, 4096, 128, 50000)
    z = 2.0 * n  # a frozen Z of the order InstDisc's estimate gives

    def inputs():
        memory = fastcl.MemoryBank(n, d, device=device)
        anchors = torch.randint(0, n, (b,), device=device)
        f = F.normalize(torch.randn(b, d, device=device), dim=1).requires_grad_()
        return [f, memory.tensor, memory.sample(anchors, k)]

    shape = f"B={b} K={k} D={d} n={n}"
    yield (f"instdisc NCE {shape}", inputs, {
        "fastcl": lambda f, bank, idx: fastcl.sampled_nce(f, bank, idx, z, 0.07),
        "naive": lambda f, bank, idx: formulas.sampled_nce(f, bank, idx, z, 0.07)})
    yield (f"instdisc softmax {shape}", inputs, {
        "fastcl": lambda f, bank, idx: fastcl.sampled_info_nce(f, bank, idx, 0.07),
        "naive": lambda f, bank, idx: formulas.sampled_info_nce(f, bank, idx, 0.07)})


def moco_enqueue(queue_t: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """MoCo's _dequeue_and_enqueue on its (D, K) queue (without the all-gather)."""
    batch_size = keys.shape[0]
    ptr = int(queue_ptr)
    assert queue_t.shape[1] % batch_size == 0  # for simplicity
    queue_t[:, ptr:ptr + batch_size] = keys.T
    queue_ptr[0] = (ptr + batch_size) % queue_t.shape[1]


def instdisc_update(memory: torch.Tensor, y: torch.Tensor, x: torch.Tensor, momentum=0.5):
    """InstDisc's NCEAverage memory update."""
    weight_pos = torch.index_select(memory, 0, y.view(-1))
    weight_pos.mul_(momentum)
    weight_pos.add_(torch.mul(x, 1 - momentum))
    w_norm = weight_pos.pow(2).sum(1, keepdim=True).pow(0.5)
    memory.index_copy_(0, y, weight_pos.div(w_norm))


CALLS = 100


def repeated(step):
    def steps():
        for _ in range(CALLS):
            step()
    return steps


def run(device: str, quick: bool, repeats: int, only: str = ""):
    rows = []
    for name, make_inputs, impls in loss_cases(device, quick):
        if only not in name:
            continue
        if device == "cuda":
            impls = dict(impls, **{"naive + torch.compile": torch.compile(impls["naive"])})
        inputs = make_inputs()
        steps = {impl: forward_backward(fn, inputs) for impl, fn in impls.items()}
        rows += measure_case(name, torch.float32, steps, device, repeats, baseline="naive")
        del inputs, steps

    # The queue and bank steps take microseconds: each measured step runs them CALLS times.
    b, k, d = (256, 8192, 128) if quick else (256, 65536, 128)
    name = f"queue enqueue x{CALLS} B={b} K={k} D={d}"
    if only in name:
        queue = fastcl.Queue(k, d, device=device)
        moco_queue = queue.tensor.T.contiguous()
        moco_ptr = torch.zeros(1, dtype=torch.long, device=device)
        keys = F.normalize(torch.randn(b, d, device=device), dim=1)
        steps = {"fastcl": repeated(lambda: queue.enqueue(keys)),
                 "naive (MoCo)": repeated(lambda: moco_enqueue(moco_queue, moco_ptr, keys))}
        rows += measure_case(name, torch.float32, steps, device, repeats, "naive (MoCo)")

    n = 10000 if quick else 50000
    name = f"bank update x{CALLS} B={b} n={n} D={d}"
    if only in name:
        memory = fastcl.MemoryBank(n, d, device=device)
        instdisc_memory = memory.tensor.clone()
        anchors = torch.randperm(n, device=device)[:b]
        features = F.normalize(torch.randn(b, d, device=device), dim=1)
        steps = {"fastcl": repeated(lambda: memory.update(anchors, features)),
                 "naive (InstDisc)": repeated(
                     lambda: instdisc_update(instdisc_memory, anchors, features))}
        rows += measure_case(name, torch.float32, steps, device, repeats, "naive (InstDisc)")
    return rows


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], run, "fastcl queue / memory bank", default_repeats=5)
