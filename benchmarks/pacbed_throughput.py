"""Throughput of the PACBED pipeline (raw pattern in -> thickness, tilt, uncertainty out).

Measures patterns/s of the shipped diffkit model (alignment iterations + measurement
network + OOD check) at batch sizes 1 and 256 (and a large batch on CUDA, where mixed
precision is used automatically), and, in the same run, of a baseline with
the seed paper's network size: an AlexNet-sized CNN on 227x227 inputs (random weights;
only its cost matters), applied once for thickness and once for tilt as in the paper.

The baseline runs on the same device with the same precision policy.

Run: ``python benchmarks/pacbed_throughput.py [--convergence 19.1] [--threads 2] [--large-batch 4096]``
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import time

import numpy as np
import torch
from torch import nn


def alexnet_like(n_out=120):
    """AlexNet layer sizes (Krizhevsky et al. 2012) for a 1-channel 227x227 input."""
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, n_out)).eval()


def timeit(fn, n_items, min_time=3.0):
    fn()  # warm-up
    t0 = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < min_time:
        fn()
        done += n_items
    return done / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convergence", type=float, default=13.6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--detector-px", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--synthetic", action="store_true", help="time synthetic disks, not the held-out frames")
    ap.add_argument("--align-views", type=int, default=None, choices=range(1, 9), metavar="1-8",
                    help="views averaged in the last alignment pass (default: the predictor's, 4; 1 = off)")
    ap.add_argument("--no-thin-rule", action="store_true",
                    help="disable the model card's thin-pattern axes rule (one measurement pass less per batch with thin patterns)")
    ap.add_argument("--no-thin-refine", action="store_true",
                    help="keep the rule's harmonic axes for thin patterns, without the least-squares geometry "
                         "refinement against the card's reference patterns")
    ap.add_argument("--no-thin-measure", action="store_true",
                    help="the general network's tilt for thin patterns too (no thin-crystal measurement network)")
    ap.add_argument("--large-batch", type=int, default=None,
                    help="also time this batch size (default: 4096 on CUDA, none on CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffkit.pacbed import load_predictor
    from diffkit.pacbed.predictor import default_device

    pred = load_predictor(material="SrTiO3", zone="001", energy_kv=200, convergence_mrad=args.convergence)
    if args.align_views:
        pred.align_views = args.align_views
    if args.no_thin_rule:
        pred.thin_rotation = None
    if args.no_thin_refine:
        pred.thin_refine = False
    if args.no_thin_measure:
        pred.use_thin_measure = False
    rng = np.random.default_rng(0)
    n = args.detector_px
    fixture = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout_sto_13.6mrad.npz"
    if args.convergence == 13.6 and n == 128 and fixture.exists() and not args.synthetic:
        # realistic input: the held-out simulated raw frames (dose, background, blur, distortion),
        # whose alignment converges like real data (early stop)
        real = np.load(fixture)["patterns"].astype(np.float32)
        pool, source = real, f"held-out simulated raw frames ({len(real)}, tiled)"
    else:
        yy, xx = np.mgrid[:n, :n]
        base = ((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 4) ** 2).astype(np.float32) * 100 + 5
        pool, source = rng.poisson(base, size=(256, n, n)).astype(np.float32), "synthetic disks (Poisson)"

    def batch_of(k):
        return np.ascontiguousarray(pool[np.arange(k) % len(pool)])

    batch256 = batch_of(256)
    one = batch256[:1]
    print(f"input: {source}, {n}x{n} px")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"device: {default_device()} (GPU: {gpu}), torch {torch.__version__}, threads: {torch.get_num_threads()}, "
          f"CPU: {platform.processor() or platform.machine()}")
    print(f"alignment: up to {pred.align_iterations} passes, last pass averaged over {pred.align_views} view(s); "
          f"thin-pattern axes rule {'on' if pred.thin_rotation else 'off'}, "
          f"least-squares refinement {'on' if pred.thin_rotation and pred.thin_refine else 'off'}, "
          f"thin-crystal tilt network {'on' if pred.use_thin_measure else 'off'}")
    r1 = timeit(lambda: pred.predict_batch(one), 1, args.seconds)
    r256 = timeit(lambda: pred.predict_batch(batch256), 256, args.seconds)
    large = args.large_batch or (4096 if default_device().type == "cuda" else None)
    if large:
        big = batch_of(large)
        rlarge = timeit(lambda: pred.predict_batch(big), large, args.seconds)
    dev = default_device()
    net = alexnet_like().to(dev)
    x227 = torch.randn(64, 3, 227, 227, device=dev)

    def seed_pipeline():
        # same device and precision policy as the diffkit predictor (mixed precision on CUDA)
        with torch.no_grad(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
            net(x227)  # thickness
            net(x227)  # tilt
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rb = timeit(seed_pipeline, 64, args.seconds)
    print(f"diffkit pipeline, batch 1:   {r1:8.1f} patterns/s")
    print(f"diffkit pipeline, batch 256: {r256:8.1f} patterns/s")
    if large:
        print(f"diffkit pipeline, batch {large}: {rlarge:8.1f} patterns/s")
    print(f"seed-size baseline (AlexNet 227x227 x2 networks, networks only), batch 64: {rb:8.1f} patterns/s")
    print(f"ratio diffkit(batch 256) / seed-size baseline: {r256 / rb:.1f}x")


if __name__ == "__main__":
    main()
