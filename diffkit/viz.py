"""HoloViews + Datashader views of diffkit maps and diffraction patterns.

Every map is a ``rasterize``d :class:`holoviews.Image` (Datashader re-aggregates it to the
screen on zoom, never upsampling small maps), with a colour bar labelled with units and a
hover tool that shows the value under the cursor. Tilt azimuth uses a *cyclic* colour map
(colorcet ``CET_C6``) and is down-sampled with ``first`` (never averaged: the mean of 359 deg
and 1 deg is not 180 deg); signed quantities (tilt components, strain, differences) use a
diverging map on symmetric limits.

HoloViews, Datashader and colorcet are imported lazily (optional ``viz`` dependencies), so
``import diffkit.viz`` is cheap.

Examples
--------
>>> from diffkit import viz
>>> viz.style("tilt_azimuth_deg")["cmap"]
'CET_C6'
"""
from __future__ import annotations

import json

import numpy as np

CYCLIC_CMAP = "CET_C6"
DIVERGING_CMAP = "coolwarm"

#: name -> (label, units, colour map, colour-limit mode, scale factor, down-sampling aggregator)
_STYLES = {
    "thickness_nm": ("thickness", "nm", "viridis", "robust", 1.0, "mean"),
    "thickness_std_nm": ("thickness uncertainty (1σ)", "nm", "cividis", "robust0", 1.0, "mean"),
    "tilt_x_mrad": ("tilt x", "mrad", DIVERGING_CMAP, "symmetric", 1.0, "mean"),
    "tilt_y_mrad": ("tilt y", "mrad", DIVERGING_CMAP, "symmetric", 1.0, "mean"),
    "tilt_x_std_mrad": ("tilt x uncertainty (1σ)", "mrad", "cividis", "robust0", 1.0, "mean"),
    "tilt_y_std_mrad": ("tilt y uncertainty (1σ)", "mrad", "cividis", "robust0", 1.0, "mean"),
    "tilt_magnitude_mrad": ("tilt magnitude", "mrad", "inferno", "robust0", 1.0, "mean"),
    "tilt_azimuth_deg": ("tilt azimuth", "deg", CYCLIC_CMAP, (0.0, 360.0), 1.0, "first"),
    "rotation_std_deg": ("crystal-axes uncertainty (rotation, 68 %)", "deg", "cividis", "robust0", 1.0, "max"),
    "confidence": ("confidence", "", "gray", (0.0, 1.0), 1.0, "mean"),
    "ood": ("out of distribution", "", "kr", (0.0, 1.0), 1.0, "max"),
    "status": ("status code", "", "kr", "robust0", 1.0, "max"),
    "virtual_bf": ("virtual bright field", "counts", "gray", "robust", 1.0, "mean"),
    "virtual_adf": ("virtual annular dark field", "counts", "gray", "robust", 1.0, "mean"),
    "exx": ("ε_xx", "%", DIVERGING_CMAP, "symmetric", 100.0, "mean"),
    "eyy": ("ε_yy", "%", DIVERGING_CMAP, "symmetric", 100.0, "mean"),
    "exy": ("ε_xy", "%", DIVERGING_CMAP, "symmetric", 100.0, "mean"),
    "theta_deg": ("rotation θ", "deg", DIVERGING_CMAP, "symmetric", 1.0, "mean"),
}


def style(name: str) -> dict:
    """Display style of a map variable: label, units, cmap, clim mode, scale, aggregator.

    Unknown names get a generic style; ``"<name>_error"`` / ``"<name>_truth"`` derive from ``<name>``.
    """
    base = name
    kind = ""
    for suffix in ("_error", "_truth"):
        if name.endswith(suffix):
            base, kind = name[: -len(suffix)], suffix
    label, units, cmap, mode, scale, agg = _STYLES.get(base, (base.replace("_", " "), "", "viridis", "robust", 1.0, "mean"))
    if kind == "_error":
        label, cmap, mode = f"{label}: measured − true", DIVERGING_CMAP, "symmetric"
        if base == "tilt_azimuth_deg":
            mode = (-180.0, 180.0)
    elif kind == "_truth":
        label = f"{label} (true)"
    return {"label": label, "units": units, "cmap": cmap, "clim": mode, "scale": scale, "aggregator": agg}


def resolve_cmap(cmap):
    """A colour map HoloViews understands: names it knows pass through; other colorcet names
    (e.g. ``CET_C6``) become their palette (a list of colours)."""
    if not isinstance(cmap, str):
        return cmap
    from holoviews.plotting.util import process_cmap

    try:
        process_cmap(cmap, ncolors=2)
        return cmap
    except Exception:  # noqa: BLE001 - fall back to colorcet's palettes
        import colorcet

        if cmap in colorcet.palette:
            return list(colorcet.palette[cmap])
        raise


def colour_limits(values, mode="robust") -> tuple[float, float]:
    """Colour limits for ``values``: ``robust`` (1-99 %), ``robust0`` (0 to 99 %),
    ``symmetric`` (±99 % of |v|) or a fixed ``(lo, hi)``; always a finite, non-empty range."""
    if isinstance(mode, (tuple, list)):
        return float(mode[0]), float(mode[1])
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    if mode == "symmetric":
        m = float(np.percentile(np.abs(v), 99)) or float(np.abs(v).max()) or 1e-3
        return (-m, m)
    lo = 0.0 if mode == "robust0" else float(np.percentile(v, 1))
    hi = float(np.percentile(v, 99))
    if mode == "robust0":
        lo = min(lo, float(v.min()))
    if not hi > lo:
        hi = lo + (abs(lo) * 0.01 or 1.0)
    return (lo, hi)


def _coords(arr, x=None, y=None):
    """(values 2D, x coords, y coords, xlabel, ylabel) of a DataArray or array."""
    dims = getattr(arr, "dims", None)
    vals = np.asarray(getattr(arr, "values", arr), dtype=float)
    if vals.ndim != 2:
        raise ValueError(f"expected a 2D map, got shape {vals.shape}")
    ny, nx = vals.shape
    ylab, xlab = "scan y (position)", "scan x (position)"
    if dims is not None and x is None and y is None:
        yd, xd = dims
        if xd in arr.coords and yd in arr.coords:
            x, y = np.asarray(arr[xd].values, float), np.asarray(arr[yd].values, float)
            ux = arr[xd].attrs.get("units", "")
            uy = arr[yd].attrs.get("units", "")
            xlab = f"{xd} ({ux})" if ux else xd
            ylab = f"{yd} ({uy})" if uy else yd
    x = np.arange(nx, dtype=float) if x is None else np.asarray(x, float)
    y = np.arange(ny, dtype=float) if y is None else np.asarray(y, float)
    return vals, x, y, xlab, ylab


def _frame(x, y, frame_width):
    """Frame size (w, h) in screen px that keeps the data aspect ratio (square pixels)."""
    ex = (abs(x[-1] - x[0]) if len(x) > 1 else 1.0) or 1.0
    ey = (abs(y[-1] - y[0]) if len(y) > 1 else 1.0) or 1.0
    ex += ex / max(len(x) - 1, 1)
    ey += ey / max(len(y) - 1, 1)
    h = int(round(frame_width * min(max(ey / ex, 0.4), 2.5)))
    return int(frame_width), h


def image(data, name: str | None = None, *, x=None, y=None, label: str | None = None, cmap=None, clim=None,
          frame_width: int = 220, rasterized: bool = True, tools=("hover", "tap"), xlabel=None,
          ylabel=None, colorbar: bool = True, **opts):
    """A map as a ``rasterize``d HoloViews image with hover and a labelled colour bar.

    Parameters
    ----------
    data : xarray.DataArray or 2D array
        Dims (y, x); DataArray coordinates (e.g. nm) become the axes.
    name : str, optional
        Variable name (picks label, units, colour map and limits, see :func:`style`);
        default ``data.name``.
    x, y : 1D arrays, optional
        Axis coordinates (default: the DataArray's, else positions 0..n-1).
    clim : (lo, hi) or mode, optional
        Override of the colour limits (see :func:`colour_limits`).
    frame_width : int
        Width of the plot area (px); the height follows the data aspect ratio.
    rasterized : bool
        Wrap in :func:`holoviews.operation.datashader.rasterize` (needs a live server or
        kernel to re-aggregate on zoom); ``False`` gives a plain image.
    """
    import holoviews as hv

    name = name or getattr(data, "name", None) or "value"
    st = style(str(name))
    vals, xc, yc, xl, yl = _coords(data, x, y)
    vals = vals * st["scale"]
    vname = str(name).replace(".", "_")
    units = st["units"]
    vdim = hv.Dimension(vname, label=st["label"], unit=units or None)
    kx = hv.Dimension("x", label=xlabel or xl)
    ky = hv.Dimension("y", label=ylabel or yl)
    img = hv.Image((xc, yc, vals), kdims=[kx, ky], vdims=[vdim], label=label or "")
    lim = colour_limits(vals, clim if clim is not None else st["clim"])
    title = label if label is not None else (f"{st['label']} ({units})" if units else st["label"])
    fw, fh = _frame(xc, yc, frame_width)
    plot_opts = dict(cmap=resolve_cmap(cmap or st["cmap"]), clim=lim, colorbar=colorbar, frame_width=fw, frame_height=fh,
                     tools=list(tools), invert_yaxis=True, title=title, clabel=units or None,
                     xlabel=xlabel or xl, ylabel=ylabel or yl, framewise=True)
    plot_opts.update(opts)
    if rasterized:
        from holoviews.operation.datashader import rasterize

        return rasterize(img, aggregator=st["aggregator"]).opts(**plot_opts)
    return img.opts(**plot_opts)


def map_layout(ds, variables=None, ncols: int = 3, frame_width: int = 220, **kw):
    """Layout of :func:`image` for the variables of a Dataset (axes linked for zoom/pan)."""
    import holoviews as hv

    variables = [v for v in (variables or list(ds.data_vars)) if v in ds and ds[v].ndim == 2]
    plots = [image(ds[v], v, frame_width=frame_width, **kw) for v in variables]
    return hv.Layout(plots).cols(ncols)


def pattern_image(pattern, pixel_size_mrad: float | None = None, *, label: str = "pattern", cmap: str = "fire",
                  log: bool = True, frame_width: int = 220, rasterized: bool = True, tools=("hover",),
                  units: str = "counts", **opts):
    """A diffraction pattern as an image; axes in mrad from the centre when the pixel size is known.

    Log colour scale by default (clipped to 1e-3 of the maximum so empty pixels stay finite).
    """
    import holoviews as hv

    p = np.asarray(pattern, dtype=float)
    ny, nx = p.shape
    if pixel_size_mrad:
        x = (np.arange(nx) - (nx - 1) / 2) * pixel_size_mrad
        y = (np.arange(ny) - (ny - 1) / 2) * pixel_size_mrad
        xl, yl = "kx (mrad)", "ky (mrad)"
    else:
        x, y = np.arange(nx, dtype=float), np.arange(ny, dtype=float)
        xl, yl = "detector x (px)", "detector y (px)"
    finite = p[np.isfinite(p)]
    hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    if log:
        pos = finite[finite > 0]
        lo = max(hi * 1e-3, float(pos.min()) if pos.size else hi * 1e-3)
        lo = min(lo, hi * 0.5)
    else:
        lo = float(finite.min()) if finite.size else 0.0
        if not hi > lo:
            hi = lo + 1.0
    vdim = hv.Dimension("intensity", unit=units or None)
    img = hv.Image((x, y, p), kdims=[hv.Dimension("kx", label=xl), hv.Dimension("ky", label=yl)], vdims=[vdim])
    fw, fh = _frame(x, y, frame_width)
    o = dict(cmap=resolve_cmap(cmap), clim=(lo, hi), logz=log, colorbar=True, frame_width=fw, frame_height=fh, tools=list(tools),
             invert_yaxis=True, title=label, xlabel=xl, ylabel=yl, framewise=True, clabel=units or None)
    o = {k: v for k, v in o.items() if v is not None}
    o.update(opts)
    if rasterized:
        from holoviews.operation.datashader import rasterize

        return rasterize(img).opts(**o)
    return img.opts(**o)


# --------------------------------------------------------------------------- map geometry

def window_and_step(maps) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((wy, wx), (sy, sx))`` of a :func:`diffkit.maps.map_pacbed` result (attrs may be JSON strings)."""

    def pair(v, default):
        if v is None:
            return default
        if isinstance(v, str):
            v = json.loads(v)
        if np.ndim(v) == 0:
            return (int(v), int(v))
        return (int(v[0]), int(v[1]))

    win = pair(maps.attrs.get("window"), (1, 1))
    step = pair(maps.attrs.get("step"), win)
    return win, step


def window_slices(maps, iy: int, ix: int) -> tuple[slice, slice]:
    """Scan-position slices (y, x) of window ``(iy, ix)`` of a map."""
    (wy, wx), (sy, sx) = window_and_step(maps)
    return slice(iy * sy, iy * sy + wy), slice(ix * sx, ix * sx + wx)


def nearest_index(coords, value) -> int:
    """Index of the coordinate nearest to ``value``."""
    c = np.asarray(coords, float)
    return int(np.argmin(np.abs(c - float(value))))


def truth_on_map_grid(truth, maps):
    """Window averages of per-position truth maps (scan_y, scan_x) on the map grid (y, x).

    The tilt magnitude and azimuth are recomputed from the averaged tilt components.
    Returns an ``xarray.Dataset`` with the map's coordinates, or ``None`` without truth.
    """
    import xarray as xr

    if truth is None:
        return None
    (wy, wx), (sy, sx) = window_and_step(maps)
    ydim, xdim = "y", "x"
    ny, nx = maps.sizes[ydim], maps.sizes[xdim]
    out = {}
    for v in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
        if v not in truth:
            continue
        tv = np.asarray(truth[v].values, float)
        out[v] = np.array([[tv[iy * sy:iy * sy + wy, ix * sx:ix * sx + wx].mean() for ix in range(nx)]
                           for iy in range(ny)])
    if "tilt_x_mrad" in out and "tilt_y_mrad" in out:
        out["tilt_magnitude_mrad"] = np.hypot(out["tilt_x_mrad"], out["tilt_y_mrad"])
        out["tilt_azimuth_deg"] = np.rad2deg(np.arctan2(out["tilt_y_mrad"], out["tilt_x_mrad"])) % 360
    coords = {k: maps.coords[k] for k in (ydim, xdim) if k in maps.coords}
    return xr.Dataset({k: ((ydim, xdim), v) for k, v in out.items()}, coords=coords)


def errors_vs_truth(maps, truth_grid) -> dict:
    """``{name_error: DataArray}`` measured − true on the map grid (azimuth wrapped to ±180 deg)."""
    out = {}
    if truth_grid is None:
        return out
    for v in ("thickness_nm", "tilt_magnitude_mrad", "tilt_azimuth_deg", "tilt_x_mrad", "tilt_y_mrad"):
        if v in maps and v in truth_grid:
            d = maps[v] - truth_grid[v].values
            if v == "tilt_azimuth_deg":
                d = (d + 180) % 360 - 180
            out[f"{v}_error"] = d.rename(f"{v}_error")
    return out
