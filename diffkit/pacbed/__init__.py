"""PACBED thickness and tilt measurement (seed 000)."""
from __future__ import annotations

import numpy as np

from .predictor import OOD_REASONS, PacbedPredictor, load_predictor, load_predictor_file

_SCALARS = ("thickness_nm", "thickness_std_nm", "tilt_x_mrad", "tilt_y_mrad", "tilt_x_std_mrad", "tilt_y_std_mrad",
            "tilt_magnitude_mrad", "tilt_azimuth_deg", "confidence", "ood_reason")


def predict(patterns, calibration=None, batch_size: int = 256, **kw):
    """Measure thickness/tilt of raw PACBED patterns with the shipped model for ``calibration``.

    ``patterns`` is one pattern (H, W), a stack (N, H, W) as numpy, or a dask array (N, H, W)
    (processed block by block, never loaded whole). Returns an ``xarray.Dataset`` (dim
    ``pattern``) with units; see :meth:`PacbedPredictor.predict_batch` for the options.

    Examples
    --------
    >>> from diffkit import Calibration
    >>> cal = Calibration(beam_energy_kv=200, convergence_mrad=13.6, material="SrTiO3", zone_axis="001")
    >>> ds = predict(pattern, cal)  # doctest: +SKIP
    >>> float(ds.thickness_nm[0]), ds.thickness_nm.attrs["units"]  # doctest: +SKIP
    (42.5, 'nm')
    """
    opts = {k: kw.pop(k) for k in list(kw) if k in ("material", "zone", "energy_kv", "convergence_mrad", "device")}
    pred = load_predictor(calibration, **opts)
    if calibration is not None and calibration.pixel_size_mrad and "pixel_size_mrad" not in kw:
        kw["pixel_size_mrad"] = calibration.pixel_size_mrad
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover
        da = None
    if da is not None and isinstance(patterns, da.Array):
        import xarray as xr

        if patterns.ndim == 2:
            patterns = patterns[None]
        x = patterns.rechunk((batch_size, -1, -1))

        def block(b):
            r = pred.predict_batch(np.asarray(b, dtype=np.float32), **kw)
            return np.stack([np.asarray(r[k], dtype=np.float64) for k in _SCALARS], axis=1)

        out = x.map_blocks(block, dtype=np.float64, chunks=(x.chunks[0], (len(_SCALARS),)), drop_axis=[1, 2],
                           new_axis=[1]).compute()
        ds = xr.Dataset({k: ("pattern", out[:, i]) for i, k in enumerate(_SCALARS)})
        ds["ood"] = ds["ood_reason"] > 0
        for k in ds:
            ds[k].attrs["units"] = "nm" if k.endswith("_nm") else "mrad" if k.endswith("_mrad") else "degree" if k.endswith("_deg") else ""
        ds.attrs.update(model=pred.card_id)
        return ds
    return pred.predict(patterns, **kw)


__all__ = ["OOD_REASONS", "PacbedPredictor", "load_predictor", "load_predictor_file", "predict"]
