"""Fused ops, one module per family: each holds its PyTorch reference, its torch.library
registration, autograd and backend dispatch (C++ on CPU, Triton on CUDA)."""
from fastcl._backend import cpu_backend
from fastcl.ops import contrastive, dino, sinkhorn

__all__ = ["contrastive", "cpu_backend", "dino", "sinkhorn"]
