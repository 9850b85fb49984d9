"""Simulated 4D-STEM demo scans with ground truth.

Each probe position's CBED is the *coherent* sum of the Bloch-wave beam amplitudes of the
aperture's partial waves, with the phase ``exp(2 pi i g . r0)`` of the probe position
``r0`` inside the unit cell. The scan step is chosen as ``a (k + 1/n)`` so that any n x n
block of positions visits an n x n grid of probe positions in the cell: averaging such a
window cancels every cross term between beams closer than n reciprocal-lattice vectors,
and gives exactly a PACBED, as on a real microscope.

The specimen is a wedge (thickness varying linearly along x) with a bowl-shaped local tilt
(the tilt vector grows linearly from the bowl centre), as in seed 000, Fig. 9.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .bloch import BlochSolver
from .crystals import srtio3_001
from .detector import DetectorParams, apply_detector
from .pacbed import LibrarySpec, _output_beams, _pixel_fine_coords, _tds_profile, aperture_points
from .tds import absorption_ratio


@dataclasses.dataclass
class DemoScanSpec:
    """Parameters of a simulated SrTiO3 wedge scan (units in the names)."""

    convergence_mrad: float = 13.6
    energy_kv: float = 200.0
    scan_shape: tuple = (40, 40)
    window: int = 5
    thickness_range_nm: tuple = (25.0, 60.0)
    tilt_max_mrad: float = 3.0
    bowl_center_frac: tuple = (0.45, 0.55)
    detector_px: int = 64
    pixel_ratio: float = 1.4
    rotation_deg: float = 12.0
    center_offset_px: tuple = (2.3, -1.7)
    blur_px: float = 0.7
    dose_per_frame: float = 2e5
    inelastic_background_per_nm: float = 0.003
    g_max: float = 2.5
    seed: int = 7


def _complex_render(spec: LibrarySpec, tau, lookup, q_origin, beam_hk, r_ap):
    """Rows, q-index and beam-index triplets that place beam amplitudes on pattern pixels."""
    m = spec.steps_per_g
    kc = _pixel_fine_coords(spec.n_px)
    ky, kx = np.meshgrid(kc, kc, indexing="ij")
    kyx = np.stack([ky.ravel(), kx.ravel()], axis=1)
    g = np.stack([beam_hk[:, 1] * m, beam_hk[:, 0] * m], axis=1)
    rows, qs, bs = [], [], []
    for b in range(len(beam_hk)):
        p = kyx - g[b]
        inside = np.hypot(p[:, 0], p[:, 1]) < r_ap
        if not inside.any():
            continue
        q = p[inside] + np.asarray(tau)[::-1]
        rows.append(np.nonzero(inside)[0])
        qs.append(lookup[q[:, 0] - q_origin[0], q[:, 1] - q_origin[1]])
        bs.append(np.full(inside.sum(), b))
    return np.concatenate(rows), np.concatenate(qs), np.concatenate(bs)


def simulate_demo_scan(spec: DemoScanSpec | None = None, progress: bool = True):
    """Simulate a wedge scan. Returns ``(frames uint16 (Y, X, D, D), truth dict, calibration dict)``."""
    import dask
    from tqdm.auto import tqdm

    s = spec or DemoScanSpec()
    t0 = time.perf_counter()
    crystal = srtio3_001()
    lspec = LibrarySpec(crystal=crystal, energy_kv=s.energy_kv, convergence_mrad=s.convergence_mrad,
                        thickness_nm=(10.0,), tilt_max_mrad=s.tilt_max_mrad, g_max=s.g_max)
    dq = lspec.fine_step_mrad
    Y, X = s.scan_shape
    yy, xx = np.meshgrid(np.arange(Y), np.arange(X), indexing="ij")
    # wedge along x, quantised to the 0.5 nm library grid
    t_map = s.thickness_range_nm[0] + (s.thickness_range_nm[1] - s.thickness_range_nm[0]) * xx / max(X - 1, 1)
    t_map = np.round(t_map * 2) / 2
    cy, cx = s.bowl_center_frac[0] * (Y - 1), s.bowl_center_frac[1] * (X - 1)
    rmax = np.hypot(max(cy, Y - 1 - cy), max(cx, X - 1 - cx))
    tilt_x = s.tilt_max_mrad * (xx - cx) / rmax
    tilt_y = s.tilt_max_mrad * (yy - cy) / rmax
    itx, ity = np.round(tilt_x / dq).astype(int), np.round(tilt_y / dq).astype(int)
    tilt_x, tilt_y = itx * dq, ity * dq
    thick = np.unique(t_map)
    solver = BlochSolver(crystal, s.energy_kv, g_max=s.g_max, absorption=0.0)
    solver.absorption = absorption_ratio(crystal, s.energy_kv, float(solver.U[0, 0].real))
    beams = _output_beams(lspec, solver)
    P = aperture_points(lspec)
    r_ap = s.convergence_mrad / dq
    taus = np.unique(np.stack([itx.ravel(), ity.ravel()], 1), axis=0)
    Q = np.unique((P[:, None, :] + taus[None, :, ::-1]).reshape(-1, 2), axis=0)
    q_origin = Q.min(0)
    lookup = -np.ones(tuple(Q.max(0) - q_origin + 1), dtype=np.int64)
    lookup[Q[:, 0] - q_origin[0], Q[:, 1] - q_origin[1]] = np.arange(len(Q))
    q_mrad = Q[:, ::-1] * dq
    chunk = 256
    nq, nb, nt = len(Q), len(beams), len(thick)
    amp = np.empty((nq, nb, nt), np.complex64)
    trans = np.empty((nq, nt), np.float32)

    def solve(ci):
        sl = slice(ci * chunk, min(nq, (ci + 1) * chunk))
        a = solver.amplitudes(q_mrad[sl], thick)
        amp[sl] = a[:, beams]
        trans[sl] = (np.abs(a) ** 2).sum(1)
        return ci

    tasks = [dask.delayed(solve)(ci) for ci in range(int(np.ceil(nq / chunk)))]
    if progress:
        print(f"demo scan: {nq} incident directions x {solver.n_beams} beams, {nt} thicknesses")
    dask.compute(*tasks, scheduler="threads")
    # probe positions inside the unit cell: step = a (k + 1/n)
    n = s.window
    frac_y = (yy % n) / n
    frac_x = (xx % n) / n
    hk = solver.hk[beams]
    tds = _tds_profile(lspec, P).ravel()
    n_pix = lspec.n_px**2
    frames = np.empty((Y, X, lspec.n_px, lspec.n_px), np.float32)
    cache = {}
    it = range(Y * X)
    for i in tqdm(it, desc="CBED per probe position", disable=not progress):
        y, x = divmod(i, X)
        tau = (itx[y, x], ity[y, x])
        if tau not in cache:
            cache[tau] = _complex_render(lspec, tau, lookup, q_origin, hk, r_ap)
        rows, qs, bs = cache[tau]
        ti = int(np.searchsorted(thick, t_map[y, x]))
        # g . r0 with g = (h/a, k/b) and r0 = (frac_x a, frac_y b)
        phase = np.exp(2j * np.pi * (hk[:, 0] * frac_x[y, x] + hk[:, 1] * frac_y[y, x]))
        vals = amp[qs, bs, ti] * phase[bs]
        A = np.bincount(rows, weights=vals.real, minlength=n_pix) + 1j * np.bincount(rows, weights=vals.imag, minlength=n_pix)
        inten = np.abs(A) ** 2 / len(P)
        qi = lookup[P[:, 0] + tau[1] - q_origin[0], P[:, 1] + tau[0] - q_origin[1]]
        absorbed = 1.0 - trans[qi, ti].mean()
        frames[y, x] = (inten + absorbed * tds).reshape(lspec.n_px, lspec.n_px)
    # detector: fixed geometry, inelastic background growing with thickness, Poisson noise
    B = Y * X
    p = DetectorParams.identity(B)
    p.dose[:] = s.dose_per_frame
    p.background[:] = s.inelastic_background_per_nm * t_map.ravel()
    p.blur_px[:] = s.blur_px
    p.rotation_deg[:] = s.rotation_deg
    p.shift_px[:] = s.center_offset_px
    import torch

    gen = torch.Generator().manual_seed(s.seed)
    det = []
    for a in range(0, B, 256):
        det.append(apply_detector(frames.reshape(B, lspec.n_px, lspec.n_px)[a:a + 256], p.subset(slice(a, a + 256)),
                                  out_px=s.detector_px, pixel_ratio=s.pixel_ratio, generator=gen).numpy())
    det = np.concatenate(det).reshape(Y, X, s.detector_px, s.detector_px)
    det = np.clip(np.round(det), 0, 65535).astype(np.uint16)
    step_nm = crystal.a / 10 * (5 + 1.0 / n)
    truth = {
        "thickness_nm": t_map.astype(np.float32), "tilt_x_mrad": tilt_x.astype(np.float32),
        "tilt_y_mrad": tilt_y.astype(np.float32),
        "tilt_magnitude_mrad": np.hypot(tilt_x, tilt_y).astype(np.float32),
        "tilt_azimuth_deg": (np.rad2deg(np.arctan2(tilt_y, tilt_x)) % 360).astype(np.float32),
    }
    calibration = {
        "beam_energy_kv": s.energy_kv, "convergence_mrad": s.convergence_mrad,
        "pixel_size_mrad": lspec.pixel_size_mrad * s.pixel_ratio, "scan_step_nm": step_nm,
        "material": "SrTiO3", "zone_axis": "001",
    }
    meta = dataclasses.asdict(s)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["detector_rotation_deg_note"] = "patterns are rotated by rotation_deg on the detector; tilt truth is in the crystal frame"
    return det, truth, calibration, meta


def write_demo_scan(path, spec: DemoScanSpec | None = None, progress: bool = True):
    """Simulate and write a demo scan in diffkit's zarr layout (with ``truth/*`` maps)."""
    import dask.array as da

    from ..calibration import Calibration
    from ..data import FourDSTEM
    from ..io import save_zarr
    import xarray as xr

    det, truth, cal, meta = simulate_demo_scan(spec, progress=progress)
    units = {"thickness_nm": "nm", "tilt_x_mrad": "mrad", "tilt_y_mrad": "mrad", "tilt_magnitude_mrad": "mrad",
             "tilt_azimuth_deg": "degree"}
    tds = xr.Dataset({k: (("scan_y", "scan_x"), v, {"units": units[k]}) for k, v in truth.items()})
    ds = FourDSTEM(da.from_array(det, chunks=(8, -1, -1, -1)), calibration=Calibration(**cal),
                   source=f"simulated demo scan ({meta['convergence_mrad']} mrad)", truth=tds,
                   attrs={"simulation": meta})
    save_zarr(ds, path, overwrite=True)
    return path
