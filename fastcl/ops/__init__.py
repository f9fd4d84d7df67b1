"""Fused ops, one module per family: each holds its PyTorch reference (the body of its
torch.library op), the C++ (CPU) and Triton (CUDA) kernels registered per device with
``fastcl._backend.register_backends`` so that PyTorch's dispatcher chooses, and autograd.
``cpu_backend`` switches what runs CPU tensors: "cpp", "triton" (under the interpreter) or
"reference"."""
from fastcl._backend import cpu_backend
from fastcl.ops import contrastive, dino, dino_head, koleo, siglip, sinkhorn

__all__ = ["contrastive", "cpu_backend", "dino", "dino_head", "koleo", "siglip", "sinkhorn"]
