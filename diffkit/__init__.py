"""diffkit: neural-network measurement of thickness, mistilt and strain from 4D-STEM data.

Top-level names are imported lazily so ``import diffkit`` stays fast and does not pull in
torch, dask or panel until they are used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Calibration": ("diffkit.calibration", "Calibration"),
    "FourDSTEM": ("diffkit.data", "FourDSTEM"),
    "load": ("diffkit.io", "load"),
    "save_zarr": ("diffkit.io", "save_zarr"),
    "open_catalog": ("diffkit.catalog", "open_catalog"),
    "load_predictor": ("diffkit.pacbed", "load_predictor"),
    "predict": ("diffkit.pacbed", "predict"),
    "map_pacbed": ("diffkit.maps", "map_pacbed"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'diffkit' has no attribute {name!r}")


def __dir__():
    return __all__
