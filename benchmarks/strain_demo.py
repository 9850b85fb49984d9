"""Strain maps of the bundled demo scan with the specialised and the general disk model.

The demo scan (``catalogs/data/si_strain_nbed.zarr``: Si [001], 200 kV, alpha = 2 mrad, 5 px
disks, 40 x 40 positions, 2e5 e- per pattern, known strain field) is mapped with both detection
methods, once with the model ``map_strain`` chooses from the calibration and once with the general
model, then with ``refine="model"`` (each pattern fitted with its simulated disks), and compared
with the stored truth: patterns/s, standard deviation of the error in the
strain-free region (exx, eyy, exy) and the rms error of the rotation (degrees).

    python benchmarks/strain_demo.py
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np


def main(argv=None):
    import torch

    import diffkit
    from diffkit.strain import map_strain
    from diffkit.strain.detect import load_disk_models

    data = diffkit.load("catalogs/data/si_strain_nbed.zarr")
    tr = data.truth
    ref = tuple(data.attrs["strain_reference_region"])
    free = (tr["exx"].values == 0) & (tr["eyy"].values == 0) & (tr["exy"].values == 0)
    n = int(np.prod(data.data.shape[:2]))
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'no GPU'}; "
          f"{time.strftime('%Y-%m-%d')}")
    rows = []
    runs = [(m, meth, "cnn") for m in (None, load_disk_models("disks_nbed")) for meth in ("anchor-free", "subimage-cnn")]
    runs.append((None, "subimage-cnn", "model"))  # + the physics-model fit of every pattern
    for models, method, refine in runs:
        t = time.perf_counter()
        ds = map_strain(data, reference_region=ref, method=method, models=models, progress=False, refine=refine)
        el = time.perf_counter() - t
        std = {k: float(np.nanstd((ds[k].values - tr[k].values)[free])) for k in ("exx", "eyy", "exy")}
        th = float(np.sqrt(np.nanmean((ds["theta_deg"].values - tr["theta_deg"].values) ** 2)))
        rows.append((ds.attrs["model"], method, refine, n / el, std, th))
        print(f"{ds.attrs['model']:26s} {method:13s} {refine:6s} {n / el:6.0f} patterns/s  strain-free std "
              + " ".join(f"{k} {v:.2e}" for k, v in std.items()) + f"  rotation rms error {th:.3f} deg", flush=True)
    return rows


if __name__ == "__main__":
    main()
