"""sRGB -> CIE Lab (D65 white), batched on the images' device: the color split of CMC.

    lab = rgb_to_lab(rgb)        # (B, 3, H, W) in [0, 1] -> L in [0, 100], a, b in about
                                 # [-128, 127]

The conversion is the standard one: undo the sRGB gamma, map linear RGB to XYZ with the sRGB
matrix (at the precision whose rows sum to the white point, so gray maps to a = b = 0), divide by
the D65 white point,
then L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)) with the cube root f linear
below (6/29)^3.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype

# Linear sRGB -> XYZ (IEC 61966-2-1 primaries, D65), rows X, Y, Z.
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
# D65 reference white (2 degree observer).
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6 / 29

# Per-channel centre and half-range of L, a and b over the sRGB gamut: (x - center) / half_range
# maps each channel to about [-1, 1] (the normalization CMC's code uses).
LAB_CENTER = (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2)
LAB_HALF_RANGE = (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2)


def _check_rgb(rgb) -> None:
    if not isinstance(rgb, Tensor):
        raise TypeError(f"rgb must be a torch.Tensor, got {type(rgb).__name__}")
    if not rgb.is_floating_point():
        raise TypeError(f"rgb must be a floating tensor with values in [0, 1], got {rgb.dtype}")
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb must have shape (..., 3, H, W), got {tuple(rgb.shape)}")


def _srgb_to_linear(c: Tensor) -> Tensor:
    return torch.where(c > 0.04045, ((c.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, c / 12.92)


def _f(t: Tensor) -> Tensor:
    """CIE's cube root, linear near 0 (where the cube root's slope is infinite)."""
    return torch.where(t > _DELTA ** 3, t.clamp(min=_DELTA ** 3) ** (1 / 3),
                       t / (3 * _DELTA ** 2) + 4 / 29)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """rgb (..., 3, H, W), sRGB in [0, 1] -> Lab (..., 3, H, W): L in [0, 100], a, b unbounded
    (about [-128, 127] over the sRGB gamut). Computed in the input's dtype (at least float32)."""
    _check_rgb(rgb)
    x = rgb.to(accumulation_dtype(rgb))
    linear = _srgb_to_linear(x.clamp(0, 1))
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear) / white[:, None, None]
    fx, fy, fz = _f(xyz).unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def normalized_lab(rgb: Tensor) -> Tensor:
    """rgb (..., 3, H, W) in [0, 1] -> Lab with each channel mapped to about [-1, 1]."""
    lab = rgb_to_lab(rgb)
    center = torch.tensor(LAB_CENTER, dtype=lab.dtype, device=lab.device)[:, None, None]
    half = torch.tensor(LAB_HALF_RANGE, dtype=lab.dtype, device=lab.device)[:, None, None]
    return (lab - center) / half
