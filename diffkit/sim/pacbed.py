"""PACBED pattern libraries from Bloch-wave solutions.

A PACBED pattern is the incoherent sum, over the partial waves ``p`` of the probe
aperture (|p| < alpha), of the diffracted intensities: beam ``g`` of partial wave ``p``
lands on the detector at ``k = p + g``; cross terms between beams vanish when the probe
is averaged over a unit cell. A specimen tilt ``tau`` changes the incident direction
in the crystal frame to ``q = p + tau`` while the aperture stays centred on the optic
axis. The detector sampling is chosen commensurate with the reciprocal lattice
(``g`` an even number of fine steps ``dq``) and tilts are whole fine steps, so one Bloch
solve per crystal-frame direction ``q`` serves every tilt and every thickness exactly,
with no interpolation. Thermal diffuse scattering is added in the Einstein model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time

import numpy as np
import scipy.sparse as sp

from .bloch import BlochSolver
from .crystals import ZoneCrystal, srtio3_001
from .tds import absorption_ratio, tds_kernel

LIBRARY_FORMAT = "diffkit-pacbed-library-v1"


def default_cache_dir() -> pathlib.Path:
    """Cache folder for simulation libraries: ``$DIFFKIT_CACHE`` or ``~/.cache/diffkit``."""
    return pathlib.Path(os.environ.get("DIFFKIT_CACHE", pathlib.Path.home() / ".cache" / "diffkit"))


@dataclasses.dataclass(frozen=True)
class LibrarySpec:
    """Everything that defines a PACBED library (its cache key is a hash of this).

    Parameters
    ----------
    crystal : ZoneCrystal
        Structure seen down the zone axis (square projected cell).
    energy_kv : float
        Beam energy (kV).
    convergence_mrad : float
        Probe convergence semi-angle alpha (mrad).
    thickness_nm : tuple of float
        Thicknesses (nm).
    tilt_max_mrad : float
        Tilts from 0 to at least this value (mrad) along x and y, with tilt_x >= tilt_y >= 0
        (the other octants follow from the 4mm symmetry of the zone).
    n_px : int
        Pattern size (px); even.
    field_alpha : float
        Half-width of the pattern in units of alpha (the zero-order disk diameter is
        ``1 / field_alpha`` of the width).
    g_max : float
        Beams up to |g| (1/Å).
    tds : bool
        Model thermal diffuse scattering: the elastic wave is absorbed at the TDS rate
        and the absorbed intensity is added back as the diffuse background. ``False``
        gives a purely elastic, absorption-free calculation.
    """

    crystal: ZoneCrystal = dataclasses.field(default_factory=srtio3_001)
    energy_kv: float = 200.0
    convergence_mrad: float = 13.6
    thickness_nm: tuple = tuple(np.round(np.arange(1.0, 120.01, 0.5), 3))
    tilt_max_mrad: float = 4.0
    n_px: int = 96
    field_alpha: float = 2.0
    g_max: float = 2.5
    tds: bool = True

    def __post_init__(self):
        if self.n_px % 2:
            raise ValueError("n_px must be even")
        if abs(self.crystal.a - self.crystal.b) > 1e-9:
            raise ValueError("PACBED libraries need a square projected cell (a == b)")
        object.__setattr__(self, "thickness_nm", tuple(float(t) for t in self.thickness_nm))

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d["crystal"] = self.crystal.key()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- sampling -------------------------------------------------------------------------
    @property
    def reciprocal_mrad(self) -> float:
        """Deflection of the (100) beam in mrad."""
        from .scattering import wavelength_angstrom

        return wavelength_angstrom(self.energy_kv) / self.crystal.a * 1e3

    @property
    def steps_per_g(self) -> int:
        """Fine steps ``dq`` per reciprocal-lattice vector (even)."""
        dq_target = self.field_alpha * self.convergence_mrad / self.n_px
        return max(2, 2 * int(round(self.reciprocal_mrad / dq_target / 2)))

    @property
    def fine_step_mrad(self) -> float:
        """Fine step dq (mrad): tilt-grid spacing."""
        return self.reciprocal_mrad / self.steps_per_g

    @property
    def pixel_size_mrad(self) -> float:
        """Pattern pixel size (mrad/px) = 2 dq."""
        return 2 * self.fine_step_mrad

    @property
    def disk_radius_px(self) -> float:
        """Zero-order disk radius in pattern pixels."""
        return self.convergence_mrad / self.pixel_size_mrad

    def tilt_indices(self) -> np.ndarray:
        """(n_tilt, 2) integer tilt indices (ix >= iy >= 0), tilt = index * dq."""
        n = int(np.ceil(self.tilt_max_mrad / self.fine_step_mrad - 1e-9))
        return np.array([(i, j) for i in range(n + 1) for j in range(i + 1)], dtype=int)


def _pixel_fine_coords(n_px: int) -> np.ndarray:
    """Fine-grid coordinates (odd integers) of pattern pixel centres, shape (n_px,)."""
    return 2 * np.arange(n_px) - (n_px - 1)


def aperture_points(spec: LibrarySpec) -> np.ndarray:
    """Partial-wave directions p (fine-grid integer coords, odd) inside the aperture, (P, 2)."""
    r = spec.convergence_mrad / spec.fine_step_mrad
    n = int(np.ceil(r)) + 2
    c = np.arange(-n, n + 1)
    c = c[c % 2 != 0]
    py, px = np.meshgrid(c, c, indexing="ij")
    keep = np.hypot(py, px) < r
    return np.stack([py[keep], px[keep]], axis=1)


def _output_beams(spec: LibrarySpec, solver: BlochSolver) -> np.ndarray:
    half = spec.n_px * spec.pixel_size_mrad / 2 * np.sqrt(2)
    gm = np.hypot(solver.g_mrad[:, 0], solver.g_mrad[:, 1])
    return np.nonzero(gm < half + spec.convergence_mrad + spec.pixel_size_mrad)[0]


def _render_matrix(spec, tilt_idx, q_lookup, q_origin, beam_hk, P_set_r):
    """Sparse (n_px^2, n_q * n_beams) matrix summing beam intensities into pattern pixels."""
    m = spec.steps_per_g
    kc = _pixel_fine_coords(spec.n_px)
    ky, kx = np.meshgrid(kc, kc, indexing="ij")
    kyx = np.stack([ky.ravel(), kx.ravel()], axis=1)  # (npix, 2)
    # beam index order in the library: (h, k) -> (x, y) deflection; we use y <- k, x <- h
    g = np.stack([beam_hk[:, 1] * m, beam_hk[:, 0] * m], axis=1)
    rows, cols = [], []
    nb = len(beam_hk)
    for b in range(nb):
        p = kyx - g[b]
        inside = np.hypot(p[:, 0], p[:, 1]) < P_set_r
        if not inside.any():
            continue
        q = p[inside] + np.asarray(tilt_idx)[::-1]  # tilt index (ix, iy) -> (y, x) order
        qi = q_lookup[q[:, 0] - q_origin[0], q[:, 1] - q_origin[1]]
        assert (qi >= 0).all()
        rows.append(np.nonzero(inside)[0])
        cols.append(qi * nb + b)
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    return rows, cols


def _tds_profile(spec: LibrarySpec, P: np.ndarray) -> np.ndarray:
    """Aperture-convolved Einstein TDS distribution on the pattern grid, per unit absorbed intensity."""
    from .scattering import wavelength_angstrom

    lam = wavelength_angstrom(spec.energy_kv)
    big = 8 * spec.n_px  # wide grid so that the normalisation covers the whole detector plane
    c = (np.arange(big) - big // 2) * spec.pixel_size_mrad
    ky, kx = np.meshgrid(c, c, indexing="ij")
    q = np.hypot(ky, kx) * 1e-3 / lam  # 1/Å
    D = tds_kernel(spec.crystal, spec.energy_kv, q)
    D /= D.sum()
    ap = (np.hypot(ky, kx) < spec.convergence_mrad).astype(float)
    ap /= ap.sum()
    conv = np.real(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(D)) * np.fft.fft2(np.fft.ifftshift(ap))))
    conv = np.fft.fftshift(conv)
    # pattern pixel centres sit at half-pixel positions: average the 2x2 neighbourhood
    s = big // 2 - spec.n_px // 2
    crop = conv[s - 1 : s + spec.n_px + 1, s - 1 : s + spec.n_px + 1]
    crop = 0.25 * (crop[:-1, :-1] + crop[1:, :-1] + crop[:-1, 1:] + crop[1:, 1:])
    return crop[1:, 1:].astype(np.float32)


def build_pacbed_library(spec: LibrarySpec | None = None, cache_dir=None, progress: bool = True,
                         chunk_size: int = 256, scheduler: str = "threads", overwrite: bool = False):
    """Simulate (or load from cache) a PACBED library as an ``xarray.Dataset``.

    Returns a Dataset with ``pattern`` (tilt, thickness_nm, ky, kx), float32, each pattern
    normalised to unit incident intensity (elastic + TDS; intensity outside the field of
    view is lost as on a real detector), with coords ``tilt_x_mrad``, ``tilt_y_mrad``
    (per tilt), ``thickness_nm``, ``ky_mrad``, ``kx_mrad`` and every parameter in attrs.

    The expensive step (one Bloch solve per crystal-frame incident direction) runs as
    dask tasks over chunks of directions; each finished chunk is written to a zarr cache
    at once, so an interrupted build resumes where it stopped.

    Examples
    --------
    >>> spec = LibrarySpec(thickness_nm=(10, 20), tilt_max_mrad=0.5, n_px=32, g_max=1.2)
    >>> lib = build_pacbed_library(spec, progress=False)  # doctest: +SKIP
    """
    import dask
    import xarray as xr
    import zarr

    spec = spec or LibrarySpec()
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir() / "pacbed"
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{spec.crystal.name}_{spec.crystal.zone}_{spec.energy_kv:g}kV_{spec.convergence_mrad:g}mrad_{spec.key()}.zarr"
    if final.exists() and not overwrite:
        ds = xr.open_zarr(final)
        if ds.attrs.get("complete"):
            return ds
    t_start = time.perf_counter()
    solver = BlochSolver(spec.crystal, spec.energy_kv, g_max=spec.g_max, absorption=0.0)
    kappa = absorption_ratio(spec.crystal, spec.energy_kv, float(solver.U[0, 0].real)) if spec.tds else 0.0
    solver.absorption = kappa
    beams = _output_beams(spec, solver)
    P = aperture_points(spec)
    r_ap = spec.convergence_mrad / spec.fine_step_mrad
    tilts = spec.tilt_indices()
    # every crystal-frame direction needed: q = p + tau  (tau given as (ix, iy) -> (y, x) = (iy, ix))
    Q = np.unique((P[:, None, :] + tilts[None, :, ::-1]).reshape(-1, 2), axis=0)
    q_origin = Q.min(axis=0)
    lookup = -np.ones(tuple(Q.max(axis=0) - q_origin + 1), dtype=np.int64)
    lookup[Q[:, 0] - q_origin[0], Q[:, 1] - q_origin[1]] = np.arange(len(Q))
    thick = np.asarray(spec.thickness_nm)
    nq, nb, nt = len(Q), len(beams), len(thick)

    work = cache / (final.name + ".partial")
    root = zarr.open_group(str(work), mode="a")
    if "intensity" not in root or root["intensity"].shape != (nq, nb, nt):
        root.create_array("intensity", shape=(nq, nb, nt), chunks=(chunk_size, nb, nt), dtype="float32", overwrite=True)
        root.create_array("transmitted", shape=(nq, nt), chunks=(chunk_size, nt), dtype="float32", overwrite=True)
        root.create_array("done", shape=(int(np.ceil(nq / chunk_size)),), chunks=(1024,), dtype="bool", overwrite=True, fill_value=False)
    done = root["done"][:]

    # q in mrad, (x, y) order for the solver: fine coords (y, x)
    q_mrad = Q[:, ::-1].astype(float) * spec.fine_step_mrad

    def solve_chunk(ci):
        s = slice(ci * chunk_size, min((ci + 1) * chunk_size, nq))
        amp = solver.amplitudes(q_mrad[s], thick, beams=None)
        inten = amp.real**2 + amp.imag**2
        root["intensity"][s] = inten[:, beams, :].astype(np.float32)
        root["transmitted"][s] = inten.sum(axis=1).astype(np.float32)
        root["done"][ci] = True
        return ci

    todo = [ci for ci in range(len(done)) if not done[ci]]
    if todo:
        tasks = [dask.delayed(solve_chunk)(ci) for ci in todo]
        if progress:
            from tqdm.auto import tqdm
            from dask.callbacks import Callback

            bar = tqdm(total=len(tasks), desc=f"Bloch solves ({nq} directions, {solver.n_beams} beams)", unit="chunk")

            class _CB(Callback):
                def _posttask(self, key, result, dsk, state, id):
                    if isinstance(key, tuple) or str(key).startswith("solve_chunk"):
                        bar.update(1)

            with _CB():
                dask.compute(*tasks, scheduler=scheduler)
            bar.close()
        else:
            dask.compute(*tasks, scheduler=scheduler)
    t_solve = time.perf_counter() - t_start

    intensity = root["intensity"][:].reshape(nq * nb, nt)
    transmitted = root["transmitted"][:]
    n_ap = len(P)
    tds_prof = _tds_profile(spec, P) if spec.tds else None
    patterns = np.empty((len(tilts), nt, spec.n_px, spec.n_px), dtype=np.float32)
    for i, tau in enumerate(tilts):
        rows, cols = _render_matrix(spec, tau, lookup, q_origin, solver.hk[beams], r_ap)
        S = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(spec.n_px**2, nq * nb))
        pat = (S @ intensity).T / n_ap  # (nt, npix)
        if spec.tds:
            qi = lookup[P[:, 0] + tau[1] - q_origin[0], P[:, 1] + tau[0] - q_origin[1]]
            absorbed = 1.0 - transmitted[qi].mean(axis=0)  # (nt,)
            pat += absorbed[:, None] * tds_prof.ravel()[None, :]
        patterns[i] = pat.reshape(nt, spec.n_px, spec.n_px)

    coords_k = (np.arange(spec.n_px) - (spec.n_px - 1) / 2) * spec.pixel_size_mrad
    attrs = {
        "format": LIBRARY_FORMAT,
        "material": spec.crystal.name,
        "zone_axis": spec.crystal.zone,
        "crystal_key": spec.crystal.key(),
        "beam_energy_kv": spec.energy_kv,
        "convergence_mrad": spec.convergence_mrad,
        "pixel_size_mrad": spec.pixel_size_mrad,
        "disk_radius_px": spec.disk_radius_px,
        "fine_step_mrad": spec.fine_step_mrad,
        "g_max_inv_A": spec.g_max,
        "n_beams": int(solver.n_beams),
        "n_directions": int(nq),
        "absorption_ratio": kappa,
        "tds": bool(spec.tds),
        "spec_key": spec.key(),
        "solve_seconds": round(t_solve, 1),
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "method": "Bloch-wave ZOLZ, first-order absorption from Einstein-model TDS, Lobato scattering factors",
    }
    ds = xr.Dataset(
        {"pattern": (("tilt", "thickness_nm", "ky", "kx"), patterns)},
        coords={
            "tilt_x_mrad": ("tilt", tilts[:, 0] * spec.fine_step_mrad),
            "tilt_y_mrad": ("tilt", tilts[:, 1] * spec.fine_step_mrad),
            "thickness_nm": thick,
            "ky_mrad": ("ky", coords_k),
            "kx_mrad": ("kx", coords_k),
        },
        attrs=attrs,
    )
    ds["pattern"].attrs.update(units="fraction of incident intensity per pixel")
    ds.to_zarr(final, mode="w")
    zarr.open_group(str(final), mode="a").attrs["complete"] = True
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return xr.open_zarr(final)
