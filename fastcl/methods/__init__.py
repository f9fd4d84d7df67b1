"""Self-supervised methods, one thin module each, by name."""
from fastcl.methods.base import Method
from fastcl.methods.byol import BYOL
from fastcl.methods.cmc import CMC
from fastcl.methods.cpc import CPC
from fastcl.methods.dino import DINO
from fastcl.methods.dinov2 import DINOv2
from fastcl.methods.instdisc import InstDisc
from fastcl.methods.invaspread import InvaSpread
from fastcl.methods.mocov1 import MoCoV1
from fastcl.methods.mocov2 import MoCoV2
from fastcl.methods.mocov3 import MoCoV3
from fastcl.methods.simclr import SimCLR
from fastcl.methods.simclrv2 import SimCLRv2
from fastcl.methods.simsiam import SimSiam
from fastcl.methods.supcon import SupCon
from fastcl.methods.swav import SwAV
from fastcl.methods.triplet import Triplet

METHODS: dict[str, type[Method]] = {m.name: m for m in (SimCLR, SwAV, MoCoV2, BYOL, MoCoV1, MoCoV3,
                                                      SimCLRv2, SimSiam, DINO, DINOv2, InstDisc,
                                                      InvaSpread, CPC, CMC, SupCon, Triplet)}
# The methods whose loss takes gather="ring" (fastcl train --gather ring).
RING_METHODS = tuple(sorted(name for name, m in METHODS.items() if m.ring))


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


__all__ = ["BYOL", "CMC", "CPC", "DINO", "DINOv2", "InstDisc", "InvaSpread", "METHODS", "Method", "MoCoV1",
           "MoCoV2", "MoCoV3", "RING_METHODS", "SimCLR", "SimCLRv2", "SimSiam", "SupCon", "SwAV", "Triplet",
           "get_method"]
