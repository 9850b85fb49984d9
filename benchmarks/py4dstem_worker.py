"""Runs py4DSTEM 0.14's Bragg-disk detection and strain workflow on a scan saved as .npy.

Executed by ``strain_vs_py4dstem.py`` with the Python of a *separate* virtual environment
that has py4DSTEM installed (py4DSTEM is GPL-3.0 and pins numpy < 2: it is never a diffkit
dependency and never imported by diffkit). Input and output are plain files:

    python py4dstem_worker.py params.json

``params.json``: data (npy, (scan_y, scan_x, det_y, det_x)), probe (npy vacuum probe),
reference (npy bool mask), radius_px, origin (x, y) px, upsample_factors, out (npz path).
Writes an npz with, per upsample factor, the peak lists, the fitted lattice vectors
(``g1g2``, py4DSTEM's (qx, qy) = (row, column) convention), py4DSTEM's own strain maps and
the timings.
"""
import json
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import py4DSTEM  # noqa: E402


def main(path):
    p = json.load(open(path))
    data = np.load(p["data"]).astype(np.float32)
    probe = np.load(p["probe"]).astype(np.float32)
    ref = np.load(p["reference"]).astype(bool)
    r = float(p["radius_px"])
    ox, oy = p["origin"]
    out = {"py4DSTEM_version": py4DSTEM.__version__, "numpy_version": np.__version__}
    arrays = {}
    dc = py4DSTEM.DataCube(data=data)
    pr = py4DSTEM.Probe(probe)
    # kernel: probe shifted to the origin, sine-squared sigmoid edge filter (py4DSTEM's usual NBED choice)
    kernel = pr.get_kernel(mode="sigmoid", origin=(oy, ox), radii=(r, 2 * r))
    Rx, Ry = data.shape[:2]
    for up in p["upsample_factors"]:
        t0 = time.perf_counter()
        bv = dc.find_Bragg_disks(template=kernel, corrPower=1.0, sigma=0, subpixel="multicorr", upsample_factor=up,
                                 minAbsoluteIntensity=0, minRelativeIntensity=p.get("min_relative_intensity", 0.0005),
                                 relativeToPeak=0, minPeakSpacing=max(2 * r, 6), edgeBoundary=int(np.ceil(r)) + 1,
                                 maxNumPeaks=p.get("max_peaks", 40))
        t_detect = time.perf_counter() - t0
        # peaks: flatten (qx = row, qy = column)
        rows = []
        for i in range(Rx):
            for j in range(Ry):
                pk = bv.raw[i, j]
                for qx, qy, inten in zip(pk.qx, pk.qy, pk.I):
                    rows.append((i, j, qx, qy, inten))
        arrays[f"peaks_up{up}"] = np.array(rows, float).reshape(-1, 5)
        # strain workflow: origin, basis, lattice fit per pattern, strain vs reference region
        t1 = time.perf_counter()
        bv.measure_origin(center_guess=(oy, ox))
        bv.fit_origin(plot=False, fitfunction="plane")
        bv.calibrate()
        sm = py4DSTEM.StrainMap(braggvectors=bv)
        sm.choose_basis_vectors(minSpacing=max(2 * r, 6), edgeBoundary=1, maxNumPeaks=20)
        plt.close("all")
        sm.set_max_peak_spacing(max(1.5, 0.5 * r))
        plt.close("all")
        sm.fit_basis_vectors()
        plt.close("all")
        sm.get_strain(gvects=ref & sm.mask if hasattr(sm, "mask") else ref)
        plt.close("all")
        t_strain = time.perf_counter() - t1
        g = sm.g1g2_map
        arrays[f"g1g2_up{up}"] = np.stack([g.get_slice(k).data for k in ("g1x", "g1y", "g2x", "g2y", "mask")])
        arrays[f"strain_up{up}"] = np.stack([sm.get_slice(k).data for k in ("e_xx", "e_yy", "e_xy", "theta", "mask")])
        out[f"up{up}"] = {"detect_seconds": t_detect, "strain_seconds": t_strain,
                          "patterns": int(Rx * Ry), "detect_patterns_per_s": Rx * Ry / t_detect,
                          "total_patterns_per_s": Rx * Ry / (t_detect + t_strain),
                          "g1_ref": [float(v) for v in getattr(sm, "g1", (np.nan, np.nan))],
                          "g2_ref": [float(v) for v in getattr(sm, "g2", (np.nan, np.nan))]}
    np.savez(p["out"], **arrays)
    json.dump(out, open(p["out"] + ".json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
