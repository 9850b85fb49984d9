"""Phase maps from lattice distances.

Each scan position's own lattice (found from its detected disks, with no global guess, so
differently oriented or different crystals are fine) is converted to reciprocal-space
lengths (1/Å) with the calibration, Gauss-reduced, and compared with candidate phases:
the two reduced reciprocal-vector lengths ``|g1| <= |g2|`` and the angle between them. A
position is assigned the candidate with the smallest normalised mismatch when every
length is within ``tolerance`` (relative) and the angle within ``angle_tolerance_deg``;
otherwise it is ``-1`` (unknown).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BadInputError
from .lattice import STATUS, fit_lattice, reduce_basis


@dataclasses.dataclass(frozen=True)
class Phase:
    """A candidate phase: its 2D reciprocal lattice seen down a zone axis.

    Parameters
    ----------
    name : str
    g1, g2 : float
        Lengths of the reduced reciprocal basis (1/Å), ``g1 <= g2``.
    angle_deg : float
        Angle between them (degrees, 60-90 for a reduced basis).
    """

    name: str
    g1: float
    g2: float
    angle_deg: float

    @property
    def d_spacings_angstrom(self):
        return 1.0 / self.g1, 1.0 / self.g2

    @classmethod
    def from_crystal(cls, crystal, name: str | None = None, max_index: int = 8) -> "Phase":
        """Reciprocal lattice of the ZOLZ reflections that are not extinct (kinematic structure factor)."""
        h, k = np.meshgrid(np.arange(-max_index, max_index + 1), np.arange(-max_index, max_index + 1), indexing="ij")
        h, k = h.ravel(), k.ravel()
        F = np.zeros(len(h), complex)
        for s in crystal.sites:
            F += np.exp(-2j * np.pi * (h * s.xyz[0] + k * s.xyz[1]))
        ok = (np.abs(F) > 1e-6 * len(crystal.sites)) & ((h != 0) | (k != 0))
        g = np.stack([h[ok] / crystal.a, k[ok] / crystal.b], 1)
        g = g[np.argsort(np.linalg.norm(g, axis=1), kind="stable")]
        g1 = g[0]
        for v in g[1:]:
            if abs(g1[0] * v[1] - g1[1] * v[0]) > 1e-9:
                B = reduce_basis(np.stack([g1, v], 1))
                break
        return cls.from_basis(B, name or f"{crystal.name} [{crystal.zone}]")

    @classmethod
    def from_basis(cls, G, name: str) -> "Phase":
        """From a reciprocal basis (columns, 1/Å)."""
        l1, l2, ang = lattice_metrics(np.asarray(G, float))
        return cls(name, float(l1), float(l2), float(ang))


def lattice_metrics(G):
    """Reduced lengths ``|g1| <= |g2|`` and the angle (deg, in [60, 90]) of bases (..., 2, 2) (columns)."""
    G = np.asarray(G, float)
    lead = G.shape[:-2]
    flat = G.reshape(-1, 2, 2)
    out = np.full((len(flat), 3), np.nan)
    for i, B in enumerate(flat):
        if not np.all(np.isfinite(B)) or abs(np.linalg.det(B)) < 1e-12:
            continue
        R = reduce_basis(B)
        a, b = R[:, 0], R[:, 1]
        la, lb = np.linalg.norm(a), np.linalg.norm(b)
        if la > lb:
            la, lb = lb, la
        ang = np.degrees(np.arccos(np.clip(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)), 0, 1)))
        out[i] = la, lb, ang
    out = out.reshape(lead + (3,))
    return out[..., 0], out[..., 1], out[..., 2]


def classify_lattices(G_inv_angstrom, phases, tolerance: float = 0.02, angle_tolerance_deg: float = 2.0):
    """Phase index per lattice (-1 = no candidate within tolerance) and the normalised mismatch.

    ``G_inv_angstrom`` (..., 2, 2): reciprocal bases in 1/Å (columns), NaN where unknown.
    """
    if not phases:
        raise BadInputError("phase classification needs at least one candidate Phase")
    l1, l2, ang = lattice_metrics(G_inv_angstrom)
    best = np.full(l1.shape, -1, np.int16)
    score = np.full(l1.shape, np.inf)
    for i, p in enumerate(phases):
        m = np.maximum.reduce([np.abs(l1 / p.g1 - 1) / tolerance, np.abs(l2 / p.g2 - 1) / tolerance,
                               np.abs(ang - p.angle_deg) / angle_tolerance_deg])
        m = np.where(np.isfinite(m), m, np.inf)
        take = (m <= 1) & (m < score)
        best[take] = i
        score = np.where(take, m, score)
    return best, np.where(np.isfinite(score), score, np.nan)


def per_pattern_lattices(det, min_disks: int = 4):
    """Lattice of each pattern from its own disks (no global guess): G (B, 2, 2) px and status."""
    from .mapping import _basis_from_points

    B = len(det)
    G = np.full((B, 2, 2), np.nan)
    st = np.full(B, 1, np.int8)
    for b in range(B):
        if det.status[b] != 0:
            st[b] = det.status[b]
            continue
        d = det.pattern(b)
        use = ~d["edge"]
        if use.sum() < min_disks:
            use = np.ones(len(d["positions"]), bool)
        p, w = d["positions"][use], d["intensity"][use]
        try:
            G0 = _basis_from_points(p, w)
        except BadInputError:
            continue
        f = fit_lattice(p, w, G_guess=G0, origin_guess=p[np.argmax(w)], min_disks=min(min_disks, len(p)))
        st[b] = f.status
        if f.status == 0:
            G[b] = f.G
    return G, st


def phase_map(data, phases, calibration=None, *, tolerance: float = 0.02, angle_tolerance_deg: float = 2.0,
              models=None, batch: int = 256, progress: bool = False):
    """Classify every scan position by its lattice distances.

    Parameters
    ----------
    data : FourDSTEM or array (scan_y, scan_x, det_y, det_x)
    phases : list of Phase
        Candidates, e.g. ``[Phase.from_crystal(get_crystal("Si", "001")), Phase("X", 0.3, 0.3, 90)]``.
    calibration : Calibration
        Needs ``pixel_size_mrad`` and ``beam_energy_kv`` (to convert px to 1/Å).
    tolerance : float
        Relative tolerance on each reciprocal length (0.02 = 2 %, covers strain of a few 0.1 %).
    angle_tolerance_deg : float
        Tolerance on the angle between the basis vectors (degrees).

    Returns
    -------
    xarray.Dataset: ``phase`` (index into ``attrs['phases']``, -1 unknown), ``mismatch``
    (normalised, <= 1 when matched), ``g1_inv_angstrom, g2_inv_angstrom, angle_deg``,
    ``d1_angstrom, d2_angstrom``, ``status`` (lattice-fit status).
    """
    import xarray as xr

    from ..sim.scattering import wavelength_angstrom
    from .detect import detect_disks, load_disk_models
    from .mapping import _unwrap

    arr, cal = _unwrap(data, calibration)
    if cal is None:
        from ..errors import MissingCalibrationError

        raise MissingCalibrationError("phase maps need calibration values that are not set: pixel_size_mrad (mrad/px), "
                                      "beam_energy_kv (kV). Pass calibration=Calibration(...).")
    cal.require("pixel_size_mrad", "beam_energy_kv", purpose="phase mapping (lattice distances in 1/Å)")
    models = models or load_disk_models()
    sy, sx = arr.shape[:2]
    flat = arr.reshape(sy * sx, *arr.shape[2:])
    G = np.full((sy * sx, 2, 2), np.nan)
    st = np.full(sy * sx, 5, np.int8)
    for s in range(0, sy * sx, batch):
        blk = np.asarray(flat[s:s + batch].compute() if hasattr(flat, "compute") else flat[s:s + batch], np.float32)
        det = detect_disks(blk, cal, models=models)
        G[s:s + len(blk)], st[s:s + len(blk)] = per_pattern_lattices(det)
    f = cal.pixel_size_mrad * 1e-3 / wavelength_angstrom(cal.beam_energy_kv)
    Ginv = G * f
    idx, mis = classify_lattices(Ginv, phases, tolerance, angle_tolerance_deg)
    l1, l2, ang = lattice_metrics(Ginv)
    dims = ("scan_y", "scan_x")
    rs = lambda a: np.asarray(a).reshape(sy, sx)  # noqa: E731
    ds = xr.Dataset({
        "phase": (dims, rs(idx), {"long_name": "phase index (-1 = unknown)"}),
        "mismatch": (dims, rs(mis), {"units": "1", "long_name": "normalised mismatch (<= 1 matched)"}),
        "g1_inv_angstrom": (dims, rs(l1), {"units": "1/Å"}),
        "g2_inv_angstrom": (dims, rs(l2), {"units": "1/Å"}),
        "angle_deg": (dims, rs(ang), {"units": "degree"}),
        "d1_angstrom": (dims, 1 / rs(l1), {"units": "Å"}),
        "d2_angstrom": (dims, 1 / rs(l2), {"units": "Å"}),
        "status": (dims, rs(st), {"long_name": "lattice fit status"}),
    })
    ds.attrs.update({"phases": [p.name for p in phases], "tolerance": tolerance,
                     "angle_tolerance_deg": angle_tolerance_deg,
                     "candidates": [dataclasses.asdict(p) for p in phases],
                     "status_codes": str({int(k): v for k, v in STATUS.items()})})
    return ds
