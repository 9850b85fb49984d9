"""Strain explorer: strain maps of a nanobeam (NBED) scan with a selectable reference region.

``Run`` calls :func:`diffkit.strain.map_strain` in a worker thread (disk detection + lattice
fit per pattern, progress per block of rows, ``Cancel`` stops after the current block). The
strain is relative to the median lattice of the *reference region*: box-select a region on
the virtual image and the strain maps are recomputed at once from the fitted lattices
(no new detection).
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import panel as pn
import param
from panel.viewable import Viewer

from .. import viz
from ._common import (CatalogSource, as_numpy, button, calibration_text, error_text, log_exception,
                      make_source, scan_axes, source_widgets)

COMPONENTS = ("exx", "eyy", "exy", "theta_deg")


class StrainCancelled(Exception):
    """Raised from the progress callback to stop :func:`diffkit.strain.map_strain`."""


def strain_available() -> str:
    """Empty string when strain mapping can run, else the reason it cannot."""
    try:
        from ..strain import mapping  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"Strain mapping is not available in this installation ({error_text(exc)})."
    try:
        from ..strain.detect import load_disk_models

        load_disk_models()
    except Exception as exc:  # noqa: BLE001
        return f"No disk-detection model is available: {error_text(exc)}"
    return ""


class StrainExplorer(Viewer):
    """Strain (exx, eyy, exy) and rotation maps of an NBED scan, reference region by box selection.

    Parameters
    ----------
    catalog, entry : str, optional
        Catalog (default: the demo catalog) and data set (default ``si_strain_nbed``).
    data : diffkit.data.FourDSTEM, optional
        Use this scan instead of a catalog entry.
    """

    source = param.ClassSelector(class_=CatalogSource, doc="Catalog and entry")
    method = param.Selector(default="anchor-free", objects=["anchor-free", "subimage-cnn"],
                            label="Disk detection")
    refine = param.Selector(default="cnn", objects=["cnn", "model"], label="Centre refinement",
                            doc="'cnn': sub-image network (fast); 'model': fit each pattern with its simulated disks "
                                "(needs material, zone and convergence in the calibration; ~40x slower, several "
                                "times more precise on thick crystals; the crystal table is computed once, ~10 min)")
    reference = param.Tuple(default=None, length=4, allow_None=True,
                            doc="Reference region (y0, y1, x0, x1), half-open scan positions; None = whole scan")
    stride = param.Integer(default=1, bounds=(1, 8), label="Preview: every n-th position",
                           doc="Map only every n-th scan position along y and x (quick look on small machines)")
    scheduler = param.Parameter(default=None, precedence=-1)

    progress = param.Integer(default=0, bounds=(0, 100), precedence=-1)
    status = param.String(default="", precedence=-1)
    error = param.String(default="", precedence=-1)
    running = param.Boolean(default=False, precedence=-1)
    lattice = param.Parameter(default=None, precedence=-1, doc="map_strain result (lattice vectors per position)")
    strain = param.Parameter(default=None, precedence=-1, doc="strain Dataset for the current reference region")
    vimage = param.Array(default=None, precedence=-1, doc="virtual bright-field image")

    def __init__(self, catalog: str | None = None, entry: str | None = None, data=None, **params):
        self._given_data = data
        self._run = {"stride": 1, "calibration": None, "truth": None}
        self._cancel = threading.Event()
        self._done_total = (0, 0)
        self._t0 = 0.0
        if "source" not in params:
            params["source"] = make_source(catalog, entry, "si_strain_nbed", data)
        super().__init__(**params)
        self._run_button = button("Run", "primary", css_classes=["diffkit-run"])
        self._cancel_button = button("Cancel", "warning", disabled=True,
                                                css_classes=["diffkit-cancel"])
        self._run_button.on_click(self._on_run)
        self._cancel_button.on_click(lambda *_: self.cancel())
        self._progress_bar = pn.indicators.Progress(value=0, max=100, sizing_mode="stretch_width",
                                                    css_classes=["diffkit-progress"])
        self._load()

    # ------------------------------------------------------------------ data
    def data(self):
        if self._given_data is not None:
            return self._given_data
        return self.source.read()

    @param.depends("source.entry", watch=True)
    def _load(self):
        if self.running:
            return
        self.param.update(lattice=None, strain=None, progress=0, status="", error="")
        try:
            data = self.data()
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            self.param.update(vimage=None, error=self.source.error or f"Could not read the data set: {error_text(exc)}")
            return
        try:
            cal = data.calibration
            if cal is not None and cal.convergence_mrad and cal.pixel_size_mrad:
                v = as_numpy(data.virtual_image(0.0, cal.convergence_mrad))
            else:
                v = as_numpy(data.data.sum(axis=(2, 3)))
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            v = as_numpy(data.data.sum(axis=(2, 3)))
        self.param.update(vimage=np.asarray(v, float), reference=self._default_reference(data))
        reason = strain_available()
        if reason:
            self.error = reason

    @staticmethod
    def _default_reference(data):
        """The data set's declared reference region (attrs or truth ``reference`` mask), else None."""
        attrs = getattr(data, "attrs", {}) or {}
        reg = attrs.get("strain_reference_region")
        if reg is not None and np.ndim(reg) == 1 and len(reg) == 4:
            return tuple(int(v) for v in reg)
        truth = getattr(data, "truth", None)
        if truth is not None and "reference" in truth:
            m = np.asarray(truth["reference"].values).astype(bool)
            if m.any():
                ys, xs = np.nonzero(m)
                return (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        return None

    # ------------------------------------------------------------------ running
    def _callback(self, done, total, *_):
        self._done_total = (int(done), int(total))
        if self._cancel.is_set():
            raise StrainCancelled()

    def _sub_region(self, ref, stride):
        """Reference region (full-scan positions) as slices of the ``stride``-subsampled grid."""
        if ref is None:
            return None
        y0, y1, x0, x1 = ref
        up = lambda v: -(-int(v) // stride)  # noqa: E731 - ceil division
        ys = slice(up(y0), max(up(y1), up(y0) + 1))
        xs = slice(up(x0), max(up(x1), up(x0) + 1))
        return ys, xs

    def _run_inputs(self):
        """(array, calibration, truth) of the scan as mapped (subsampled by ``stride``)."""
        data = self.data()
        s = int(self.stride)
        cal = getattr(data, "calibration", None)
        truth = getattr(data, "truth", None)
        if s == 1:
            return data.data, cal, truth
        if cal is not None and cal.scan_step_nm:
            cal = cal.replace(scan_step_nm=cal.scan_step_nm * s)
        if truth is not None:
            truth = truth.isel(scan_y=slice(None, None, s), scan_x=slice(None, None, s))
        return data.data[::s, ::s], cal, truth

    def _compute(self):
        from ..strain import map_strain

        arr, cal, truth = self._run_inputs()
        self._pending_run = {"stride": int(self.stride), "calibration": cal, "truth": truth}
        return map_strain(arr, self._sub_region(self.reference, int(self.stride)), calibration=cal, method=self.method,
                          scheduler=self.scheduler, progress=False, callback=self._callback, refine=self.refine)

    def _begin(self):
        self._cancel.clear()
        self._done_total = (0, 0)
        self._t0 = time.perf_counter()
        self.param.update(running=True, error="", progress=0, status="starting…")

    def _sync_progress(self):
        done, total = self._done_total
        if total:
            self.progress = int(round(100 * done / total))
            self.status = f"{done}/{total} rows, {time.perf_counter() - self._t0:.0f} s"

    def _finish(self, ds=None, exc=None):
        el = time.perf_counter() - self._t0
        if exc is not None:
            if isinstance(exc, StrainCancelled) or self._cancel.is_set():
                self.param.update(running=False, status=f"Cancelled after {el:.0f} s.")
            else:
                log_exception(exc)
                self.param.update(running=False, status="", error=f"Strain mapping failed: {error_text(exc)}")
            return
        self._run = self._pending_run
        self.param.update(lattice=ds, strain=ds, running=False, progress=100,
                          status=f"Done: {ds.sizes.get('scan_y', '?')}×{ds.sizes.get('scan_x', '?')} patterns in {el:.1f} s "
                                 f"(disk model {ds.attrs.get('model') or '?'}).")

    def run(self):
        """Map strain now (blocking); returns the Dataset or None."""
        self._begin()
        try:
            ds = self._compute()
        except BaseException as exc:  # noqa: BLE001
            self._finish(exc=exc)
            return None
        self._sync_progress()
        self._finish(ds)
        return self.strain

    def show_result(self, ds, stride: int | None = None):
        """Show a :func:`diffkit.strain.map_strain` result computed elsewhere (mapped with ``stride``)."""
        if stride is not None:
            self.stride = int(stride)
        _, cal, truth = self._run_inputs()
        self._run = {"stride": int(self.stride), "calibration": cal, "truth": truth}
        self.param.update(lattice=ds, progress=100, status="result shown")
        self._rereference()
        return self

    async def run_async(self, poll_s: float = 0.25):
        if self.running:
            return self.strain
        self._begin()
        fut = asyncio.ensure_future(asyncio.to_thread(self._compute))
        while not fut.done():
            self._sync_progress()
            await asyncio.wait({fut}, timeout=poll_s)
        try:
            ds = fut.result()
        except BaseException as exc:  # noqa: BLE001
            self._finish(exc=exc)
            return None
        self._finish(ds)
        return self.strain

    async def _on_run(self, _event=None):
        await self.run_async()

    def cancel(self):
        if self.running:
            self._cancel.set()
            self.status = "cancelling…"

    @param.depends("running", watch=True)
    def _buttons(self):
        self._run_button.disabled = self.running
        self._cancel_button.disabled = not self.running

    @param.depends("progress", watch=True)
    def _bar(self):
        self._progress_bar.value = int(self.progress)

    # ------------------------------------------------------------------ reference region
    @param.depends("reference", watch=True)
    def _rereference(self):
        """Recompute the strain for a new reference region from the fitted lattices."""
        ds = self.lattice
        if ds is None:
            return
        try:
            from ..strain.lattice import region_mask
            from ..strain.mapping import strain_dataset

            shape = (ds.sizes["scan_y"], ds.sizes["scan_x"])
            mask = region_mask(self._sub_region(self.reference, self._run["stride"]), shape)
            fields = {k: ds[k].values for k in ("g1x", "g1y", "g2x", "g2y", "origin_x", "origin_y", "residual_px",
                                                "n_disks", "status")}
            out = strain_dataset(fields, mask, calibration=self._run["calibration"])
            out.attrs.update({k: v for k, v in ds.attrs.items() if k not in out.attrs})
            self.strain = out
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            self.error = f"Could not re-reference the strain: {error_text(exc)}"

    def select_bounds(self, bounds):
        """Reference region from a box selection ``(left, bottom, right, top)`` in scan coordinates."""
        if bounds is None or self.vimage is None:
            return
        xs, ys, _ = scan_axes(self.vimage.shape, getattr(self.data(), "calibration", None))
        l, b, r, t = bounds
        xin = np.nonzero((xs >= min(l, r)) & (xs <= max(l, r)))[0]
        yin = np.nonzero((ys >= min(b, t)) & (ys <= max(b, t)))[0]
        if len(xin) and len(yin):
            self.reference = (int(yin[0]), int(yin[-1]) + 1, int(xin[0]), int(xin[-1]) + 1)

    # ------------------------------------------------------------------ views
    def _ref_box(self, reference, vimage):
        import holoviews as hv

        if reference is None or vimage is None:
            return hv.Rectangles([])
        xs, ys, _ = scan_axes(vimage.shape, getattr(self.data(), "calibration", None))
        y0, y1, x0, x1 = reference
        dx = xs[1] - xs[0] if len(xs) > 1 else 1.0
        dy = ys[1] - ys[0] if len(ys) > 1 else 1.0
        return hv.Rectangles([(xs[x0] - dx / 2, ys[y0] - dy / 2, xs[x1 - 1] + dx / 2, ys[y1 - 1] + dy / 2)]).opts(
            fill_alpha=0.1, fill_color="lime", line_color="lime", line_width=2)

    def _vimage_element(self, vimage):
        import holoviews as hv

        if vimage is None:
            return hv.Image(np.zeros((2, 2)))
        xs, ys, unit = scan_axes(vimage.shape, getattr(self.data(), "calibration", None))
        return hv.Image((xs, ys, vimage), kdims=[hv.Dimension("x", label=f"scan x ({unit})"),
                                                 hv.Dimension("y", label=f"scan y ({unit})")],
                        vdims=[hv.Dimension("virtual_bf", label="virtual BF", unit="counts")])

    def _scan_view(self):
        import holoviews as hv
        from holoviews.operation.datashader import rasterize

        img = rasterize(hv.DynamicMap(pn.bind(self._vimage_element, self.param.vimage))).opts(
            cmap="gray", colorbar=True, frame_width=230, frame_height=230, invert_yaxis=True, framewise=True,
            tools=["hover", "box_select"], active_tools=["box_select"], clabel="counts",
            title="Virtual BF — box-select the reference region")
        sel = hv.streams.BoundsXY(source=img, bounds=None)
        sel.add_subscriber(lambda bounds=None: self.select_bounds(bounds))
        self._stream = sel
        return img * hv.DynamicMap(pn.bind(self._ref_box, self.param.reference, self.param.vimage))

    @param.depends("strain")
    def _maps_view(self):
        import holoviews as hv

        ds = self.strain
        if ds is None:
            return pn.pane.Markdown("Press **Run** to map the strain of the selected data set.",
                                    css_classes=["diffkit-empty"])
        cal = self._run["calibration"]
        xs, ys, unit = scan_axes((ds.sizes["scan_y"], ds.sizes["scan_x"]), cal)
        if unit == "position":
            xs, ys = xs * self._run["stride"], ys * self._run["stride"]
        kw = dict(x=xs, y=ys, xlabel=f"scan x ({unit})", ylabel=f"scan y ({unit})", frame_width=140)
        box = hv.DynamicMap(pn.bind(self._ref_box, self.param.reference, self.param.vimage))
        plots = [viz.image(ds[c], c, **kw) * box for c in COMPONENTS if c in ds]
        truth = self._run["truth"]
        if truth is not None and all(c in truth for c in COMPONENTS):
            for c in COMPONENTS:
                lim = viz.colour_limits(ds[c].values * viz.style(c)["scale"], "symmetric")
                plots.append(viz.image(truth[c], f"{c}_truth", clim=lim, **kw))
        return pn.pane.HoloViews(hv.Layout(plots).cols(4), css_classes=["diffkit-maps"])

    @param.depends("strain")
    def _summary(self):
        ds = self.strain
        if ds is None:
            return pn.pane.Markdown("")
        lines = []
        try:
            lines.append(calibration_text(self.data().calibration))
        except Exception:  # noqa: BLE001
            pass
        st = np.asarray(ds["status"].values)
        lines.append(f"fitted: {int((st == 0).sum())}/{st.size} patterns; method {ds.attrs.get('method', '?')}"
                     + (f"; every {self._run['stride']}th position" if self._run["stride"] > 1 else ""))
        truth = self._run["truth"]
        if truth is not None:
            rows = ["| component | RMSE vs truth |", "|---|---|"]
            for c in COMPONENTS:
                if c in truth and c in ds:
                    d = (ds[c].values - truth[c].values) * viz.style(c)["scale"]
                    d = d[np.isfinite(d)]
                    if d.size:
                        rows.append(f"| {viz.style(c)['label']} | {np.sqrt(np.mean(d ** 2)):.3f} {viz.style(c)['units']} |")
            lines.append("\n".join(rows))
        return pn.pane.Markdown("\n\n".join(lines), css_classes=["diffkit-summary"], width=520)

    @param.depends("error", "source.error")
    def _alerts(self):
        msgs = [m for m in dict.fromkeys((self.error, self.source.error)) if m]
        return pn.Column(*[pn.pane.Alert(m, alert_type="danger", css_classes=["diffkit-error"]) for m in msgs],
                         sizing_mode="stretch_width")

    def controls(self):
        src = source_widgets(self.source, self._given_data)
        w = pn.Param(self.param, parameters=["method", "refine", "stride"], show_name=False,
                     widgets={"stride": {"type": pn.widgets.IntSlider, "css_classes": ["diffkit-stride"]}})
        ref = pn.pane.Markdown(pn.bind(lambda r: "Reference region: " + (
            "whole scan" if r is None else f"y {r[0]}:{r[1]}, x {r[2]}:{r[3]}"), self.param.reference))
        reset = button("Whole scan as reference")
        reset.on_click(lambda *_: setattr(self, "reference", None))
        status = pn.pane.Markdown(self.param.status, css_classes=["diffkit-status"])
        return pn.Column(src, w, ref, reset, pn.Row(self._run_button, self._cancel_button), self._progress_bar,
                         status, sizing_mode="stretch_width")

    def main(self):
        return pn.Column(self._alerts, pn.Row(pn.pane.HoloViews(self._scan_view()), self._summary), self._maps_view,
                         sizing_mode="stretch_width")

    def __panel__(self):
        return pn.Row(pn.Column(self.controls(), width=320), self.main(), sizing_mode="stretch_width")

    def template(self, **kw):
        kw.setdefault("title", "diffkit · strain maps")
        kw.setdefault("accent", "#30638e")
        return pn.template.FastListTemplate(sidebar=[self.controls()], main=[self.main()], **kw)
