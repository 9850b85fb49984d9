"""Shipped PACBED model on an independent multislice test set: raw detector frames and clean patterns.

The clean patterns (noise-free, undistorted, on the training library's pixel grid) separate the
physics gap (Bloch-wave training vs frozen-phonon multislice) from the detector model and the
alignment: an error that appears on both is the training physics'. Prints the model-card table
for the raw frames and the thickness error by thickness band for both.

    python benchmarks/cross_physics_pacbed.py sto_13.6mrad_multislice.npz
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import numpy as np

from diffkit.models.pacbed_eval import evaluate
from diffkit.pacbed import load_predictor
from diffkit.sim.testset import load_testset


def bands(t, err, flagged, edges=(0, 10, 20, 40, 60, 80, 100, 121)):
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (t >= lo) & (t < hi)
        if m.any():
            out[f"{lo}-{hi} nm"] = {"n": int(m.sum()), "bias_nm": round(float(err[m].mean()), 2),
                                   "mae_nm": round(float(np.abs(err[m]).mean()), 2),
                                   "worst_nm": round(float(err[m][np.argmax(np.abs(err[m]))]), 2),
                                   "flagged": int(flagged[m].sum())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("test_set")
    args = ap.parse_args(argv)
    test = load_testset(args.test_set)
    ts = test["meta"]["spec"]
    pred = load_predictor(material=ts["material"], zone=ts["zone"], energy_kv=ts["energy_kv"],
                          convergence_mrad=ts["convergence_mrad"])
    rep, out = evaluate(pred, test)
    t = test["thickness_nm"]
    err = out["thickness_nm"] - t
    clean = pred.predict_batch(test["clean"], pixel_size_mrad=test["meta"]["library_pixel_size_mrad"])
    err_c = clean["thickness_nm"] - t
    big = np.abs(err) > 5
    summary = {
        "test_set": os.path.basename(args.test_set), "n": int(len(t)),
        "raw": {k: round(rep[k], 3) for k in ("thickness_within_1nm", "thickness_within_2nm", "tilt_within_0.25mrad",
                                              "thickness_coverage_68", "thickness_coverage_95", "ood_flag_rate")},
        "raw_unflagged_errors_over_5nm": int((big & ~out["ood"].astype(bool)).sum()),
        "clean_within_1nm": round(float(np.mean(np.abs(err_c) <= 1)), 3),
        "clean_within_2nm": round(float(np.mean(np.abs(err_c) <= 2)), 3),
        "raw_by_thickness": bands(t, err, out["ood"].astype(bool)),
        "clean_by_thickness": bands(t, err_c, np.asarray(clean["ood"]).astype(bool)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": str(datetime.date.today()),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
