"""Validate diffkit's Bloch-wave PACBEDs of SrTiO3 [001] against abTEM multislice; time both.

abTEM (GPL-3.0) is never imported here: its part runs in a separate Python environment,
``benchmarks/_abtem_worker.py``, started with the interpreter given by ``--abtem-python``.

Steps
1. The worker computes static-lattice multislice PACBEDs (periodic ``cells x cells``
   supercell, probe scanned over one unit cell, one run per tilt with exit planes at the
   requested whole-cell thicknesses) and saves them on abTEM's own reciprocal grid.
2. diffkit builds a PACBED library (``build_pacbed_library``) with the same thicknesses and
   a tilt range that contains the abTEM tilt (a whole number of ``spec.fine_step_mrad``),
   TDS off and Debye-Waller B = 0 (a static abTEM potential has no Debye-Waller damping;
   with B = 0 the library's absorption ratio is exactly 0, i.e. the elastic solution).
3. abTEM's patterns are transposed to diffkit's (ky, kx) order and binned onto diffkit's
   pixel grid. diffkit's pixel edges lie at whole multiples of the pixel size (centres at
   ``(i - (n_px-1)/2) * px``), abTEM's samples include k = 0: every abTEM sample is treated
   as a box of its own sampling width and shared between the pixels it overlaps (a sample
   on a pixel edge gives half to each side), which conserves intensity. With a supercell of
   ``spec.steps_per_g`` cells abTEM's sampling equals diffkit's fine step ``dq`` = px / 2, so
   the abTEM samples at odd multiples of dq are exactly diffkit's pixel centres: those are
   compared point by point as well ("centres" column).
4. As a resampling-free cross-check the Bloch solver is also evaluated directly on
   abTEM's sample points (``bloch_pacbed_on_samples``), for one or several g_max
   (``--direct-g-max``), and compared there and after binning it exactly like abTEM.

Reports the normalised cross-correlation (NCC) per thickness and tilt, wall times, the speed
ratio per pattern and per full library, and writes the reference file used by
``tests/test_bloch_vs_abtem.py``.

Run (about 10 min on one core; results in docs/simulation_validation.md)::

    OMP_NUM_THREADS=1 python benchmarks/bloch_vs_abtem.py --abtem-python /path/to/abtem-env/bin/python \
        --abtem-out abtem16.npz --write-reference

Diagnostic (projected potential only, no higher-order Laue zones, 4x4-cell supercell)::

    OMP_NUM_THREADS=1 python benchmarks/bloch_vs_abtem.py --abtem-python /path/to/abtem-env/bin/python \
        --n-px 32 --tilt-steps 3 --cells 4 --gpts-per-cell 56 --zolz 4 --direct-g-max 2.5 3.0 3.5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from diffkit.sim.bloch import BlochSolver
from diffkit.sim.compare import bloch_pacbed_on_samples as _bloch_on_samples
from diffkit.sim.compare import ncc
from diffkit.sim.multislice import bin_weights
from diffkit.sim.crystals import srtio3_001
from diffkit.sim.pacbed import LibrarySpec, aperture_points, build_pacbed_library

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = HERE.parent / "tests" / "data" / "abtem_reference_sto_13.6mrad.npz"


def static_crystal(crystal=None):
    """The crystal with every Debye-Waller B set to 0 (static lattice, as an abTEM potential)."""
    return (crystal or srtio3_001()).scaled_debye_waller(0.0)


def abtem_to_diffkit_grid(pattern_xy: np.ndarray, kx: np.ndarray, ky: np.ndarray, n_px: int, px: float) -> np.ndarray:
    """abTEM pattern(s) (..., kx, ky) -> diffkit pixel grid (..., ky, kx) by conservative binning."""
    Wx = bin_weights(kx, n_px, px)
    Wy = bin_weights(ky, n_px, px)
    # out[..., i(y), j(x)] = sum_{a(x), b(y)} Wy[i, b] P[..., a, b] Wx[j, a]
    return np.einsum("ib,...ab,ja->...ij", Wy, pattern_xy, Wx, optimize=True)


def abtem_at_pixel_centres(pattern_xy, kx, ky, n_px: int, px: float):
    """abTEM samples that coincide with diffkit's pixel centres, (..., ky, kx), or None."""
    c = (np.arange(n_px) - (n_px - 1) / 2) * px
    ix = [int(np.argmin(np.abs(kx - v))) for v in c]
    iy = [int(np.argmin(np.abs(ky - v))) for v in c]
    if np.abs(kx[ix] - c).max() > 1e-3 * px or np.abs(ky[iy] - c).max() > 1e-3 * px:
        return None
    s = (kx[1] - kx[0])
    sub = pattern_xy[..., ix, :][..., :, iy]  # (..., x, y)
    return np.swapaxes(sub, -1, -2) * (px / s) ** 2  # per-pixel intensity scale (pixel area / sample area)


def bloch_pacbed_on_samples(solver: BlochSolver, kx, ky, alpha_mrad, tilt_mrad, thickness_nm, batch: int = 64):
    """:func:`diffkit.sim.compare.bloch_pacbed_on_samples` in abTEM's (thickness, kx, ky) array order."""
    return np.swapaxes(_bloch_on_samples(solver, ky, kx, alpha_mrad, tilt_mrad, thickness_nm, batch), -1, -2)


def count_library_directions(spec: LibrarySpec) -> int:
    """Crystal-frame directions a library build solves (same construction as build_pacbed_library)."""
    P = aperture_points(spec)
    tilts = spec.tilt_indices()
    Q = np.unique((P[:, None, :] + tilts[None, :, ::-1]).reshape(-1, 2), axis=0)
    return len(Q)


def run_worker(python: str, out: pathlib.Path, args) -> dict:
    cmd = [python, str(HERE / "_abtem_worker.py"), "--out", str(out), "--cells", str(args.cells),
           "--gpts-per-cell", str(args.gpts_per_cell), "--slices-per-cell", str(args.slices_per_cell),
           "--scan", str(args.scan), "--max-angle", str(args.max_angle), "--threads", str(args.threads),
           "--projection", args.projection, "--zolz", str(args.zolz),
           "--thickness-cells", *map(str, args.thickness_cells),
           "--tilts", *[f"{t:.6f},0" for t in (0.0, args.tilt_mrad)]]
    print("running abTEM worker:", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - t
    d = dict(np.load(out))
    d["worker_wall_s"] = wall
    d["params"] = json.loads(str(d["params"]))
    return d


def _load():
    return tuple(round(v, 2) for v in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--abtem-python", default="python", help="interpreter of an environment with abtem + ase")
    ap.add_argument("--abtem-npz", default=None, help="reuse a worker output instead of running abTEM")
    ap.add_argument("--abtem-out", default=None, help="keep the worker output here (default: a temporary file)")
    ap.add_argument("--n-px", type=int, default=64, help="diffkit pattern size (sets the pixel size)")
    ap.add_argument("--test-n-px", type=int, default=32, help="second, coarser grid stored for the fast test")
    ap.add_argument("--g-max", type=float, default=2.5, help="diffkit library beams up to |g| (1/Å)")
    ap.add_argument("--direct-g-max", type=float, nargs="*", default=None,
                    help="g_max values for the Bloch PACBED evaluated directly on abTEM's samples "
                         "(default: --g-max; give none to skip)")
    ap.add_argument("--thickness-cells", type=int, nargs="+", default=[51, 154, 256])
    ap.add_argument("--tilt-steps", type=int, default=6, help="tilt along x in fine steps of the library grid")
    ap.add_argument("--cells", type=int, default=None, help="abTEM supercell (default: spec.steps_per_g)")
    ap.add_argument("--gpts-per-cell", type=int, default=40)
    ap.add_argument("--slices-per-cell", type=int, default=2)
    ap.add_argument("--projection", default="infinite")
    ap.add_argument("--zolz", type=int, default=0, help="abTEM diagnostic: projected potential only (see worker)")
    ap.add_argument("--scan", type=int, default=6)
    ap.add_argument("--max-angle", default="40")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for both codes (abTEM FFTW threads; diffkit dask workers)")
    ap.add_argument("--write-reference", action="store_true", help=f"write {REFERENCE.relative_to(HERE.parent)}")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    direct_g = [args.g_max] if args.direct_g_max is None else list(args.direct_g_max)

    a = 3.905
    thick_nm = tuple(round(c * a / 10.0, 6) for c in args.thickness_cells)
    crystal = static_crystal(srtio3_001(a))
    probe_spec = LibrarySpec(crystal=crystal, n_px=args.n_px, tilt_max_mrad=0.0)
    dq = probe_spec.fine_step_mrad
    args.tilt_mrad = args.tilt_steps * dq
    args.cells = args.cells or probe_spec.steps_per_g
    spec = LibrarySpec(crystal=crystal, thickness_nm=thick_nm, tilt_max_mrad=args.tilt_mrad * (1 - 1e-9),
                       n_px=args.n_px, g_max=args.g_max, tds=False)
    px = spec.pixel_size_mrad
    half_field = spec.n_px * px / 2
    print(f"diffkit grid: {spec.n_px} px of {px:.4f} mrad, fine step {dq:.4f} mrad, {spec.steps_per_g} steps per g; "
          f"tilt {args.tilt_mrad:.4f} mrad (= {args.tilt_steps} steps) along x; thicknesses {thick_nm} nm", flush=True)
    loads = {"start": _load()}

    with tempfile.TemporaryDirectory() as tmp:
        # ---- abTEM ----------------------------------------------------------------------
        if args.abtem_npz:
            ab = dict(np.load(args.abtem_npz))
            ab["params"] = json.loads(str(ab["params"]))
            ab["worker_wall_s"] = float(ab.get("worker_wall_s", np.nan))
        else:
            ab = run_worker(args.abtem_python, pathlib.Path(args.abtem_out or pathlib.Path(tmp) / "abtem.npz"), args)
        loads["after_abtem"] = _load()

        # ---- diffkit library ----------------------------------------------------------------
        t = time.perf_counter()
        lib = build_pacbed_library(spec, cache_dir=pathlib.Path(tmp) / "lib", progress=False,
                                   scheduler="synchronous" if args.threads == 1 else "threads").load()
        t_lib = time.perf_counter() - t
        loads["after_diffkit"] = _load()
    assert lib.attrs["absorption_ratio"] == 0.0, lib.attrs["absorption_ratio"]
    tx, ty = lib.tilt_x_mrad.values, lib.tilt_y_mrad.values
    i_t0 = int(np.nonzero((np.abs(tx) < 1e-9) & (np.abs(ty) < 1e-9))[0][0])
    i_t1 = int(np.argmin(np.abs(tx - args.tilt_mrad) + np.abs(ty)))
    assert abs(tx[i_t1] - args.tilt_mrad) < 1e-6 and abs(ty[i_t1]) < 1e-9
    dk = lib.pattern.values[[i_t0, i_t1]].astype(np.float64)  # (2, T, ky, kx)
    n_lib_patterns = lib.sizes["tilt"] * lib.sizes["thickness_nm"]
    print(f"diffkit library: {lib.attrs['n_beams']} beams, {lib.attrs['n_directions']} directions, "
          f"{lib.sizes['tilt']} tilts x {lib.sizes['thickness_nm']} thicknesses, {t_lib:.1f} s", flush=True)

    kx, ky = ab["kx_mrad"], ab["ky_mrad"]
    ab_pat = ab["patterns"].astype(np.float64)  # (2, T, kx, ky)
    assert np.allclose(ab["tilts_mrad"][:, 0], [0.0, args.tilt_mrad], atol=1e-5)
    binned = abtem_to_diffkit_grid(ab_pat, kx, ky, spec.n_px, px)
    centres = abtem_at_pixel_centres(ab_pat, kx, ky, spec.n_px, px)

    # ---- Bloch PACBED directly on abTEM's samples (no resampling at all) ------------------
    in_field = (np.abs(kx)[:, None] < half_field) & (np.abs(ky)[None, :] < half_field)
    direct, t_direct = {}, {}
    for g in direct_g:
        solver = BlochSolver(crystal, spec.energy_kv, g_max=g, absorption=0.0)
        t = time.perf_counter()
        direct[g] = np.stack([bloch_pacbed_on_samples(solver, kx, ky, spec.convergence_mrad, (tt, 0.0), thick_nm)
                              for tt in (0.0, args.tilt_mrad)])
        t_direct[g] = time.perf_counter() - t
        print(f"Bloch PACBED on abTEM's samples, g_max {g} ({solver.n_beams} beams): {t_direct[g]:.0f} s", flush=True)

    # ---- tilt direction: does +x in abTEM match +x in diffkit (and not the mirror)? --------
    tilt_sign = {
        "ncc_same_sign_100nm": ncc(dk[1, -1], binned[1, -1]),
        "ncc_mirrored_100nm": ncc(dk[1, -1][:, ::-1], binned[1, -1]),
    }

    # ---- NCC table ---------------------------------------------------------------------------
    rows = []
    for it, tilt in enumerate((0.0, args.tilt_mrad)):
        for iz, tnm in enumerate(thick_nm):
            r = {
                "tilt_x_mrad": round(tilt, 4), "thickness_nm": tnm, "cells": args.thickness_cells[iz],
                "ncc_binned": ncc(dk[it, iz], binned[it, iz]),
                "ncc_centres": ncc(dk[it, iz], centres[it, iz]) if centres is not None else float("nan"),
                "sum_diffkit": float(dk[it, iz].sum()), "sum_abtem_binned": float(binned[it, iz].sum()),
            }
            for g, d in direct.items():
                r[f"ncc_on_abtem_grid_g{g}"] = ncc(d[it, iz][in_field], ab_pat[it, iz][in_field])
                # the same Bloch solution, binned exactly like abTEM: pixel integration on both sides
                r[f"ncc_both_binned_g{g}"] = ncc(abtem_to_diffkit_grid(d[it, iz], kx, ky, spec.n_px, px), binned[it, iz])
            rows.append(r)
    gcols = [f"ncc_on_abtem_grid_g{g}" for g in direct] + [f"ncc_both_binned_g{g}" for g in direct]
    print(f"\nNCC, diffkit library (g_max {args.g_max}, point-sampled pixel centres) vs abTEM:")
    print(" tilt_x   t(nm)   binned   centres  " + "  ".join(c.replace("ncc_", "") for c in gcols)
          + "   in-field sum diffkit / abTEM")
    for r in rows:
        print(f" {r['tilt_x_mrad']:6.3f} {r['thickness_nm']:7.2f}  {r['ncc_binned']:.5f}  {r['ncc_centres']:.5f}  "
              + "  ".join(f"{r[c]:.5f}".rjust(len(c) - 4) for c in gcols)
              + f"   {r['sum_diffkit']:.4f} / {r['sum_abtem_binned']:.4f}")
    print(f"tilt direction: NCC(diffkit +x, abTEM +x) = {tilt_sign['ncc_same_sign_100nm']:.4f}, "
          f"NCC(diffkit mirrored, abTEM +x) = {tilt_sign['ncc_mirrored_100nm']:.4f} (100 nm)")

    # ---- timings -------------------------------------------------------------------------
    ab_runs = np.asarray(ab["seconds"], float)  # multislice wall time per tilt (all thicknesses)
    n_t = len(thick_nm)
    ab_per_pattern = float(ab_runs.mean() / n_t)
    dk_per_pattern_compared = t_lib / (2 * n_t)  # as if only the compared patterns had been wanted
    dk_per_pattern_lib = t_lib / n_lib_patterns
    # full production library (LibrarySpec() defaults: 96 px, 120 tilts x 239 thicknesses), extrapolated
    full = LibrarySpec(crystal=crystal, tds=False)
    n_dir_full = count_library_directions(full)
    rng = np.random.default_rng(0)
    s_full = BlochSolver(crystal, full.energy_kv, g_max=full.g_max, absorption=0.0)
    qd = rng.uniform(-15, 15, size=(48, 2))
    t = time.perf_counter()
    s_full.amplitudes(qd, np.asarray(full.thickness_nm))
    t_dir_full = (time.perf_counter() - t) / len(qd)
    dk_full_est = n_dir_full * t_dir_full
    n_full_patterns = len(full.tilt_indices()) * len(full.thickness_nm)
    # abTEM for the same library: one multislice run per tilt to the largest thickness (exit planes give
    # every thickness), on a supercell of full.steps_per_g cells (sampling = dq, as here); cost scales with
    # the number of slices and with the grid area (x log for the FFTs)
    gp_here = args.cells * args.gpts_per_cell
    gp_full = full.steps_per_g * args.gpts_per_cell
    slices_here = max(args.thickness_cells) * args.slices_per_cell
    slices_full = int(np.ceil(max(full.thickness_nm) * 10 / a)) * args.slices_per_cell
    scale = (slices_full / slices_here) * (gp_full / gp_here) ** 2 * (np.log2(gp_full**2) / np.log2(gp_here**2))
    ab_full_est = float(ab_runs.mean() * scale * len(full.tilt_indices()))
    loads["end"] = _load()
    timings = {
        "threads": args.threads,
        "load_average_1_5_15min": loads,
        "abtem_worker_wall_s": float(ab["worker_wall_s"]),
        "abtem_multislice_s_per_tilt": ab_runs.tolist(),
        "abtem_s_per_pattern": ab_per_pattern,
        "diffkit_library_s": t_lib,
        "diffkit_library_patterns": int(n_lib_patterns),
        "diffkit_s_per_pattern_compared": dk_per_pattern_compared,
        "diffkit_s_per_pattern_library": dk_per_pattern_lib,
        "diffkit_direct_on_abtem_grid_s": t_direct,
        "speedup_per_compared_pattern": ab_per_pattern / dk_per_pattern_compared,
        "speedup_per_library_pattern": ab_per_pattern / dk_per_pattern_lib,
        "full_library_patterns": int(n_full_patterns),
        "full_library_directions": int(n_dir_full),
        "diffkit_s_per_direction_full_spec": t_dir_full,
        "diffkit_full_library_solve_est_s": dk_full_est,
        "abtem_full_library_est_s": ab_full_est,
        "abtem_full_library_scale_per_run": scale,
        "speedup_full_library_est": ab_full_est / dk_full_est,
    }
    wall = timings["abtem_worker_wall_s"]
    print(f"\nabTEM: {ab_runs.round(1).tolist()} s per multislice run ({n_t} thicknesses each"
          + (f"; worker wall {wall:.0f} s" if np.isfinite(wall) else "") + f") -> {ab_per_pattern:.1f} s per pattern")
    print(f"diffkit: library {t_lib:.1f} s for {n_lib_patterns} patterns ({dk_per_pattern_lib:.3f} s/pattern; "
          f"{dk_per_pattern_compared:.2f} s per compared pattern)")
    print(f"speed ratio per pattern: {timings['speedup_per_compared_pattern']:.0f}x (counting only the {2 * n_t} "
          f"compared patterns), {timings['speedup_per_library_pattern']:.0f}x (every pattern of the library built)")
    print(f"full library ({n_full_patterns} patterns, {n_dir_full} directions): diffkit ~{dk_full_est / 60:.1f} min "
          f"({t_dir_full * 1e3:.0f} ms/direction), abTEM ~{ab_full_est / 3600:.1f} h (estimated) -> "
          f"{timings['speedup_full_library_est']:.0f}x")
    print(f"load average (1, 5, 15 min): {loads}")

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, no GPU",
        "python": sys.version.split()[0],
        "abtem_params": ab["params"],
        "diffkit": {"n_px": spec.n_px, "pixel_size_mrad": px, "fine_step_mrad": dq, "g_max": args.g_max,
                    "n_beams": int(lib.attrs["n_beams"]), "n_directions": int(lib.attrs["n_directions"]),
                    "b_iso": 0.0, "tds": False, "absorption_ratio": 0.0},
        "rows": rows, "tilt_sign": tilt_sign, "timings": timings,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=float))

    if args.write_reference:
        if centres is None:
            raise SystemExit("--write-reference needs abTEM samples at diffkit's pixel centres (--cells = steps_per_g)")
        test_spec = LibrarySpec(crystal=crystal, n_px=args.test_n_px, tilt_max_mrad=0.0)
        steps_test = args.tilt_mrad / test_spec.fine_step_mrad
        if abs(steps_test - round(steps_test)) > 1e-6:
            raise SystemExit(f"the tilt is not a whole number of fine steps of the {args.test_n_px}-px grid")
        pt = test_spec.pixel_size_mrad
        centres_t = abtem_at_pixel_centres(ab_pat, kx, ky, args.test_n_px, pt)
        binned_t = abtem_to_diffkit_grid(ab_pat, kx, ky, args.test_n_px, pt)
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            REFERENCE,
            binned=binned.astype(np.float32),  # (tilt, thickness, ky, kx) on diffkit's n_px grid
            centres=centres.astype(np.float32),
            n_px=np.array(spec.n_px),
            pixel_size_mrad=np.array(px),
            binned_test=binned_t.astype(np.float32),  # the same on the coarser test grid
            centres_test=centres_t.astype(np.float32),
            n_px_test=np.array(args.test_n_px),
            pixel_size_mrad_test=np.array(pt),
            tilt_x_mrad=np.array([0.0, args.tilt_mrad]),
            thickness_nm=np.asarray(thick_nm),
            thickness_cells=np.asarray(args.thickness_cells),
            convergence_mrad=np.array(spec.convergence_mrad),
            energy_kv=np.array(spec.energy_kv),
            ncc_library=np.array([[r["ncc_binned"], r["ncc_centres"]] for r in rows]).reshape(2, n_t, 2),
            info=json.dumps({
                "what": "abTEM multislice PACBEDs of SrTiO3 [001] (static lattice, 200 kV, 13.6 mrad), on diffkit "
                        "LibrarySpec(n_px) pixel grids; axes (tilt, thickness, ky, kx), x = columns. 'binned': "
                        "abTEM samples integrated over each pixel; 'centres': the abTEM samples that lie exactly at "
                        "the pixel centres, scaled by pixel area / sample area. Tilt along +x (abTEM "
                        "Probe(tilt=(t, 0)) == diffkit tilt_x_mrad = t).",
                "made_by": "benchmarks/bloch_vs_abtem.py --write-reference",
                "ncc_library_g_max": args.g_max,
                "abtem": {k: v for k, v in ab["params"].items() if k != "out"}, "date": result["date"]}),
        )
        print(f"wrote {REFERENCE.relative_to(HERE.parent)} ({REFERENCE.stat().st_size / 1024:.0f} kB)")
    return result


if __name__ == "__main__":
    main()
