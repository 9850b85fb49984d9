"""Strain precision of an exit-wave power cepstrum (EWPC) lattice fit vs diffkit's networks.

Tried as a route to the strain-precision goal and not kept: this script reproduces the figures in
docs/strain.md. Same simulated Si [001] multilayer scan as ``strain_vs_py4dstem.py`` (default
32x32 positions, alpha = 2 mrad, 60-90 nm wedge, 5e5 e-/pattern). Per pattern: ``log(I + c)``,
mean removed, Hann window; the cepstral peaks of the lattice (first orders, optionally also
(1,1), (1,-1), (2,0), (0,2)) are located by a zoomed DFT (4 refinements, 7x7 grid each); the
real-space lattice is fitted to them and turned into a reciprocal basis; strain follows with
diffkit's exact definition against the median of the reference region. The networks'
``map_strain`` (``subimage-cnn``) runs on the same counts.

    python benchmarks/strain_cepstrum.py
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import strain_vs_py4dstem as base  # noqa: E402

ORDERS_FIRST = ((1, 0), (0, 1))
ORDERS_MORE = ((1, 0), (0, 1), (1, 1), (1, -1), (2, 0), (0, 2))


def ewpc_lattice(flat: np.ndarray, U0: np.ndarray, c: float, orders) -> np.ndarray:
    """Real-space lattice (n, 2, 2), columns in cepstrum index units, near the guess ``U0``."""
    n, H, W = flat.shape
    L = np.log(flat + c)
    L -= L.mean(axis=(1, 2), keepdims=True)
    L *= np.hanning(H)[:, None] * np.hanning(W)[None, :]
    ys, xs = np.arange(H) - H / 2, np.arange(W) - W / 2
    rows = np.arange(n)
    peaks = []
    for h, k in orders:
        cur = np.tile(U0 @ np.array([h, k], float), (n, 1))
        for span in (0.6, 0.12, 0.024, 0.005):
            g = np.linspace(-span, span, 7)
            ux, uy = cur[:, :1] + g, cur[:, 1:] + g
            Ex = np.exp(-2j * np.pi * ux[:, :, None] * xs / W)
            Ey = np.exp(-2j * np.pi * uy[:, :, None] * ys / H)
            power = np.abs(np.einsum("nah,nhw,nbw->nab", Ey, L, Ex)) ** 2
            iy, ix = np.unravel_index(power.reshape(n, -1).argmax(1), (7, 7))
            cur = np.stack([ux[rows, ix], uy[rows, iy]], 1)
        peaks.append(cur)
    sol = np.einsum("ij,njk->nik", np.linalg.pinv(np.array(orders, float)), np.stack(peaks, 1))
    return np.swapaxes(sol, 1, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=lambda s: tuple(int(v) for v in s.split("x")), default=(32, 32), help="YxX")
    ap.add_argument("--alpha", type=float, default=2.0, help="convergence semi-angle (mrad)")
    ap.add_argument("--thickness", type=float, nargs=2, default=(60.0, 90.0), help="thickness wedge (nm)")
    args = ap.parse_args(argv)
    sim = argparse.Namespace(scan=args.scan, detector=128, alpha=args.alpha, radius_px=5.0, dose=5e5,
                             background=0.003, blur=0.5, tilt_max=0.8, thickness=tuple(args.thickness), seed=11)
    scan, ref = base.simulate(sim)

    from diffkit.strain import map_strain
    from diffkit.strain.lattice import lattice_guess_autocorrelation, reference_lattice, strain_from_lattice

    P = scan.patterns.astype(np.float64)
    Y, X, H, W = P.shape
    flat = P.reshape(-1, H, W)
    U0 = H * np.linalg.inv(lattice_guess_autocorrelation(flat.mean(0)).T)

    def report(name, est, dt):
        m = base.strain_metrics(est, scan.truth)
        print(f"{name:34s} {Y * X / dt:7.0f} patterns/s  strain-free std exx {m['exx']['std_strain_free']:.2e} "
              f"eyy {m['eyy']['std_strain_free']:.2e} exy {m['exy']['std_strain_free']:.2e}  "
              f"rms error exx {m['exx']['rms_error']:.2e}", flush=True)

    t = time.perf_counter()
    ds = map_strain(scan.patterns.astype(np.float32), ref, calibration=scan.calibration, method="subimage-cnn",
                    progress=False)
    report("diffkit subimage-cnn", {k: ds[k].values for k in ("exx", "eyy", "exy", "theta_deg")}, time.perf_counter() - t)
    for c in (0.5, 2.0):
        for orders in (ORDERS_FIRST, ORDERS_MORE):
            t = time.perf_counter()
            U = ewpc_lattice(flat, U0, c, orders)
            G = (H * np.swapaxes(np.linalg.inv(U), 1, 2)).reshape(Y, X, 2, 2)
            dt = time.perf_counter() - t
            report(f"EWPC c={c:g}, {len(orders)} orders", strain_from_lattice(G, reference_lattice(G, ref)), dt)


if __name__ == "__main__":
    main()
