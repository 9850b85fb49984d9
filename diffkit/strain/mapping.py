"""Strain maps over a whole scan: dask chunks, zarr incremental output, resume, progress.

:func:`map_strain` runs disk detection and a lattice fit on blocks of scan rows, writes
each block's lattice vectors into a zarr group as soon as it is done (with a done-marker
per block, so an interrupted run resumes where it stopped), and finally computes the strain
relative to the median lattice of a reference region (exact definition, see
:mod:`diffkit.strain.lattice`).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

from ..errors import BadInputError
from .lattice import (STATUS, fit_lattice, lattice_guess_autocorrelation, reference_lattice, region_mask,
                      strain_from_lattice)

FORMAT = "diffkit-strain-map-v2"
_FIELDS = {  # name: (dtype, fill)
    "g1x": ("f8", np.nan), "g1y": ("f8", np.nan), "g2x": ("f8", np.nan), "g2y": ("f8", np.nan),
    "origin_x": ("f8", np.nan), "origin_y": ("f8", np.nan), "residual_px": ("f4", np.nan),
    "n_disks": ("i2", 0), "status": ("i1", 5),
    # by-products of refine="model" (NaN otherwise)
    "thickness_nm": ("f4", np.nan), "tilt_x_mrad": ("f4", np.nan), "tilt_y_mrad": ("f4", np.nan),
    "chi2_per_px": ("f4", np.nan),
}
REFINE = ("cnn", "fit", "model", None)


def _unwrap(data, calibration):
    """(dask array (sy, sx, dy, dx), Calibration or None, attrs) from FourDSTEM, dask or numpy input."""
    import dask.array as da

    cal = calibration
    arr = getattr(data, "data", None)
    if arr is not None and hasattr(data, "calibration"):
        cal = cal if cal is not None else data.calibration
        a = arr
    else:
        a = data
    if not isinstance(a, da.Array):
        a = np.asarray(a)
        a = da.from_array(a, chunks=(max(1, 256 // max(a.shape[1], 1)),) + a.shape[1:] if a.ndim == 4 else a.shape)
    if a.ndim != 4:
        raise BadInputError(f"expected a 4D-STEM array (scan_y, scan_x, det_y, det_x), got shape {a.shape}")
    return a, cal


def _saturation_value(data, arr) -> float | None:
    """Saturation level (counts): the data's ``saturation_value``, else the integer dtype's maximum."""
    sat = getattr(data, "saturation_value", None)
    if sat is None and np.dtype(arr.dtype).kind in "iu":
        sat = float(np.iinfo(arr.dtype).max)
    return None if sat is None else float(sat)


def _saturated(patterns: np.ndarray, sat: float | None) -> np.ndarray:
    """(B,) bool: more than 1 % of a pattern's pixels at or above ``sat`` (as the PACBED maps count it)."""
    from ..data import SATURATED_FRACTION

    p = np.asarray(patterns)
    if sat is None or p.size == 0:
        return np.zeros(len(p), bool)
    with np.errstate(invalid="ignore"):
        n = (p >= sat).reshape(len(p), -1).sum(1)
    return n > SATURATED_FRACTION * p[0].size


#: status codes of a strain map: those of the lattice fit plus the frames masked before it
MAP_STATUS = {**STATUS, 6: "saturated (more than 1 % of pixels at the saturation value)"}


def _mask_saturated(res: dict, patterns: np.ndarray, sat: float | None) -> dict:
    """Saturated frames get status 6 and NaN lattice values (a clipped disk biases its centre)."""
    bad = _saturated(patterns, sat)
    if bad.any():
        for k, v in res.items():
            if k == "status":
                v[bad] = 6
            elif k == "n_disks":
                v[bad] = 0
            elif np.issubdtype(np.asarray(v).dtype, np.floating):
                v[bad] = np.nan
    return res


def mean_pattern(arr, max_patterns: int = 256, region=None, scheduler=None, saturation_value=None) -> np.ndarray:
    """Mean of up to ``max_patterns`` finite, non-empty, unsaturated patterns spread over the scan
    (or a region); one saturated or blank frame never decides the lattice guess."""
    sy, sx = arr.shape[:2]
    m = region_mask(region, (sy, sx)) if region is not None else np.ones((sy, sx), bool)
    ys, xs = np.nonzero(m)
    sel = np.linspace(0, len(ys) - 1, min(max_patterns, len(ys))).round().astype(int)
    import dask.array as da

    stack = da.stack([arr[ys[i], xs[i]] for i in sel]).compute(scheduler=scheduler).astype(np.float64)
    ok = np.all(np.isfinite(stack), axis=(1, 2)) & (stack.max(axis=(1, 2)) > 0)
    ok &= ~_saturated(stack, saturation_value)
    if ok.sum() >= 4:  # frames far brighter than the rest (e.g. a detector glitch) would dominate the mean
        tot = stack.sum(axis=(1, 2))
        ok &= tot <= 20 * np.median(tot[ok])
    if not ok.any():
        raise BadInputError("no finite, non-empty pattern found for the lattice guess")
    return stack[ok].mean(0)


def lattice_guess(patterns_or_mean, calibration=None, models=None, min_intensity_frac: float = 0.002):
    """Global lattice guess of a scan: ``(G (2, 2) px, origin (2,), hk (K, 2))``.

    The mean pattern's Wiener-Khinchin autocorrelation gives the lattice vectors (robust to the
    disk intensities), the anchor-free detector + sub-image CNN give the disks of the mean
    pattern, and a weighted lattice fit of those disks refines vectors and origin (the origin
    is the brightest disk, normally the undiffracted beam). ``hk`` lists the indexed disks
    whose sub-image lies on the detector and that carry at least ``min_intensity_frac`` of
    the summed disk intensity.
    """
    from .detect import detect_disks

    mp = np.asarray(patterns_or_mean, float)
    if mp.ndim == 3:
        mp = mp.mean(0)
    r = None
    if calibration is not None and calibration.convergence_mrad and calibration.pixel_size_mrad:
        r = calibration.convergence_mrad / calibration.pixel_size_mrad
    det = detect_disks(mp[None].astype(np.float32), calibration, models=models)
    if det.status[0] != 0 or det.valid[0].sum() < 3:
        raise BadInputError("could not find the disk lattice in the mean pattern (fewer than 3 disks)")
    d = det.pattern(0)
    rad = float(np.nanmedian(d["radius_px"])) if r is None else r
    try:
        G = lattice_guess_autocorrelation(mp, min_spacing_px=max(4.0, 1.6 * rad))
    except BadInputError:
        G = _basis_from_points(d["positions"], d["intensity"])
    o = d["positions"][np.argmax(d["intensity"])]
    w = d["intensity"]
    fit = fit_lattice(d["positions"], w, ~d["edge"], G_guess=G, origin_guess=o)
    if fit.status != 0:
        G = _basis_from_points(d["positions"], d["intensity"])
        fit = fit_lattice(d["positions"], w, ~d["edge"], G_guess=G, origin_guess=o)
        if fit.status != 0:
            raise BadInputError(f"lattice fit of the mean pattern failed: {STATUS[int(fit.status)]}")
    use = fit.used & ~d["edge"] & (d["intensity"] >= min_intensity_frac * d["intensity"][fit.used].sum())
    hk = fit.hk[use]
    return fit.G, fit.origin, hk


def _basis_from_points(pos, w=None):
    """Reduced basis from a set of disk positions: shortest difference vectors (fallback guess)."""
    from .lattice import reduce_basis

    p = np.asarray(pos, float)
    if len(p) < 3:
        raise BadInputError("need at least 3 disks to find a lattice")
    o = p[np.argmax(w)] if w is not None else p[0]
    d = p - o
    d = d[np.linalg.norm(d, axis=1) > 1e-6]
    d = d[np.argsort(np.linalg.norm(d, axis=1))]
    g1 = d[0]
    for v in d[1:]:
        if abs(g1[0] * v[1] - g1[1] * v[0]) > 0.3 * np.linalg.norm(g1) * np.linalg.norm(v):
            return reduce_basis(np.stack([g1, v], 1))
    raise BadInputError("disk positions lie on one line; no 2D lattice")


def process_patterns(patterns, guess, calibration=None, method: str = "anchor-free", models=None,
                     fallback: bool = True, weights: str = "auto", refine="cnn", model_fit=None):
    """Detect disks and fit the lattice of a batch of patterns (B, H, W) against ``guess = (G, origin, hk)``.

    ``refine="model"`` needs ``model_fit = (table, match)`` (see :mod:`diffkit.strain.modelfit`):
    the network + lattice-fit result is then refined by fitting each pattern with its simulated
    disks.

    Returns a dict of per-pattern arrays: ``G (B, 2, 2)``, ``origin (B, 2)``, ``residual_px``,
    ``n_disks``, ``status`` (codes of :data:`diffkit.strain.lattice.STATUS`), and with
    ``refine="model"`` also ``thickness_nm``, ``tilt_mrad (B, 2)`` and ``chi2_per_px``.
    """
    from .detect import detect_disks

    G0, o0, hk = guess
    if refine == "model":
        if model_fit is None:
            raise BadInputError("refine='model' needs model_fit=(table, match)")
        fit = process_patterns(patterns, guess, calibration, method, models, fallback, weights, "cnn")
        return _model_refine(patterns, fit, model_fit, calibration, getattr(models, "device", None))
    det = detect_disks(patterns, calibration, method=method, lattice=(G0, o0, hk), models=models, refine=refine)
    H, W = np.shape(patterns)[-2:]
    fit = _fit(det, G0, o0, weights)
    if method == "subimage-cnn" and fallback:
        redo = np.nonzero((fit["status"] != 0) & (det.status != 2))[0]
        if len(redo):
            det2 = detect_disks(np.asarray(patterns)[redo], calibration, method="anchor-free", models=models,
                                refine=refine)
            f2 = _fit(det2, G0, o0, weights)
            for k in fit:
                fit[k][redo] = f2[k]
    fit["status"] = np.where(det.status == 2, 2, fit["status"])
    return fit


def prepare_model_fit(table, arr, ref_mask, guess, cal, models, scheduler=None):
    """``(table, match)`` for ``refine="model"``: the crystal table related to the scan's lattice.

    The model's unstrained crystal is the lattice of the reference region's mean pattern
    (``arr`` (scan_y, scan_x, H, W), ``ref_mask`` None = the whole scan), and its undiffracted
    beam that pattern's brightest lattice point.
    """
    from .modelfit import match_table

    G_ref, shift = _reference_guess(arr, ref_mask, guess, cal, models, scheduler)
    return table, match_table(table, G_ref, guess[2], cal.pixel_size_mrad, origin_shift=shift)


def _reference_guess(arr, ref_mask, guess, cal, models, scheduler=None):
    """Lattice (columns px, basis of ``guess``) of the mean pattern of the reference region, and the
    index of its brightest disk (taken as the undiffracted beam)."""
    from .detect import _radius_and_binning

    mp = mean_pattern(arr, region=ref_mask, scheduler=scheduler)
    f = process_patterns(mp[None].astype(np.float32), guess, cal, "subimage-cnn", models)
    G = f["G"][0] if f["status"][0] == 0 else np.asarray(guess[0], float)
    o = f["origin"][0] if f["status"][0] == 0 else np.asarray(guess[1], float)
    # lattice points on the detector (the detector may have missed the 000 disk itself)
    r = _radius_and_binning(cal, None)[0] or 5.0
    n = np.array([(h, k) for h in range(-4, 5) for k in range(-4, 5)])
    p = o + n @ G.T
    H, W = mp.shape
    on = (p[:, 0] >= r) & (p[:, 0] <= W - 1 - r) & (p[:, 1] >= r) & (p[:, 1] <= H - 1 - r)
    yy, xx = np.mgrid[:H, :W]
    sums = [mp[np.hypot(xx - q[0], yy - q[1]) < r].sum() if ok else -np.inf for q, ok in zip(p, on)]
    return G, tuple(int(v) for v in n[int(np.argmax(sums))])


def _model_refine(patterns, fit, model_fit, calibration, device=None):
    from .modelfit import refine_lattice_model

    table, match = model_fit
    ok = fit["status"] == 0
    alpha = calibration.convergence_mrad if calibration is not None and calibration.convergence_mrad else None
    if alpha is None:
        raise BadInputError("refine='model' needs the convergence semi-angle in the calibration")
    G = np.where(ok[:, None, None], fit["G"], np.nan)
    o = np.where(ok[:, None], fit["origin"], np.nan)
    r = refine_lattice_model(np.asarray(patterns, np.float32), G, o, table, match, convergence_mrad=alpha,
                             device=device)
    use = ok & r["ok"]
    fit["G"] = np.where(use[:, None, None], r["G"], fit["G"])
    fit["origin"] = np.where(use[:, None], r["origin"], fit["origin"])
    fit["thickness_nm"] = np.where(use, r["thickness_nm"], np.nan)
    fit["tilt_mrad"] = np.where(use[:, None], r["tilt_mrad"], np.nan)
    fit["chi2_per_px"] = np.where(use, r["chi2_per_px"], np.nan)
    return fit


SIGMA_SYSTEMATIC_PX = 0.02
SIGMA_FLOOR_CNN_PX = 0.03


def disk_weights(det, weights: str = "noise") -> np.ndarray:
    """Lattice-fit weights of detected disks.

    ``"noise"``: inverse variance ``1 / (r^2 / 4N + 0.03^2)`` of a disk of radius r with N
    counts (shot noise, plus the sub-image CNN's systematic floor measured on held-out data);
    ``"sigma"``: inverse variance ``1 / (sigma^2 + 0.02^2)`` from the edge fit's standard error
    (disks without a fit get ``1 / 0.25^2``); ``"intensity"``: disk counts; ``"uniform"``: 1.
    """
    if weights == "noise":
        r = np.where(np.isfinite(det.radius_px), det.radius_px, 5.0)
        n = np.maximum(np.asarray(det.intensity, float), 1.0)
        return 1.0 / (r**2 / (4 * n) + SIGMA_FLOOR_CNN_PX**2)
    if weights == "sigma":
        sg = np.where(np.isfinite(det.sigma_px), det.sigma_px, 0.25)
        return 1.0 / (sg**2 + SIGMA_SYSTEMATIC_PX**2)
    if weights == "intensity":
        return np.asarray(det.intensity, float)
    if weights == "uniform":
        return np.ones_like(det.intensity, dtype=float)
    raise BadInputError(f"weights must be 'noise', 'sigma', 'intensity' or 'uniform', got {weights!r}")


def _fit(det, G0, o0, weights):
    if weights == "auto":
        weights = "sigma" if np.isfinite(det.sigma_px).any() else "noise"
    w = disk_weights(det, weights)
    valid = det.valid & ~det.edge
    f = fit_lattice(det.positions, w, valid, G_guess=G0, origin_guess=o0)
    st = f.status.copy()
    st[det.status == 4] = 4
    return {"G": f.G, "origin": f.origin, "residual_px": f.residual_px.astype(np.float32),
            "n_disks": f.n_disks.astype(np.int16), "status": st.astype(np.int8)}


def _create(grp, name, shape, chunks, dtype, fill):
    """zarr 3 ``create_array`` or zarr 2 ``create_dataset``."""
    if hasattr(grp, "create_array"):
        return grp.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, overwrite=True)
    return grp.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, overwrite=True)


def _open_store(store, shape, chunk_rows, meta, overwrite, resume):
    import zarr

    grp = zarr.open_group(str(store), mode="a")
    old = grp.attrs.get("diffkit_strain")
    n_chunks = math.ceil(shape[0] / chunk_rows)
    if old is not None and not overwrite:
        same = all(old.get(k) == v for k, v in meta.items() if k not in ("started",))
        if not same:
            raise BadInputError(f"store {store} holds a strain map made with other settings; pass overwrite=True "
                                "or another store")
        if not resume:
            raise BadInputError(f"store {store} exists; pass resume=True to continue it or overwrite=True")
    if old is None or overwrite:
        for name, (dt, fill) in _FIELDS.items():
            _create(grp, name, shape, (chunk_rows, shape[1]), dt, fill)
        _create(grp, "done", (n_chunks,), (1,), "bool", False)
        grp.attrs["diffkit_strain"] = meta
    return grp


def map_strain(data, reference_region=None, *, calibration=None, method: str = "anchor-free", store=None,
               scheduler=None, progress: bool = True, callback=None, chunk_rows: int | None = None,
               guess=None, frame_rotation_deg: float = 0.0, models=None, overwrite: bool = False,
               resume: bool = True, weights: str = "auto", refine="cnn", model_table=None):
    """Strain, rotation and lattice maps of an NBED scan.

    Parameters
    ----------
    data : FourDSTEM, dask or numpy array (scan_y, scan_x, det_y, det_x)
        The scan. NaN or empty frames are skipped (status 2), never fatal.
    reference_region : bool mask (scan_y, scan_x), tuple of slices or (y0, y1, x0, x1)
        Strain-free region; its median lattice is the reference ``G0``. Default: the whole scan.
    calibration : Calibration, optional
        Default ``data.calibration``. Strain needs no calibration; with convergence and pixel
        size the disk radius is known (binning of large disks), and the lattice vectors are
        also reported in 1/Å when the beam energy is known.
    method : {"anchor-free", "subimage-cnn"}
        Disk detection (:func:`diffkit.strain.detect_disks`). ``"subimage-cnn"`` measures the
        disks at the positions of the global lattice (fast, one orientation) and falls back
        to the anchor-free detector for patterns whose fit fails.
    store : path, optional
        Zarr group for incremental results (one write per block of rows, plus a done-marker);
        an existing store with the same settings is resumed. ``None``: in memory.
    scheduler : dask scheduler name, or a ``distributed.Client``
        Used to load the data blocks; with a Client, blocks are also processed on its workers.
    progress : bool
        tqdm progress bar over scan positions.
    callback : callable, optional
        ``callback(done_rows, total_rows, partial)`` after each block (``partial`` is a dict
        of the arrays so far; NaN/status 5 where not done).
    chunk_rows : int, optional
        Scan rows per block (default ~512 patterns per block).
    guess : (G, origin, hk), optional
        Global lattice guess (default :func:`lattice_guess` of the mean pattern).
    frame_rotation_deg : float
        Report the strain tensor in axes rotated by this angle from detector (x, y).
    overwrite, resume : bool
        Store handling, see above.
    weights : {"auto", "noise", "sigma", "intensity", "uniform"}
        Weights of the lattice fit (see :func:`disk_weights`); ``"auto"``: inverse variance
        from the edge fit with ``refine="fit"``, else from the disk counts (``"noise"``).
    refine : {"cnn", "fit", "model", None}
        Centre refinement of :func:`diffkit.strain.detect_disks` (default the sub-image CNN).
        ``"model"``: after the networks and the lattice fit, fit every pattern with its own
        simulated disks (Bloch-wave intensities of the crystal, thickness, tilt, convergence and
        blur fitted; :mod:`diffkit.strain.modelfit`). Several times more precise on strongly
        dynamical disks (thick crystals, α ≳ 1.5 mrad) and ~40x slower; needs material, zone axis,
        beam energy and convergence in the calibration, and adds ``thickness_nm``,
        ``tilt_x_mrad``, ``tilt_y_mrad`` (detector axes) and ``chi2_per_px`` maps.
    model_table : DiskIntensityTable or NBEDTableSpec, optional
        Crystal table for ``refine="model"`` (default: the calibration's crystal, computed once
        and cached; ~10 min on 2 cores the first time).

    Returns
    -------
    xarray.Dataset on (scan_y, scan_x): ``exx, eyy, exy`` (dimensionless), ``theta_deg``,
    ``g1x, g1y, g2x, g2y`` (px), ``origin_x, origin_y`` (px), ``residual_px``, ``n_disks``,
    ``status`` (0 = ok; see ``attrs['status_codes']``), and ``reference`` (bool). ``attrs``
    hold the reference basis, the strain definition, the method and timings.
    """
    arr, cal = _unwrap(data, calibration)
    sy, sx = arr.shape[:2]
    if cal is not None and cal.pixel_size_mrad:
        from ..data import MAX_PIXEL_SIZE_MRAD, check_disk_radius

        if cal.convergence_mrad:
            check_disk_radius(cal.convergence_mrad, cal.pixel_size_mrad, arr.shape, "strain map")
        elif cal.pixel_size_mrad > MAX_PIXEL_SIZE_MRAD:
            raise BadInputError(f"strain map: pixel size {cal.pixel_size_mrad:g} mrad/px is not a diffraction "
                                f"detector's (at most {MAX_PIXEL_SIZE_MRAD:g} mrad/px); check the unit")
    sat = _saturation_value(data, arr)
    if method not in ("anchor-free", "subimage-cnn"):
        raise BadInputError(f"method must be 'anchor-free' or 'subimage-cnn', got {method!r}")
    from .detect import normalise_refine, select_disk_models

    refine = normalise_refine(refine, REFINE)
    ref_mask = region_mask(reference_region, (sy, sx))
    table = None
    if refine == "model":
        from .modelfit import table_for_calibration
        from .nbed import DiskIntensityTable

        if cal is None or not cal.convergence_mrad:
            from ..errors import MissingCalibrationError

            raise MissingCalibrationError("refine='model' needs the convergence semi-angle (calibration.convergence_mrad)")
        table = model_table if isinstance(model_table, DiskIntensityTable) else table_for_calibration(cal, model_table)
    models = models or select_disk_models(cal)
    t0 = time.perf_counter()
    client = scheduler if hasattr(scheduler, "submit") else None
    sched = None if client is not None else scheduler
    if guess is None:
        guess = lattice_guess(mean_pattern(arr, scheduler=sched if client is None else None, saturation_value=sat),
                              cal, models)
    G_guess, o_guess, hk = (np.asarray(guess[0], float), np.asarray(guess[1], float), np.asarray(guess[2], int))
    model_fit = None
    if table is not None:
        model_fit = prepare_model_fit(table, arr, ref_mask, (G_guess, o_guess, hk), cal, models,
                                      sched if client is None else None)
    chunk_rows = int(chunk_rows or max(1, 512 // sx))
    n_chunks = math.ceil(sy / chunk_rows)
    meta = {"format": FORMAT, "shape": [int(sy), int(sx)], "detector": [int(v) for v in arr.shape[2:]],
            "method": method, "chunk_rows": chunk_rows, "weights": weights, "refine": str(refine),
            "G_guess": np.round(G_guess, 9).tolist(), "origin_guess": np.round(o_guess, 9).tolist(),
            "hk": hk.tolist(), "model": models.card.get("id", ""),
            "model_table": table.spec.key() if table is not None else ""}
    out = {k: np.full((sy, sx), fill, dtype=dt) for k, (dt, fill) in _FIELDS.items()}
    done = np.zeros(n_chunks, bool)
    grp = None
    if store is not None:
        grp = _open_store(store, (sy, sx), chunk_rows, meta, overwrite, resume)
        done = np.asarray(grp["done"][:], bool)
        if done.any():
            for k in _FIELDS:
                out[k][...] = grp[k][:]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sy * sx, desc="strain map", unit="pattern", initial=int(sum(
            min(chunk_rows, sy - i * chunk_rows) for i in np.nonzero(done)[0]) * sx))

    def finish_block(i, res):
        r0, r1 = i * chunk_rows, min(sy, (i + 1) * chunk_rows)
        G = res["G"].reshape(r1 - r0, sx, 2, 2)
        vals = {"g1x": G[..., 0, 0], "g1y": G[..., 1, 0], "g2x": G[..., 0, 1], "g2y": G[..., 1, 1],
                "origin_x": res["origin"].reshape(r1 - r0, sx, 2)[..., 0],
                "origin_y": res["origin"].reshape(r1 - r0, sx, 2)[..., 1],
                "residual_px": res["residual_px"].reshape(r1 - r0, sx), "n_disks": res["n_disks"].reshape(r1 - r0, sx),
                "status": res["status"].reshape(r1 - r0, sx)}
        if "thickness_nm" in res:
            vals.update(thickness_nm=res["thickness_nm"].reshape(r1 - r0, sx),
                        tilt_x_mrad=res["tilt_mrad"][:, 0].reshape(r1 - r0, sx),
                        tilt_y_mrad=res["tilt_mrad"][:, 1].reshape(r1 - r0, sx),
                        chi2_per_px=res["chi2_per_px"].reshape(r1 - r0, sx))
        for k, v in vals.items():
            out[k][r0:r1] = v
            if grp is not None:
                grp[k][r0:r1, :] = v.astype(out[k].dtype)
        if grp is not None:
            grp["done"][i] = True
        done[i] = True
        if bar is not None:
            bar.update((r1 - r0) * sx)
        if callback is not None:
            callback(int(sum(min(chunk_rows, sy - j * chunk_rows) for j in np.nonzero(done)[0])), sy, out)

    todo = [i for i in range(n_chunks) if not done[i]]
    if client is not None:
        from distributed import as_completed

        futs = {}
        for i in todo:
            blk = arr[i * chunk_rows:min(sy, (i + 1) * chunk_rows)]
            f = client.submit(_process_block, blk, (G_guess, o_guess, hk), cal, method, weights, refine, models.source,
                              None if model_fit is None else (model_fit[0].spec, model_fit[1]), sat, pure=False)
            futs[f] = i
        for f in as_completed(futs):
            finish_block(futs[f], f.result())
    else:
        for i in todo:
            r0, r1 = i * chunk_rows, min(sy, (i + 1) * chunk_rows)
            blk = arr[r0:r1].compute(scheduler=sched) if sched is not None else arr[r0:r1].compute()
            pats = np.asarray(blk, np.float32).reshape(-1, *arr.shape[2:])
            res = process_patterns(pats, (G_guess, o_guess, hk), cal, method, models, weights=weights, refine=refine,
                                   model_fit=model_fit)
            finish_block(i, _mask_saturated(res, pats, sat))
    if bar is not None:
        bar.close()
    ds = strain_dataset(out, ref_mask, frame_rotation_deg, cal)
    ds.attrs.update({
        "method": method, "model": models.card.get("id", ""), "lattice_guess_G_px": G_guess.tolist(),
        "lattice_guess_origin_px": o_guess.tolist(), "indexed_disks_hk": hk.tolist(),
        "seconds": round(time.perf_counter() - t0, 2), "patterns_per_second": round(sy * sx / max(time.perf_counter() - t0, 1e-9), 1),
    })
    if grp is not None:
        grp.attrs["diffkit_strain_result"] = {k: v for k, v in ds.attrs.items() if k != "status_codes"}
        for k in ("exx", "eyy", "exy", "theta_deg"):
            _create(grp, k, (sy, sx), (chunk_rows, sx), "f8", np.nan)[...] = ds[k].values
    return ds


def _process_block(blk, guess, cal, method, weights, refine, model_source="", model_spec=None, saturation_value=None):
    from .detect import load_disk_models, select_disk_models

    b = np.asarray(blk, np.float32)
    models = load_disk_models(model_source + ".json") if model_source else select_disk_models(cal)
    model_fit = None
    if model_spec is not None:  # the worker loads the crystal table from its own cache (or computes it)
        from .nbed import disk_intensity_table

        model_fit = (disk_intensity_table(model_spec[0]), model_spec[1])
    pats = b.reshape(-1, *b.shape[2:])
    return _mask_saturated(process_patterns(pats, guess, cal, method, models, weights=weights, refine=refine,
                                            model_fit=model_fit), pats, saturation_value)


def strain_dataset(fields: dict, reference_mask, frame_rotation_deg: float = 0.0, calibration=None):
    """Assemble the strain Dataset from lattice-vector maps (``g1x, g1y, g2x, g2y, ...``)."""
    import xarray as xr

    G = np.stack([np.stack([fields["g1x"], fields["g2x"]], -1), np.stack([fields["g1y"], fields["g2y"]], -1)], -2)
    st = np.asarray(fields["status"])
    G0 = reference_lattice(G, reference_mask, st)
    e = strain_from_lattice(G, G0, frame_rotation_deg)
    bad = st != 0
    dims = ("scan_y", "scan_x")
    ds = xr.Dataset(
        {
            "exx": (dims, np.where(bad, np.nan, e["exx"]), {"units": "1", "long_name": "strain xx"}),
            "eyy": (dims, np.where(bad, np.nan, e["eyy"]), {"units": "1", "long_name": "strain yy"}),
            "exy": (dims, np.where(bad, np.nan, e["exy"]), {"units": "1", "long_name": "shear strain xy (tensor)"}),
            "theta_deg": (dims, np.where(bad, np.nan, e["theta_deg"]), {"units": "degree", "long_name": "lattice rotation"}),
            **{k: (dims, np.asarray(fields[k]), {"units": "px"}) for k in ("g1x", "g1y", "g2x", "g2y", "origin_x", "origin_y")},
            "residual_px": (dims, np.asarray(fields["residual_px"]), {"units": "px", "long_name": "weighted rms fit residual"}),
            "n_disks": (dims, np.asarray(fields["n_disks"]), {"units": "1"}),
            "status": (dims, st, {"units": "1", "long_name": "0 ok; see attrs status_codes"}),
            **{k: (dims, np.asarray(fields[k], np.float32), {"units": u, "long_name": n})
               for k, u, n in (("thickness_nm", "nm", "specimen thickness (refine='model')"),
                               ("tilt_x_mrad", "mrad", "specimen tilt x, detector axes (refine='model')"),
                               ("tilt_y_mrad", "mrad", "specimen tilt y, detector axes (refine='model')"),
                               ("chi2_per_px", "1", "reduced Poisson chi-square of the disk model"))
               if k in fields and np.isfinite(np.asarray(fields[k], float)).any()},
            "reference": (dims, np.asarray(reference_mask, bool)),
        }
    )
    ds.attrs.update({
        "strain_definition": "F = G^-T G0^T (columns = reciprocal vectors); eps = (F + F^T)/2 - I; "
                             "theta = atan2(F_yx - F_xy, F_xx + F_yy) (polar decomposition)",
        "frame": f"detector (x, y) axes rotated by {frame_rotation_deg} deg",
        "reference_G_px": G0.tolist(),
        "status_codes": json.dumps({int(k): v for k, v in MAP_STATUS.items()}),
    })
    if calibration is not None and calibration.pixel_size_mrad and calibration.beam_energy_kv:
        from ..sim.scattering import wavelength_angstrom

        f = calibration.pixel_size_mrad * 1e-3 / wavelength_angstrom(calibration.beam_energy_kv)
        for k in ("g1", "g2"):
            ds[f"{k}_inv_angstrom"] = (dims, np.hypot(ds[f"{k}x"].values, ds[f"{k}y"].values) * f,
                                      {"units": "1/Å", "long_name": f"|{k}|"})
    return ds
