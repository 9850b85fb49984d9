"""Pattern geometry: rough centre and disk size, and batched resampling to the canonical frame.

The *canonical frame* is the sampling of the simulation library a model was trained on:
``n_px`` x ``n_px`` pixels with the zero-order disk of radius ``disk_radius_px`` at the
centre and the crystal axes along the image axes. A pattern's geometry is described by
its disk centre (px, raw detector frame), disk radius (px) and rotation (degrees).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInputError

# ratio disk radius / RMS width of the row-column projections, measured on the SrTiO3 libraries;
# only a starting value, refined by the alignment network
MOMENT_RADIUS_FACTOR = 1.5


def as_batch(patterns) -> torch.Tensor:
    """(H, W) or (B, H, W) array/tensor -> float32 tensor (B, H, W)."""
    x = patterns if torch.is_tensor(patterns) else torch.as_tensor(np.asarray(patterns, dtype=np.float32))
    x = x.float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise BadInputError(f"expected a pattern (H, W) or a stack (B, H, W), got shape {tuple(x.shape)}")
    return x


def rough_geometry(patterns) -> tuple[torch.Tensor, torch.Tensor]:
    """Rough disk centre (B, 2) as (y, x) px and disk radius (B,) px from projection moments.

    Equivalent to fitting Gaussians to the row and column projections (method of moments)
    after removing the projection minimum, which suppresses a uniform background.
    """
    x = as_batch(patterns).clamp_min(0)
    out_c, out_r = [], []
    for axis in (2, 1):  # projection onto y (sum over x), then onto x
        p = x.sum(dim=axis)
        p = p - p.min(dim=1, keepdim=True).values
        p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
        coord = torch.arange(p.shape[1], dtype=p.dtype, device=p.device)
        mu = (p * coord).sum(dim=1)
        var = (p * (coord[None] - mu[:, None]) ** 2).sum(dim=1)
        out_c.append(mu)
        out_r.append(var.sqrt())
    centre = torch.stack(out_c, dim=1)
    radius = MOMENT_RADIUS_FACTOR * 0.5 * (out_r[0] + out_r[1])
    return centre, radius


def wrap_rotation_deg(angle_deg):
    """A pattern rotation (or rotation difference) in degrees brought into [-45, 45): the [001]
    patterns are four-fold, so rotations are defined modulo 90 deg (numpy arrays or tensors).

    >>> float(wrap_rotation_deg(80.0))
    -10.0
    """
    return (angle_deg + 45) % 90 - 45


def to_canonical(patterns, centre, radius, rotation_deg, disk_radius_px: float, n_px: int) -> torch.Tensor:
    """Resample patterns (B, H, W) into the canonical frame (B, n_px, n_px).

    A canonical pixel ``v`` (relative to the canonical centre) is read from the raw
    position ``centre + (radius / disk_radius_px) * R(rotation) v`` (bilinear).
    """
    x = as_batch(patterns)
    B, H, W = x.shape
    dev = x.device
    centre = torch.as_tensor(centre, dtype=torch.float32, device=dev).reshape(B, 2)
    radius = torch.as_tensor(radius, dtype=torch.float32, device=dev).reshape(B)
    rot = torch.deg2rad(torch.as_tensor(rotation_deg, dtype=torch.float32, device=dev).reshape(B))
    c = (n_px - 1) / 2
    v = torch.arange(n_px, dtype=torch.float32, device=dev) - c
    vy, vx = torch.meshgrid(v, v, indexing="ij")
    s = (radius / disk_radius_px)[:, None, None]
    cos, sin = torch.cos(rot)[:, None, None], torch.sin(rot)[:, None, None]
    ry = sin * vx[None] + cos * vy[None]
    rx = cos * vx[None] - sin * vy[None]
    py = centre[:, 0, None, None] + s * ry
    px = centre[:, 1, None, None] + s * rx
    grid = torch.stack([px / (W - 1) * 2 - 1, py / (H - 1) * 2 - 1], dim=-1)
    return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def fourfold_harmonic(canonical: torch.Tensor, inner_px: float, outer_px: float) -> torch.Tensor:
    """Normalised 4th azimuthal harmonic ``sum I exp(-4i phi) / sum I`` (complex, (B,)) of an annulus
    (inner, outer radius in canonical px) about the centre of canonical patterns (B, n, n).

    Features along the image axes rotated by ``delta`` (deg) give ``|z| exp(-4i delta)`` times the
    sign of the harmonic (+: brighter along the axes, -: brighter along the diagonals).

    >>> n = 64; v = torch.arange(n) - (n - 1) / 2
    >>> phi = torch.atan2(v[:, None], v[None, :])
    >>> z = fourfold_harmonic((1 + 0.5 * torch.cos(4 * (phi - 0.1)))[None], 10, 20)
    >>> round(float(-torch.angle(z)[0] / 4), 2)  # radians here
    0.1
    """
    x = as_batch(canonical)
    n = x.shape[-1]
    v = torch.arange(n, dtype=torch.float32, device=x.device) - (n - 1) / 2
    r = torch.sqrt(v[:, None] ** 2 + v[None, :] ** 2)
    ring = (r >= inner_px) & (r < outer_px)
    phi = torch.atan2(v[:, None], v[None, :])[ring]
    w = x[:, ring].clamp_min(0)
    tot = w.sum(-1).clamp_min(1e-12)
    return torch.complex((w * torch.cos(4 * phi)).sum(-1) / tot, -(w * torch.sin(4 * phi)).sum(-1) / tot)


def _field_mask(n: int, device) -> torch.Tensor:
    v = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
    return (v[:, None] ** 2 + v[None, :] ** 2) <= (n / 2) ** 2


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Network input: a circular field of view (so that no square frame edge can reveal a
    rotation), intensities / mean, square root (Poisson variance-stabilising), standardised
    inside the field and zero outside."""
    x = x.clamp_min(0)
    m = _field_mask(x.shape[-1], x.device)
    n = m.sum()
    x = x * m
    x = x / (x.sum(dim=(-2, -1), keepdim=True) / n).clamp_min(1e-12)
    x = x.sqrt()
    mu = x.sum(dim=(-2, -1), keepdim=True) / n
    var = (((x - mu) * m) ** 2).sum(dim=(-2, -1), keepdim=True) / n
    return (x - mu) * m / var.sqrt().clamp_min(1e-6)


def quadrant_tilt_sign(canonical: torch.Tensor, disk_radius_px: float) -> torch.Tensor:
    """Sign of the tilt along x and y (B, 2) from the intensity balance of the disk halves.

    The seed method: with the four-fold symmetric zone, tilt moves intensity towards one
    side of the zero-order disk. Returned as (sign_x, sign_y) in {-1, +1}; a cross-check of
    the signed network output.
    """
    x = as_batch(canonical)
    n = x.shape[-1]
    c = (n - 1) / 2
    v = torch.arange(n, dtype=torch.float32) - c
    vy, vx = torch.meshgrid(v, v, indexing="ij")
    disk = (vy**2 + vx**2) < disk_radius_px**2
    w = x * disk
    sx = torch.sign((w * torch.sign(vx)).sum(dim=(1, 2)))
    sy = torch.sign((w * torch.sign(vy)).sum(dim=(1, 2)))
    return torch.stack([sx, sy], dim=1)
