"""Least-squares fitting (LSF) of PACBED patterns against a simulated library (seed 000, Secs. 2.4, 6.3).

The figure of merit is the seed's Eq. (1),

.. math:: \\chi^2 = \\sum_{ij} (I_{exp,ij} - f\\, I_{sim,ij})^2 ,

with the intensity factor ``f`` eliminated in closed form, ``f = <E,S>/<S,S>`` and
``chi2 = <E,E> - <E,S>^2/<S,S>`` (optionally with a uniform background ``b`` as a second
linear parameter, :func:`chi2_closed_form`). Because ``chi2`` then only needs the dot
products ``<E,S>``, one matrix product scores a resampled experimental pattern against
the whole library at once.

Search space
    every library thickness and every *signed* tilt: the library stores ``tilt_x >= tilt_y >= 0``
    and the other octants follow from the 4mm symmetry of the zone (transpose swaps the tilt
    components, mirroring the columns / rows flips the sign of ``tilt_x`` / ``tilt_y``).
    ``<E, op(S)> = <op^-1(E), S>``, so the symmetry operations act on the experimental pattern,
    never on the (large) library.
Geometry
    raw detector patterns are brought to the library frame with a starting geometry (disk
    centre, disk radius = scale, rotation) from the predictor's alignment, the calibration or
    projection moments. Scale, rotation and shift are then refined coarse-to-fine
    (:class:`GeometrySearch`): every candidate is scored on a 3x3x3x3 grid of geometries around
    the start (batched ``grid_sample`` + matrix products); the leading candidate's geometry is
    refined by Gauss-Newton, all candidates are rescored there, and the other leaders and the
    leader's grid neighbours are refined from it when a closed-form linearised step says they
    could overtake it. The experimental pattern is what gets resampled (equivalent to
    transforming the simulation, up to interpolation), so the library is read once per pass
    instead of once per geometry.
Fit region
    a disk of ``fit_radius_mrad`` about the pattern centre (default: the library's inscribed
    circle), shrunk when the detector does not cover it for every trial geometry, so that
    all candidates and geometries of one pattern are scored on the same pixels.
Uncertainty
    from the chi2 landscape (each candidate at its best geometry): the noise variance is
    estimated from the residual at the minimum, ``s2 = chi2_min / (n_pix - n_par)`` (reduced
    chi2 = 1), and parameters whose profile chi2 lies within ``delta_chi2 * s2`` of the minimum
    form the interval (``delta_chi2 = 1``: 68 % for one parameter); the curvature of the profile
    gives a standard error ``sqrt(s2 / c)`` (``chi2 ~ chi2_min + c (p - p0)^2``) and a sub-grid
    parabolic estimate. Model error (inelastic background, blur) is folded into ``s2``.

Hybrid CNN + LSF (seed Sec. 6.3, Fig. 10): :func:`hybrid_fit` takes the CNN's geometry and
thickness/tilt and restricts the search to +-3 nm and +-1 mrad around them (widened
automatically when the best fit lands on the window edge).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from ..errors import BadInputError
from .geometry import as_batch, rough_geometry
from .predictor import _units

# the 4mm group as (transpose, mirror rows, mirror columns); the library pattern of a signed
# tilt is mirror(transpose(pattern)), with tilt (tx, ty) -> swap if transpose, tx -> -tx if
# mirror columns, ty -> -ty if mirror rows (the convention used in training)
SYMMETRY_OPS = tuple((t, my, mx) for t in (0, 1) for my in (0, 1) for mx in (0, 1))


def apply_symmetry(pattern, tilt_x_mrad: float, tilt_y_mrad: float, op):
    """Library pattern (..., H, W) and its tilt under the symmetry operation ``op`` = (transpose,
    mirror rows, mirror columns); returns ``(pattern, tilt_x_mrad, tilt_y_mrad)``."""
    t, my, mx = op
    p = np.asarray(pattern)
    tx, ty = float(tilt_x_mrad), float(tilt_y_mrad)
    if t:
        p = np.swapaxes(p, -1, -2)
        tx, ty = ty, tx
    if mx:
        p = p[..., ::-1]
        tx = -tx
    if my:
        p = p[..., ::-1, :]
        ty = -ty
    return np.ascontiguousarray(p), tx, ty


def _inverse_op(E: torch.Tensor, op) -> torch.Tensor:
    """op^-1 applied to experimental patterns (..., n, n): <E, op(S)> = <op^-1(E), S>."""
    t, my, mx = op
    if mx:
        E = E.flip(-1)
    if my:
        E = E.flip(-2)
    if t:
        E = E.transpose(-1, -2)
    return E


def chi2_closed_form(exp, sim, fit_background: bool = False, weights=None):
    """chi2 of Eq. (1) with the intensity factor ``f`` (and background ``b``) in closed form.

    Parameters
    ----------
    exp, sim : array (..., H, W)
        Experimental and simulated intensities (broadcast against each other).
    fit_background : bool
        Model ``exp ~ f * sim + b`` (two linear parameters) instead of ``f * sim``.
    weights : array (H, W) of {0, 1}, optional
        Fit region.

    Returns
    -------
    chi2, f, b : arrays (...)
        ``b`` is 0 without ``fit_background``.
    """
    e = np.asarray(exp, dtype=np.float64)
    s = np.asarray(sim, dtype=np.float64)
    w = np.ones(e.shape[-2:]) if weights is None else np.asarray(weights, dtype=np.float64)
    ax = (-2, -1)
    see = (w * e * e).sum(ax)
    sel = (w * e * s).sum(ax)
    sll = (w * s * s).sum(ax)
    if not fit_background:
        f = sel / np.maximum(sll, 1e-300)
        return np.maximum(see - f * sel, 0.0), f, np.zeros_like(f)
    se = (w * e).sum(ax)
    sl = (w * s).sum(ax)
    n = w.sum()
    det = np.maximum(sll * n - sl * sl, 1e-300)
    f = (sel * n - sl * se) / det
    b = (sll * se - sl * sel) / det
    return np.maximum(see - f * sel - b * se, 0.0), f, b


@dataclasses.dataclass(frozen=True)
class GeometrySearch:
    """Coarse-to-fine refinement of the pattern geometry during the LSF search.

    Coarse: every candidate is scored on the grid ``-step, 0, +step`` of every axis around the
    starting geometry (3^4 = 81 geometries) and keeps its best. Fine: the best candidate is
    refined by Gauss-Newton (trust region starting at one step, at most ``max_iter``
    iterations, converged when the step is below ``tol`` steps); all candidates are rescored at
    its geometry; then the ``n_refine`` best and the best's grid neighbours are refined each on
    its own from there (``max_iter_others`` iterations), a new leader fully again.
    A step of 0 disables that axis.

    Attributes
    ----------
    shift_px : float
        Centre shift step (library pixels).
    scale : float
        Relative scale (camera length) step.
    rotation_deg : float
        Rotation step (degrees).
    n_refine : int
        Candidates refined individually.
    max_iter : int
        Gauss-Newton iterations for the leading candidate (0: grid only).
    tol : float
        Convergence threshold, in steps.
    max_iter_others : int
        Gauss-Newton iterations for the other leaders and the leader's grid neighbours, which
        start from the leader's refined geometry.
    screen_margin : float or None
        Of those, a candidate is refined only when one linearised Gauss-Newton step from its
        current geometry (closed form, one resampling per distinct geometry) could bring its
        chi2 within this relative margin (>= 0) of the leader's; None refines them all.
    coarse_axes : tuple of int
        Axes (0 dy, 1 dx, 2 scale, 3 rotation) of the coarse grid; the others start at the
        starting geometry and are left to the Gauss-Newton refinement (e.g. ``(3,)`` when only the
        rotation of the start is in doubt: 3 coarse geometries instead of 81).
    """

    shift_px: float = 0.5
    scale: float = 0.01
    rotation_deg: float = 1.0
    n_refine: int = 16
    max_iter: int = 8
    tol: float = 0.05
    max_iter_others: int = 2
    screen_margin: float | None = 0.01
    coarse_axes: tuple = (0, 1, 2, 3)

    @classmethod
    def fixed(cls) -> "GeometrySearch":
        """No refinement: the starting geometry only."""
        return cls(0.0, 0.0, 0.0, 1, 0, max_iter_others=0)

    @property
    def steps(self) -> np.ndarray:
        """(dy px, dx px, d log scale, d rotation deg) step sizes."""
        return np.array([self.shift_px, self.shift_px, math.log1p(self.scale), self.rotation_deg])

    def offsets(self) -> np.ndarray:
        """(G, 4) coarse-grid offsets (dy px, dx px, d log scale, d rotation deg), the start first."""
        axes = [np.array([-s, 0.0, s]) if s > 0 and a in self.coarse_axes else np.zeros(1)
                for a, s in enumerate(self.steps)]
        g = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 4)
        order = np.argsort(np.abs(g).sum(1), kind="stable")
        return g[order]

    def reach(self) -> tuple[float, float]:
        """Typical largest shift (px) and relative scale change (for the fit-region margin)."""
        f = 3.0 if self.max_iter > 0 else 1.0
        return self.shift_px * f, math.expm1(math.log1p(self.scale) * f)


class LsfLibrary:
    """A simulated PACBED library prepared for LSF: patterns as a (rows, pixels) matrix, the
    signed-tilt grid from the 4mm symmetry, and per-radius intensity sums for the fit region.

    Build it once (:meth:`from_dataset`) and reuse it: loading the full 13.6 mrad library takes
    a few seconds and about 1 GB.
    """

    def __init__(self, patterns: np.ndarray, thickness_nm, tilt_x_mrad, tilt_y_mrad, attrs: dict, device=None,
                 smooth_px: float = 0.5):
        p = np.asarray(patterns, dtype=np.float32)
        if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
            raise BadInputError(f"library patterns must be (tilt, thickness, n, n), got {p.shape}")
        if not np.isfinite(p).all():
            raise BadInputError("library patterns contain non-finite values")
        self.device = torch.device(device or "cpu")
        self.n_tilt, self.n_thickness, self.n_px = p.shape[0], p.shape[1], p.shape[-1]
        self.thickness_nm = np.asarray(thickness_nm, dtype=float)
        self.canonical_tilt_x = np.asarray(tilt_x_mrad, dtype=float)
        self.canonical_tilt_y = np.asarray(tilt_y_mrad, dtype=float)
        self.attrs = dict(attrs)
        self.pixel_size_mrad = float(attrs["pixel_size_mrad"])
        self.disk_radius_px = float(attrs["disk_radius_px"])
        self.convergence_mrad = float(attrs.get("convergence_mrad", self.disk_radius_px * self.pixel_size_mrad))
        self.tilt_step_mrad = float(attrs.get("fine_step_mrad") or _grid_step(self.canonical_tilt_x))
        if not smooth_px >= 0:
            raise BadInputError("smooth_px must be >= 0")
        self.smooth_px = float(smooth_px)
        self.matrix = torch.from_numpy(p.reshape(self.n_tilt * self.n_thickness, -1)).to(self.device)
        n = self.n_px
        self.smooth_matrix = _gauss_matrix(n, self.smooth_px, self.device) if self.smooth_px > 0 else None
        if self.smooth_px > 0:  # into a new tensor: never modify the caller's array
            src, self.matrix = self.matrix, torch.empty_like(self.matrix)
            for s in range(0, src.shape[0], 2048):
                c = src[s:s + 2048]
                self.matrix[s:s + 2048] = smooth(c.reshape(-1, n, n), self.smooth_px, self.smooth_matrix).reshape(len(c), -1)
            del src
        v = np.arange(n) - (n - 1) / 2
        self.radius_px = np.hypot(v[:, None], v[None, :]).ravel()
        ring = np.floor(self.radius_px).astype(int)
        self.n_rings = int(ring.max()) + 1
        onehot = torch.zeros(n * n, self.n_rings, dtype=torch.float32, device=self.device)
        onehot[torch.arange(n * n), torch.as_tensor(ring)] = 1.0
        l1, l2 = [], []
        for s in range(0, self.matrix.shape[0], 4096):
            c = self.matrix[s:s + 4096]
            l1.append((c @ onehot).double())
            l2.append(((c * c) @ onehot).double())
        z = torch.zeros(self.matrix.shape[0], 1, dtype=torch.float64, device=self.device)
        # cum[:, R] = sum over pixels with radius < R (integer R)
        self.ring_l1 = torch.cat([z, torch.cat(l1).cumsum(1)], 1)
        self.ring_l2 = torch.cat([z, torch.cat(l2).cumsum(1)], 1)
        self._build_tilt_grid()

    @classmethod
    def from_dataset(cls, lib, thickness_range_nm=None, device=None, smooth_px: float = 0.5) -> "LsfLibrary":
        """From the ``xarray.Dataset`` of :func:`diffkit.sim.pacbed.build_pacbed_library`,
        optionally only thicknesses within ``thickness_range_nm = (lo, hi)``.

        ``smooth_px`` is the sigma (library px) of a Gaussian applied to the library patterns and,
        identically, to every resampled experimental pattern (a matched low-pass). It makes the
        fit insensitive to the varying smoothing of bilinear resampling at sub-pixel shifts,
        rotations and scales, which otherwise biases coarse libraries; 0 disables."""
        if "pattern" not in getattr(lib, "data_vars", {}):
            raise BadInputError("expected a PACBED library Dataset with a 'pattern' variable")
        if thickness_range_nm is not None:
            lo, hi = thickness_range_nm
            lib = lib.sel(thickness_nm=slice(lo, hi))
        return cls(lib["pattern"].values, lib["thickness_nm"].values, lib["tilt_x_mrad"].values,
                   lib["tilt_y_mrad"].values, dict(lib.attrs), device=device, smooth_px=smooth_px)

    @classmethod
    def zero_tilt(cls, patterns, thickness_nm, *, pixel_size_mrad: float, disk_radius_px: float,
                  convergence_mrad: float, tilt_step_mrad: float, device=None, smooth_px: float = 0.5) -> "LsfLibrary":
        """A library of zero-tilt patterns (T, n, n) at ``thickness_nm`` (T,) only, e.g. the thin-crystal
        reference a model card ships (geometry refinement of thin patterns, which depend little on
        tilt); ``tilt_step_mrad`` is the step of the library it came from."""
        return cls(np.asarray(patterns)[None], thickness_nm, [0.0], [0.0],
                   {"pixel_size_mrad": pixel_size_mrad, "disk_radius_px": disk_radius_px,
                    "convergence_mrad": convergence_mrad, "fine_step_mrad": tilt_step_mrad},
                   device=device, smooth_px=smooth_px)

    def _build_tilt_grid(self):
        step = self.tilt_step_mrad
        ix = np.rint(self.canonical_tilt_x / step).astype(int)
        iy = np.rint(self.canonical_tilt_y / step).astype(int)
        if not (np.allclose(ix * step, self.canonical_tilt_x, atol=1e-6) and np.allclose(iy * step, self.canonical_tilt_y, atol=1e-6)):
            raise BadInputError("library tilts are not on a regular grid")
        m = int(max(ix.max(), iy.max()))
        self.tilt_axis_mrad = np.arange(-m, m + 1) * step
        lut = -np.ones((2 * m + 1, 2 * m + 1), dtype=int)  # (iy, ix) -> candidate
        tilt_i, ops, gy, gx = [], [], [], []
        for i in range(self.n_tilt):
            for k, (t, my, mx) in enumerate(SYMMETRY_OPS):
                a, b = (iy[i], ix[i]) if t else (ix[i], iy[i])
                a, b = (-a if mx else a), (-b if my else b)
                if lut[b + m, a + m] < 0:
                    lut[b + m, a + m] = len(tilt_i)
                    tilt_i.append(i)
                    ops.append(k)
                    gy.append(b + m)
                    gx.append(a + m)
        self.tilt_lut = lut
        self.cand_tilt = np.asarray(tilt_i)
        self.cand_op = np.asarray(ops)
        self.cand_gy = np.asarray(gy)
        self.cand_gx = np.asarray(gx)
        self.cand_tilt_x = self.tilt_axis_mrad[self.cand_gx]
        self.cand_tilt_y = self.tilt_axis_mrad[self.cand_gy]
        self.n_signed = len(tilt_i)

    def __repr__(self):
        return (f"LsfLibrary({self.n_tilt} tilts -> {self.n_signed} signed, {self.n_thickness} thicknesses "
                f"{self.thickness_nm.min():g}-{self.thickness_nm.max():g} nm, {self.n_px} px, "
                f"{self.pixel_size_mrad:.4f} mrad/px)")

    def signed_pattern(self, thickness_nm: float, tilt_x_mrad: float, tilt_y_mrad: float) -> np.ndarray:
        """The library pattern (n, n) as used in the fit (smoothed by ``smooth_px``) at a grid
        thickness and signed grid tilt; see :func:`signed_library_pattern` for the raw one."""
        j = int(np.argmin(np.abs(self.thickness_nm - thickness_nm)))
        m = (len(self.tilt_axis_mrad) - 1) // 2
        gx = int(np.rint(tilt_x_mrad / self.tilt_step_mrad)) + m
        gy = int(np.rint(tilt_y_mrad / self.tilt_step_mrad)) + m
        if not (0 <= gx < 2 * m + 1 and 0 <= gy < 2 * m + 1):
            raise BadInputError("tilt outside the library")
        c = self.tilt_lut[gy, gx]
        i = self.cand_tilt[c]
        p = self.matrix[i * self.n_thickness + j].cpu().numpy().reshape(self.n_px, self.n_px)
        out, tx, ty = apply_symmetry(p, self.canonical_tilt_x[i], self.canonical_tilt_y[i], SYMMETRY_OPS[self.cand_op[c]])
        return out

    def search_mask(self, thickness_nm=None, tilt_x_mrad=None, tilt_y_mrad=None) -> np.ndarray:
        """Boolean (n_signed, n_thickness) of the candidates inside inclusive ranges (lo, hi)."""
        eps = 1e-6
        t_ok = np.ones(self.n_thickness, bool)
        if thickness_nm is not None:
            t_ok = (self.thickness_nm >= thickness_nm[0] - eps) & (self.thickness_nm <= thickness_nm[1] + eps)
        c_ok = np.ones(self.n_signed, bool)
        if tilt_x_mrad is not None:
            c_ok &= (self.cand_tilt_x >= tilt_x_mrad[0] - eps) & (self.cand_tilt_x <= tilt_x_mrad[1] + eps)
        if tilt_y_mrad is not None:
            c_ok &= (self.cand_tilt_y >= tilt_y_mrad[0] - eps) & (self.cand_tilt_y <= tilt_y_mrad[1] + eps)
        return c_ok[:, None] & t_ok[None, :]


def signed_library_pattern(lib, thickness_nm: float, tilt_x_mrad: float, tilt_y_mrad: float) -> np.ndarray:
    """Raw pattern (n, n) of a library ``xarray.Dataset`` at a grid thickness and any signed grid
    tilt, via the 4mm symmetry (raises when the tilt is not on the grid)."""
    tx, ty = abs(float(tilt_x_mrad)), abs(float(tilt_y_mrad))
    t = ty > tx
    a, b = (ty, tx) if t else (tx, ty)
    ltx, lty = np.asarray(lib["tilt_x_mrad"].values), np.asarray(lib["tilt_y_mrad"].values)
    d = np.hypot(ltx - a, lty - b)
    i = int(np.argmin(d))
    if d[i] > 1e-6 + 1e-3 * max(a, 1e-3):
        raise BadInputError(f"tilt ({tilt_x_mrad}, {tilt_y_mrad}) mrad is not on the library grid")
    th = np.asarray(lib["thickness_nm"].values)
    j = int(np.argmin(np.abs(th - thickness_nm)))
    if abs(th[j] - thickness_nm) > 1e-6:
        raise BadInputError(f"thickness {thickness_nm} nm is not a library thickness")
    p = np.asarray(lib["pattern"][i, j].values)
    op = (int(t), int(tilt_y_mrad < 0), int(tilt_x_mrad < 0))
    return apply_symmetry(p, ltx[i], lty[i], op)[0]


def _gauss_matrix(n: int, sigma_px: float, device=None) -> torch.Tensor:
    """(n, n) banded matrix of a normalised Gaussian (radius ceil(3 sigma), zero padding)."""
    r = max(1, int(math.ceil(3 * sigma_px)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    K = np.zeros((n, n))
    for i, w in enumerate(k):
        K += np.diag(np.full(n - abs(i - r), w), i - r)
    return torch.as_tensor(K, dtype=torch.float32, device=device)


def smooth(x: torch.Tensor, sigma_px: float, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian (sigma in px, zero padding) of (B, n, n); the identity for sigma 0.

    Done as ``K @ x @ K.T`` with a banded matrix: several times faster on CPU than a
    single-channel convolution."""
    if sigma_px <= 0:
        return x
    if x.shape[-1] != x.shape[-2]:
        raise BadInputError("smooth needs square patterns")
    K = matrix if matrix is not None else _gauss_matrix(x.shape[-1], sigma_px, x.device)
    return K @ x.float() @ K.T


def _grid_step(values):
    d = np.diff(np.unique(np.round(values, 9)))
    return float(d.min()) if len(d) else 1.0


def _as_library(library) -> LsfLibrary:
    if isinstance(library, LsfLibrary):
        return library
    return LsfLibrary.from_dataset(library)


def _check_patterns(patterns) -> torch.Tensor:
    if isinstance(patterns, (list, tuple)):
        patterns = np.asarray(patterns)
    a = patterns if torch.is_tensor(patterns) else np.asarray(patterns)
    if a.ndim not in (2, 3):
        raise BadInputError(f"expected a pattern (H, W) or a stack (B, H, W), got shape {tuple(a.shape)}")
    x = as_batch(a)
    if x.shape[0] == 0 or min(x.shape[-2:]) < 8:
        raise BadInputError(f"patterns must be non-empty and at least 8x8 px, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise BadInputError("patterns contain NaN or infinite values")
    if (x.sum(dim=(1, 2)) <= 0).any():
        raise BadInputError("patterns must have positive total intensity")
    return x.clamp_min(0)


def _per_pattern(v, B, name):
    a = np.asarray(v, dtype=float)
    if a.ndim == 0:
        a = np.full(B, float(a))
    if a.shape != (B,):
        raise BadInputError(f"{name} must be a scalar or have one value per pattern ({B}), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise BadInputError(f"{name} contains non-finite values")
    return a


def starting_geometry(lib: LsfLibrary, patterns: torch.Tensor, geometry=None, predictor=None, pixel_size_mrad=None):
    """(B, 4) raw-frame geometry (centre y, centre x, disk radius px, rotation deg) to start the LSF from.

    ``geometry`` may be a mapping with ``center_y_px``, ``center_x_px``, ``disk_radius_px`` and
    ``rotation_deg`` (e.g. the output of ``predict_batch``), the string ``"library"`` (patterns
    already in the library frame), or ``None``: the predictor's alignment when a predictor is
    given, else projection moments (disk radius from ``pixel_size_mrad`` when given).
    """
    B, H, W = patterns.shape
    if isinstance(geometry, str):
        if geometry != "library":
            raise BadInputError(f"unknown geometry {geometry!r}")
        if (H, W) != (lib.n_px, lib.n_px):
            raise BadInputError(f"geometry='library' needs {lib.n_px}x{lib.n_px} patterns, got {H}x{W}")
        c = (lib.n_px - 1) / 2
        return np.tile([c, c, lib.disk_radius_px, 0.0], (B, 1))
    if geometry is not None:
        keys = ("center_y_px", "center_x_px", "disk_radius_px", "rotation_deg")
        try:
            cols = [_per_pattern(np.asarray(geometry[k]), B, k) for k in keys]
        except KeyError as e:
            raise BadInputError(f"geometry needs {keys}") from e
        if (cols[2] <= 0).any():
            raise BadInputError("disk_radius_px must be positive")
        return np.stack(cols, 1)
    if predictor is not None:
        centre, radius, rot, _, _ = predictor.locate(patterns.to(predictor.device), pixel_size_mrad=pixel_size_mrad)
        return np.concatenate([centre.cpu().numpy(), radius.cpu().numpy()[:, None], rot.cpu().numpy()[:, None]], 1).astype(float)
    centre, radius = rough_geometry(patterns)
    r = radius.numpy().astype(float)
    if pixel_size_mrad:
        r = np.full(B, lib.convergence_mrad / float(pixel_size_mrad))
    return np.concatenate([centre.numpy().astype(float), r[:, None], np.zeros((B, 1))], 1)


def _apply_offsets(base: np.ndarray, off: np.ndarray, disk_radius_px: float) -> np.ndarray:
    """Geometries (G, 4) = base (4,) moved by offsets (G, 4) given in the library frame."""
    cy, cx, r, rot = base
    s = r / disk_radius_px
    th = math.radians(rot)
    dy, dx = off[:, 0], off[:, 1]
    out = np.empty((len(off), 4))
    out[:, 0] = cy + s * (math.sin(th) * dx + math.cos(th) * dy)
    out[:, 1] = cx + s * (math.cos(th) * dx - math.sin(th) * dy)
    out[:, 2] = r * np.exp(off[:, 2])
    out[:, 3] = rot + off[:, 3]
    return out


def _forward_op(L: torch.Tensor, op) -> torch.Tensor:
    """op applied to library patterns (..., n, n): the pattern of the signed tilt."""
    t, my, mx = op
    if t:
        L = L.transpose(-1, -2)
    if mx:
        L = L.flip(-1)
    if my:
        L = L.flip(-2)
    return L


class _Scorer:
    """Scores one experimental pattern against library candidates at trial geometries.

    The raw pattern is resampled into the library frame for all trial geometries in one
    ``grid_sample`` call, smoothed exactly like the library (``smooth_px``) and normalised to
    unit mean intensity in the fit region.
    """

    def __init__(self, lib: LsfLibrary, raw: torch.Tensor, start: np.ndarray, R: int, fit_background: bool):
        self.lib, self.R, self.bg = lib, R, fit_background
        self.raw = raw.to(lib.device).float()
        self.mask = torch.as_tensor(lib.radius_px < R, device=lib.device, dtype=torch.float32)
        self.v = torch.arange(lib.n_px, dtype=torch.float32, device=lib.device) - (lib.n_px - 1) / 2  # library px
        self.n_fit = int(self.mask.sum())
        self.norm = 1.0
        self.norm = float(self.resample(start[None]).sum()) / self.n_fit
        if not self.norm > 0:
            raise BadInputError("no intensity inside the fit region")

    def resample(self, geoms: np.ndarray, masked: bool = True) -> torch.Tensor:
        """(G, P) library-frame patterns at geometries (G, 4), zero outside the fit region."""
        n = self.lib.n_px
        H, W = self.raw.shape
        g = np.asarray(geoms, dtype=np.float64).reshape(-1, 4)
        G = len(g)
        s = g[:, 2] / self.lib.disk_radius_px
        th = np.deg2rad(g[:, 3])
        cos, sin = np.cos(th), np.sin(th)
        # library pixel v (centred) -> raw position centre + s R v, in grid_sample's normalised units
        # (elementwise from one coefficient tensor: several times faster on CPU than affine_grid)
        kx, ky = 2 / (W - 1), 2 / (H - 1)
        coef = torch.as_tensor(np.stack([s * cos * kx, -s * sin * kx, g[:, 1] * kx - 1,
                                         s * sin * ky, s * cos * ky, g[:, 0] * ky - 1], 1),
                               dtype=torch.float32, device=self.lib.device)[:, :, None, None]
        vx, vy = self.v[None, :], self.v[:, None]
        grid = torch.empty(G, n, n, 2, device=self.lib.device)
        grid[..., 0] = coef[:, 0] * vx + coef[:, 1] * vy + coef[:, 2]
        grid[..., 1] = coef[:, 3] * vx + coef[:, 4] * vy + coef[:, 5]
        out = torch.nn.functional.grid_sample(self.raw[None, None], grid.reshape(1, G * n, n, 2), mode="bilinear",
                                              padding_mode="zeros", align_corners=True).reshape(G, n, n)
        # matched low-pass in the library frame, exactly as applied to the library
        out = smooth(out, self.lib.smooth_px, self.lib.smooth_matrix).reshape(G, n * n)
        return out * (self.mask / self.norm) if masked else out / self.norm

    def chi2(self, d: torch.Tensor, rows: torch.Tensor, see: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
        """chi2 (K, G) from dot products d (K, G) with library rows (K,); see, se broadcast to d."""
        d = d.double()
        sll = self.lib.ring_l2[rows, self.R][:, None].clamp_min(1e-300)
        if not self.bg:
            return (see - d * d / sll).clamp_min(0)
        sl = self.lib.ring_l1[rows, self.R][:, None]
        n = float(self.n_fit)
        det = (sll * n - sl * sl).clamp_min(1e-300)
        f = (d * n - sl * se) / det
        b = (sll * se - sl * d) / det
        return (see - f * d - b * se).clamp_min(0)


def _sums(e: torch.Tensor):
    return (e * e).sum(-1).double(), e.sum(-1).double()


def _signed_patterns(L: torch.Tensor, ops: np.ndarray, n: int) -> torch.Tensor:
    """(K, P) signed patterns op_j(L_j) of library patterns L (K, P) under symmetry ops (K,)."""
    out = torch.empty_like(L)
    for k in np.unique(ops):
        sel = torch.as_tensor(np.nonzero(ops == k)[0], device=L.device)
        out[sel] = _forward_op(L[sel].reshape(-1, n, n), SYMMETRY_OPS[int(k)]).reshape(len(sel), -1)
    return out


class _Candidates:
    """One pattern's candidates: library rows and symmetry ops (the pattern of candidate j is
    op_j(L_j)).

    When the candidates are a small part of the library (the hybrid's window) their rows are
    gathered once, grouped by op, so that a scoring pass is one matrix product per op with the
    inverse op applied to the (few) experimental patterns; otherwise (the full search) the whole
    library is scored densely. The signed patterns of the few candidates that get refined are
    made on demand (:meth:`patterns`)."""

    def __init__(self, lib: LsfLibrary, rows: np.ndarray, ops: np.ndarray, gather: bool):
        self.lib, self.rows, self.ops = lib, rows, ops
        self.matrix = None
        if gather:
            order = np.argsort(ops, kind="stable")
            self.position = np.empty(len(rows), dtype=int)  # candidate -> row of self.matrix
            self.position[order] = np.arange(len(rows))
            self.rows_sorted = torch.as_tensor(rows[order], device=lib.device)
            self.matrix = torch.index_select(lib.matrix, 0, self.rows_sorted)
            bounds = np.searchsorted(ops[order], np.arange(len(SYMMETRY_OPS) + 1))
            self.blocks = [(k, int(bounds[k]), int(bounds[k + 1])) for k in range(len(SYMMETRY_OPS))
                           if bounds[k + 1] > bounds[k]]

    def patterns(self, idx) -> torch.Tensor:
        """(k, P) signed patterns op_j(L_j) of candidates ``idx``."""
        idx = np.asarray(idx)
        dev = self.lib.device
        if self.matrix is not None:
            L = self.matrix[torch.as_tensor(self.position[idx], device=dev)]
        else:
            L = self.lib.matrix[torch.as_tensor(self.rows[idx], device=dev)]
        return _signed_patterns(L, self.ops[idx], self.lib.n_px)


def _score_candidates(sc: _Scorer, e: torch.Tensor, cands: _Candidates):
    """Best chi2 (K,) over trial geometries e (G, P) and its geometry index (K,). Candidates with
    gathered rows are scored by one matrix product per symmetry op; otherwise the whole library is scored
    densely (every row against every op and geometry) and the candidates picked."""
    lib = sc.lib
    n = lib.n_px
    G = e.shape[0]
    dev = lib.device
    see, se = _sums(e)
    if cands.matrix is None:
        rows, ops = cands.rows, cands.ops
        img = e.reshape(G, n, n)
        # every library row against every op and geometry, in chunks; then pick the candidates
        N = lib.matrix.shape[0]
        Ef = torch.stack([_inverse_op(img, op) for op in SYMMETRY_OPS]).reshape(8 * G, n * n).T.contiguous()
        t_min = torch.empty(N, 8, dtype=torch.float64, device=dev)
        t_arg = torch.empty(N, 8, dtype=torch.long, device=dev)
        see8, se8 = see.repeat(8)[None], se.repeat(8)[None]
        for s in range(0, N, 2048):
            r = torch.arange(s, min(s + 2048, N), device=dev)
            c = sc.chi2(lib.matrix[s:s + 2048] @ Ef, r, see8, se8).reshape(-1, 8, G)
            t_min[s:s + len(r)], t_arg[s:s + len(r)] = c.min(dim=2)
        ri, oi = torch.as_tensor(rows, device=dev), torch.as_tensor(ops, device=dev)
        return t_min[ri, oi].cpu().numpy(), t_arg[ri, oi].cpu().numpy()
    img = e.reshape(G, n, n)
    best = torch.empty(len(cands.rows), dtype=torch.float64, device=dev)
    arg = torch.empty(len(cands.rows), dtype=torch.long, device=dev)
    for k, a, b in cands.blocks:
        Ek = _inverse_op(img, SYMMETRY_OPS[k]).reshape(G, n * n)
        best[a:b], arg[a:b] = sc.chi2(cands.matrix[a:b] @ Ek.T, cands.rows_sorted[a:b], see[None], se[None]).min(dim=1)
    p = cands.position
    return best.cpu().numpy()[p], arg.cpu().numpy()[p]


def _apply_offsets_batch(base: np.ndarray, off: np.ndarray, disk_radius_px: float) -> np.ndarray:
    """Geometries (M, S, 4) = bases (M, 4) moved by offsets (M, S, 4) given in the library frame."""
    s = (base[:, 2] / disk_radius_px)[:, None]
    th = np.deg2rad(base[:, 3])[:, None]
    dy, dx = off[..., 0], off[..., 1]
    out = np.empty(off.shape)
    out[..., 0] = base[:, None, 0] + s * (np.sin(th) * dx + np.cos(th) * dy)
    out[..., 1] = base[:, None, 1] + s * (np.cos(th) * dx - np.sin(th) * dy)
    out[..., 2] = base[:, None, 2] * np.exp(off[..., 2])
    out[..., 3] = base[:, None, 3] + off[..., 3]
    return out


def _jacobian(img: torch.Tensor, axes) -> torch.Tensor:
    """(m, len(axes), P) derivatives of resampled patterns (m, n, n) with respect to the geometry
    offsets (dy px, dx px, d log scale, d rotation deg) in the library frame (central differences)."""
    m, n = img.shape[0], img.shape[-1]
    gy = torch.zeros_like(img)
    gx = torch.zeros_like(img)
    gy[:, 1:-1] = 0.5 * (img[:, 2:] - img[:, :-2])
    gx[:, :, 1:-1] = 0.5 * (img[:, :, 2:] - img[:, :, :-2])
    v = torch.arange(n, dtype=img.dtype, device=img.device) - (n - 1) / 2  # library px about the centre
    vy, vx = v[:, None], v[None, :]
    out = []
    for a in axes:
        if a == 0:
            out.append(gy)
        elif a == 1:
            out.append(gx)
        else:
            out.append(vx * gx + vy * gy if a == 2 else (vx * gy - vy * gx) * (math.pi / 180))
    if not out:
        return img.new_zeros(m, 0, n * n)
    return torch.stack(out, 1).reshape(m, len(out), -1)


def _linearised_chi2(sc: _Scorer, geoms: np.ndarray, S: torch.Tensor, rows: np.ndarray, axes) -> np.ndarray:
    """chi2 (K,) that one unconstrained Gauss-Newton step from each candidate's geometry (K, 4) would
    reach, for candidates with signed patterns S (K, P) and library rows (K,): ``min ||e + J d - f l - b||^2`` over
    the geometry step d and the linear parameters, from a handful of dot products per candidate (one
    resampling per distinct geometry). Exact to second order near the optimum; used to skip
    candidates that cannot overtake the leader."""
    lib = sc.lib
    n, dev = lib.n_px, lib.device
    a, K = len(axes), len(rows)
    geo_u, inv = np.unique(np.asarray(geoms).reshape(-1, 4), axis=0, return_inverse=True)
    inv = torch.as_tensor(inv.ravel(), device=dev)
    imgs = sc.resample(geo_u, masked=False)  # (Gu, P)
    Gu = len(geo_u)
    mask = sc.mask
    J = _jacobian(imgs.reshape(Gu, n, n), axes) * mask  # (Gu, a, P)
    cols = [J, (imgs * mask)[:, None]] + ([mask.expand(Gu, 1, -1)] if sc.bg else [])
    U = torch.cat(cols, 1)  # (Gu, m, P): geometry columns, the pattern, the background
    m = U.shape[1]
    Ud = U.double()
    G = (Ud @ Ud.transpose(1, 2))[inv]  # (K, m, m)
    # D[j, i] = <op_j(L_j), U_{g_j, i}>: one product per distinct geometry
    D = torch.empty(K, m, dtype=torch.float64, device=dev)
    inv_np = inv.cpu().numpy()
    for u in range(Gu):
        st = torch.as_tensor(np.nonzero(inv_np == u)[0], device=dev)
        D[st] = (S[st] @ U[u].T).double()
    r = torch.as_tensor(rows, device=dev)
    # unknowns x = (d, f, b); residual e + J d - f l - b 1 = e - A x with A = [-J, l, 1]
    Nm = torch.zeros(K, m, m, dtype=torch.float64, device=dev)
    rhs = torch.zeros(K, m, dtype=torch.float64, device=dev)
    Nm[:, :a, :a] = G[:, :a, :a]
    Nm[:, :a, a] = Nm[:, a, :a] = -D[:, :a]
    Nm[:, a, a] = lib.ring_l2[r, sc.R].double()
    rhs[:, :a] = -G[:, :a, a]
    rhs[:, a] = D[:, a]
    if sc.bg:
        Nm[:, :a, a + 1] = Nm[:, a + 1, :a] = -G[:, :a, a + 1]
        Nm[:, a, a + 1] = Nm[:, a + 1, a] = lib.ring_l1[r, sc.R].double()
        Nm[:, a + 1, a + 1] = float(sc.n_fit)
        rhs[:, a + 1] = G[:, a, a + 1]
    # Jacobi-scaled solve: the entries span ~10 orders of magnitude (<l,l> ~ 1e-4, n_fit ~ 1e4)
    sd = torch.diagonal(Nm, dim1=1, dim2=2).clamp_min(1e-300).sqrt()
    Ns = Nm / (sd[:, :, None] * sd[:, None, :]) + 1e-12 * torch.eye(m, dtype=Nm.dtype, device=dev)
    x = torch.linalg.solve(Ns, rhs / sd) / sd
    return (G[:, a, a] - (rhs * x).sum(-1)).clamp_min(0).cpu().numpy()


def _refine(sc: _Scorer, S: torch.Tensor, rows, best_chi, best_geom, top, trust0, tol, max_iter):
    """Per-candidate Gauss-Newton refinement of the geometry (variable projection).

    At the current geometry the resampled pattern ``e`` and its derivatives with respect to
    shift (the image gradient), log scale (``v . grad e``) and rotation (``v x grad e``) give a
    linear model ``e + J d``; ``d``, ``f`` (and ``b``) then follow from one small least-squares
    problem per candidate. A step is accepted when the exact chi2 decreases; otherwise the
    trust region shrinks. Only candidates in ``top`` (signed patterns S, library rows ``rows``)
    are refined; updates ``best_chi`` and ``best_geom`` in place.
    """
    lib = sc.lib
    n = lib.n_px
    axes = [a for a in range(4) if trust0[a] > 0]
    M = len(top)
    dev = lib.device
    r = torch.as_tensor(rows, device=dev)
    mask = sc.mask
    Ls = S * mask
    trust = np.tile(np.asarray(trust0, float), (M, 1))
    active = np.ones(M, bool)
    n_eval = 0
    sll = lib.ring_l2[r, sc.R].double()
    sl = lib.ring_l1[r, sc.R].double()
    nf = float(sc.n_fit)

    def fit_lin(e, idx):  # optimal f, b for patterns e (m, P) against Ls[idx]; chi2 from residuals
        Lm = Ls[idx]
        d = (e * Lm).sum(-1).double()
        if sc.bg:
            se = e.sum(-1).double()
            det = (sll[idx] * nf - sl[idx] ** 2).clamp_min(1e-300)
            f = (d * nf - sl[idx] * se) / det
            b = (sll[idx] * se - sl[idx] * d) / det
        else:
            f, b = d / sll[idx].clamp_min(1e-300), torch.zeros_like(d)
        res = e - f.float()[:, None] * Lm - b.float()[:, None] * mask
        return (res * res).sum(-1).double().cpu().numpy()

    # exact chi2 (from the residuals) of the refined candidates at their current geometries: the
    # coarse values come from <E,E> - <E,S>^2/<S,S> in float32, which cancels
    all_idx = torch.arange(M, device=dev)
    # (M, P) unmasked, at each candidate's geometry; most share the leader's, so resample each geometry once
    geo_u, inv = np.unique(best_geom[top], axis=0, return_inverse=True)
    imgs = sc.resample(geo_u, masked=False)[torch.as_tensor(inv.ravel(), device=dev)]
    best_chi[top] = fit_lin(imgs * mask, all_idx)
    n_eval += M
    for _ in range(max_iter if axes else 0):
        idx = np.nonzero(active)[0]
        if len(idx) == 0:
            break
        it = torch.as_tensor(idx, device=dev)
        m = len(idx)
        base = best_geom[top[idx]]
        img = imgs[it].reshape(m, n, n)
        J = _jacobian(img, axes) * mask
        e = img.reshape(m, -1) * mask
        cols = [J, -Ls[it][:, None]] + ([-mask.expand(m, 1, -1)] if sc.bg else [])
        A = torch.cat(cols, 1).double()  # (m, k, P)
        AtA = A @ A.transpose(1, 2)
        Aty = -(A @ e.double()[:, :, None])[..., 0]
        k = AtA.shape[-1]
        AtA = AtA + 1e-9 * torch.diagonal(AtA, dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(k, dtype=AtA.dtype, device=dev)
        x = torch.linalg.solve(AtA, Aty).cpu().numpy()
        step = np.zeros((m, 1, 4))
        step[:, 0, axes] = np.clip(np.nan_to_num(x[:, :len(axes)]), -trust[idx][:, axes], trust[idx][:, axes])
        g_new = _apply_offsets_batch(base, step, lib.disk_radius_px)[:, 0]
        trial = sc.resample(g_new, masked=False)
        c_new = fit_lin(trial * mask, it)
        n_eval += m
        c0 = best_chi[top[idx]]
        ok = c_new < c0
        best_chi[top[idx[ok]]] = c_new[ok]
        best_geom[top[idx[ok]]] = g_new[ok]
        if ok.any():
            imgs[it[torch.as_tensor(ok, device=dev)]] = trial[torch.as_tensor(ok, device=dev)]
        # a rejected step shrinks the trust region to half of that step (halving the region alone
        # repeats the same step while the step is inside it); a rejected step below tolerance means
        # the current geometry is the optimum within tolerance
        frac = (np.abs(step[:, 0, axes]) / trust[idx][:, axes]).max(1, initial=0.0)
        trust[idx[~ok]] *= 0.5 * np.clip(frac[~ok], 1e-3, 1.0)[:, None]
        small = (np.abs(step[:, 0, axes]) < tol[axes]).all(1)
        active[idx] = ~(small | (trust[idx][:, axes] < tol[axes]).all(1))
    return n_eval


def _fit_one(lib: LsfLibrary, raw: torch.Tensor, start: np.ndarray, cand: np.ndarray, gs: GeometrySearch,
             fit_radius_px: float, fit_background: bool):
    """LSF of one pattern over candidates ``cand`` (K, 2) = (signed tilt, thickness index)."""
    H, W = raw.shape
    s = start[2] / lib.disk_radius_px
    shift_reach, scale_reach = gs.reach()
    cover = min(start[0], start[1], H - 1 - start[0], W - 1 - start[1]) / (s * (1 + scale_reach))
    R = int(math.floor(min(fit_radius_px, cover - shift_reach - 1.0 - 3 * lib.smooth_px, lib.n_rings)))
    if R < 0.5 * lib.disk_radius_px:
        raise BadInputError(f"the detector covers only {max(R, 0)} library px about the pattern centre "
                            f"(disk radius {lib.disk_radius_px:.1f} px): pattern cut off or geometry wrong")
    sc = _Scorer(lib, raw, start, R, fit_background)
    rows = lib.cand_tilt[cand[:, 0]] * lib.n_thickness + cand[:, 1]
    ops = lib.cand_op[cand[:, 0]]
    K = len(cand)
    geoms = _apply_offsets(start, gs.offsets(), lib.disk_radius_px)
    # most of the library (K > a quarter of rows x ops): score it all densely, then pick
    cands = _Candidates(lib, rows, ops, gather=K <= 0.25 * lib.matrix.shape[0] * 8)
    best_chi, arg = _score_candidates(sc, sc.resample(geoms), cands)
    best_geom = geoms[arg]
    n_eval = K * len(geoms)
    steps = gs.steps
    # candidate index of (thickness, tilt_y, tilt_x) grid positions, for parameter neighbours
    nc = len(lib.tilt_axis_mrad)
    where = -np.ones((lib.n_thickness, nc, nc), dtype=int)
    where[cand[:, 1], lib.cand_gy[cand[:, 0]], lib.cand_gx[cand[:, 0]]] = np.arange(K)
    # The geometry belongs to the pattern, not to the candidate: the leader (lowest chi2) is refined
    # fully (up to ``max_iter`` Gauss-Newton steps), every candidate is then rescored at its refined
    # geometry (polish), and the other leaders and the leader's grid neighbours (+-1 step in
    # thickness and both tilts), which now start close to their own optimum, get ``max_iter_others``
    # steps. Whenever another candidate takes the lead it is refined fully and the round repeats,
    # so the reported best is always a fully refined candidate whose neighbours were all refined.
    axes = [a for a in range(4) if steps[a] > 0]
    refined = np.zeros(K, bool)  # fully refined
    touched = np.zeros(K, bool)  # refined (fully or with max_iter_others steps)
    for _round in range(16):
        lead = int(np.argmin(best_chi))
        if not refined[lead]:
            n_eval += _refine(sc, cands.patterns([lead]), rows[[lead]], best_chi, best_geom, np.array([lead]),
                              steps, steps * gs.tol, gs.max_iter)
            refined[lead] = touched[lead] = True
        if gs.max_iter == 0:
            break
        c1, _ = _score_candidates(sc, sc.resample(best_geom[lead][None]), cands)
        n_eval += K
        better = (c1 < best_chi) & ~touched  # refined candidates keep their exact values
        best_chi[better] = c1[better]
        best_geom[better] = best_geom[lead]
        b = int(np.argmin(best_chi))
        if not refined[b]:
            continue  # an unrefined candidate leads after the polish: refine it fully first
        j, gy, gx = cand[b, 1], lib.cand_gy[cand[b, 0]], lib.cand_gx[cand[b, 0]]
        nb = where[max(j - 1, 0):j + 2, max(gy - 1, 0):gy + 2, max(gx - 1, 0):gx + 2].ravel()
        top = np.unique(np.concatenate([np.argsort(best_chi, kind="stable")[:gs.n_refine], nb[nb >= 0]]))
        top = top[~touched[top]]
        S = cands.patterns(top) if len(top) else None
        if len(top) and gs.screen_margin is not None and axes:
            # candidates whose linearised refinement cannot come within screen_margin of the
            # leader are not refined (their chi2 stands)
            lin = _linearised_chi2(sc, best_geom[top], S, rows[top], axes)
            n_eval += len(top)
            keep = lin <= best_chi[b] * (1 + gs.screen_margin)
            top, S = top[keep], S[torch.as_tensor(keep, device=S.device)]
        if len(top) == 0:
            break
        n_eval += _refine(sc, S, rows[top], best_chi, best_geom, top, steps, steps * gs.tol, gs.max_iter_others)
        touched[top] = True
    b = int(np.argmin(best_chi))
    # exact chi2, f, b of the best candidate in float64
    g = best_geom[b]
    n = lib.n_px
    e = sc.resample(g[None])[0].double().cpu().numpy().reshape(n, n)
    sim = cands.patterns([b])[0].reshape(n, n).double().cpu().numpy()
    w = sc.mask.cpu().numpy().reshape(n, n)
    chi2, f, bb = chi2_closed_form(e, sim, fit_background, weights=w)
    see_b = float((w * e * e).sum())
    return dict(best=b, chi2=float(chi2), f=float(f) * sc.norm, b=float(bb) * sc.norm, geometry=g, landscape=best_chi,
                R=R, n_fit=sc.n_fit, n_eval=n_eval, chi2_relative=float(chi2) / max(see_b, 1e-300))


def _profile_stats(values: np.ndarray, prof: np.ndarray, thr: float, s2: float):
    """Interval of grid values with profile <= thr, curvature standard error and parabolic optimum."""
    ok = np.isfinite(prof)
    v, p = values[ok], prof[ok]
    i = int(np.argmin(p))
    inside = v[p <= thr]
    lo, hi = float(inside.min()), float(inside.max())
    err, refined = np.nan, float(v[i])
    if 0 < i < len(v) - 1 and np.isclose(v[i + 1] - v[i], v[i] - v[i - 1]):
        h = v[i + 1] - v[i]
        curv = p[i - 1] + p[i + 1] - 2 * p[i]
        if curv > 0:
            c = curv / (2 * h * h)
            err = float(math.sqrt(s2 / c)) if s2 > 0 else 0.0
            refined = float(v[i] + 0.5 * h * (p[i - 1] - p[i + 1]) / curv)
    return lo, hi, err, refined


def lsf_fit(library, patterns, *, geometry=None, predictor=None, pixel_size_mrad: float | None = None,
            search: dict | None = None, geometry_search: GeometrySearch | None = None,
            fit_radius_mrad: float | None = None, fit_background: bool = False, delta_chi2: float = 1.0,
            return_landscape: bool = True):
    """Least-squares fit of raw PACBED patterns against the library (thickness, signed tilt, geometry).

    Parameters
    ----------
    library : LsfLibrary or xarray.Dataset
        Prepared library (:meth:`LsfLibrary.from_dataset`; prepare once and reuse).
    patterns : array (H, W) or (B, H, W)
        Raw detector patterns (any size and pixel size).
    geometry : mapping, "library" or None
        Starting geometry, see :func:`starting_geometry`.
    predictor : PacbedPredictor, optional
        Used for the starting geometry when ``geometry`` is None.
    pixel_size_mrad : float, optional
        Detector pixel size: fixes the starting disk radius when no geometry is given.
    search : dict, optional
        Restrict the search: ``thickness_nm``, ``tilt_x_mrad``, ``tilt_y_mrad`` as inclusive
        ``(lo, hi)``, each bound a scalar or one value per pattern. Default: the whole library.
    geometry_search : GeometrySearch, optional
        Scale/rotation/shift refinement (default :class:`GeometrySearch` ()).
    fit_radius_mrad : float, optional
        Radius of the fit region (default: the library's inscribed circle).
    fit_background : bool
        Fit ``I_exp ~ f I_sim + b`` (uniform background) instead of ``f I_sim``.
    delta_chi2 : float
        Interval threshold in units of the residual variance (1: 68 % for one parameter).
    return_landscape : bool
        Include ``chi2_landscape`` (pattern, grid_thickness_nm, grid_tilt_y_mrad, grid_tilt_x_mrad),
        each candidate at its best geometry (NaN outside the search).

    Returns
    -------
    xarray.Dataset (dim ``pattern``): best ``thickness_nm``, ``tilt_x_mrad``, ``tilt_y_mrad`` (grid
    values), ``chi2`` (intensities normalised to unit mean in the fit region), ``chi2_relative``
    (chi2 / sum E^2), ``scale_factor`` f and ``background`` b (raw counts per unit library
    intensity / raw counts), the refined geometry (``center_y_px``, ``center_x_px``,
    ``disk_radius_px``, ``rotation_deg``), uncertainties (``*_err``, ``*_lo``, ``*_hi``),
    ``thickness_refined_nm`` (parabolic), ``n_candidates``, ``n_evaluations``,
    ``fit_radius_px`` and ``seconds``.
    """
    import xarray as xr

    lib = _as_library(library)
    x = _check_patterns(patterns)
    B = x.shape[0]
    gs = geometry_search or GeometrySearch()
    if min(gs.max_iter, gs.max_iter_others) < 0 or gs.n_refine < 1 or min(gs.shift_px, gs.scale, gs.rotation_deg) < 0:
        raise BadInputError("geometry_search needs non-negative steps, n_refine >= 1 and max_iter(_others) >= 0")
    if gs.screen_margin is not None and not gs.screen_margin >= 0:
        raise BadInputError("geometry_search.screen_margin must be None or >= 0 (a relative chi2 margin)")
    if not set(gs.coarse_axes) <= {0, 1, 2, 3}:
        raise BadInputError(f"geometry_search.coarse_axes must name axes 0-3 (dy, dx, scale, rotation), "
                            f"got {gs.coarse_axes!r}")
    if delta_chi2 <= 0:
        raise BadInputError("delta_chi2 must be positive")
    fit_r = lib.n_px / 2 if fit_radius_mrad is None else float(fit_radius_mrad) / lib.pixel_size_mrad
    if not fit_r > 0:
        raise BadInputError("fit_radius_mrad must be positive")
    start = starting_geometry(lib, x, geometry, predictor, pixel_size_mrad)
    ranges = {}
    for key in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
        if search and search.get(key) is not None:
            lo, hi = search[key]
            ranges[key] = (_per_pattern(lo, B, f"search[{key!r}] low"), _per_pattern(hi, B, f"search[{key!r}] high"))
    unknown = set(search or {}) - {"thickness_nm", "tilt_x_mrad", "tilt_y_mrad"}
    if unknown:
        raise BadInputError(f"unknown search keys {sorted(unknown)}")

    nt, nc = lib.n_thickness, len(lib.tilt_axis_mrad)
    out = {k: np.full(B, np.nan) for k in (
        "thickness_nm", "tilt_x_mrad", "tilt_y_mrad", "chi2", "chi2_relative", "scale_factor", "background",
        "center_y_px", "center_x_px", "disk_radius_px", "rotation_deg", "thickness_err_nm", "thickness_lo_nm",
        "thickness_hi_nm", "thickness_refined_nm", "tilt_x_err_mrad", "tilt_x_lo_mrad", "tilt_x_hi_mrad",
        "tilt_y_err_mrad", "tilt_y_lo_mrad", "tilt_y_hi_mrad", "n_candidates", "n_evaluations", "fit_radius_px",
        "seconds")}
    land = np.full((B, nt, nc, nc), np.nan, dtype=np.float32) if return_landscape else None
    n_par = 4 + 4 + (2 if fit_background else 1)
    for i in range(B):
        t0 = time.perf_counter()
        sel = {k: (v[0][i], v[1][i]) for k, v in ranges.items()}
        mask = lib.search_mask(**sel)
        cand = np.argwhere(mask)
        if len(cand) == 0:
            raise BadInputError(f"pattern {i}: the search range contains no library candidate ({sel})")
        r = _fit_one(lib, x[i], start[i], cand, gs, fit_r, fit_background)
        c_best, j_best = cand[r["best"]]
        chi_min = r["landscape"][r["best"]]
        s2 = r["chi2"] / max(r["n_fit"] - n_par, 1)
        thr = chi_min + delta_chi2 * s2
        cube = np.full((nt, nc, nc), np.inf)
        cube[cand[:, 1], lib.cand_gy[cand[:, 0]], lib.cand_gx[cand[:, 0]]] = r["landscape"]
        cube[~np.isfinite(cube)] = np.inf
        pt = cube.min(axis=(1, 2))
        ptx = cube.min(axis=(0, 1))
        pty = cube.min(axis=(0, 2))
        pt[np.isinf(pt)] = np.nan
        ptx[np.isinf(ptx)] = np.nan
        pty[np.isinf(pty)] = np.nan
        tl, th, te, tr = _profile_stats(lib.thickness_nm, pt, thr, s2)
        xl, xh, xe, _ = _profile_stats(lib.tilt_axis_mrad, ptx, thr, s2)
        yl, yh, ye, _ = _profile_stats(lib.tilt_axis_mrad, pty, thr, s2)
        g = r["geometry"]
        out_i = dict(
            thickness_nm=lib.thickness_nm[j_best], tilt_x_mrad=lib.cand_tilt_x[c_best], tilt_y_mrad=lib.cand_tilt_y[c_best],
            chi2=r["chi2"], chi2_relative=r["chi2_relative"], scale_factor=r["f"], background=r["b"],
            center_y_px=g[0], center_x_px=g[1], disk_radius_px=g[2], rotation_deg=g[3],
            thickness_err_nm=te, thickness_lo_nm=tl, thickness_hi_nm=th, thickness_refined_nm=tr,
            tilt_x_err_mrad=xe, tilt_x_lo_mrad=xl, tilt_x_hi_mrad=xh, tilt_y_err_mrad=ye, tilt_y_lo_mrad=yl,
            tilt_y_hi_mrad=yh, n_candidates=len(cand), n_evaluations=r["n_eval"], fit_radius_px=r["R"])
        for k, v in out_i.items():
            out[k][i] = v
        if land is not None:
            cube[np.isinf(cube)] = np.nan
            land[i] = cube
        out["seconds"][i] = time.perf_counter() - t0
    # one Dataset constructor call: adding variables one by one re-merges the Dataset each time
    # (13 % of the hybrid fit's time in a cProfile run)
    ints = ("n_candidates", "n_evaluations", "fit_radius_px")
    data = {k: ("pattern", v.astype(int) if k in ints else v, {"units": _units(k)}) for k, v in out.items()}
    data["chi2"][2]["long_name"] = "sum of squared residuals, experimental intensities normalised to unit mean"
    data["fit_radius_px"][2]["units"] = "library px"
    coords = {}
    if land is not None:
        data["chi2_landscape"] = (("pattern", "grid_thickness_nm", "grid_tilt_y_mrad", "grid_tilt_x_mrad"), land,
                                  {"units": "", "long_name": "chi2 of each candidate at its best trial geometry"})
        coords = dict(grid_thickness_nm=lib.thickness_nm, grid_tilt_y_mrad=lib.tilt_axis_mrad,
                      grid_tilt_x_mrad=lib.tilt_axis_mrad)
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(method="least-squares fit, f (and b) in closed form, coarse-to-fine geometry",
                    fit_background=int(fit_background), delta_chi2=delta_chi2,
                    geometry_search=str(dataclasses.asdict(gs)), library_key=str(lib.attrs.get("spec_key", "")),
                    library_pixel_size_mrad=lib.pixel_size_mrad, tilt_step_mrad=lib.tilt_step_mrad)
    return ds


def hybrid_fit(library, patterns, predictor=None, *, estimates: dict | None = None, thickness_window_nm: float = 3.0,
               tilt_window_mrad: float = 1.0, n_sigma: float | None = None, widen_on_edge: bool = True,
               max_widen: int = 2, pixel_size_mrad: float | None = None, geometry=None, **lsf_kw):
    """Hybrid CNN + LSF (seed Sec. 6.3): the CNN's alignment and thickness/tilt restrict the LSF.

    The LSF searches ``thickness +- thickness_window_nm`` and ``tilt +- tilt_window_mrad`` (each
    widened to ``n_sigma`` times the CNN's standard deviation when that is larger) around the CNN
    estimate, starting from the CNN's geometry. When the best fit lies on the edge of the window
    (and not on the library's edge), the window is doubled and the pattern refitted, up to
    ``max_widen`` times, so a CNN error larger than the window cannot silently pin the result.

    Parameters
    ----------
    library, patterns, lsf_kw
        As for :func:`lsf_fit`.
    predictor : PacbedPredictor
        Gives the estimates (``predict_batch``) unless ``estimates`` is passed.
    estimates : mapping, optional
        ``thickness_nm``, ``tilt_x_mrad``, ``tilt_y_mrad`` per pattern (optionally ``*_std_*`` and
        the geometry keys ``center_y_px``, ``center_x_px``, ``disk_radius_px``, ``rotation_deg``).

    Returns
    -------
    xarray.Dataset as :func:`lsf_fit` plus ``cnn_thickness_nm``, ``cnn_tilt_x_mrad``,
    ``cnn_tilt_y_mrad``, the final windows, ``widened`` (times) and ``at_edge``; attrs
    ``cnn_seconds`` and ``lsf_seconds``.
    """
    lib = _as_library(library)
    x = _check_patterns(patterns)
    B = x.shape[0]
    t0 = time.perf_counter()
    if estimates is None:
        if predictor is None:
            raise BadInputError("hybrid_fit needs a predictor or estimates")
        estimates = predictor.predict_batch(x, pixel_size_mrad=pixel_size_mrad)
    t_cnn = time.perf_counter() - t0
    est = {k: _per_pattern(estimates[k], B, k) for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad")}
    if geometry is None and all(k in estimates for k in ("center_y_px", "center_x_px", "disk_radius_px", "rotation_deg")):
        geometry = {k: estimates[k] for k in ("center_y_px", "center_x_px", "disk_radius_px", "rotation_deg")}
    wt = np.full(B, float(thickness_window_nm))
    wx = np.full(B, float(tilt_window_mrad))
    wy = np.full(B, float(tilt_window_mrad))
    if n_sigma:
        wt = np.maximum(wt, n_sigma * np.asarray(estimates.get("thickness_std_nm", np.zeros(B)), float))
        wx = np.maximum(wx, n_sigma * np.asarray(estimates.get("tilt_x_std_mrad", np.zeros(B)), float))
        wy = np.maximum(wy, n_sigma * np.asarray(estimates.get("tilt_y_std_mrad", np.zeros(B)), float))
    # at least one grid step each side, and a window that meets the library
    wt = np.maximum(wt, _grid_step(lib.thickness_nm) * 1.001)
    wx = np.maximum(wx, lib.tilt_step_mrad * 1.001)
    wy = np.maximum(wy, lib.tilt_step_mrad * 1.001)
    ct = np.clip(est["thickness_nm"], lib.thickness_nm.min(), lib.thickness_nm.max())
    amax = lib.tilt_axis_mrad.max()
    cx = np.clip(est["tilt_x_mrad"], -amax, amax)
    cy = np.clip(est["tilt_y_mrad"], -amax, amax)
    start = starting_geometry(lib, x, geometry, predictor if geometry is None else None, pixel_size_mrad)
    geo = {k: start[:, i] for i, k in enumerate(("center_y_px", "center_x_px", "disk_radius_px", "rotation_deg"))}
    widened = np.zeros(B, int)
    todo = np.arange(B)
    result = None
    t1 = time.perf_counter()
    for it in range(max_widen + 1 if widen_on_edge else 1):
        srch = {"thickness_nm": (ct[todo] - wt[todo], ct[todo] + wt[todo]),
                "tilt_x_mrad": (cx[todo] - wx[todo], cx[todo] + wx[todo]),
                "tilt_y_mrad": (cy[todo] - wy[todo], cy[todo] + wy[todo])}
        r = lsf_fit(lib, x[todo], geometry={k: v[todo] for k, v in geo.items()}, search=srch, **lsf_kw)
        if result is None:
            result = r
        else:
            result = _replace_patterns(result, r, todo)
        edge = _at_edge(lib, r, srch)
        if not widen_on_edge or it == max_widen or not edge.any():
            break
        # widen only the axes whose edge the best fit sits on
        sel = edge.any(1)
        todo, edge = todo[sel], edge[sel]
        wt[todo] = np.where(edge[:, 0], 2 * wt[todo], wt[todo])
        wx[todo] = np.where(edge[:, 1], 2 * wx[todo], wx[todo])
        wy[todo] = np.where(edge[:, 2], 2 * wy[todo], wy[todo])
        widened[todo] += 1
    t_lsf = time.perf_counter() - t1
    final_srch = {"thickness_nm": (ct - wt, ct + wt), "tilt_x_mrad": (cx - wx, cx + wx), "tilt_y_mrad": (cy - wy, cy + wy)}
    result = result.assign({
        "cnn_thickness_nm": ("pattern", est["thickness_nm"], {"units": "nm"}),
        "cnn_tilt_x_mrad": ("pattern", est["tilt_x_mrad"], {"units": "mrad"}),
        "cnn_tilt_y_mrad": ("pattern", est["tilt_y_mrad"], {"units": "mrad"}),
        "thickness_window_nm": ("pattern", wt, {"units": "nm"}),
        "tilt_x_window_mrad": ("pattern", wx, {"units": "mrad"}),
        "tilt_y_window_mrad": ("pattern", wy, {"units": "mrad"}),
        "widened": ("pattern", widened),
        "at_edge": ("pattern", _at_edge(lib, result, final_srch).any(1))})
    result.attrs.update(method="hybrid CNN + LSF", cnn_seconds=t_cnn, lsf_seconds=t_lsf)
    return result


def _replace_patterns(ds, new, idx):
    ds = ds.copy(deep=True)
    for k in new.data_vars:
        ds[k].values[idx] = new[k].values
    return ds


def _at_edge(lib: LsfLibrary, r, srch) -> np.ndarray:
    """(B, 3) flags: the best fit lies on the edge of the search window in thickness, tilt_x,
    tilt_y, where that edge is not the library's edge."""
    eps = 1e-6
    st = _grid_step(lib.thickness_nm)
    sa = lib.tilt_step_mrad
    amax = lib.tilt_axis_mrad.max()
    out = []
    for key, step, lo_lib, hi_lib in (("thickness_nm", st, lib.thickness_nm.min(), lib.thickness_nm.max()),
                                      ("tilt_x_mrad", sa, -amax, amax), ("tilt_y_mrad", sa, -amax, amax)):
        v = r[key].values
        lo, hi = srch[key]
        out.append(((v - step < lo - eps) & (v > lo_lib + eps)) | ((v + step > hi + eps) & (v < hi_lib - eps)))
    return np.stack(out, 1)


__all__ = ["GeometrySearch", "LsfLibrary", "SYMMETRY_OPS", "apply_symmetry", "chi2_closed_form", "hybrid_fit",
           "lsf_fit", "signed_library_pattern", "smooth", "starting_geometry"]
