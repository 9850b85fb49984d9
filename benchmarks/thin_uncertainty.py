"""Tilt and thickness uncertainty of thin PACBED patterns: per-band temperatures vs one global one.

Reproduces the coverage figures in docs/models.md and README.md. Held-out simulated raw frames
(``diffkit.models.pacbed_eval.make_test_set``, the model cards' test set), full pipeline; per
true-thickness band, the fraction of tilt (both axes) and thickness errors within 1 and 2 predicted
standard deviations and the median tilt sigma, with the model card's per-band temperatures
(``calibration_temperatures.bands``, shipped) and with them disabled (one global temperature).

    python benchmarks/thin_uncertainty.py --convergence 13.6
"""
from __future__ import annotations

import argparse

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convergence", type=float, default=13.6, help="convergence semi-angle (mrad)")
    ap.add_argument("--n", type=int, default=2000, help="test-set size")
    ap.add_argument("--seed", type=int, default=424242, help="the model cards' test seed")
    args = ap.parse_args(argv)

    from diffkit.models.pacbed_eval import make_test_set
    from diffkit.models.train import default_spec
    from diffkit.pacbed import load_predictor
    from diffkit.sim.pacbed import build_pacbed_library

    lib = build_pacbed_library(default_spec(convergence_mrad=args.convergence), progress=True)
    pred = load_predictor(material="SrTiO3", zone="001", energy_kv=200, convergence_mrad=args.convergence, device="cpu")
    test = make_test_set(lib, n=args.n, seed=args.seed)
    t = test["thickness_nm"]
    shipped = pred.band_temperatures
    print(f"{args.convergence:g} mrad, {args.n} held-out patterns; fraction of errors within 1 / 2 predicted sigma")
    for name, bands in (("per-band temperatures (shipped)", shipped), ("one global temperature", None)):
        pred.band_temperatures = bands
        r = pred.predict_batch(test["patterns"])
        print(name)
        for lo, hi in ((0, 5), (5, 10), (10, 20), (20, 1000)):
            m = (t >= lo) & (t < hi)
            z = np.concatenate([np.abs(r[f"tilt_{a}_mrad"][m] - test[f"tilt_{a}_mrad"][m]) / r[f"tilt_{a}_std_mrad"][m]
                                for a in "xy"])
            zt = np.abs(r["thickness_nm"][m] - t[m]) / r["thickness_std_nm"][m]
            s = np.concatenate([r["tilt_x_std_mrad"][m], r["tilt_y_std_mrad"][m]])
            print(f"  {lo:>3d}-{hi:<4d} nm n={m.sum():4d}: tilt {np.mean(z <= 1):.2f} / {np.mean(z <= 2):.2f} "
                  f"(median sigma {np.median(s):.3f} mrad); thickness {np.mean(zt <= 1):.2f} / {np.mean(zt <= 2):.2f}")
    pred.band_temperatures = shipped


if __name__ == "__main__":
    main()
