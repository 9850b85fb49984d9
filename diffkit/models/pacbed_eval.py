"""Held-out evaluation of a PACBED predictor: accuracy, calibration and alignment.

The test set uses only the library's held-out thicknesses (half-nm values that training
never saw) and draws every detector effect with its own seed. Patterns are placed on
a raw detector frame (different size and pixel size, shifted, scaled and rotated), so the
full pipeline, alignment included, is what gets measured.
"""
from __future__ import annotations

import numpy as np

from ..sim.detector import DetectorRanges, apply_detector, random_params, similarity_part
from ..pacbed.geometry import wrap_rotation_deg
from .pacbed_training import LibrarySampler

TEST_RANGES = DetectorRanges(log10_dose=(6.0, 9.0), noiseless_fraction=0.0, background=(0.0, 0.3),
                             blur_px=(0.0, 1.5), scale=(0.92, 1.08), rotation_deg=(-44.0, 44.0),
                             shift_px=8.0, affine=0.01)


def make_test_set(lib, n: int = 2000, seed: int = 424242, out_px: int = 128, pixel_ratio: float = 0.7,
                  ranges: DetectorRanges = TEST_RANGES, held_out: bool = True, continuous: bool = False):
    """Raw detector patterns with ground truth (dict of numpy arrays).

    ``continuous``: thicknesses drawn uniformly between the held-out (half-nm) library thicknesses,
    patterns linearly interpolated between the two neighbouring held-out ones (never a training
    pattern), instead of the library thicknesses themselves; tilts stay on the library grid.
    """
    if int(n) < 1:
        from ..errors import BadInputError

        raise BadInputError(f"a test set needs at least one pattern, got n={n}")
    th = np.asarray(lib["thickness_nm"].values)
    test_t = th[np.abs(th - np.round(th)) > 0.25] if held_out else th
    sampler = LibrarySampler(lib, test_t)
    rng = np.random.default_rng(seed)
    pats, t, tx, ty = sampler.draw(n, rng, interpolate=continuous)
    return render_test_set(pats, t, tx, ty, rng, seed, float(lib.attrs["disk_radius_px"]),
                           float(lib.attrs["pixel_size_mrad"]), out_px, pixel_ratio, ranges)


def render_test_set(pats, t, tx, ty, rng, seed: int, disk_radius_px: float, pixel_size_mrad: float,
                    out_px: int = 128, pixel_ratio: float = 0.7, ranges: DetectorRanges = TEST_RANGES) -> dict:
    """Put library-grid patterns (n, H, W) on raw detector frames with drawn effects; the test-set dict.

    ``disk_radius_px`` and ``pixel_size_mrad`` describe the input grid; ``pixel_ratio`` is the
    detector pixel over the input pixel. Truths: thickness (nm), signed tilts (mrad), dose, centre
    (px), disk radius (px), rotation (deg) and the detector pixel size (mrad).
    """
    import torch

    n = len(pats)
    gen = torch.Generator().manual_seed(int(seed))
    p = random_params(n, rng, ranges)
    x = apply_detector(pats, p, out_px=out_px, pixel_ratio=pixel_ratio, generator=gen).numpy()
    c = (out_px - 1) / 2
    k, phi = similarity_part(p.affine)
    return {
        "patterns": x, "thickness_nm": np.asarray(t, np.float32), "tilt_x_mrad": np.asarray(tx, np.float32),
        "tilt_y_mrad": np.asarray(ty, np.float32), "dose": p.dose,
        "center_y_px": c + p.shift_px[:, 0], "center_x_px": c + p.shift_px[:, 1],
        # the residual affine distortion has a scale and a rotation part of its own (up to ~1 % and
        # ~0.6 deg at affine=0.01): the truth is the overall best-fit similarity transform
        "disk_radius_px": disk_radius_px * p.scale * k / pixel_ratio,
        "rotation_deg": wrap_rotation_deg(-p.rotation_deg + phi),
        "pixel_size_mrad": pixel_size_mrad * pixel_ratio,
    }


def rotate90(tx, ty, k):
    """Express a tilt (tx, ty) given in a frame rotated by k*90 degrees in the reference frame."""
    a = np.deg2rad(90.0 * np.asarray(k))
    c, s = np.round(np.cos(a)), np.round(np.sin(a))
    return c * tx - s * ty, s * tx + c * ty


def evaluate(predictor, test: dict, batch: int = 256, distributions: bool = False) -> dict:
    """Accuracy table of ``predictor`` on a test set from :func:`make_test_set`: ``(report, predictions)``.
    With ``distributions`` the predictions include ``p_thickness``, ``p_tilt_x``, ``p_tilt_y`` (B, K) and
    their bin centres (for :func:`coverage_curves`)."""
    outs, bins = [], {}
    for s in range(0, len(test["patterns"]), batch):
        r = predictor.predict_batch(test["patterns"][s:s + batch], return_distributions=distributions)
        r.pop("alternatives")
        r.pop("canonical", None)
        for k in ("thickness_bins_nm", "tilt_bins_mrad"):
            if k in r:
                bins[k] = r.pop(k)
        outs.append(r)
    pred = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    pred.update(bins)
    pred["resolution_floor"] = getattr(predictor, "resolution_floor", (0.0, 0.0))
    t, tx, ty = test["thickness_nm"], test["tilt_x_mrad"], test["tilt_y_mrad"]
    dt = np.abs(pred["thickness_nm"] - t)
    # tilt is compared in the detector frame: the crystal's [100] and [010] are equivalent
    # (4mm), so a pattern aligned 90 degrees away reports the same physical tilt with
    # relabelled axes
    k = np.round((pred["rotation_deg"] - test["rotation_deg"]) / 90.0)
    ptx, pty = rotate90(pred["tilt_x_mrad"], pred["tilt_y_mrad"], k)
    dtx = np.abs(ptx - tx)
    dty = np.abs(pty - ty)
    dtilt = np.concatenate([dtx, dty])
    dc = np.hypot(pred["center_y_px"] - test["center_y_px"], pred["center_x_px"] - test["center_x_px"])
    ds = np.abs(pred["disk_radius_px"] / test["disk_radius_px"] - 1)
    dr = np.abs(wrap_rotation_deg(pred["rotation_deg"] - test["rotation_deg"]))

    def frac(a, tol):
        return float(np.mean(a <= tol))

    cov_t68 = float(np.mean((t >= pred["thickness_lo68_nm"]) & (t <= pred["thickness_hi68_nm"])))
    cov_t95 = float(np.mean((t >= pred["thickness_lo95_nm"]) & (t <= pred["thickness_hi95_nm"])))
    zt = dt / np.maximum(pred["thickness_std_nm"], 1e-3)
    ztilt = np.concatenate([dtx / np.maximum(pred["tilt_x_std_mrad"], 1e-3), dty / np.maximum(pred["tilt_y_std_mrad"], 1e-3)])
    rep = {
        "n": int(len(t)),
        "thickness_within_1nm": frac(dt, 1.0), "thickness_within_2nm": frac(dt, 2.0),
        "thickness_mae_nm": float(dt.mean()),
        "tilt_within_0.25mrad": frac(dtilt, 0.25), "tilt_within_0.5mrad": frac(dtilt, 0.5),
        "tilt_mae_mrad": float(dtilt.mean()),
        "center_within_1px": frac(dc, 1.0), "size_within_1pct": frac(ds, 0.01), "rotation_within_1deg": frac(dr, 1.0),
        "thickness_coverage_68": cov_t68, "thickness_coverage_95": cov_t95,
        "thickness_z_within_1sigma": frac(zt, 1.0), "thickness_z_within_2sigma": frac(zt, 2.0),
        "tilt_z_within_1sigma": frac(ztilt, 1.0), "tilt_z_within_2sigma": frac(ztilt, 2.0),
        "ood_flag_rate": float(np.mean(pred["ood"])),
        # the predicted rotation uncertainty (68 % half-width per thickness band) against the errors
        "rotation_coverage_68": frac(dr - pred["rotation_std_deg"], 0.0) if np.isfinite(pred["rotation_std_deg"]).all() else None,
        "by_thickness": {}, "by_dose": {},
    }
    edges = [0, 10, 20, 40, 60, 80, 100, 121]
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (t >= lo) & (t < hi)
        if m.sum():
            rep["by_thickness"][f"{lo}-{hi} nm"] = {
                "n": int(m.sum()), "within_1nm": frac(dt[m], 1.0), "within_2nm": frac(dt[m], 2.0),
                "tilt_within_0.25mrad": frac(np.concatenate([dtx[m], dty[m]]), 0.25),
                "size_within_1pct": frac(ds[m], 0.01), "rotation_within_1deg": frac(dr[m], 1.0),
                "rotation_std_deg_median": float(np.median(pred["rotation_std_deg"][m]))}
    ld = np.log10(test["dose"])
    for lo, hi in ((6, 7), (7, 8), (8, 9.01)):
        m = (ld >= lo) & (ld < hi)
        if m.sum():
            rep["by_dose"][f"1e{lo}-1e{int(hi)} e-"] = {
                "n": int(m.sum()), "within_1nm": frac(dt[m], 1.0), "within_2nm": frac(dt[m], 2.0),
                "tilt_within_0.25mrad": frac(np.concatenate([dtx[m], dty[m]]), 0.25)}
    return rep, pred


#: nominal central-interval levels of the calibration curves
COVERAGE_LEVELS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2)) + (0.99,)


def interval_coverage(p, bins, truth, levels=COVERAGE_LEVELS, floor: float = 0.0) -> np.ndarray:
    """Observed fraction of ``truth`` inside the central ``level`` interval of each binned distribution.

    ``p`` (B, K) probabilities over bin centres ``bins`` (K,), ``truth`` (B,). Intervals are the
    predictor's: quantiles of the binned distribution, each end moved out to at least ``z * floor``
    from the mean in quadrature (z the normal quantile of the level), as for the reported 68 % / 95 %
    intervals. Returns (len(levels),) fractions; a calibrated predictor gives ``levels`` back.

    >>> bins = np.linspace(-5, 5, 201)
    >>> rng = np.random.default_rng(0)
    >>> p = np.tile(np.exp(-bins**2 / 2), (4000, 1)); p /= p.sum(1, keepdims=True)
    >>> cov = interval_coverage(p, bins, rng.normal(size=4000), levels=(0.5, 0.9))
    >>> bool(np.all(np.abs(cov - [0.5, 0.9]) < 0.03))
    True
    """
    import torch
    from scipy.stats import norm

    from ..pacbed.predictor import _quantile, _widen

    pt = torch.as_tensor(np.asarray(p, dtype=np.float64))
    bt = torch.as_tensor(np.asarray(bins, dtype=np.float64))
    y = torch.as_tensor(np.asarray(truth, dtype=np.float64))
    mean = (pt * bt).sum(-1)
    out = []
    for q in levels:
        z = float(norm.ppf(0.5 + q / 2))
        lo = _widen(_quantile(pt, bt, 0.5 - q / 2), mean, floor, -z)
        hi = _widen(_quantile(pt, bt, 0.5 + q / 2), mean, floor, z)
        out.append(float(((y >= lo) & (y <= hi)).double().mean()))
    return np.array(out)


def coverage_curves(pred: dict, test: dict, levels=COVERAGE_LEVELS,
                    bands_nm=((0.0, 10.0), (10.0, np.inf))) -> dict:
    """Calibration curves (observed vs nominal interval coverage) of thickness and tilt on a test set.

    ``pred`` from :func:`evaluate` with ``distributions=True``. Tilt truths are expressed in the
    crystal axes the alignment chose (the 4mm-equivalent frame of the predicted distributions);
    both tilt axes pooled. Returns ``{"levels", "thickness", "tilt", "bands": {name: {...}}, "n"}``.
    """
    t = test["thickness_nm"]
    k = np.round((pred["rotation_deg"] - test["rotation_deg"]) / 90.0)
    tx, ty = rotate90(test["tilt_x_mrad"], test["tilt_y_mrad"], -k)  # truth in the predicted frame
    ft, fa = pred.get("resolution_floor", (0.0, 0.0))
    tb, ab = pred["thickness_bins_nm"], pred["tilt_bins_mrad"]

    def curves(m):
        return {"thickness": interval_coverage(pred["p_thickness"][m], tb, t[m], levels, ft).tolist(),
                "tilt": interval_coverage(np.concatenate([pred["p_tilt_x"][m], pred["p_tilt_y"][m]]), ab,
                                          np.concatenate([tx[m], ty[m]]), levels, fa).tolist(),
                "n": int(m.sum())}

    out = {"levels": [float(v) for v in levels], **curves(np.ones(len(t), bool)), "bands": {}}
    for lo, hi in bands_nm:
        m = (t >= lo) & (t < hi)
        if m.any():
            out["bands"][f"{lo:g}-{hi:g} nm" if np.isfinite(hi) else f">= {lo:g} nm"] = curves(m)
    return out
