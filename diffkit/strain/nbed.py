"""Nanobeam electron diffraction (NBED) patterns with a known strain field.

Physics
-------
With a small probe convergence semi-angle ``alpha`` the diffraction disks do not overlap,
so each detector point inside disk ``g`` receives the intensity of beam ``g`` for the one
partial wave ``p`` of the aperture that lands there: ``I(p + g) = |phi_g(q = p + tau)|^2``
(``tau`` = specimen tilt). The dynamical beam intensities ``|phi_g(q, t)|^2`` come from the
Bloch-wave solver (:class:`diffkit.sim.bloch.BlochSolver`, absorption from the
Einstein-model TDS cross-section) and vary across every disk with the incident direction,
the thickness ``t`` and the tilt.

Speed: the intensities are computed **once** per crystal on a fine grid of incident
directions and thicknesses (a :class:`DiskIntensityTable`, cached on disk) for the
unstrained crystal; each pattern is then rendered by placing every disk at its exact
strained position and interpolating the table across the disk. A strain of 1 % changes the
disk intensities by much less than the shot noise (``tests/test_strain_sim.py`` measures
it); it moves the disks, which is what strain mapping measures, and that is exact here.

Geometry
--------
A scan position is described by its 2x2 deformation gradient ``F`` (real space, crystal
frame): real-space lattice vectors map as ``a' = F a`` and reciprocal vectors as
``g' = F^-T g``. From strain components ``(exx, eyy, exy)`` and a rotation ``theta`` we use
``F = I + [[exx, exy - w], [exy + w, eyy]]`` with ``w = tan(theta) (1 + (exx + eyy) / 2)``,
so that the strain ``(F + F^T)/2 - I`` and the polar-decomposition rotation of ``F`` are
*exactly* the requested values (the definitions used by :mod:`diffkit.strain.lattice`).

Crystal-frame angles (mrad, ``x`` along the cell's ``a``, ``y`` along ``b``) map to detector
pixels by ``pos = centre + D k`` with ``D = affine @ R(rotation) / pixel_size``. Pixel
coordinates are ``(x, y) = (column, row)`` with the centre of pixel (0, 0) at (0, 0).
Disk centres are computed in float64 and are exact; the image of a disk is the aperture
circle (radius ``alpha``) mapped by ``D``, integrated over each pixel's area (8 x 8 sub-samples on the rim).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as Fnn

from ..errors import BadInputError
from ..sim.bloch import BlochSolver
from ..sim.crystals import ZoneCrystal, get_crystal
from ..sim.detector import DetectorParams, apply_detector
from ..sim.tds import absorption_ratio

TABLE_FORMAT = "diffkit-nbed-table-v1"


def default_cache_dir() -> pathlib.Path:
    """Cache folder: ``$DIFFKIT_CACHE/nbed`` or ``~/.cache/diffkit/nbed``."""
    from ..sim.pacbed import default_cache_dir as _d

    return _d() / "nbed"


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------
# Disk-intensity table
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NBEDTableSpec:
    """Everything that defines a disk-intensity table (its cache key hashes this).

    Parameters
    ----------
    crystal : ZoneCrystal
        Structure down the zone axis.
    energy_kv : float
        Beam energy (kV).
    q_max_mrad : float
        The table covers incident directions ``|qx|, |qy| <= q_max_mrad`` (crystal frame);
        it must exceed convergence semi-angle + tilt.
    q_step_mrad : float
        Grid step of incident directions (mrad).
    thickness_nm : tuple of float
        Thicknesses, equally spaced (nm).
    g_max : float
        Beams included in the Bloch-wave solution, ``|g| <= g_max`` (1/Å).
    g_out_mrad : float
        Beams tabulated (and rendered): deflection ``|g| <= g_out_mrad`` (mrad).
    strain_order : int
        0: intensities of the unstrained crystal only. 1 or 2: also first (and diagonal
        second) derivatives of the intensities with respect to the in-plane strain
        ``(exx, eyy, exy)`` by finite differences of step ``strain_step``, so patterns of a
        strained crystal get the strained crystal's intensities (a second-order Taylor
        expansion; plane strain, the cell edge along the beam is unchanged).
    strain_step : float
        Finite-difference step (dimensionless).
    """

    crystal: ZoneCrystal = dataclasses.field(default_factory=lambda: get_crystal("Si", "001"))
    energy_kv: float = 200.0
    q_max_mrad: float = 4.0
    q_step_mrad: float = 0.2
    thickness_nm: tuple = tuple(float(t) for t in np.arange(10.0, 250.01, 2.5))
    g_max: float = 1.5
    g_out_mrad: float = 40.0
    strain_order: int = 2
    strain_step: float = 0.005

    def __post_init__(self):
        t = np.asarray(self.thickness_nm, float)
        if t.ndim != 1 or len(t) < 2 or not np.allclose(np.diff(t), t[1] - t[0]):
            raise ValueError("thickness_nm must be an equally spaced sequence of at least two values")
        object.__setattr__(self, "thickness_nm", tuple(float(v) for v in t))

    def key(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "crystal": self.crystal.key(), "format": TABLE_FORMAT},
                          sort_keys=True, default=float).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def q_axis(self) -> np.ndarray:
        n = int(math.ceil(self.q_max_mrad / self.q_step_mrad - 1e-9))
        return np.arange(-n, n + 1) * self.q_step_mrad


@dataclasses.dataclass
class DiskIntensityTable:
    """Dynamical beam intensities ``|phi_g(q, t)|^2`` on a grid of incident directions.

    Attributes
    ----------
    spec : NBEDTableSpec
    intensity : np.ndarray, float32, (n_beams, n_thickness, n_q, n_q)
        Axis 2 is ``q_y``, axis 3 is ``q_x`` (mrad, :attr:`q_axis`).
    hk : np.ndarray, int (n_beams, 2)
        Beam indices (h along ``a``/x, k along ``b``/y).
    g_mrad : np.ndarray, float64 (n_beams, 2)
        Beam deflections (x, y) in mrad of the unstrained crystal.
    absorption : float
        Absorptive/elastic potential ratio used.
    seconds : float
        Time the table took to compute.
    """

    spec: NBEDTableSpec
    intensity: np.ndarray
    hk: np.ndarray
    g_mrad: np.ndarray
    absorption: float
    seconds: float = 0.0
    d1: np.ndarray | None = None  # (3, n_beams, n_t, n_q, n_q): dI/d(exx, eyy, exy)
    d2: np.ndarray | None = None  # (6, ...): d2I/d(exx^2, eyy^2, exy^2, exx eyy, exx exy, eyy exy)

    @property
    def q_axis(self) -> np.ndarray:
        return self.spec.q_axis

    @property
    def thickness_nm(self) -> np.ndarray:
        return np.asarray(self.spec.thickness_nm)

    @property
    def wavelength_angstrom(self) -> float:
        from ..sim.scattering import wavelength_angstrom

        return wavelength_angstrom(self.spec.energy_kv)

    def torch_intensity(self, device=None) -> torch.Tensor:
        """All tables stacked (1 + 3 * n_derivative_orders, n_beams, n_t, n_q, n_q) as a tensor."""
        key = str(device)
        cache = self.__dict__.setdefault("_torch_cache", {})
        if key not in cache:
            parts = [self.intensity[None]]
            if self.d1 is not None:
                parts.append(self.d1)
            if self.d2 is not None:
                parts.append(self.d2)
            cache[key] = torch.as_tensor(np.concatenate(parts, 0), device=device)
        return cache[key]


def strained_solver(solver: BlochSolver, F) -> BlochSolver:
    """Copy of ``solver`` for the crystal deformed by the 2x2 deformation gradient ``F`` (same beams).

    Reciprocal vectors become ``g' = F^-T g``; the structure potential is re-evaluated at the
    new ``|g'|`` with the fractional atom positions unchanged and the cell volume scaled by
    ``det F`` (plane strain: the cell edge along the beam is unchanged).
    """
    import copy

    from ..sim.scattering import electron_scattering_factor

    F = np.asarray(F, float)
    s = copy.copy(solver)
    FinvT = np.linalg.inv(F).T
    s.g = solver.g @ FinvT.T
    s.g_mrad = s.g * s.wavelength * 1e3
    cr = solver.crystal
    dh = solver.hk[:, None, 0] - solver.hk[None, :, 0]
    dk = solver.hk[:, None, 1] - solver.hk[None, :, 1]
    gd = np.stack([dh / cr.a, dk / cr.b], -1) @ FinvT.T
    gl = np.hypot(gd[..., 0], gd[..., 1])
    Fs = np.zeros(gl.shape, complex)
    for site in cr.sites:
        f = electron_scattering_factor(site.symbol, gl) * np.exp(-site.b_iso * gl**2 / 4.0)
        Fs += f * np.exp(-2j * np.pi * (dh * site.xyz[0] + dk * site.xyz[1]))
    s.U = solver.gamma / (np.pi * cr.volume * abs(np.linalg.det(F))) * Fs
    return s


def bloch_beam_intensities(solver: BlochSolver, q_mrad, thickness_nm, beams=None, batch: int = 64) -> np.ndarray:
    """``|phi_g(t)|^2`` (M, n_beams, n_t) like :meth:`BlochSolver.beam_intensities`, solved in torch.

    Same equations as the solver (first-order absorption on the eigenvalues), but the
    eigen-decomposition runs in ``torch.linalg.eigh`` on one thread, which on a busy
    machine is many times faster than multi-threaded LAPACK competing for the cores.
    """
    q = torch.as_tensor(np.asarray(q_mrad, float).reshape(-1, 2))
    z = torch.as_tensor(np.asarray(thickness_nm, float).ravel() * 10.0)
    beams = torch.as_tensor(np.arange(solver.n_beams) if beams is None else np.asarray(beams))
    U = torch.as_tensor(solver.U)
    g = torch.as_tensor(solver.g)
    idx = torch.arange(solver.n_beams)
    Uabs = solver.absorption * U
    out = np.empty((len(q), len(beams), len(z)), np.float32)
    with _torch_threads(1):
        for s in range(0, len(q), batch):
            kt = q[s:s + batch] * 1e-3 / solver.wavelength
            kg = kt[:, None, :] + g[None]
            M = U.expand(len(kt), -1, -1).clone()
            M[:, idx, idx] -= (kg**2).sum(-1).to(M.dtype)
            lam, V = torch.linalg.eigh(M)
            mu = torch.einsum("mgj,gh,mhj->mj", V.conj(), Uabs, V).real
            c = V[:, 0, :].conj()
            gam = lam + 1j * mu
            E = torch.exp(1j * math.pi * z[None, :, None] * gam[:, None, :] / solver.K) * c[:, None, :]
            a = torch.einsum("mgn,mtn->mgt", V[:, beams, :], E)
            out[s:s + batch] = (a.real**2 + a.imag**2).numpy()
    return out


def disk_intensity_table(spec: NBEDTableSpec | None = None, cache: bool | str | pathlib.Path = True,
                         progress: bool = False) -> DiskIntensityTable:
    """Compute (or load from the on-disk cache) the disk-intensity table of ``spec``.

    Parameters
    ----------
    spec : NBEDTableSpec
        Crystal, energy, direction grid, thicknesses.
    cache : bool or path
        ``True``: cache in :func:`default_cache_dir`; a path: cache there; ``False``: no cache.
    progress : bool
        Print the time taken.

    Returns
    -------
    DiskIntensityTable
    """
    spec = spec or NBEDTableSpec()
    memo = _TABLE_MEMO.get(spec.key())
    if memo is not None:
        return memo
    path = None
    if cache:
        d = default_cache_dir() if cache is True else pathlib.Path(cache)
        path = d / f"{spec.crystal.name}_{spec.crystal.zone}_{spec.energy_kv:g}kV_{spec.key()}.npz"
        if path.exists():
            try:
                z = np.load(path, allow_pickle=False)
                tab = DiskIntensityTable(spec, z["intensity"], z["hk"], z["g_mrad"], float(z["absorption"]),
                                         float(z["seconds"]), z["d1"] if "d1" in z else None,
                                         z["d2"] if "d2" in z else None)
                _TABLE_MEMO[spec.key()] = tab
                return tab
            except Exception:  # corrupt cache: recompute
                pass
    t0 = time.perf_counter()
    solver = BlochSolver(spec.crystal, spec.energy_kv, g_max=spec.g_max, absorption=0.0)
    solver.absorption = absorption_ratio(spec.crystal, spec.energy_kv, float(solver.U[0, 0].real))
    gm = np.hypot(solver.g_mrad[:, 0], solver.g_mrad[:, 1])
    beams = np.nonzero(gm <= spec.g_out_mrad + 1e-9)[0]
    qa = spec.q_axis
    qy, qx = np.meshgrid(qa, qa, indexing="ij")
    q = np.stack([qx.ravel(), qy.ravel()], 1)
    shape = (len(qa), len(qa), len(beams), len(spec.thickness_nm))

    def solve(sv):
        return bloch_beam_intensities(sv, q, spec.thickness_nm, beams=beams).reshape(shape).transpose(2, 3, 0, 1)

    I = solve(solver)
    # drop beams that never carry measurable intensity
    keep = I.reshape(len(beams), -1).max(1) > 1e-7
    keep[0] = True
    d1 = d2 = None
    if spec.strain_order > 0:
        h = spec.strain_step
        units = [np.array([[1.0, 0], [0, 0]]), np.array([[0, 0], [0, 1.0]]), np.array([[0, 1.0], [1.0, 0]])]
        d1 = np.empty((3,) + I[keep].shape, np.float32)
        d2 = np.empty((6,) + I[keep].shape, np.float32) if spec.strain_order > 1 else None
        Ips = []
        for i, E in enumerate(units):
            Ip = solve(strained_solver(solver, np.eye(2) + h * E))[keep]
            Ips.append(Ip)
            if spec.strain_order > 1:
                Im = solve(strained_solver(solver, np.eye(2) - h * E))[keep]
                d1[i] = (Ip - Im) / (2 * h)
                d2[i] = (Ip + Im - 2 * I[keep]) / h**2
            else:
                d1[i] = (Ip - I[keep]) / h
        if spec.strain_order > 1:  # mixed second derivatives (forward differences)
            for c, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
                Ipp = solve(strained_solver(solver, np.eye(2) + h * (units[i] + units[j])))[keep]
                d2[3 + c] = (Ipp - Ips[i] - Ips[j] + I[keep]) / h**2
    tab = DiskIntensityTable(spec, np.ascontiguousarray(I[keep], dtype=np.float32), solver.hk[beams][keep],
                             solver.g_mrad[beams][keep].astype(np.float64), float(solver.absorption),
                             time.perf_counter() - t0, d1, d2)
    if progress:
        n_sol = 1 + 3 * spec.strain_order + (3 if spec.strain_order > 1 else 0)
        print(f"disk-intensity table {spec.crystal.name} [{spec.crystal.zone}]: {n_sol} x {len(q)} directions x "
              f"{solver.n_beams} beams in {tab.seconds:.1f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        extra = {k: v for k, v in (("d1", tab.d1), ("d2", tab.d2)) if v is not None}
        np.savez(tmp, intensity=tab.intensity, hk=tab.hk, g_mrad=tab.g_mrad, absorption=tab.absorption,
                 seconds=tab.seconds, **extra)
        tmp.replace(path)
    _TABLE_MEMO[spec.key()] = tab
    return tab


_TABLE_MEMO: dict[str, DiskIntensityTable] = {}


# --------------------------------------------------------------------------------------
# Deformation gradients
# --------------------------------------------------------------------------------------


def deformation_gradient(exx, eyy, exy=0.0, theta_deg=0.0) -> np.ndarray:
    """Deformation gradient ``F`` (..., 2, 2) with exactly the given strain and rotation.

    ``(F + F^T)/2 - I = [[exx, exy], [exy, eyy]]`` and the rotation of the polar
    decomposition ``F = R U`` is ``theta_deg`` (counter-clockwise in the (x, y) frame).
    Strains are dimensionless (0.01 = 1 %).
    """
    exx, eyy, exy, th = np.broadcast_arrays(*(np.asarray(v, float) for v in (exx, eyy, exy, theta_deg)))
    w = np.tan(np.deg2rad(th)) * (1.0 + (exx + eyy) / 2.0)
    F = np.empty(exx.shape + (2, 2))
    F[..., 0, 0] = 1 + exx
    F[..., 1, 1] = 1 + eyy
    F[..., 0, 1] = exy - w
    F[..., 1, 0] = exy + w
    return F


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _rot(deg):
    t = np.deg2rad(np.asarray(deg, float))
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _per_pattern(v, B, shape=()):
    a = np.asarray(v, float)
    return np.broadcast_to(a, (B,) + shape).copy() if a.shape != (B,) + shape else a.copy()


def disk_positions(table: DiskIntensityTable, F, *, pixel_size_mrad, detector_px, center_px=None,
                   rotation_deg=0.0, affine=None) -> np.ndarray:
    """Exact disk centres (B, n_beams, 2) as (x, y) detector px for deformation gradients ``F`` (B, 2, 2)."""
    F = np.asarray(F, float).reshape(-1, 2, 2)
    B = len(F)
    H = W = int(detector_px)
    pix = _per_pattern(pixel_size_mrad, B)
    rot = _per_pattern(rotation_deg, B)
    aff = _per_pattern(np.eye(2) if affine is None else affine, B, (2, 2))
    c = _per_pattern(((W - 1) / 2, (H - 1) / 2) if center_px is None else center_px, B, (2,))
    D = aff @ _rot(rot) / pix[:, None, None]
    gp = np.einsum("bji,nj->bni", np.linalg.inv(F), table.g_mrad)  # F^-T g
    return c[:, None, :] + np.einsum("bij,bnj->bni", D, gp)


def render_nbed(table: DiskIntensityTable, F, thickness_nm, tilt_mrad=None, *, convergence_mrad: float,
                pixel_size_mrad, detector_px: int, center_px=None, rotation_deg=0.0, affine=None, device=None,
                return_disk_sums: bool = False):
    """Render noiseless NBED patterns with exact disk positions.

    Parameters
    ----------
    table : DiskIntensityTable
        Dynamical intensities of the crystal.
    F : array (B, 2, 2)
        Deformation gradient per pattern (crystal frame), see :func:`deformation_gradient`.
    thickness_nm : array (B,)
        Specimen thickness (nm), inside the table's range.
    tilt_mrad : array (B, 2), optional
        Specimen tilt (x, y) in mrad (crystal frame).
    convergence_mrad : float or array (B,)
        Probe convergence semi-angle (mrad).
    pixel_size_mrad : float or array (B,)
        Detector pixel size (mrad/px).
    detector_px : int
        Detector size (square, px).
    center_px : array (B, 2), optional
        Position (x, y) of the undiffracted beam in px; default the detector centre.
    rotation_deg : float or array (B,)
        Rotation of the crystal axes on the detector (degrees, counter-clockwise in (x, y)).
    affine : array (B, 2, 2), optional
        Residual detector distortion (identity + small terms).

    Returns
    -------
    patterns : torch.Tensor (B, H, W) float32
        Intensity per pixel as a fraction of the incident beam (elastic, absorption included).
    positions : np.ndarray (B, n_beams, 2) float64
        Exact disk centres (x, y) px, for every tabulated beam (also those off the detector).
    disk_sums : np.ndarray (B, n_beams), only with ``return_disk_sums``
        Intensity of each disk that lands on the detector (fraction of the incident beam).
    """
    F = np.asarray(F, float).reshape(-1, 2, 2)
    B = len(F)
    H = W = int(detector_px)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    pix = _per_pattern(pixel_size_mrad, B)
    alpha = _per_pattern(convergence_mrad, B)
    rot = _per_pattern(rotation_deg, B)
    aff = _per_pattern(np.eye(2) if affine is None else affine, B, (2, 2))
    tilt = _per_pattern((0.0, 0.0) if tilt_mrad is None else tilt_mrad, B, (2,))
    t = _per_pattern(thickness_nm, B)
    tax = table.thickness_nm
    if np.any(t < tax[0] - 1e-9) or np.any(t > tax[-1] + 1e-9) or not np.all(np.isfinite(t)):
        raise BadInputError(f"thickness must lie in the table's range {tax[0]:g}-{tax[-1]:g} nm")
    qmax = table.q_axis[-1]
    if np.any(alpha + np.hypot(tilt[:, 0], tilt[:, 1]) > qmax + 1e-9):
        raise BadInputError(f"convergence + tilt exceeds the table's incident-direction range ({qmax:g} mrad)")
    pos = disk_positions(table, F, pixel_size_mrad=pix, detector_px=H, center_px=center_px,
                         rotation_deg=rot, affine=aff)  # (B, N, 2)
    D = aff @ _rot(rot) / pix[:, None, None]
    Dinv = np.linalg.inv(D)
    # rigid rotation of the lattice (polar decomposition of F): partial-wave direction in crystal axes
    thF = np.arctan2(F[:, 1, 0] - F[:, 0, 1], F[:, 0, 0] + F[:, 1, 1])
    RT = np.swapaxes(_rot(np.rad2deg(thF)), -1, -2)
    M = RT @ Dinv  # detector px offset -> crystal-frame mrad
    r_px = alpha / pix * np.max(np.linalg.svd(D * pix[:, None, None], compute_uv=False), axis=1)
    S = int(2 * math.ceil(r_px.max()) + 3)
    vis = ((pos[..., 0] > -r_px[:, None]) & (pos[..., 0] < W - 1 + r_px[:, None])
           & (pos[..., 1] > -r_px[:, None]) & (pos[..., 1] < H - 1 + r_px[:, None]))
    bi, ni = np.nonzero(vis)
    out = torch.zeros(B * H * W, dtype=torch.float32, device=dev)
    sums = np.zeros(pos.shape[:2])
    if len(bi) == 0:
        return (out.view(B, H, W), pos, sums) if return_disk_sums else (out.view(B, H, W), pos)
    p = pos[bi, ni]  # (K, 2)
    o = np.floor(p).astype(np.int64) - S // 2
    ar = np.arange(S)
    px = o[:, 0, None] + ar[None, :]  # (K, S)
    py = o[:, 1, None] + ar[None, :]
    ux = (px - p[:, 0, None]).astype(np.float32)  # (K, S)
    uy = (py - p[:, 1, None]).astype(np.float32)
    T = lambda a: torch.as_tensor(np.asarray(a), device=dev)  # noqa: E731
    uxt = T(ux)[:, None, :].expand(-1, S, -1)
    uyt = T(uy)[:, :, None].expand(-1, -1, S)
    Mk = T(M[bi].astype(np.float32))
    Dk = T(Dinv[bi].astype(np.float32))
    # distance from the disk centre in mrad (detector rotation/distortion undone)
    kx = Dk[:, 0, 0, None, None] * uxt + Dk[:, 0, 1, None, None] * uyt
    ky = Dk[:, 1, 0, None, None] * uxt + Dk[:, 1, 1, None, None] * uyt
    a_k = T(alpha[bi].astype(np.float32))[:, None, None]
    pix_k = T(pix[bi].astype(np.float32))[:, None, None]
    # pixel-area coverage of the aperture disk: 1 or 0 away from the rim; rim pixels (within
    # 0.75 px of it) are integrated with 8 x 8 sub-samples
    kr = torch.sqrt(kx**2 + ky**2)
    rel = (a_k - kr) / pix_k
    cover = (rel > 0).to(kx.dtype)
    rim = rel.abs() < 0.75
    if bool(rim.any()):
        ss = 8
        kk = torch.nonzero(rim, as_tuple=True)[0]
        rx, ry = kx[rim], ky[rim]
        d00, d01 = Dk[kk, 0, 0], Dk[kk, 0, 1]
        d10, d11 = Dk[kk, 1, 0], Dk[kk, 1, 1]
        o = torch.as_tensor((np.arange(ss) + 0.5) / ss - 0.5, dtype=kx.dtype, device=kx.device)
        ox, oy = torch.meshgrid(o, o, indexing="xy")
        ox, oy = ox.reshape(1, -1), oy.reshape(1, -1)
        sx = rx[:, None] + ox * d00[:, None] + oy * d01[:, None]
        sy = ry[:, None] + ox * d10[:, None] + oy * d11[:, None]
        sub = ((a_k.reshape(-1)[kk][:, None] - torch.sqrt(sx**2 + sy**2)) / pix_k.reshape(-1)[kk][:, None] * ss + 0.5)
        cover[rim] = sub.clamp(0, 1).mean(1)
    qx = Mk[:, 0, 0, None, None] * uxt + Mk[:, 0, 1, None, None] * uyt + T(tilt[bi, 0].astype(np.float32))[:, None, None]
    qy = Mk[:, 1, 0, None, None] * uxt + Mk[:, 1, 1, None, None] * uyt + T(tilt[bi, 1].astype(np.float32))[:, None, None]
    # thickness interpolation of the table, then bilinear in the incident direction
    tf = (t[bi] - tax[0]) / (tax[1] - tax[0])
    i0 = np.clip(np.floor(tf).astype(np.int64), 0, len(tax) - 2)
    w = T((tf - i0).astype(np.float32))[:, None, None]
    I = table.torch_intensity(dev)
    Ik = I[0, T(ni), T(i0)] * (1 - w) + I[0, T(ni), T(i0 + 1)] * w  # (K, Q, Q)
    if I.shape[0] > 1:
        # strained-crystal intensities: Taylor expansion in the symmetric strain (exx, eyy, exy)
        eps = np.stack([F[:, 0, 0] - 1, F[:, 1, 1] - 1, 0.5 * (F[:, 0, 1] + F[:, 1, 0])], 1)[bi]  # (K, 3)
        et = T(eps.astype(np.float32))
        tc = lambda j: I[j, T(ni), T(i0)] * (1 - w) + I[j, T(ni), T(i0 + 1)] * w  # noqa: E731
        for c in range(3):
            Ik = Ik + et[:, c, None, None] * tc(1 + c)
            if I.shape[0] > 4:
                Ik = Ik + 0.5 * et[:, c, None, None] ** 2 * tc(4 + c)
        if I.shape[0] > 7:
            for c, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
                Ik = Ik + (et[:, i] * et[:, j])[:, None, None] * tc(7 + c)
        Ik = Ik.clamp_min(0)
    qa = table.q_axis
    grid = torch.stack([(qx - qa[0]) / (qa[-1] - qa[0]) * 2 - 1, (qy - qa[0]) / (qa[-1] - qa[0]) * 2 - 1], -1)
    val = Fnn.grid_sample(Ik[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
    val = val * cover * (pix_k**2 / (math.pi * a_k**2))
    pxt = T(px)[:, None, :].expand(-1, S, -1)
    pyt = T(py)[:, :, None].expand(-1, -1, S)
    ok = (pxt >= 0) & (pxt < W) & (pyt >= 0) & (pyt < H) & (cover > 0)
    flat = T(bi)[:, None, None] * (H * W) + pyt * W + pxt
    out.index_add_(0, flat[ok], val[ok])
    if return_disk_sums:
        sums[bi, ni] = (val * ok).sum(dim=(1, 2)).double().cpu().numpy()
        return out.view(B, H, W), pos, sums
    return out.view(B, H, W), pos


def gaussian_blur(x: torch.Tensor, sigma_px) -> torch.Tensor:
    """Per-pattern Gaussian blur of (B, H, W) with a sampled, normalised real-space kernel.

    (A Gaussian multiplied onto the FFT is cut at the Nyquist frequency for sigma < ~1 px and
    rings around bright disks; this kernel is non-negative, so no negative intensities occur.)
    """
    B, H, W = x.shape
    sig = np.broadcast_to(np.asarray(sigma_px, float), (B,))
    if not np.any(sig > 0):
        return x
    rad = int(math.ceil(4 * max(sig.max(), 0.3)))
    u = np.arange(-rad, rad + 1, dtype=float)
    k = np.exp(-0.5 * u[None, :] ** 2 / np.maximum(sig[:, None], 1e-3) ** 2)
    k[sig <= 0] = (u == 0)[None]
    k /= k.sum(1, keepdims=True)
    kt = torch.as_tensor(k, dtype=x.dtype, device=x.device)
    y = Fnn.conv2d(Fnn.pad(x[None], (rad, rad, 0, 0)), kt[:, None, None, :], groups=B)
    y = Fnn.conv2d(Fnn.pad(y, (0, 0, rad, rad)), kt[:, None, :, None], groups=B)
    return y[0]


def apply_nbed_detector(images: torch.Tensor, dose, background=0.0, radial_background=0.0, radial_width_px=None,
                        blur_px=0.0, generator=None) -> torch.Tensor:
    """Blur (real-space kernel), backgrounds and Poisson noise via :func:`diffkit.sim.detector.apply_detector`."""
    B, H, W = images.shape
    x = gaussian_blur(images, blur_px)
    p = DetectorParams.identity(B)
    p.dose[:] = dose
    p.background[:] = background
    p.radial_background[:] = radial_background
    p.radial_width_px[:] = 0.25 * H if radial_width_px is None else radial_width_px
    return apply_detector(x, p, out_px=H, generator=generator)


# --------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class NBEDScan:
    """A simulated scan: counts, the true fields, and the calibration.

    Attributes
    ----------
    patterns : np.ndarray (scan_y, scan_x, det_y, det_x)
        Detector counts (float32, or uint16 when requested).
    truth : xarray.Dataset
        True maps on (scan_y, scan_x): ``exx, eyy, exy, theta_deg`` (the definitions of
        :func:`diffkit.strain.strain_from_lattice`, detector frame), ``thickness_nm``,
        ``tilt_x_mrad, tilt_y_mrad``, ``phase`` (index into ``attrs['phases']``), and
        ``disk_x, disk_y`` (scan_y, scan_x, beam): exact disk centres in px of the tabulated
        beams of phase 0 (NaN where off the detector), with coordinates ``h, k``, and
        ``disk_counts``: the expected electrons in each disk (on the detector).
    calibration : diffkit.calibration.Calibration
    attrs : dict
        Simulation parameters.
    """

    patterns: np.ndarray
    truth: "object"
    calibration: "object"
    attrs: dict

    def to_fourdstem(self, chunks=(8, -1, -1, -1)):
        """Wrap as :class:`diffkit.data.FourDSTEM` (dask-backed)."""
        import dask.array as da

        from ..data import FourDSTEM

        return FourDSTEM(da.from_array(self.patterns, chunks=chunks), calibration=self.calibration,
                         source=self.attrs.get("source", "simulated NBED scan (diffkit.strain.simulate_nbed)"),
                         truth=self.truth, attrs={"simulation": self.attrs})


def simulate_nbed(exx, eyy, exy=None, theta_deg=None, thickness_nm=60.0, tilt_mrad=None, *, phase=None,
                  tables=None, material: str = "Si", zone: str = "001", energy_kv: float = 200.0,
                  convergence_mrad: float = 2.0, pixel_size_mrad: float = 0.4, detector_px: int = 128,
                  rotation_deg: float = 0.0, center_offset_px=(0.0, 0.0), dose: float = 5e5,
                  background: float = 0.01, radial_background: float = 0.02, blur_px: float = 0.5,
                  scan_step_nm: float = 1.0, seed: int = 0, dtype="float32", batch: int = 128,
                  table_spec: NBEDTableSpec | None = None, device=None, progress: bool = False) -> NBEDScan:
    """Simulate an NBED scan of a crystal with a known strain field.

    Parameters
    ----------
    exx, eyy, exy : array (scan_y, scan_x)
        Strain (dimensionless, 0.01 = 1 %) in the crystal frame; ``exy`` defaults to 0.
    theta_deg : array, optional
        Lattice rotation (degrees, counter-clockwise).
    thickness_nm : float or array
        Specimen thickness (nm).
    tilt_mrad : array (scan_y, scan_x, 2), optional
        Specimen tilt (x, y) in mrad.
    phase : int array (scan_y, scan_x), optional
        Index into ``tables`` per position (multi-phase scans); default all 0.
    tables : list of DiskIntensityTable, optional
        Crystals; default one table for ``material``/``zone``/``energy_kv``.
    convergence_mrad : float
        Probe convergence semi-angle (mrad).
    pixel_size_mrad : float
        Detector pixel size (mrad/px).
    detector_px : int
        Square detector size (px).
    rotation_deg : float
        Rotation of the crystal x axis on the detector (degrees). Truth strain is given in the
        detector frame (equal to the crystal frame when 0).
    center_offset_px : (x, y)
        Offset of the undiffracted beam from the detector centre (px).
    dose : float
        Electrons per pattern reaching the detector (Poisson noise); ``inf`` = noiseless.
    background, radial_background : float
        Uniform and radial (Lorentzian) background, as fractions of the mean pattern
        intensity (see :mod:`diffkit.sim.detector`).
    blur_px : float
        Gaussian point-spread sigma (px).
    scan_step_nm : float
        Real-space scan step written to the calibration (nm).
    seed : int
        Seed of the shot noise.
    dtype : "float32" or "uint16"
        Storage type of the counts.

    Returns
    -------
    NBEDScan
    """
    import xarray as xr

    from ..calibration import Calibration

    t0 = time.perf_counter()
    exx = np.asarray(exx, float)
    if exx.ndim != 2:
        raise BadInputError("strain maps must be 2D (scan_y, scan_x)")
    Y, X = exx.shape
    z = lambda v: np.zeros((Y, X)) if v is None else np.broadcast_to(np.asarray(v, float), (Y, X))  # noqa: E731
    eyy, exy, th = z(eyy), z(exy), z(theta_deg)
    tmap = np.broadcast_to(np.asarray(thickness_nm, float), (Y, X))
    tilt = np.zeros((Y, X, 2)) if tilt_mrad is None else np.broadcast_to(np.asarray(tilt_mrad, float), (Y, X, 2))
    ph = np.zeros((Y, X), int) if phase is None else np.asarray(phase, int)
    if tables is None:
        spec = table_spec or NBEDTableSpec(crystal=get_crystal(material, zone), energy_kv=energy_kv,
                                           q_max_mrad=max(4.0, convergence_mrad + float(np.abs(tilt).max()) + 0.5))
        tables = [disk_intensity_table(spec, progress=progress)]
    F_cr = deformation_gradient(exx, eyy, exy, th)
    R = _rot(rotation_deg)
    F_det = R @ F_cr @ R.T  # the field as the detector frame sees it
    cx, cy = (detector_px - 1) / 2 + center_offset_px[0], (detector_px - 1) / 2 + center_offset_px[1]
    N = Y * X
    patterns = np.empty((N, detector_px, detector_px), np.float32 if dtype == "float32" else np.uint16)
    tab0 = tables[0]
    disk_xy = np.full((N, len(tab0.hk), 2), np.nan)
    disk_frac = np.zeros((N, len(tab0.hk)))
    gen = torch.Generator().manual_seed(int(seed))
    Ff, tf, tif, phf = F_cr.reshape(N, 2, 2), tmap.reshape(N), tilt.reshape(N, 2), ph.reshape(N)
    for s in range(0, N, batch):
        sl = np.arange(s, min(N, s + batch))
        img = torch.zeros(len(sl), detector_px, detector_px)
        for pi, tab in enumerate(tables):
            m = phf[sl] == pi
            if not m.any():
                continue
            im, pos, sums = render_nbed(tab, Ff[sl[m]], tf[sl[m]], tif[sl[m]], convergence_mrad=convergence_mrad,
                                        pixel_size_mrad=pixel_size_mrad, detector_px=detector_px, center_px=(cx, cy),
                                        rotation_deg=rotation_deg, device=device, return_disk_sums=True)
            img[torch.as_tensor(np.nonzero(m)[0])] = im.cpu()
            if pi == 0:
                disk_xy[sl[m]] = pos
                tot = im.sum(dim=(1, 2)).double().cpu().numpy()
                disk_frac[sl[m]] = sums / np.maximum(tot[:, None], 1e-30)
        det = apply_nbed_detector(img, dose, background, radial_background, 0.25 * detector_px, blur_px, gen)
        if dtype == "uint16":
            det = det.round().clamp(0, 65535)
        patterns[sl] = det.numpy().astype(patterns.dtype)
        if progress:
            print(f"\rsimulated {sl[-1] + 1}/{N} patterns", end="", flush=True)
    if progress:
        print()
    r_off = ((disk_xy[..., 0] < 0) | (disk_xy[..., 0] > detector_px - 1)
             | (disk_xy[..., 1] < 0) | (disk_xy[..., 1] > detector_px - 1) | (phf[:, None] != 0))
    disk_xy[r_off] = np.nan
    on = ~np.all(np.isnan(disk_xy[..., 0]), axis=0)
    from .lattice import strain_from_deformation

    st = strain_from_deformation(F_det)
    dims = ("scan_y", "scan_x")
    truth = xr.Dataset(
        {
            "exx": (dims, st["exx"], {"units": "1", "long_name": "strain xx (detector frame)"}),
            "eyy": (dims, st["eyy"], {"units": "1", "long_name": "strain yy (detector frame)"}),
            "exy": (dims, st["exy"], {"units": "1", "long_name": "shear strain xy (tensor component)"}),
            "theta_deg": (dims, st["theta_deg"], {"units": "degree", "long_name": "lattice rotation"}),
            "thickness_nm": (dims, tmap.astype(np.float32), {"units": "nm"}),
            "tilt_x_mrad": (dims, tilt[..., 0].astype(np.float32), {"units": "mrad"}),
            "tilt_y_mrad": (dims, tilt[..., 1].astype(np.float32), {"units": "mrad"}),
            "phase": (dims, ph.astype(np.int8), {"units": "1"}),
            "disk_x": (dims + ("beam",), disk_xy[:, on, 0].reshape(Y, X, -1).astype(np.float32), {"units": "px"}),
            "disk_y": (dims + ("beam",), disk_xy[:, on, 1].reshape(Y, X, -1).astype(np.float32), {"units": "px"}),
            "disk_counts": (dims + ("beam",), (disk_frac[:, on] * (dose if np.isfinite(dose) else 1e6)).reshape(Y, X, -1)
                            .astype(np.float32), {"units": "electrons", "long_name": "expected counts in each disk"}),
        },
        coords={"h": ("beam", tab0.hk[on, 0]), "k": ("beam", tab0.hk[on, 1])},
    )
    cal = Calibration(beam_energy_kv=tab0.spec.energy_kv, convergence_mrad=convergence_mrad,
                      pixel_size_mrad=pixel_size_mrad, scan_step_nm=scan_step_nm,
                      material=tab0.spec.crystal.name, zone_axis=tab0.spec.crystal.zone)
    attrs = dict(
        source="simulated NBED scan (diffkit.strain.simulate_nbed)",
        phases=[f"{t.spec.crystal.name} [{t.spec.crystal.zone}]" for t in tables],
        convergence_mrad=convergence_mrad, pixel_size_mrad=pixel_size_mrad, detector_px=detector_px,
        rotation_deg=rotation_deg, center_px=[cx, cy], dose=dose, background=background,
        radial_background=radial_background, blur_px=blur_px, seed=seed, energy_kv=tab0.spec.energy_kv,
        g_max=tab0.spec.g_max, table_key=tab0.spec.key(), seconds=round(time.perf_counter() - t0, 2),
        strain_definition="eps = (F + F^T)/2 - I, theta = polar rotation of F; F real-space deformation gradient",
    )
    return NBEDScan(patterns.reshape(Y, X, detector_px, detector_px), truth, cal, attrs)


# --------------------------------------------------------------------------------------
# Demo and test scans
# --------------------------------------------------------------------------------------


def multilayer_field(scan_shape=(48, 48), substrate_cols: int = 12, layer_cols=(5, 4), exx_layer: float = 0.0085,
                     n_layers: int = 4, interface_px: float = 0.6, blob_center=(9.0, 34.0), blob_radius: float = 5.0,
                     blob_exy: float = 0.003, blob_theta_deg: float = 0.15) -> dict:
    """Si/SiGe-like multilayer strain field on the scan grid.

    A strain-free Si substrate (columns ``< substrate_cols``: the reference region), then
    ``n_layers`` pseudomorphic SiGe layers (``exx = exx_layer`` along the growth direction x,
    ``eyy = 0`` in plane, like seed 002's MAG*I*CAL sample) separated by Si spacers, with
    smooth (error-function) interfaces; and a round region with shear ``blob_exy`` and
    rotation ``blob_theta_deg`` (e.g. bending near a defect).

    Returns
    -------
    dict with ``exx, eyy, exy, theta_deg`` (scan_y, scan_x) and ``reference`` (bool mask).
    """
    from scipy.special import erf

    Y, X = scan_shape
    x = np.arange(X, dtype=float)
    prof = np.zeros(X)
    start = substrate_cols
    for _ in range(n_layers):
        a, b = start - 0.5, start + layer_cols[0] - 0.5
        prof += 0.5 * (erf((x - a) / interface_px) - erf((x - b) / interface_px))
        start += layer_cols[0] + layer_cols[1]
    exx = np.broadcast_to(exx_layer * prof, (Y, X)).copy()
    yy, xx = np.meshgrid(np.arange(Y), x, indexing="ij")
    r = np.hypot(yy - blob_center[0], xx - blob_center[1])
    w = 0.5 * (1 - erf((r - blob_radius) / 1.0))
    ref = np.zeros((Y, X), bool)
    ref[:, : max(1, substrate_cols - 2)] = True
    return {"exx": exx, "eyy": np.zeros((Y, X)), "exy": blob_exy * w, "theta_deg": blob_theta_deg * w,
            "reference": ref}


def make_strain_demo_scan(path=None, *, scan_shape=(40, 40), detector_px: int = 128, convergence_mrad: float = 2.0,
                          pixel_size_mrad: float = 0.4, dose: float = 2e5, background: float = 0.001,
                          radial_background: float = 0.002, blur_px: float = 0.5, thickness_range_nm=(60.0, 90.0),
                          tilt_max_mrad: float = 0.8, seed: int = 0, overwrite: bool = False, progress: bool = False):
    """Simulate the Si/SiGe-like multilayer NBED demo scan (Si [001], 200 kV) and optionally write it.

    Parameters
    ----------
    path : str or path, optional
        Where to write the scan with :func:`diffkit.io.save_zarr` (diffkit's zarr layout, true
        maps under ``truth/``); nothing is written when ``None``.
    scan_shape : (int, int)
        Scan positions (scan_y, scan_x); x is the growth direction.
    detector_px, convergence_mrad, pixel_size_mrad
        Detector size (px), probe semi-angle (mrad), pixel size (mrad/px): the defaults give
        10 px disks and 13 whole disks (000, 4x 220, 4x 400, 4x 440) on the detector.
    dose : float
        Electrons per pattern (the defaults keep the stored scan under 5 MB).
    thickness_range_nm : (float, float)
        Linear thickness wedge along scan y (nm).
    tilt_max_mrad : float
        Specimen tilt grows linearly from the scan centre to this value at the corners (mrad).

    Returns
    -------
    diffkit.data.FourDSTEM
        With ``truth`` (exx, eyy, exy, theta_deg, thickness, tilt, disk positions) and the
        reference region as ``attrs['strain_reference_region']`` (truth variable ``reference``).
    """
    Y, X = scan_shape
    f = multilayer_field(scan_shape, substrate_cols=max(4, X // 4), layer_cols=(max(2, X // 10), max(2, (3 * X) // 40)),
                         blob_center=(0.2 * (Y - 1), 0.75 * (X - 1)), blob_radius=max(2.0, 0.1 * min(Y, X)))
    yy, xx = np.meshgrid(np.arange(Y), np.arange(X), indexing="ij")
    t = thickness_range_nm[0] + (thickness_range_nm[1] - thickness_range_nm[0]) * yy / max(Y - 1, 1)
    cy, cx = (Y - 1) / 2, (X - 1) / 2
    rmax = np.hypot(cy, cx)
    tilt = np.stack([(xx - cx), (yy - cy)], -1) * tilt_max_mrad / rmax
    scan = simulate_nbed(f["exx"], f["eyy"], f["exy"], f["theta_deg"], thickness_nm=t, tilt_mrad=tilt,
                         convergence_mrad=convergence_mrad, pixel_size_mrad=pixel_size_mrad, detector_px=detector_px,
                         dose=dose, background=background, radial_background=radial_background, blur_px=blur_px,
                         center_offset_px=(0.3, -0.2), scan_step_nm=1.0, seed=seed, dtype="uint16",
                         progress=progress)
    scan.truth["reference"] = (("scan_y", "scan_x"), f["reference"].astype(np.int8),
                               {"long_name": "strain-free reference region (1 = in region)"})
    scan.attrs["source"] = "simulated Si/SiGe-like multilayer NBED scan (diffkit.strain.make_strain_demo_scan)"
    scan.attrs["layers"] = (f"substrate x < {max(4, X // 4)} (reference: x < {max(4, X // 4) - 2}); 4 SiGe-like layers "
                            f"exx = 0.85 % ({max(2, X // 10)} px) with Si spacers ({max(2, (3 * X) // 40)} px); "
                            "disc with exy = 0.3 %, rotation 0.15 deg")
    ds = scan.to_fourdstem(chunks=(8, -1, -1, -1))
    ref_cols = int(np.nonzero(f["reference"][0])[0].max()) + 1
    ds.attrs["strain_reference_region"] = [0, int(Y), 0, ref_cols]  # (y0, y1, x0, x1), strain-free substrate
    if path is not None:
        from ..io import save_zarr

        save_zarr(ds, path, overwrite=overwrite)
    return ds


def small_table_spec(material: str = "Si", zone: str = "001", energy_kv: float = 200.0,
                     strain_order: int = 1) -> NBEDTableSpec:
    """A small table (few beams, coarse grid; ~1 s per Bloch solve of the grid) for tests and examples."""
    return NBEDTableSpec(crystal=get_crystal(material, zone), energy_kv=energy_kv, q_max_mrad=3.0, q_step_mrad=0.3,
                         thickness_nm=tuple(np.arange(20.0, 120.01, 5.0)), g_max=1.0, g_out_mrad=30.0,
                         strain_order=strain_order)


def make_test_scan(scan_shape=(8, 8), *, exx=None, eyy=None, exy=None, theta_deg=None, detector_px: int = 96,
                   convergence_mrad: float = 2.0, pixel_size_mrad: float = 0.45, dose: float = 1e6,
                   thickness_nm=60.0, seed: int = 1, material: str = "Si", zone: str = "001", **kw) -> NBEDScan:
    """Small, fast scan for tests: a linear exx ramp along x (0 to 1 %) unless maps are given."""
    Y, X = scan_shape
    if exx is None:
        exx = np.broadcast_to(np.linspace(0, 0.01, X), (Y, X))
    tab = disk_intensity_table(small_table_spec(material, zone))
    return simulate_nbed(exx, eyy, exy, theta_deg, thickness_nm=thickness_nm, tables=[tab],
                         convergence_mrad=convergence_mrad, pixel_size_mrad=pixel_size_mrad, detector_px=detector_px,
                         dose=dose, seed=seed, **kw)
