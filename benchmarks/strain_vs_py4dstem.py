"""Strain precision and speed: diffkit vs py4DSTEM 0.14 on a simulated NBED scan with a known field.

The scan is diffkit's Si/SiGe-like multilayer (``diffkit.strain.multilayer_field``): Si [001],
200 kV, Bloch-wave disk intensities (thickness wedge, tilt bowl, strain-dependent), exact disk
positions, Poisson noise at a realistic dose. Both tools get the same counts in memory.

* diffkit: ``diffkit.strain.map_strain`` (neural disk detection + lattice fit + exact strain),
  methods ``anchor-free`` and ``subimage-cnn``.
* py4DSTEM 0.14: ``find_Bragg_disks`` with a probe template made from a simulated vacuum probe
  (sine-squared sigmoid edge kernel), ``subpixel='multicorr'``, upsample factors 16 and 32,
  then its lattice/strain workflow (``StrainMap``: origin, basis vectors, per-pattern fit,
  strain vs the reference region). py4DSTEM is GPL-3.0 and pins numpy < 2, so it runs in a
  *separate* virtual environment (created on first use, or ``--py4dstem-python``) through
  ``py4dstem_worker.py``; it is never a diffkit dependency.

Metrics (strain is dimensionless): std of exx/eyy/exy in the strain-free region (truth = 0),
bias (mean error) on the strained layer plateaus and overall, rms error, disk recall/precision
(required disks: wholly on the detector, SNR >= 8), centre errors of the detected disks, and
patterns per second of the whole pipeline.

Usage::

    python benchmarks/strain_vs_py4dstem.py --out strain_benchmark.json
    python benchmarks/strain_vs_py4dstem.py --no-py4dstem          # diffkit only
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def simulate(args):
    from diffkit.strain import nbed

    Y, X = args.scan
    f = nbed.multilayer_field((Y, X), substrate_cols=max(4, X // 4))
    yy, xx = np.meshgrid(np.arange(Y), np.arange(X), indexing="ij")
    t0_, t1_ = args.thickness
    t = t0_ + (t1_ - t0_) * yy / max(Y - 1, 1)
    rmax = np.hypot((Y - 1) / 2, (X - 1) / 2)
    tilt = np.stack([xx - (X - 1) / 2, yy - (Y - 1) / 2], -1) * args.tilt_max / rmax
    t0 = time.perf_counter()
    spec = None
    if args.sim_g_max or args.sim_strain_order is not None:
        spec = nbed.NBEDTableSpec(g_max=args.sim_g_max or nbed.NBEDTableSpec().g_max,
                                  strain_order=2 if args.sim_strain_order is None else args.sim_strain_order)
        print(f"simulating with another Bloch-wave table than diffkit's default: g_max {spec.g_max} 1/A, "
              f"strain order {spec.strain_order} (computed once, cached)")
    tail = args.psf_tail
    scan = nbed.simulate_nbed(f["exx"], f["eyy"], f["exy"], f["theta_deg"], thickness_nm=t, tilt_mrad=tilt,
                              convergence_mrad=args.alpha, pixel_size_mrad=args.alpha / args.radius_px,
                              detector_px=args.detector, dose=np.inf if tail else args.dose,
                              background=args.background, radial_background=0.01, blur_px=args.blur,
                              center_offset_px=(0.3, -0.2), seed=args.seed, progress=True, table_spec=spec)
    if tail:
        # a detector point-spread function with a long tail (charge sharing / backscatter of a direct
        # detector): (1 - tail) * G(blur) + tail * G(3 px), then Poisson noise at the dose
        import torch

        from diffkit.strain.nbed import gaussian_blur

        x = torch.as_tensor(scan.patterns.reshape(-1, *scan.patterns.shape[2:]), dtype=torch.float32)
        y = (1 - tail) * x + tail * gaussian_blur(x, 3.0)
        lam = y / y.sum((1, 2), keepdim=True) * args.dose
        gen = torch.Generator().manual_seed(args.seed)
        scan.patterns = torch.poisson(lam, generator=gen).numpy().reshape(scan.patterns.shape)
        print(f"detector PSF with a {tail:.0%} tail of sigma 3 px")
    print(f"simulated {Y * X} patterns in {time.perf_counter() - t0:.1f} s")
    return scan, f["reference"]


def vacuum_probe(args):
    """Simulated vacuum probe: the aperture disk (no specimen) with the same detector blur."""
    import torch

    from diffkit.strain.nbed import gaussian_blur

    H = args.detector
    c = (H - 1) / 2
    yy, xx = np.mgrid[:H, :H].astype(float)
    disk = np.clip(args.radius_px - np.hypot(xx - c, yy - c) + 0.5, 0, 1)
    return gaussian_blur(torch.tensor(disk[None], dtype=torch.float32), args.blur)[0].numpy(), (c, c)


def required_disks(truth, radius, background_per_px):
    """Truth disk centres (N, K, 2) and a mask of the required ones (whole disk on chip, SNR >= 8)."""
    T = np.stack([truth.disk_x.values, truth.disk_y.values], -1)
    T = T.reshape(-1, T.shape[-2], 2)
    S = truth.disk_counts.values.reshape(T.shape[:2])
    snr = S / np.sqrt(S + background_per_px * np.pi * radius**2)
    return T, snr


def match(pred_list, T, req, tol):
    """Recall over required truth disks and precision of predictions (matched to any truth disk)."""
    n_req = n_found = n_pred = n_ok = 0
    errs = []
    for b, P in enumerate(pred_list):
        P = np.asarray(P, float).reshape(-1, 2)
        t = T[b]
        ok_t = np.isfinite(t[:, 0])
        n_pred += len(P)
        n_req += int(req[b].sum())
        if len(P) == 0:
            continue
        d = np.linalg.norm(P[:, None] - t[None, ok_t], axis=-1)
        idx_t = np.nonzero(ok_t)[0]
        near = d.min(1) < tol
        n_ok += int(near.sum())
        for j in idx_t[req[b, ok_t]]:
            dj = np.linalg.norm(P - t[j], axis=1)
            i = int(np.argmin(dj))
            if dj[i] < tol:
                n_found += 1
                errs.append(P[i] - t[j])
    e = np.array(errs).reshape(-1, 2)
    r = np.linalg.norm(e, axis=1) if len(e) else np.zeros(0)
    return {"recall": n_found / max(n_req, 1), "precision": n_ok / max(n_pred, 1), "required_disks": n_req,
            "centre_error_rms_per_axis_px": float(np.sqrt(np.mean(e**2))) if len(e) else None,
            "centre_error_median_px": float(np.median(r)) if len(r) else None,
            "centre_error_p90_px": float(np.percentile(r, 90)) if len(r) else None}


def strain_metrics(est: dict, truth, status=None):
    """std in the strain-free region, bias on the plateaus and overall, rms error."""
    tr = {k: truth[k].values for k in ("exx", "eyy", "exy", "theta_deg")}
    free = (np.abs(tr["exx"]) < 1e-7) & (np.abs(tr["eyy"]) < 1e-7) & (np.abs(tr["exy"]) < 1e-7)
    plateau = tr["exx"] >= 0.99 * tr["exx"].max()
    ok = np.ones(free.shape, bool) if status is None else (status == 0)
    out = {"valid_fraction": float(np.mean(ok & np.isfinite(est["exx"])))}
    for k in ("exx", "eyy", "exy"):
        v = np.where(ok, est[k], np.nan)
        e = v - tr[k]
        out[k] = {"std_strain_free": float(np.nanstd(v[free])), "mean_strain_free": float(np.nanmean(v[free])),
                  "bias_overall": float(np.nanmean(e)), "rms_error": float(np.sqrt(np.nanmean(e**2))),
                  "bias_plateau": float(np.nanmean(e[plateau]))}
    e = np.where(ok, est["theta_deg"], np.nan) - tr["theta_deg"]
    out["theta_deg"] = {"rms_error": float(np.sqrt(np.nanmean(e**2))), "std_strain_free": float(np.nanstd(e[free]))}
    return out


def run_diffkit(scan, ref, args):
    import torch

    from diffkit.strain import detect_disks, map_strain
    from diffkit.strain.detect import load_disk_models, select_disk_models

    models = (load_disk_models(args.model, device=args.device) if args.model
              else select_disk_models(scan.calibration, device=args.device))
    print(f"diffkit disk model: {models.card.get('id')}")
    res = {"model": models.card.get("id")}
    N = scan.patterns.shape[0] * scan.patterns.shape[1]
    data = scan.patterns.astype(np.float32)
    for method in args.methods:
        for refine in args.refine:
            key = f"{method}/{refine}"
            t0 = time.perf_counter()
            ds = map_strain(data, ref, calibration=scan.calibration, method=method, models=models, progress=False,
                            refine=None if refine == "none" else refine)
            dt = time.perf_counter() - t0
            m = strain_metrics({k: ds[k].values for k in ("exx", "eyy", "exy", "theta_deg")}, scan.truth, ds.status.values)
            m["patterns_per_s"] = N / dt
            m["seconds"] = dt
            res[key] = m
            print(f"diffkit {key}: {N / dt:.0f} patterns/s, std exx {m['exx']['std_strain_free']:.2e}, "
                  f"bias exx {m['exx']['bias_plateau']:.2e}")
    # disk recall / precision of the anchor-free detector on the whole scan
    flat = data.reshape(N, *data.shape[2:])
    t0 = time.perf_counter()
    det = detect_disks(flat, scan.calibration, models=models, refine="cnn")
    dt = time.perf_counter() - t0
    preds = [det.positions[b][det.valid[b]] for b in range(N)]
    res["detection"] = {"patterns_per_s": N / dt, "pred": preds}
    res["threads"] = torch.get_num_threads()
    return res


def ensure_py4dstem(path_arg):
    if path_arg:
        return path_arg
    from diffkit.sim.pacbed import default_cache_dir

    venv = default_cache_dir() / "py4dstem-venv"
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not py.exists():
        print(f"creating a separate virtual environment for py4DSTEM (GPL, numpy<2) in {venv} ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "py4DSTEM==0.14.*"], check=True)
    return str(py)


def run_py4dstem(scan, ref, args, probe, origin):
    py = ensure_py4dstem(args.py4dstem_python)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        np.save(tmp / "data.npy", scan.patterns.astype(np.float32))
        np.save(tmp / "probe.npy", probe)
        np.save(tmp / "ref.npy", np.asarray(ref, bool))
        params = {"data": str(tmp / "data.npy"), "probe": str(tmp / "probe.npy"), "reference": str(tmp / "ref.npy"),
                  "radius_px": args.radius_px, "origin": list(origin), "upsample_factors": args.upsample,
                  "out": str(tmp / "out.npz")}
        (tmp / "params.json").write_text(json.dumps(params))
        env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS=str(args.threads))
        r = subprocess.run([py, str(HERE / "py4dstem_worker.py"), str(tmp / "params.json")], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("py4DSTEM worker failed:\n" + r.stderr[-4000:])
        meta = json.loads((tmp / "out.npz.json").read_text())
        arr = dict(np.load(tmp / "out.npz"))
    return meta, arr


def py4dstem_metrics(scan, ref, meta, arr, args, T, req):
    from diffkit.strain.lattice import linearised_strain, reference_lattice, strain_from_lattice

    Y, X = scan.patterns.shape[:2]
    out = {"version": meta["py4DSTEM_version"]}
    for up in args.upsample:
        d = meta[f"up{up}"]
        g = arr[f"g1g2_up{up}"]  # g1x, g1y, g2x, g2y, mask in py4DSTEM (qx = row, qy = column) coordinates
        # diffkit frame: x = column = py4DSTEM qy, y = row = py4DSTEM qx
        G = np.empty((Y, X, 2, 2))
        G[..., 0, 0], G[..., 1, 0] = g[1], g[0]
        G[..., 0, 1], G[..., 1, 1] = g[3], g[2]
        mask = g[4].astype(bool) & np.all(np.isfinite(G), axis=(-2, -1))
        G0 = reference_lattice(G, ref, np.where(mask, 0, 1))
        ex = strain_from_lattice(G, G0)
        ex = {k: np.where(mask, v, np.nan) for k, v in ex.items()}
        lin = linearised_strain(G, G0)
        lin = {k: np.where(mask, v, np.nan) for k, v in lin.items()}
        s = arr[f"strain_up{up}"]  # py4DSTEM's own e_xx (along qx = rows = our y), e_yy, e_xy, theta, mask
        own = {"exx": s[1], "eyy": s[0], "exy": s[2], "theta_deg": -np.rad2deg(s[3])}
        own = {k: np.where(s[4].astype(bool), v, np.nan) for k, v in own.items()}
        pk = arr[f"peaks_up{up}"]
        preds = [[] for _ in range(Y * X)]
        for i, j, qx, qy, _ in pk:
            preds[int(i) * X + int(j)].append((qy, qx))
        det = match(preds, T, req, 0.5 * args.radius_px)
        out[f"upsample{up}"] = {
            "detect_patterns_per_s": d["detect_patterns_per_s"], "total_patterns_per_s": d["total_patterns_per_s"],
            "detect_seconds": d["detect_seconds"], "strain_seconds": d["strain_seconds"],
            "strain_exact_definition": strain_metrics(ex, scan.truth),
            "strain_py4dstem_own_output": strain_metrics(own, scan.truth),
            "strain_linearised_from_py4dstem_lattice": strain_metrics(lin, scan.truth),
            "detection": det,
        }
        print(f"py4DSTEM upsample {up}: {d['total_patterns_per_s']:.0f} patterns/s (detect {d['detect_patterns_per_s']:.0f}), "
              f"std exx {out[f'upsample{up}']['strain_exact_definition']['exx']['std_strain_free']:.2e}, recall {det['recall']:.4f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=lambda s: tuple(int(v) for v in s.split("x")), default=(48, 48), help="YxX")
    ap.add_argument("--detector", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=2.0, help="convergence semi-angle (mrad)")
    ap.add_argument("--radius-px", type=float, default=5.0, help="disk radius on the detector (px)")
    ap.add_argument("--dose", type=float, default=5e5, help="electrons per pattern")
    ap.add_argument("--background", type=float, default=0.003)
    ap.add_argument("--blur", type=float, default=0.5)
    ap.add_argument("--tilt-max", type=float, default=0.8)
    ap.add_argument("--thickness", type=float, nargs=2, default=(60.0, 90.0), help="thickness wedge along y (nm)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--sim-g-max", type=float, default=None,
                    help="simulate with a Bloch-wave table of this many beams (|g| <= G_MAX 1/A) instead of the "
                         "default 1.5, so that refine='model' (which uses the default table) meets data it was "
                         "not made from")
    ap.add_argument("--sim-strain-order", type=int, default=None, help="strain order of that table (0, 1, 2)")
    ap.add_argument("--psf-tail", type=float, default=0.0,
                    help="fraction of the detector PSF in a sigma = 3 px tail (model mismatch for refine='model')")
    ap.add_argument("--methods", nargs="+", default=["anchor-free", "subimage-cnn"])
    ap.add_argument("--refine", nargs="+", default=["cnn"], help="diffkit refinement(s): cnn, fit, none")
    ap.add_argument("--upsample", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--py4dstem-python", default=None, help="python of a venv with py4DSTEM 0.14 (default: create one)")
    ap.add_argument("--no-py4dstem", action="store_true")
    ap.add_argument("--model", default=None,
                    help="diffkit disk model (e.g. disks_nbed, the general one); default: chosen from the scan's "
                         "calibration (diffkit.strain.detect.select_disk_models)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="strain_benchmark.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    scan, ref = simulate(args)
    r = args.radius_px
    mean_px = float(scan.patterns.mean())
    T, snr = required_disks(scan.truth, r, args.background * mean_px)
    H = args.detector
    full = (T[..., 0] >= r - 0.5) & (T[..., 0] <= H - 0.5 - r) & (T[..., 1] >= r - 0.5) & (T[..., 1] <= H - 0.5 - r)
    req = full & (snr >= 8)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "scan": {"shape": list(args.scan), "detector_px": H, "alpha_mrad": args.alpha, "radius_px": r,
                 "dose_e_per_pattern": args.dose, "thickness_nm": f"{args.thickness[0]:g}-{args.thickness[1]:g} wedge", "tilt_max_mrad": args.tilt_max,
                 "max_exx": float(scan.truth.exx.max()), "required_disks_per_pattern": float(req.sum(1).mean()),
                 "sim_g_max": args.sim_g_max, "sim_strain_order": args.sim_strain_order, "psf_tail": args.psf_tail},
    }
    dk = run_diffkit(scan, ref, args)
    det = match(dk["detection"].pop("pred"), T, req, 0.5 * r)
    dk["detection"].update(det)
    results["diffkit"] = dk
    print(f"diffkit detection: recall {det['recall']:.4f}, precision {det['precision']:.4f}, "
          f"{dk['detection']['patterns_per_s']:.0f} patterns/s")
    if not args.no_py4dstem:
        probe, origin = vacuum_probe(args)
        meta, arr = run_py4dstem(scan, ref, args, probe, origin)
        results["py4dstem"] = py4dstem_metrics(scan, ref, meta, arr, args, T, req)
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
