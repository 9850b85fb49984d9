"""Throughput of ``diffkit.maps.map_pacbed`` on synthetic scans of growing size.

For each scan size N (N x N positions, ``--det`` px detector) the script writes a synthetic
uint16 zarr scan to a temporary directory (Poisson frames: a disk on a weak background;
frames are drawn from a pool of pre-generated Poisson frames so writing stays fast), then,
in a fresh subprocess (so the peak RSS is that of one size alone):

* a pure read pass, ``dask.array.from_zarr(...).mean(axis=(0, 1))`` over the same store,
  with the same scheduler: the I/O + decompression baseline;
* ``map_pacbed`` on the same store with the shipped PACBED predictor (loaded once
  beforehand, its load time reported separately).

It prints wall time, frames/s (scan positions per second), patterns/s (local PACBED
windows per second), the read-pass time and its ratio to the map time, the time spent
inside ``predict_batch`` (summed over worker threads), peak RSS, and how the time grows
with the scan size (log-log slope of time vs number of frames; 1.0 = linear).

If ``diffkit.pacbed.load_predictor`` cannot be imported or loaded, the script says so and
uses a *baseline predictor* instead (thickness = total counts / 1000, tilt from the centre
of mass, no network): then the numbers measure only the map machinery (windows, I/O, dask,
store), not the neural network.

Run: ``python benchmarks/map_throughput.py --sizes 64 128 256 --det 128``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ALPHA_MRAD = 13.6  # convergence semi-angle of the shipped SrTiO3 [001] 200 kV model


class BaselinePredictor:
    """Trivial stand-in when the real predictor is unavailable: counts and centre of mass only."""

    card_id = "baseline-counts-com (NOT a neural network)"
    input_requirements = {"min_px": 1}

    def predict_batch(self, patterns, **options):
        p = np.asarray(patterns, np.float64)
        n, h, w = p.shape
        tot = p.sum(axis=(1, 2))
        yy, xx = np.indices((h, w))
        safe = np.where(tot > 0, tot, 1)
        tx = 0.5 * ((p * xx).sum(axis=(1, 2)) / safe - (w - 1) / 2)
        ty = 0.5 * ((p * yy).sum(axis=(1, 2)) / safe - (h - 1) / 2)
        z = np.zeros(n)
        return {"thickness_nm": tot / 1000, "thickness_std_nm": z, "tilt_x_mrad": tx, "tilt_y_mrad": ty,
                "tilt_x_std_mrad": z, "tilt_y_std_mrad": z, "tilt_magnitude_mrad": np.hypot(tx, ty),
                "tilt_azimuth_deg": np.degrees(np.arctan2(ty, tx)) % 360, "ood": np.zeros(n, bool),
                "ood_reason": np.zeros(n, np.uint8)}


class Timed:
    """Wraps a predictor and sums the wall time spent in predict_batch (over all threads)."""

    def __init__(self, pred):
        self.pred, self.card_id, self.seconds, self.calls = pred, pred.card_id, 0.0, 0
        self.input_requirements = getattr(pred, "input_requirements", None)
        self.ood_reasons = getattr(pred, "ood_reasons", None)
        self.device = getattr(pred, "device", None)  # map_pacbed sizes blocks/batches for CUDA

    def predict_batch(self, patterns, **options):
        t0 = time.perf_counter()
        try:
            return self.pred.predict_batch(patterns, **options)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def calibration(det):
    from diffkit.calibration import Calibration

    # the disk (radius det/5 px) is the convergence angle: pixel size from it
    return Calibration(beam_energy_kv=200, convergence_mrad=ALPHA_MRAD, pixel_size_mrad=ALPHA_MRAD / (det / 5),
                       scan_step_nm=0.4, material="SrTiO3", zone_axis="001")


def write_scan(path, n, det, rows_per_chunk, seed=0):
    """Synthetic uint16 scan (n, n, det, det) written chunk by chunk (never held whole)."""
    import zarr

    rng = np.random.default_rng(seed)
    yy, xx = np.indices((det, det)) - (det - 1) / 2
    r = np.hypot(yy, xx)
    pool = []
    for k in range(32):  # a pool of Poisson frames with slightly different disk intensities
        pattern = np.where(r < det / 5, 60.0 * (1 + 0.02 * k), 3.0) * (1 + 0.3 * np.cos(r / 3 + k))
        pool.append(rng.poisson(np.clip(pattern, 0, None)).astype(np.uint16))
    pool = np.stack(pool)
    arr = zarr.open_array(path, mode="w", shape=(n, n, det, det), chunks=(rows_per_chunk, n, det, det),
                          dtype=np.uint16)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)
        arr[r0:r1] = pool[rng.integers(0, len(pool), size=(r1 - r0, n))]
    return arr.nbytes


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_one(args):
    """Child process: read baseline + map for one store; prints one JSON line."""
    import dask
    import dask.array as da

    from diffkit.maps import map_pacbed

    out = {"size": args.one_size}
    cal = calibration(args.det)
    t0 = time.perf_counter()
    predictor, why = None, ""
    if not args.baseline:
        try:
            from diffkit.pacbed import load_predictor

            predictor = load_predictor(cal, device=args.device)
        except Exception as exc:  # import or model problems: fall back, loudly
            why = f"{type(exc).__name__}: {exc}"
    if predictor is None:
        predictor = BaselinePredictor()
        out["baseline_reason"] = why or "--baseline given"
    out["load_s"] = time.perf_counter() - t0
    warm = np.random.default_rng(1).poisson(20, size=(2, args.det, args.det)).astype(np.float32)
    predictor.predict_batch(warm)  # warm-up (first-call allocations), not timed
    out["card_id"] = predictor.card_id
    try:
        import torch

        out["device"] = str(getattr(predictor, "device", "cpu"))
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        out["device"] = "cpu"
    timed = Timed(predictor)

    sched = args.scheduler
    if sched not in ("threads", "processes", "sync"):
        from distributed import Client

        client = Client(sched)
        read_kw = {"scheduler": client}
    else:
        client = None
        read_kw = {"scheduler": sched}
    x = da.from_zarr(args.one_store)
    t0 = time.perf_counter()
    dask.compute(x.mean(axis=(0, 1)), **read_kw)
    out["read_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ds = map_pacbed(x, window=args.window, step=args.step, predictor=timed, calibration=cal,
                    scheduler=client or sched, progress=False, batch_size=args.batch_size,
                    store=os.path.join(os.path.dirname(args.one_store), "map.zarr") if args.store else None)
    out["map_s"] = time.perf_counter() - t0
    out["predict_s"] = timed.seconds if sched in ("threads", "sync") else float("nan")
    out["patterns"] = int(ds.thickness_nm.size)
    out["frames"] = int(x.shape[0] * x.shape[1])
    out["ok_fraction"] = float((ds.status.values == 0).mean())
    out["peak_rss_mib"] = rss_mib()
    if client is not None:
        client.close()
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="scan sizes N (N x N positions)")
    ap.add_argument("--det", type=int, default=128, help="detector size (px)")
    ap.add_argument("--window", type=int, default=4, help="local PACBED window (scan positions)")
    ap.add_argument("--step", type=int, default=None, help="window step (default: window, i.e. tiled)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: map_pacbed's (256 CPU, 1024 CUDA)")
    ap.add_argument("--rows-per-chunk", type=int, default=None,
                    help="scan rows per zarr chunk (default: about 32 MiB chunks)")
    ap.add_argument("--scheduler", default="threads", help="threads | processes | sync | tcp://host:port")
    ap.add_argument("--device", default=None, help="torch device for the shipped model (default: CUDA if any)")
    ap.add_argument("--store", action="store_true", help="also write the map to a zarr store (resumable mode)")
    ap.add_argument("--baseline", action="store_true", help="use the trivial baseline predictor on purpose")
    ap.add_argument("--tmpdir", default=None, help="where to write the synthetic scans (default: system temp)")
    ap.add_argument("--one-store", help=argparse.SUPPRESS)
    ap.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_store:
        return measure_one(args)

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}, "
          f"scheduler={args.scheduler}, detector {args.det}x{args.det} uint16, window {args.window}, "
          f"step {args.step or args.window}")
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix=f"diffkit_map_{n}_") as tmp:
            store = os.path.join(tmp, "scan.zarr")
            rpc = args.rows_per_chunk or max(1, (32 * 2**20) // (n * args.det * args.det * 2))
            rpc = max(args.window, rpc // args.window * args.window)  # chunk rows a multiple of the window
            t0 = time.perf_counter()
            nbytes = write_scan(store, n, args.det, rpc)
            t_write = time.perf_counter() - t0
            cmd = [sys.executable, os.path.abspath(__file__), "--one-store", store, "--one-size", str(n),
                   "--det", str(args.det), "--window", str(args.window),
                   "--scheduler", args.scheduler]
            for flag, val in (("--step", args.step), ("--device", args.device), ("--batch-size", args.batch_size)):
                if val is not None:
                    cmd += [flag, str(val)]
            cmd += ["--store"] * args.store + ["--baseline"] * args.baseline
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"size {n}: measurement failed (rc={proc.returncode})")
            r = json.loads(line[0][7:])
            r.update(write_s=t_write, gib=nbytes / 2**30, rows_per_chunk=rpc)
            rows.append(r)
            if "baseline_reason" in r:
                print("!" * 78)
                print(f"!! NOT THE NEURAL NETWORK: using the baseline predictor ({r['baseline_reason']}).")
                print("!! These numbers measure the map machinery only (I/O, windows, dask, store).")
                print("!" * 78)
            print(f"\n{n}x{n} scan ({r['gib']:.2f} GiB, {r['frames']} frames, chunks of {rpc} rows), "
                  f"model {r['card_id']} on {r.get('device')}")
            print(f"  wrote the scan in {t_write:.1f} s; predictor load {r['load_s']:.2f} s (not in map time)")
            print(f"  map_pacbed      {r['map_s']:8.2f} s  {r['frames'] / r['map_s']:10.0f} frames/s  "
                  f"{r['patterns'] / r['map_s']:8.1f} patterns/s ({r['patterns']} windows, "
                  f"{100 * r['ok_fraction']:.0f} % status ok)")
            print(f"  read pass       {r['read_s']:8.2f} s  {r['frames'] / r['read_s']:10.0f} frames/s  "
                  f"(da.mean over the same store)")
            print(f"  read / map      {r['read_s'] / r['map_s']:8.2f}    "
                  f"predict_batch {r['predict_s']:.2f} s (summed over threads) = "
                  f"{r['predict_s'] / r['map_s']:.2f} x map time")
            print(f"  peak RSS        {r['peak_rss_mib']:8.0f} MiB (measurement process)")
    if len(rows) > 1:
        print("\nscaling (time vs number of frames, log-log slope; 1.0 = linear):")
        print(f"  {'size':>6} {'frames':>8} {'map s':>8} {'read s':>8} {'frames/s':>10} {'RSS MiB':>8} {'slope':>6}")
        for k, r in enumerate(rows):
            slope = ""
            if k:
                p = rows[k - 1]
                slope = f"{math.log(r['map_s'] / p['map_s']) / math.log(r['frames'] / p['frames']):.2f}"
            print(f"  {r['size']:>6} {r['frames']:>8} {r['map_s']:>8.2f} {r['read_s']:>8.2f} "
                  f"{r['frames'] / r['map_s']:>10.0f} {r['peak_rss_mib']:>8.0f} {slope:>6}")


if __name__ == "__main__":
    main()
