"""Panel components shared by the notebooks and the served dashboards.

Each component is a :class:`panel.viewable.Viewer` with ``param`` state: show it in a
notebook as the last expression of a cell, or serve ``component.template()``. Served apps
create one instance per browser session, so sessions never share state.

* :class:`PacbedExplorer` — region → PACBED → thickness/tilt live, with background, band-pass
  mask and dose controls and sensitivity curves.
* :class:`MapsExplorer` — thickness/tilt maps over a scan on dask chunks, with progress and cancel.
* :class:`StrainExplorer` — strain maps of an NBED scan with a selectable reference region.
* :func:`serve` — serve the dashboards (``diffkit serve``).

Panel, HoloViews and Datashader are optional (``pip install diffkit[viz]``); they are
imported when this package is.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "PacbedExplorer": "pacbed_explorer",
    "MapsExplorer": "maps",
    "StrainExplorer": "strain",
    "CatalogSource": "_common",
    "serve": "apps",
    "APPS": "apps",
    "app": "apps",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
