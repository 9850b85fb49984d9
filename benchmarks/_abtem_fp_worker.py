"""abTEM frozen-phonon multislice PACBEDs of SrTiO3 [001] (runs inside a separate abTEM environment).

Imports only abtem, ase and numpy; started by ``benchmarks/multislice_vs_abtem.py`` with the
interpreter given by its ``--abtem-python`` option (abTEM is GPL-3.0 and never imported by diffkit).

The whole specimen (``cells x cells`` laterally, as many cells deep as the thickest exit plane) is
built as one ``ase.Atoms``; ``abtem.FrozenPhonons`` displaces every atom independently by a Gaussian
of the given rms per in-plane axis (``--sigmas`` per element, Å; directions "xy"); no frozen phonons
with ``--phonons 0`` (static lattice). Slices of a/2 with the atomic planes at slice centres,
Lobato parametrisation, infinite projection, the grid given by ``--gpts`` (so the reciprocal samples
can coincide with diffkit's). Aberration-free probe with a hard aperture (``soft=False``) scanned
over one unit cell on ``--scan`` x ``--scan`` positions (endpoint excluded); patterns averaged
over positions and configurations. Output (.npz): ``patterns`` (n_tilt, n_thickness, ky, kx) in
(y, x) order (abTEM's own arrays are (x, y)), ``kx_mrad``, ``ky_mrad``, ``tilts_mrad``, ``cells``,
``seconds`` per tilt and the parameters as JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--a", type=float, default=3.905)
    ap.add_argument("--energy-kv", type=float, default=200.0)
    ap.add_argument("--convergence", type=float, default=13.6)
    ap.add_argument("--cells", type=int, default=6)
    ap.add_argument("--gpts", type=int, required=True, help="grid points of the supercell per side")
    ap.add_argument("--thickness-cells", type=int, nargs="+", required=True)
    ap.add_argument("--tilts", nargs="+", default=["0,0"], help="tilt_x,tilt_y in mrad")
    ap.add_argument("--phonons", type=int, default=6, help="frozen-phonon configurations (0 = static lattice)")
    ap.add_argument("--sigmas", default="Sr=0.0842,Ti=0.0721,O=0.0907", help="rms displacement per axis (Å)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scan", type=int, default=6)
    ap.add_argument("--max-angle", type=float, default=40.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import abtem
    import ase

    abtem.config.set({"device": "cpu", "fftw.threads": args.threads, "dask.lazy": False,
                      "diagnostics.progress_bar": False, "precision": "float32"})
    a = args.a
    cell = ase.Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                     cell=[a, a, a], pbc=True)
    nz = max(args.thickness_cells)
    atoms = cell * (args.cells, args.cells, nz)
    atoms.positions[:, 2] += a / 4  # atomic planes at the centres of their a/2 slices
    exit_planes = tuple(int(c) * 2 - 1 for c in sorted(args.thickness_cells))
    if args.phonons > 0:
        sig = {k: float(v) for k, v in (s.split("=") for s in args.sigmas.split(","))}
        src = abtem.FrozenPhonons(atoms, num_configs=args.phonons, sigmas=sig, directions="xy", seed=args.seed)
    else:
        src = atoms
    potential = abtem.Potential(src, gpts=args.gpts, slice_thickness=a / 2, parametrization="lobato",
                                projection="infinite", exit_planes=exit_planes)
    tilts = [tuple(float(v) for v in s.split(",")) for s in args.tilts]
    patterns, seconds, coords = [], [], None
    for tilt in tilts:
        probe = abtem.Probe(semiangle_cutoff=args.convergence, energy=args.energy_kv * 1e3, soft=False, tilt=tilt)
        probe.grid.match(potential)
        scan = abtem.GridScan(start=(0.0, 0.0), end=(a, a), gpts=(args.scan, args.scan), endpoint=False)
        t = time.perf_counter()
        meas = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=args.max_angle))
        if getattr(meas, "is_lazy", False):
            meas = meas.compute(scheduler="synchronous")
        seconds.append(time.perf_counter() - t)
        arr = np.asarray(meas.array)
        while arr.ndim > 5:  # an ensemble axis left in place: average it
            arr = arr.mean(0)
        if arr.ndim == 4:
            arr = arr[None]
        patterns.append(np.swapaxes(arr.mean(axis=(1, 2)), -1, -2).astype(np.float32))
        coords = [np.asarray(c, float) for c in meas.angular_coordinates]
        print(f"tilt {tilt}: {seconds[-1]:.1f} s, intensity in field "
              + ", ".join(f"{v:.4f}" for v in patterns[-1].sum(axis=(-2, -1))), flush=True)
    np.savez_compressed(args.out, patterns=np.stack(patterns), kx_mrad=coords[0], ky_mrad=coords[1],
                        tilts_mrad=np.asarray(tilts, float), cells=np.asarray(sorted(args.thickness_cells)),
                        seconds=np.asarray(seconds),
                        params=json.dumps({**vars(args), "abtem_version": abtem.__version__,
                                           "gpts": list(potential.gpts), "sampling_A": list(potential.sampling)}))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
