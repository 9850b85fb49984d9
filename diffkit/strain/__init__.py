"""Strain, phase and virtual-image maps from nanobeam electron diffraction (NBED).

Pipeline: neural Bragg-disk detection (:func:`detect_disks`: anchor-free detector with
soft-argmax sub-pixel offsets, seed 002, refined by a sub-image CNN, seed 001) ->
per-pattern weighted lattice fit (:func:`fit_lattice`) -> optionally a physics-model fit of
every pattern with its simulated disks (:func:`refine_lattice_model`, ``refine="model"``) -> strain relative to a reference
region with an exact definition (:func:`strain_from_lattice`) -> maps on dask chunks with
incremental zarr output and resume (:func:`map_strain`). Also phase maps from lattice
distances (:func:`phase_map`), virtual images (:func:`virtual_image`), and simulated NBED
scans with a known strain field (:func:`simulate_nbed`, :func:`make_strain_demo_scan`).

Names are imported lazily (torch is loaded only when needed).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "simulate_nbed": "nbed", "make_strain_demo_scan": "nbed", "make_test_scan": "nbed", "multilayer_field": "nbed",
    "small_table_spec": "nbed",
    "deformation_gradient": "nbed", "disk_intensity_table": "nbed", "render_nbed": "nbed", "NBEDTableSpec": "nbed",
    "detect_disks": "detect", "load_disk_models": "detect", "DiskDetections": "detect",
    "fit_lattice": "lattice", "strain_from_lattice": "lattice", "strain_from_deformation": "lattice",
    "linearised_strain": "lattice", "lattice_guess_autocorrelation": "lattice", "autocorrelation": "lattice",
    "reference_lattice": "lattice", "STATUS": "lattice",
    "map_strain": "mapping", "lattice_guess": "mapping", "strain_dataset": "mapping",
    "phase_map": "phases", "Phase": "phases", "classify_lattices": "phases",
    "virtual_image": "virtual",
    "refine_lattice_model": "modelfit", "match_table": "modelfit",
    "plot_strain_maps": "plots", "strain_images": "plots",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
