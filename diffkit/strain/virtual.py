"""Virtual bright-field, annular dark-field and Bragg dark-field images of a 4D-STEM scan.

A virtual detector is a mask on the diffraction pattern; the image is the sum of the counts
under the mask at each scan position, computed lazily with dask (``tensordot``), so it
works on scans larger than memory. Radii can be given in mrad (needs the calibration's
``pixel_size_mrad``) or in px.
"""
from __future__ import annotations

import numpy as np

from ..errors import BadInputError


def detector_mask(shape, center, inner=0.0, outer=np.inf) -> np.ndarray:
    """Annular mask (inner <= r < outer, px) about ``center`` (x, y) px on a detector of ``shape`` (H, W)."""
    H, W = shape
    yy, xx = np.indices((H, W), dtype=float)
    r = np.hypot(xx - center[0], yy - center[1])
    return (r >= inner) & (r < outer)


def virtual_image(data, kind: str = "bf", *, calibration=None, inner_mrad=None, outer_mrad=None, inner_px=None,
                  outer_px=None, center=None, hk=None, lattice=None, mask=None, scheduler=None):
    """Virtual image of a scan.

    Parameters
    ----------
    data : FourDSTEM or array (scan_y, scan_x, det_y, det_x)
    kind : {"bf", "adf", "df", "mask"}
        ``"bf"``: disk of radius ``outer`` (default the convergence semi-angle) about the
        undiffracted beam; ``"adf"``: annulus ``inner``-``outer`` (default from 1.5x the
        convergence angle to the detector edge); ``"df"``: disk of radius ``outer`` (default
        the convergence angle) on the Bragg disk ``hk`` of ``lattice``; ``"mask"``: your mask.
    calibration : Calibration, optional
        Default ``data.calibration``; needed for radii in mrad.
    inner_mrad, outer_mrad, inner_px, outer_px : float
        Detector radii (mrad, or px).
    center : (x, y) px, optional
        Undiffracted-beam position; default the centre of mass of the mean pattern's
        brightest disk (or ``lattice`` origin).
    hk : (int, int)
        Reflection for ``"df"``.
    lattice : (G (2, 2), origin (2,)) or the Dataset returned by :func:`diffkit.strain.map_strain`
        Lattice for ``"df"`` (columns px).
    mask : bool array (det_y, det_x)
        For ``kind="mask"``.

    Returns
    -------
    xarray.DataArray (scan_y, scan_x) in counts, with the mask geometry in ``attrs``.
    """
    import xarray as xr

    from .mapping import _unwrap

    arr, cal = _unwrap(data, calibration)
    H, W = arr.shape[2:]

    def px(v_mrad, v_px, default_mrad=None, name="radius"):
        if v_px is not None:
            return float(v_px)
        v = v_mrad if v_mrad is not None else default_mrad
        if v is None:
            return None
        if cal is None or cal.pixel_size_mrad is None:
            from ..errors import MissingCalibrationError

            raise MissingCalibrationError(f"virtual {kind} image: {name} in mrad needs the calibration value "
                                          "pixel_size_mrad (mrad/px); pass it or give the radius in px")
        return float(v) / cal.pixel_size_mrad

    alpha = cal.convergence_mrad if cal is not None else None
    if kind == "mask":
        if mask is None:
            raise BadInputError("kind='mask' needs mask=")
        m = np.asarray(mask, bool)
        if m.shape != (H, W):
            raise BadInputError(f"mask shape {m.shape} does not match the detector {(H, W)}")
        geom = {"mask_pixels": int(m.sum())}
    else:
        if kind == "df":
            if hk is None or lattice is None:
                raise BadInputError("kind='df' needs hk=(h, k) and lattice=(G, origin) or a strain-map Dataset")
            if hasattr(lattice, "attrs") and "reference_G_px" in lattice.attrs:
                G = np.asarray(lattice.attrs["reference_G_px"], float)
                o = np.array([np.nanmedian(lattice["origin_x"].values), np.nanmedian(lattice["origin_y"].values)])
            else:
                G, o = np.asarray(lattice[0], float), np.asarray(lattice[1], float)
            c = o + G @ np.asarray(hk, float)
            r_out = px(outer_mrad, outer_px, alpha, "outer radius")
            if r_out is None:
                raise BadInputError("give outer_px (or a calibration with convergence_mrad) for the DF disk")
            m = detector_mask((H, W), c, 0.0, r_out)
            geom = {"center_px": c.tolist(), "outer_px": r_out, "hk": list(map(int, hk))}
        else:
            if center is None:
                center = _beam_center(arr, scheduler)
            if kind == "bf":
                r_out = px(outer_mrad, outer_px, alpha, "outer radius")
                if r_out is None:
                    raise BadInputError("give outer_px (or a calibration with convergence_mrad) for the BF disk")
                m = detector_mask((H, W), center, 0.0, r_out)
                geom = {"center_px": list(map(float, center)), "outer_px": r_out}
            elif kind == "adf":
                r_in = px(inner_mrad, inner_px, None if alpha is None else 1.5 * alpha, "inner radius")
                if r_in is None:
                    raise BadInputError("give inner_px (or a calibration with convergence_mrad) for the ADF annulus")
                r_out = px(outer_mrad, outer_px, None, "outer radius") or np.inf
                m = detector_mask((H, W), center, r_in, r_out)
                geom = {"center_px": list(map(float, center)), "inner_px": r_in, "outer_px": float(min(r_out, 1e9))}
            else:
                raise BadInputError(f"kind must be 'bf', 'adf', 'df' or 'mask', got {kind!r}")
    if not m.any():
        raise BadInputError("the virtual detector mask covers no pixel")
    import dask.array as da

    img = da.tensordot(da.nan_to_num(arr.astype(np.float64)), m.astype(np.float64), axes=((2, 3), (0, 1)))
    val = img.compute(scheduler=scheduler) if scheduler is not None else img.compute()
    return xr.DataArray(val, dims=("scan_y", "scan_x"), name=f"virtual_{kind}",
                        attrs={"units": "counts", "kind": kind, **geom})


def _beam_center(arr, scheduler=None):
    """Centre of mass of the brightest disk of the mean pattern (x, y) px."""
    from scipy import ndimage

    from .mapping import mean_pattern

    mp = mean_pattern(arr, max_patterns=64, scheduler=scheduler)
    thr = mp > 0.5 * mp.max()
    lab, n = ndimage.label(thr)
    if n == 0:
        return ((mp.shape[1] - 1) / 2, (mp.shape[0] - 1) / 2)
    sums = ndimage.sum(mp, lab, index=np.arange(1, n + 1))
    k = int(np.argmax(sums)) + 1
    cy, cx = ndimage.center_of_mass(mp * (lab == k))
    return (float(cx), float(cy))
