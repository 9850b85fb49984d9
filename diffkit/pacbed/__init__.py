"""PACBED thickness and tilt measurement (seed 000)."""
from .predictor import OOD_REASONS, PacbedPredictor, load_predictor, load_predictor_file


def predict(patterns, calibration=None, **kw):
    """Measure thickness/tilt of raw PACBED patterns with the shipped model for ``calibration``.

    Returns an ``xarray.Dataset`` (dim ``pattern``) with units; see :meth:`PacbedPredictor.predict_batch`.
    """
    opts = {k: kw.pop(k) for k in list(kw) if k in ("material", "zone", "energy_kv", "convergence_mrad", "device")}
    pred = load_predictor(calibration, **opts)
    if calibration is not None and calibration.pixel_size_mrad and "pixel_size_mrad" not in kw:
        kw["pixel_size_mrad"] = calibration.pixel_size_mrad
    return pred.predict(patterns, **kw)


__all__ = ["OOD_REASONS", "PacbedPredictor", "load_predictor", "load_predictor_file", "predict"]
