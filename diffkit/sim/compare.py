"""Comparing simulated patterns: correlation, thickness read-out and Bloch patterns on any grid.

NCC alone is no test of thickness fidelity (two patterns can correlate at 0.997 and still
read 2-4 nm apart): :func:`read_thickness` reads the thickness a reference series assigns to
a pattern, which is what a fit or a network does with it.
"""
from __future__ import annotations

import numpy as np


def ncc(a, b) -> float:
    """Normalised cross-correlation (Pearson r over pixels) of two arrays of one shape."""
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def read_thickness(patterns, reference, thickness_nm, mask=None, weight: str = "poisson") -> np.ndarray:
    """Thickness (nm) that a reference series assigns to each pattern.

    Parameters
    ----------
    patterns : (n, ...) array
        Patterns to read, on the reference's grid.
    reference : (T, ...) array
        Reference patterns at ``thickness_nm`` (T,), increasing, evenly or finely spaced.
    mask : bool array of the pattern shape, optional
        Pixels to use (default all).
    weight : "poisson" or "uniform"
        χ² weights: 1 / reference intensity (shot-noise-like, every pixel counts by its
        relative error) or uniform.

    Each pattern is compared with every reference pattern after a free intensity scale
    (least squares); the χ² minimum over thickness is refined by a parabola through it and
    its neighbours. Returns (n,) thicknesses in nm.

    >>> t = np.linspace(1, 50, 50); ref = np.stack([np.cos(0.2 * t_ * np.arange(20)) + 2 for t_ in t])
    >>> float(np.round(read_thickness(ref[[20]], ref, t)[0], 1))
    21.0
    """
    P = np.asarray(patterns, float).reshape(len(patterns), -1)
    R = np.asarray(reference, float).reshape(len(reference), -1)
    t = np.asarray(thickness_nm, float)
    if mask is not None:
        m = np.asarray(mask, bool).ravel()
        P, R = P[:, m], R[:, m]
    if weight == "poisson":
        w = 1.0 / np.maximum(R, 1e-6 * R.max(axis=1, keepdims=True))  # (T, npx)
    else:
        w = np.ones_like(R)
    # chi2(n, T) = sum w (p - s r)^2 with the best s = sum w p r / sum w r^2
    pr = P @ (w * R).T
    rr = (w * R * R).sum(1)
    pp = (P * P) @ w.T
    chi = pp - pr**2 / rr[None, :]
    chi = chi / np.maximum(pp, 1e-30)
    i = np.argmin(chi, axis=1)
    out = t[i].copy()
    inner = (i > 0) & (i < len(t) - 1)
    j = i[inner]
    rows = np.nonzero(inner)[0]
    y0, y1, y2 = chi[rows, j - 1], chi[rows, j], chi[rows, j + 1]
    t0, t1, t2 = t[j - 1], t[j], t[j + 1]
    # vertex of the parabola through three (possibly uneven) points
    den = (t0 - t1) * (t0 - t2) * (t1 - t2)
    A = (t2 * (y1 - y0) + t1 * (y0 - y2) + t0 * (y2 - y1)) / den
    B = (t2**2 * (y0 - y1) + t1**2 * (y2 - y0) + t0**2 * (y1 - y2)) / den
    ok = A > 0
    v = np.where(ok, -B / (2 * np.where(ok, A, 1.0)), t1)
    out[rows] = np.clip(v, t0, t2)
    return out


def bloch_pacbed_on_samples(solver, ky_mrad, kx_mrad, alpha_mrad: float, tilt_mrad, thickness_nm,
                            batch: int = 64) -> np.ndarray:
    """PACBED of a Bloch-wave solution on a uniform sample grid that contains k = 0, (T, ky, kx).

    The grid spacing must divide the reciprocal lattice (a multislice supercell's grid). Partial
    waves are the samples with |p| <= alpha; beam g of partial wave p lands on p + g; the
    crystal-frame direction is p + tilt (tilt (x, y) in mrad). Normalised to unit incident intensity.
    """
    kx = np.asarray(kx_mrad, float)
    ky = np.asarray(ky_mrad, float)
    s = kx[1] - kx[0]
    ix0, iy0 = int(np.argmin(np.abs(kx))), int(np.argmin(np.abs(ky)))
    m = solver.wavelength / solver.crystal.a * 1e3 / s
    if abs(m - round(m)) > 1e-3:
        raise ValueError(f"sample spacing {s} mrad does not divide the reciprocal lattice ({m} samples per g)")
    m = int(round(m))
    P = np.stack(np.meshgrid(np.arange(len(kx)) - ix0, np.arange(len(ky)) - iy0, indexing="ij"), -1).reshape(-1, 2)
    P = P[np.hypot(P[:, 0], P[:, 1]) * s <= alpha_mrad]  # (x, y) sample offsets
    q = P * s + np.asarray(tilt_mrad, float)[None, :]
    z = np.asarray(thickness_nm, float)
    out = np.zeros((len(z), len(ky), len(kx)))
    hk = solver.hk * m
    for b0 in range(0, len(P), batch):
        intensity = solver.beam_intensities(q[b0:b0 + batch], z)  # (B, n_beams, T)
        tx = P[b0:b0 + batch, None, 0] + hk[None, :, 0] + ix0
        ty = P[b0:b0 + batch, None, 1] + hk[None, :, 1] + iy0
        ok = (tx >= 0) & (tx < len(kx)) & (ty >= 0) & (ty < len(ky))
        for it in range(len(z)):
            np.add.at(out[it], (ty[ok], tx[ok]), intensity[..., it][ok])
    return out / len(P)
