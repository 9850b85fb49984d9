"""The PACBED measurement pipeline: raw pattern in, thickness and tilt with uncertainty out.

Steps (seed 000, Fig. 2), all batched:

1. rough disk centre and size from projection moments (or the calibrated disk size);
2. :class:`~diffkit.pacbed.networks.AlignNet` refines centre, size and rotation,
   iterated with re-sampling (``grid_sample``) until converged; the last pass averages
   its corrections over symmetric views of the pattern (``align_views``);
3. optional uniform background subtraction, its level converged with the thickness
   estimate (``background_strength``, fraction of the mean intensity per nm);
4. :class:`~diffkit.pacbed.networks.MeasureNet` gives distributions over thickness
   and signed tilt, hence mean, standard deviation, intervals and top alternatives;
5. out-of-distribution check: Mahalanobis distance of the network features to the
   training distribution, plus plausibility of the alignment and of the pattern itself.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import torch

from ..calibration import Calibration
from ..errors import BadInputError
from ..models.registry import find_card
from .geometry import as_batch, fourfold_harmonic, normalise, rough_geometry, to_canonical, wrap_rotation_deg
from .networks import AlignNet, MeasureNet, distribution_stats
from .ood import implausible, pattern_descriptors, recorded_area, vacuum_like

OOD_REASONS = {
    0: "ok",
    1: "pattern unlike the training data (feature distance)",
    2: "disk size/centre could not be aligned",
    3: "no diffraction contrast (blank or amorphous region)",
    4: "empty or non-finite pattern",
    5: "pattern statistics outside the training range for its thickness",
    6: "disk size does not match the model's convergence angle at the calibrated pixel size "
       "(wrong convergence angle or pixel-size calibration; leave pixel_size_mrad unset to let the "
       "pipeline measure the disk size)",
}

#: largest relative mismatch between the freely aligned disk radius and the radius implied by a
#: given pixel size before reason 6 is raised. Measured on held-out frames: with a correct pixel size
#: the ratio stays within 0.992-1.013 (1st-99th percentile); thickness within 1 nm falls from 99.7 %
#: (correct) to 98.3 % (3 % off), 93.5 % (5 % off) and 70 % (8 % off).
CALIBRATION_TOLERANCE = 0.03


def default_device():
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quantile(p: torch.Tensor, bins: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile of binned distributions (B, K), each bin's mass spread uniformly over its width."""
    h = float(bins[1] - bins[0]) if len(bins) > 1 else 1.0
    cdf = torch.cumsum(p, -1)
    target = torch.full(cdf.shape[:-1] + (1,), q, device=p.device, dtype=cdf.dtype)
    idx = torch.searchsorted(cdf, target).clamp(max=len(bins) - 1)[..., 0]
    c_hi = cdf.gather(-1, idx[..., None])[..., 0]
    m = p.gather(-1, idx[..., None])[..., 0].clamp_min(1e-12)
    frac = (1 - (c_hi - q) / m).clamp(0, 1)
    return bins[idx] - h / 2 + frac * h


def apply_band_mask(canonical: torch.Tensor, inner_px: float, width_px: float) -> torch.Tensor:
    """Set the pixels of an annulus (inner radius, width in canonical px) to their mean (seed Sec. 2.3)."""
    n = canonical.shape[-1]
    v = torch.arange(n, dtype=torch.float32, device=canonical.device) - (n - 1) / 2
    r = torch.sqrt(v[:, None] ** 2 + v[None, :] ** 2)
    ring = (r >= inner_px) & (r < inner_px + width_px)
    if not ring.any():
        return canonical
    out = canonical.clone()
    mean = (canonical * ring).sum(dim=(-2, -1)) / ring.sum()
    out[:, ring] = mean[:, None]
    return out


# symmetric views of a canonical pattern as (transpose, flip rows, flip columns), applied in that
# order: identity, transpose, 180 deg rotation, anti-transpose, then the two mirrors and +-90 deg
_VIEWS = ((0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1))


def _view(canonical: torch.Tensor, view) -> torch.Tensor:
    t, fy, fx = view
    v = canonical.transpose(-1, -2) if t else canonical
    if fy:
        v = v.flip(-2)
    if fx:
        v = v.flip(-1)
    return v


def _view_back(corr, view) -> torch.Tensor:
    """Corrections (dy, dx, dlog, drot) measured on a view, expressed for the original pattern (4, B)."""
    dy, dx, dlog, drot = corr
    t, fy, fx = view
    if fy:  # a mirror reverses the sense of rotation
        dy, drot = -dy, -drot
    if fx:
        dx, drot = -dx, -drot
    if t:
        dy, dx, drot = dx, dy, -drot
    return torch.stack([dy, dx, dlog, drot])


def _corrected(centre, radius, rot, dy, dx, dlog, drot, disk_radius_px: float):
    """Geometry after a correction given in the canonical frame (px, log size, deg)."""
    s = radius / disk_radius_px
    th = torch.deg2rad(rot)
    centre = centre + torch.stack([s * (torch.sin(th) * dx + torch.cos(th) * dy),
                                   s * (torch.cos(th) * dx - torch.sin(th) * dy)], 1)
    return centre, radius * torch.exp(dlog), wrap_rotation_deg(rot + drot)


class PacbedPredictor:
    """Shipped PACBED networks for one (material, zone, kV, convergence angle).

    Use :func:`load_predictor` to get one. ``predict_batch`` takes raw patterns
    (B, H, W) of any detector size and returns a dict of (B,) numpy arrays.
    """

    def __init__(self, align_net: AlignNet, measure_net: MeasureNet, card: dict, ood_mu, ood_icov, device=None,
                 thin_measure_net: MeasureNet | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.align_net = align_net.to(self.device).eval()
        self.measure_net = measure_net.to(self.device).eval()
        #: measurement network fine-tuned on thin crystals (model card ``thin_measure``): gives the tilt
        #: of patterns predicted thinner than ``thin_measure["below_nm"]``; None when the card has none
        self.thin_measure_net = thin_measure_net.to(self.device).eval() if thin_measure_net is not None else None
        self.thin_measure = card.get("thin_measure") if thin_measure_net is not None else None
        #: False: the general network's tilt for thin patterns too (held out at 13.6 mrad, 3-6 nm: 86 % of
        #: tilts within 0.5 mrad with it off, 92 % on)
        self.use_thin_measure = self.thin_measure is not None
        self.card = card
        self.card_id = card["id"] + ("@" + card["fingerprint"] if card.get("fingerprint") else "")
        self.n_px = int(card["geometry"]["n_px"])
        self.disk_radius_px = float(card["geometry"]["disk_radius_px"])
        self.pixel_size_mrad = float(card["geometry"]["pixel_size_mrad"])
        self.convergence_mrad = float(card["convergence_mrad"])
        self.ood_mu = ood_mu.to(self.device)
        self.ood_icov = ood_icov.to(self.device)
        self.ood_threshold = float(card["ood"]["threshold"])
        self.pattern_statistics = card["ood"].get("pattern_statistics")
        res = card.get("resolution_floor", {})
        self.resolution_floor = (float(res.get("thickness_nm", 0.0)), float(res.get("tilt_mrad", 0.0)))
        self.last_free_radius = None
        self.input_requirements = {"min_px": 32, "convergence_mrad": self.convergence_mrad}
        self.use_amp = self.device.type == "cuda"
        #: most alignment passes per pattern (patterns whose correction is negligible stop earlier);
        #: fewer is faster but less accurate (held out at 13.6 mrad: 6 -> 99.6 %, 3 -> 99.1 % within 1 nm)
        self.align_iterations = 6
        #: views averaged in a last alignment pass: 4 = the canonical pattern, its transpose, its
        #: 180 deg rotation and its anti-transpose (the corrections mapped back and averaged, which
        #: cancels part of the network's orientation-dependent error); 1 disables. Held out at
        #: 13.6 mrad: size within 1 % 97.5 -> 98.9 %, rotation within 1 deg 94.7 -> 95.1 %.
        self.align_views = 4
        #: thin-pattern rule from the model card (``thin_rotation``): below ``below_nm`` (predicted)
        #: the crystal axes come from the four-fold harmonic of an annulus whose sign is fixed in the
        #: thin limit (see :meth:`thin_rotation_correction`); None disables
        self.thin_rotation = card.get("thin_rotation")
        #: refine the geometry of those thin patterns by least squares against the card's zero-tilt
        #: library patterns (``thin_rotation["reference"]``, :meth:`refine_thin_geometry`); False
        #: keeps the harmonic's axes (faster; held out at 13.6 mrad, 0-3 nm: 100 % within 1 deg with it, 47 % without)
        self.thin_refine = bool(self.thin_rotation and self.thin_rotation.get("reference"))
        self._thin_reference = None
        cal = card.get("calibration_temperatures", {})
        self.band_temperatures = None
        if cal.get("bands"):
            b = cal["bands"]
            tt = lambda v: torch.as_tensor(v, dtype=torch.float32, device=self.device)  # noqa: E731
            self.band_temperatures = (tt(b["edges_nm"]), cal["thickness"] / tt(b["thickness"]), cal["tilt"] / tt(b["tilt"]))

    # ------------------------------------------------------------------ geometry
    @torch.no_grad()
    def align(self, patterns, pixel_size_mrad: float | None = None, iterations: int | None = None):
        """Disk centre (B, 2) (y, x) px, radius (B,) px, rotation (B,) deg and the canonical patterns."""
        iterations = self.align_iterations if iterations is None else int(iterations)
        x = as_batch(patterns).to(self.device)
        centre, radius = rough_geometry(x)
        # the disk size is always refined freely (an independent measurement to check a given
        # calibration against); a calibrated size replaces it for the canonical frame at the end
        calibrated = self.convergence_mrad / float(pixel_size_mrad) if pixel_size_mrad else None
        rot = torch.zeros_like(radius)
        active = torch.arange(len(x), device=x.device)
        for it in range(iterations):
            xa, c, r, ro = x[active], centre[active], radius[active], rot[active]
            can = to_canonical(xa, c, r, ro, self.disk_radius_px, self.n_px)
            dy, dx, dlog, drot = self._corrections(can)
            centre[active], radius[active], rot[active] = _corrected(c, r, ro, dy, dx, dlog, drot, self.disk_radius_px)
            # patterns whose last correction was negligible are done (after at least 2 passes)
            moving = (torch.hypot(dy, dx) > 0.05) | (dlog.abs() > 1e-3) | (drot.abs() > 0.05)
            if it >= 1:
                active = active[moving]
                if len(active) == 0:
                    break
        if self.align_views > 1 and iterations > 0:
            can = to_canonical(x, centre, radius, rot, self.disk_radius_px, self.n_px)
            views = _VIEWS[:self.align_views]
            corr = torch.stack([_view_back(self._corrections(_view(can, v)), v) for v in views])  # (V, 4, B)
            dy, dx, dlog = corr[:, :3].mean(0)
            a = torch.deg2rad(4 * corr[:, 3])  # rotations are defined modulo 90 deg: circular mean
            drot = torch.rad2deg(torch.atan2(torch.sin(a).mean(0), torch.cos(a).mean(0))) / 4
            centre, radius, rot = _corrected(centre, radius, rot, dy, dx, dlog, drot, self.disk_radius_px)
        # the disk size the network finds, kept to check it against the calibration
        self.last_free_radius = radius
        if calibrated is not None:
            radius = torch.full_like(radius, calibrated)
        can = to_canonical(x, centre, radius, rot, self.disk_radius_px, self.n_px)
        return centre, radius, rot, can

    def _corrections(self, canonical: torch.Tensor):
        """AlignNet's corrections (dy, dx px; d log size; d rotation deg) in the canonical frame."""
        with torch.autocast(self.device.type, enabled=self.use_amp):
            p = self.align_net(normalise(canonical)).float()
        return p[:, 0], p[:, 1], p[:, 2].clamp(-0.3, 0.3), torch.rad2deg(torch.atan2(p[:, 3], p[:, 4]) / 4)

    def thin_rotation_correction(self, canonical: torch.Tensor, rule: dict | None = None) -> torch.Tensor:
        """Rotation correction (deg, (B,)) of canonical patterns from the four-fold harmonic of the
        annulus ``rule["ring_mrad"]`` (from just outside the zero-order disk to the edge of the
        first diagonal disks), whose sign ``rule["sign"]`` is fixed for thin crystals: there the
        network sees too little contrast and may settle 45 deg off, while the harmonic cannot.
        Add it to the rotation (``rotation + correction``) of the patterns thinner than
        ``rule["below_nm"]``."""
        rule = rule or self.thin_rotation
        lo, hi = (float(v) / self.pixel_size_mrad for v in rule["ring_mrad"])
        z = fourfold_harmonic(canonical, lo, hi) * float(rule["sign"])
        return -torch.rad2deg(torch.angle(z)) / 4

    @torch.no_grad()
    def locate(self, patterns, pixel_size_mrad: float | None = None):
        """Alignment (:meth:`align`) plus the crystal axes of thin patterns (:meth:`thin_rotation_correction`,
        which needs a first thickness estimate): centre (B, 2) px, radius (B,) px, rotation (B,) deg,
        the canonical patterns and the network outputs on them (unmasked, no background removed)."""
        x = as_batch(patterns).to(self.device)
        centre, radius, rot, can = self.align(x, pixel_size_mrad=pixel_size_mrad)
        out = self._measure(can)
        t = distribution_stats(out["thickness"], self.measure_net.thickness_bins)[1]
        centre, radius, rot, can, thin = self._thin_axes(x, centre, radius, rot, can, t,
                                                         fixed_radius=pixel_size_mrad is not None)
        if thin.any():  # the whole batch again: results do not depend on which neighbours were thin
            out = self._measure(can)
        return centre, radius, rot, can, out

    def _thin_axes(self, x, centre, radius, rot, can, thickness_nm, fixed_radius: bool = False):
        """Apply the thin-pattern rule (harmonic axes, then the least-squares geometry refinement when
        :attr:`thin_refine`): (centre, radius, rotation, canonical, changed mask)."""
        thin = torch.zeros(len(can), dtype=torch.bool, device=can.device)
        if not self.thin_rotation:
            return centre, radius, rot, can, thin
        thin = thickness_nm < float(self.thin_rotation["below_nm"])
        if thin.any():
            centre, radius, rot, can = centre.clone(), radius.clone(), rot.clone(), can.clone()
            rot[thin] = wrap_rotation_deg(rot[thin] + self.thin_rotation_correction(can[thin]))
            if self.thin_refine:
                # start from the disk size the network found (a calibrated size may be off the
                # pattern's by more than the refinement's guard); keep the calibrated one if given
                free = self.last_free_radius if self.last_free_radius is not None else radius
                c2, r2, rot2 = self.refine_thin_geometry(x[thin], centre[thin], free[thin], rot[thin],
                                                         thickness_nm[thin])
                centre[thin], rot[thin] = c2, rot2
                if not fixed_radius:
                    radius[thin] = r2
                if self.last_free_radius is not None:
                    self.last_free_radius = self.last_free_radius.clone()
                    self.last_free_radius[thin] = r2
            can[thin] = to_canonical(x[thin], centre[thin], radius[thin], rot[thin], self.disk_radius_px, self.n_px)
        return centre, radius, rot, can, thin

    def thin_reference(self):
        """The card's thin-crystal reference patterns (zero tilt, library frame) as an
        :class:`~diffkit.pacbed.lsf.LsfLibrary`, or None when the card has none."""
        ref = (self.thin_rotation or {}).get("reference")
        if ref is None:
            return None
        if self._thin_reference is None:
            from ..models.registry import check_tensors, read_weights
            from .lsf import LsfLibrary

            base = pathlib.Path(self.card.get("card_path") or self.card.get("weights_path") or ".").parent
            # the file name is a plain name next to the card and its checksum is mandatory (validate_card)
            sd = read_weights(self.card, path=base / ref["file"], sha256=ref["sha256"],
                              what="thin-pattern reference")
            n = sd["patterns"].shape[0] if "patterns" in sd and sd["patterns"].ndim == 3 else 1
            side = tuple(sd["patterns"].shape[1:]) if "patterns" in sd and sd["patterns"].ndim == 3 else (self.n_px,) * 2
            check_tensors(sd, {"patterns": (n,) + side, "thickness_nm": (n,)},
                          self.card.get("card_path", self.card["id"]), "thin-pattern reference")
            self._thin_reference = LsfLibrary.zero_tilt(
                sd["patterns"].float().numpy(), sd["thickness_nm"].double().numpy(),
                pixel_size_mrad=self.pixel_size_mrad, disk_radius_px=self.disk_radius_px,
                convergence_mrad=self.convergence_mrad, tilt_step_mrad=float(ref["tilt_step_mrad"]),
                device=self.device, smooth_px=float(ref.get("smooth_px", 0.5)))
        return self._thin_reference

    def refine_thin_geometry(self, x, centre, radius, rot, thickness_nm, window_nm: float = 1.0,
                             max_change=(3.0, 0.05, 20.0), reference=None, rotation_step_deg: float = 3.0):
        """Least-squares refinement of the centre (y, x px), disk radius (px) and rotation (deg) of thin
        patterns (B, H, W) against the card's zero-tilt library patterns within ``thickness_nm +-
        window_nm`` (:func:`diffkit.pacbed.lsf.lsf_fit`: intensity factor and uniform background in
        closed form, Gauss-Newton on the geometry). Thin patterns depend little on tilt but their
        disks' overlaps fix the geometry, which the alignment network reads poorly below ~10 nm.
        A pattern whose fit fails or moves further than ``max_change`` (px, relative radius, deg)
        keeps its start values. ``rotation_step_deg`` is the coarse rotation step of the search (the
        harmonic's axes of the thinnest patterns can be ~10 deg off); ``reference`` an LsfLibrary to
        use instead of the card's (calibration).
        Returns (centre, radius, rotation) tensors."""
        from .lsf import GeometrySearch, lsf_fit

        lib = reference if reference is not None else self.thin_reference()
        if lib is None or len(x) == 0:
            return centre, radius, rot
        c0, r0, a0 = (v.detach().double().cpu().numpy() for v in (centre, radius, rot))
        t = np.clip(np.asarray(thickness_nm.detach().cpu().numpy(), float), lib.thickness_nm.min() + window_nm,
                    lib.thickness_nm.max() - window_nm)
        c1, r1, a1 = c0.copy(), r0.copy(), a0.copy()
        # the harmonic's axes of the thinnest patterns can be ~10 deg off: a coarse rotation step of a
        # few degrees (Gauss-Newton then converges to ~0.05 deg); centre and size start close enough
        # for Gauss-Newton alone
        gs = GeometrySearch(rotation_deg=float(rotation_step_deg), coarse_axes=(3,))

        def fit(idx):
            geo = {"center_y_px": c0[idx, 0], "center_x_px": c0[idx, 1], "disk_radius_px": r0[idx],
                   "rotation_deg": a0[idx]}
            return lsf_fit(lib, x[idx], geometry=geo, fit_background=True, return_landscape=False,
                           search={"thickness_nm": (t[idx] - window_nm, t[idx] + window_nm)}, geometry_search=gs)

        every = np.arange(len(x))
        try:
            fits = [(every, fit(every))]
        except BadInputError:  # one at a time: a pattern the fit cannot use keeps its start values
            fits = []
            for i in every:
                try:
                    fits.append((every[i:i + 1], fit(every[i:i + 1])))
                except BadInputError:
                    pass
        for idx, f in fits:
            c = np.stack([f["center_y_px"].values, f["center_x_px"].values], 1)
            r, a = f["disk_radius_px"].values, f["rotation_deg"].values
            da = (a - a0[idx] + 45.0) % 90.0 - 45.0
            ok = (np.isfinite(c).all(1) & np.isfinite(r) & np.isfinite(a)
                  & (np.hypot(*(c - c0[idx]).T) <= max_change[0]) & (np.abs(r / r0[idx] - 1) <= max_change[1])
                  & (np.abs(da) <= max_change[2]))
            c1[idx[ok]], r1[idx[ok]], a1[idx[ok]] = c[ok], r[ok], a0[idx[ok]] + da[ok]
        tt = lambda v, like: torch.as_tensor(v, dtype=like.dtype, device=like.device)  # noqa: E731
        return tt(c1, centre), tt(r1, radius), wrap_rotation_deg(tt(a1, rot))

    # ------------------------------------------------------------------ measurement
    @torch.no_grad()
    def _network_outputs(self, canonical: torch.Tensor) -> dict:
        """MeasureNet outputs (logits at the networks' global temperature, backbone features) of canonical
        patterns; the tilt logits of patterns the general network finds thinner than
        ``thin_measure["below_nm"]`` come from :attr:`thin_measure_net` (when :attr:`use_thin_measure`)."""
        x = normalise(canonical)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            out = self.measure_net(x, return_features=True)
        out = {k: v.float() for k, v in out.items()}
        if self.use_thin_measure and self.thin_measure_net is not None:
            t = distribution_stats(out["thickness"], self.measure_net.thickness_bins)[1]
            thin = t < float(self.thin_measure["below_nm"])
            if thin.any():
                with torch.autocast(self.device.type, enabled=self.use_amp):
                    o2 = self.thin_measure_net(x[thin])
                for k in ("tilt_x", "tilt_y"):
                    out[k][thin] = o2[k].float()
        return out

    @torch.no_grad()
    def _measure(self, canonical: torch.Tensor):
        """Measurement outputs (:meth:`_network_outputs`, logits at the calibrated temperatures per
        thickness band) of canonical patterns."""
        out = self._network_outputs(canonical)
        if self.band_temperatures is not None:
            # temperatures per predicted-thickness band (model card): logits at the global
            # temperature T rescaled by T / T_band
            edges, f_t, f_a = self.band_temperatures
            t = distribution_stats(out["thickness"], self.measure_net.thickness_bins)[1]
            band = (torch.searchsorted(edges, t.contiguous(), right=True) - 1).clamp(0, len(f_t) - 1)
            out["thickness"] = out["thickness"] * f_t[band][:, None]
            out["tilt_x"] = out["tilt_x"] * f_a[band][:, None]
            out["tilt_y"] = out["tilt_y"] * f_a[band][:, None]
        return out

    @torch.no_grad()
    def predict_batch(self, patterns, background_strength: float = 0.0, mask: tuple | None = None,
                      pixel_size_mrad: float | None = None, return_distributions: bool = False,
                      n_alternatives: int = 3) -> dict:
        """Measure thickness (nm) and tilt (mrad) of raw PACBED patterns (B, H, W).

        Parameters
        ----------
        background_strength : float
            Uniform background to subtract, as a fraction of the mean pattern intensity
            per nm of (estimated) thickness; 0 disables. The level is converged with the
            thickness estimate and returned as ``background_fraction``.
        mask : (inner_mrad, width_mrad), optional
            Band-pass mask for sensitivity analysis: the annulus is set to its mean.
        pixel_size_mrad : float, optional
            Detector pixel size; when given, the disk size is fixed from calibration.
        """
        raw = as_batch(patterns)
        if raw.shape[-1] < 32 or raw.shape[-2] < 32:
            raise BadInputError(f"patterns must be at least 32x32 px, got {tuple(raw.shape[-2:])}")
        if pixel_size_mrad is not None:
            from ..data import check_disk_radius

            check_disk_radius(self.convergence_mrad, pixel_size_mrad, raw.shape, "PACBED measurement")
        B = raw.shape[0]
        raw = raw.to(self.device)  # validity checks run where the data will be used
        finite = torch.isfinite(raw).all(dim=(1, 2))
        raw = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw)).clamp_min(0)
        nonempty = raw.sum(dim=(1, 2)) > 0
        x = raw
        centre, radius, rot, can, out = self.locate(x, pixel_size_mrad=pixel_size_mrad)
        bg = torch.zeros(B, device=self.device)
        masked = (lambda c: c) if mask is None else (
            lambda c: apply_band_mask(c, mask[0] / self.pixel_size_mrad, mask[1] / self.pixel_size_mrad))
        if mask is not None:
            out = self._measure(masked(can))
        tb, ab = self.measure_net.thickness_bins, self.measure_net.tilt_bins
        if background_strength and background_strength > 0:
            mean_int = can.mean(dim=(1, 2))
            for _ in range(6):
                _, t_est, _ = distribution_stats(out["thickness"], tb)
                bg_new = background_strength * t_est
                out = self._measure(masked((can - (bg_new * mean_int)[:, None, None]).clamp_min(0)))
                if torch.allclose(bg_new, bg, atol=1e-3):
                    bg = bg_new
                    break
                bg = bg_new
        pt, t_mean, t_std = distribution_stats(out["thickness"], tb)
        px, tx, tx_std = distribution_stats(out["tilt_x"], ab)
        py, ty, ty_std = distribution_stats(out["tilt_y"], ab)
        # resolution floor: the training labels live on a grid (thickness bins, the library's
        # tilt step), so no answer is sharper than a uniform error over one grid step
        ft, fa = self.resolution_floor
        t_std, tx_std, ty_std = (torch.sqrt(s**2 + f**2) for s, f in ((t_std, ft), (tx_std, fa), (ty_std, fa)))
        # out-of-distribution
        z = out["features"] - self.ood_mu
        dist = ((z @ self.ood_icov) * z).sum(-1).clamp_min(0).sqrt()
        reason = torch.zeros(B, dtype=torch.uint8, device=self.device)
        reason[dist > self.ood_threshold] = 1
        rel = radius / (radius.median() if B > 4 else radius)
        if pixel_size_mrad:
            # calibrated disk size: the aligned radius must match the model's convergence angle
            rel = torch.ones_like(radius)
        reason[(rel < 0.7) | (rel > 1.4)] = 2
        valid = recorded_area(x.shape[-2:], centre, radius, rot, self.disk_radius_px, self.n_px)
        desc = pattern_descriptors(can, self.disk_radius_px, valid)
        if self.pattern_statistics is not None:
            reason[(reason == 0) & implausible(desc, t_mean, self.pattern_statistics)] = 5
        if pixel_size_mrad:
            ratio = self.corrected_radius(self.last_free_radius, t_mean) / radius
            reason[(ratio - 1).abs() > CALIBRATION_TOLERANCE] = 6
        contrast = can.std(dim=(1, 2)) / can.mean(dim=(1, 2)).clamp_min(1e-12)
        reason[(contrast < 0.05) | vacuum_like(desc)] = 3
        reason[(~finite.to(self.device)) | (~nonempty.to(self.device))] = 4
        ood = reason > 0
        res = {
            "thickness_nm": t_mean,
            "thickness_std_nm": t_std,
            "thickness_lo68_nm": _widen(_quantile(pt, tb, 0.16), t_mean, ft, -1.0),
            "thickness_hi68_nm": _widen(_quantile(pt, tb, 0.84), t_mean, ft, 1.0),
            "thickness_lo95_nm": _widen(_quantile(pt, tb, 0.025), t_mean, ft, -1.96),
            "thickness_hi95_nm": _widen(_quantile(pt, tb, 0.975), t_mean, ft, 1.96),
            "tilt_x_mrad": tx, "tilt_y_mrad": ty, "tilt_x_std_mrad": tx_std, "tilt_y_std_mrad": ty_std,
            "tilt_magnitude_mrad": torch.hypot(tx, ty),
            "tilt_azimuth_deg": torch.rad2deg(torch.atan2(ty, tx)) % 360,
            "confidence": _window_mass(pt, tb, t_mean, 1.0),
            "ood": ood, "ood_reason": reason, "ood_distance": dist,
            "center_y_px": centre[:, 0], "center_x_px": centre[:, 1],
            # a calibrated size is reported as given; a measured one with the card's size bias removed
            "disk_radius_px": radius if pixel_size_mrad else self.corrected_radius(radius, t_mean),
            "rotation_deg": rot, "background_fraction": bg,
            "outside_fraction": desc[:, 0], "fourfold": desc[:, 1], "disk_contrast": desc[:, 2],
        }
        res = {k: v.detach().cpu().numpy() for k, v in res.items()}
        res["rotation_std_deg"] = self.rotation_uncertainty(res["thickness_nm"])
        res["confidence"] = np.where(res["ood"], np.minimum(res["confidence"], 0.05), res["confidence"])
        res["alternatives"] = _alternatives(pt, tb, n_alternatives)
        if return_distributions:
            res["p_thickness"] = pt.cpu().numpy()
            res["p_tilt_x"] = px.cpu().numpy()
            res["p_tilt_y"] = py.cpu().numpy()
            res["thickness_bins_nm"] = tb.cpu().numpy()
            res["tilt_bins_mrad"] = ab.cpu().numpy()
            res["canonical"] = can.cpu().numpy()
        return res

    def corrected_radius(self, radius_px: torch.Tensor, thickness_nm: torch.Tensor) -> torch.Tensor:
        """Disk radius (px) with the model card's ``size_bias`` removed: the median relative size
        error of the pipeline at the (predicted) thickness (nm), measured end to end at calibration
        (:func:`~diffkit.models.pacbed_training.size_bias_table`). Unchanged for a card without one."""
        table = self.card.get("size_bias")
        if not table:
            return radius_px
        grid = torch.as_tensor(table["thickness_nm"], dtype=radius_px.dtype, device=radius_px.device)
        bias = torch.as_tensor(table["relative"], dtype=radius_px.dtype, device=radius_px.device)
        if len(grid) < 2:
            return radius_px / (1 + bias[0])
        t = thickness_nm.to(radius_px.dtype).clamp(grid[0], grid[-1]).contiguous()
        j = (torch.searchsorted(grid, t) - 1).clamp(0, len(grid) - 2)
        w = ((t - grid[j]) / (grid[j + 1] - grid[j])).clamp(0, 1)
        return radius_px / (1 + bias[j] * (1 - w) + bias[j + 1] * w)

    def rotation_uncertainty(self, thickness_nm) -> np.ndarray:
        """68 % half-width (deg) of the rotation error at these (predicted) thicknesses (nm), from the
        model card's end-to-end calibration per thickness band; NaN for a card without one.

        The tilt components refer to the crystal axes found by the alignment, so the tilt azimuth
        carries the same uncertainty (thin patterns: tens of degrees).
        """
        t = np.asarray(thickness_nm, dtype=float)
        table = self.card.get("rotation_uncertainty")
        if not table:
            return np.full(t.shape, np.nan)
        edges, q68 = np.asarray(table["edges_nm"]), np.asarray(table["q68_deg"])
        band = np.clip(np.searchsorted(edges, np.nan_to_num(t, nan=0.0), side="right") - 1, 0, len(q68) - 1)
        return q68[band]

    def predict(self, patterns, batch_size: int = 256, **kw):
        """Like :meth:`predict_batch` (in batches) but returns an ``xarray.Dataset`` with units (dim ``pattern``)."""
        import xarray as xr

        x = as_batch(patterns)
        parts = [self.predict_batch(x[s:s + batch_size], **kw) for s in range(0, len(x), batch_size)]
        res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "alternatives"}
        alts = tuple(np.concatenate([p["alternatives"][i] for p in parts]) for i in range(2))
        for k in [k for k in res if k.startswith("p_") or k in ("thickness_bins_nm", "tilt_bins_mrad", "canonical")]:
            res.pop(k)
        ds = xr.Dataset({k: ("pattern", v) for k, v in res.items()})
        for k in ds:
            ds[k].attrs["units"] = _units(k)
        ds["alternative_thickness_nm"] = (("pattern", "rank"), alts[0])
        ds["alternative_probability"] = (("pattern", "rank"), alts[1])
        ds.attrs.update(model=self.card_id, ood_reasons=json.dumps(OOD_REASONS))
        return ds

    def first_layer_activations(self, pattern) -> np.ndarray:
        """Activation maps (C, H/2, W/2) of the measurement network's first conv layer for one pattern."""
        _, _, _, can, _ = self.locate(as_batch(pattern))
        with torch.no_grad():
            return self.measure_net.backbone.first_layer_activations(normalise(can))[0].cpu().numpy()


def _widen(q, centre, floor, z):
    """Move an interval end ``q`` away from ``centre`` so its half-width is at least ``|z| * floor``
    (added in quadrature)."""
    half = (q - centre).abs()
    return centre + float(np.sign(z)) * torch.sqrt(half**2 + (z * floor) ** 2)


def _units(k):
    """Unit of a result variable from its name suffix (``thickness_nm`` -> ``nm``)."""
    if k.endswith("_nm"):
        return "nm"
    if k.endswith("_mrad"):
        return "mrad"
    if k.endswith("_deg"):
        return "degree"
    if k.endswith("_px"):
        return "px"
    if k == "seconds":
        return "s"
    return ""


def _window_mass(p, bins, centre, half):
    w = (bins[None] - centre[:, None]).abs() <= half
    return (p * w).sum(-1)


def _alternatives(p: torch.Tensor, bins: torch.Tensor, n: int):
    """Top-n local maxima of the thickness distribution with their probability mass (+-1 nm)."""
    B, K = p.shape
    h = float(bins[1] - bins[0]) if K > 1 else 1.0
    w = int(round(1.0 / h))
    pad = torch.nn.functional.pad(p[:, None], (1, 1), value=0.0)[:, 0]
    peak = (p >= pad[:, :-2]) & (p >= pad[:, 2:])
    mass = torch.nn.functional.avg_pool1d(p[:, None], 2 * w + 1, stride=1, padding=w, count_include_pad=True)[:, 0] * (2 * w + 1)
    score = torch.where(peak, mass, torch.full_like(mass, -1.0))
    k = min(n, K)
    top, idx = torch.topk(score, k, dim=-1)
    v = bins[idx].cpu().numpy()
    top = top.cpu()
    vals = np.full((B, n), np.nan)
    probs = np.zeros((B, n))
    ok = (top >= 0).numpy()
    vals[:, :k] = np.where(ok, v, np.nan)
    probs[:, :k] = np.where(ok, top.numpy(), 0.0)
    return vals, probs


def load_predictor(calibration: Calibration | None = None, *, material: str | None = None, zone: str | None = None,
                   energy_kv: float | None = None, convergence_mrad: float | None = None, device=None,
                   weights_dir=None) -> PacbedPredictor:
    """Load the shipped PACBED model matching the calibration (or explicit keywords).

    Raises :class:`~diffkit.errors.MissingCalibrationError` when the beam energy, convergence
    angle, material or zone axis is unknown, and :class:`~diffkit.errors.ModelNotFoundError`
    when no shipped model matches.

    Examples
    --------
    >>> p = load_predictor(material="SrTiO3", zone="001", energy_kv=200, convergence_mrad=13.6)  # doctest: +SKIP
    """
    cal = calibration or Calibration()
    cal = cal.replace(**{k: v for k, v in dict(material=material, zone_axis=zone, beam_energy_kv=energy_kv,
                                                  convergence_mrad=convergence_mrad).items() if v is not None})
    cal.require("material", "zone_axis", "beam_energy_kv", "convergence_mrad", purpose="choosing a PACBED model")
    card = find_card(cal.material, cal.zone_axis, cal.beam_energy_kv, cal.convergence_mrad, weights_dir=weights_dir)
    return _load_from_card(card, device)


_CACHE: dict = {}


def _expected_tensors(card: dict, sd: dict) -> dict:
    """``{name: shape}`` the card's architecture needs (bins and thin network as the file gives them)."""
    n = int(card["geometry"]["n_px"])
    exp = {f"align.{k}": tuple(v.shape) for k, v in AlignNet(n_px=n).state_dict().items()}
    f = 0
    for pre in ["measure."] + (["thin_measure."] if any(k.startswith("thin_measure.") for k in sd) else []):
        nb = []
        for b in ("thickness_bins", "tilt_bins"):
            t = sd.get(pre + b)
            nb.append(int(t.shape[0]) if t is not None and t.ndim == 1 and 2 <= t.shape[0] <= 100_000 else 2)
        net = MeasureNet(torch.zeros(nb[0]), torch.zeros(nb[1]), n_px=n)
        exp.update({pre + k: tuple(v.shape) for k, v in net.state_dict().items()})
        f = net.backbone.features
    exp["ood.mu"] = (f,)
    exp["ood.icov"] = (f, f)
    return exp


def _load_from_card(card: dict, device=None) -> PacbedPredictor:
    from ..errors import ModelCardError
    from ..models.registry import check_tensors, read_checked_file, validate_card

    validate_card(card, card.get("card_path", card.get("id", "<card>")), "pacbed")
    key = (card["weights_path"], card["weights_sha256"], str(device))
    if key in _CACHE:
        return _CACHE[key]
    from safetensors import SafetensorError
    from safetensors.torch import load

    cp = card.get("card_path", card["id"])
    raw = read_checked_file(card, card["weights_path"], card["weights_sha256"], "weights")
    # weights + calibration fingerprint: a map store written by another calibration is not resumed
    # (rotation_uncertainty: maps store the rotation_std_deg it gives)
    extra = json.dumps({k: card.get(k) for k in ("calibration_temperatures", "resolution_floor", "ood", "thin_rotation",
                                                 "rotation_uncertainty", "size_bias", "thin_measure")}, sort_keys=True)
    card = dict(card, fingerprint=hashlib.sha256(raw + extra.encode()).hexdigest()[:10])
    try:
        sd = load(raw)  # the bytes just fingerprinted, not a second read
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise ModelCardError(f"model card {cp!r}: its weights could not be read as safetensors "
                             f"({type(exc).__name__})") from None
    check_tensors(sd, _expected_tensors(card, sd), cp)
    g = card["geometry"]
    try:
        align = AlignNet(n_px=g["n_px"])
        align.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("align.")})
        measure = MeasureNet.from_state_dict(sd, "measure.", n_px=g["n_px"])
        thin = None
        if card.get("thin_measure") and any(k.startswith("thin_measure.") for k in sd):
            thin = MeasureNet.from_state_dict(sd, "thin_measure.", n_px=g["n_px"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ModelCardError(f"model card {cp!r}: its weights do not fit the card ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
    # inference only: BatchNorm folded into the convolutions, channels-last layout (oneDNN / cuDNN
    # pick faster kernels; measured ~1.3x on a 2-core CPU, same outputs to 1e-4 nm)
    for net in (align, measure, thin):
        if net is not None:
            net.backbone.fuse_for_inference()
            net.to(memory_format=torch.channels_last)
    pred = PacbedPredictor(align, measure, card, sd["ood.mu"], sd["ood.icov"], device=device, thin_measure_net=thin)
    _CACHE[key] = pred
    return pred


def load_predictor_file(card_path, device=None) -> PacbedPredictor:
    """Load a predictor from a model-card JSON path (weights next to it, same stem).

    Raises :class:`~diffkit.errors.ModelCardError` naming the card when the card, its checksums
    or its tensors are wrong."""
    from ..models.registry import read_card

    return _load_from_card(read_card(card_path, "pacbed"), device)
