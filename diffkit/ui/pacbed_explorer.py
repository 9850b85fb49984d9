"""PACBED explorer: pick a region of a 4D-STEM scan, measure its thickness and mistilt live.

The component works the same in a notebook (``PacbedExplorer()`` as the last expression of a
cell) and in a served app (``PacbedExplorer().template().servable()``). All state lives in
``param`` parameters of the instance, so every session owns its own.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from .. import viz
from ._common import (CatalogSource, as_numpy, calibration_text, error_text, log_exception,
                      make_source, scan_axes, short_source, source_widgets)

#: Dose choices of the dose slider (electrons per frame; 0 = as recorded).
DOSES = {"as recorded": 0.0, "30": 30.0, "100": 100.0, "300": 300.0, "1k": 1e3, "3k": 3e3, "10k": 1e4,
         "30k": 3e4, "100k": 1e5}


def resample_dose(pattern: np.ndarray, dose_per_frame: float, n_frames: int, seed: int = 0) -> np.ndarray:
    """Poisson-resample a position-averaged pattern as if each of its ``n_frames`` frames had been
    recorded with ``dose_per_frame`` electrons.

    A sum of independent Poisson frames is Poisson with the summed mean, so the summed
    PACBED is drawn at once: ``Poisson(n_frames * dose * p) / n_frames`` with ``p`` the
    pattern normalised to unit sum. ``dose_per_frame <= 0`` returns the pattern unchanged.
    """
    p = np.asarray(pattern, dtype=np.float64)
    if not dose_per_frame or dose_per_frame <= 0:
        return p.astype(np.float32)
    total = p[np.isfinite(p)].clip(min=0).sum()
    if total <= 0:
        return p.astype(np.float32)
    lam = np.where(np.isfinite(p), p.clip(min=0), 0) / total * dose_per_frame * max(int(n_frames), 1)
    rng = np.random.default_rng(seed)
    return (rng.poisson(lam) / max(int(n_frames), 1)).astype(np.float32)


def band_mask_image(canonical: np.ndarray, inner_px: float, width_px: float) -> np.ndarray:
    """The canonical pattern with the annulus ``[inner, inner + width)`` (px) set to its mean,
    exactly as :meth:`diffkit.pacbed.PacbedPredictor.predict_batch` masks the network input."""
    c = np.asarray(canonical, dtype=np.float64)
    if width_px <= 0:
        return c
    n = c.shape[-1]
    v = np.arange(n) - (n - 1) / 2
    r = np.hypot(v[:, None], v[None, :])
    ring = (r >= inner_px) & (r < inner_px + width_px)
    if not ring.any():
        return c
    out = c.copy()
    out[ring] = c[ring].mean()
    return out


def sweep_aligned(predictor, canonical, background_strengths, masks) -> dict:
    """Thickness and tilt of one *aligned* pattern under several (background, mask) settings, in one batch.

    The alignment does not depend on the background or the mask, so a sensitivity sweep only
    repeats the measurement step of :meth:`~diffkit.pacbed.PacbedPredictor.predict_batch`
    (same background iteration and band-pass masking), batched over the settings. Returns
    ``{"thickness_nm", "thickness_std_nm", "tilt_magnitude_mrad"}`` arrays, one value per setting.
    """
    import torch

    from ..pacbed.networks import distribution_stats
    from ..pacbed.predictor import apply_band_mask

    strengths = torch.as_tensor(np.asarray(background_strengths, np.float32))
    B = len(strengths)
    dev = predictor.device
    strengths = strengths.to(dev)
    can = torch.as_tensor(np.asarray(canonical, np.float32), device=dev)[None].expand(B, -1, -1).contiguous()
    px = predictor.pixel_size_mrad
    mean_int = can.mean(dim=(1, 2))

    def network_input(bg):
        src = (can - (bg * mean_int)[:, None, None]).clamp_min(0) if bool((bg > 0).any()) else can
        rows = []
        for i, m in enumerate(masks):
            rows.append(apply_band_mask(src[i:i + 1], m[0] / px, m[1] / px) if m is not None else src[i:i + 1])
        return torch.cat(rows)

    tb, ab = predictor.measure_net.thickness_bins, predictor.measure_net.tilt_bins
    with torch.no_grad():
        bg = torch.zeros(B, device=dev)
        out = predictor._measure(network_input(bg))
        if bool((strengths > 0).any()):
            for _ in range(6):
                _, t_est, _ = distribution_stats(out["thickness"], tb)
                bg_new = strengths * t_est
                out = predictor._measure(network_input(bg_new))
                done = torch.allclose(bg_new, bg, atol=1e-3)
                bg = bg_new
                if done:
                    break
        _, t, t_std = distribution_stats(out["thickness"], tb)
        _, tx, _ = distribution_stats(out["tilt_x"], ab)
        _, ty, _ = distribution_stats(out["tilt_y"], ab)
    return {"thickness_nm": t.cpu().numpy(), "thickness_std_nm": t_std.cpu().numpy(),
            "tilt_magnitude_mrad": torch.hypot(tx, ty).cpu().numpy()}


class PacbedExplorer(Viewer):
    """Interactive thickness/tilt measurement of the PACBED of a chosen scan region.

    Parameters
    ----------
    catalog : str, optional
        Catalog path or URL (default: the demo catalog); any catalog opens through the safe
        loader :func:`diffkit.catalog.open_catalog`, errors are shown in the UI.
    entry : str, optional
        Data set to show first.
    data : diffkit.data.FourDSTEM, optional
        Explore this scan instead of a catalog entry.
    predictor : PacbedPredictor, optional
        Network to use (default: the shipped model matching the scan's calibration).

    Examples
    --------
    >>> ex = PacbedExplorer(entry="sto_pacbed_wedge")   # doctest: +SKIP
    >>> ex.param.update(region=(10, 15, 20, 25), mask_inner_mrad=8.0, mask_width_mrad=4.0)  # doctest: +SKIP
    >>> ex.result["thickness_nm"]   # doctest: +SKIP
    """

    source = param.ClassSelector(class_=CatalogSource, doc="Catalog and entry")
    region = param.Tuple(default=(0, 1, 0, 1), length=4,
                         doc="Scan region (y0, y1, x0, x1), half-open scan positions, averaged into the PACBED")
    window = param.Integer(default=5, bounds=(1, 25), doc="Size (positions) of the region a tap selects")
    background = param.Number(default=0.0, bounds=(0.0, 0.02), step=0.0005,
                              label="Background (× mean per nm)")
    mask_inner_mrad = param.Number(default=0.0, bounds=(0.0, 40.0), step=0.5, label="Mask inner radius (mrad)")
    mask_width_mrad = param.Number(default=0.0, bounds=(0.0, 20.0), step=0.5, label="Mask width (mrad, 0 = off)")
    dose = param.Selector(default=0.0, objects=DOSES, label="Dose (e⁻/frame)")
    seed = param.Integer(default=0, bounds=(0, None), label="Noise seed")
    sensitivity = param.Boolean(default=True, label="Sensitivity curves")

    # outputs (read-only for users)
    message = param.String(default="", precedence=-1)
    pattern = param.Array(default=None, precedence=-1, doc="PACBED of the region after dose resampling")
    result = param.Dict(default={}, precedence=-1, doc="Measurement of the current pattern")
    mask_curve = param.DataFrame(default=None, precedence=-1)
    background_curve = param.DataFrame(default=None, precedence=-1)
    vbf = param.Array(default=None, precedence=-1, doc="Virtual bright-field image of the scan")

    def __init__(self, catalog: str | None = None, entry: str | None = None, data=None, predictor=None, **params):
        self._data = None
        self._given_data = data
        self._given_predictor = predictor
        self._predictor = None
        self._n_frames = 1
        self._pattern_version = 0
        self._keys = {}
        self._initial_region = params.get("region")
        if "source" not in params:
            params["source"] = make_source(catalog, entry, "sto_pacbed_wedge", data)
        super().__init__(**params)
        self._load()

    # ------------------------------------------------------------------ data
    @param.depends("source.entry", watch=True)
    def _load(self):
        """(Re)load the scan, its virtual bright field and the model; select the centre window."""
        self._data = None
        self._predictor = None
        self.message = ""
        try:
            data = self._given_data if self._given_data is not None else self.source.read()
        except Exception as exc:  # noqa: BLE001 - shown in the UI
            log_exception(exc)
            self.message = self.source.error or f"Could not read {self.source.entry!r}: {error_text(exc)}"
            self.param.update(vbf=None, pattern=None, result={})
            return
        self._data = data
        sy, sx = data.data.shape[:2]
        cal = data.calibration
        try:
            if cal is not None and cal.convergence_mrad and cal.pixel_size_mrad:
                vbf = as_numpy(data.virtual_image(0.0, cal.convergence_mrad))
            else:
                vbf = as_numpy(data.data.sum(axis=(2, 3)))
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            vbf = as_numpy(data.data.sum(axis=(2, 3)))
        try:
            self._predictor = self._given_predictor or self._load_predictor(cal)
        except Exception as exc:  # noqa: BLE001 - no model for this calibration
            log_exception(exc)
            self.message = f"No PACBED model for this data set: {error_text(exc)}"
        if self._predictor is not None:
            half = round(self._predictor.n_px / 2 * self._predictor.pixel_size_mrad, 1)
            self.param.mask_inner_mrad.bounds = (0.0, half)
            self.param.mask_width_mrad.bounds = (0.0, half)
        w = min(self.window, sy, sx)
        y0, x0 = (sy - w) // 2, (sx - w) // 2
        self._keys = {}
        self.vbf = vbf.astype(np.float64)
        region = (y0, y0 + w, x0, x0 + w)
        if self._initial_region is not None:  # a region given to the constructor wins (once)
            region = self._clip_region(self._initial_region)
            self._initial_region = None
        if region != tuple(self.region):
            self.region = region  # triggers _update_pattern
        else:
            self._update_pattern()

    @staticmethod
    def _load_predictor(cal):
        from ..pacbed import load_predictor

        return load_predictor(cal)

    @property
    def data(self):
        """The scan being explored (``None`` when it could not be read)."""
        return self._data

    @property
    def predictor(self):
        return self._predictor

    @property
    def pixel_size_mrad(self):
        cal = getattr(self._data, "calibration", None)
        return getattr(cal, "pixel_size_mrad", None)

    def _clip_region(self, region):
        sy, sx = self._data.data.shape[:2]
        y0, y1, x0, x1 = (int(v) for v in region)
        y0, x0 = max(0, min(y0, sy - 1)), max(0, min(x0, sx - 1))
        y1, x1 = max(y0 + 1, min(y1, sy)), max(x0 + 1, min(x1, sx))
        return (y0, y1, x0, x1)

    @param.depends("region", "dose", "seed", watch=True)
    def _update_pattern(self):
        if self._data is None:
            return
        region = self._clip_region(self.region)
        if region != tuple(self.region):
            self.region = region  # re-enters once with the clipped region
            return
        y0, y1, x0, x1 = region
        try:
            raw = as_numpy(self._data.pacbed(y=slice(y0, y1), x=slice(x0, x1)))
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            self.message = f"Could not form the PACBED: {error_text(exc)}"
            return
        self._n_frames = (y1 - y0) * (x1 - x0)
        self._pattern_version += 1
        self.pattern = resample_dose(raw, self.dose, self._n_frames, self.seed)

    # ------------------------------------------------------------------ measurement
    @property
    def mask(self):
        """``(inner_mrad, width_mrad)`` or ``None`` when the width is 0."""
        return (float(self.mask_inner_mrad), float(self.mask_width_mrad)) if self.mask_width_mrad > 0 else None

    def _predict_one(self, pattern, background, mask, distributions=False):
        return self._predictor.predict_batch(np.asarray(pattern, np.float32)[None], background_strength=background,
                                             mask=mask, pixel_size_mrad=self.pixel_size_mrad,
                                             return_distributions=distributions)

    @param.depends("pattern", "background", "mask_inner_mrad", "mask_width_mrad", watch=True)
    def _predict(self):
        if self.pattern is None or self._predictor is None:
            self.result = {}
            return
        key = (self._pattern_version, float(self.background), self.mask)
        if self._keys.get("result") == key and self.result:
            return  # e.g. the inner radius moved while the mask is off
        self._keys["result"] = key
        try:
            r = self._predict_one(self.pattern, self.background, self.mask, distributions=True)
        except Exception as exc:  # noqa: BLE001
            log_exception(exc)
            self.message = f"Measurement failed: {error_text(exc)}"
            self.result = {}
            return
        res = {k: (v[0] if isinstance(v, np.ndarray) and v.ndim >= 1 and k != "thickness_bins_nm" else v)
               for k, v in r.items() if k != "alternatives"}
        res["thickness_bins_nm"] = r["thickness_bins_nm"]
        res["alternatives"] = (r["alternatives"][0][0], r["alternatives"][1][0])
        can = r["canonical"][0].astype(np.float64)
        bg = float(r["background_fraction"][0])
        net_in = np.clip(can - bg * can.mean(), 0, None) if bg > 0 else can
        if self.mask is not None:
            px = self._predictor.pixel_size_mrad
            net_in = band_mask_image(net_in, self.mask[0] / px, self.mask[1] / px)
        res["canonical"] = can
        res["network_input"] = net_in
        res["settings"] = {"background": float(self.background), "mask": self.mask, "dose": float(self.dose),
                           "region": tuple(self.region)}
        res["canonical_pixel_size_mrad"] = float(self._predictor.pixel_size_mrad)
        if not self.message.startswith(("No PACBED model", "Could not")):
            self.message = ""
        mc, bc = self._sensitivity_curves(res)
        self.param.update(result=res, mask_curve=mc, background_curve=bc)  # numbers and curves change together

    def _inner_radii(self, width):
        """Inner radii of the mask sweep: from 0 until the ring leaves the network's field of view."""
        half = self._predictor.n_px / 2 * self._predictor.pixel_size_mrad
        return np.round(np.linspace(0.0, max(half - width, 1.0), 12), 2)

    @param.depends("sensitivity", watch=True)
    def _sensitivity(self):
        """Thickness vs mask inner radius (current width) and vs background strength (current mask)."""
        mc, bc = self._sensitivity_curves(self.result)
        self.param.update(mask_curve=mc, background_curve=bc)

    def _sensitivity_curves(self, result):
        """``(mask_curve, background_curve)`` for a measurement, reusing curves whose inputs did not change."""
        if not self.sensitivity or not result or self.pattern is None:
            self._keys.pop("mask_curve", None)
            self._keys.pop("background_curve", None)
            return None, None
        width = float(self.mask_width_mrad) or 2.0
        mkey = (self._pattern_version, float(self.background), width)
        bkey = (self._pattern_version, self.mask)
        mc, bc = self.mask_curve, self.background_curve
        if self._keys.get("mask_curve") != mkey or mc is None:
            mc = self._mask_sweep(result["canonical"], width)
            self._keys["mask_curve"] = mkey
        if self._keys.get("background_curve") != bkey or bc is None:
            bc = self._background_sweep(result["canonical"])
            self._keys["background_curve"] = bkey
        return mc, bc

    def _mask_sweep(self, canonical, width):
        radii = self._inner_radii(width)
        out = sweep_aligned(self._predictor, canonical, [self.background] * len(radii),
                            [(float(r), width) for r in radii])
        mc = pd.DataFrame({"inner_mrad": radii, **out})
        mc.attrs["width_mrad"] = width
        return mc

    def _background_sweep(self, canonical):
        strengths = np.linspace(0.0, self.param.background.bounds[1], 9)
        out = sweep_aligned(self._predictor, canonical, strengths, [self.mask] * len(strengths))
        return pd.DataFrame({"background": strengths, **out})

    # ------------------------------------------------------------------ interaction
    def select_point(self, x, y):
        """Select the ``window``-sized region centred on scan coordinates (x, y) (as shown on the image)."""
        if self._data is None or x is None or y is None:
            return
        sy, sx = self._data.data.shape[:2]
        xs, ys, _ = scan_axes((sy, sx), self._data.calibration)
        ix, iy = viz.nearest_index(xs, x), viz.nearest_index(ys, y)
        w = min(self.window, sy, sx)
        y0 = min(max(iy - w // 2, 0), sy - w)
        x0 = min(max(ix - w // 2, 0), sx - w)
        self.region = (y0, y0 + w, x0, x0 + w)

    def select_bounds(self, bounds):
        """Select the positions inside ``(left, bottom, right, top)`` scan coordinates (a box selection)."""
        if self._data is None or bounds is None:
            return
        sy, sx = self._data.data.shape[:2]
        xs, ys, _ = scan_axes((sy, sx), self._data.calibration)
        l, b, r, t = bounds
        xin = np.nonzero((xs >= min(l, r)) & (xs <= max(l, r)))[0]
        yin = np.nonzero((ys >= min(b, t)) & (ys <= max(b, t)))[0]
        if not len(xin) or not len(yin):
            self.select_point((l + r) / 2, (b + t) / 2)
            return
        self.region = (int(yin[0]), int(yin[-1]) + 1, int(xin[0]), int(xin[-1]) + 1)

    # ------------------------------------------------------------------ views
    def _scan_image(self, vbf):
        import holoviews as hv

        if vbf is None:
            return hv.Image(np.zeros((2, 2))).opts(title="no data")
        xs, ys, unit = scan_axes(vbf.shape, self._data.calibration)
        img = hv.Image((xs, ys, vbf), kdims=[hv.Dimension("x", label=f"scan x ({unit})"),
                                               hv.Dimension("y", label=f"scan y ({unit})")],
                       vdims=[hv.Dimension("virtual_bf", label="virtual BF", unit="counts")])
        return img

    def _region_box(self, region, vbf):
        import holoviews as hv

        if self._data is None or vbf is None:
            return hv.Rectangles([])
        xs, ys, _ = scan_axes(vbf.shape, self._data.calibration)
        y0, y1, x0, x1 = region
        dx = xs[1] - xs[0] if len(xs) > 1 else 1.0
        dy = ys[1] - ys[0] if len(ys) > 1 else 1.0
        return hv.Rectangles([(xs[x0] - dx / 2, ys[y0] - dy / 2, xs[x1 - 1] + dx / 2, ys[y1 - 1] + dy / 2)]).opts(
            fill_alpha=0.15, fill_color="cyan", line_color="cyan", line_width=2)

    def _scan_view(self):
        import holoviews as hv
        from holoviews.operation.datashader import rasterize

        img = rasterize(hv.DynamicMap(pn.bind(self._scan_image, self.param.vbf))).opts(
            cmap="gray", colorbar=False, frame_width=210, data_aspect=1, invert_yaxis=True, framewise=True,
            tools=["hover", "tap", "box_select"], active_tools=["tap"], title="Virtual BF: tap or box-select")
        box = hv.DynamicMap(pn.bind(self._region_box, self.param.region, self.param.vbf))
        tap = hv.streams.Tap(source=img, x=None, y=None)
        sel = hv.streams.BoundsXY(source=img, bounds=None)
        tap.add_subscriber(lambda x=None, y=None: self.select_point(x, y))
        sel.add_subscriber(lambda bounds=None: self.select_bounds(bounds))
        self._streams = (tap, sel)
        return img * box

    def _raw_element(self, pattern):
        import holoviews as hv

        if pattern is None:
            return hv.Image(np.zeros((2, 2))).opts(title="no pattern")
        y0, y1, x0, x1 = self.region
        dose = "" if not self.dose else f", {self.dose:g} e⁻/frame"
        return viz.pattern_image(pattern, self.pixel_size_mrad, rasterized=False, frame_width=200,
                                 label=f"PACBED of {y1 - y0}×{x1 - x0} positions{dose}")

    def _net_element(self, result):
        import holoviews as hv

        if not result:
            return hv.Image(np.zeros((2, 2))).opts(title="no measurement") * hv.Overlay([])
        px = result["canonical_pixel_size_mrad"]
        st = result["settings"]
        bits = []
        if st["background"]:
            bits.append(f"bg −{result['background_fraction']:.3f}")
        if st["mask"] is not None:
            bits.append(f"mask {st['mask'][0]:g}+{st['mask'][1]:g} mrad")
        title = "Network input" + (f" ({', '.join(bits)})" if bits else " (aligned)")
        img = viz.pattern_image(result["network_input"], px, rasterized=False, frame_width=200, label=title,
                                units="a.u.")
        rings = []
        if st["mask"] is not None:
            for r in (st["mask"][0], st["mask"][0] + st["mask"][1]):
                if r > 0:
                    rings.append(hv.Ellipse(0, 0, 2 * r).opts(color="cyan", line_dash="dashed", line_width=1.5))
        return img * hv.Overlay(rings)

    # The numbers, alternatives and status are stable panes whose *contents* follow the result
    # (bound functions): replacing whole Bokeh models on every slider step races with the browser
    # ("reference ... isn't known") when updates arrive in quick succession.
    def _numbers_text(self, result, message=""):
        r = result
        if not r:
            return "*No measurement.*" if not message else ""
        lines = [
            "| quantity | value |", "|---|---|",
            f"| **thickness** | **{r['thickness_nm']:.1f} ± {r['thickness_std_nm']:.1f} nm** "
            f"(68 %: {r['thickness_lo68_nm']:.1f}–{r['thickness_hi68_nm']:.1f}) |",
            f"| tilt x | {r['tilt_x_mrad']:+.2f} ± {r['tilt_x_std_mrad']:.2f} mrad |",
            f"| tilt y | {r['tilt_y_mrad']:+.2f} ± {r['tilt_y_std_mrad']:.2f} mrad |",
            f"| tilt magnitude | {r['tilt_magnitude_mrad']:.2f} mrad at {r['tilt_azimuth_deg']:.0f}° |",
            f"| confidence (±1 nm) | {r['confidence']:.2f} |",
        ]
        if "rotation_deg" in r:  # the crystal axes the tilt refers to; uncertain in thin regions
            rs = float(r.get("rotation_std_deg", np.nan))
            spread = f" ± {rs:.1f}°" if np.isfinite(rs) else ""
            lines.append(f"| pattern rotation | {r['rotation_deg']:+.1f}°{spread} |")
        st = r["settings"]
        if st["background"]:
            lines.append(f"| background removed | {r['background_fraction']:.3f} × mean |")
        mask = "off" if st["mask"] is None else f"{st['mask'][0]:g} + {st['mask'][1]:g} mrad"
        dose = "as recorded" if not st["dose"] else f"{st['dose']:g} e⁻/frame"
        lines.append(f"| settings | background {st['background']:.4f}, mask {mask}, dose {dose} |")
        return "\n".join(lines)

    @staticmethod
    def _alternatives_table(result) -> pd.DataFrame:
        cols = ["rank", "thickness (nm)", "probability (±1 nm)"]
        if not result:
            return pd.DataFrame({c: [] for c in cols})
        vals, probs = result["alternatives"]
        df = pd.DataFrame({cols[0]: np.arange(1, len(vals) + 1), cols[1]: np.round(vals, 1),
                           cols[2]: np.round(probs, 3)})
        return df[np.isfinite(df[cols[1]])]

    @staticmethod
    def _ood_text(result) -> str:
        from ..pacbed import OOD_REASONS

        if not result or not bool(result.get("ood")):
            return ""
        reason = OOD_REASONS.get(int(result.get("ood_reason", 1)), "unknown reason")
        return f"**Out of distribution:** {reason}. Treat this measurement with caution."

    def _numbers_pane(self):
        return pn.pane.Markdown(pn.bind(self._numbers_text, self.param.result, self.param.message),
                                sizing_mode="stretch_width", css_classes=["pacbed-numbers"], name="numbers")

    def _alternatives_pane(self):
        return pn.Column(pn.pane.Markdown("**Top alternatives**", margin=(0, 5)),
                         pn.pane.DataFrame(pn.bind(self._alternatives_table, self.param.result), index=False,
                                           sizing_mode="stretch_width"),
                         visible=pn.bind(bool, self.param.result))

    def _status_pane(self):
        error = pn.pane.Alert(self.param.message, alert_type="danger", css_classes=["diffkit-error"],
                              visible=pn.bind(bool, self.param.message), sizing_mode="stretch_width")
        ood_text = pn.bind(self._ood_text, self.param.result)
        ood = pn.pane.Alert(ood_text, alert_type="warning", css_classes=["diffkit-ood"],
                            visible=pn.bind(lambda r: bool(self._ood_text(r)), self.param.result),
                            sizing_mode="stretch_width")
        return pn.Column(error, ood, sizing_mode="stretch_width")

    def _distribution_element(self, result):
        import holoviews as hv

        if not result or "p_thickness" not in result:
            return hv.Curve([]).opts(title="p(thickness)")
        t = result["thickness_bins_nm"]
        p = result["p_thickness"]
        curve = hv.Area((t, p), hv.Dimension("t", label="thickness", unit="nm"),
                        hv.Dimension("p", label="probability")).opts(alpha=0.5, color="#30638e")
        vl = hv.VLine(result["thickness_nm"]).opts(color="black", line_dash="dashed")
        mass = np.nonzero(p > 1e-3 * p.max())[0]
        lo, hi = float(t[mass[0]]), float(t[mass[-1]])
        centre = float(result["thickness_nm"])
        lo, hi = max(float(t[0]), min(lo, centre - 5) - 2), min(float(t[-1]), max(hi, centre + 5) + 2)
        return (curve * vl).opts(width=380, height=230, title="Thickness distribution", tools=["hover"],
                                 framewise=True, xlim=(lo, hi))

    def _settings(self, result=None) -> dict:
        """Mask and background settings of ``result`` (or the current result)."""
        return (result or self.result or {}).get("settings", {"mask": None, "background": 0.0})

    def _mask_sensitivity_element(self, mask_curve, result=None):
        import holoviews as hv

        mdim = hv.Dimension("inner_mrad", label="mask inner radius", unit="mrad")
        tdim = hv.Dimension("thickness_nm", label="thickness", unit="nm")
        st = self._settings(result)
        if mask_curve is None:
            m, me, title = hv.Curve([], mdim, tdim), hv.Spread([], mdim, [tdim, "thickness_std_nm"]), "Mask sensitivity"
        else:
            m = hv.Curve(mask_curve, mdim, [tdim, "thickness_std_nm"])
            me = hv.Spread(mask_curve, mdim, [tdim, "thickness_std_nm"])
            title = f"Mask sensitivity (width {mask_curve.attrs.get('width_mrad', 0):g} mrad)"
        # the marker is always there (invisible without a mask): the plot keeps its structure
        mark = hv.VLine(st["mask"][0] if st["mask"] is not None else 0.0).opts(
            color="red", line_width=1.5, alpha=1.0 if st["mask"] is not None else 0.0)
        return hv.Overlay([me.opts(alpha=0.2, color="#30638e"), m.opts(color="#30638e", tools=["hover"]), mark]).opts(
            width=380, height=230, framewise=True, title=title)

    def _background_sensitivity_element(self, background_curve, result=None):
        import holoviews as hv

        bdim = hv.Dimension("background", label="background strength", unit="mean/nm")
        tdim = hv.Dimension("thickness_nm", label="thickness", unit="nm")
        st = self._settings(result)
        if background_curve is None:
            b, be = hv.Curve([], bdim, tdim), hv.Spread([], bdim, [tdim, "thickness_std_nm"])
        else:
            b = hv.Curve(background_curve, bdim, [tdim, "thickness_std_nm"])
            be = hv.Spread(background_curve, bdim, [tdim, "thickness_std_nm"])
        return hv.Overlay([be.opts(alpha=0.2, color="#d1495b"), b.opts(color="#d1495b", tools=["hover"]),
                           hv.VLine(st["background"]).opts(color="red", line_width=1.5)]).opts(
            width=380, height=230, framewise=True, title="Background sensitivity")

    def controls(self):
        """The widgets (for a sidebar)."""
        src = source_widgets(self.source, self._given_data)
        w = pn.Param(self.param, parameters=["window", "background", "mask_inner_mrad", "mask_width_mrad", "dose",
                                             "seed", "sensitivity"], show_name=False,
                     widgets={"window": {"type": pn.widgets.IntSlider, "throttled": True,
                                         "css_classes": ["diffkit-window"]},
                              "background": {"type": pn.widgets.FloatSlider, "throttled": True, "format": "0.0000",
                                             "css_classes": ["diffkit-background"]},
                              "mask_inner_mrad": {"type": pn.widgets.FloatSlider, "throttled": True,
                                                  "css_classes": ["diffkit-mask-inner"]},
                              "mask_width_mrad": {"type": pn.widgets.FloatSlider, "throttled": True,
                                                  "css_classes": ["diffkit-mask-width"]},
                              "dose": {"type": pn.widgets.DiscreteSlider, "css_classes": ["diffkit-dose"]}})
        return pn.Column(src, w, sizing_mode="stretch_width")

    def main(self):
        """The plots and numbers (for the main area)."""
        import holoviews as hv

        info = pn.pane.Markdown(pn.bind(self._info, self.source.param.entry, self.param.region), margin=(0, 10))
        raw = hv.DynamicMap(pn.bind(self._raw_element, self.param.pattern))
        net = hv.DynamicMap(pn.bind(self._net_element, self.param.result))
        dist = hv.DynamicMap(pn.bind(self._distribution_element, self.param.result))
        # two DynamicMaps: a new curve updates the plots' data instead of replacing the models
        sens = (hv.DynamicMap(pn.bind(self._mask_sensitivity_element, self.param.mask_curve, self.param.result))
                + hv.DynamicMap(pn.bind(self._background_sensitivity_element, self.param.background_curve,
                                        self.param.result))).opts(shared_axes=False)
        top = pn.Row(pn.pane.HoloViews(self._scan_view(), css_classes=["diffkit-scan"]),
                     pn.pane.HoloViews(raw, css_classes=["diffkit-pattern"]),
                     pn.pane.HoloViews(net, css_classes=["diffkit-network-input"]))
        numbers = pn.Row(pn.Column(self._numbers_pane(), width=420), pn.Column(self._alternatives_pane(), width=300))
        middle = pn.Row(numbers, pn.pane.HoloViews(dist, css_classes=["diffkit-distribution"]))
        bottom = pn.pane.HoloViews(sens, css_classes=["diffkit-sensitivity"])
        return pn.Column(self._status_pane(), info, top, middle, bottom, sizing_mode="stretch_width")

    def _info(self, entry, region):
        if self._data is None:
            return ""
        y0, y1, x0, x1 = region
        src = self.source.describe.get(entry or "", "") or short_source(getattr(self._data, "source", ""))
        model = getattr(self._predictor, "card_id", "none")
        return (f"**{entry or 'data'}** — {src}  \n{calibration_text(self._data.calibration)}  \n"
                f"region y {y0}:{y1}, x {x0}:{x1} ({(y1 - y0) * (x1 - x0)} frames) · model `{model}`")

    def __panel__(self):
        return pn.Row(pn.Column(self.controls(), width=320), self.main(), sizing_mode="stretch_width")

    def template(self, **kw):
        """A :class:`panel.template.FastListTemplate` with the controls in the sidebar (served apps)."""
        kw.setdefault("title", "diffkit · PACBED explorer")
        kw.setdefault("accent", "#30638e")
        return pn.template.FastListTemplate(sidebar=[self.controls()], main=[self.main()], **kw)
