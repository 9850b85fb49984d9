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
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..pacbed.geometry import normalise, to_canonical, wrap_rotation_deg
from ..pacbed.networks import AlignNet, MeasureNet, distribution_stats, soft_targets
from ..sim.detector import DetectorRanges, apply_detector, random_params, similarity_part


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters (recorded in the model card)."""

    seed: int = 20261122
    measure_steps: int = 4000
    align_steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    thickness_sigma_nm: float = 0.6
    tilt_sigma_mrad: float = 0.12
    tilt_bin_mrad: float = 0.05
    thickness_bin_nm: float = 0.5
    train_thickness_step_nm: float = 1.0
    # raw detector effects: the full range a user's pattern may have (alignment undoes geometry)
    measure_ranges: DetectorRanges = dataclasses.field(default_factory=lambda: DetectorRanges(
        log10_dose=(5.0, 9.0), blur_px=(0.0, 1.6), scale=(0.9, 1.1), rotation_deg=(-45.0, 45.0), shift_px=8.0,
        affine=0.015))
    align_ranges: DetectorRanges = dataclasses.field(default_factory=lambda: DetectorRanges(
        log10_dose=(5.0, 9.0), blur_px=(0.0, 1.6), scale=(0.85, 1.18), rotation_deg=(-45.0, 45.0), shift_px=8.0,
        affine=0.015))
    # residual alignment error the measurement network is trained to tolerate (canonical px, deg, fraction)
    measure_residual: tuple = (0.3, 0.4, 0.004)
    # alignment training: fraction of wide (first-iteration) perturbations; the rest are small
    align_wide_fraction: float = 0.35
    align_narrow: tuple = (1.0, 2.0, 0.02)
    # raw detector: pixel size relative to the library's (detector px / library px)
    pixel_ratio: tuple = (0.7, 1.4)
    # fraction of frames on a detector that stops short of the network's field of view, and the
    # detector half-width for those (in disk radii)
    crop_fraction: float = 0.3
    crop_half_width_radii: tuple = (1.6, 2.2)
    # thin-pattern measurement network: the measurement network fine-tuned on training thicknesses up
    # to thin_measure_max_nm (0 steps: none), with the residual alignment error scaled down (thin
    # patterns' geometry is refined by least squares); used below the card's thin_measure.below_nm
    thin_measure_steps: int = 1200
    thin_measure_max_nm: float = 16.0
    thin_measure_lr: float = 5e-4
    thin_measure_residual_scale: float = 0.5
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
        self.disk_radius_px = float(lib.attrs["disk_radius_px"])
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


def draw_raw(sampler: "LibrarySampler", n: int, rng: np.random.Generator, ranges: DetectorRanges, cfg: TrainConfig,
             generator=None, device="cpu", interpolate: bool = True):
    """Library patterns placed on a raw detector frame, with their true geometry.

    The frame size and pixel size are random (``cfg.pixel_ratio``), so training sees the
    same resampling the predictor applies to user data. Returns ``(raw, centre, radius,
    rotation, t, tx, ty)``: raw (n, P, P) counts, centre (n, 2) (y, x) px, radius (n,) px,
    rotation (n,) degrees that bring the frame back to the canonical one (see
    :func:`~diffkit.pacbed.geometry.to_canonical`), thickness (nm) and signed tilts (mrad).
    """
    pats, t, tx, ty = sampler.draw(n, rng, interpolate=interpolate)
    p = random_params(n, rng, ranges)
    ratio = float(rng.uniform(*cfg.pixel_ratio))
    out_px = int(np.ceil(sampler.n_px * 1.1 / ratio)) + int(rng.integers(0, 8))
    if rng.random() < getattr(cfg, "crop_fraction", 0.0):
        r_raw = sampler.disk_radius_px / ratio
        out_px = min(out_px, int(2 * r_raw * rng.uniform(*cfg.crop_half_width_radii)))
    raw = apply_detector(pats, p, out_px=out_px, pixel_ratio=ratio, generator=generator, device=device)
    c = (out_px - 1) / 2
    dev = raw.device
    centre = torch.as_tensor(c + p.shift_px, dtype=torch.float32, device=dev)
    k, phi = similarity_part(p.affine)  # the residual distortion's own scale and rotation
    radius = torch.as_tensor(sampler.disk_radius_px * p.scale * k / ratio, dtype=torch.float32, device=dev)
    rotation = torch.as_tensor(-p.rotation_deg + phi, dtype=torch.float32, device=dev)
    return raw, centre, radius, rotation, t, tx, ty


def perturb_geometry(centre, radius, rotation, rng: np.random.Generator, sigma: tuple, disk_radius_px: float,
                     wide_fraction: float = 0.0):
    """Estimated geometry = truth + error; errors in canonical px, degrees and relative size.

    ``sigma`` = (centre px, rotation deg, log size) of Gaussian errors; a ``wide_fraction`` of
    the batch instead gets uniform errors spanning a first, rough alignment
    (+-10 px, +-45 deg, +-22 %).
    """
    n = len(radius)
    dev = radius.device
    s = (radius / disk_radius_px).cpu().numpy()
    dc = rng.normal(0, sigma[0], (n, 2))
    drot = rng.normal(0, sigma[1], n)
    dlog = rng.normal(0, sigma[2], n)
    wide = rng.random(n) < wide_fraction
    k = int(wide.sum())
    dc[wide] = rng.uniform(-10, 10, (k, 2))
    drot[wide] = rng.uniform(-45, 45, k)
    dlog[wide] = rng.uniform(-0.22, 0.22, k)
    f = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev)  # noqa: E731
    return centre + f(dc * s[:, None]), radius * f(np.exp(dlog)), rotation + f(drot)


def alignment_residual(centre, radius, rotation, est_centre, est_radius, est_rotation, disk_radius_px: float):
    """:class:`AlignNet` targets (dy, dx canonical px, log size, sin 4dphi, cos 4dphi) that take the
    estimated geometry to the true one, in the convention of ``PacbedPredictor.align``."""
    s = est_radius / disk_radius_px
    d = (centre - est_centre) / s[:, None]
    th = torch.deg2rad(est_rotation)
    cos, sin = torch.cos(th), torch.sin(th)
    dy = cos * d[:, 0] - sin * d[:, 1]
    dx = sin * d[:, 0] + cos * d[:, 1]
    phi = torch.deg2rad(rotation - est_rotation)
    return torch.stack([dy, dx, torch.log(radius / est_radius), torch.sin(4 * phi), torch.cos(4 * phi)], 1)

def measure_batch(sampler, n, rng, cfg: TrainConfig, generator=None, device="cpu", interpolate=True):
    """Canonical patterns as the predictor would see them after alignment (to a residual error
    of ``cfg.measure_residual``), with labels: ``(x, t, tx, ty)``."""
    raw, c, r, rot, t, tx, ty = draw_raw(sampler, n, rng, cfg.measure_ranges, cfg, generator, device, interpolate)
    ec, er, erot = perturb_geometry(c, r, rot, rng, cfg.measure_residual, sampler.disk_radius_px)
    x = to_canonical(raw, ec, er, erot, sampler.disk_radius_px, sampler.n_px)
    return x, t, tx, ty


def align_batch(sampler, n, rng, cfg: TrainConfig, generator=None, device="cpu"):
    """Canonical patterns from a perturbed geometry and the residual that corrects it: ``(x, target)``."""
    raw, c, r, rot, *_ = draw_raw(sampler, n, rng, cfg.align_ranges, cfg, generator, device)
    ec, er, erot = perturb_geometry(c, r, rot, rng, cfg.align_narrow, sampler.disk_radius_px, cfg.align_wide_fraction)
    x = to_canonical(raw, ec, er, erot, sampler.disk_radius_px, sampler.n_px)
    return x, alignment_residual(c, r, rot, ec, er, erot, sampler.disk_radius_px)


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
        x, t, tx, ty = measure_batch(sampler, cfg.batch_size, rng, cfg, gen, device)
        out = net(normalise(x))
        tt = torch.as_tensor(t, device=device)
        loss = _measure_loss(net, out, t, tx, ty, cfg, device)
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


def _measure_loss(net: MeasureNet, out: dict, t, tx, ty, cfg: TrainConfig, device):
    """Cross-entropy of the three heads against Gaussian soft labels (thickness nm, tilts mrad)."""
    as_t = lambda v: torch.as_tensor(v, device=device)  # noqa: E731
    return sum(-(soft_targets(as_t(v), bins, sigma) * F.log_softmax(out[k], -1)).sum(-1).mean()
               for k, v, bins, sigma in (("thickness", t, net.thickness_bins, cfg.thickness_sigma_nm),
                                         ("tilt_x", tx, net.tilt_bins, cfg.tilt_sigma_mrad),
                                         ("tilt_y", ty, net.tilt_bins, cfg.tilt_sigma_mrad)))


#: the thin-pattern measurement network is used below this predicted thickness: 2 nm inside the
#: thickest thickness it was fine-tuned on (TrainConfig.thin_measure_max_nm)
THIN_MEASURE_MARGIN_NM = 2.0


def train_thin_measure_net(base: MeasureNet, sampler: LibrarySampler, cfg: TrainConfig, device="cpu", log=print):
    """Fine-tune a copy of the measurement network on thin crystals (``sampler``: training thicknesses
    up to ``cfg.thin_measure_max_nm``) for ``cfg.thin_measure_steps`` steps.

    Below ~10 nm the tilt shows only in faint intensity differences and the general network, which sees
    such patterns in a few percent of its batches, leaves information unused (held out at 13.6 mrad, 3-6 nm:
    86 % of tilts within 0.5 mrad; fine-tuned: 92 %). The residual alignment error of the training
    patterns is ``cfg.thin_measure_residual_scale`` times the general network's, because the predictor
    refines the geometry of thin patterns by least squares. The copy's temperature is 1 during training
    and the base network's afterwards (calibration sets both).
    """
    import copy

    torch.manual_seed(cfg.seed + 17)
    rng = np.random.default_rng(cfg.seed + 17)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 17)
    net = copy.deepcopy(base).to(device)
    net.temperature.fill_(1.0)
    net.train()
    fine = dataclasses.replace(cfg, measure_residual=tuple(v * cfg.thin_measure_residual_scale
                                                           for v in cfg.measure_residual))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.thin_measure_lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    steps = cfg.thin_measure_steps
    for step in range(steps):
        _schedule(opt, step, steps, cfg.thin_measure_lr)
        x, t, tx, ty = measure_batch(sampler, cfg.batch_size, rng, fine, gen, device)
        loss = _measure_loss(net, net(normalise(x)), t, tx, ty, cfg, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"thin measure step {step:5d}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s")
    net.eval()
    net.temperature.copy_(base.temperature)
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
        x, target = align_batch(sampler, cfg.batch_size, rng, cfg, gen, device)
        pred = net(normalise(x))
        # balanced so that 1 px, 1 % and 1 degree errors cost about the same
        loss = F.smooth_l1_loss(pred[:, :2], target[:, :2], beta=0.5) \
            + F.smooth_l1_loss(60 * pred[:, 2], 60 * target[:, 2], beta=0.5) \
            + F.smooth_l1_loss(15 * pred[:, 3:], 15 * target[:, 3:], beta=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg.align_steps // 10) == 0 or step == cfg.align_steps - 1:
            log(f"align step {step:5d}/{cfg.align_steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s")
    net.eval()
    return net


def calibrate_temperature(net: MeasureNet, sampler: LibrarySampler, cfg: TrainConfig, n: int = 2048, device="cpu"):
    """Fit the two temperatures (thickness, tilt) by minimising NLL on a validation draw."""
    rng = np.random.default_rng(cfg.seed + 7)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    logits = {"thickness": [], "tilt_x": [], "tilt_y": []}
    labels = {"thickness": [], "tilt_x": [], "tilt_y": []}
    net.temperature.fill_(1.0)
    with torch.no_grad():
        for s in range(0, n, 256):
            x, t, tx, ty = measure_batch(sampler, min(256, n - s), rng, cfg, gen, device)
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
            x, *_ = measure_batch(sampler, min(256, n - s), rng, cfg, gen, device)
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


#: predicted thickness (nm) below which calibration tries the thin-pattern geometry refinement (the
#: harmonic's 45-deg branch is reliable below ~10 nm; the card's ``below_nm`` is chosen up to this)
THIN_REFINE_MAX_NM = 15.0


def thin_rotation_ring(lib, material: str, zone: str, energy_kv: float, convergence_mrad: float,
                       thin_nm: float = 5.0) -> dict | None:
    """Annulus and sign of the four-fold harmonic that fixes the crystal axes of thin patterns.

    The annulus runs from ``alpha + g/2`` to ``alpha + sqrt(2) g`` (mrad; ``g`` the first-order
    spacing ``lambda / a``): outside the zero-order disk, out to the edge of the first diagonal
    (110) disks, where axial (100) and diagonal disks cover different azimuths. Its sign is read
    from the noiseless library below ``thin_nm`` (median over all tilts). None for a zone that is
    not square (the rule is four-fold) or without a built-in crystal.
    """
    from ..pacbed.geometry import fourfold_harmonic
    from ..sim.crystals import get_crystal
    from ..sim.scattering import wavelength_angstrom

    try:
        cr = get_crystal(material, zone)
    except KeyError:
        return None
    if abs(cr.a - cr.b) > 1e-6 * cr.a:
        return None
    g = wavelength_angstrom(energy_kv) / cr.a * 1e3
    px = float(lib.attrs["pixel_size_mrad"])
    n = lib.sizes["kx"]
    lo, hi = convergence_mrad + g / 2, min(convergence_mrad + math.sqrt(2) * g, (n / 2 - 1) * px)
    th = np.asarray(lib["thickness_nm"].values)
    pats = torch.as_tensor(lib["pattern"].values[:, th < thin_nm], dtype=torch.float32)
    z = fourfold_harmonic(pats.reshape(-1, n, n), lo / px, hi / px)
    sign = 1.0 if float(torch.median(z.real)) >= 0 else -1.0
    return {"ring_mrad": [float(lo), float(hi)], "sign": sign,
            "sign_fraction": float(((z.real * sign) > 0).float().mean()),
            "method": f"four-fold harmonic of the annulus alpha + g/2 .. alpha + sqrt(2) g (g = {g:.2f} mrad); "
                      f"sign from the noiseless library below {thin_nm:g} nm; applied below the predicted "
                      "thickness below_nm that maximises the fraction of rotations within 1 deg end to end"}


def thin_reference_patterns(lib, max_nm: float = THIN_REFINE_MAX_NM + 2.0):
    """Zero-tilt library patterns (T, n, n) float32 and their thicknesses (T,) nm up to ``max_nm``:
    the reference of the thin-pattern geometry refinement
    (:meth:`~diffkit.pacbed.predictor.PacbedPredictor.refine_thin_geometry`)."""
    tx, ty = np.asarray(lib["tilt_x_mrad"].values), np.asarray(lib["tilt_y_mrad"].values)
    zero = np.nonzero((np.abs(tx) < 1e-9) & (np.abs(ty) < 1e-9))[0]
    if len(zero) == 0:
        raise ValueError("the library has no zero-tilt patterns")
    th = np.asarray(lib["thickness_nm"].values)
    keep = th <= max_nm
    pats = np.asarray(lib["pattern"].isel(tilt=int(zero[0])).values)[keep]
    return pats.astype(np.float32), th[keep].astype(np.float64)


def calibrate_on_pipeline(predictor, sampler: LibrarySampler, cfg: TrainConfig, n: int = 2048, device="cpu",
                          thin_rule: dict | None = None, thin_reference=None):
    """Calibrate a packaged predictor end to end: raw detector frames -> alignment -> networks.

    * Temperatures (thickness, tilt) are chosen so that the central 68 % and 95 % intervals
      of the predicted distributions cover the truth 68 % and 95 % of the time.
    * The out-of-distribution pattern statistics (:mod:`diffkit.pacbed.ood`) get their
      training ranges per thickness band.
    * The rotation error of the alignment gets its 68 % / 95 % quantiles per thickness band
      (:data:`ROTATION_BANDS_NM`): thin patterns carry little four-fold contrast, so their
      rotation (and the crystal axes the tilt refers to) is uncertain.
    * With ``thin_rule`` (:func:`thin_rotation_ring`), its ``below_nm`` is chosen as the
      predicted thickness below which the harmonic's axes replace the network's, maximising
      the fraction of rotations within 1 deg; everything else is then measured on the axes the
      pipeline will use (the rule's below that thickness). With ``thin_reference`` (an
      :class:`~diffkit.pacbed.lsf.LsfLibrary` of :func:`thin_reference_patterns`) the rule's
      geometry is refined by least squares against it, and ``below_nm`` is chosen among the
      bands up to :data:`THIN_REFINE_MAX_NM`.
    * Temperatures are fitted globally and per predicted-thickness band
      (:data:`TEMPERATURE_BANDS_NM`).
    * The relative disk-size error of the whole pipeline gets its median per predicted thickness
      (:func:`size_bias_table`): the alignment network's size estimate carries a bias of a few
      tenths of a percent that changes with the pattern, i.e. with thickness.

    Uses training thicknesses with a seed of its own (never the held-out test set).
    Returns ``((temperatures, per_band), pattern_statistics, rotation_uncertainty, thin_rule,
    size_bias)``.
    """
    from ..pacbed.ood import descriptor_ranges, pattern_descriptors, recorded_area

    rng = np.random.default_rng(cfg.seed + 13)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 13)
    net = predictor.measure_net
    nets = [m for m in (net, predictor.thin_measure_net) if m is not None]
    saved = [m.temperature.clone() for m in nets]
    for m in nets:
        m.temperature.fill_(1.0)
    keys = ("thickness", "tilt_x", "tilt_y")
    # per pattern, on the network's axes (0) and on the thin-pattern rule's axes (1)
    L = [{k: [] for k in keys}, {k: [] for k in keys}]
    desc, err, size = [[], []], [[], []], [[], []]
    Y = {k: [] for k in keys}
    t_pred = []
    with torch.no_grad():
        for s in range(0, n, 256):
            raw, _, r_true, rot_true, t, tx, ty = draw_raw(sampler, min(256, n - s), rng, cfg.measure_ranges, cfg, gen, device)
            c, r, rot, can = predictor.align(raw)
            for k, v in zip(keys, (t, tx, ty)):
                Y[k].append(torch.as_tensor(v))
            out0 = predictor._network_outputs(can)
            tp0 = distribution_stats(out0["thickness"], net.thickness_bins)[1]
            t_pred.append(tp0.cpu())
            views = [(c, r, rot, can, out0)]
            if thin_rule:
                c1, r1 = c, r
                rot1 = wrap_rotation_deg(rot + predictor.thin_rotation_correction(can, thin_rule))
                if thin_reference is not None:
                    sel = tp0 < THIN_REFINE_MAX_NM
                    if sel.any():
                        c1, r1, rot1 = c.clone(), r.clone(), rot1.clone()
                        c1[sel], r1[sel], rot1[sel] = predictor.refine_thin_geometry(
                            raw[sel], c[sel], r[sel], rot1[sel], tp0[sel], reference=thin_reference)
                can1 = to_canonical(raw, c1, r1, rot1, predictor.disk_radius_px, predictor.n_px)
                views.append((c1, r1, rot1, can1, None))
            for v, (cc, rr, ro, cv, out) in enumerate(views):
                if out is None:
                    out = predictor._network_outputs(cv)
                for k in keys:
                    L[v][k].append(out[k].cpu())
                err[v].append(wrap_rotation_deg(ro - rot_true).abs().cpu())
                size[v].append((rr / r_true - 1).cpu())
                valid = recorded_area(raw.shape[-2:], cc, rr, ro, predictor.disk_radius_px, predictor.n_px)
                desc[v].append(pattern_descriptors(cv, predictor.disk_radius_px, valid).cpu())
    for m, T in zip(nets, saved):
        m.temperature.copy_(T)
    tp = torch.cat(t_pred).numpy()
    e0 = torch.cat(err[0]).numpy()
    use = np.zeros(len(tp), bool)  # patterns on the rule's axes
    if thin_rule:
        e1 = torch.cat(err[1]).numpy()
        # (within 1 deg, threshold): the first maximum, so ties keep the network
        cands = [e for e in ROTATION_BANDS_NM[:-1] if thin_reference is None or e <= THIN_REFINE_MAX_NM]
        score = [(float(np.mean(np.where(tp < e, e1, e0) <= 1.0)), -e) for e in cands]
        below = -max(score)[1]
        thin_rule = dict(thin_rule, below_nm=float(below),
                         within_1deg={"network": float(np.mean(e0 <= 1.0)), "with_rule": max(score)[0]})
        use = tp < below
    pick = lambda a0, a1: torch.where(torch.as_tensor(use).reshape(-1, *([1] * (a0.ndim - 1))), a1, a0)  # noqa: E731
    both = lambda lst: pick(torch.cat(lst[0]), torch.cat(lst[1])) if thin_rule else torch.cat(lst[0])  # noqa: E731
    logits = {k: both([L[0][k], L[1][k]]) for k in keys}
    y = {k: torch.cat(Y[k]).float() for k in keys}
    band = np.clip(np.searchsorted(TEMPERATURE_BANDS_NM, tp, side="right") - 1, 0, len(TEMPERATURE_BANDS_NM) - 2)
    temps, per_band = [], {"edges_nm": [float(e) for e in TEMPERATURE_BANDS_NM], "thickness": [], "tilt": [], "n": []}
    for name, ks, bins in (("thickness", ("thickness",), net.thickness_bins.cpu()),
                           ("tilt", ("tilt_x", "tilt_y"), net.tilt_bins.cpu())):
        lg = torch.cat([logits[k] for k in ks]).float()
        yy = torch.cat([y[k] for k in ks])
        bb = np.concatenate([band] * len(ks))
        temps.append(_coverage_temperature(lg, yy, bins))
        for j in range(len(TEMPERATURE_BANDS_NM) - 1):
            m = torch.as_tensor(bb == j)
            # a band with too few calibration patterns keeps the global temperature
            per_band[name].append(_coverage_temperature(lg[m], yy[m], bins) if int(m.sum()) >= 100 else temps[-1])
    per_band["n"] = [int((band == j).sum()) for j in range(len(TEMPERATURE_BANDS_NM) - 1)]
    t_true = y["thickness"].numpy()
    table = descriptor_ranges(both(desc).numpy(), t_true)
    rot_err = np.where(use, torch.cat(err[1]).numpy(), e0) if thin_rule else e0
    size_bias = size_bias_table(both(size).numpy(), tp)
    return (temps, per_band), table, rotation_error_table(rot_err, t_true), thin_rule, size_bias


def size_bias_table(rel_error: np.ndarray, thickness_nm: np.ndarray, step_nm: float = 1.0, window_nm: float = 1.0,
                    min_count: int = 10, limit: float = 0.02) -> dict:
    """Median relative disk-size error of the pipeline per predicted thickness (nm).

    ``rel_error`` is radius / true radius - 1 of calibration patterns, ``thickness_nm`` their predicted
    thicknesses. On a grid of ``step_nm``, the median over the patterns within ``+-window_nm``
    (0 where fewer than ``min_count``), clipped to ``+-limit``. The predictor divides its radius by
    ``1 + bias`` at the predicted thickness (:meth:`~diffkit.pacbed.predictor.PacbedPredictor.corrected_radius`).

    >>> t = np.repeat(np.arange(1.0, 11.0), 20)
    >>> tab = size_bias_table(np.where(t > 5, 0.004, -0.002), t)
    >>> tab["relative"][0], tab["relative"][-1]
    (-0.002, 0.004)
    """
    e, t = np.asarray(rel_error, float), np.asarray(thickness_nm, float)
    ok = np.isfinite(e) & np.isfinite(t)
    e, t = e[ok], t[ok]
    grid = np.arange(np.floor(t.min()), np.ceil(t.max()) + step_nm / 2, step_nm)
    bias, count = [], []
    for g in grid:
        m = np.abs(t - g) <= window_nm
        count.append(int(m.sum()))
        bias.append(float(np.clip(np.median(e[m]), -limit, limit)) if m.sum() >= min_count else 0.0)
    return {"thickness_nm": [float(v) for v in grid], "relative": [round(v, 6) for v in bias], "n": count,
            "window_nm": float(window_nm),
            "method": "median of radius / true radius - 1 of the full pipeline on raw frames of training thicknesses, "
                      "per predicted thickness (+- window_nm); the predictor divides its radius by 1 + bias"}


#: predicted-thickness bands (nm) with temperatures of their own: the networks are confidently wrong
#: about the tilt of the thinnest patterns (held out at 13.6 mrad, 0-5 nm: 29 % of tilt errors within
#: 2 sigma with one global temperature) and over-cautious above 20 nm
TEMPERATURE_BANDS_NM = (0.0, 5.0, 10.0, 20.0, 1e9)


def _coverage_temperature(logits: torch.Tensor, y: torch.Tensor, bins: torch.Tensor) -> float:
    """Temperature whose central 68 % / 95 % intervals cover ``y`` closest to 68 % / 95 %."""
    from ..pacbed.predictor import _quantile

    best = None
    for T in np.exp(np.linspace(np.log(0.01), np.log(3.0), 120)):
        p = torch.softmax(logits / float(T), -1)
        cov = []
        for lo, hi in ((0.16, 0.84), (0.025, 0.975)):
            a, b = _quantile(p, bins, lo), _quantile(p, bins, hi)
            cov.append(float(((y >= a) & (y <= b)).float().mean()))
        score = (cov[0] - 0.68) ** 2 + (cov[1] - 0.95) ** 2
        if best is None or score < best[0]:
            best = (score, float(T))
    return best[1]


#: thickness bands (nm) of the rotation-uncertainty table
ROTATION_BANDS_NM = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 40.0, 1e9)


def rotation_error_table(abs_error_deg: np.ndarray, thickness_nm: np.ndarray, edges=ROTATION_BANDS_NM) -> dict:
    """68 % / 95 % quantiles of the absolute rotation error (deg) per thickness band (nm)."""
    e, t = np.asarray(abs_error_deg, float), np.asarray(thickness_nm, float)
    q68, q95, count = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (t >= lo) & (t < hi)
        count.append(int(m.sum()))
        # an empty band (thickness range beyond the library) says nothing: the widest band's value
        q68.append(float(np.quantile(e[m], 0.68)) if m.any() else float("nan"))
        q95.append(float(np.quantile(e[m], 0.95)) if m.any() else float("nan"))
    worst68, worst95 = np.nanmax(q68), np.nanmax(q95)
    return {"edges_nm": [float(v) for v in edges], "q68_deg": [v if np.isfinite(v) else worst68 for v in q68],
            "q95_deg": [v if np.isfinite(v) else worst95 for v in q95], "n": count,
            "method": "absolute rotation error of the full pipeline on raw frames of training thicknesses, "
                      "quantiles per true-thickness band; looked up by the predicted thickness"}
