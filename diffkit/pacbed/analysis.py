"""Sensitivity analyses of the PACBED CNN (seed 000, Secs. 2.3, 5.1, 5.4; Figs. 4, 5, 6, 8).

* :func:`mask_sensitivity` -- band-pass mask sweep: an annulus of the (aligned) pattern is set
  to its mean intensity and the predictions are compared with the unmasked ones (and the
  truth), overall and per thickness range. Which radii the network relies on shows up as a
  drop of the match rate when they are masked.
* :func:`background_sweep` -- predictions and accuracy versus the uniform background
  subtraction strength, with the converged per-pattern background.
* :func:`dose_series` -- predictions versus electron dose (Poisson resampling), their spread
  over repeats and the dose above which they are stable.

All results are ``xarray.Dataset`` objects with units in the attrs; :mod:`diffkit.pacbed.plots`
draws them. The mask sweep aligns each pattern once and then only re-runs the measurement
network on masked copies of the canonical patterns, so one pattern with one mask takes a few
milliseconds (interactive sliders: :func:`align_for_masking` + :func:`masked_prediction`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import BadInputError
from ..sim.detector import DetectorParams, apply_detector
from .geometry import as_batch
from .networks import distribution_stats
from .predictor import apply_band_mask

THICKNESS_TOLERANCES_NM = (1.0, 2.0, 3.0)
# seed Figs. 3, 5: tilt matches within +-0.25, +-0.5 and +-0.71 mrad
TILT_TOLERANCES_MRAD = (0.25, 0.5, 0.71)
THICKNESS_RANGES_NM = (0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0)


# ---------------------------------------------------------------------------------------------
# input checks
def _patterns(patterns, min_px: int = 32) -> torch.Tensor:
    """Validated float32 stack (B, H, W); clear errors for wrong shapes and non-finite values."""
    if patterns is None:
        raise BadInputError("no patterns given")
    if hasattr(patterns, "dims") and hasattr(patterns, "values"):  # xarray
        patterns = patterns.values
    a = patterns if torch.is_tensor(patterns) else np.asarray(patterns)
    if a.dtype == object:
        raise BadInputError("patterns must be a numeric array (H, W) or (B, H, W)")
    if a.ndim not in (2, 3):
        raise BadInputError(f"expected a pattern (H, W) or a stack (B, H, W), got shape {tuple(a.shape)}")
    x = as_batch(a)
    if x.shape[0] == 0:
        raise BadInputError("empty pattern stack")
    if min(x.shape[-2:]) < min_px:
        raise BadInputError(f"patterns must be at least {min_px}x{min_px} px, got {tuple(x.shape[-2:])}")
    if not torch.isfinite(x).all():
        raise BadInputError("patterns contain NaN or infinite values")
    if (x.sum(dim=(1, 2)) <= 0).any():
        raise BadInputError("patterns must have positive total intensity")
    return x


def _truth(truth, B: int) -> dict | None:
    """``truth``: mapping / Dataset with ``thickness_nm`` and optionally ``tilt_x_mrad``, ``tilt_y_mrad``."""
    if truth is None:
        return None
    out = {}
    for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
        try:
            v = truth[k]
        except (KeyError, IndexError, TypeError):
            if k == "thickness_nm":
                raise BadInputError("truth needs at least 'thickness_nm'") from None
            continue
        a = np.asarray(getattr(v, "values", v), dtype=float).reshape(-1)
        if a.size == 1 and B > 1:
            a = np.full(B, float(a[0]))
        if a.shape != (B,):
            raise BadInputError(f"truth[{k!r}] has {a.size} values for {B} patterns")
        if not np.isfinite(a).all():
            raise BadInputError(f"truth[{k!r}] contains non-finite values")
        out[k] = a
    return out


def conv_footprint_px(predictor) -> int:
    """Input footprint (px) of one unit of the measurement network's first convolution:
    ``(kernel - 1) * dilation + 1`` along each axis. The stride only spaces the units; it does not
    enlarge what one unit sees."""
    conv = predictor.measure_net.backbone.conv[0]
    if isinstance(conv, torch.nn.Sequential):
        conv = next(m for m in conv if isinstance(m, torch.nn.Conv2d))
    k = conv.kernel_size[0]
    d = conv.dilation[0]
    return int((k - 1) * d + 1)


def conv_footprint_mrad(predictor) -> float:
    """Width of the seed's band-pass mask: the first-conv footprint in mrad of the canonical frame
    (seed Sec. 2.3: 11x11 px = 2.2 mrad for AlexNet at 13.6 mrad)."""
    return conv_footprint_px(predictor) * float(predictor.pixel_size_mrad)


# ---------------------------------------------------------------------------------------------
# band-pass mask
@dataclasses.dataclass
class AlignedPatterns:
    """Patterns aligned once for mask analyses: canonical frame, geometry and unmasked predictions."""

    canonical: torch.Tensor  # (B, n, n)
    center_y_px: np.ndarray
    center_x_px: np.ndarray
    disk_radius_px: np.ndarray
    rotation_deg: np.ndarray
    reference: dict  # unmasked predictions, (B,) arrays
    batch_size: int

    def __len__(self):
        return self.canonical.shape[0]


@torch.no_grad()
def _measure_canonical(predictor, can: torch.Tensor, batch_size: int) -> dict:
    """Thickness/tilt statistics of canonical patterns, in batches (as ``predict_batch`` does)."""
    tb, ab = predictor.measure_net.thickness_bins, predictor.measure_net.tilt_bins
    parts = []
    for s in range(0, can.shape[0], batch_size):
        c = can[s:s + batch_size]
        out = predictor._measure(c)
        pt, t, t_std = distribution_stats(out["thickness"], tb)
        _, tx, tx_std = distribution_stats(out["tilt_x"], ab)
        _, ty, ty_std = distribution_stats(out["tilt_y"], ab)
        ft, fa = getattr(predictor, "resolution_floor", (0.0, 0.0))  # as in predict_batch
        t_std, tx_std, ty_std = (torch.sqrt(s**2 + f**2) for s, f in ((t_std, ft), (tx_std, fa), (ty_std, fa)))
        conf = (pt * ((tb[None] - t[:, None]).abs() <= 1.0)).sum(-1)
        z = out["features"] - predictor.ood_mu
        dist = ((z @ predictor.ood_icov) * z).sum(-1).clamp_min(0).sqrt()
        contrast = c.std(dim=(1, 2)) / c.mean(dim=(1, 2)).clamp_min(1e-12)
        reason = torch.zeros(c.shape[0], dtype=torch.uint8, device=c.device)
        reason[dist > predictor.ood_threshold] = 1
        reason[contrast < 0.05] = 3
        parts.append({"thickness_nm": t, "thickness_std_nm": t_std, "tilt_x_mrad": tx, "tilt_y_mrad": ty,
                      "tilt_x_std_mrad": tx_std, "tilt_y_std_mrad": ty_std, "confidence": conf,
                      "ood_distance": dist, "ood_reason": reason})
    res = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    res["ood"] = res["ood_reason"] > 0
    res["confidence"] = np.where(res["ood"], np.minimum(res["confidence"], 0.05), res["confidence"])
    return res


@torch.no_grad()
def align_for_masking(predictor, patterns, pixel_size_mrad: float | None = None, batch_size: int = 256) -> AlignedPatterns:
    """Align raw patterns (B, H, W) once (exactly as ``predict_batch`` does) and measure them unmasked."""
    x = _patterns(patterns)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).clamp_min(0)
    cans, cy, cx, rr, rot = [], [], [], [], []
    for s in range(0, x.shape[0], batch_size):
        c, r, ro, can, _ = predictor.locate(x[s:s + batch_size], pixel_size_mrad=pixel_size_mrad)
        cans.append(can)
        cy.append(c[:, 0].cpu().numpy())
        cx.append(c[:, 1].cpu().numpy())
        rr.append(r.cpu().numpy())
        rot.append(ro.cpu().numpy())
    can = torch.cat(cans)
    ref = _measure_canonical(predictor, can, batch_size)
    return AlignedPatterns(can, np.concatenate(cy), np.concatenate(cx), np.concatenate(rr), np.concatenate(rot), ref,
                           batch_size)


@torch.no_grad()
def masked_prediction(predictor, aligned: AlignedPatterns, inner_mrad: float, width_mrad: float | None = None,
                      index=None) -> dict:
    """Predictions with the annulus ``[inner, inner + width)`` mrad set to its mean (seed Sec. 2.3).

    ``aligned`` comes from :func:`align_for_masking`; ``index`` selects patterns (default all).
    Fast enough for a slider: only the measurement network runs.
    """
    if not isinstance(aligned, AlignedPatterns):
        raise BadInputError("aligned must come from align_for_masking")
    w = conv_footprint_mrad(predictor) if width_mrad is None else float(width_mrad)
    if not (np.isfinite(inner_mrad) and np.isfinite(w)) or inner_mrad < 0 or w < 0:
        raise BadInputError("mask inner radius and width must be finite and >= 0")
    can = aligned.canonical if index is None else aligned.canonical[np.atleast_1d(index)]
    ps = float(predictor.pixel_size_mrad)
    masked = apply_band_mask(can, inner_mrad / ps, w / ps)
    return _measure_canonical(predictor, masked, aligned.batch_size)


def _match(a, b, tol):
    return np.abs(a - b) <= tol + 1e-9


@torch.no_grad()
def mask_sensitivity(predictor, patterns, truth=None, inner_mrad=None, width_mrad: float | None = None,
                     step_mrad: float | None = None, pixel_size_mrad: float | None = None, batch_size: int = 256,
                     thickness_tolerances_nm=THICKNESS_TOLERANCES_NM, tilt_tolerances_mrad=TILT_TOLERANCES_MRAD,
                     thickness_ranges_nm=THICKNESS_RANGES_NM):
    """Band-pass mask sweep (seed Figs. 5, 6).

    Parameters
    ----------
    predictor : PacbedPredictor
    patterns : array (B, H, W) raw patterns, or :class:`AlignedPatterns`
    truth : mapping, optional
        ``thickness_nm`` (and ``tilt_x_mrad``, ``tilt_y_mrad``) per pattern; adds match rates
        against the truth.
    inner_mrad : sequence, optional
        Inner radii of the annulus (mrad). Default: from 0 in steps of ``step_mrad`` while the
        annulus still meets the network's circular field of view.
    width_mrad : float, optional
        Annulus width; default the first-conv footprint (:func:`conv_footprint_mrad`).
    step_mrad : float, optional
        Default sweep step: half the width.
    thickness_tolerances_nm, tilt_tolerances_mrad : sequences
        Match tolerances (tilt: per component, x and y pooled, as in the held-out evaluation).
    thickness_ranges_nm : sequence
        Edges of the thickness ranges (by the true thickness when given, else the unmasked
        prediction).

    Returns
    -------
    xarray.Dataset with dims ``mask_inner_mrad``, ``pattern``, ``thickness_tolerance_nm``,
    ``tilt_tolerance_mrad``, ``thickness_range``: per pattern and mask ``thickness_nm``,
    ``tilt_x_mrad``, ``tilt_y_mrad``, ``confidence``, ``ood``; the unmasked reference
    (``*_unmasked``); summaries ``thickness_match`` / ``tilt_match`` (fraction matching the
    unmasked prediction), ``*_match_truth``, ``*_match_by_range``, ``thickness_shift_nm`` (mean
    signed change), ``thickness_abs_shift_nm``, ``tilt_abs_shift_mrad``, ``confidence_mean``,
    ``ood_fraction``.
    """
    import xarray as xr

    ps = float(predictor.pixel_size_mrad)
    width = conv_footprint_mrad(predictor) if width_mrad is None else float(width_mrad)
    if not np.isfinite(width) or width <= 0:
        raise BadInputError("width_mrad must be positive")
    aligned = patterns if isinstance(patterns, AlignedPatterns) else align_for_masking(
        predictor, patterns, pixel_size_mrad=pixel_size_mrad, batch_size=batch_size)
    B = len(aligned)
    tr = _truth(truth, B)
    field_mrad = predictor.n_px / 2 * ps
    if inner_mrad is None:
        step = width / 2 if step_mrad is None else float(step_mrad)
        if not step > 0:
            raise BadInputError("step_mrad must be positive")
        inner = np.arange(0.0, field_mrad, step)
    else:
        inner = np.atleast_1d(np.asarray(inner_mrad, dtype=float))
        if inner.ndim != 1 or len(inner) == 0 or not np.isfinite(inner).all() or (inner < 0).any():
            raise BadInputError("inner_mrad must be a non-empty 1-d sequence of finite values >= 0")
    keys = ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad", "confidence", "thickness_std_nm", "ood")
    res = {k: np.empty((len(inner), B), dtype=bool if k == "ood" else float) for k in keys}
    for i, r0 in enumerate(inner):
        m = _measure_canonical(predictor, apply_band_mask(aligned.canonical, r0 / ps, width / ps), aligned.batch_size)
        for k in keys:
            res[k][i] = m[k]
    ref = aligned.reference
    ttol = np.asarray(thickness_tolerances_nm, float)
    atol = np.asarray(tilt_tolerances_mrad, float)
    edges = np.asarray(thickness_ranges_nm, float)
    labels = [f"{lo:g}-{hi:g} nm" for lo, hi in zip(edges[:-1], edges[1:])]
    t_ref = tr["thickness_nm"] if tr is not None else ref["thickness_nm"]
    rng_idx = np.clip(np.searchsorted(edges, t_ref, side="right") - 1, 0, len(labels) - 1)
    in_range = (t_ref >= edges[0]) & (t_ref <= edges[-1])

    def rates(pred_t, pred_x, pred_y, ref_t, ref_x, ref_y):
        tm = np.stack([_match(pred_t, ref_t[None], t).mean(1) for t in ttol], 1)
        am = np.stack([np.concatenate([_match(pred_x, ref_x[None], a), _match(pred_y, ref_y[None], a)], 1).mean(1)
                       for a in atol], 1)
        tb = np.full((len(inner), len(labels), len(ttol)), np.nan)
        ab = np.full((len(inner), len(labels), len(atol)), np.nan)
        for j in range(len(labels)):
            sel = (rng_idx == j) & in_range
            if sel.any():
                tb[:, j] = np.stack([_match(pred_t[:, sel], ref_t[None, sel], t).mean(1) for t in ttol], 1)
                ab[:, j] = np.stack([np.concatenate([_match(pred_x[:, sel], ref_x[None, sel], a),
                                                     _match(pred_y[:, sel], ref_y[None, sel], a)], 1).mean(1)
                                     for a in atol], 1)
        return tm, am, tb, ab

    tm, am, tb, ab = rates(res["thickness_nm"], res["tilt_x_mrad"], res["tilt_y_mrad"],
                           ref["thickness_nm"], ref["tilt_x_mrad"], ref["tilt_y_mrad"])
    dims_p = ("mask_inner_mrad", "pattern")
    ds = xr.Dataset(
        {
            "thickness_nm": (dims_p, res["thickness_nm"], {"units": "nm"}),
            "thickness_std_nm": (dims_p, res["thickness_std_nm"], {"units": "nm"}),
            "tilt_x_mrad": (dims_p, res["tilt_x_mrad"], {"units": "mrad"}),
            "tilt_y_mrad": (dims_p, res["tilt_y_mrad"], {"units": "mrad"}),
            "confidence": (dims_p, res["confidence"], {"units": ""}),
            "ood": (dims_p, res["ood"], {"units": ""}),
            "thickness_nm_unmasked": ("pattern", ref["thickness_nm"], {"units": "nm"}),
            "tilt_x_mrad_unmasked": ("pattern", ref["tilt_x_mrad"], {"units": "mrad"}),
            "tilt_y_mrad_unmasked": ("pattern", ref["tilt_y_mrad"], {"units": "mrad"}),
            "confidence_unmasked": ("pattern", ref["confidence"], {"units": ""}),
            "thickness_match": (("mask_inner_mrad", "thickness_tolerance_nm"), tm,
                                {"units": "", "long_name": "fraction of thickness predictions within tolerance of the unmasked ones"}),
            "tilt_match": (("mask_inner_mrad", "tilt_tolerance_mrad"), am,
                           {"units": "", "long_name": "fraction of tilt components within tolerance of the unmasked ones"}),
            "thickness_match_by_range": (("mask_inner_mrad", "thickness_range", "thickness_tolerance_nm"), tb, {"units": ""}),
            "tilt_match_by_range": (("mask_inner_mrad", "thickness_range", "tilt_tolerance_mrad"), ab, {"units": ""}),
            "n_by_range": ("thickness_range", np.array([int(((rng_idx == j) & in_range).sum()) for j in range(len(labels))])),
            "thickness_shift_nm": ("mask_inner_mrad", (res["thickness_nm"] - ref["thickness_nm"][None]).mean(1),
                                   {"units": "nm", "long_name": "mean change of the thickness prediction"}),
            "thickness_abs_shift_nm": ("mask_inner_mrad", np.abs(res["thickness_nm"] - ref["thickness_nm"][None]).mean(1),
                                       {"units": "nm"}),
            "tilt_abs_shift_mrad": ("mask_inner_mrad", 0.5 * (np.abs(res["tilt_x_mrad"] - ref["tilt_x_mrad"][None]).mean(1)
                                                             + np.abs(res["tilt_y_mrad"] - ref["tilt_y_mrad"][None]).mean(1)),
                                    {"units": "mrad"}),
            "confidence_mean": ("mask_inner_mrad", res["confidence"].mean(1), {"units": ""}),
            "ood_fraction": ("mask_inner_mrad", res["ood"].mean(1), {"units": ""}),
        },
        coords={
            "mask_inner_mrad": ("mask_inner_mrad", inner, {"units": "mrad"}),
            "mask_outer_mrad": ("mask_inner_mrad", inner + width, {"units": "mrad"}),
            "pattern": np.arange(B),
            "thickness_tolerance_nm": ("thickness_tolerance_nm", ttol, {"units": "nm"}),
            "tilt_tolerance_mrad": ("tilt_tolerance_mrad", atol, {"units": "mrad"}),
            "thickness_range": labels,
        },
    )
    if tr is not None:
        ds["thickness_nm_truth"] = ("pattern", tr["thickness_nm"], {"units": "nm"})
        tx = tr.get("tilt_x_mrad")
        ty = tr.get("tilt_y_mrad")
        have_tilt = tx is not None and ty is not None
        if have_tilt:
            ds["tilt_x_mrad_truth"] = ("pattern", tx, {"units": "mrad"})
            ds["tilt_y_mrad_truth"] = ("pattern", ty, {"units": "mrad"})
        nanv = np.full(B, np.nan)
        tmt, amt, tbt, abt = rates(res["thickness_nm"], res["tilt_x_mrad"], res["tilt_y_mrad"], tr["thickness_nm"],
                                   tx if have_tilt else nanv, ty if have_tilt else nanv)
        ds["thickness_match_truth"] = (("mask_inner_mrad", "thickness_tolerance_nm"), tmt, {"units": ""})
        ds["thickness_match_truth_by_range"] = (("mask_inner_mrad", "thickness_range", "thickness_tolerance_nm"), tbt, {"units": ""})
        if have_tilt:
            ds["tilt_match_truth"] = (("mask_inner_mrad", "tilt_tolerance_mrad"), amt, {"units": ""})
            ds["tilt_match_truth_by_range"] = (("mask_inner_mrad", "thickness_range", "tilt_tolerance_mrad"), abt, {"units": ""})
        # the unmasked reference against the truth, for context
        ds["thickness_match_truth_unmasked"] = ("thickness_tolerance_nm",
                                                np.array([_match(ref["thickness_nm"], tr["thickness_nm"], t).mean() for t in ttol]),
                                                {"units": ""})
    ds.attrs.update(
        analysis="band-pass mask sensitivity (seed 000, Sec. 2.3, Figs. 5-6)",
        width_mrad=width, conv_footprint_px=conv_footprint_px(predictor), pixel_size_mrad=ps,
        field_radius_mrad=field_mrad, convergence_mrad=float(predictor.convergence_mrad), model=predictor.card_id,
        mask="pixels with inner <= r < inner + width (canonical frame) set to their mean",
        tilt_match="per component, x and y pooled",
    )
    return ds


# ---------------------------------------------------------------------------------------------
# background
def background_sweep(predictor, patterns, strengths, truth=None, pixel_size_mrad: float | None = None,
                     batch_size: int = 256, thickness_tolerances_nm=THICKNESS_TOLERANCES_NM):
    """Predictions versus uniform background subtraction strength (seed Fig. 4).

    Each strength ``s`` (fraction of the mean pattern intensity per nm) is passed to
    ``predict_batch(background_strength=s)``, which subtracts ``s * thickness`` (times the mean
    intensity) and converges it with the thickness estimate.

    Returns
    -------
    xarray.Dataset with dims ``background_strength`` (units 1/nm), ``pattern``: ``thickness_nm``,
    ``tilt_x_mrad``, ``tilt_y_mrad``, ``confidence``, ``background_fraction`` (the converged
    subtracted level, fraction of the mean intensity), ``background_residual`` (``background_fraction
    - s * thickness_nm``: 0 at the fixed point), ``thickness_change_nm`` (vs the smallest strength);
    summaries ``background_fraction_mean``, ``thickness_mean_nm`` and, with truth,
    ``thickness_match_truth`` (strength, tolerance), ``thickness_mae_nm`` and attr
    ``best_strength`` (highest match within the middle tolerance).
    """
    import xarray as xr

    x = _patterns(patterns)
    B = x.shape[0]
    s = np.atleast_1d(np.asarray(strengths, dtype=float))
    if s.ndim != 1 or len(s) == 0 or not np.isfinite(s).all() or (s < 0).any():
        raise BadInputError("strengths must be a non-empty 1-d sequence of finite values >= 0")
    tr = _truth(truth, B)
    keys = ("thickness_nm", "thickness_std_nm", "tilt_x_mrad", "tilt_y_mrad", "confidence", "background_fraction", "ood")
    res = {k: np.empty((len(s), B), dtype=bool if k == "ood" else float) for k in keys}
    for i, v in enumerate(s):
        for b0 in range(0, B, batch_size):
            r = predictor.predict_batch(x[b0:b0 + batch_size], background_strength=float(v), pixel_size_mrad=pixel_size_mrad)
            for k in keys:
                res[k][i, b0:b0 + batch_size] = r[k]
    dims = ("background_strength", "pattern")
    ds = xr.Dataset(
        {
            "thickness_nm": (dims, res["thickness_nm"], {"units": "nm"}),
            "thickness_std_nm": (dims, res["thickness_std_nm"], {"units": "nm"}),
            "tilt_x_mrad": (dims, res["tilt_x_mrad"], {"units": "mrad"}),
            "tilt_y_mrad": (dims, res["tilt_y_mrad"], {"units": "mrad"}),
            "confidence": (dims, res["confidence"], {"units": ""}),
            "ood": (dims, res["ood"], {"units": ""}),
            "background_fraction": (dims, res["background_fraction"],
                                    {"units": "", "long_name": "converged subtracted background, fraction of the mean intensity"}),
            "background_residual": (dims, res["background_fraction"] - s[:, None] * res["thickness_nm"],
                                    {"units": "", "long_name": "background_fraction - strength * thickness (0 when converged)"}),
            "thickness_change_nm": (dims, res["thickness_nm"] - res["thickness_nm"][int(np.argmin(s))][None], {"units": "nm"}),
            "background_fraction_mean": ("background_strength", res["background_fraction"].mean(1), {"units": ""}),
            "thickness_mean_nm": ("background_strength", res["thickness_nm"].mean(1), {"units": "nm"}),
        },
        coords={"background_strength": ("background_strength", s, {"units": "1/nm",
                                                                     "long_name": "background per nm of thickness, fraction of the mean intensity"}),
                "pattern": np.arange(B)},
    )
    ttol = np.asarray(thickness_tolerances_nm, float)
    if tr is not None:
        ds = ds.assign_coords(thickness_tolerance_nm=("thickness_tolerance_nm", ttol, {"units": "nm"}))
        ds["thickness_nm_truth"] = ("pattern", tr["thickness_nm"], {"units": "nm"})
        m = np.stack([_match(res["thickness_nm"], tr["thickness_nm"][None], t).mean(1) for t in ttol], 1)
        ds["thickness_match_truth"] = (("background_strength", "thickness_tolerance_nm"), m, {"units": ""})
        ds["thickness_mae_nm"] = ("background_strength", np.abs(res["thickness_nm"] - tr["thickness_nm"][None]).mean(1), {"units": "nm"})
        mid = m[:, len(ttol) // 2]
        ds.attrs["best_strength"] = float(s[int(np.argmax(mid))])
    ds.attrs.update(analysis="uniform background subtraction sweep (seed 000, Sec. 5.1, Fig. 4)", model=predictor.card_id,
                    background_units="fraction of the mean pattern intensity per nm of thickness")
    return ds


# ---------------------------------------------------------------------------------------------
# dose
def _library_like(patterns):
    """Patterns and truth from numpy or an xarray DataArray/Dataset with library coordinates."""
    truth = None
    if hasattr(patterns, "data_vars") and "pattern" in patterns.data_vars:
        patterns = patterns["pattern"]
    if hasattr(patterns, "dims") and hasattr(patterns, "coords"):
        da = patterns
        extra = [d for d in da.dims if d not in ("ky", "kx")]
        if len(extra) > 1:
            da = da.stack(_p=extra)
            da = da.transpose("_p", ...)
        elif len(extra) == 0:
            da = da.expand_dims("_p")
        B = da.shape[0]
        t = {}
        for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
            if k in da.coords:
                v = np.asarray(da[k].values, dtype=float).reshape(-1)
                t[k] = v if v.size == B else np.full(B, float(v[0]))
        truth = t if "thickness_nm" in t else None
        patterns = np.asarray(da.values)
        if patterns.ndim == 3 and extra and da.dims[-1] != "kx":
            raise BadInputError("library patterns need their pattern axes last (ky, kx)")
    return patterns, truth


def dose_series(predictor, patterns, doses=np.logspace(6, 9, 13), n_repeats: int = 16, seed: int = 0, truth=None,
                tolerance_nm: float = 0.5, tolerance_mrad: float = 0.1, detector: DetectorParams | None = None,
                out_px: int | None = None, pixel_ratio: float = 1.0, pixel_size_mrad: float | None = None,
                batch_size: int = 256):
    """Thickness/tilt predictions versus electron dose (seed Sec. 5.4, Fig. 8).

    Every pattern is used as the probability map of where ``dose`` electrons land
    (:func:`~diffkit.sim.detector.apply_detector`, Poisson noise) ``n_repeats`` times per dose
    with a seeded generator, and predicted. The noiseless pattern gives the reference.

    Parameters
    ----------
    patterns : array (H, W) / (B, H, W), or library patterns as xarray (e.g. ``lib.pattern.isel(...)``)
        Noiseless intensities. With library coordinates the truth comes along.
    doses : sequence
        Electrons per pattern.
    n_repeats : int
        Poisson draws per dose (>= 2).
    tolerance_nm, tolerance_mrad : float
        Stability tolerances on the standard deviation over repeats.
    detector : DetectorParams, optional
        Other detector effects (one per pattern); its dose is replaced. Default: none.
    out_px, pixel_ratio : detector size and pixel size ratio, as for ``apply_detector``.

    Returns
    -------
    xarray.Dataset with dims ``dose`` (e-/pattern), ``repeat``, ``pattern``: ``thickness_nm``,
    ``tilt_x_mrad``, ``tilt_y_mrad``, ``confidence``; per dose and pattern ``thickness_mean_nm``,
    ``thickness_spread_nm`` (std over repeats), ``tilt_x_spread_mrad``, ``tilt_y_spread_mrad``,
    ``thickness_bias_nm`` (mean - noiseless); per pattern ``thickness_noiseless_nm``, ...,
    ``dose_threshold_thickness`` and ``dose_threshold_tilt``: the smallest dose from which on
    (all higher doses included) the spread stays within the tolerance, NaN if never; overall
    thresholds (all patterns stable) in the attrs ``dose_threshold_thickness`` / ``_tilt``.
    """
    import xarray as xr

    pats, lib_truth = _library_like(patterns)
    x = _patterns(pats, min_px=8)
    B, H, W = x.shape
    d = np.atleast_1d(np.asarray(doses, dtype=float))
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all() or (d <= 0).any():
        raise BadInputError("doses must be a non-empty 1-d sequence of finite positive values")
    d = np.sort(d)
    if int(n_repeats) < 2:
        raise BadInputError("n_repeats must be >= 2 (the spread needs repeats)")
    if not (tolerance_nm > 0 and tolerance_mrad > 0):
        raise BadInputError("tolerances must be positive")
    R = int(n_repeats)
    tr = _truth(truth, B) if truth is not None else lib_truth
    base = detector if detector is not None else DetectorParams.identity(B)
    if len(base) != B:
        raise BadInputError(f"detector params for {len(base)} patterns, got {B} patterns")
    gen = torch.Generator().manual_seed(int(seed))

    def run(raw):
        outs = []
        for s in range(0, raw.shape[0], batch_size):
            outs.append(predictor.predict_batch(raw[s:s + batch_size], pixel_size_mrad=pixel_size_mrad))
        return {k: np.concatenate([o[k] for o in outs]) for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad", "confidence")}

    ref = run(apply_detector(x, base, out_px=out_px, pixel_ratio=pixel_ratio, generator=gen))
    keys = ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad", "confidence")
    res = {k: np.empty((len(d), R, B)) for k in keys}
    idx = np.tile(np.arange(B), R)
    xr_in = x[idx]
    for i, dose in enumerate(d):
        p = base.subset(idx)
        p.dose = np.full(B * R, dose)
        noisy = apply_detector(xr_in, p, out_px=out_px, pixel_ratio=pixel_ratio, generator=gen)
        o = run(noisy)
        for k in keys:
            res[k][i] = o[k].reshape(R, B)
    spread_t = res["thickness_nm"].std(1, ddof=1)
    spread_x = res["tilt_x_mrad"].std(1, ddof=1)
    spread_y = res["tilt_y_mrad"].std(1, ddof=1)

    def threshold(stable):  # stable (D, ...) bool -> smallest dose from which on all stable
        ok = np.flip(np.logical_and.accumulate(np.flip(stable, 0), 0), 0)
        first = np.argmax(ok, 0)
        return np.where(ok.any(0), d[first], np.nan)

    st_t = spread_t <= tolerance_nm
    st_a = (spread_x <= tolerance_mrad) & (spread_y <= tolerance_mrad)
    dims3 = ("dose", "repeat", "pattern")
    dims2 = ("dose", "pattern")
    ds = xr.Dataset(
        {
            "thickness_nm": (dims3, res["thickness_nm"], {"units": "nm"}),
            "tilt_x_mrad": (dims3, res["tilt_x_mrad"], {"units": "mrad"}),
            "tilt_y_mrad": (dims3, res["tilt_y_mrad"], {"units": "mrad"}),
            "confidence": (dims3, res["confidence"], {"units": ""}),
            "thickness_mean_nm": (dims2, res["thickness_nm"].mean(1), {"units": "nm"}),
            "thickness_spread_nm": (dims2, spread_t, {"units": "nm", "long_name": "std over repeats"}),
            "tilt_x_mean_mrad": (dims2, res["tilt_x_mrad"].mean(1), {"units": "mrad"}),
            "tilt_y_mean_mrad": (dims2, res["tilt_y_mrad"].mean(1), {"units": "mrad"}),
            "tilt_x_spread_mrad": (dims2, spread_x, {"units": "mrad"}),
            "tilt_y_spread_mrad": (dims2, spread_y, {"units": "mrad"}),
            "thickness_bias_nm": (dims2, res["thickness_nm"].mean(1) - ref["thickness_nm"][None], {"units": "nm"}),
            "thickness_noiseless_nm": ("pattern", ref["thickness_nm"], {"units": "nm"}),
            "tilt_x_noiseless_mrad": ("pattern", ref["tilt_x_mrad"], {"units": "mrad"}),
            "tilt_y_noiseless_mrad": ("pattern", ref["tilt_y_mrad"], {"units": "mrad"}),
            "dose_threshold_thickness": ("pattern", threshold(st_t), {"units": "e-/pattern"}),
            "dose_threshold_tilt": ("pattern", threshold(st_a), {"units": "e-/pattern"}),
            "thickness_spread_max_nm": ("dose", spread_t.max(1), {"units": "nm"}),
            "tilt_spread_max_mrad": ("dose", np.maximum(spread_x, spread_y).max(1), {"units": "mrad"}),
        },
        coords={"dose": ("dose", d, {"units": "e-/pattern"}), "repeat": np.arange(R), "pattern": np.arange(B)},
    )
    if tr is not None:
        for k, v in tr.items():
            ds[f"{k}_truth"] = ("pattern", v, {"units": "nm" if k.endswith("_nm") else "mrad"})
        ds["thickness_error_nm"] = (dims2, np.abs(res["thickness_nm"] - tr["thickness_nm"][None, None]).mean(1), {"units": "nm"})
    ds.attrs.update(
        analysis="dose series (seed 000, Sec. 5.4, Fig. 8)", model=predictor.card_id, seed=int(seed),
        n_repeats=R, tolerance_nm=float(tolerance_nm), tolerance_mrad=float(tolerance_mrad),
        dose_threshold_thickness=float(threshold(st_t.all(1))),
        dose_threshold_tilt=float(threshold(st_a.all(1))),
        threshold_definition="smallest dose from which on (all higher doses too) the std over repeats is within the tolerance",
    )
    return ds


__all__ = ["AlignedPatterns", "align_for_masking", "background_sweep", "conv_footprint_mrad", "conv_footprint_px",
           "dose_series", "mask_sensitivity", "masked_prediction"]
