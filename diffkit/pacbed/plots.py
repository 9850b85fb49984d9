"""Views of the PACBED sensitivity analyses and of LSF results.

Matplotlib figures for reports (``plot_*``) and HoloViews objects for dashboards (``hv_*``,
HoloViews imported lazily). All take the ``xarray.Dataset`` results of
:mod:`diffkit.pacbed.analysis` and :mod:`diffkit.pacbed.lsf`.
"""
from __future__ import annotations

import numpy as np


def _axes(ax, ncols=1, figsize=None):
    import matplotlib.pyplot as plt

    if ax is not None:
        axs = np.atleast_1d(ax)
        return axs[0].figure, axs
    fig, axs = plt.subplots(1, ncols, figsize=figsize or (4.2 * ncols, 3.3), constrained_layout=True, squeeze=False)
    return fig, axs[0]


def plot_calibration(curves: dict, title: str | None = None, ax=None):
    """Calibration plot: observed vs nominal coverage of the central intervals, thickness and tilt,
    all patterns (solid) and per thickness band (dashed / dotted); the diagonal is perfect calibration,
    above it conservative.

    ``curves`` from :func:`diffkit.models.pacbed_eval.coverage_curves`.
    """
    fig, axs = _axes(ax, ncols=2, figsize=(8.4, 3.6))
    lv = np.asarray(curves["levels"])
    styles = ["--", ":", "-."]
    for a, q in zip(axs, ("thickness", "tilt")):
        a.plot([0, 1], [0, 1], color="0.6", lw=1)
        a.plot(lv, curves[q], "o-", ms=3, label=f"all (n = {curves['n']})")
        for (name, c), ls in zip(curves.get("bands", {}).items(), styles):
            a.plot(lv, c[q], ls, label=f"{name} (n = {c['n']})")
        a.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="nominal coverage of the central interval",
              ylabel="observed coverage")
        a.set_title(q if title is None else f"{title}: {q}", fontsize=9)
        a.set_aspect("equal")
        a.legend(fontsize=7, loc="lower right")
    return fig


def plot_mask_sensitivity(ds, quantity: str = "thickness", against: str = "unmasked", by_range: bool = False,
                          tolerance=None, ax=None):
    """Match rate versus band-pass mask position (seed Figs. 5, 6).

    Parameters
    ----------
    ds : Dataset from :func:`~diffkit.pacbed.analysis.mask_sensitivity`
    quantity : "thickness" or "tilt"
    against : "unmasked" or "truth"
    by_range : bool
        One curve per thickness range at ``tolerance`` (default: the middle tolerance) instead of
        one curve per tolerance.
    """
    if quantity not in ("thickness", "tilt"):
        raise ValueError("quantity must be 'thickness' or 'tilt'")
    if against not in ("unmasked", "truth"):
        raise ValueError("against must be 'unmasked' or 'truth'")
    tdim = "thickness_tolerance_nm" if quantity == "thickness" else "tilt_tolerance_mrad"
    unit = "nm" if quantity == "thickness" else "mrad"
    name = f"{quantity}_match" + ("_truth" if against == "truth" else "")
    if name not in ds:
        raise ValueError(f"{name} not in the dataset (pass truth to mask_sensitivity)")
    fig, (a,) = _axes(ax)
    x = ds["mask_inner_mrad"].values
    if by_range:
        da = ds[name + "_by_range"]
        tol = float(ds[tdim].values[len(ds[tdim]) // 2]) if tolerance is None else float(tolerance)
        da = da.sel({tdim: tol}, method="nearest")
        for r in ds["thickness_range"].values:
            y = da.sel(thickness_range=r).values
            if np.isfinite(y).any():
                a.plot(x, 100 * y, marker=".", label=f"{r} (n={int(ds['n_by_range'].sel(thickness_range=r))})")
        a.set_title(f"{quantity} within ±{tol:g} {unit}", fontsize=9)
    else:
        for tol in ds[tdim].values:
            a.plot(x, 100 * ds[name].sel({tdim: tol}).values, marker=".", label=f"±{tol:g} {unit}")
    alpha = ds.attrs.get("convergence_mrad")
    if alpha:
        a.axvline(alpha, color="0.5", ls="--", lw=0.8, label="convergence angle")
    a.set_xlabel("band-pass mask inner radius (mrad)")
    a.set_ylabel(f"match vs {against} (%)")
    a.set_ylim(-2, 102)
    a.legend(fontsize=7)
    return fig


def plot_background_sweep(ds, ax=None):
    """Accuracy (with truth) or mean thickness, and the converged background, versus strength (seed Fig. 4)."""
    fig, axs = _axes(ax, ncols=2)
    s = ds["background_strength"].values
    a = axs[0]
    if "thickness_match_truth" in ds:
        for tol in ds["thickness_tolerance_nm"].values:
            a.plot(s, 100 * ds["thickness_match_truth"].sel(thickness_tolerance_nm=tol).values, marker=".", label=f"±{tol:g} nm")
        a.set_ylabel("thickness match vs truth (%)")
        a.legend(fontsize=7)
    else:
        a.errorbar(s, ds["thickness_nm"].mean("pattern").values, yerr=ds["thickness_nm"].std("pattern").values, marker=".")
        a.set_ylabel("thickness (nm)")
    a.set_xlabel("background strength (mean intensity / nm)")
    if len(axs) > 1:
        b = axs[1]
        b.plot(s, ds["background_fraction_mean"].values, marker=".")
        b.set_xlabel("background strength (mean intensity / nm)")
        b.set_ylabel("converged background (fraction of mean)")
    return fig


def plot_dose_series(ds, pattern=None, quantity: str = "thickness", ax=None):
    """Predictions (mean +- std over repeats) versus dose, with the stability threshold (seed Fig. 8)."""
    if quantity not in ("thickness", "tilt_x", "tilt_y"):
        raise ValueError("quantity must be 'thickness', 'tilt_x' or 'tilt_y'")
    fig, (a,) = _axes(ax)
    d = ds["dose"].values
    unit = "nm" if quantity == "thickness" else "mrad"
    var = f"{quantity}_{unit}"
    pats = ds["pattern"].values if pattern is None else np.atleast_1d(pattern)
    for p in pats:
        v = ds[var].sel(pattern=p)
        a.errorbar(d, v.mean("repeat").values, yerr=v.std("repeat").values, marker=".", capsize=2, label=f"pattern {p}")
    key = "dose_threshold_thickness" if quantity == "thickness" else "dose_threshold_tilt"
    thr = ds.attrs.get(key)
    if thr is not None and np.isfinite(thr):
        a.axvline(thr, color="k", ls="--", lw=0.8, label=f"stable from {thr:.2g} e-")
    a.set_xscale("log")
    a.set_xlabel("dose (e-/pattern)")
    a.set_ylabel(f"{quantity.replace('_', ' ')} ({unit})")
    if len(pats) <= 8:
        a.legend(fontsize=7)
    return fig


def plot_chi2_landscape(res, pattern: int = 0, ax=None):
    """LSF chi2 landscape of one pattern: profile over thickness (min over tilts) and the map over
    signed tilts at the best thickness, with the best fit marked."""
    if "chi2_landscape" not in res:
        raise ValueError("the LSF result has no chi2_landscape (use return_landscape=True)")
    fig, axs = _axes(ax, ncols=2, figsize=(8.6, 3.4))
    r = res.isel(pattern=pattern)
    land = r["chi2_landscape"]
    prof = land.min(("grid_tilt_y_mrad", "grid_tilt_x_mrad"), skipna=True)
    a = axs[0]
    a.plot(prof["grid_thickness_nm"].values, prof.values, ".-")
    a.axvline(float(r["thickness_nm"]), color="r", lw=0.8)
    a.set_yscale("log")
    a.set_xlabel("thickness (nm)")
    a.set_ylabel(r"$\chi^2$ (min over tilt)")
    if len(axs) > 1:
        b = axs[1]
        m = land.sel(grid_thickness_nm=float(r["thickness_nm"]))
        tx, ty = m["grid_tilt_x_mrad"].values, m["grid_tilt_y_mrad"].values
        st = (tx[1] - tx[0]) / 2 if len(tx) > 1 else 0.5
        im = b.imshow(np.ma.masked_invalid(m.values), origin="lower", cmap="viridis_r",
                      extent=(tx[0] - st, tx[-1] + st, ty[0] - st, ty[-1] + st))
        b.plot(float(r["tilt_x_mrad"]), float(r["tilt_y_mrad"]), "r+", ms=10)
        b.set_xlabel("tilt x (mrad)")
        b.set_ylabel("tilt y (mrad)")
        b.set_title(f"t = {float(r['thickness_nm']):g} nm", fontsize=9)
        fig.colorbar(im, ax=b, shrink=0.8, label=r"$\chi^2$")
    return fig


# --------------------------------------------------------------------------------- HoloViews
def hv_mask_sensitivity(ds, quantity: str = "thickness", against: str = "unmasked"):
    """HoloViews overlay of match-rate curves versus mask position (one per tolerance)."""
    import holoviews as hv

    tdim = "thickness_tolerance_nm" if quantity == "thickness" else "tilt_tolerance_mrad"
    name = f"{quantity}_match" + ("_truth" if against == "truth" else "")
    if name not in ds:
        raise ValueError(f"{name} not in the dataset")
    curves = {float(t): hv.Curve((ds["mask_inner_mrad"].values, 100 * ds[name].sel({tdim: t}).values),
                                 kdims=["mask inner radius (mrad)"], vdims=["match (%)"])
              for t in ds[tdim].values}
    return hv.NdOverlay(curves, kdims=[tdim])


def hv_background_sweep(ds):
    """HoloViews curves: thickness match vs truth (or mean thickness) and converged background vs strength."""
    import holoviews as hv

    s = ds["background_strength"].values
    if "thickness_match_truth" in ds:
        left = hv.NdOverlay({float(t): hv.Curve((s, 100 * ds["thickness_match_truth"].sel(thickness_tolerance_nm=t).values),
                                                 kdims=["background strength (1/nm)"], vdims=["match (%)"])
                             for t in ds["thickness_tolerance_nm"].values}, kdims=["thickness_tolerance_nm"])
    else:
        left = hv.Curve((s, ds["thickness_mean_nm"].values), kdims=["background strength (1/nm)"], vdims=["thickness (nm)"])
    right = hv.Curve((s, ds["background_fraction_mean"].values), kdims=["background strength (1/nm)"],
                     vdims=["converged background (fraction)"])
    return left + right


def hv_dose_series(ds, quantity: str = "thickness"):
    """HoloViews: mean and spread (ErrorBars) of the prediction versus log10 dose, per pattern."""
    import holoviews as hv

    unit = "nm" if quantity == "thickness" else "mrad"
    var = f"{quantity}_{unit}"
    ld = np.log10(ds["dose"].values)
    items = {}
    for p in ds["pattern"].values:
        v = ds[var].sel(pattern=p)
        mu, sd = v.mean("repeat").values, v.std("repeat").values
        items[int(p)] = hv.Curve((ld, mu), kdims=["log10 dose (e-)"], vdims=[f"{quantity} ({unit})"]) * \
            hv.ErrorBars((ld, mu, sd), kdims=["log10 dose (e-)"], vdims=[f"{quantity} ({unit})", "std"])
    return hv.HoloMap(items, kdims=["pattern"]).overlay("pattern")


def hv_chi2_landscape(res, pattern: int = 0):
    """HoloViews: chi2 map over signed tilts, one frame per thickness (slider), and the thickness profile."""
    import holoviews as hv

    r = res.isel(pattern=pattern)
    land = r["chi2_landscape"]
    keep = np.isfinite(land.values).any(axis=(1, 2))
    frames = {float(t): hv.Image((land["grid_tilt_x_mrad"].values, land["grid_tilt_y_mrad"].values,
                                  land.sel(grid_thickness_nm=t).values),
                                 kdims=["tilt x (mrad)", "tilt y (mrad)"], vdims=["chi2"])
              for t in land["grid_thickness_nm"].values[keep]}
    prof = land.min(("grid_tilt_y_mrad", "grid_tilt_x_mrad"), skipna=True)
    curve = hv.Curve((prof["grid_thickness_nm"].values, prof.values), kdims=["thickness (nm)"], vdims=["chi2"])
    return hv.HoloMap(frames, kdims=["thickness (nm)"]) + curve


__all__ = ["hv_background_sweep", "hv_chi2_landscape", "hv_dose_series", "hv_mask_sensitivity",
           "plot_background_sweep", "plot_chi2_landscape", "plot_dose_series", "plot_mask_sensitivity"]
