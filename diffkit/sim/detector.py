"""Detector and specimen effects applied to simulated diffraction patterns.

All operations are batched in torch (CPU or CUDA) so the same code serves training
augmentation, test-set generation and demo data. Each effect has physical units:

========================  ============================================================
``dose``                  electrons per pattern (Poisson shot noise); ``inf`` = noiseless
``background``            uniform inelastic background, as a fraction of the mean
                          pattern intensity
``radial_background``     smooth radial (Lorentzian) background amplitude, same unit
``radial_width_px``       half width of the radial background (px, output grid)
``blur_px``               Gaussian sigma (px, output grid): source size and detector PSF
``scale``                 camera-length factor (>1 enlarges the pattern)
``rotation_deg``          detector rotation (degrees, counter-clockwise)
``shift_px``              (dy, dx) shift of the pattern centre (px, output grid)
``affine``                residual 2x2 distortion (identity + small shear/stretch)
``flip``                  mirror the detector x axis
``intensity_scale``       gain (counts per electron)
========================  ============================================================

The geometric mapping goes from output (detector) pixels to the input pattern with
``torch.nn.functional.grid_sample``; ``pixel_ratio`` = output pixel size / input pixel
size (mrad/px over mrad/px).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass
class DetectorParams:
    """Per-pattern detector/specimen effects; every field is an array of length B."""

    dose: np.ndarray
    background: np.ndarray
    radial_background: np.ndarray
    radial_width_px: np.ndarray
    blur_px: np.ndarray
    scale: np.ndarray
    rotation_deg: np.ndarray
    shift_px: np.ndarray  # (B, 2) dy, dx
    affine: np.ndarray  # (B, 2, 2)
    flip: np.ndarray  # (B,) bool
    intensity_scale: np.ndarray

    @classmethod
    def identity(cls, n: int) -> "DetectorParams":
        """No effects at all (noiseless, perfectly aligned)."""
        return cls(
            dose=np.full(n, np.inf), background=np.zeros(n), radial_background=np.zeros(n),
            radial_width_px=np.full(n, 20.0), blur_px=np.zeros(n), scale=np.ones(n), rotation_deg=np.zeros(n),
            shift_px=np.zeros((n, 2)), affine=np.tile(np.eye(2), (n, 1, 1)), flip=np.zeros(n, bool),
            intensity_scale=np.ones(n),
        )

    def __len__(self):
        return len(self.dose)

    def subset(self, idx) -> "DetectorParams":
        return DetectorParams(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


@dataclasses.dataclass
class DetectorRanges:
    """Ranges from which :func:`random_params` draws effects (units as in the module docstring)."""

    log10_dose: tuple = (5.0, 9.0)
    noiseless_fraction: float = 0.1
    background: tuple = (0.0, 0.3)
    radial_background: tuple = (0.0, 0.1)
    radial_width_px: tuple = (10.0, 60.0)
    blur_px: tuple = (0.0, 1.2)
    scale: tuple = (0.97, 1.03)
    rotation_deg: tuple = (-2.0, 2.0)
    shift_px: float = 1.5
    affine: float = 0.015
    flip: bool = False
    intensity_scale: tuple = (0.5, 2.0)


def random_params(n: int, rng: np.random.Generator, ranges: DetectorRanges | None = None) -> DetectorParams:
    """Draw ``n`` parameter sets from ``ranges`` with a seeded numpy ``Generator``."""
    r = ranges or DetectorRanges()
    u = lambda lo_hi: rng.uniform(lo_hi[0], lo_hi[1], n)  # noqa: E731
    dose = 10 ** u(r.log10_dose)
    dose[rng.random(n) < r.noiseless_fraction] = np.inf
    aff = np.tile(np.eye(2), (n, 1, 1)) + rng.uniform(-r.affine, r.affine, (n, 2, 2))
    return DetectorParams(
        dose=dose, background=u(r.background), radial_background=u(r.radial_background),
        radial_width_px=u(r.radial_width_px), blur_px=u(r.blur_px), scale=u(r.scale),
        rotation_deg=u(r.rotation_deg), shift_px=rng.uniform(-r.shift_px, r.shift_px, (n, 2)), affine=aff,
        flip=(rng.random(n) < 0.5) if r.flip else np.zeros(n, bool), intensity_scale=u(r.intensity_scale),
    )


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of (B, H, W) with sigma (B,) in px, via FFT."""
    B, H, W = x.shape
    fy = torch.fft.fftfreq(H, device=x.device, dtype=x.dtype)
    fx = torch.fft.rfftfreq(W, device=x.device, dtype=x.dtype)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    kern = torch.exp(-2 * math.pi**2 * sigma[:, None, None] ** 2 * f2[None])
    return torch.fft.irfft2(torch.fft.rfft2(x) * kern, s=(H, W))


def apply_detector(patterns, params: DetectorParams, out_px: int | None = None, pixel_ratio: float = 1.0,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Map simulated patterns (B, H, W) onto a detector with the given effects.

    Parameters
    ----------
    patterns : array or tensor (B, H, W)
        Simulated intensities (any normalisation; each pattern is treated as a probability
        map of where its ``dose`` electrons land).
    params : DetectorParams
        Effects per pattern.
    out_px : int
        Detector size (px); default H.
    pixel_ratio : float
        Detector pixel size / pattern pixel size.
    generator : torch.Generator
        Seeded RNG for the Poisson noise.

    Returns
    -------
    torch.Tensor (B, out_px, out_px), float32 counts.
    """
    x = torch.as_tensor(np.asarray(patterns) if not torch.is_tensor(patterns) else patterns, dtype=torch.float32)
    if device is not None:
        x = x.to(device)
    dev = x.device
    B, H, W = x.shape
    out_px = out_px or H
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev)  # noqa: E731
    total = x.sum(dim=(1, 2)).clamp_min(1e-30)
    # geometry: output pixel (relative to centre + shift) -> input pixel
    c_out = (out_px - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(out_px, device=dev, dtype=torch.float32) - c_out,
                            torch.arange(out_px, device=dev, dtype=torch.float32) - c_out, indexing="ij")
    sh = t(params.shift_px)
    uy = yy[None] - sh[:, 0, None, None]
    ux = xx[None] - sh[:, 1, None, None]
    flip = torch.as_tensor(np.asarray(params.flip, bool), device=dev)
    ux = torch.where(flip[:, None, None], -ux, ux)
    th = t(np.deg2rad(params.rotation_deg))
    cos, sin = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    ry = sin * ux + cos * uy
    rx = cos * ux - sin * uy
    A = torch.linalg.inv(t(params.affine))
    ay = A[:, 0, 0, None, None] * ry + A[:, 0, 1, None, None] * rx
    ax = A[:, 1, 0, None, None] * ry + A[:, 1, 1, None, None] * rx
    s = t(params.scale)[:, None, None] / pixel_ratio
    iy = ay / s + (H - 1) / 2
    ix = ax / s + (W - 1) / 2
    grid = torch.stack([ix / (W - 1) * 2 - 1, iy / (H - 1) * 2 - 1], dim=-1)
    y = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
    # keep intensity per unit solid angle: an output pixel collects (ratio/scale)^2 input pixels
    y = y * (pixel_ratio / t(params.scale)[:, None, None]) ** 2
    mean = (total / (H * W) * (pixel_ratio / t(params.scale)) ** 2)[:, None, None]
    bg = t(params.background)[:, None, None] * mean
    r2 = (yy**2 + xx**2)[None]
    w = t(params.radial_width_px)[:, None, None]
    radial = t(params.radial_background)[:, None, None] * mean * 1.0 / (1.0 + r2 / w**2)
    y = y + bg + radial
    blur = t(params.blur_px)
    if bool((blur > 0).any()):
        y = torch.where((blur > 0)[:, None, None], _gaussian_blur(y, blur.clamp_min(1e-3)), y)
    y = y.clamp_min(0)
    dose = np.asarray(params.dose, dtype=np.float64)
    finite = np.isfinite(dose)
    if finite.any():
        idx = torch.as_tensor(np.nonzero(finite)[0], device=dev)
        lam = y[idx] / total[idx, None, None] * t(dose[finite])[:, None, None]
        y[idx] = torch.poisson(lam, generator=generator)
        y[~torch.as_tensor(finite, device=dev)] *= 1.0
        # noiseless patterns are scaled to the same mean-count convention
    if (~finite).any():
        idx = torch.as_tensor(np.nonzero(~finite)[0], device=dev)
        y[idx] = y[idx] / total[idx, None, None] * 1e6
    return y * t(params.intensity_scale)[:, None, None]


def similarity_part(affine):
    """Best-fit (least-squares) scale ``k`` and rotation ``phi`` (deg) of 2x2 distortions (B, 2, 2).

    In the detector model's convention (rows (y, x), ``[[cos, sin], [-sin, cos]]``), ``A ~ k R(phi)``
    with ``k cos phi = (a00 + a11) / 2`` and ``k sin phi = (a01 - a10) / 2``.

    >>> k, phi = similarity_part(np.array([[[1.01, 0.0], [0.0, 1.01]]]))
    >>> round(float(k[0]), 4), round(float(phi[0]), 4)
    (1.01, 0.0)
    """
    a = np.asarray(affine, dtype=np.float64)
    kc = (a[:, 0, 0] + a[:, 1, 1]) / 2
    ks = (a[:, 0, 1] - a[:, 1, 0]) / 2
    return np.hypot(kc, ks), np.rad2deg(np.arctan2(ks, kc))
