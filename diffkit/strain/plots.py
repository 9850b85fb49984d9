"""Views of strain maps: a matplotlib figure and HoloViews images for dashboards."""
from __future__ import annotations

import numpy as np

_LABELS = {"exx": r"$\varepsilon_{xx}$ (%)", "eyy": r"$\varepsilon_{yy}$ (%)", "exy": r"$\varepsilon_{xy}$ (%)",
           "theta_deg": r"$\theta$ (deg)"}


def _scale(name):
    return 100.0 if name in ("exx", "eyy", "exy") else 1.0


def plot_strain_maps(ds, components=("exx", "eyy", "exy", "theta_deg"), limits=None, truth=None, cmap="RdBu_r",
                     figsize=None, title=None):
    """Figure with one panel per strain component (strain in %, rotation in degrees).

    Parameters
    ----------
    ds : xarray.Dataset
        Output of :func:`diffkit.strain.map_strain` (failed positions are NaN and shown grey).
    components : sequence of str
    limits : dict name -> symmetric colour limit (in the plotted unit), optional
        Default: the 99th percentile of |value|.
    truth : xarray.Dataset, optional
        A second row shows the true maps (simulations) on the same colour scale.
    """
    import matplotlib.pyplot as plt

    rows = 2 if truth is not None else 1
    n = len(components)
    fig, axs = plt.subplots(rows, n, figsize=figsize or (3.2 * n, 2.9 * rows), squeeze=False, constrained_layout=True)
    for j, c in enumerate(components):
        v = ds[c].values * _scale(c)
        lim = (limits or {}).get(c) or float(np.nanpercentile(np.abs(v), 99)) or 1e-3
        cm = plt.get_cmap(cmap).copy()
        cm.set_bad("0.6")
        for i in range(rows):
            src = v if i == 0 else truth[c].values * _scale(c)
            im = axs[i, j].imshow(np.ma.masked_invalid(src), cmap=cm, vmin=-lim, vmax=lim, interpolation="nearest")
            axs[i, j].set_xticks([])
            axs[i, j].set_yticks([])
            axs[i, j].set_title(_LABELS.get(c, c) + (" (truth)" if i else ""), fontsize=9)
            fig.colorbar(im, ax=axs[i, j], shrink=0.8)
        if "reference" in ds and ds["reference"].values.any():
            axs[0, j].contour(ds["reference"].values.astype(float), levels=[0.5], colors="k", linewidths=0.8)
    if title:
        fig.suptitle(title)
    return fig


def strain_images(ds, components=("exx", "eyy", "exy", "theta_deg"), cmap="RdBu_r", width=280, height=260):
    """HoloViews ``rasterize``d images of the strain maps (a Layout), for Panel dashboards.

    HoloViews and Datashader are imported here only (optional ``viz`` dependencies).
    """
    import holoviews as hv
    from holoviews.operation.datashader import rasterize

    plots = []
    for c in components:
        v = ds[c].values * _scale(c)
        lim = float(np.nanpercentile(np.abs(v), 99)) if np.isfinite(v).any() else 1.0
        ny, nx = v.shape
        img = hv.Image((np.arange(nx), np.arange(ny), v), kdims=["scan_x", "scan_y"], vdims=[c], label=c)
        r = rasterize(img).opts(cmap=cmap, clim=(-lim, lim), colorbar=True, width=width, height=height,
                                title=_LABELS.get(c, c).replace("$", "").replace("\\varepsilon", "eps").replace("\\theta", "theta"),
                                invert_yaxis=True, tools=["hover"])
        plots.append(r)
    return hv.Layout(plots).cols(len(plots))
