"""Lattice vectors from disk positions, and strain from lattice vectors.

Conventions
-----------
Detector coordinates are ``(x, y) = (column, row)`` in pixels. A lattice is an origin
``o`` (the undiffracted beam, or any disk: the strain does not depend on the choice) and a
reciprocal basis ``G = [g1 g2]`` (2x2, **columns** are the vectors ``(gx, gy)``); disk
``(h, k)`` lies at ``o + h g1 + k g2``.

Strain definition (exact)
-------------------------
Real-space lattice vectors are ``A = G^-T``. With the reference (strain-free) reciprocal
basis ``G0`` and the measured ``G`` (same indexing), the deformation gradient that maps
the reference crystal onto the measured one, ``A = F A0``, is

    ``F = G^-T G0^T``        (equivalently ``F^-T = G G0^-1``: ``g = F^-T g0``).

We report the symmetric strain ``eps = (F + F^T)/2 - I`` (so ``exx = F_xx - 1`` exactly,
and ``exy`` is the tensor component, half the engineering shear) and the rotation
``theta = atan2(F_yx - F_xy, F_xx + F_yy)`` of the polar decomposition ``F = R U``
(counter-clockwise in (x, y); on a detector with y pointing down it appears clockwise).
Strains are dimensionless (0.01 = 1 %) and expressed in the detector frame unless a
``frame_rotation_deg`` is given (the tensor is then rotated into axes turned by that angle).

py4DSTEM 0.14 (``get_strain_from_reference_g1g2``) instead uses the linearised
``beta = G G0^-1 = F^-T`` and ``e = I - beta``: for a uniaxial stretch ``1 + e`` it returns
``1 - 1/(1 + e) = e - e^2 + ...``, i.e. a bias of ``-e^2`` (-1e-4 at 1 % strain, -7e-5 at
0.85 %). :func:`linearised_strain` reproduces that form for comparison.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BadInputError

# status codes of a per-pattern lattice fit
STATUS = {
    0: "ok",
    1: "too few indexed disks for a lattice fit",
    2: "empty, blank or non-finite pattern",
    3: "fit residual too large (lattice not matched)",
    4: "no disks detected",
    5: "not processed (masked)",
}


# --------------------------------------------------------------------------------------
# Strain from lattice vectors
# --------------------------------------------------------------------------------------


def _frame(eps_xx, eps_yy, eps_xy, deg):
    if not deg:
        return eps_xx, eps_yy, eps_xy
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    # components in axes rotated by +t: eps' = R^T eps R
    xx = c * c * eps_xx + 2 * c * s * eps_xy + s * s * eps_yy
    yy = s * s * eps_xx - 2 * c * s * eps_xy + c * c * eps_yy
    xy = (c * c - s * s) * eps_xy + c * s * (eps_yy - eps_xx)
    return xx, yy, xy


def strain_from_deformation(F, frame_rotation_deg: float = 0.0) -> dict:
    """Strain components and rotation of deformation gradients ``F`` (..., 2, 2).

    Returns a dict of arrays ``exx, eyy, exy`` (dimensionless) and ``theta_deg``.
    """
    F = np.asarray(F, float)
    exx = F[..., 0, 0] - 1.0
    eyy = F[..., 1, 1] - 1.0
    exy = 0.5 * (F[..., 0, 1] + F[..., 1, 0])
    theta = np.rad2deg(np.arctan2(F[..., 1, 0] - F[..., 0, 1], F[..., 0, 0] + F[..., 1, 1]))
    exx, eyy, exy = _frame(exx, eyy, exy, frame_rotation_deg)
    return {"exx": exx, "eyy": eyy, "exy": exy, "theta_deg": theta}


def deformation_from_lattice(G, G0) -> np.ndarray:
    """Deformation gradient ``F = G^-T G0^T`` (..., 2, 2) from measured and reference reciprocal bases (columns)."""
    G = np.asarray(G, float)
    G0 = np.asarray(G0, float)
    with np.errstate(all="ignore"):
        bad = ~np.all(np.isfinite(G), axis=(-2, -1))
        Gs = np.where(bad[..., None, None], np.eye(2), G)
        det = np.linalg.det(Gs)
        bad |= np.abs(det) < 1e-12
        Gs = np.where(bad[..., None, None], np.eye(2), Gs)
        F = np.swapaxes(np.linalg.inv(Gs), -1, -2) @ np.swapaxes(G0, -1, -2)
    F[bad] = np.nan
    return F


def strain_from_lattice(G, G0, frame_rotation_deg: float = 0.0) -> dict:
    """Exact-definition strain of measured reciprocal bases ``G`` relative to the reference ``G0``.

    Parameters
    ----------
    G : array (..., 2, 2)
        Measured reciprocal basis, columns ``g1, g2`` (any consistent unit, e.g. px).
    G0 : array (2, 2)
        Reference basis, same indexing and unit.
    frame_rotation_deg : float
        Express the tensor in axes rotated by this angle from the detector (x, y) axes.

    Returns
    -------
    dict of arrays ``exx, eyy, exy`` (dimensionless; exy is the tensor component) and
    ``theta_deg`` (lattice rotation, degrees).

    Examples
    --------
    >>> import numpy as np
    >>> G0 = np.array([[30.0, 0.0], [0.0, 30.0]])
    >>> G = G0 / 1.01                       # lattice 1 % larger in real space
    >>> round(float(strain_from_lattice(G, G0)["exx"]), 12)
    0.01
    """
    return strain_from_deformation(deformation_from_lattice(G, G0), frame_rotation_deg)


def linearised_strain(G, G0) -> dict:
    """The linearised form of py4DSTEM 0.14: ``beta = G G0^-1``, ``exx = 1 - beta_xx`` etc.

    Only for comparison with :func:`strain_from_lattice` (bias ``-e^2`` for a stretch ``e``).
    """
    G = np.asarray(G, float)
    beta = G @ np.linalg.inv(np.asarray(G0, float))
    return {
        "exx": 1 - beta[..., 0, 0],
        "eyy": 1 - beta[..., 1, 1],
        "exy": -(beta[..., 0, 1] + beta[..., 1, 0]) / 2,
        "theta_deg": np.rad2deg((beta[..., 0, 1] - beta[..., 1, 0]) / 2),
    }


# --------------------------------------------------------------------------------------
# Lattice guess (Wiener-Khinchin autocorrelation)
# --------------------------------------------------------------------------------------


def reduce_basis(G) -> np.ndarray:
    """Gauss-reduced 2D basis (columns), ordered so ``g1`` is the vector closest to +x and det > 0."""
    G = np.asarray(G, float).copy()
    a, b = G[:, 0].copy(), G[:, 1].copy()
    for _ in range(50):
        if a @ a > b @ b:
            a, b = b, a
        mu = np.round((a @ b) / (a @ a))
        if mu == 0:
            break
        b = b - mu * a
    cands = [(a, b), (-a, b), (b, a), (-b, a)]
    key = [(round(abs(np.arctan2(v[1], v[0])), 6), round(np.arctan2(v[1], v[0]), 6)) for v, _ in cands]
    g1, other = cands[min(range(4), key=lambda i: key[i])]
    g2 = other if (g1[0] * other[1] - g1[1] * other[0]) > 0 else -other
    return np.stack([g1, g2], axis=1)


def autocorrelation(image) -> np.ndarray:
    """Wiener-Khinchin autocorrelation ``IFFT(|FFT(I)|^2)`` (no logarithm), zero-padded, centred.

    Returns an array (2H-1, 2W-1) whose centre pixel is the zero displacement.
    """
    im = np.asarray(image, float)
    im = im - im.mean()
    H, W = im.shape
    f = np.fft.rfft2(im, s=(2 * H, 2 * W))
    ac = np.fft.irfft2(np.abs(f) ** 2, s=(2 * H, 2 * W))
    ac = np.fft.fftshift(ac)[1:, 1:]
    return ac


def _subpixel_peak(a, y, x):
    def p(c, l, r):
        d = l - 2 * c + r
        return 0.0 if d >= 0 else 0.5 * (l - r) / d

    return y + p(a[y, x], a[y - 1, x], a[y + 1, x]), x + p(a[y, x], a[y, x - 1], a[y, x + 1])


def lattice_guess_autocorrelation(image, min_spacing_px: float = 8.0, n_peaks: int = 12) -> np.ndarray:
    """Reciprocal basis (2, 2), columns in px, from the autocorrelation of a (mean) pattern.

    The autocorrelation of a disk lattice peaks at the lattice vectors; the two shortest
    strong, non-collinear peaks (farther than ``min_spacing_px`` from the origin) form the basis,
    Gauss-reduced by :func:`reduce_basis`.
    """
    from scipy.ndimage import maximum_filter

    im = np.asarray(image, float)
    if im.ndim != 2 or not np.all(np.isfinite(im)) or im.max() <= im.min():
        raise BadInputError("lattice guess needs a finite, non-constant 2D pattern")
    # disk-edge contrast: the square root tames the dominant undiffracted disk (still no log)
    ac = autocorrelation(np.sqrt(np.clip(im - np.median(im), 0, None)))
    cy, cx = (ac.shape[0] - 1) // 2, (ac.shape[1] - 1) // 2
    yy, xx = np.indices(ac.shape)
    r = np.hypot(yy - cy, xx - cx)
    mx = maximum_filter(ac, size=5)
    pk = (ac == mx) & (r > min_spacing_px) & (yy > 0) & (xx > 0) & (yy < ac.shape[0] - 1) & (xx < ac.shape[1] - 1)
    pk &= (xx > cx) | ((xx == cx) & (yy > cy))  # half plane (the autocorrelation is centrosymmetric)
    ys, xs = np.nonzero(pk)
    if len(ys) < 2:
        raise BadInputError("no periodic disk lattice found in the pattern autocorrelation")
    # normalise by the overlap area of the zero-padded correlation (|dx| < W, |dy| < H)
    H, W = im.shape
    area = (H - np.abs(ys - cy)) * (W - np.abs(xs - cx))
    val = ac[ys, xs] / np.maximum(area, 1)
    order = np.argsort(-val)[: max(n_peaks, 2)]
    cands = []
    for i in order:
        if val[i] < 0.2 * val[order[0]]:
            continue
        py, px = _subpixel_peak(ac, ys[i], xs[i])
        cands.append(np.array([px - cx, py - cy]))
    cands.sort(key=lambda v: np.hypot(*v))
    g1 = cands[0]
    g2 = None
    for v in cands[1:]:
        cross = abs(g1[0] * v[1] - g1[1] * v[0]) / (np.hypot(*g1) * np.hypot(*v))
        if cross > 0.3:
            g2 = v
            break
    if g2 is None:
        raise BadInputError("the pattern autocorrelation shows only one lattice direction")
    return reduce_basis(np.stack([g1, g2], axis=1))


# --------------------------------------------------------------------------------------
# Indexing and weighted least-squares lattice fit (batched)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatticeFit:
    """Per-pattern lattice fits (leading shape = batch shape).

    Attributes
    ----------
    G : (..., 2, 2) reciprocal basis, columns ``g1, g2`` (px); NaN where not fitted.
    origin : (..., 2) origin (x, y) px.
    residual_px : (...) weighted rms distance of the indexed disks from the fitted lattice (px).
    n_disks : (...) number of disks used.
    status : (...) int code, see :data:`STATUS`.
    hk : (..., K, 2) indices of each input disk (meaningful where ``used``).
    used : (..., K) bool, disk used in the fit.
    """

    G: np.ndarray
    origin: np.ndarray
    residual_px: np.ndarray
    n_disks: np.ndarray
    status: np.ndarray
    hk: np.ndarray
    used: np.ndarray


def _wls(pos, w, hk):
    """Batched weighted LSQ of pos (B,K,2) = o + h g1 + k g2; returns G (B,2,2), o (B,2), ok (B,)."""
    A = np.concatenate([np.ones(hk.shape[:-1] + (1,)), hk.astype(float)], -1)  # (B,K,3)
    AtW = np.swapaxes(A * w[..., None], -1, -2)  # (B,3,K)
    N = AtW @ A  # (B,3,3)
    rhs = AtW @ pos  # (B,3,2)
    det = np.linalg.det(N)
    ok = np.abs(det) > 1e-9 * np.maximum(np.abs(N).max((-2, -1)) ** 3, 1e-30)
    N[~ok] = np.eye(3)
    sol = np.linalg.solve(N, rhs)  # (B,3,2): rows o, g1, g2
    o = sol[:, 0, :]
    G = np.swapaxes(sol[:, 1:, :], -1, -2)  # columns g1, g2
    return G, o, ok


def fit_lattice(positions, weights=None, valid=None, *, G_guess, origin_guess=None, max_index: int = 8,
                tolerance: float = 0.2, outlier_px: float = 1.0, min_disks: int = 4, max_residual_px: float = 1.5,
                iterations: int = 3) -> LatticeFit:
    """Index disks against a lattice guess and fit origin + two lattice vectors per pattern.

    Parameters
    ----------
    positions : array (B, K, 2) or (K, 2)
        Disk centres (x, y) px; rows with ``valid == False`` or NaN are ignored.
    weights : array (B, K), optional
        Weights of the least-squares fit (e.g. disk counts: inverse variance of the centre).
    valid : bool array (B, K), optional
    G_guess : array (2, 2) or (B, 2, 2)
        Lattice guess (columns px), e.g. from :func:`lattice_guess_autocorrelation`.
    origin_guess : array (2,) or (B, 2), optional
        Expected position of the origin disk; per pattern, the detected disk nearest to it
        is the origin of the indexing (default: the highest-weight disk).
    max_index : int
        Largest |h|, |k| accepted.
    tolerance : float
        A disk is indexed when it lies within ``tolerance`` x (shortest lattice vector) of a
        lattice point of the guess.
    outlier_px : float
        After a fit, disks farther than ``max(outlier_px, 4 x median residual)`` are dropped.
    min_disks : int
        Fewer indexed disks (or disks on one line only) gives status 1.
    max_residual_px : float
        Larger weighted rms residual gives status 3.

    Returns
    -------
    LatticeFit
    """
    pos = np.asarray(positions, float)
    single = pos.ndim == 2
    if single:
        pos = pos[None]
    B, K = pos.shape[:2]
    w = np.ones((B, K)) if weights is None else np.asarray(weights, float).reshape(B, K).copy()
    v = np.ones((B, K), bool) if valid is None else np.asarray(valid, bool).reshape(B, K).copy()
    v &= np.all(np.isfinite(pos), -1) & np.isfinite(w) & (w > 0)
    pos = np.where(v[..., None], pos, 0.0)
    w = np.where(v, w, 0.0)
    Gg = np.broadcast_to(np.asarray(G_guess, float), (B, 2, 2)).copy()
    # per-pattern origin disk
    if origin_guess is not None:
        og = np.broadcast_to(np.asarray(origin_guess, float), (B, 2))
        d = np.linalg.norm(pos - og[:, None, :], axis=-1)
        d[~v] = np.inf
        oi = np.argmin(d, axis=1)
    else:
        oi = np.argmax(np.where(v, w, -np.inf), axis=1)
    o = pos[np.arange(B), oi]
    gmin = np.min(np.linalg.norm(Gg, axis=1), axis=1)
    status = np.zeros(B, np.int8)
    status[v.sum(1) == 0] = 4
    G = Gg
    hk = np.zeros((B, K, 2), int)
    used = v.copy()
    res = np.full(B, np.nan)
    for it in range(iterations):
        Ginv = np.linalg.inv(G)
        f = np.einsum("bij,bkj->bki", Ginv, pos - o[:, None, :])
        hk = np.round(f).astype(int)
        pred = o[:, None, :] + np.einsum("bij,bkj->bki", G, hk)
        dist = np.linalg.norm(pos - pred, axis=-1)
        tol = tolerance * gmin if it == 0 else np.maximum(np.minimum(tolerance * gmin, 3 * outlier_px),
                                                            np.nan_to_num(4 * res, nan=0.0))
        used = v & (dist < tol[:, None] if np.ndim(tol) else dist < tol) & (np.abs(hk).max(-1) <= max_index)
        if it > 0:
            used &= dist < np.maximum(outlier_px, 4 * np.nan_to_num(res, nan=outlier_px))[:, None]
        ww = np.where(used, w, 0.0)
        Gn, on, ok = _wls(pos, ww, hk)
        # enough disks spanning both directions?
        span = np.abs(np.linalg.det(np.einsum("bk,bki,bkj->bij", used.astype(float), hk.astype(float), hk.astype(float))))
        good = ok & (used.sum(1) >= min_disks) & (span > 0.5)
        G = np.where(good[:, None, None], Gn, Gg)
        o = np.where(good[:, None], on, o)
        pred = o[:, None, :] + np.einsum("bij,bkj->bki", G, hk)
        r2 = np.sum((pos - pred) ** 2, -1)
        sw = ww.sum(1)
        res = np.sqrt(np.where(sw > 0, (ww * r2).sum(1) / np.maximum(sw, 1e-30), np.nan))
    status[(status == 0) & ~good] = 1
    status[(status == 0) & (res > max_residual_px)] = 3
    Gout = np.where((status == 0)[:, None, None], G, np.nan)
    oout = np.where((status == 0)[:, None], o, np.nan)
    out = LatticeFit(Gout, oout, res, used.sum(1), status, hk, used)
    if single:
        out = LatticeFit(*(a[0] for a in dataclasses.astuple(out)))
    return out


def reference_lattice(G, region=None, status=None) -> np.ndarray:
    """Reference basis: element-wise median of ``G`` (..., 2, 2) over a region of ok fits.

    ``region`` is a boolean mask over the leading (scan) shape, a tuple of slices, or None (all).
    """
    G = np.asarray(G, float)
    lead = G.shape[:-2]
    m = region_mask(region, lead)
    if status is not None:
        m &= np.asarray(status) == 0
    m &= np.all(np.isfinite(G), axis=(-2, -1))
    if not m.any():
        raise BadInputError("the reference region contains no successfully fitted pattern")
    return np.median(G[m], axis=0)


def region_mask(region, shape) -> np.ndarray:
    """Boolean mask of ``shape`` from a mask, a tuple of slices, ``(y0, y1, x0, x1)`` or None (everything)."""
    if region is None:
        return np.ones(shape, bool)
    if isinstance(region, np.ndarray) or hasattr(region, "values"):
        m = np.asarray(getattr(region, "values", region)).astype(bool)
        if m.shape != tuple(shape):
            raise BadInputError(f"reference mask has shape {m.shape}, scan is {tuple(shape)}")
        return m.copy()
    m = np.zeros(shape, bool)
    if isinstance(region, tuple) and len(region) == 4 and all(isinstance(v, (int, np.integer)) for v in region):
        y0, y1, x0, x1 = region
        m[y0:y1, x0:x1] = True
    elif isinstance(region, tuple) and all(isinstance(v, slice) for v in region):
        m[region] = True
    else:
        raise BadInputError("reference region must be a boolean mask, a tuple of slices or (y0, y1, x0, x1)")
    if not m.any():
        raise BadInputError("reference region is empty")
    return m
