"""Maps explorer: thickness and tilt maps over a 4D-STEM scan, computed off the event loop.

``Run`` calls :func:`diffkit.maps.map_pacbed` (dask chunks, batched network) in a worker
thread; its per-chunk ``callback`` reports progress and returns ``False`` once ``Cancel`` was
pressed. The event loop only polls the progress, so a served app stays responsive and
several sessions can map at once. Results are shown as rasterized HoloViews images (linked
zoom/pan, hover, colour bars, a cyclic colour map for the tilt azimuth); tapping a map pixel
shows the PACBED of that window.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
import time

import numpy as np
import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from .. import viz
from ..report import AZIMUTH_ROTATION_LIMIT_DEG
from ._common import (CatalogSource, as_numpy, button, calibration_text, error_text, log_exception,
                      make_source, source_widgets)


class MapCancelled(Exception):
    """Raised inside the worker when a run was cancelled and the mapper returned nothing."""


MAP_VARIABLES = ("thickness_nm", "tilt_magnitude_mrad", "tilt_azimuth_deg", "thickness_std_nm")


class MapsExplorer(Viewer):
    """Thickness/tilt maps of a scan with progress, cancel and per-pixel PACBED.

    Parameters
    ----------
    catalog, entry : str, optional
        Catalog (default: the demo catalog) and data set.
    data : diffkit.data.FourDSTEM, optional
        Map this scan instead of a catalog entry.
    predictor : PacbedPredictor, optional
        Network (default: the shipped model for the scan's calibration).
    scheduler : optional
        Passed to :func:`diffkit.maps.map_pacbed` (e.g. a ``distributed.Client``).

    Examples
    --------
    >>> m = MapsExplorer(entry="sto_pacbed_wedge", window=5)   # doctest: +SKIP
    >>> maps = m.run()                                        # blocking; the Run button runs it in a thread
    """

    source = param.ClassSelector(class_=CatalogSource, doc="Catalog and entry")
    window = param.Integer(default=5, bounds=(1, 20), doc="PACBED window (scan positions per side)")
    step = param.Integer(default=0, bounds=(0, 20), label="Step (positions, 0 = window)")
    background = param.Number(default=0.0, bounds=(0.0, 0.02), step=0.0005,
                              label="Background (× mean per nm)")
    batch_size = param.Integer(default=None, allow_None=True, bounds=(1, 4096), precedence=-1,
                               doc="patterns per predict_batch call (default: 256 on CPU, 1024 on CUDA)")
    scheduler = param.Parameter(default=None, precedence=-1, doc="dask scheduler or distributed.Client")

    # outputs
    progress = param.Integer(default=0, bounds=(0, 100), precedence=-1)
    status = param.String(default="", precedence=-1)
    error = param.String(default="", precedence=-1)
    running = param.Boolean(default=False, precedence=-1)
    maps = param.Parameter(default=None, precedence=-1, doc="xarray.Dataset of the last run")
    selected = param.Tuple(default=(0, 0), length=2, precedence=-1, doc="Selected map window (iy, ix)")

    def __init__(self, catalog: str | None = None, entry: str | None = None, data=None, predictor=None, **params):
        self._given_data = data
        self._given_predictor = predictor
        self._cancel = threading.Event()
        self._done_total = (0, 0)
        self._t0 = 0.0
        if "source" not in params:
            params["source"] = make_source(catalog, entry, "sto_pacbed_wedge", data)
        super().__init__(**params)
        self._run_button = button("Run", "primary", css_classes=["diffkit-run"])
        self._cancel_button = button("Cancel", "warning", disabled=True,
                                                css_classes=["diffkit-cancel"])
        self._run_button.on_click(self._on_run)
        self._cancel_button.on_click(lambda *_: self.cancel())
        self._progress_bar = pn.indicators.Progress(value=0, max=100, sizing_mode="stretch_width",
                                                    bar_color="primary", css_classes=["diffkit-progress"])
        self._source_changed()

    # ------------------------------------------------------------------ data
    @param.depends("source.entry", watch=True)
    def _source_changed(self):
        if not self.running:
            self.param.update(maps=None, selected=(0, 0), progress=0, status="", error=self.source.error)

    def data(self):
        """The scan to map (raises when it cannot be read)."""
        if self._given_data is not None:
            return self._given_data
        return self.source.read()

    def _predictor_for(self, data):
        if self._given_predictor is not None:
            return self._given_predictor
        from ..pacbed import load_predictor

        return load_predictor(data.calibration)

    # ------------------------------------------------------------------ running
    def _callback(self, done, total, *_):
        self._done_total = (int(done), int(total))
        return not self._cancel.is_set()

    def _compute(self):
        """The blocking part (runs in a worker thread for the Run button)."""
        from ..maps import map_pacbed

        data = self.data()
        pred = self._predictor_for(data)
        kw = dict(window=(self.window, self.window), step=(self.step, self.step) if self.step else None,
                  predictor=pred, scheduler=self.scheduler, progress=False, callback=self._callback,
                  batch_size=self.batch_size)
        sig = inspect.signature(map_pacbed).parameters
        if self.background and "background" in sig:
            kw["background"] = self.background
        kw = {k: v for k, v in kw.items() if k in sig or any(p.kind == p.VAR_KEYWORD for p in sig.values())}
        ds = map_pacbed(data, **kw)
        if ds is None:
            raise MapCancelled()
        return ds

    def _begin(self):
        self._cancel.clear()
        self._done_total = (0, 0)
        self._t0 = time.perf_counter()
        self.param.update(running=True, error="", progress=0, status="starting…")

    def _sync_progress(self):
        done, total = self._done_total
        if total:
            self.progress = int(round(100 * done / total))
            el = time.perf_counter() - self._t0
            self.status = f"{'cancelling… ' if self._cancel.is_set() else ''}{done}/{total} done, {el:.0f} s"

    def _finish(self, ds=None, exc=None):
        el = time.perf_counter() - self._t0
        cancelled = self._cancel.is_set()
        if exc is not None and (cancelled or isinstance(exc, MapCancelled)):
            self.param.update(running=False, status=f"Cancelled after {el:.0f} s.")
            return
        if exc is not None:
            log_exception(exc)
            self.param.update(running=False, error=f"Mapping failed: {error_text(exc)}", status="")
            return
        done, total = self._done_total
        if cancelled:
            status = f"Cancelled after {el:.0f} s ({done}/{total} done); partial maps shown."
        else:
            status = f"Done: {ds.sizes.get('y', '?')}×{ds.sizes.get('x', '?')} windows in {el:.1f} s."
        self.param.update(maps=ds, selected=(0, 0), progress=100 if not cancelled else self.progress, status=status,
                          running=False)

    def run(self):
        """Map the scan now (blocking) and return the Dataset (``None`` if cancelled or failed)."""
        self._begin()
        try:
            ds = self._compute()
        except BaseException as exc:  # noqa: BLE001 - reported in the UI
            self._finish(exc=exc)
            return None
        self._sync_progress()
        self._finish(ds)
        return self.maps

    async def run_async(self, poll_s: float = 0.25):
        """Map the scan in a worker thread; progress is polled on the event loop."""
        if self.running:
            return self.maps
        self._begin()
        fut = asyncio.ensure_future(asyncio.to_thread(self._compute))
        while not fut.done():
            self._sync_progress()
            await asyncio.wait({fut}, timeout=poll_s)
        self._sync_progress()
        try:
            ds = fut.result()
        except BaseException as exc:  # noqa: BLE001
            self._finish(exc=exc)
            return None
        self._finish(ds)
        return self.maps

    async def _on_run(self, _event=None):
        await self.run_async()

    def cancel(self):
        """Ask a running map to stop after its current chunk."""
        if self.running:
            self._cancel.set()
            self.status = "cancelling…"

    @param.depends("running", watch=True, on_init=True)
    def _buttons(self):
        if not hasattr(self, "_run_button"):
            return
        self._run_button.disabled = self.running
        self._cancel_button.disabled = not self.running

    @param.depends("progress", watch=True)
    def _bar(self):
        self._progress_bar.value = int(self.progress)

    # ------------------------------------------------------------------ selection
    def select(self, x, y):
        """Select the map window at map coordinates (x, y)."""
        ds = self.maps
        if ds is None or x is None or y is None:
            return
        self.selected = (viz.nearest_index(ds["y"].values, y), viz.nearest_index(ds["x"].values, x))

    def window_pattern(self, iy=None, ix=None):
        """PACBED (mean pattern) of map window (iy, ix) (default: the selected one)."""
        ds = self.maps
        if ds is None:
            return None
        iy, ix = self.selected if iy is None else (iy, ix)
        ys, xs = viz.window_slices(ds, iy, ix)
        return as_numpy(self.data().pacbed(y=ys, x=xs))

    # ------------------------------------------------------------------ views
    def controls(self):
        src = source_widgets(self.source, self._given_data)
        w = pn.Param(self.param, parameters=["window", "step", "background"], show_name=False,
                     widgets={"window": {"type": pn.widgets.IntSlider, "throttled": True,
                                         "css_classes": ["diffkit-window"]},
                              "step": {"type": pn.widgets.IntSlider, "throttled": True},
                              "background": {"type": pn.widgets.FloatSlider, "throttled": True, "format": "0.0000"}})
        status = pn.pane.Markdown(self.param.status, css_classes=["diffkit-status"], sizing_mode="stretch_width")
        return pn.Column(src, w, pn.Row(self._run_button, self._cancel_button), self._progress_bar, status,
                         sizing_mode="stretch_width")

    @param.depends("error", "source.error")
    def _alerts(self):
        msgs = [m for m in (self.error, self.source.error if self.source.error != self.error else "") if m]
        return pn.Column(*[pn.pane.Alert(m, alert_type="danger", css_classes=["diffkit-error"]) for m in msgs],
                         sizing_mode="stretch_width")

    def _marker(self, selected, image_ds):
        import holoviews as hv

        ds = image_ds
        if ds is None:
            return hv.Rectangles([])
        iy, ix = selected
        x, y = ds["x"].values, ds["y"].values
        dx = x[1] - x[0] if len(x) > 1 else 1.0
        dy = y[1] - y[0] if len(y) > 1 else 1.0
        iy, ix = min(iy, len(y) - 1), min(ix, len(x) - 1)
        return hv.Rectangles([(x[ix] - dx / 2, y[iy] - dy / 2, x[ix] + dx / 2, y[iy] + dy / 2)]).opts(
            fill_alpha=0, line_color="red", line_width=2)

    def map_variables(self):
        """Names of the maps shown (measured, then truth/difference when the scan has truth)."""
        ds = self.maps
        if ds is None:
            return []
        shown = [v for v in MAP_VARIABLES if v in ds]
        # where the crystal axes (pattern rotation) are uncertain the azimuth means little: show where
        if "rotation_std_deg" in ds and bool((ds["rotation_std_deg"] > AZIMUTH_ROTATION_LIMIT_DEG).any()):
            shown.append("rotation_std_deg")
        return shown

    def _truth_grid(self):
        ds = self.maps
        truth = getattr(self.data(), "truth", None) if ds is not None else None
        if truth is None:
            return None
        try:
            return viz.truth_on_map_grid(truth, ds)
        except Exception as exc:  # noqa: BLE001 - truth is optional
            log_exception(exc)
            return None

    @staticmethod
    def _ood_points(ds):
        """Small crosses on out-of-distribution windows."""
        import holoviews as hv

        if "ood" not in ds:
            return hv.Points([])
        iy, ix = np.nonzero(np.asarray(ds["ood"].values).astype(bool))
        pts = hv.Points((ds["x"].values[ix], ds["y"].values[iy]), label="out of distribution")
        return pts.opts(marker="x", color="white", size=7, line_width=1.5, show_legend=False)

    @param.depends("maps")
    def _maps_view(self):
        import holoviews as hv

        ds = self.maps
        if ds is None:
            return pn.pane.Markdown("Press **Run** to map the selected data set.", css_classes=["diffkit-empty"])
        images = [(v, ds[v]) for v in self.map_variables()]
        tg = self._truth_grid()
        if tg is not None:
            if "thickness_nm" in tg:
                images.append(("thickness_nm_truth", tg["thickness_nm"]))
            err = viz.errors_vs_truth(ds, tg)
            for v in ("thickness_nm_error", "tilt_magnitude_mrad_error", "tilt_azimuth_deg_error"):
                if v in err:
                    images.append((v, err[v]))
        for v in ("virtual_bf", "virtual_adf"):
            if v in ds:
                images.append((v, ds[v]))
        plots = []
        self._streams = []
        marker = hv.DynamicMap(pn.bind(self._marker, self.param.selected, ds))
        ood = self._ood_points(ds)
        for name, arr in images:
            lim = None
            if name == "thickness_nm_truth":  # same colour scale as the measured thickness
                lim = viz.colour_limits(ds["thickness_nm"].values, viz.style("thickness_nm")["clim"])
            img = viz.image(arr, name, frame_width=220, clim=lim)
            tap = hv.streams.Tap(source=img, x=None, y=None)
            tap.add_subscriber(lambda x=None, y=None: self.select(x, y))
            self._streams.append(tap)
            plots.append(img * marker * ood if not name.endswith("_truth") else img * marker)
        return pn.pane.HoloViews(hv.Layout(plots).cols(3), css_classes=["diffkit-maps"])

    @param.depends("maps", "selected")
    def _pixel_view(self):
        ds = self.maps
        if ds is None:
            return pn.Spacer(width=0)
        iy, ix = self.selected
        try:
            pattern = self.window_pattern(iy, ix)
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            return pn.pane.Alert(f"Could not form the PACBED: {error_text(exc)}", alert_type="danger")
        cal = self.data().calibration
        (wy, wx), _ = viz.window_and_step(ds)
        img = viz.pattern_image(pattern, getattr(cal, "pixel_size_mrad", None), rasterized=False, frame_width=200,
                                label=f"PACBED of window ({iy}, {ix}), {wy}×{wx} positions")
        rows = []
        for v in ("thickness_nm", "thickness_std_nm", "tilt_x_mrad", "tilt_y_mrad", "tilt_magnitude_mrad",
                  "tilt_azimuth_deg", "confidence", "ood"):
            if v in ds:
                val = ds[v].values[iy, ix]
                st = viz.style(v)
                rows.append((st["label"], f"{float(val):.2f}" if v != "ood" else str(bool(val)), st["units"]))
        df = pd.DataFrame(rows, columns=["quantity", "value", "unit"])
        return pn.Row(pn.pane.HoloViews(img), pn.Column(
            pn.pane.Markdown("**Tapped window** (tap a map pixel)", margin=(10, 10, 0, 10)),
            pn.pane.DataFrame(df, index=False, css_classes=["diffkit-pixel"], width=330)))

    @param.depends("maps")
    def _summary(self):
        ds = self.maps
        if ds is None:
            return pn.pane.Markdown("")
        lines = []
        try:
            data = self.data()
            lines.append(calibration_text(data.calibration))
            if getattr(data, "truth", None) is not None:
                from ..report import compare_to_truth

                cmp = compare_to_truth(ds, data.truth)
                lines.append(f"\n**Against ground truth** ({cmp.get('n_used', '?')}/{cmp.get('n_windows', '?')} "
                             "windows used, OOD excluded):\n")
                lines.append("| quantity | RMSE | bias | within 2σ |\n|---|---|---|---|")
                for k, r in cmp.items():
                    if isinstance(r, dict):
                        w2 = r.get("within_2sigma")
                        lines.append(f"| {k} | {r['rmse']:.2f} | {r['bias']:+.2f} | "
                                     f"{'' if w2 is None else f'{w2:.0%}'} |")
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
        if "ood" in ds:
            n = int(np.asarray(ds["ood"].values).sum())
            lines.append(f"\nOut-of-distribution windows: {n}/{int(np.asarray(ds['ood']).size)}")
        return pn.pane.Markdown("\n".join(lines), sizing_mode="stretch_width", css_classes=["diffkit-summary"])

    def main(self):
        return pn.Column(self._alerts, pn.Row(self._pixel_view, self._summary), self._maps_view,
                         sizing_mode="stretch_width")

    def __panel__(self):
        return pn.Row(pn.Column(self.controls(), width=320), self.main(), sizing_mode="stretch_width")

    def template(self, **kw):
        kw.setdefault("title", "diffkit · thickness and tilt maps")
        kw.setdefault("accent", "#30638e")
        return pn.template.FastListTemplate(sidebar=[self.controls()], main=[self.main()], **kw)
