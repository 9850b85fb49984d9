"""Training and held-out evaluation of the Bragg-disk networks on simulated NBED patterns.

Data: dynamical (Bloch-wave) disk intensities of several crystals (disk-intensity tables of
:mod:`diffkit.strain.nbed`) rendered with exact disk positions under random conditions:
strain up to a few % or a large random lattice deformation (so the detector does not learn
one lattice), in-plane rotation, thickness, specimen tilt, convergence angle, pixel size
(disk radius 3.5-8.5 px), pattern centre, detector distortion, uniform and radial
background and blur. A pool of noiseless patterns is rendered once; every training batch
applies a random dihedral symmetry and fresh Poisson noise at a random dose
(10^3.7-10^7 electrons per pattern, 10 % noiseless).

Labels: a disk is a *positive* (required) when it lies wholly on the detector and its
signal-to-noise ratio ``S / sqrt(S + B)`` (S disk counts, B background counts under the disk)
is >= 8 at the drawn dose; disks with 3 <= SNR < 8, or cut by the detector edge, are ignored
by the loss (neither required nor penalised); fainter disks are background. The sub-image
CNN is trained with an inverse-variance weighted squared error (weight
``1 / (r^2 / 4N + 0.01^2)`` for a disk of radius r with N counts), so it learns the
precision of well-exposed disks instead of the irreducible noise of faint ones.

:func:`train_disk_models` trains both networks within a CPU-time budget, evaluates them on
patterns drawn with a different seed, and writes ``disks_<name>.safetensors`` + JSON card.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..sim.crystals import get_crystal
from ..sim.detector import DetectorParams, apply_detector
from ..strain.nbed import NBEDTableSpec, disk_intensity_table, gaussian_blur, render_nbed
from ..strain.networks import (AnchorFreeConfig, AnchorFreeDiskNet, SubImageConfig, SubImageDiskNet,
                               count_parameters)
from .registry import write_card


@dataclasses.dataclass
class DiskTrainConfig:
    """Training configuration (recorded in the model card). Units in the names."""

    name: str = "nbed"
    seed: int = 20260514
    crystals: tuple = (("Si", "001", 200.0), ("Si", "110", 200.0), ("SrTiO3", "001", 200.0), ("Si", "001", 300.0))
    detector_px: int = 96
    pool_size: int = 4096
    radius_px: tuple = (3.5, 8.5)
    alpha_mrad: tuple = (0.8, 2.5)
    thickness_nm: tuple = (15.0, 240.0)
    tilt_max_mrad: float = 1.5
    small_strain: float = 0.03
    large_deformation_fraction: float = 0.5
    center_offset_px: float = 10.0
    affine: float = 0.02
    log10_dose: tuple = (3.7, 7.0)
    noiseless_fraction: float = 0.1
    blank_fraction: float = 0.03
    background: tuple = (0.0, 0.15)
    radial_background: tuple = (0.0, 0.3)
    blur_px: tuple = (0.0, 1.0)
    snr_positive: float = 8.0
    snr_ignore: float = 3.0
    af: AnchorFreeConfig = dataclasses.field(default_factory=AnchorFreeConfig)
    si: SubImageConfig = dataclasses.field(default_factory=SubImageConfig)
    af_steps: int = 4000
    af_batch: int = 24
    af_lr: float = 3e-3
    si_steps: int = 6000
    si_batch: int = 384
    si_lr: float = 2e-3
    weight_decay: float = 1e-4
    af_cpu_s: float = 840.0
    si_cpu_s: float = 600.0
    threads: int | None = None
    small_tables: bool = False  # coarse, fast disk-intensity tables (smoke runs and tests only)
    strain_order: int = 0  # 2: disk intensities change with the strain (Taylor expansion; small strains only)


def training_tables(cfg: DiskTrainConfig, progress=False):
    """Disk-intensity tables of the training crystals (cached on disk after the first call)."""
    from ..strain.nbed import small_table_spec

    tabs = []
    for mat, zone, kv in cfg.crystals:
        if cfg.small_tables:
            tabs.append(disk_intensity_table(small_table_spec(mat, zone, kv, strain_order=cfg.strain_order),
                                             progress=progress))
            continue
        spec = NBEDTableSpec(crystal=get_crystal(mat, zone), energy_kv=kv, q_max_mrad=4.0, q_step_mrad=0.2,
                             thickness_nm=tuple(np.arange(10.0, 250.01, 2.5)), g_max=1.5, g_out_mrad=40.0,
                             strain_order=cfg.strain_order)
        tabs.append(disk_intensity_table(spec, progress=progress))
    return tabs


def _rot(t):
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s], [s, c]])


@dataclasses.dataclass
class Pool:
    """Noiseless patterns (normalised so ``counts = Poisson(clean * dose)``) with labels."""

    clean: np.ndarray  # (N, H, W) float32
    pos: np.ndarray  # (N, K, 2) disk centres (x, y) px, NaN = none
    frac: np.ndarray  # (N, K) fraction of the dose in each disk (on the detector)
    bgpx: np.ndarray  # (N, K) background fraction per px under each disk
    radius: np.ndarray  # (N,) disk radius px


def render_pool(tables, n: int, rng: np.random.Generator, cfg: DiskTrainConfig, H: int | None = None,
                conditions: dict | None = None) -> Pool:
    """Render ``n`` noiseless training patterns under random conditions (see module docstring)."""
    H = H or cfg.detector_px
    c = conditions or {}
    ti = rng.integers(len(tables), size=n) if "table" not in c else np.full(n, c["table"])
    alpha = rng.uniform(*cfg.alpha_mrad, n) if "alpha" not in c else np.full(n, c["alpha"])
    r = rng.uniform(*cfg.radius_px, n) if "radius" not in c else np.full(n, c["radius"])
    pix = alpha / r
    t = rng.uniform(*cfg.thickness_nm, n) if "thickness" not in c else np.asarray(c["thickness"]) * np.ones(n)
    tmax = np.clip(4.0 - alpha - 0.05, 0, cfg.tilt_max_mrad)
    tm = rng.uniform(0, 1, n) * tmax
    ta = rng.uniform(0, 2 * np.pi, n)
    tilt = np.stack([tm * np.cos(ta), tm * np.sin(ta)], 1)
    F = np.empty((n, 2, 2))
    big = rng.random(n) < cfg.large_deformation_fraction
    for i in range(n):
        if big[i] and "strain" not in c:
            s1, s2 = rng.uniform(0.75, 1.35, 2)
            F[i] = _rot(rng.uniform(0, np.pi)) @ np.diag([s1, s2]) @ _rot(rng.uniform(0, np.pi))
        else:
            e = rng.uniform(-cfg.small_strain, cfg.small_strain, 3) if "strain" not in c else np.asarray(c["strain"])
            F[i] = np.eye(2) + np.array([[e[0], e[2]], [e[2], e[1]]])
    rot = rng.uniform(0, 360, n) if "rotation" not in c else np.full(n, c["rotation"])
    ctr = (H - 1) / 2 + rng.uniform(-cfg.center_offset_px, cfg.center_offset_px, (n, 2))
    aff = np.eye(2) + rng.uniform(-cfg.affine, cfg.affine, (n, 2, 2))
    # keep disks apart: nearest-neighbour spacing >= 2.6 radii (else expand the reciprocal lattice)
    for i in range(n):
        tab = tables[ti[i]]
        g = tab.g_mrad[1:]
        gp = g @ np.linalg.inv(F[i])  # rows: (F^-T g)^T
        dmin = np.min(np.linalg.norm(gp, axis=1)) / pix[i]
        if dmin < 2.6 * r[i]:
            F[i] *= dmin / (2.6 * r[i])
    K = max(len(tb.hk) for tb in tables)
    clean = np.zeros((n, H, H), np.float32)
    pos = np.full((n, K, 2), np.nan)
    frac = np.zeros((n, K))
    bgpx = np.zeros((n, K))
    p = DetectorParams.identity(n)
    p.background[:] = rng.uniform(*cfg.background, n)
    p.radial_background[:] = rng.uniform(*cfg.radial_background, n)
    p.radial_width_px[:] = rng.uniform(8, 50, n)
    p.blur_px[:] = rng.uniform(*cfg.blur_px, n)
    imgs = torch.zeros(n, H, H)
    for k, tab in enumerate(tables):
        idx = np.nonzero(ti == k)[0]
        for s in range(0, len(idx), 128):
            j = idx[s:s + 128]
            im, ps, sums = render_nbed(tab, F[j], t[j], tilt[j], convergence_mrad=alpha[j], pixel_size_mrad=pix[j],
                                       detector_px=H, center_px=ctr[j], rotation_deg=rot[j], affine=aff[j],
                                       return_disk_sums=True)
            imgs[j] = im
            nb = ps.shape[1]
            pos[j, :nb] = ps
            tot = im.sum(dim=(1, 2)).double().numpy()
            frac[j, :nb] = sums / np.maximum(tot[:, None], 1e-30)
    blank = rng.random(n) < cfg.blank_fraction
    imgs[torch.as_tensor(blank)] = 1e-3 / (H * H)  # only background and noise
    frac[blank] = 0
    pos[blank] = np.nan
    imgs = gaussian_blur(imgs, p.blur_px)
    p.blur_px[:] = 0
    out = apply_detector(imgs, p, out_px=H).numpy() / 1e6  # noiseless: sums to 1 + background
    clean[:] = out
    # background per px under each disk (uniform + radial Lorentzian about the detector centre)
    cc = (H - 1) / 2
    rr2 = (pos[..., 0] - cc) ** 2 + (pos[..., 1] - cc) ** 2
    bgpx[:] = (p.background[:, None] + p.radial_background[:, None] / (1 + rr2 / p.radial_width_px[:, None] ** 2)) / (H * H)
    off = ~((pos[..., 0] >= 0) & (pos[..., 0] <= H - 1) & (pos[..., 1] >= 0) & (pos[..., 1] <= H - 1))
    frac[off & np.isfinite(pos[..., 0])] *= 1.0  # partially visible disks keep their visible fraction
    return Pool(clean, pos, frac, bgpx, r)


def snr(frac, bgpx, radius, dose):
    """Disk signal-to-noise ratio ``S / sqrt(S + B)`` at ``dose`` electrons per pattern."""
    d = np.where(np.isfinite(dose), dose, 1e7)
    S = frac * d[:, None]
    Bg = bgpx * d[:, None] * np.pi * radius[:, None] ** 2
    return S / np.sqrt(np.maximum(S + Bg, 1e-30))


def _dihedral(x: torch.Tensor, pos: np.ndarray, code: int, H: int):
    """Apply one of 8 dihedral ops to images (B, H, W) and positions (B, K, 2)."""
    p = pos.copy()
    if code & 4:
        x = x.transpose(-1, -2)
        p = p[..., ::-1].copy()
    if code & 1:
        x = x.flip(-1)
        p[..., 0] = H - 1 - p[..., 0]
    if code & 2:
        x = x.flip(-2)
        p[..., 1] = H - 1 - p[..., 1]
    return x, p


def draw_batch(pool: Pool, idx, rng: np.random.Generator, cfg: DiskTrainConfig, gen: torch.Generator,
               augment: bool = True, dose=None):
    """Noisy patterns (B, H, W), positions, classes (2 positive, 1 ignore, 0 background), radii."""
    B = len(idx)
    H = pool.clean.shape[-1]
    clean = torch.from_numpy(pool.clean[idx])
    if dose is None:
        dose = 10 ** rng.uniform(*cfg.log10_dose, B)
        dose[rng.random(B) < cfg.noiseless_fraction] = np.inf
    dose = np.broadcast_to(np.asarray(dose, float), (B,)).copy()
    fin = np.isfinite(dose)
    x = clean * 1e6
    if fin.any():
        lam = clean[torch.as_tensor(fin)] * torch.as_tensor(dose[fin], dtype=torch.float32)[:, None, None]
        x[torch.as_tensor(fin)] = torch.poisson(lam, generator=gen)
    pos = pool.pos[idx].copy()
    s = snr(pool.frac[idx], pool.bgpx[idx], pool.radius[idx], dose)
    onchip = (pos[..., 0] >= -0.5) & (pos[..., 0] <= H - 0.5) & (pos[..., 1] >= -0.5) & (pos[..., 1] <= H - 0.5)
    r = pool.radius[idx][:, None]
    full = (pos[..., 0] >= r - 0.5) & (pos[..., 0] <= H - 0.5 - r) & (pos[..., 1] >= r - 0.5) & (pos[..., 1] <= H - 0.5 - r)
    # required: whole disk on the detector and SNR >= 8; clipped or faint (SNR 3-8) disks are ignored
    cls = np.where(full & (s >= cfg.snr_positive), 2, np.where(onchip & (s >= cfg.snr_ignore), 1, 0))
    cls[~np.isfinite(pos[..., 0])] = 0
    if augment:
        code = int(rng.integers(8))
        x, pos = _dihedral(x, pos, code, H)
    return x, pos, cls, pool.radius[idx], dose


def af_targets(pos, cls, radius, h, w, cfg: DiskTrainConfig):
    """Objectness targets/mask (B, h, w) and offset targets (B, 2, h, w) for the anchor-free head."""
    s = cfg.af.pool
    B = len(pos)
    T = np.zeros((B, h, w), np.float32)
    M = np.ones((B, h, w), np.float32)
    D = np.zeros((B, 2, h, w), np.float32)
    R = np.zeros((B, h, w), np.float32)
    sig2 = 2 * (0.5 * s) ** 2
    b_, k_ = np.nonzero(cls > 0)
    for b, k in zip(b_, k_):
        cx, cy = pos[b, k]
        j0 = int(np.floor((cx - (s - 1) / 2) / s))
        i0 = int(np.floor((cy - (s - 1) / 2) / s))
        cells = []
        for i in (i0, i0 + 1):
            for j in (j0, j0 + 1):
                if 0 <= i < h and 0 <= j < w:
                    dx, dy = cx - (j * s + (s - 1) / 2), cy - (i * s + (s - 1) / 2)
                    cells.append((i, j, dx, dy, dx * dx + dy * dy))
        if not cells:
            continue
        if cls[b, k] == 1:
            for i, j, *_ in cells:
                if T[b, i, j] == 0:
                    M[b, i, j] = 0
            continue
        dn = min(c[4] for c in cells)
        for i, j, dx, dy, d2 in cells:
            tv = math.exp(-(d2 - dn) / sig2)
            if tv > T[b, i, j]:
                T[b, i, j] = tv
                D[b, :, i, j] = (dx, dy)
                R[b, i, j] = radius[b]
                M[b, i, j] = 1
    return T, M, D, R


def af_loss(net: AnchorFreeDiskNet, out, T, M, D, R):
    obj, off, logr = out
    w = M * (1 + 4 * T)
    l_obj = (F.binary_cross_entropy_with_logits(obj, T, reduction="none") * w).sum() / w.sum().clamp_min(1)
    pos = T > 0
    if not pos.any():
        return l_obj, {"obj": l_obj.item()}
    c = net.config
    step = 2 * c.offset_range / (c.n_bins - 1)
    u = ((D.clamp(-c.offset_range, c.offset_range) + c.offset_range) / step)  # (B,2,h,w)
    lo = u.floor().clamp(0, c.n_bins - 2)
    wr = u - lo
    logp = off.log_softmax(dim=2)  # (B,2,nb,h,w)
    lp_lo = logp.gather(2, lo.long()[:, :, None]).squeeze(2)
    lp_hi = logp.gather(2, (lo.long() + 1)[:, :, None]).squeeze(2)
    dfl = -((1 - wr) * lp_lo + wr * lp_hi).sum(1)
    sa = net.soft_argmax(off)
    l1 = (sa - D).abs().sum(1)
    tw = T * pos
    n = tw.sum().clamp_min(1e-6)
    l_dfl = (dfl * tw).sum() / n
    l_l1 = (l1 * tw).sum() / n
    l_r = ((logr - torch.log(R.clamp_min(1e-3))).abs() * tw).sum() / n
    loss = l_obj + 0.25 * l_dfl + 0.5 * l_l1 + 0.2 * l_r
    return loss, {"obj": l_obj.item(), "dfl": l_dfl.item(), "l1_px": l_l1.item(), "r": l_r.item()}


def _cosine(opt, step, frac, lr, warm=50):
    """Warm-up then cosine decay over ``frac`` in [0, 1] (the larger of step and wall-time progress)."""
    f = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    for g in opt.param_groups:
        g["lr"] = lr * max(f, 0.02)


def train_anchor_free(pools, cfg: DiskTrainConfig, rng, gen, device="cpu", log=print):
    net = AnchorFreeDiskNet(cfg.af).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.af_lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    c0 = time.process_time()
    pool_i = 0
    step = 0
    hist = []
    for step in range(cfg.af_steps):
        if time.process_time() - c0 > cfg.af_cpu_s:
            break
        pool = pools[pool_i % len(pools)]
        pool_i += 1
        idx = rng.integers(len(pool.clean), size=cfg.af_batch)
        x, pos, cls, rad, _ = draw_batch(pool, idx, rng, cfg, gen)
        H = x.shape[-1]
        h = H // cfg.af.pool
        T, M, D, R = (torch.as_tensor(a, device=device) for a in af_targets(pos, cls, rad, h, h, cfg))
        _cosine(opt, step, max(step / cfg.af_steps, (time.process_time() - c0) / cfg.af_cpu_s), cfg.af_lr)
        out = net(x[:, None].to(device))
        loss, parts = af_loss(net, out, T, M, D, R)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(parts)
        if step % 100 == 0:
            log(f"AF step {step} {time.perf_counter() - t0:.0f}s " + " ".join(f"{k}={np.mean([h_[k] for h_ in hist[-100:] if k in h_]):.4f}" for k in parts))
    return net.eval(), {"steps": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                        "cpu_seconds": round(time.process_time() - c0, 1)}


def subimage_samples(pool: Pool, rng, cfg: DiskTrainConfig, patch: int = 28):
    """Noiseless patches around every well-exposed, fully inside disk of a pool."""
    H = pool.clean.shape[-1]
    S = cfg.si.size
    b, k = np.nonzero(np.isfinite(pool.pos[..., 0]) & (pool.frac > 2e-4))
    c = pool.pos[b, k]
    fl = np.floor(c).astype(int)
    o = fl - (patch // 2 - 1)
    ok = (o[:, 0] >= 0) & (o[:, 1] >= 0) & (o[:, 0] + patch <= H) & (o[:, 1] + patch <= H)
    b, k, c, o = b[ok], k[ok], c[ok], o[ok]
    ar = np.arange(patch)
    P = pool.clean[b[:, None, None], o[:, 1, None, None] + ar[None, :, None], o[:, 0, None, None] + ar[None, None, :]]
    return {"patch": P.astype(np.float32), "c": c - o, "frac": pool.frac[b, k], "bgpx": pool.bgpx[b, k],
            "radius": pool.radius[b], "S": S}


def draw_subimages(smp, idx, rng, cfg: DiskTrainConfig, gen, dose=None, sigma_px: float = 0.4):
    """Sub-images (B, 1, S, S) with Poisson noise and target offsets (B, 2) from the window centre."""
    S = smp["S"]
    P = smp["patch"][idx]
    c = smp["c"][idx]
    n = len(idx)
    est = c + np.clip(rng.normal(0, sigma_px, (n, 2)), -1.5, 1.5)
    fl = np.floor(est).astype(int)
    st = fl - (S // 2 - 1)
    st = np.clip(st, 0, P.shape[-1] - S)
    ar = np.arange(S)
    crop = P[np.arange(n)[:, None, None], st[:, 1, None, None] + ar[None, :, None], st[:, 0, None, None] + ar[None, None, :]]
    centre = st + (S / 2 - 0.5)
    tgt = c - centre
    x = torch.from_numpy(np.ascontiguousarray(crop))
    if dose is None:
        dose = 10 ** rng.uniform(*cfg.log10_dose, n)
        dose = np.maximum(dose, 500 / np.maximum(smp["frac"][idx], 1e-9))  # >= 500 counts in the disk
        dose[rng.random(n) < cfg.noiseless_fraction] = np.inf
    dose = np.broadcast_to(np.asarray(dose, float), (n,)).copy()
    fin = np.isfinite(dose)
    x = x * 1e6
    if fin.any():
        f = torch.as_tensor(fin)
        x[f] = torch.poisson(torch.from_numpy(crop[fin]) * torch.as_tensor(dose[fin], dtype=torch.float32)[:, None, None], generator=gen)
    if rng.random() < 0.5:  # dihedral augmentation (targets transform with the window)
        x = x.flip(-1)
        tgt = tgt * np.array([-1, 1])
    if rng.random() < 0.5:
        x = x.flip(-2)
        tgt = tgt * np.array([1, -1])
    if rng.random() < 0.5:
        x = x.transpose(-1, -2)
        tgt = tgt[:, ::-1]
    counts = smp["frac"][idx] * np.where(np.isfinite(dose), dose, 1e8)
    return x[:, None].float(), torch.as_tensor(np.ascontiguousarray(tgt), dtype=torch.float32), counts


def train_subimage(samples, cfg: DiskTrainConfig, rng, gen, device="cpu", log=print, net=None):
    """Train (or, given ``net``, fine-tune) the sub-image CNN until ``si_steps`` or ``si_cpu_s``."""
    net = (net if net is not None else SubImageDiskNet(cfg.si)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.si_lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    c0 = time.process_time()
    hist = []
    step = 0
    for step in range(cfg.si_steps):
        if time.process_time() - c0 > cfg.si_cpu_s:
            break
        smp = samples[step % len(samples)]
        idx = rng.integers(len(smp["patch"]), size=cfg.si_batch)
        x, y, counts = draw_subimages(smp, idx, rng, cfg, gen)
        _cosine(opt, step, max(step / cfg.si_steps, (time.process_time() - c0) / cfg.si_cpu_s), cfg.si_lr)
        pred = net(x.to(device))
        var = smp["radius"][idx] ** 2 / (4 * counts) + 0.01**2
        w = torch.as_tensor(1 / var, dtype=torch.float32, device=device)
        w = w / w.mean()
        loss = (((pred - y.to(device)) ** 2).sum(1) * w).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
        if step % 200 == 0:
            log(f"SI step {step} {time.perf_counter() - t0:.0f}s weighted rms={math.sqrt(np.mean(hist[-200:])):.4f} px")
    return net.eval(), {"steps": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                        "cpu_seconds": round(time.process_time() - c0, 1)}


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------


def _match(pred, valid, pos, cls, tol):
    """Greedy matching per pattern: returns matched errors (px, x/y), recall counts, precision counts."""
    errs = []
    n_pos = n_pos_found = n_pred = n_pred_ok = 0
    for b in range(len(pos)):
        P = pred[b][valid[b]]
        n_pred += len(P)
        tr = pos[b]
        c = cls[b]
        keep = c > 0
        T_, C_ = tr[keep], c[keep]
        n_pos += int((C_ == 2).sum())
        if len(P) == 0 or len(T_) == 0:
            continue
        d = np.linalg.norm(P[:, None, :] - T_[None, :, :], axis=-1)
        used_t = set()
        for i in np.argsort(d.min(1)):
            j = int(np.argmin(d[i]))
            if d[i, j] < tol and j not in used_t:
                used_t.add(j)
                n_pred_ok += 1
                if C_[j] == 2:
                    n_pos_found += 1
                    errs.append(P[i] - T_[j])
    return np.array(errs).reshape(-1, 2), n_pos, n_pos_found, n_pred, n_pred_ok


def _err_stats(e):
    if len(e) == 0:
        return {}
    r = np.linalg.norm(e, axis=1)
    return {"n": int(len(e)), "rms_per_axis_px": float(np.sqrt(np.mean(e**2))), "median_px": float(np.median(r)),
            "p90_px": float(np.percentile(r, 90)), "p99_px": float(np.percentile(r, 99)), "max_px": float(r.max()),
            "bias_x_px": float(e[:, 0].mean()), "bias_y_px": float(e[:, 1].mean())}


def evaluate(models, pool: Pool, cfg: DiskTrainConfig, rng, gen, dose=None, threshold=0.6, edge_margin=None):
    """Recall/precision of the anchor-free detector and centre errors (px) before/after refinement."""
    from ..strain.detect import detect_disks

    idx = np.arange(len(pool.clean))
    x, pos, cls, rad, dose_used = draw_batch(pool, idx, rng, cfg, gen, augment=False, dose=dose)
    out = {}
    for refine in (None, "cnn"):
        det = detect_disks(x, method="anchor-free", refine=refine, threshold=threshold, models=models)
        tol = 0.5 * np.nanmin(rad)
        errs, n_pos, n_found, n_pred, n_ok = _match(det.positions, det.valid, pos, cls, tol)
        # centre errors only for disks whose sub-image is fully on the detector
        e_all, c_all = [], []
        for b in range(len(pos)):
            P = det.positions[b][det.valid[b] & ~det.edge[b]]
            req = np.nonzero(cls[b] == 2)[0]
            T_ = pos[b][req]
            if len(P) == 0 or len(T_) == 0:
                continue
            d = np.linalg.norm(P[:, None] - T_[None], axis=-1)
            j = d.argmin(1)
            ok = d[np.arange(len(P)), j] < tol
            e_all.append(P[ok] - T_[j[ok]])
            c_all.append(pool.frac[idx[b], req[j[ok]]] * (dose_used[b] if np.isfinite(dose_used[b]) else 1e7))
        e_all = np.concatenate(e_all) if e_all else np.zeros((0, 2))
        c_all = np.concatenate(c_all) if c_all else np.zeros(0)
        key = "refined" if refine else "anchor_free"
        out[key] = {"centre_error": _err_stats(e_all),
                    "centre_error_disks_3e3_to_3e4_counts": _err_stats(e_all[(c_all >= 3e3) & (c_all < 3e4)]),
                    "centre_error_disks_over_3e4_counts": _err_stats(e_all[c_all >= 3e4])}
        if not refine:
            out["recall"] = n_found / max(n_pos, 1)
            out["precision"] = n_ok / max(n_pred, 1)
            out["n_patterns"] = int(len(pos))
            out["n_required_disks"] = int(n_pos)
    return out


DETECTION_THRESHOLD = 0.6


def held_out_evaluation(models, tables, cfg: DiskTrainConfig, threshold: float = DETECTION_THRESHOLD,
                        alpha_mrad: float = 2.0, n_patterns=None) -> dict:
    """Recall/precision and centre errors on patterns drawn with seed ``cfg.seed + 1`` (never used in training).

    ``random_conditions``: the training distribution (``n_patterns[0]`` patterns, 96 px);
    ``<crystal>_*``: the first training crystal (Si [001] at 200 kV for the general model) at
    ``alpha_mrad``, 5 px disks, unrotated, unstrained, 128 px, at three doses (``n_patterns[1]``;
    default (512, 256), (32, 16) for smoke runs on small tables).
    """
    n_patterns = n_patterns or ((32, 16) if cfg.small_tables else (512, 256))
    ev_rng = np.random.default_rng(cfg.seed + 1)
    ev_gen = torch.Generator().manual_seed(cfg.seed + 1)
    mat, zone, _ = cfg.crystals[0]
    with torch.inference_mode():
        held = render_pool(tables, n_patterns[0], ev_rng, cfg)
        ev = {"threshold": threshold, "random_conditions": evaluate(models, held, cfg, ev_rng, ev_gen, threshold=threshold)}
        one = render_pool(tables[:1], n_patterns[1], ev_rng, cfg, H=128, conditions={
            "table": 0, "alpha": alpha_mrad, "radius": 5.0, "rotation": 0.0, "strain": (0.0, 0.0, 0.0)})
        for d in (1e5, 5e5, 2e6):
            ev[f"{mat.lower()}{zone}_alpha{alpha_mrad:g}mrad_r5px_dose{d:.0e}"] = evaluate(
                models, one, cfg, ev_rng, ev_gen, dose=d, threshold=threshold)
    return ev


def train_disk_models(out_dir=None, cfg: DiskTrainConfig | None = None, device=None, log=print) -> dict:
    """Train both disk networks and write ``disks_<cfg.name>.safetensors`` + ``.json`` to ``out_dir``.

    Returns the model card (dict). Uses CUDA when present; fits in ~15 min on 2 CPU cores.
    """
    from safetensors.torch import save_file

    from ..strain.detect import DiskModels
    from ..strain.networks import fuse_batchnorm

    cfg = cfg or DiskTrainConfig()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(__file__).parent / "weights"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tables = training_tables(cfg, progress=True)
    t_tables = time.perf_counter() - t_start
    log(f"tables ready in {t_tables:.0f} s")
    t1 = time.perf_counter()
    pools = [render_pool(tables, cfg.pool_size // 2, rng, cfg) for _ in range(2)]
    t_pool = time.perf_counter() - t1
    log(f"pool of {cfg.pool_size} patterns rendered in {t_pool:.0f} s")
    af, af_info = train_anchor_free(pools, cfg, rng, gen, dev, log)
    samples = [subimage_samples(p, rng, cfg) for p in pools]
    log(f"sub-image samples: {sum(len(s['patch']) for s in samples)}")
    si, si_info = train_subimage(samples, cfg, rng, gen, dev, log)
    t_train = time.perf_counter() - t_start
    cpu_train = time.process_time() - cpu_start
    sd = {f"af.{k}": v.detach().cpu().contiguous() for k, v in af.state_dict().items()}
    sd.update({f"si.{k}": v.detach().cpu().contiguous() for k, v in si.state_dict().items()})
    stem = out_dir / f"disks_{cfg.name}"
    save_file(sd, str(stem.with_suffix(".safetensors")))
    # held-out evaluation: different seed for every random draw
    af_c, si_c = AnchorFreeDiskNet(cfg.af), SubImageDiskNet(cfg.si)
    af_c.load_state_dict(af.cpu().state_dict())
    si_c.load_state_dict(si.cpu().state_dict())
    models = DiskModels(fuse_batchnorm(af_c.eval()), fuse_batchnorm(si_c.eval()), {}, torch.device("cpu"))
    ev = held_out_evaluation(models, tables, cfg)
    card = {
        "id": f"disks_{cfg.name}",
        "kind": "disks",
        "name": cfg.name,
        "format": "safetensors; keys 'af.*' = AnchorFreeDiskNet, 'si.*' = SubImageDiskNet",
        "description": "Anchor-free Bragg-disk detector (objectness + soft-argmax offset bins, after seed 002) and "
                       "sub-image disk-centre CNN (after seed 001) for NBED patterns with non-overlapping disks.",
        "valid_for": {"disk_radius_px": list(cfg.radius_px), "note": "larger disks: bin the patterns (detect_disks does it "
                      "when the calibration gives the radius)"},
        "training_data": {
            "simulation": "Bloch-wave ZOLZ disk intensities (diffkit.strain.nbed tables, g_max 1.5/Å, TDS absorption), exact "
                          "disk positions, detector model of diffkit.sim.detector",
            "crystals": [f"{m} [{z}] {kv:g} kV" for m, z, kv in cfg.crystals],
            "pool_patterns": cfg.pool_size, "detector_px": cfg.detector_px,
            "ranges": {k: v for k, v in dataclasses.asdict(cfg).items() if k in (
                "radius_px", "alpha_mrad", "thickness_nm", "tilt_max_mrad", "small_strain", "large_deformation_fraction",
                "center_offset_px", "affine", "log10_dose", "noiseless_fraction", "blank_fraction", "background",
                "radial_background", "blur_px", "snr_positive", "snr_ignore")},
        },
        "seed": cfg.seed,
        "config": {"anchor_free": dataclasses.asdict(cfg.af), "subimage": dataclasses.asdict(cfg.si)},
        "training": {"anchor_free": af_info, "subimage": si_info, "tables_seconds": round(t_tables, 1),
                     "pool_seconds": round(t_pool, 1), "total_seconds": round(t_train, 1),
                     "total_cpu_seconds": round(cpu_train, 1),
                     "budget_note": "training stops on process CPU time (af_cpu_s, si_cpu_s), so a shared machine gives "
                                    "the same training as an idle one; CPU seconds / 2 = wall time on 2 idle cores",
                     "device": str(dev),
                     "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
                     "date": time.strftime("%Y-%m-%d"), "hyperparameters": {k: v for k, v in dataclasses.asdict(cfg).items()
                                                                              if k.startswith(("af_", "si_")) or k in ("weight_decay",)}},
        "parameters": {"anchor_free": count_parameters(af), "subimage": count_parameters(si)},
        "held_out": {"seed": cfg.seed + 1, "match_tolerance": "half a disk radius",
                     "definitions": "recall = required disks (SNR >= 8, centre on the detector) found; precision = "
                                    "detections matching any disk with SNR >= 3; centre errors for required disks whose "
                                    "24 px sub-image lies on the detector",
                     **ev},
    }
    write_card(stem.with_suffix(".json"), card)
    log(json.dumps(card["held_out"], indent=1))
    return card


def pair_strain(models, unstrained, strained, calibration, method: str = "subimage-cnn", refine="cnn") -> np.ndarray:
    """Strain of each strained pattern relative to its unstrained twin (``refine``: "cnn", "fit", "model").

    ``unstrained`` and ``strained`` are (N, H, W) patterns of the same positions (same thickness,
    tilt and noise seed). Both are measured with ``models`` (``"subimage-cnn"`` at the lattice of
    the unstrained set), fitted, and each strained lattice is compared with its own twin's, so
    that thickness and tilt effects on the centres cancel. Returns (M, 3) ``exx, eyy, exy``
    (dimensionless) for the M pairs whose fits both succeeded.
    """
    from ..strain.detect import detect_disks
    from ..strain.lattice import strain_from_lattice
    from ..strain.mapping import _fit, lattice_guess

    G0, o0, hk = lattice_guess(unstrained, calibration, models=models)
    kw = dict(method=method, refine="cnn" if refine == "model" else refine, models=models)
    if method == "subimage-cnn":
        kw["lattice"] = (G0, o0, hk)
    fa = _fit(detect_disks(unstrained, calibration, **kw), G0, o0, "auto")
    fb = _fit(detect_disks(strained, calibration, **kw), G0, o0, "auto")
    if refine == "model":  # physics-model fit of every pattern (the unstrained set is the reference crystal)
        from ..strain.mapping import _model_refine, prepare_model_fit
        from ..strain.modelfit import table_for_calibration

        mf = prepare_model_fit(table_for_calibration(calibration), unstrained[None], None, (G0, o0, hk), calibration,
                               models)
        fa = _model_refine(unstrained, fa, mf, calibration, models.device)
        fb = _model_refine(strained, fb, mf, calibration, models.device)
    ok = np.nonzero((fa["status"] == 0) & (fb["status"] == 0))[0]
    e = strain_from_lattice(fb["G"][ok], fa["G"][ok])
    return np.stack([e["exx"], e["eyy"], e["exy"]], 1).astype(float).reshape(-1, 3)


def calibrate_strain_gain(models, *, material: str = "Si", zone: str = "001", energy_kv: float = 200.0,
                          convergence_mrad: float = 2.0, radius_px: float = 5.0, thickness_nm=(20.0, 160.0),
                          tilt_max_mrad: float = 1.0, strain: float = 0.01, n_side: int = 12, seed: int = 4242,
                          iterations: int = 2, dose: float = np.inf, tables=None, log=print) -> dict:
    """Calibrate the sub-image CNN's offset gain so that the whole pipeline measures strain to scale.

    A network trained with a squared error answers with the posterior mean, which shrinks a
    disk's offset from the sub-image centre towards zero; :func:`diffkit.strain.detect_disks`
    divides the offsets by ``subimage_offset_gain``. What matters is the end result, so the gain
    is calibrated on it: noiseless scans (``n_side`` x ``n_side`` positions, random thickness in
    ``thickness_nm`` and tilt up to ``tilt_max_mrad``, three pattern centres, seed ``seed``, never
    used in training) are simulated unstrained and strained (``exx = strain``, ``eyy = strain / 2``,
    ``exy = strain / 3``), measured with ``method="subimage-cnn"`` and fitted; the slope of the
    measured against the true strain tensor (each strained pattern against its own unstrained
    twin, so thickness and tilt effects cancel; :func:`pair_strain`) is measured at gains 1.0 and
    0.9, secant steps (``iterations``) look for slope 1, and the gain whose slope came closest is
    returned. The re-cut of each sub-image around the disk already makes the response nearly
    unbiased, so the slope depends only weakly, and not always monotonically, on the gain
    (measured: 0.006-0.02 per 0.1 of gain).

    ``tables``: disk-intensity tables for :func:`diffkit.strain.simulate_nbed` (default: the
    crystal's standard table, with strain derivatives). Returns ``{"subimage_offset_gain", "slopes"
    ([gain, slope] pairs), "conditions"}``; ``models`` is not changed.
    """
    from ..strain.nbed import simulate_nbed

    rng = np.random.default_rng(seed)
    n = n_side
    t = rng.uniform(*thickness_nm, (n, n))
    tm, ta = tilt_max_mrad * np.sqrt(rng.uniform(0, 1, (n, n))), rng.uniform(0, 2 * np.pi, (n, n))
    tilt = np.stack([tm * np.cos(ta), tm * np.sin(ta)], -1)
    z = np.zeros((n, n))
    true = np.array([strain, strain / 2, strain / 3])
    pairs = []
    for c in range(3):
        kw = dict(thickness_nm=t, tilt_mrad=tilt, material=material, zone=zone, energy_kv=energy_kv,
                  convergence_mrad=convergence_mrad, pixel_size_mrad=convergence_mrad / radius_px, detector_px=128,
                  center_offset_px=tuple(rng.uniform(-1, 1, 2)), dose=dose, seed=seed + c, tables=tables)
        a = simulate_nbed(z, z, z, z, **kw)
        b = simulate_nbed(z + true[0], z + true[1], z + true[2], z, **kw)
        pairs.append((a.patterns.reshape(n * n, 128, 128), b.patterns.reshape(n * n, 128, 128), a.calibration))
    def slope_at(gain):
        m = dataclasses.replace(models, card={**models.card, "calibration": {"subimage_offset_gain": gain}})
        M = np.concatenate([pair_strain(m, pa, pb, cal) for pa, pb, cal in pairs])
        slope = float((M @ true).sum() / (len(M) * (true @ true)))
        log(f"strain-gain calibration: gain {gain:.4f} -> strain slope {slope:.5f} ({len(M)} patterns)")
        return slope

    # secant steps on slope(gain) = 1 from gains 1.0 and 0.9; keep the gain whose slope came closest to 1
    g = [1.0, 0.9]
    sl = [slope_at(1.0), slope_at(0.9)]
    for _ in range(max(iterations - 1, 0)):
        if sl[-1] == sl[-2]:
            break
        g_new = float(np.clip(g[-1] + (1 - sl[-1]) * (g[-1] - g[-2]) / (sl[-1] - sl[-2]), 0.6, 1.5))
        g.append(g_new)
        sl.append(slope_at(g_new))
    gain = g[int(np.argmin(np.abs(np.array(sl) - 1)))]
    slopes = [[round(a, 4), round(b, 5)] for a, b in zip(g, sl)]
    return {"subimage_offset_gain": round(gain, 4), "slopes": slopes,
            "conditions": {"material": material, "zone": zone, "energy_kv": energy_kv,
                           "convergence_mrad": convergence_mrad, "radius_px": radius_px,
                           "thickness_nm": list(thickness_nm), "tilt_max_mrad": tilt_max_mrad, "strain": strain,
                           "patterns": 3 * n * n, "seed": seed,
                           "dose": "noiseless" if not np.isfinite(dose) else float(dose)}}


def specialised_name(material: str, zone: str, energy_kv: float, convergence_mrad: float) -> str:
    """File stem of a specialised disk model, e.g. ``disks_si001_200kv_2mrad``."""
    return f"disks_{material.lower()}{zone}_{energy_kv:g}kv_{convergence_mrad:g}mrad".replace(".", "p")


def specialised_config(material: str, zone: str, energy_kv: float, convergence_mrad: float, *,
                       radius_px=(4.0, 6.5), thickness_nm=(20.0, 160.0), cpu_s: float = 1800.0, lr: float = 1e-3,
                       seed: int = 777001) -> DiskTrainConfig:
    """Training distribution of a specialised model: one crystal and zone axis at one beam energy,
    convergence semi-angle +-20 %, disk radius ``radius_px`` (px), thickness ``thickness_nm`` (nm),
    tilt up to 1.5 mrad, strain up to 2 % with the disk intensities of the strained crystal
    (second-order expansion, ``strain_order=2``: 1 % strain changes them by 10-15 % rms, and a
    network that learns the disk interiors of the unstrained crystal only reads that change as a
    displacement), doses 10^4.5-10^7 e- per pattern, blur 0.2-0.8 px; the sub-image CNN is
    fine-tuned for ``cpu_s`` process CPU seconds at peak learning rate ``lr``."""
    from ..errors import BadInputError

    if not 2.0 <= radius_px[0] <= radius_px[1] <= 8.5:
        raise BadInputError(f"disk radius range {tuple(radius_px)} px: give LO <= HI within 2-8.5 px (larger disks "
                            "are binned 2x before detection)")
    return DiskTrainConfig(name=specialised_name(material, zone, energy_kv, convergence_mrad)[6:], seed=seed,
                           crystals=((material, zone, float(energy_kv)),),
                           alpha_mrad=(0.8 * convergence_mrad, 1.2 * convergence_mrad), radius_px=tuple(radius_px),
                           thickness_nm=tuple(thickness_nm), tilt_max_mrad=1.5, log10_dose=(4.5, 7.0),
                           blur_px=(0.2, 0.8), small_strain=0.02, large_deformation_fraction=0.0, strain_order=2,
                           si_cpu_s=cpu_s, si_steps=1_000_000, si_lr=lr)


def specialise_disk_models(material: str, zone: str, energy_kv: float, convergence_mrad: float, *,
                           base: str = "disks_nbed", out_dir=None, cfg: DiskTrainConfig | None = None,
                           calibrate: bool = True, device=None, log=print) -> dict:
    """Fine-tune the sub-image CNN of ``base`` for one crystal and probe, and package the result.

    The general sub-image CNN is trained on four crystals and every convergence angle; its centres
    of strongly dynamical disks (alpha ~ 2 mrad, 60-90 nm Si) are biased by the intensity
    variation inside the disks, which depends on the crystal, thickness and tilt. Fine-tuned on
    simulations of the one crystal the user measures (:func:`specialised_config`), it learns that
    crystal's disk interiors: on the strain benchmark's Si [001] wedge it halves the strain-free
    scatter (docs/strain.md). The anchor-free detector is kept. The card records the training,
    the held-out evaluation (seed ``cfg.seed + 1``), the calibrated offset gain
    (:func:`calibrate_strain_gain`) and ``valid_for`` (crystal, zone, energy, convergence and
    radius ranges) used by :func:`diffkit.strain.detect.select_disk_models`.

    Writes ``<out_dir>/<name>.safetensors`` and ``.json`` (default: the package's weights
    folder); returns the card.
    """
    from safetensors.torch import load_file, save_file

    from ..errors import BadInputError
    from ..strain.detect import DiskModels, load_disk_models
    from ..strain.networks import fuse_batchnorm

    if not 0 < convergence_mrad <= 2.5:
        raise BadInputError(f"convergence {convergence_mrad} mrad: the disk networks are for nanobeam diffraction "
                            "with non-overlapping disks, convergence semi-angle 0.5-2.5 mrad")
    cfg = cfg or specialised_config(material, zone, energy_kv, convergence_mrad)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(__file__).parent / "weights"
    out_dir.mkdir(parents=True, exist_ok=True)
    base_models = load_disk_models(base, device="cpu")
    base_stem = pathlib.Path(base_models.source)
    sd = load_file(str(base_stem.with_suffix(".safetensors")))
    base_card = base_models.card
    t_start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tables = training_tables(cfg, progress=True)
    pool_size = cfg.pool_size
    pools = [render_pool(tables, max(pool_size // 2, 1), rng, cfg) for _ in range(2)]
    samples = [subimage_samples(p, rng, cfg) for p in pools]
    n_samples = sum(len(s["patch"]) for s in samples)
    log(f"{n_samples} sub-image samples from {pool_size} patterns")
    if n_samples < 2 * pool_size:
        log(f"warning: only {n_samples / pool_size:.1f} disks per training pattern lie wholly on the "
            f"{cfg.detector_px} px training detector (small convergence angles put the Bragg disks far out): "
            "the network would learn mostly the undiffracted disk; raise DiskTrainConfig.detector_px")
    si_cfg = SubImageConfig(**base_card["config"]["subimage"])
    net = SubImageDiskNet(si_cfg)
    net.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("si.")})
    net, si_info = train_subimage(samples, cfg, rng, gen, dev, log, net=net)
    sd.update({f"si.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    name = specialised_name(*cfg.crystals[0][:2], cfg.crystals[0][2], convergence_mrad)
    stem = out_dir / name
    save_file(sd, str(stem.with_suffix(".safetensors")))
    si_c = SubImageDiskNet(si_cfg)
    si_c.load_state_dict(net.cpu().state_dict())
    models = DiskModels(base_models.anchor_free, fuse_batchnorm(si_c.eval()), {"calibration": {}}, torch.device("cpu"))
    cal = None
    if calibrate:
        cal = calibrate_strain_gain(models, material=material, zone=zone, energy_kv=energy_kv,
                                    convergence_mrad=convergence_mrad, thickness_nm=cfg.thickness_nm,
                                    seed=cfg.seed + 2, log=log)
        models.card["calibration"] = {"subimage_offset_gain": cal["subimage_offset_gain"]}
    ev = held_out_evaluation(models, tables, cfg, alpha_mrad=convergence_mrad)
    card = {
        "id": name, "kind": "disks", "name": cfg.name,
        "format": base_card.get("format", "safetensors"),
        "description": f"{base_card.get('id', base)} with its sub-image disk-centre CNN fine-tuned on "
                       f"{material} [{zone}] at {energy_kv:g} kV, convergence {cfg.alpha_mrad[0]:g}-{cfg.alpha_mrad[1]:g} mrad "
                       f"(diffkit.models.disks_training.specialise_disk_models); anchor-free detector unchanged.",
        "valid_for": {"material": material, "zone_axis": zone, "beam_energy_kv": float(energy_kv),
                      "convergence_mrad": [round(v, 4) for v in cfg.alpha_mrad], "disk_radius_px": list(cfg.radius_px),
                      "note": "selected by diffkit.strain.detect.select_disk_models when the calibration matches"},
        "base_model": base_card.get("id", base),
        "training_data": {
            "simulation": base_card.get("training_data", {}).get("simulation", ""),
            "crystals": [f"{m} [{z}] {kv:g} kV" for m, z, kv in cfg.crystals],
            "pool_patterns": pool_size, "detector_px": cfg.detector_px,
            "ranges": {k: v for k, v in dataclasses.asdict(cfg).items() if k in (
                "radius_px", "alpha_mrad", "thickness_nm", "tilt_max_mrad", "small_strain", "large_deformation_fraction",
                "center_offset_px", "affine", "log10_dose", "noiseless_fraction", "background", "radial_background",
                "blur_px", "strain_order")},
        },
        "seed": cfg.seed,
        "config": base_card["config"],
        "training": {"subimage_fine_tune": si_info, "total_seconds": round(time.perf_counter() - t_start, 1),
                     "total_cpu_seconds": round(time.process_time() - cpu_start, 1), "device": str(dev),
                     "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                     "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
                     "hyperparameters": {"si_lr": cfg.si_lr, "si_batch": cfg.si_batch, "si_cpu_s": cfg.si_cpu_s,
                                         "weight_decay": cfg.weight_decay},
                     "budget_note": "fine-tuning stops on process CPU time (si_cpu_s); set si_steps to the step "
                                    "count above to reproduce the weights exactly"},
        "parameters": base_card.get("parameters", {}),
        "held_out": {"seed": cfg.seed + 1, "match_tolerance": "half a disk radius", **ev},
        "calibration": {"subimage_offset_gain": cal["subimage_offset_gain"] if cal else 1.0,
                        "method": "calibrate_strain_gain: slope of measured vs true strain on noiseless strained/"
                                  "unstrained pattern pairs through the whole subimage-cnn pipeline",
                        **({"slopes": cal["slopes"], "conditions": cal["conditions"]} if cal else {})},
    }
    write_card(stem.with_suffix(".json"), card)
    log(f"wrote {stem}.json / .safetensors")
    return card


def main(out_dir=None, smoke: bool = False, specialise=None, radius_px=None, log=print) -> dict:
    """Command-line entry (``diffkit train disks``).

    ``specialise`` = ``(material, zone, energy_kv, convergence_mrad)`` fine-tunes a specialised
    model (:func:`specialise_disk_models`) instead of training the general one
    (:func:`train_disk_models`, ~15 min on 2 CPU cores). ``smoke``: a few steps on a tiny pool
    (CI), written to ``out_dir``. ``radius_px`` (lo, hi): disk radii (px) of a specialised model.
    """
    if smoke and out_dir is None:
        raise ValueError("a smoke run needs an output folder (it must not replace the shipped weights)")
    if specialise:
        material, zone, kv, alpha = specialise
        cfg = specialised_config(material, zone, kv, alpha, cpu_s=20.0 if smoke else 1800.0,
                                 **({"radius_px": tuple(radius_px)} if radius_px else {}))
        if smoke:
            cfg = dataclasses.replace(cfg, si_steps=3, si_batch=32, small_tables=True, thickness_nm=(20.0, 100.0),
                                      tilt_max_mrad=0.5, pool_size=16)
        return specialise_disk_models(material, zone, kv, alpha, out_dir=out_dir, cfg=cfg, calibrate=not smoke, log=log)
    cfg = DiskTrainConfig()
    if smoke:
        cfg = dataclasses.replace(cfg, name="smoke", pool_size=16, af_steps=3, af_batch=4, si_steps=3, si_batch=32,
                                  crystals=cfg.crystals[:1], small_tables=True, alpha_mrad=(0.8, 2.0),
                                  thickness_nm=(20.0, 100.0), tilt_max_mrad=0.5)
    return train_disk_models(out_dir=out_dir, cfg=cfg, log=log)
