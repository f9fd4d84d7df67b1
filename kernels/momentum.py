"""Triton kernel of the momentum (EMA) op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

``momentum_update_(targets, onlines, momentum)``: target_i <- m * target_i + (1 - m) * online_i for
one group of tensor pairs (one target dtype, one online dtype, one device; each pair with one
shape and one dense layout, as fastcl/ops/momentum.py hands them over), in one launch.

The group's tensors are separate allocations, so the kernel addresses them through a table: each
program owns one chunk of at most ``chunk`` elements of one tensor and reads the chunk's offsets
(in elements, from the first target and the first online tensor) and its length from a
(3, chunks) int64 table. The table depends only on the tensors' addresses and sizes, which do not
change from one training step to the next: it is built once and cached on the device, so a step
is one launch with no host-to-device copy and no host sync, and a CUDA graph can capture it. The
momentum is read from a 0-dim device tensor by the kernel, in float64 so that 1 - m is exact
before it is rounded to float32; the update is computed in float32 and rounded to the target's
dtype (12 bytes of traffic per float32 parameter, 8 for a float32 target with a 16-bit online).

Offsets are 64-bit. Chunk and block sizes are keyword arguments so that tests can make them
small. Nothing here queries the GPU at import time.

Work and floor: no FLOPs to speak of; 12 bytes per fp32 parameter (8 with a 16-bit online, 6
for 16-bit both), read once and written once, in one launch per dtype group. ResNet-50 (25.6 M
parameters, fp32): 307 MB, ~71 us at an H200's 4.3 TB/s copy rate; ViT-B (86 M): ~0.24 ms. The
loop over a chunk is coalesced (BLOCK contiguous elements, 16-byte vectors when ALIGNED).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> bfloat16, rounded to nearest even in integer arithmetic (NaN stays NaN), so that
    the result is the same bits on every backend (the Triton interpreter's cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _momentum_update_kernel(
    target_ptr,  # the group's first target tensor; every target is at an offset from it
    online_ptr,  # the group's first online tensor; every online tensor is at an offset from it
    table_ptr,  # (3, chunks) int64: target offset, online offset (elements), chunk length
    momentum_ptr,  # () float64
    chunks,
    ALIGNED: tl.constexpr,  # every offset is a multiple of 16 elements
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    target_offset = tl.load(table_ptr + chunk)
    online_offset = tl.load(table_ptr + chunks + chunk)
    length = tl.load(table_ptr + 2 * chunks + chunk)
    if ALIGNED:  # lets the compiler use 16-byte loads and stores
        target_offset = tl.multiple_of(target_offset, 16)
        online_offset = tl.multiple_of(online_offset, 16)
    momentum = tl.load(momentum_ptr)
    keep = momentum.to(tl.float32)
    take = (1.0 - momentum).to(tl.float32)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < length
        target = tl.load(target_ptr + target_offset + idx, mask=mask).to(tl.float32)
        online = tl.load(online_ptr + online_offset + idx, mask=mask).to(tl.float32)
        updated = keep * target + take * online
        if target_ptr.dtype.element_ty == tl.bfloat16:
            updated = _round_to_bfloat16(updated)
        tl.store(target_ptr + target_offset + idx, updated.to(target_ptr.dtype.element_ty),
                 mask=mask)


# What the launcher chooses from, read by it and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): target and online
# dtypes (any pair), and ALIGNED.
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16))


# (device, chunk, element sizes, (target address, online address, numel) per pair) -> the
# device-resident chunk table. A model's parameters keep their addresses for the whole run, so
# this holds a handful of entries; it is bounded anyway (oldest entry evicted first).
_TABLES: dict = {}
_MAX_TABLES = 16


def _chunk_table(targets, onlines, chunk):
    """The (3, chunks) int64 table of the group on its device (cached), and whether every offset
    is a multiple of 16 elements."""
    t_size, o_size = targets[0].element_size(), onlines[0].element_size()
    layout = tuple((t.data_ptr(), o.data_ptr(), t.numel()) for t, o in zip(targets, onlines))
    key = (targets[0].device, chunk, t_size, o_size, layout)
    cached = _TABLES.get(key)
    if cached is not None:
        return cached
    t_base, o_base = layout[0][0], layout[0][1]
    rows = []
    for t_addr, o_addr, numel in layout:
        t_offset, o_offset = (t_addr - t_base) // t_size, (o_addr - o_base) // o_size
        rows += [(t_offset + start, o_offset + start, min(chunk, numel - start))
                 for start in range(0, numel, chunk)]
    aligned = all(t % 16 == 0 and o % 16 == 0 for t, o, _ in rows)
    table = torch.tensor(rows, dtype=torch.int64).T.contiguous().to(targets[0].device)
    if len(_TABLES) >= _MAX_TABLES:
        del _TABLES[next(iter(_TABLES))]
    _TABLES[key] = (table, aligned)
    return table, aligned


def momentum_update_(targets, onlines, momentum, *, chunk=16384, block=1024):
    """targets[i] <- momentum * targets[i] + (1 - momentum) * onlines[i] in place, one launch.

    targets, onlines: lists of tensors on one device, each pair of one shape and one dense layout
    (same strides), targets of one dtype, onlines of one dtype (float32, bfloat16, float16);
    momentum: 0-dim floating tensor on that device. Empty tensors are skipped.
    """
    pairs = [(t, o) for t, o in zip(targets, onlines) if t.numel() > 0]
    if not pairs:
        return
    targets, onlines = [t for t, _ in pairs], [o for _, o in pairs]
    table, aligned = _chunk_table(targets, onlines, chunk)
    chunks = table.shape[1]
    _momentum_update_kernel[(chunks,)](
        targets[0], onlines[0], table, momentum.to(torch.float64), chunks, ALIGNED=aligned,
        BLOCK=block,
    )
