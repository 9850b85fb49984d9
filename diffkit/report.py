"""Static (matplotlib) figures and comparisons for headless runs and reports."""
from __future__ import annotations

import numpy as np

#: tilt azimuths are hatched where the pattern rotation (the crystal axes) is uncertain by more (deg)
AZIMUTH_ROTATION_LIMIT_DEG = 10.0


def compare_to_truth(maps, truth, variables=("thickness_nm", "tilt_x_mrad", "tilt_y_mrad")) -> dict:
    """RMSE, bias and uncertainty coverage of mapped values against ground-truth maps.

    ``maps`` is the Dataset from :func:`diffkit.maps.map_pacbed` (dims y, x over windows);
    ``truth`` has per-scan-position maps (scan_y, scan_x) and is averaged over each
    window (``maps.attrs['window']``/``['step']``) before comparison. OOD/flagged windows are excluded.
    """
    import json

    win = maps.attrs.get("window", (1, 1))
    step = maps.attrs.get("step", win)
    if isinstance(win, str):
        win = json.loads(win)
    if isinstance(step, str):
        step = json.loads(step)
    wy, wx = (int(win[0]), int(win[1])) if np.ndim(win) else (int(win), int(win))
    sy, sx = (int(step[0]), int(step[1])) if np.ndim(step) else (int(step), int(step))
    ny, nx = maps.sizes["y"], maps.sizes["x"]
    out = {}
    ok = np.ones((ny, nx), bool)
    if "status" in maps:
        ok &= np.asarray(maps["status"].values) == 0
    if "ood" in maps:
        ok &= ~np.asarray(maps["ood"].values).astype(bool)
    out["n_windows"] = int(ok.size)
    out["n_used"] = int(ok.sum())
    for v in variables:
        if v not in maps or v not in truth:
            continue
        tv = np.asarray(truth[v].values, float)
        tw = np.array([[tv[iy * sy:iy * sy + wy, ix * sx:ix * sx + wx].mean() for ix in range(nx)] for iy in range(ny)])
        pv = np.asarray(maps[v].values, float)
        d = (pv - tw)[ok]
        res = {"rmse": float(np.sqrt(np.mean(d**2))) if d.size else float("nan"),
               "bias": float(np.mean(d)) if d.size else float("nan"),
               "max_abs": float(np.max(np.abs(d))) if d.size else float("nan")}
        sv = v.replace("_nm", "_std_nm").replace("_mrad", "_std_mrad")
        if sv in maps and d.size:
            s = np.asarray(maps[sv].values, float)[ok]
            res["within_1sigma"] = float(np.mean(np.abs(d) <= s))
            res["within_2sigma"] = float(np.mean(np.abs(d) <= 2 * s))
        out[v] = res
    return out


def plot_pacbed_maps(maps, path=None, truth=None, title=None):
    """Figure of thickness, tilt magnitude, tilt azimuth (cyclic colormap) and uncertainty maps."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("thickness_nm", "thickness (nm)", "viridis"), ("thickness_std_nm", "thickness std (nm)", "magma"),
              ("tilt_magnitude_mrad", "tilt magnitude (mrad)", "plasma"), ("tilt_azimuth_deg", "tilt azimuth (deg)", "twilight")]
    panels = [p for p in panels if p[0] in maps]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0))
    axes = np.atleast_1d(axes)
    x = maps["x"].values
    y = maps["y"].values
    unit = maps["x"].attrs.get("units", "")
    ext = [x[0], x[-1], y[-1], y[0]] if len(x) > 1 else None
    for ax, (v, label, cmap) in zip(axes, panels):
        data = np.asarray(maps[v].values, float)
        kw = {"vmin": 0, "vmax": 360} if v == "tilt_azimuth_deg" else {}
        im = ax.imshow(data, cmap=cmap, extent=ext, **kw)
        if "ood" in maps:
            bad = np.ma.masked_where(~np.asarray(maps["ood"].values, bool), np.ones_like(data))
            ax.imshow(bad, cmap="Greys", alpha=0.5, extent=ext, vmin=0, vmax=1)
        if v == "tilt_azimuth_deg" and "rotation_std_deg" in maps:
            # where the crystal axes are not determined (thin regions) the azimuth means little: hatch
            vague = np.asarray(maps["rotation_std_deg"].values, float) > AZIMUTH_ROTATION_LIMIT_DEG
            if vague.any() and min(data.shape) >= 2:
                gx, gy = (x, y) if ext is not None else (np.arange(data.shape[1]), np.arange(data.shape[0]))
                ax.contourf(gx, gy, vague.astype(float), levels=[0.5, 1.5], colors="none", hatches=["////"])
                label += f"\n(hatched: crystal axes uncertain by > {AZIMUTH_ROTATION_LIMIT_DEG:g}°)"
        ax.set_title(label)
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
