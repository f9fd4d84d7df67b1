"""Self-supervised methods, one thin module each, by name."""
from fastcl.methods.base import Method
from fastcl.methods.simclr import SimCLR
from fastcl.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {m.name: m for m in (SimCLR, SwAV)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "SimCLR", "SwAV", "get_method"]
