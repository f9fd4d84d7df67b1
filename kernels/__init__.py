"""Triton kernels, one module per op family; installed as ``fastcl.kernels``."""
