"""Frozen-phonon multislice: PACBED, NBED and probe-scanned images of a periodic crystal.

An independent route to the diffraction physics that the Bloch-wave library
(:mod:`diffkit.sim.bloch`) approximates. A periodic supercell of ``cells`` unit cells
is sliced at its atomic planes; each plane's atoms are projected fully into their
slice (infinite projection) with Lobato & Van Dyck scattering factors (the same
parameters the Bloch solver uses), giving the transmission function
``t(r) = exp(i phi(r))`` with phase coefficients

    phi_q = (lambda gamma / A) sum_j f_j(|q|) exp(-2 pi i q . r_j)

(A the supercell area in Å^2), band-limited to 2/3 of the Nyquist frequency. Between
planes the wave is propagated with the Fresnel propagator
``exp(-i pi lambda dz |k|^2 - 2 pi i dz k . tau)``, whose second term tilts the specimen
by ``tau`` (rad): the crystal-frame incident direction of partial wave ``p`` is ``p + tau``
while the aperture stays on the optic axis, the convention of the Bloch library.

Thermal vibration is sampled, not modelled: each frozen-phonon configuration displaces
every atom of every plane of the whole thickness independently by a Gaussian of rms
``sqrt(B / 8 pi^2)`` per in-plane axis (B the site's Debye-Waller factor, Å^2), with no
Debye-Waller damping of the potential. Averaging intensities over configurations gives the
thermal diffuse scattering and the loss from the Bragg beams (absorption) from first
principles: none of the Bloch solver's ``U' = kappa U``, ZOLZ or TDS-profile
approximations are made. Displacements along the beam do not move atoms between
slices of one atomic plane and are not sampled.

Exit planes after whole unit cells give every thickness from one run. Batched over probe
positions (memory ``batch x ny x nx`` complex64), CPU or CUDA (torch).

Conventions: arrays are (y, x); real-space positions in Å, angles in mrad, thickness in nm.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time

import numpy as np
import torch

from .crystals import ZoneCrystal, srtio3_001
from .scattering import electron_scattering_factor, lorentz_factor, wavelength_angstrom

LIBRARY_FORMAT = "diffkit-multislice-pacbed-v1"


@dataclasses.dataclass(frozen=True)
class MultisliceSpec:
    """Everything that defines a frozen-phonon multislice calculation.

    Parameters
    ----------
    crystal : ZoneCrystal
        Orthogonal cell, beam along ``c``; Debye-Waller B of each site sets its vibration.
    energy_kv : float
        Beam energy (kV).
    convergence_mrad : float
        Probe semi-angle (mrad), hard aperture, no aberrations.
    cells : (int, int)
        Supercell repetitions (y, x). Also sets the reciprocal sampling: 1 / (cells * a).
    sampling_A : float
        Target real-space sampling (Å); the grid per cell is ``ceil(a / sampling_A)``.
    n_phonons : int
        Frozen-phonon configurations (0 = static lattice, no thermal vibration).
    phonon_seed : int
        Seed of the displacement draws (configuration ``i`` of seed ``s`` is always the same).
    scan_per_cell : int or None
        Probe positions per unit cell along each axis for PACBED (averaged). ``None``: the
        fewest that make the average exact for a periodic crystal, ``floor(2 alpha / g) + 1``
        (every cross term between partial waves that meet in the pattern, |h| g < 2 alpha,
        cancels; 5 at 13.6 mrad and 6 at 19.1 mrad for SrTiO3 at 200 kV).
    max_angle_mrad : float
        Patterns are kept out to this scattering angle (mrad), square crop.
    """

    crystal: ZoneCrystal = dataclasses.field(default_factory=srtio3_001)
    energy_kv: float = 200.0
    convergence_mrad: float = 13.6
    cells: tuple = (6, 6)
    sampling_A: float = 0.09
    n_phonons: int = 6
    phonon_seed: int = 0
    scan_per_cell: int | None = None
    max_angle_mrad: float = 40.0

    def __post_init__(self):
        object.__setattr__(self, "cells", tuple(int(c) for c in self.cells))
        if min(self.cells) < 1 or self.sampling_A <= 0 or self.convergence_mrad <= 0 or self.n_phonons < 0:
            raise ValueError(f"invalid multislice parameters: {self}")

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d["crystal"] = self.crystal.key()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- grids ------------------------------------------------------------------------------
    @property
    def wavelength_A(self) -> float:
        return wavelength_angstrom(self.energy_kv)

    @property
    def gpts_per_cell(self) -> tuple:
        """Grid points per unit cell (y, x)."""
        cr = self.crystal
        return (int(math.ceil(cr.b / self.sampling_A - 1e-9)), int(math.ceil(cr.a / self.sampling_A - 1e-9)))

    @property
    def gpts(self) -> tuple:
        """Supercell grid (ny, nx)."""
        return (self.gpts_per_cell[0] * self.cells[0], self.gpts_per_cell[1] * self.cells[1])

    @property
    def extent_A(self) -> tuple:
        """Supercell size (Ly, Lx) in Å."""
        return (self.crystal.b * self.cells[0], self.crystal.a * self.cells[1])

    @property
    def k_step_mrad(self) -> tuple:
        """Reciprocal sampling (y, x) in mrad: lambda / L."""
        return tuple(self.wavelength_A / L * 1e3 for L in self.extent_A)

    @property
    def band_limit_mrad(self) -> float:
        """Anti-aliasing limit: 2/3 of the Nyquist angle (mrad)."""
        s = max(self.extent_A[0] / self.gpts[0], self.extent_A[1] / self.gpts[1])
        return 2.0 / 3.0 / (2.0 * s) * self.wavelength_A * 1e3

    def planes(self):
        """Atomic planes of one cell: list of (z_frac, dz_A, sites), dz the distance to the next plane."""
        zs = sorted({round(s.xyz[2] % 1.0, 6) for s in self.crystal.sites})
        out = []
        for i, z in enumerate(zs):
            nxt = zs[i + 1] if i + 1 < len(zs) else zs[0] + 1.0
            sites = [s for s in self.crystal.sites if abs(round(s.xyz[2] % 1.0, 6) - z) < 1e-6]
            out.append((z, (nxt - z) * self.crystal.c, sites))
        return out

    def cells_for(self, thickness_nm) -> np.ndarray:
        """Whole numbers of cells nearest to the requested thicknesses (nm), at least one."""
        t = np.asarray(thickness_nm, float).ravel()
        return np.maximum(1, np.round(t * 10.0 / self.crystal.c)).astype(int)


def _default_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Slicer:
    """Transmission functions of the supercell, plane by plane, for one phonon configuration."""

    def __init__(self, spec: MultisliceSpec, device):
        self.spec = spec
        self.device = device
        ny, nx = spec.gpts
        Ly, Lx = spec.extent_A
        self.ky = torch.fft.fftfreq(ny, d=Ly / ny, dtype=torch.float64)  # 1/Å
        self.kx = torch.fft.fftfreq(nx, d=Lx / nx, dtype=torch.float64)
        k = torch.sqrt(self.ky[:, None] ** 2 + self.kx[None, :] ** 2)
        lam = spec.wavelength_A
        self.band = (k * lam * 1e3 < spec.band_limit_mrad).to(device)
        coef = lam * lorentz_factor(spec.energy_kv) / (Ly * Lx)
        elements = sorted({s.symbol for s in spec.crystal.sites})
        # the potential keeps every frequency of the grid (to Nyquist); only the transmission
        # function and the propagator are band-limited (cutting the potential first weakens
        # high-angle scattering: see docs/simulation.md)
        self.f = {el: torch.as_tensor(coef * electron_scattering_factor(el, k.numpy()), dtype=torch.complex64,
                                      device=device) for el in elements}
        cy, cx = spec.cells
        iy, ix = np.meshgrid(np.arange(cy), np.arange(cx), indexing="ij")
        self.cell_origin = np.stack([iy.ravel() * spec.crystal.b, ix.ravel() * spec.crystal.a], 1)  # (n_cells, 2) Å
        self.planes = []
        for z, dz, sites in spec.planes():
            base = {}
            for s in sites:
                p = self.cell_origin + np.array([s.xyz[1] * spec.crystal.b, s.xyz[0] * spec.crystal.a])
                u = math.sqrt(max(s.b_iso, 0.0) / (8 * math.pi**2)) if spec.n_phonons > 0 else 0.0
                base.setdefault(s.symbol, []).append((p, u))
            self.planes.append((dz, {el: (np.concatenate([p for p, _ in v]), np.concatenate([np.full(len(p), u) for p, u in v]))
                                     for el, v in base.items()}))
        self.ky_d = self.ky.to(device)
        self.kx_d = self.kx.to(device)

    def transmission(self, config: int, cell_z: int, plane: int) -> torch.Tensor:
        """exp(i phi) of plane ``plane`` of cell layer ``cell_z`` in configuration ``config``, band-limited."""
        spec = self.spec
        _, atoms = self.planes[plane]
        rng = np.random.default_rng([spec.phonon_seed, config, cell_z, plane]) if spec.n_phonons > 0 else None
        phase_q = None
        for el, (pos, u) in atoms.items():
            p = pos if rng is None else pos + rng.standard_normal(pos.shape) * u[:, None]
            pt = torch.as_tensor(p, dtype=torch.float64, device=self.device)
            ey = torch.exp(-2j * math.pi * self.ky_d[:, None] * pt[None, :, 0]).to(torch.complex64)
            ex = torch.exp(-2j * math.pi * self.kx_d[:, None] * pt[None, :, 1]).to(torch.complex64)
            s = (ey @ ex.T) * self.f[el]
            phase_q = s if phase_q is None else phase_q + s
        ny, nx = spec.gpts
        phi = torch.fft.ifft2(phase_q).real * (ny * nx)
        t = torch.exp(1j * phi.to(torch.float32))
        return torch.fft.ifft2(torch.fft.fft2(t) * self.band)


def _propagators(slicer: _Slicer, tilt_mrad) -> list:
    """Fresnel propagator of each plane's slice thickness with specimen tilt (x, y) in mrad, band-limited."""
    lam = slicer.spec.wavelength_A
    tx, ty = (math.tan(float(v) * 1e-3) for v in tilt_mrad)
    ky, kx = slicer.ky_d[:, None], slicer.kx_d[None, :]
    out = []
    for dz, _ in slicer.planes:
        ph = -math.pi * lam * dz * (kx**2 + ky**2) - 2 * math.pi * dz * (kx * tx + ky * ty)
        out.append((torch.exp(1j * ph) * slicer.band).to(torch.complex64))
    return out


def probe_waves(spec: MultisliceSpec, positions_A, device=None) -> torch.Tensor:
    """Aberration-free probes at ``positions_A`` (n, 2) (y, x) in Å, real space, (n, ny, nx) complex64.

    Each is normalised so that its intensity summed over the reciprocal samples is 1.
    """
    device = _default_device(device)
    ny, nx = spec.gpts
    Ly, Lx = spec.extent_A
    ky = torch.fft.fftfreq(ny, d=Ly / ny, dtype=torch.float64).to(device)
    kx = torch.fft.fftfreq(nx, d=Lx / nx, dtype=torch.float64).to(device)
    k_mrad = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) * spec.wavelength_A * 1e3
    ap = (k_mrad < spec.convergence_mrad).to(torch.float64)
    n_ap = float(ap.sum())
    if n_ap < 1:
        raise ValueError(f"the {spec.convergence_mrad} mrad aperture holds no reciprocal sample at "
                         f"{spec.k_step_mrad} mrad: use a larger supercell")
    pos = torch.as_tensor(np.asarray(positions_A, float).reshape(-1, 2), device=device)
    ph = -2 * math.pi * (ky[None, :, None] * pos[:, 0, None, None] + kx[None, None, :] * pos[:, 1, None, None])
    psi_k = (ap / math.sqrt(n_ap))[None] * torch.exp(1j * ph)
    return torch.fft.ifft2(psi_k.to(torch.complex64))


def _crop_index(spec: MultisliceSpec):
    """fftshifted index ranges (y, x) of the samples within ``max_angle_mrad`` and their angles (mrad)."""
    out = []
    for n, dk in zip(spec.gpts, spec.k_step_mrad):
        k = np.fft.fftshift(np.fft.fftfreq(n, 1.0 / n)) * dk
        keep = np.nonzero(np.abs(k) <= min(spec.max_angle_mrad, spec.band_limit_mrad) + 1e-9)[0]
        out.append((keep, k[keep]))
    return out


def run_multislice(spec: MultisliceSpec, positions_A, thickness_nm, tilt_mrad=(0.0, 0.0), average: bool = True,
                   detectors_mrad=None, batch: int = 64, device=None, progress: bool = True, cancel=None):
    """Core frozen-phonon multislice run.

    Parameters
    ----------
    positions_A : (n, 2) array
        Probe positions (y, x) in Å.
    thickness_nm : sequence of float
        Exit thicknesses (nm), rounded to whole unit cells (see ``spec.cells_for``).
    tilt_mrad : (float, float)
        Specimen tilt (x, y) in mrad.
    average : bool
        Average the diffraction patterns over positions (PACBED); otherwise keep each.
    detectors_mrad : list of (inner, outer) or None
        Annular detectors (mrad): return their integrated intensity per position instead of patterns.
    cancel : callable or None
        Polled between slices; a true value stops the run with ``RuntimeError``.

    Returns
    -------
    dict with ``thickness_nm`` (actual), ``ky_mrad``, ``kx_mrad``, and ``patterns``
    (T, ky, kx) if ``average`` else (n, T, ky, kx), or ``signals`` (n, T, n_detectors),
    all averaged over the phonon configurations; intensity as a fraction of the incident beam.
    """
    device = _default_device(device)
    cells = spec.cells_for(thickness_nm)
    exits = sorted(set(int(c) for c in cells))
    pos = np.asarray(positions_A, float).reshape(-1, 2)
    slicer = _Slicer(spec, device)
    props = _propagators(slicer, tilt_mrad)
    (iy, ky_m), (ix, kx_m) = _crop_index(spec)
    iy_t = torch.as_tensor(iy, device=device)
    ix_t = torch.as_tensor(ix, device=device)
    n_conf = max(1, spec.n_phonons)
    n_exit = len(exits)
    if detectors_mrad is not None:
        kk = np.hypot(ky_m[:, None], kx_m[None, :])
        masks = torch.as_tensor(np.stack([(kk >= lo) & (kk < hi) for lo, hi in detectors_mrad]).astype(np.float64),
                                device=device)
        acc = torch.zeros((len(pos), n_exit, len(detectors_mrad)), dtype=torch.float64, device=device)
    elif average:
        acc = torch.zeros((n_exit, len(iy), len(ix)), dtype=torch.float64, device=device)
    else:
        acc = torch.zeros((len(pos), n_exit, len(iy), len(ix)), dtype=torch.float64, device=device)
    n_planes = len(slicer.planes)
    total = n_conf * int(math.ceil(len(pos) / batch)) * exits[-1] * n_planes
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"multislice {spec.gpts[0]}x{spec.gpts[1]}, {n_conf} config", unit="slice",
                   mininterval=1.0)
    exit_slot = {c: i for i, c in enumerate(exits)}
    t0 = time.perf_counter()
    for conf in range(n_conf):
        for b0 in range(0, len(pos), batch):
            psi = probe_waves(spec, pos[b0:b0 + batch], device)
            for cz in range(exits[-1]):
                for pl in range(n_planes):
                    if cancel is not None and cancel():
                        raise RuntimeError("multislice run cancelled")
                    psi_k = torch.fft.fft2(psi * slicer.transmission(conf, cz, pl))
                    if pl == n_planes - 1 and (cz + 1) in exit_slot:
                        i = exit_slot[cz + 1]
                        I = torch.fft.fftshift(psi_k.real**2 + psi_k.imag**2, dim=(-2, -1))
                        I = I.index_select(-2, iy_t).index_select(-1, ix_t).to(torch.float64)
                        if detectors_mrad is not None:
                            acc[b0:b0 + batch, i] += torch.einsum("byx,dyx->bd", I, masks)
                        elif average:
                            acc[i] += I.sum(0)
                        else:
                            acc[b0:b0 + batch, i] += I
                    psi = torch.fft.ifft2(psi_k * props[pl])
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    acc = acc / n_conf
    if average and detectors_mrad is None:
        acc = acc / len(pos)
    out = {"thickness_nm": np.array(exits) * spec.crystal.c / 10.0, "ky_mrad": ky_m, "kx_mrad": kx_m,
           "seconds": time.perf_counter() - t0}
    out["signals" if detectors_mrad is not None else "patterns"] = acc.cpu().numpy().astype(np.float32)
    return out


def default_scan_per_cell(spec: MultisliceSpec) -> int:
    """Fewest probe positions per cell axis for an exact PACBED average: floor(2 alpha / g_min) + 1."""
    g_mrad = spec.wavelength_A / max(spec.crystal.a, spec.crystal.b) * 1e3
    return int(math.floor(2 * spec.convergence_mrad / g_mrad + 1e-9)) + 1


def pacbed_positions(spec: MultisliceSpec) -> np.ndarray:
    """Probe positions (y, x) in Å of a PACBED: ``scan_per_cell``^2 points over one unit cell, endpoint excluded."""
    n = spec.scan_per_cell or default_scan_per_cell(spec)
    yy, xx = np.meshgrid(np.arange(n) / n * spec.crystal.b, np.arange(n) / n * spec.crystal.a, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], 1)


def multislice_pacbed(spec: MultisliceSpec, thickness_nm, tilt_mrad=(0.0, 0.0), **kw):
    """PACBED (probe averaged over one unit cell and the phonon configurations) as an ``xarray.DataArray``.

    Dims (thickness_nm, ky_mrad, kx_mrad) on the multislice's own reciprocal grid (spacing
    ``spec.k_step_mrad``); values are the fraction of the incident beam per sample.
    ``tilt_mrad`` is (x, y). Keyword arguments go to :func:`run_multislice`.
    """
    r = run_multislice(spec, pacbed_positions(spec), thickness_nm, tilt_mrad, average=True, **kw)
    return _pattern_array(r, spec, tilt_mrad, "pacbed")


def multislice_nbed(spec: MultisliceSpec, thickness_nm, position_A=(0.0, 0.0), tilt_mrad=(0.0, 0.0), **kw):
    """Nanobeam pattern(s) of one probe position (y, x) in Å, averaged over phonon configurations.

    Same grid and units as :func:`multislice_pacbed`.
    """
    r = run_multislice(spec, np.asarray(position_A, float).reshape(1, 2), thickness_nm, tilt_mrad,
                       average=True, **kw)
    return _pattern_array(r, spec, tilt_mrad, "nbed", position_A=list(map(float, position_A)))


def _pattern_array(r: dict, spec: MultisliceSpec, tilt_mrad, name: str, **attrs):
    """A :func:`run_multislice` result with averaged patterns as a (thickness_nm, ky_mrad, kx_mrad) DataArray."""
    import xarray as xr

    return xr.DataArray(r["patterns"], dims=("thickness_nm", "ky_mrad", "kx_mrad"),
                        coords={"thickness_nm": r["thickness_nm"], "ky_mrad": r["ky_mrad"], "kx_mrad": r["kx_mrad"]},
                        attrs={**_attrs(spec, tilt_mrad, r["seconds"]), **attrs}, name=name)


def multislice_image(spec: MultisliceSpec, thickness_nm, detectors_mrad, scan_gpts=(8, 8), tilt_mrad=(0.0, 0.0), **kw):
    """Probe-scanned STEM image(s) over one unit cell with annular detectors.

    ``detectors_mrad`` is a list of (inner, outer) in mrad (e.g. ABF ``(7, 14)``, HAADF ``(70, 200)``:
    the outer angle is clipped at ``spec.max_angle_mrad``). Returns a DataArray
    (detector, thickness_nm, y_A, x_A) of the fraction of the incident beam.
    """
    import xarray as xr

    ny, nx = scan_gpts
    y = np.arange(ny) / ny * spec.crystal.b
    x = np.arange(nx) / nx * spec.crystal.a
    yy, xx = np.meshgrid(y, x, indexing="ij")
    r = run_multislice(spec, np.stack([yy.ravel(), xx.ravel()], 1), thickness_nm, tilt_mrad,
                       detectors_mrad=list(detectors_mrad), **kw)
    sig = r["signals"].reshape(ny, nx, len(r["thickness_nm"]), -1).transpose(3, 2, 0, 1)
    return xr.DataArray(sig, dims=("detector", "thickness_nm", "y_A", "x_A"),
                        coords={"detector": [f"{lo:g}-{hi:g} mrad" for lo, hi in detectors_mrad],
                                "thickness_nm": r["thickness_nm"], "y_A": y, "x_A": x},
                        attrs=_attrs(spec, tilt_mrad, r["seconds"]), name="image")


def _attrs(spec: MultisliceSpec, tilt_mrad, seconds) -> dict:
    return {
        "method": "frozen-phonon multislice (diffkit.sim.multislice), Lobato potentials, infinite projection",
        "material": spec.crystal.name, "zone_axis": spec.crystal.zone, "crystal_key": spec.crystal.key(),
        "beam_energy_kv": spec.energy_kv, "convergence_mrad": spec.convergence_mrad,
        "cells": list(spec.cells), "gpts": list(spec.gpts), "sampling_A": spec.extent_A[1] / spec.gpts[1],
        "n_phonons": spec.n_phonons, "phonon_seed": spec.phonon_seed, "scan_per_cell": spec.scan_per_cell or default_scan_per_cell(spec),
        "tilt_x_mrad": float(tilt_mrad[0]), "tilt_y_mrad": float(tilt_mrad[1]),
        "k_step_mrad": list(spec.k_step_mrad), "band_limit_mrad": spec.band_limit_mrad,
        "spec_key": spec.key(), "seconds": round(float(seconds), 2),
    }


# --- detector grids ------------------------------------------------------------------------------
def bin_weights(k_samples, n_px: int, px: float) -> np.ndarray:
    """(n_px, n_samples) weights binning uniform samples at ``k_samples`` (mrad) onto pixels of ``px`` mrad.

    Pixel edges lie at whole multiples of ``px`` (centres at ``(i - (n_px - 1) / 2) * px``, the
    Bloch library's grid). Each sample is a box of the sample spacing shared between the pixels
    it overlaps, so intensity inside the field is conserved.
    """
    k = np.asarray(k_samples, float)
    s = float(np.median(np.diff(k)))
    lo = (k - s / 2) / px + n_px / 2
    hi = (k + s / 2) / px + n_px / 2
    edges = np.arange(n_px + 1, dtype=float)
    W = np.clip(np.minimum(hi[None, :], edges[1:, None]) - np.maximum(lo[None, :], edges[:-1, None]), 0, None)
    return W / ((hi - lo)[None, :])


def to_pixel_grid(pattern, ky_mrad, kx_mrad, n_px: int, pixel_size_mrad: float) -> np.ndarray:
    """Multislice pattern(s) (..., ky, kx) on their own samples -> (..., n_px, n_px) pixels of ``pixel_size_mrad``.

    Conservative binning; the result is on the same grid as a Bloch library with that pixel size.
    """
    Wy = bin_weights(ky_mrad, n_px, pixel_size_mrad)
    Wx = bin_weights(kx_mrad, n_px, pixel_size_mrad)
    return np.einsum("ib,...ba,ja->...ij", Wy, np.asarray(pattern, np.float64), Wx, optimize=True).astype(np.float32)


# --- cached tilt series ----------------------------------------------------------------------------
def default_cache_dir() -> pathlib.Path:
    from .pacbed import default_cache_dir as base

    return base() / "multislice"


def build_multislice_pacbeds(spec: MultisliceSpec, tilts_mrad, thickness_nm, cache_dir=None, progress: bool = True,
                             device=None, cancel=None):
    """PACBED thickness series for each tilt (x, y) in mrad, cached per tilt and resumable.

    Each finished tilt is written at once to ``<cache>/<spec key>/<tilt key>.npz`` (with its spec
    key inside, checked on load), so an interrupted build resumes with the next tilt. Returns an
    ``xarray.Dataset`` with ``pattern`` (tilt, thickness_nm, ky_mrad, kx_mrad) on the native grid.
    """
    import xarray as xr

    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / spec.key()
    folder.mkdir(parents=True, exist_ok=True)
    tilts = np.asarray(tilts_mrad, float).reshape(-1, 2)
    wanted = np.array(sorted(set(spec.cells_for(thickness_nm).tolist())))
    pats = []
    for tilt in tilts:
        tkey = hashlib.sha256(json.dumps([round(float(v), 6) for v in tilt] + wanted.tolist()).encode()).hexdigest()[:12]
        f = folder / f"tilt_{tkey}.npz"
        r = None
        if f.exists():
            with np.load(f, allow_pickle=False) as z:
                if str(z["spec_key"]) == spec.key() and np.array_equal(z["cells"], wanted):
                    r = {k: z[k] for k in ("patterns", "ky_mrad", "kx_mrad")}
        if r is None:
            r = run_multislice(spec, pacbed_positions(spec), wanted * spec.crystal.c / 10.0, tilt, progress=progress,
                               device=device, cancel=cancel)
            tmp = f.with_suffix(".tmp.npz")
            np.savez(tmp, patterns=r["patterns"], ky_mrad=r["ky_mrad"], kx_mrad=r["kx_mrad"], cells=wanted,
                     spec_key=spec.key(), seconds=r["seconds"])
            tmp.replace(f)
        pats.append(r["patterns"])
        ky, kx = r["ky_mrad"], r["kx_mrad"]
    ds = xr.Dataset({"pattern": (("tilt", "thickness_nm", "ky_mrad", "kx_mrad"), np.stack(pats))},
                    coords={"tilt_x_mrad": ("tilt", tilts[:, 0]), "tilt_y_mrad": ("tilt", tilts[:, 1]),
                            "thickness_nm": wanted * spec.crystal.c / 10.0, "ky_mrad": ky, "kx_mrad": kx},
                    attrs={**_attrs(spec, (0.0, 0.0), 0.0), "format": LIBRARY_FORMAT})
    for k in ("tilt_x_mrad", "tilt_y_mrad", "seconds"):
        ds.attrs.pop(k, None)
    return ds
