"""How the measured strain scale depends on where the pattern centre falls within a detector pixel.

Pairs of noiseless Si [001] scans (200 kV, alpha = 2 mrad, 5 px disks, 128 px detector, 60-90 nm
wedge, tilt up to 0.8 mrad): unstrained and with a uniform uniaxial strain (default exx = 0.85 %,
the benchmark's layer strain), the pattern centre shifted by a sub-pixel offset. Each strained
pattern is measured against its unstrained twin (``subimage-cnn`` at the twin's lattice), so
thickness and tilt effects cancel and what remains is the response of the disk-centre
estimates to a known displacement: the error of the mapped exx (units of 1e-4) per centre
offset, for each disk model.

    python benchmarks/strain_phase_bias.py
    python benchmarks/strain_phase_bias.py --models disks_nbed disks_si001_200kv_2mrad --offsets 0 0.25 0.5
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["disks_nbed", "disks_si001_200kv_2mrad"])
    ap.add_argument("--offsets", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                    help="sub-pixel offsets of the pattern centre (px, applied to x and to y)")
    ap.add_argument("--strain", type=float, default=0.0085)
    ap.add_argument("--scan", type=int, default=10, help="positions per side")
    ap.add_argument("--alpha", type=float, default=2.0, help="convergence semi-angle (mrad)")
    ap.add_argument("--radius-px", type=float, default=5.0, help="disk radius on the detector (px)")
    ap.add_argument("--dose", type=float, default=np.inf, help="electrons per pattern (default noiseless)")
    ap.add_argument("--refine", default="cnn", help="cnn, model (physics-model fit of each pattern) or fit (the "
                    "edge-model least-squares fit, with the anchor-free detector)")
    args = ap.parse_args(argv)

    from diffkit.models.disks_training import pair_strain
    from diffkit.strain import nbed
    from diffkit.strain.detect import load_disk_models

    n = args.scan
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    tilt = np.stack([xx - (n - 1) / 2, yy - (n - 1) / 2], -1) * 0.8 / np.hypot((n - 1) / 2, (n - 1) / 2)
    z = np.zeros((n, n))
    models = {name: load_disk_models(name, device="cpu") for name in args.models}
    rows = {name: [] for name in args.models}
    t0 = time.perf_counter()
    for off in args.offsets:
        kw = dict(thickness_nm=60 + 30 * yy / (n - 1), tilt_mrad=tilt, convergence_mrad=args.alpha,
                  pixel_size_mrad=args.alpha / args.radius_px,
                  detector_px=128, background=0.003, radial_background=0.01, blur_px=0.5, seed=3, dose=args.dose,
                  center_offset_px=(off, off))
        a = nbed.simulate_nbed(z, z, z, z, **kw)
        b = nbed.simulate_nbed(z + args.strain, z, z, z, **kw)
        pa, pb = a.patterns.reshape(-1, 128, 128), b.patterns.reshape(-1, 128, 128)
        for name, m in models.items():
            kd = (dict(method="subimage-cnn", refine=args.refine) if args.refine in ("cnn", "model")
                  else dict(method="anchor-free", refine=args.refine))
            e = pair_strain(m, pa, pb, a.calibration, **kd)[:, 0]
            rows[name].append((e.mean() - args.strain) * 1e4)
    print(f"error of the mapped exx (1e-4) for a uniform exx = {args.strain:g}, {n}x{n} pattern pairs, alpha "
          f"{args.alpha:g} mrad, {args.radius_px:g} px disks, dose {args.dose:g}, refine {args.refine}, by sub-pixel "
          "offset of the pattern centre (x = y):")
    print(f"{'model':28s}" + "".join(f"{o:>8.2f}" for o in args.offsets) + "   mean   spread (max - min)")
    for name, r in rows.items():
        r = np.array(r)
        print(f"{name:28s}" + "".join(f"{v:>+8.2f}" for v in r) + f"  {r.mean():+6.2f}  {r.max() - r.min():6.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
