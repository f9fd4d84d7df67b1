"""Momentum (EMA) update benchmark: fastcl.momentum_update of a ResNet-50-sized parameter list
(25.6 M parameters in 161 tensors) against what training code does, in a training loop (fresh
parameters, every step) and as single calls (benchmarks/harness.py): MoCo's per-parameter loop
(the baseline) and torch.compile of it, DINO's in-place loop, torch._foreach_lerp_ and
torch._foreach_mul_ + torch._foreach_add_; plus a plain copy of one 25.6 M tensor for the machine's
copy bandwidth.

    python benchmarks/momentum.py                 # this machine's default device
    python benchmarks/momentum.py --quick --no-compile   # the first 40 tensors (0.5 M parameters)
    python benchmarks/momentum.py --csv out.csv --plot out.png

Each row also gives the effective bandwidth of the training-loop step (gb_per_s): the bytes the
update must move at least (fp32 target and online: read both, write one, 12 bytes per parameter;
a bf16 online reads 2 instead of 4) over its time, and for the copy 8 bytes per element.
"""
from __future__ import annotations

import torch

from fastcl import momentum_update
from harness import Case, bench_main


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The shapes of torchvision's ResNet-50 parameters, in order: 161 tensors, 25,557,032
    parameters (convolutions without bias, BatchNorm weight and bias, the 1000-class fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for block in range(blocks):
            out_channels = 4 * width
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:  # the projection shortcut
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    return shapes + [(1000, 2048), (1000,)]


def moco_loop(target, online, m):
    """MoCo's _momentum_update_key_encoder: a new tensor per parameter, three ops each."""
    for p_k, p_q in zip(target, online):
        p_k.data = p_k.data * m + p_q.data * (1.0 - m)


def dino_loop(target, online, m):
    """DINO's teacher update: param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)."""
    for p_k, p_q in zip(target, online):
        p_k.data.mul_(m).add_((1 - m) * p_q.detach().data)


def foreach_lerp(target, online, m):
    torch._foreach_lerp_(target, online, 1.0 - m)


def foreach_mul_add(target, online, m):
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1.0 - m)


IMPLS = {"MoCo loop": moco_loop, "DINO loop": dino_loop, "torch._foreach_lerp_": foreach_lerp,
         "torch._foreach_mul_/add_": foreach_mul_add, "fastcl": momentum_update}


def cases(device: str, quick: bool):
    shapes = resnet50_shapes()
    if quick:
        shapes = shapes[: len(shapes) // 4]
    params = sum(torch.Size(s).numel() for s in shapes)
    m = 0.996
    for online_dtype in (torch.float32, torch.bfloat16):
        def inputs(online_dtype=online_dtype):
            """The target's and the online network's parameters (no gradient: the update runs
            under no_grad as in every method)."""
            return [[torch.randn(s, device=device) for s in shapes],
                    [torch.randn(s, device=device).to(online_dtype) for s in shapes]]
        impls = IMPLS if online_dtype == torch.float32 else {
            k: v for k, v in IMPLS.items() if k != "torch._foreach_lerp_"}  # needs one dtype
        yield Case(f"ResNet-50 EMA {len(shapes)} tensors {params / 1e6:.1f}M "
                   f"fp32<-{str(online_dtype).replace('torch.', '')}", inputs,
                   {impl: (lambda t, o, fn=fn: fn(t, o, m)) for impl, fn in impls.items()},
                   "MoCo loop", backward=False,
                   bytes_moved=params * (8 + torch.empty((), dtype=online_dtype).element_size()))

    def copy_inputs():
        return [torch.randn(params, device=device), torch.empty(params, device=device)]
    yield Case(f"copy_ of one {params / 1e6:.1f}M fp32 tensor", copy_inputs,
               {"torch copy_": lambda src, dst: dst.copy_(src)}, "torch copy_", backward=False,
               compile=(), bytes_moved=8 * params)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl momentum (EMA) update", default_repeats=10)
