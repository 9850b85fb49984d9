"""Training and held-out evaluation of the PACBED networks on a simulated library.

Training is on the fly: every batch draws library patterns (thickness interpolated
between the *training* thicknesses, whole-nm by default), applies a random symmetry
operation of the 4mm zone (mirrors and transpose, with the signed tilt labels
transformed accordingly) and the detector/specimen effects of
:mod:`diffkit.sim.detector`. Held-out evaluation uses the library's half-nm thicknesses,
which training never sees, and a different random seed for every effect.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..pacbed.geometry import normalise
from ..pacbed.networks import AlignNet, MeasureNet, distribution_stats, soft_targets
from ..sim.detector import DetectorParams, DetectorRanges, apply_detector, random_params


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters (recorded in the model card)."""

    seed: int = 20261122
    measure_steps: int = 4000
    align_steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    thickness_sigma_nm: float = 0.6
    tilt_sigma_mrad: float = 0.12
    tilt_bin_mrad: float = 0.05
    thickness_bin_nm: float = 0.5
    train_thickness_step_nm: float = 1.0
    measure_ranges: DetectorRanges = dataclasses.field(default_factory=DetectorRanges)
    align_ranges: DetectorRanges = dataclasses.field(default_factory=lambda: DetectorRanges(
        scale=(0.85, 1.18), rotation_deg=(-45.0, 45.0), shift_px=8.0, affine=0.02))
    threads: int | None = None


class LibrarySampler:
    """Draws augmented training/test patterns from a PACBED library Dataset."""

    def __init__(self, lib, thickness_values=None):
        self.patterns = np.asarray(lib["pattern"].values, dtype=np.float32)  # (n_tilt, n_t, H, W)
        self.tilt_x = np.asarray(lib["tilt_x_mrad"].values, float)
        self.tilt_y = np.asarray(lib["tilt_y_mrad"].values, float)
        self.thickness = np.asarray(lib["thickness_nm"].values, float)
        self.attrs = dict(lib.attrs)
        self.n_px = self.patterns.shape[-1]
        if thickness_values is None:
            self.t_idx = np.arange(len(self.thickness))
        else:
            want = np.asarray(thickness_values, float)
            self.t_idx = np.array([int(np.argmin(abs(self.thickness - t))) for t in want])
            if not np.allclose(self.thickness[self.t_idx], want, atol=1e-6):
                raise ValueError("requested thicknesses are not all in the library")

    @property
    def thickness_range(self):
        t = self.thickness[self.t_idx]
        return float(t.min()), float(t.max())

    def draw(self, n: int, rng: np.random.Generator, interpolate: bool = True):
        """Return patterns (n, H, W), thickness (n,), signed tilt_x, tilt_y (n,) in nm / mrad."""
        ti = rng.integers(0, len(self.tilt_x), n)
        ts = self.thickness[self.t_idx]
        if interpolate and len(ts) > 1:
            t = rng.uniform(ts.min(), ts.max(), n)
            k = np.clip(np.searchsorted(ts, t) - 1, 0, len(ts) - 2)
            f = ((t - ts[k]) / (ts[k + 1] - ts[k]))[:, None, None]
            pats = (1 - f) * self.patterns[ti, self.t_idx[k]] + f * self.patterns[ti, self.t_idx[k + 1]]
        else:
            k = rng.integers(0, len(ts), n)
            t = ts[k]
            pats = self.patterns[ti, self.t_idx[k]].copy()
        tx, ty = self.tilt_x[ti].copy(), self.tilt_y[ti].copy()
        # random element of the 4mm group: transpose, mirror x, mirror y
        tr = rng.random(n) < 0.5
        pats[tr] = np.swapaxes(pats[tr], -1, -2)
        tx[tr], ty[tr] = ty[tr], tx[tr].copy()
        fx = rng.random(n) < 0.5
        pats[fx] = pats[fx][..., ::-1]
        tx[fx] *= -1
        fy = rng.random(n) < 0.5
        pats[fy] = pats[fy][..., ::-1, :]
        ty[fy] *= -1
        return np.ascontiguousarray(pats, dtype=np.float32), t.astype(np.float32), tx.astype(np.float32), ty.astype(np.float32)


def _bins(cfg: TrainConfig, t_range, tilt_max):
    tb = np.arange(t_range[0], t_range[1] + 1e-6, cfg.thickness_bin_nm)
    ab = np.arange(-tilt_max - 0.3, tilt_max + 0.3 + 1e-6, cfg.tilt_bin_mrad)
    return tb, ab


def _schedule(opt, step, total, lr):
    warm = max(1, total // 20)
    f = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    for g in opt.param_groups:
        g["lr"] = lr * max(f, 0.02)


def train_measure_net(sampler: LibrarySampler, cfg: TrainConfig, device="cpu", log=print):
    """Train :class:`MeasureNet` (thickness and signed tilt distributions)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    tilt_max = float(max(sampler.tilt_x.max(), sampler.tilt_y.max()))
    tb, ab = _bins(cfg, sampler.thickness_range, tilt_max)
    net = MeasureNet(tb, ab, n_px=sampler.n_px).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    for step in range(cfg.measure_steps):
        _schedule(opt, step, cfg.measure_steps, cfg.lr)
        pats, t, tx, ty = sampler.draw(cfg.batch_size, rng)
        x = apply_detector(pats, random_params(len(t), rng, cfg.measure_ranges), generator=gen, device=device)
        out = net(normalise(x))
        tt = torch.as_tensor(t, device=device)
        loss = (
            -(soft_targets(tt, net.thickness_bins, cfg.thickness_sigma_nm) * F.log_softmax(out["thickness"], -1)).sum(-1).mean()
            - (soft_targets(torch.as_tensor(tx, device=device), net.tilt_bins, cfg.tilt_sigma_mrad) * F.log_softmax(out["tilt_x"], -1)).sum(-1).mean()
            - (soft_targets(torch.as_tensor(ty, device=device), net.tilt_bins, cfg.tilt_sigma_mrad) * F.log_softmax(out["tilt_y"], -1)).sum(-1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg.measure_steps // 20) == 0 or step == cfg.measure_steps - 1:
            with torch.no_grad():
                _, tm, _ = distribution_stats(out["thickness"], net.thickness_bins)
                err = (tm - tt).abs().median().item()
            log(f"measure step {step:5d}/{cfg.measure_steps}  loss {loss.item():.3f}  median |dt| {err:.2f} nm  {time.perf_counter() - t0:.0f} s")
    net.eval()
    return net


def train_align_net(sampler: LibrarySampler, cfg: TrainConfig, device="cpu", log=print):
    """Train :class:`AlignNet` on patterns shifted, scaled and rotated in the canonical frame."""
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    net = AlignNet(n_px=sampler.n_px).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    for step in range(cfg.align_steps):
        _schedule(opt, step, cfg.align_steps, cfg.lr)
        pats, _, _, _ = sampler.draw(cfg.batch_size, rng)
        p = random_params(len(pats), rng, cfg.align_ranges)
        x = apply_detector(pats, p, generator=gen, device=device)
        target = torch.as_tensor(align_targets(p), device=device)
        pred = net(normalise(x))
        loss = F.smooth_l1_loss(pred[:, :2], target[:, :2]) + 100 * F.mse_loss(pred[:, 2], target[:, 2]) \
            + F.mse_loss(pred[:, 3:], target[:, 3:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg.align_steps // 10) == 0 or step == cfg.align_steps - 1:
            log(f"align step {step:5d}/{cfg.align_steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s")
    net.eval()
    return net


def align_targets(p: DetectorParams) -> np.ndarray:
    """Regression targets of :class:`AlignNet` for detector params: dy, dx, log s, sin 4phi, cos 4phi.

    A pattern made by :func:`apply_detector` with shift d, scale s and rotation theta is
    brought back to the canonical frame by centre = d, radius factor = s, rotation = -theta.
    """
    phi = -np.deg2rad(p.rotation_deg)
    return np.stack([p.shift_px[:, 0], p.shift_px[:, 1], np.log(p.scale), np.sin(4 * phi), np.cos(4 * phi)], 1).astype(np.float32)


def calibrate_temperature(net: MeasureNet, sampler: LibrarySampler, cfg: TrainConfig, n: int = 2048, device="cpu"):
    """Fit the two temperatures (thickness, tilt) by minimising NLL on a validation draw."""
    rng = np.random.default_rng(cfg.seed + 7)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    logits = {"thickness": [], "tilt_x": [], "tilt_y": []}
    labels = {"thickness": [], "tilt_x": [], "tilt_y": []}
    net.temperature.fill_(1.0)
    with torch.no_grad():
        for s in range(0, n, 256):
            pats, t, tx, ty = sampler.draw(min(256, n - s), rng)
            x = apply_detector(pats, random_params(len(t), rng, cfg.measure_ranges), generator=gen, device=device)
            out = net(normalise(x))
            for k, v in zip(("thickness", "tilt_x", "tilt_y"), (t, tx, ty)):
                logits[k].append(out[k].cpu())
                labels[k].append(torch.as_tensor(v))
    temps = []
    for keys, bins, sig in ((("thickness",), net.thickness_bins, cfg.thickness_bin_nm), (("tilt_x", "tilt_y"), net.tilt_bins, cfg.tilt_bin_mrad)):
        L = torch.cat([torch.cat(logits[k]) for k in keys])
        y = torch.cat([torch.cat(labels[k]) for k in keys]).float()
        # NLL of the true value under the binned distribution (nearest bin)
        idx = torch.argmin((bins.cpu()[None] - y[:, None]).abs(), dim=1)
        logT = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([logT], lr=0.5, max_iter=50)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(L / logT.exp(), idx)
            loss.backward()
            return loss

        opt.step(closure)
        temps.append(float(logT.detach().exp()))
    net.temperature.copy_(torch.tensor(temps))
    return temps


def feature_statistics(net: MeasureNet, sampler: LibrarySampler, cfg: TrainConfig, n: int = 4096, device="cpu"):
    """Mean and inverse covariance of backbone features on in-distribution patterns, and the
    99.5th percentile of their Mahalanobis distances (the out-of-distribution threshold)."""
    rng = np.random.default_rng(cfg.seed + 11)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 11)
    feats = []
    with torch.no_grad():
        for s in range(0, n, 256):
            pats, *_ = sampler.draw(min(256, n - s), rng)
            x = apply_detector(pats, random_params(len(pats), rng, cfg.measure_ranges), generator=gen, device=device)
            feats.append(net(normalise(x), return_features=True)["features"].cpu())
    f = torch.cat(feats).double()
    half = len(f) // 2
    mu = f[:half].mean(0)
    cov = torch.cov((f[:half] - mu).T) + 1e-3 * torch.eye(f.shape[1], dtype=f.dtype)
    icov = torch.linalg.inv(cov)
    d = mahalanobis(f[half:], mu, icov)
    thr = float(torch.quantile(d, 0.995))
    return mu.float(), icov.float(), thr


def mahalanobis(f, mu, icov):
    """Mahalanobis distance of feature rows ``f`` (B, F)."""
    z = f - mu
    return ((z @ icov) * z).sum(-1).clamp_min(0).sqrt()
