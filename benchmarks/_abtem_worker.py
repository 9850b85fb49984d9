"""abTEM multislice reference PACBEDs of SrTiO3 [001] (runs inside a separate abTEM environment).

This script imports only abtem, ase and numpy; it is started by
``benchmarks/bloch_vs_abtem.py`` with the interpreter given by its ``--abtem-python``
option. abTEM (GPL-3.0) is never imported by diffkit itself.

Model: SrTiO3 (Pm-3m, a = 3.905 Å; Sr (0,0,0), Ti (½,½,½), O (½,½,0), (½,0,½), (0,½,½)),
beam along [001], static lattice (no frozen phonons, no Debye-Waller smearing), Lobato
potential with infinite projection. One unit-cell potential is tiled laterally into a
periodic ``cells x cells`` supercell and repeated along z (``abtem.CrystalPotential``);
exit planes after whole unit cells give the thickness series from ONE multislice run.
An aberration-free probe with a hard aperture is scanned over one unit cell on an
``n x n`` grid (``abtem.GridScan``); the diffraction patterns (``abtem.PixelatedDetector``)
are averaged over the scan positions, giving the PACBED.

Specimen tilt: abTEM 1.0 applies the tilt of a ``Probe(tilt=(tx, ty))`` (mrad) to the
Fresnel propagator of every slice (phase ``exp(-2 pi i k . tan(tilt) dz)``), i.e. the
wave walks laterally through the crystal while the probe aperture stays centred on the
optic axis. The crystal-frame incident direction of partial wave p is therefore
``p + tilt``. The worker checks that the tilt really changes the pattern and reports along
which array axis the mirror symmetry is broken.

Diagnostic ``--zolz N``: the cell's projected potential spread evenly over N slices per
cell, so that no higher-order Laue zone falls inside the band limit (the multislice
counterpart of a zero-order-Laue-zone Bloch-wave calculation).

Output (``--out``, .npz): ``patterns`` (n_tilt, n_thickness, nkx, nky) float32 in abTEM's
native array order (first axis = x), ``kx_mrad``, ``ky_mrad`` (angular coordinates of the
samples, zero frequency included), ``tilts_mrad`` (n_tilt, 2) = (tilt_x, tilt_y),
``thickness_A``, ``seconds`` per tilt (multislice wall time), and the parameters.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def srtio3_cell(a: float):
    import ase

    return ase.Atoms(
        "SrTiO3",
        scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
        cell=[a, a, a],
        pbc=True,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--a", type=float, default=3.905, help="lattice parameter (Å)")
    ap.add_argument("--energy-kv", type=float, default=200.0)
    ap.add_argument("--convergence", type=float, default=13.6, help="probe semiangle (mrad)")
    ap.add_argument("--cells", type=int, default=16, help="lateral supercell size (unit cells)")
    ap.add_argument("--gpts-per-cell", type=int, default=40, help="real-space grid points per unit cell")
    ap.add_argument("--slices-per-cell", type=int, default=2)
    ap.add_argument("--projection", default="infinite", choices=("infinite", "finite"))
    ap.add_argument("--zolz", type=int, default=0,
                    help="diagnostic: spread the projected potential over this many slices per cell (no HOLZ)")
    ap.add_argument("--scan", type=int, default=6, help="probe positions per unit cell along x and y")
    ap.add_argument("--thickness-cells", type=int, nargs="+", default=[51, 154, 256])
    ap.add_argument("--tilts", nargs="+", default=["0,0", "2.0071,0"], help="tilt_x,tilt_y in mrad")
    ap.add_argument("--max-angle", default="40", help="detector max angle (mrad), or 'cutoff' (antialiasing limit)")
    ap.add_argument("--threads", type=int, default=1, help="FFTW threads")
    args = ap.parse_args(argv)

    import abtem

    abtem.config.set({"device": "cpu", "fftw.threads": args.threads, "dask.lazy": False,
                      "diagnostics.progress_bar": False, "precision": "float32"})
    a = args.a
    atoms = srtio3_cell(a)
    if args.slices_per_cell == 1:
        # projected-potential model (what a zero-order-Laue-zone Bloch calculation solves): every atom
        # in the first half-cell slice, the second half-cell slice empty (propagation only). The unit
        # keeps two slices: abtem's CrystalPotential mis-assigns exit planes for a one-slice unit
        # (the slice object it re-yields is mutated by multislice's look-ahead).
        n_unit_slices = 2
        atoms.positions[:, 2] = a / 4
    else:
        # put the atomic planes (z = 0 and z = a/2) in the middle of their slices
        n_unit_slices = args.slices_per_cell
        atoms.positions[:, 2] = (atoms.positions[:, 2] + a / (2 * n_unit_slices)) % a
    t0 = time.perf_counter()
    unit = abtem.Potential(atoms, gpts=args.gpts_per_cell, slice_thickness=a / n_unit_slices,
                           parametrization="lobato", projection=args.projection)
    if args.zolz:
        # diagnostic: the cell's projected potential spread evenly over n_z thin slices per cell. The
        # structure then repeats every a / n_z along z, which pushes the higher-order Laue zones (FOLZ
        # ring at ~113 mrad for c = a) out beyond the band limit: the multislice analogue of a
        # zero-order-Laue-zone (projected potential) Bloch-wave calculation.
        n_unit_slices = max(2, args.zolz)
        built = unit.build(lazy=False)
        proj = np.asarray(built.array).sum(axis=0)
        unit = abtem.PotentialArray(np.repeat(proj[None] / n_unit_slices, n_unit_slices, axis=0),
                                    slice_thickness=a / n_unit_slices, extent=(a, a))
    cells_z = max(args.thickness_cells)
    exit_planes = tuple(int(c) * n_unit_slices - 1 for c in sorted(args.thickness_cells))
    potential = abtem.CrystalPotential(unit, repetitions=(args.cells, args.cells, cells_z), exit_planes=exit_planes)
    print(f"abtem {abtem.__version__}: supercell {args.cells}x{args.cells} cells, gpts {potential.gpts}, "
          f"sampling {potential.sampling[0]:.4f} Å, {potential.num_slices} slices, exit planes {exit_planes}", flush=True)

    tilts = [tuple(float(v) for v in s.split(",")) for s in args.tilts]
    patterns, seconds = [], []
    k_coords = None
    for tilt in tilts:
        probe = abtem.Probe(semiangle_cutoff=args.convergence, energy=args.energy_kv * 1e3, soft=False, tilt=tilt)
        probe.grid.match(potential)
        scan = abtem.GridScan(start=(0.0, 0.0), end=(a, a), gpts=(args.scan, args.scan), endpoint=False)
        max_angle = args.max_angle if args.max_angle in ("cutoff", "valid", "full") else float(args.max_angle)
        detector = abtem.PixelatedDetector(max_angle=max_angle)
        t = time.perf_counter()
        meas = probe.scan(potential, scan=scan, detectors=detector)
        if hasattr(meas, "compute") and getattr(meas, "is_lazy", False):
            meas = meas.compute(scheduler="synchronous")
        dt = time.perf_counter() - t
        arr = np.asarray(meas.array)  # (n_thickness, scan_x, scan_y, nkx, nky)
        if arr.ndim == 4:  # a single exit plane: no thickness axis
            arr = arr[None]
        assert arr.shape[0] == len(exit_planes) and arr.shape[1:3] == (args.scan, args.scan), arr.shape
        pacbed = arr.mean(axis=(1, 2)).astype(np.float32)
        patterns.append(pacbed)
        seconds.append(dt)
        kx, ky = (np.asarray(c, float) for c in meas.angular_coordinates)
        k_coords = (kx, ky)
        print(f"tilt {tilt} mrad: multislice + detection {dt:.1f} s "
              f"({dt / len(exit_planes):.1f} s per thickness), total intensity in field "
              + ", ".join(f"{s:.4f}" for s in pacbed.sum(axis=(-2, -1))), flush=True)
    patterns = np.stack(patterns)
    kx, ky = k_coords

    # tilt sanity check: does the tilt change the pattern, and which mirror does it break?
    i0 = int(np.argmin(np.abs(kx)))
    j0 = int(np.argmin(np.abs(ky)))
    assert abs(kx[i0]) < 1e-6 and abs(ky[j0]) < 1e-6, "zero frequency is not a sample"
    n = min(i0, len(kx) - 1 - i0)
    m = min(j0, len(ky) - 1 - j0)
    tilt_report = []
    for it, tilt in enumerate(tilts):
        p = patterns[it, -1, i0 - n : i0 + n + 1, j0 - m : j0 + m + 1]
        mx = float(np.abs(p - p[::-1, :]).max() / p.max())  # asymmetry under x -> -x
        my = float(np.abs(p - p[:, ::-1]).max() / p.max())  # asymmetry under y -> -y
        cx = float((p * kx[i0 - n : i0 + n + 1, None]).sum() / p.sum())
        cy = float((p * ky[None, j0 - m : j0 + m + 1]).sum() / p.sum())
        diff0 = float(np.abs(patterns[it] - patterns[0]).max() / patterns[0].max())
        tilt_report.append({"tilt_mrad": tilt, "max_rel_change_vs_first": diff0,
                            "asym_x": mx, "asym_y": my, "centroid_mrad": (cx, cy)})
        print(f"tilt {tilt}: max |P - P(first tilt)|/max {diff0:.3g}; mirror asymmetry x->-x {mx:.3g}, "
              f"y->-y {my:.3g}; centroid ({cx:+.3f}, {cy:+.3f}) mrad (thickest)", flush=True)

    np.savez_compressed(
        args.out,
        patterns=patterns,
        kx_mrad=kx.astype(np.float64),
        ky_mrad=ky.astype(np.float64),
        tilts_mrad=np.asarray(tilts, float),
        thickness_A=np.asarray(sorted(args.thickness_cells), float) * a,
        thickness_cells=np.asarray(sorted(args.thickness_cells), int),
        seconds=np.asarray(seconds),
        setup_seconds=time.perf_counter() - t0 - sum(seconds),
        params=json.dumps({**vars(args), "abtem_version": abtem.__version__,
                           "gpts": list(potential.gpts), "sampling_A": list(potential.sampling),
                           "num_slices": potential.num_slices, "exit_planes": exit_planes,
                           "tilt_report": tilt_report, "array_order": "(tilt, thickness, kx, ky)"}),
    )
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
