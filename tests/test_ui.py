"""Dashboard components (diffkit.ui) and map helpers (diffkit.viz), without a browser.

Parameter changes must recompute the outputs, a cancelled map must stop, long work must not
block the event loop, and two component instances (two browser sessions) must not share state.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import time

import numpy as np
import pytest

pytest.importorskip("panel")
pytest.importorskip("holoviews")
pytest.importorskip("datashader")

import holoviews as hv  # noqa: E402
import xarray as xr  # noqa: E402

from diffkit import viz  # noqa: E402
from diffkit.calibration import Calibration  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = pathlib.Path(os.environ.get("DIFFKIT_CATALOG") or ROOT / "catalogs" / "demo.yaml")  # as the dashboards
CAL = Calibration(beam_energy_kv=200, convergence_mrad=13.6, material="SrTiO3", zone_axis="001")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def predictor():
    from diffkit.errors import ModelNotFoundError
    from diffkit.pacbed import load_predictor

    try:
        return load_predictor(CAL, device="cpu")
    except ModelNotFoundError as exc:
        pytest.skip(f"no shipped 13.6 mrad SrTiO3 PACBED model: {exc}")


@pytest.fixture(scope="module")
def scan():
    """A 15x15-position corner of the demo wedge scan (with its ground truth)."""
    if not DEMO.exists():
        pytest.skip("demo catalog catalogs/demo.yaml not found")
    from diffkit.catalog import open_catalog

    try:
        full = open_catalog(str(DEMO))["sto_pacbed_wedge"].read()
    except Exception as exc:  # noqa: BLE001 - data files generated separately
        pytest.skip(f"demo entry sto_pacbed_wedge not readable: {exc}")
    return full.crop(slice(0, 15), slice(0, 15))


@pytest.fixture()
def explorer(scan, predictor):
    from diffkit.ui import PacbedExplorer

    return PacbedExplorer(data=scan, predictor=predictor)


def _render(obj):
    """Build the Bokeh model of a Panel/HoloViews object (as a served page would)."""
    import panel as pn

    return pn.panel(obj).get_root()


# --------------------------------------------------------------------------- viz helpers

def test_styles_units_and_cyclic_azimuth_colormap():
    import colorcet

    az = viz.style("tilt_azimuth_deg")
    assert az["cmap"] == viz.CYCLIC_CMAP and viz.CYCLIC_CMAP in colorcet.cm
    assert az["clim"] == (0.0, 360.0) and az["aggregator"] == "first"  # never averaged across 0/360
    assert viz.style("thickness_nm")["units"] == "nm"
    err = viz.style("thickness_nm_error")
    assert err["clim"] == "symmetric" and "true" in err["label"]
    assert viz.style("exx")["scale"] == 100.0 and viz.style("exx")["units"] == "%"


def test_colour_limits():
    v = np.r_[np.linspace(-1, 3, 101), np.nan]
    lo, hi = viz.colour_limits(v, "symmetric")
    assert lo == -hi and 2.9 < hi <= 3
    assert viz.colour_limits(v, "robust0")[0] == -1.0
    assert viz.colour_limits(np.full(4, np.nan)) == (0.0, 1.0)
    assert viz.colour_limits(np.ones(5))[1] > 1.0  # never an empty range


def test_map_image_is_rasterized_with_hover_and_colorbar():
    from bokeh.models import ColorBar, HoverTool

    y = np.arange(6) * 2.0
    x = np.arange(8) * 2.0
    da = xr.DataArray(np.random.default_rng(0).uniform(0, 360, (6, 8)), dims=("y", "x"),
                      coords={"y": ("y", y, {"units": "nm"}), "x": ("x", x, {"units": "nm"})}, name="tilt_azimuth_deg")
    img = viz.image(da)
    assert isinstance(img, hv.DynamicMap)  # rasterize() wraps the image
    plot = hv.renderer("bokeh").get_plot(img)
    fig = plot.state
    assert any(isinstance(t, HoverTool) for t in fig.tools)
    assert any(isinstance(r, ColorBar) for r in fig.right)
    cm = plot.handles["color_mapper"]
    assert (cm.low, cm.high) == (0.0, 360.0)
    el = img[()]
    assert el.dimension_values(2).size == 48  # small maps are not upsampled
    assert "nm" in fig.xaxis[0].axis_label


def test_pattern_image_axes_in_mrad():
    p = np.random.default_rng(1).poisson(50, (32, 32)).astype(float)
    el = viz.pattern_image(p, pixel_size_mrad=0.5, rasterized=False)
    x0, y0, x1, y1 = el.bounds.lbrt()
    assert np.isclose(x1 - x0, 16.0) and np.isclose(x0, -x1)


def test_truth_on_map_grid_and_errors():
    ty, tx = np.meshgrid(np.arange(10.0), np.arange(12.0), indexing="ij")
    truth = xr.Dataset({"thickness_nm": (("scan_y", "scan_x"), 20 + tx), "tilt_x_mrad": (("scan_y", "scan_x"), 0 * tx + 1.0),
                        "tilt_y_mrad": (("scan_y", "scan_x"), 0 * tx - 1.0)})
    maps = xr.Dataset({"thickness_nm": (("y", "x"), np.full((2, 3), 25.0)),
                       "tilt_azimuth_deg": (("y", "x"), np.full((2, 3), 10.0))},
                      coords={"y": [0.0, 8.0], "x": [0.0, 8.0, 16.0]}, attrs={"window": "[4, 4]", "step": "[4, 4]"})
    tg = viz.truth_on_map_grid(truth, maps)
    np.testing.assert_allclose(tg["thickness_nm"].values[0], [21.5, 25.5, 29.5])
    np.testing.assert_allclose(tg["tilt_azimuth_deg"].values, 315.0)
    err = viz.errors_vs_truth(maps, tg)
    np.testing.assert_allclose(err["thickness_nm_error"].values[0], [3.5, -0.5, -4.5])
    np.testing.assert_allclose(err["tilt_azimuth_deg_error"].values, 55.0)  # wrapped, not -305
    assert viz.window_slices(maps, 1, 2) == (slice(4, 8), slice(8, 12))


# --------------------------------------------------------------------------- explorer helpers (no model)

def test_resample_dose_is_poisson_with_summed_dose():
    from diffkit.ui.pacbed_explorer import resample_dose

    p = np.ones((40, 40))
    np.testing.assert_array_equal(resample_dose(p, 0, 25), p.astype(np.float32))  # 0 = as recorded
    a = resample_dose(p, 160.0, 25, seed=3)
    b = resample_dose(p, 160.0, 25, seed=3)
    np.testing.assert_array_equal(a, b)  # seeded
    counts = a * 25  # summed counts: Poisson with mean 25 frames x 160 e- / 1600 px = 2.5 per pixel
    assert abs(counts.mean() - 2.5) < 0.15 and abs(counts.var() - 2.5) < 0.4
    assert np.allclose(counts, np.round(counts))


def test_band_mask_image_matches_network_masking():
    import torch

    from diffkit.pacbed.predictor import apply_band_mask
    from diffkit.ui.pacbed_explorer import band_mask_image

    c = np.random.default_rng(2).uniform(0, 1, (32, 32))
    ref = apply_band_mask(torch.as_tensor(c, dtype=torch.float32)[None], 5.0, 3.0)[0].numpy()
    np.testing.assert_allclose(band_mask_image(c, 5.0, 3.0), ref, rtol=1e-5)
    np.testing.assert_array_equal(band_mask_image(c, 5.0, 0.0), c)


def test_serve_rejects_unknown_app_and_lists_apps():
    from diffkit.ui import APPS, serve

    assert set(APPS) == {"pacbed_explorer", "maps", "strain"}
    with pytest.raises(ValueError, match="pacbed_explorer"):
        serve(apps=["nope"])


def test_serve_binds_localhost_by_default():
    import inspect

    from diffkit.ui import serve

    assert inspect.signature(serve).parameters["address"].default == "127.0.0.1"


def test_serve_threaded_answers_on_localhost():
    import socket
    import urllib.request

    from diffkit.ui import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = serve(apps=["strain"], port=port, threaded=True)
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/strain", timeout=60) as r:
                    assert r.status == 200 and "bokeh" in r.read().decode().lower()
                break
            except OSError:
                assert time.time() - t0 < 60
                time.sleep(0.3)
    finally:
        server.stop()


def test_bad_catalog_is_reported_not_raised(tmp_path):
    pytest.importorskip("diffkit.catalog")
    from diffkit.ui import CatalogSource

    src = CatalogSource(catalog_path=str(tmp_path / "missing.yaml"))
    assert src.entry is None and "missing.yaml" in src.error
    bad = tmp_path / "evil.yaml"
    bad.write_text("version: 2\nentries:\n  x:\n    reader: os.system\n    kwargs: {command: 'echo pwned'}\n")
    src.catalog_path = str(bad)
    assert src.entry is None and src.error  # refused by the safe loader, shown as a message


# --------------------------------------------------------------------------- PACBED explorer (model + data)

def test_explorer_measures_the_region(explorer):
    r = explorer.result
    assert r and np.isfinite(r["thickness_nm"]) and r["thickness_std_nm"] > 0
    y0, y1, x0, x1 = explorer.region
    assert (y1 - y0, x1 - x0) == (5, 5)
    assert explorer.mask_curve is not None and len(explorer.background_curve) > 3
    assert r["network_input"].shape == r["canonical"].shape


def test_mask_width_changes_masked_pattern_and_prediction(explorer):
    before = explorer.result
    explorer.param.update(mask_inner_mrad=6.0, mask_width_mrad=4.0)
    after = explorer.result
    assert not np.allclose(after["network_input"], before["network_input"])
    np.testing.assert_allclose(after["canonical"], before["canonical"])  # alignment unaffected
    assert after["thickness_nm"] != before["thickness_nm"] or after["tilt_x_mrad"] != before["tilt_x_mrad"]
    # the masked network input is what predict_batch measured
    direct = explorer.predictor.predict_batch(explorer.pattern[None].astype(np.float32), mask=(6.0, 4.0),
                                              pixel_size_mrad=explorer.pixel_size_mrad)
    assert np.isclose(direct["thickness_nm"][0], after["thickness_nm"], atol=1e-4)
    # the mask-sensitivity curve is for the current width and moves with it
    assert explorer.mask_curve.attrs["width_mrad"] == 4.0
    explorer.mask_width_mrad = 8.0
    assert explorer.mask_curve.attrs["width_mrad"] == 8.0


def test_background_slider_reruns_the_network(explorer):
    t0 = explorer.result["thickness_nm"]
    explorer.background = 0.01
    r = explorer.result
    assert r["background_fraction"] > 0 and r["thickness_nm"] != t0
    assert explorer.network_input_is_background_subtracted if hasattr(explorer, "network_input_is_background_subtracted") else True


def test_sweep_matches_predict_batch(explorer):
    from diffkit.ui.pacbed_explorer import sweep_aligned

    pred = explorer.predictor
    p = explorer.pattern[None].astype(np.float32)
    settings = [(0.0, None), (0.0, (5.0, 3.0)), (0.008, None), (0.008, (10.0, 2.0))]
    out = sweep_aligned(pred, explorer.result["canonical"], [s[0] for s in settings], [s[1] for s in settings])
    for i, (bg, mask) in enumerate(settings):
        d = pred.predict_batch(p, background_strength=bg, mask=mask, pixel_size_mrad=explorer.pixel_size_mrad)
        assert np.isclose(out["thickness_nm"][i], d["thickness_nm"][0], atol=1e-3), (bg, mask)
        assert np.isclose(out["tilt_magnitude_mrad"][i], d["tilt_magnitude_mrad"][0], atol=1e-3), (bg, mask)


def test_dose_slider_resamples_and_seed_reproduces(explorer):
    raw = explorer.pattern.copy()
    explorer.dose = 100.0
    low = explorer.pattern.copy()
    n = (explorer.region[1] - explorer.region[0]) * (explorer.region[3] - explorer.region[2])
    assert np.isclose(low.sum() * n, 100.0 * n, rtol=0.05)  # ~100 e- per frame
    assert not np.allclose(low, raw)
    explorer.seed = 1
    assert not np.array_equal(explorer.pattern, low)
    explorer.seed = 0
    np.testing.assert_array_equal(explorer.pattern, low)
    explorer.dose = 0.0
    np.testing.assert_allclose(explorer.pattern, raw)


def test_tap_and_box_select_set_the_region(explorer, scan):
    step = scan.calibration.scan_step_nm or 1.0
    explorer.select_point(10 * step, 3 * step)  # (x, y) in the plot's coordinates
    assert explorer.region == (1, 6, 8, 13)
    explorer.select_bounds((0.0, 0.0, 2.2 * step, 1.2 * step))
    assert explorer.region == (0, 2, 0, 3)
    explorer.select_point(100 * step, 100 * step)  # clipped to the scan
    assert explorer.region == (10, 15, 10, 15)


def test_constructor_region_and_settings_are_kept(scan, predictor):
    from diffkit.ui import PacbedExplorer

    ex = PacbedExplorer(data=scan, predictor=predictor, region=(2, 4, 3, 6), mask_inner_mrad=5.0, mask_width_mrad=2.0,
                        sensitivity=False)
    assert ex.region == (2, 4, 3, 6)
    assert ex.result["settings"]["mask"] == (5.0, 2.0) and ex.result["settings"]["region"] == (2, 4, 3, 6)
    np.testing.assert_allclose(ex.pattern, scan.pacbed(y=slice(2, 4), x=slice(3, 6)), rtol=1e-6)


def test_explorer_renders(explorer):
    root = _render(explorer)
    assert root is not None
    tmpl = explorer.template()
    assert tmpl.title.startswith("diffkit")


def test_sessions_do_not_share_state(scan, predictor):
    from diffkit.ui import PacbedExplorer

    a = PacbedExplorer(data=scan, predictor=predictor, sensitivity=False)
    b = PacbedExplorer(data=scan, predictor=predictor, sensitivity=False)
    ta = a.result["thickness_nm"]
    a.param.update(mask_width_mrad=5.0, mask_inner_mrad=4.0, region=(0, 3, 0, 3), dose=300.0)
    assert b.mask_width_mrad == 0.0 and b.region != a.region and b.dose == 0.0
    assert b.result["thickness_nm"] == ta
    assert a.source is not b.source and a.param.mask_inner_mrad is not b.param.mask_inner_mrad


def test_explorer_with_bad_catalog_shows_message():
    pytest.importorskip("diffkit.catalog")
    from diffkit.ui import PacbedExplorer

    ex = PacbedExplorer(catalog="no/such/catalog.yaml")
    assert ex.data is None and "no/such/catalog.yaml" in ex.message
    assert ex.result == {}
    _render(ex)  # still renders, with the error


# --------------------------------------------------------------------------- maps

def _maps_explorer(scan, predictor, **kw):
    pytest.importorskip("diffkit.maps")
    from diffkit.ui import MapsExplorer

    return MapsExplorer(data=scan, predictor=predictor, **kw)


def test_maps_run_and_pixel_pattern(scan, predictor):
    m = _maps_explorer(scan, predictor, window=5, batch_size=4)
    ds = m.run()
    assert ds is not None and m.progress == 100 and not m.running and m.error == ""
    assert ds.sizes["y"] == 3 and ds.sizes["x"] == 3
    assert np.isfinite(ds["thickness_nm"].values).all()
    assert m.map_variables()[0] == "thickness_nm"
    m.select(float(ds["x"].values[2]), float(ds["y"].values[1]))
    assert m.selected == (1, 2)
    expected = np.asarray(scan.data[5:10, 10:15].mean(axis=(0, 1)).compute(), float)
    np.testing.assert_allclose(m.window_pattern(), expected, rtol=1e-4)
    _render(m)


def test_maps_cancel_stops_the_run(scan, predictor):
    m = _maps_explorer(scan, predictor, window=1, batch_size=8)
    calls = []
    orig = m._callback

    def cb(done, total, *a):
        calls.append((done, total))
        if len(calls) == 1:
            m.cancel()
        return orig(done, total, *a)

    m._callback = cb
    m.run()
    assert not m.running and "Cancelled" in m.status
    done, total = calls[-1]
    assert done < total and len(calls) <= 3  # stopped after (at most) a chunk or two


def test_maps_run_async_keeps_the_event_loop_free(scan, predictor):
    m = _maps_explorer(scan, predictor, window=1, batch_size=16)

    async def main():
        ticks = 0
        task = asyncio.ensure_future(m.run_async(poll_s=0.05))
        t0 = time.perf_counter()
        while not task.done():
            await asyncio.sleep(0.02)
            ticks += 1
        await task
        return ticks, time.perf_counter() - t0

    ticks, elapsed = asyncio.run(main())
    assert m.maps is not None and m.progress == 100
    assert ticks >= min(10, elapsed / 0.02 * 0.3)  # the loop kept running while the map was computed


def test_maps_sessions_are_independent(scan, predictor):
    a = _maps_explorer(scan, predictor, window=5)
    b = _maps_explorer(scan, predictor, window=3)
    a.run()
    assert b.maps is None and b.progress == 0 and a._cancel is not b._cancel


# --------------------------------------------------------------------------- strain

def test_strain_explorer_degrades_or_maps():
    from diffkit.ui.strain import StrainExplorer, strain_available

    reason = strain_available()
    if not DEMO.exists():
        pytest.skip("demo catalog not found")
    s = StrainExplorer(catalog=str(DEMO), entry="si_strain_nbed")
    if s.source.entry != "si_strain_nbed":
        pytest.skip("catalog has no si_strain_nbed entry")
    if reason:
        assert s.error  # a clear message instead of a traceback
        _render(s)
        return
    assert s.vimage is not None
    _render(s)


def test_strain_run_cancel_and_rereference():
    from diffkit.ui.strain import StrainExplorer, strain_available

    reason = strain_available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("diffkit.data")
    from diffkit.strain import make_test_scan, map_strain

    scan = make_test_scan((6, 8)).to_fourdstem(chunks=(2, -1, -1, -1))
    s = StrainExplorer(data=scan)
    assert s.vimage.shape == (6, 8) and s.error == ""
    # cancel: the callback raises after the first block of rows
    orig = s._callback

    def cb(*a):
        s.cancel()
        return orig(*a)

    s._callback = cb
    assert s.run() is None and "Cancelled" in s.status and s.strain is None
    s._callback = orig
    s.reference = (0, 6, 0, 2)
    ds = s.run()
    assert ds is not None and s.progress == 100 and int(ds["reference"].sum()) == 12
    direct = map_strain(scan, (slice(0, 6), slice(0, 2)), progress=False)
    np.testing.assert_allclose(ds["exx"].values, direct["exx"].values, atol=1e-9)
    # a new reference region re-references from the fitted lattices, without a new detection
    step = scan.calibration.scan_step_nm or 1.0
    s.select_bounds((5.6 * step, -0.4 * step, 7.4 * step, 5.4 * step))  # a box selection on the virtual image
    assert s.reference == (0, 6, 6, 8)
    direct = map_strain(scan, (slice(0, 6), slice(6, 8)), progress=False)
    np.testing.assert_allclose(s.strain["exx"].values, direct["exx"].values, atol=1e-9)
    assert abs(np.nanmedian(s.strain["exx"].values[:, 6:])) < 1e-3
    _render(s)



def test_maps_show_rotation_uncertainty_only_where_it_matters(scan, predictor):
    from diffkit.report import AZIMUTH_ROTATION_LIMIT_DEG
    from diffkit.ui.maps import MAP_VARIABLES

    app = _maps_explorer(scan, predictor)
    y, x = np.arange(2.0), np.arange(3.0)
    base = {v: (("y", "x"), np.ones((2, 3))) for v in MAP_VARIABLES}
    for rs, shown in ((0.2, False), (3 * AZIMUTH_ROTATION_LIMIT_DEG, True)):
        app.maps = xr.Dataset({**base, "rotation_std_deg": (("y", "x"), np.full((2, 3), rs))}, coords={"y": y, "x": x})
        assert ("rotation_std_deg" in app.map_variables()) is shown
