"""Regenerate the small simulated fixtures the tests use (tests/data/*.npz).

* ``heldout_sto_13.6mrad.npz``: raw-detector PACBEDs from the held-out (half-nm) thicknesses of
  the 13.6 mrad library, with detector effects drawn from a seed training never used.
* ``ood_patterns.npz``: patterns a 13.6 mrad SrTiO3 model must flag: SrTiO3 at 19.1 mrad,
  Si [001] at 13.6 mrad, an amorphous film and vacuum.

Run: ``python scripts/make_test_fixtures.py`` (needs the 13.6 mrad library, built on demand).
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from diffkit.models.pacbed_eval import make_test_set
from diffkit.models.train import default_spec
from diffkit.sim.crystals import silicon_001, srtio3_001
from diffkit.sim.detector import DetectorParams, apply_detector
from diffkit.sim.pacbed import LibrarySpec, build_pacbed_library

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"


def heldout():
    lib = build_pacbed_library(default_spec(convergence_mrad=13.6))
    t = make_test_set(lib, n=150, seed=8675309, out_px=128, pixel_ratio=0.8)
    # counts reach ~1e6 per pixel at the highest doses: uint32, not uint16
    np.savez_compressed(OUT / "heldout_sto_13.6mrad.npz",
                        patterns=np.round(t.pop("patterns")).astype(np.uint32),
                        **{k: np.asarray(v) for k, v in t.items()})


def ood():
    pats, labels = [], []
    for crystal, alpha, name in ((srtio3_001(), 19.1, "SrTiO3 19.1 mrad"), (silicon_001(), 13.6, "Si [001] 13.6 mrad")):
        spec = LibrarySpec(crystal=crystal, convergence_mrad=alpha, thickness_nm=(15.0, 40.0, 80.0),
                           tilt_max_mrad=0.0, n_px=96, g_max=2.0)
        lib = build_pacbed_library(spec, progress=False)
        for p in lib["pattern"].values[0]:
            pats.append(p)
            labels.append(name)
    n = 96
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    disk = (r < 23.3).astype(np.float32)
    # amorphous film: aperture disk plus diffuse rings (convolved with the aperture)
    from scipy.signal import fftconvolve

    ring = np.exp(-0.5 * ((r - 30) / 6) ** 2) + 0.6 * np.exp(-0.5 * ((r - 55) / 8) ** 2)
    amorph = 0.7 * disk + 0.3 * fftconvolve(disk, ring, mode="same") / ring.sum()
    pats += [amorph.astype(np.float32), disk]
    labels += ["amorphous film", "vacuum"]
    pats = np.stack(pats)
    p = DetectorParams.identity(len(pats))
    p.dose[:] = 1e8
    x = apply_detector(pats, p, generator=torch.Generator().manual_seed(3)).numpy()
    np.savez_compressed(OUT / "ood_patterns.npz", patterns=np.clip(np.round(x), 0, 65535).astype(np.uint16),
                        labels=np.array(labels))


if __name__ == "__main__":
    import sys

    OUT.mkdir(parents=True, exist_ok=True)
    which = sys.argv[1:] or ["heldout", "ood"]
    if "heldout" in which:
        heldout()
    if "ood" in which:
        ood()
    print("fixtures written to", OUT)
