"""Where the strain error at alpha = 2 mrad comes from: per-disk centre errors by order and thickness.

A strain-free Si [001] wedge (the benchmark's conditions: 200 kV, alpha = 2 mrad, 5 px disks,
128 px detector, 5e5 e-, 60-90 nm, tilt up to 0.8 mrad) is measured with diffkit's
``subimage-cnn`` detector; every detected disk is matched to its exact simulated centre and its
error split into a radial part (along g, positive outwards) and a tangential part. Prints the mean
and spread per order and thickness band, and how well the radial errors of the two orders agree
per pattern: a per-pattern radial offset common to all disks (one extra lattice-fit parameter)
could only absorb them if they did.

Then an upper bound on what a simulation-based correction of that bias could give: the same scan
rendered without noise (``dose = inf``) is measured the same way, its centre errors (the
detector's bias at each pattern's exact thickness and tilt, known only to an oracle) are subtracted
from the noisy measurement, and the strain-free standard deviation of the lattice fit is compared:
as measured, noiseless (bias alone) and oracle-corrected (noise alone).

    python benchmarks/strain_disk_bias.py --scan 16

(The first run on a machine builds and caches the Si disk-intensity table, a few minutes.)
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=16, help="scan side (positions)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle bias-correction bound")
    args = ap.parse_args(argv)

    from diffkit.strain import nbed
    from diffkit.strain.detect import detect_disks
    from diffkit.strain.lattice import strain_from_lattice
    from diffkit.strain.mapping import _fit, lattice_guess

    Y = X = args.scan
    yy, xx = np.meshgrid(np.arange(Y), np.arange(X), indexing="ij")
    thickness = 60 + 30 * yy / (Y - 1)
    rmax = np.hypot((Y - 1) / 2, (X - 1) / 2)
    tilt = np.stack([xx - (X - 1) / 2, yy - (Y - 1) / 2], -1) * 0.8 / rmax
    z = np.zeros((Y, X))
    t0 = time.perf_counter()
    kw = dict(thickness_nm=thickness, tilt_mrad=tilt, convergence_mrad=2.0, pixel_size_mrad=0.4, detector_px=128,
              background=0.01, radial_background=0.01, blur_px=0.5, center_offset_px=(0.3, -0.2), seed=args.seed)
    scan = nbed.simulate_nbed(z, z, z, z, dose=5e5, **kw)
    print(f"simulated {Y * X} patterns in {time.perf_counter() - t0:.0f} s")
    P = scan.patterns.reshape(Y * X, *scan.patterns.shape[-2:])
    tr = scan.truth
    tx, ty = (tr[k].values.reshape(Y * X, -1) for k in ("disk_x", "disk_y"))
    h, k = tr["h"].values, tr["k"].values
    o = np.nonzero((h == 0) & (k == 0))[0][0]
    G0, o0, hk = lattice_guess(P, scan.calibration)
    det = detect_disks(P, scan.calibration, method="subimage-cnn", lattice=(G0, o0, hk))

    def matched(d):
        """Exact centre (B, K, 2) and index (B, K) of the true disk each detection belongs to
        (NaN / -1 when none lies within 2 px)."""
        pos, idx = np.full(d.positions.shape, np.nan), np.full(d.positions.shape[:2], -1)
        for b in range(len(P)):
            T = np.stack([tx[b], ty[b]], -1)
            for j in np.nonzero(d.valid[b])[0]:
                dist = np.hypot(*(T - d.positions[b, j]).T)
                i = int(np.nanargmin(dist))
                if dist[i] <= 2:
                    pos[b, j], idx[b, j] = T[i], i
        return pos, idx

    true_pos, true_idx = matched(det)
    rows = []  # pattern, |hk|, radial error, tangential error (px)
    for b, j in zip(*np.nonzero(~det.edge & (true_idx >= 0) & (true_idx != o))):
        i = true_idx[b, j]
        u = true_pos[b, j] - (tx[b, o], ty[b, o])
        u = u / np.hypot(*u)
        e = det.positions[b, j] - true_pos[b, j]
        rows.append((b, round(float(np.hypot(h[i], k[i])), 2), e @ u, e[1] * u[0] - e[0] * u[1]))
    E = np.array(rows)
    th = thickness.ravel()[E[:, 0].astype(int)]
    orders = sorted(set(E[:, 1]))
    print("mean (std) of the centre error in px, radial (+ outwards) and tangential, per order |hk|:")
    for lo, hi in ((60, 70), (70, 80), (80, 91)):
        line = f"  {lo}-{hi} nm:"
        for od in orders:
            m = (th >= lo) & (th < hi) & (E[:, 1] == od)
            line += (f"  |hk| {od:.2f}: radial {E[m, 2].mean():+.3f} ({E[m, 2].std():.3f}), "
                     f"tangential {E[m, 3].mean():+.3f} ({E[m, 3].std():.3f})")
        print(line)
    b = E[:, 0].astype(int)
    per = np.array([[E[(b == i) & (E[:, 1] == od), 2].mean() for od in orders[:2]] for i in range(len(P))])
    ok = np.isfinite(per).all(1)
    print(f"per-pattern mean radial error, |hk| {orders[0]:.2f} vs {orders[1]:.2f}: correlation "
          f"{np.corrcoef(per[ok, 0], per[ok, 1])[0, 1]:.2f}, std {per[ok, 0].std():.3f} / {per[ok, 1].std():.3f} px")
    if args.no_oracle:
        return

    def strain_std(d):
        f = _fit(d, G0, o0, "auto")
        ok = f["status"] == 0
        e = strain_from_lattice(f["G"], np.median(f["G"][ok], 0))
        return " ".join(f"{k} {np.std(e[k][ok]):.2e}" for k in ("exx", "eyy", "exy"))

    clean = nbed.simulate_nbed(z, z, z, z, dose=np.inf, **kw)
    Pc = clean.patterns.reshape(Y * X, *clean.patterns.shape[-2:])
    det_c = detect_disks(Pc, scan.calibration, method="subimage-cnn", lattice=(G0, o0, hk))
    bias = det_c.positions - matched(det_c)[0]  # per disk, at the same lattice-predicted slots
    err = det.positions - true_pos
    fixed = dataclasses.replace(det, positions=det.positions - bias)
    rms = lambda a: float(np.sqrt(np.nanmean(a ** 2)))  # noqa: E731
    print("strain-free std of the lattice fit (subimage-cnn):")
    print(f"  as measured (5e5 e-):            {strain_std(det)}   centre error rms {rms(err):.3f} px")
    print(f"  noiseless (the bias alone):      {strain_std(det_c)}   bias rms {rms(bias):.3f} px")
    print(f"  oracle bias-corrected (noise):   {strain_std(fixed)}   centre error rms {rms(err - bias):.3f} px")


if __name__ == "__main__":
    main()
