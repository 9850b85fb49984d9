"""Validate diffkit's frozen-phonon multislice against abTEM's; time both on the same machine.

abTEM (GPL-3.0) runs in its own environment (``benchmarks/_abtem_fp_worker.py`` started with
``--abtem-python``); diffkit never imports it. Both codes get the same structure (SrTiO3 [001],
200 kV, 13.6 mrad hard aperture), the same supercell grid (so their reciprocal samples coincide),
the same slicing (atomic planes, infinite projection, Lobato), the same probe positions and the same
rms displacements per in-plane axis (sqrt(B / 8 pi^2) of diffkit's Debye-Waller factors). For each
thickness and tilt it reports

* static lattice: NCC and summed |difference| of diffkit vs abTEM;
* frozen phonons: rms difference diffkit (its own seed) vs abTEM seed 1, against the spread of
  abTEM seed 1 vs seed 2 (two independent draws differ by this much with no model difference);
* thickness read-out: the thickness a diffkit series (every unit cell, its own phonon seed)
  assigns to each abTEM pattern (NCC is no test of thickness fidelity);
* wall time of each code per tilt.

``--write-reference`` stores the abTEM patterns used by ``tests/test_multislice.py``.

Run (small reference, ~10 min on 2 cores)::

    python benchmarks/multislice_vs_abtem.py --abtem-python /path/to/abtem-env/bin/python --cells 4 --gpts 160 \\
        --thickness-cells 13 26 51 --phonons 4 --write-reference
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time

import numpy as np

from diffkit.sim.compare import ncc, read_thickness
from diffkit.sim.crystals import srtio3_001
from diffkit.sim.multislice import MultisliceSpec, run_multislice, pacbed_positions

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = HERE.parent / "tests" / "data" / "abtem_multislice_sto_small.npz"


def abtem_run(args, phonons, seed, out):
    if args.reuse and pathlib.Path(out).exists():
        return dict(np.load(out, allow_pickle=False))
    cmd = [args.abtem_python, str(HERE / "_abtem_fp_worker.py"), "--out", str(out), "--cells", str(args.cells),
           "--gpts", str(args.gpts), "--thickness-cells", *map(str, args.thickness_cells),
           "--tilts", *args.tilts, "--phonons", str(phonons), "--seed", str(seed), "--scan", "6",
           "--max-angle", str(args.max_angle), "--threads", str(args.threads),
           "--sigmas", ",".join(f"{s}={np.sqrt(b / (8 * np.pi ** 2)):.4f}" for s, b in (("Sr", 0.56), ("Ti", 0.41), ("O", 0.65)))]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return dict(np.load(out, allow_pickle=False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--abtem-python", default="python")
    ap.add_argument("--workdir", default=None, help="keep abTEM outputs here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse abTEM outputs found in --workdir")
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--gpts", type=int, default=160)
    ap.add_argument("--thickness-cells", type=int, nargs="+", default=[13, 26, 51])
    ap.add_argument("--tilts", nargs="+", default=["0,0", "1.5,0.8"])
    ap.add_argument("--phonons", type=int, default=4)
    ap.add_argument("--max-angle", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-reference", action="store_true")
    args = ap.parse_args(argv)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.cells}c_{args.gpts}"
    ab = {"static": abtem_run(args, 0, 1, work / f"static_{tag}.npz"),
          "fp1": abtem_run(args, args.phonons, 1, work / f"fp1_{tag}.npz"),
          "fp2": abtem_run(args, args.phonons, 2, work / f"fp2_{tag}.npz")}
    k = ab["static"]["kx_mrad"]
    crop = np.abs(k) <= 25.7
    kc = k[crop]
    tilts = ab["static"]["tilts_mrad"]
    cells = ab["static"]["cells"]
    a = 3.905
    cr = srtio3_001()
    crs = cr.scaled_debye_waller(0.0)
    rows = []
    for it, tilt in enumerate(tilts):
        res = {}
        for name, crystal, ph in (("static", crs, 0), ("fp", cr, args.phonons)):
            spec = MultisliceSpec(crystal=crystal, cells=(args.cells, args.cells), sampling_A=a * args.cells / args.gpts,
                                  n_phonons=ph, phonon_seed=7, scan_per_cell=6, max_angle_mrad=26)
            t = time.perf_counter()
            r = run_multislice(spec, pacbed_positions(spec), np.arange(1, cells.max() + 4) * a / 10, tuple(tilt),
                               progress=False)
            sel = np.isin(np.round(r["kx_mrad"], 3), np.round(kc, 3))
            res[name] = (r["patterns"][:, sel][:, :, sel], r["thickness_nm"], time.perf_counter() - t)
        for i, c in enumerate(cells):
            A = {key: v["patterns"][it, i][np.ix_(crop, crop)] for key, v in ab.items()}
            ds, tser, _ = res["static"]
            df, tfp, _ = res["fp"]
            j = int(c) - 1
            row = {"tilt_mrad": tilt.tolist(), "thickness_nm": float(c * a / 10),
                   "static_ncc": ncc(ds[j], A["static"]), "static_abs_diff": float(np.abs(ds[j] - A["static"]).sum()),
                   "fp_rms_vs_abtem": float(np.sqrt(np.mean((df[j] - A["fp1"]) ** 2)) / A["fp1"].mean()),
                   "abtem_seed_spread": float(np.sqrt(np.mean((A["fp2"] - A["fp1"]) ** 2)) / A["fp1"].mean()),
                   "fp_ncc_vs_abtem": ncc(df[j], A["fp1"]), "abtem_seed_ncc": ncc(A["fp1"], A["fp2"]),
                   "static_read_nm": float(read_thickness(A["static"][None], ds, tser)[0]),
                   "fp_read_nm": [float(read_thickness(A[s][None], df, tfp)[0]) for s in ("fp1", "fp2")]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"tilt {tilt}: diffkit static {res['static'][2]:.1f} s, frozen phonons ({args.phonons}) "
              f"{res['fp'][2]:.1f} s; abTEM static {ab['static']['seconds'][it]:.1f} s, frozen phonons "
              f"{ab['fp1']['seconds'][it]:.1f} s", flush=True)
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": str(datetime.date.today()),
                      "load": os.getloadavg()}))
    if args.write_reference:
        np.savez_compressed(REFERENCE, k_mrad=kc, tilts_mrad=tilts, cells=cells,
                            **{key: v["patterns"][:, :, crop][:, :, :, crop] for key, v in ab.items()},
                            params=json.dumps({"abtem_version": "1.0.11", "cells": args.cells, "gpts": args.gpts,
                                               "phonons": args.phonons, "seeds": [1, 2], "scan": 6,
                                               "convergence_mrad": 13.6, "energy_kv": 200}))
        print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
