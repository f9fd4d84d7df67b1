"""Queue / memory-bank benchmark: fastcl's sampled-negative losses, queue enqueue and bank update
against the naive formulas of InstDisc's and MoCo's code and torch.compile of them, in a training
loop and as single calls (benchmarks/harness.py).

    python benchmarks/bank.py                 # this machine's default device
    python benchmarks/bank.py --quick --no-compile   # small sizes, a smoke test
    python benchmarks/bank.py --csv out.csv --plot out.png

Cases: InstDisc's NCE and full-softmax losses over K sampled bank rows, forward + backward (naive:
index_select of B (K + 1) rows -> bmm -> loss, fastcl.formulas.sampled_*); MoCo's enqueue
(naive: ``queue[:, ptr:ptr + B] = keys.T`` with its int(ptr) host sync, MoCo's (D, K) layout);
InstDisc's bank update (naive: index_select, momentum, normalize, index_copy_). The queue and bank
steps take microseconds: each measured step runs them CALLS times.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcl
from fastcl import formulas
from harness import Case, bench_main


def loss_cases(device, quick):
    """InstDisc's setting, tau 0.07: features (B, D) requiring grad, the bank and K sampled rows."""
    b, k, d, n = (64, 1024, 128, 10000) if quick else (256, 4096, 128, 50000)
    z = 2.0 * n  # a frozen Z of the order InstDisc's estimate gives

    def inputs():
        memory = fastcl.MemoryBank(n, d, device=device)
        anchors = torch.randint(0, n, (b,), device=device)
        f = F.normalize(torch.randn(b, d, device=device), dim=1).requires_grad_()
        return [f, memory.tensor, memory.sample(anchors, k)]

    shape = f"B={b} K={k} D={d} n={n}"
    yield Case(f"instdisc NCE {shape}", inputs, {
        "fastcl": lambda f, bank, idx: fastcl.sampled_nce(f, bank, idx, z, 0.07),
        "naive": lambda f, bank, idx: formulas.sampled_nce(f, bank, idx, z, 0.07)}, "naive")
    yield Case(f"instdisc softmax {shape}", inputs, {
        "fastcl": lambda f, bank, idx: fastcl.sampled_info_nce(f, bank, idx, 0.07),
        "naive": lambda f, bank, idx: formulas.sampled_info_nce(f, bank, idx, 0.07)}, "naive")


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


def cases(device: str, quick: bool):
    yield from loss_cases(device, quick)
    b, k, d = (256, 8192, 128) if quick else (256, 65536, 128)

    def queue_inputs():
        """fastcl's (K, D) queue, MoCo's (D, K) queue and pointer, a batch of keys."""
        queue = fastcl.Queue(k, d, device=device)
        return [queue, queue.tensor.T.contiguous(), torch.zeros(1, dtype=torch.long, device=device),
                F.normalize(torch.randn(b, d, device=device), dim=1)]
    yield Case(f"queue enqueue x{CALLS} B={b} K={k} D={d}", queue_inputs, {
        "fastcl": lambda queue, moco_queue, ptr, keys: queue.enqueue(keys),
        "naive (MoCo)": lambda queue, moco_queue, ptr, keys: moco_enqueue(moco_queue, ptr, keys)},
        "naive (MoCo)", backward=False, calls=CALLS)

    n = 10000 if quick else 50000

    def bank_inputs():
        """fastcl's bank, InstDisc's copy of it, B distinct anchors and their new features."""
        memory = fastcl.MemoryBank(n, d, device=device)
        return [memory, memory.tensor.clone(), torch.randperm(n, device=device)[:b],
                F.normalize(torch.randn(b, d, device=device), dim=1)]
    yield Case(f"bank update x{CALLS} B={b} n={n} D={d}", bank_inputs, {
        "fastcl": lambda memory, bank, anchors, x: memory.update(anchors, x),
        "naive (InstDisc)": lambda memory, bank, anchors, x: instdisc_update(bank, anchors, x)},
        "naive (InstDisc)", backward=False, calls=CALLS)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl queue / memory bank", default_repeats=5)
