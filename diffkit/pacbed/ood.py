"""Physical plausibility checks of aligned PACBED patterns (out-of-distribution detection).

Network features alone do not separate every foreign pattern from the training data (the
networks are trained to be invariant to much of what differs). These checks use three
interpretable statistics of the aligned, canonical pattern, compared with the range the
training patterns of the *same predicted thickness* span:

``outside_fraction``
    mean intensity between 1.15 and 1.8 disk radii over the mean inside 1.8 radii
    (vacuum and blank regions scatter almost nothing outside the central disk);
``fourfold``
    magnitude of the 4-fold angular harmonic in that annulus, relative to its mean
    (the [001] zone's Bragg-disk arrangement; amorphous rings and other lattices differ).
    The harmonic is taken of the intensity minus its mean over each 1 px ring of recorded
    pixels, so a square or cropped detector (whose coverage of the annulus is itself
    four-fold) adds nothing to it;
``disk_contrast``
    standard deviation / mean inside 0.85 disk radii (dynamical contrast of the central disk).

Only pixels the detector actually recorded enter the statistics (``valid``), so a detector
that does not reach 1.8 disk radii everywhere is not mistaken for a foreign pattern.

A pattern is flagged when a statistic lies outside the training range (0.05th to 99.95th
percentile) of its predicted-thickness band.
"""
from __future__ import annotations

import numpy as np
import torch

DESCRIPTORS = ("outside_fraction", "fourfold", "disk_contrast")
THICKNESS_EDGES_NM = (0.0, 3.0, 10.0, 40.0, 1e9)


def pattern_descriptors(canonical: torch.Tensor, disk_radius_px: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The three statistics (B, 3) of canonical patterns (B, n, n), unitless.

    ``valid`` (B, n, n) marks canonical pixels inside the recorded detector area (default: all).
    """
    x = canonical.clamp_min(0)
    n = x.shape[-1]
    v = torch.arange(n, dtype=torch.float32, device=x.device) - (n - 1) / 2
    yy, xx = torch.meshgrid(v, v, indexing="ij")
    r = torch.sqrt(yy**2 + xx**2)
    phi = torch.atan2(yy, xx)
    R = float(disk_radius_px)
    w = torch.ones_like(x) if valid is None else valid.float()
    ann = ((r > 1.15 * R) & (r < 1.8 * R)).float() * w
    field = (r < 1.8 * R).float() * w
    disk = (r < 0.85 * R).float() * w
    n_ann = ann.sum((1, 2)).clamp_min(1)
    out = (x * ann).sum((1, 2))
    mean_out = out / n_ann
    mean_field = (x * field).sum((1, 2)) / field.sum((1, 2)).clamp_min(1)
    # azimuthal mean per 1 px ring over the recorded pixels (one-hot ring membership)
    ring = torch.floor(r).long()
    rings = torch.nn.functional.one_hot(ring.flatten(), int(ring.max()) + 1).float()  # (n*n, n_rings)
    xa = (x * ann).flatten(1)
    ring_mean = (xa @ rings) / (ann.flatten(1) @ rings).clamp_min(1e-12)
    dev = (x - (ring_mean @ rings.T).reshape(x.shape)) * ann
    c4 = (dev * torch.cos(4 * phi)).sum((1, 2))
    s4 = (dev * torch.sin(4 * phi)).sum((1, 2))
    a4 = torch.sqrt(c4**2 + s4**2) / out.clamp_min(1e-12)
    nd = disk.sum((1, 2)).clamp_min(1)
    m = (x * disk).sum((1, 2)) / nd
    sd = torch.sqrt((((x - m[:, None, None]) * disk) ** 2).sum((1, 2)) / nd)
    return torch.stack([mean_out / mean_field.clamp_min(1e-12), a4, sd / m.clamp_min(1e-12)], 1)


def recorded_area(shape, centre, radius, rotation_deg, disk_radius_px: float, n_px: int) -> torch.Tensor:
    """Canonical pixels (B, n, n) that fall inside a raw detector frame of ``shape`` (H, W)."""
    from .geometry import to_canonical

    ones = torch.ones((len(radius),) + tuple(shape), device=radius.device)
    return to_canonical(ones, centre, radius, rotation_deg, disk_radius_px, n_px) > 0.999


def descriptor_ranges(desc: np.ndarray, thickness_nm: np.ndarray, lo_q: float = 0.05, hi_q: float = 99.95) -> dict:
    """Training range of each statistic per thickness band (for the model card)."""
    edges = THICKNESS_EDGES_NM
    table = {"edges_nm": list(edges), "quantiles": [lo_q, hi_q], "lo": [], "hi": []}
    for a, b in zip(edges[:-1], edges[1:]):
        m = (thickness_nm >= a) & (thickness_nm < b)
        if m.sum() < 20:  # a band the library (barely) covers: use the whole range
            m = np.ones(len(thickness_nm), bool)
        table["lo"].append(np.percentile(desc[m], lo_q, axis=0).tolist())
        table["hi"].append(np.percentile(desc[m], hi_q, axis=0).tolist())
    return table


def implausible(desc: torch.Tensor, thickness_nm: torch.Tensor, table: dict) -> torch.Tensor:
    """True where any statistic is outside the training range of the predicted-thickness band."""
    edges = torch.as_tensor(table["edges_nm"], dtype=thickness_nm.dtype, device=thickness_nm.device)
    band = (torch.searchsorted(edges, thickness_nm, right=True) - 1).clamp(0, len(table["lo"]) - 1)
    lo = torch.as_tensor(table["lo"], dtype=desc.dtype, device=desc.device)[band]
    hi = torch.as_tensor(table["hi"], dtype=desc.dtype, device=desc.device)[band]
    return ((desc < lo) | (desc > hi)).any(-1)


def vacuum_like(desc: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Almost no intensity outside the central disk: vacuum or a blank region."""
    return desc[:, 0] < threshold
