"""Band-pass mask, background and dose analyses of the PACBED CNN (diffkit.pacbed.analysis).

Uses a tiny simulated library and a smoke model trained on it in a session fixture (shared
with test_lsf.py through the session's base temp folder), so nothing depends on the shipped
weights or the user's cache.
"""
import time

import numpy as np
import pytest

from diffkit.errors import BadInputError
from diffkit.pacbed import analysis as A


def _tiny_setup(base):
    """Tiny library + smoke model under ``base`` (built once per session, then read from disk)."""
    from diffkit.models.train import default_spec, train_pacbed
    from diffkit.pacbed import load_predictor_file
    from diffkit.sim.pacbed import build_pacbed_library

    cache, wdir = base / "cache", base / "model"
    lib = build_pacbed_library(default_spec(smoke=True), cache_dir=cache, progress=False)
    card = wdir / "pacbed_SrTiO3_001_200kV_13.6mrad.json"
    if not card.exists():
        train_pacbed(out_dir=wdir, smoke=True, cache_dir=cache, n_test=100, log=lambda *a: None)
    return lib, load_predictor_file(card, device="cpu")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny_setup(tmp_path_factory.getbasetemp() / "diffkit_pacbed_tiny")


@pytest.fixture(scope="session")
def raw_set(tiny):
    """Held-out library patterns on a raw detector (noise, background, shift/scale/rotation) with truth."""
    from diffkit.models.pacbed_eval import make_test_set

    lib, _ = tiny
    return make_test_set(lib, n=24, seed=5, out_px=48, pixel_ratio=0.7)


@pytest.fixture(scope="session")
def sweep(tiny, raw_set):
    _, pred = tiny
    return A.mask_sensitivity(pred, raw_set["patterns"], truth=raw_set)


def test_default_width_is_first_conv_footprint(tiny, sweep):
    _, pred = tiny
    conv = pred.measure_net.backbone.conv[0][0]
    px = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
    assert A.conv_footprint_px(pred) == px == 5
    assert A.conv_footprint_mrad(pred) == pytest.approx(px * pred.pixel_size_mrad)
    assert sweep.attrs["width_mrad"] == pytest.approx(px * pred.pixel_size_mrad)
    np.testing.assert_allclose(sweep["mask_outer_mrad"] - sweep["mask_inner_mrad"], sweep.attrs["width_mrad"])


def test_reference_is_bit_identical_to_predict_batch(tiny, raw_set, sweep):
    _, pred = tiny
    r = pred.predict_batch(raw_set["patterns"])
    for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
        np.testing.assert_array_equal(sweep[f"{k}_unmasked"].values, r[k])


def test_masking_nothing_leaves_predictions_unchanged(tiny, raw_set):
    _, pred = tiny
    aligned = A.align_for_masking(pred, raw_set["patterns"])
    beyond = pred.n_px * pred.pixel_size_mrad  # past the canonical frame's corners
    for inner, width in ((beyond, 3.0), (5.0, 0.0)):
        m = A.masked_prediction(pred, aligned, inner, width)
        for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad", "confidence"):
            np.testing.assert_array_equal(m[k], aligned.reference[k])
    # the same through predict_batch's own mask option
    r0 = pred.predict_batch(raw_set["patterns"])
    r1 = pred.predict_batch(raw_set["patterns"], mask=(beyond, 3.0))
    np.testing.assert_array_equal(r0["thickness_nm"], r1["thickness_nm"])
    ds = A.mask_sensitivity(pred, aligned, inner_mrad=[beyond])
    np.testing.assert_array_equal(ds["thickness_nm"].values[0], aligned.reference["thickness_nm"])
    assert float(ds["thickness_match"].min()) == 1.0 and float(ds["tilt_match"].min()) == 1.0
    assert float(ds["thickness_abs_shift_nm"][0]) == 0.0


def test_masking_everything_destroys_and_flags(tiny, raw_set):
    _, pred = tiny
    aligned = A.align_for_masking(pred, raw_set["patterns"])
    m = A.masked_prediction(pred, aligned, 0.0, 2 * pred.n_px * pred.pixel_size_mrad)
    assert m["ood"].all() and (m["ood_reason"] == 3).all()  # no contrast left
    assert (m["confidence"] <= 0.05).all()
    # every pattern gives (nearly) the same answer: the information is gone
    spread_unmasked = np.ptp(aligned.reference["thickness_nm"])
    assert spread_unmasked > 0.2  # the smoke model does tell the raw patterns apart
    assert np.ptp(m["thickness_nm"]) < 0.2 * spread_unmasked


def test_sweep_dims_coords_units(tiny, raw_set, sweep):
    _, pred = tiny
    B = len(raw_set["patterns"])
    w = sweep.attrs["width_mrad"]
    inner = sweep["mask_inner_mrad"].values
    assert inner[0] == 0.0 and np.allclose(np.diff(inner), w / 2)
    assert inner[-1] < pred.n_px / 2 * pred.pixel_size_mrad <= inner[-1] + w / 2 + 1e-9
    assert sweep["thickness_nm"].dims == ("mask_inner_mrad", "pattern")
    assert sweep.sizes["pattern"] == B
    assert sweep["thickness_match"].dims == ("mask_inner_mrad", "thickness_tolerance_nm")
    assert list(sweep["thickness_tolerance_nm"].values) == [1.0, 2.0, 3.0]
    assert list(sweep["tilt_tolerance_mrad"].values) == [0.25, 0.5, 0.71]
    assert sweep["thickness_match_by_range"].dims == ("mask_inner_mrad", "thickness_range", "thickness_tolerance_nm")
    assert int(sweep["n_by_range"].sum()) == B
    for k, u in (("mask_inner_mrad", "mrad"), ("thickness_nm", "nm"), ("tilt_x_mrad", "mrad"),
                 ("thickness_shift_nm", "nm"), ("tilt_tolerance_mrad", "mrad")):
        assert sweep[k].attrs["units"] == u
    for k in ("thickness_match", "tilt_match", "thickness_match_truth", "tilt_match_truth", "confidence_mean"):
        v = sweep[k].values
        assert np.all((v >= 0) & (v <= 1)), k
    # wider tolerance never matches less
    assert np.all(np.diff(sweep["thickness_match"].values, axis=1) >= 0)
    np.testing.assert_array_equal(sweep["thickness_nm_truth"].values, raw_set["thickness_nm"])


def test_single_mask_is_interactive(tiny, raw_set):
    _, pred = tiny
    aligned = A.align_for_masking(pred, raw_set["patterns"][:1])
    A.masked_prediction(pred, aligned, 4.0)
    t = time.perf_counter()
    for r in (2.0, 6.0, 10.0):
        A.masked_prediction(pred, aligned, r)
    assert (time.perf_counter() - t) / 3 < 0.2


def test_background_sweep_converges_to_strength(tiny, raw_set):
    _, pred = tiny
    s = [0.0, 0.002, 0.005]
    ds = A.background_sweep(pred, raw_set["patterns"][:12], s, truth={"thickness_nm": raw_set["thickness_nm"][:12]})
    assert ds["thickness_nm"].dims == ("background_strength", "pattern")
    assert ds["background_strength"].attrs["units"] == "1/nm"
    np.testing.assert_array_equal(ds["background_fraction"].sel(background_strength=0.0).values, 0.0)
    # converged: subtracted fraction = strength x (final) thickness estimate
    for v in s[1:]:
        bg = ds["background_fraction"].sel(background_strength=v).values
        t = ds["thickness_nm"].sel(background_strength=v).values
        np.testing.assert_allclose(bg, v * t, rtol=0.1, atol=2e-3)
    assert np.all(np.diff(ds["background_fraction_mean"].values) > 0)
    assert ds["thickness_match_truth"].dims == ("background_strength", "thickness_tolerance_nm")
    assert ds.attrs["best_strength"] in s


def test_dose_series_spread_shrinks_with_dose(tiny):
    lib, pred = tiny
    pats = lib["pattern"].isel(tilt=[0, 2], thickness_nm=[6, 16])  # 4 library patterns, truth from coords
    doses = np.logspace(3, 9, 4)
    ds = A.dose_series(pred, pats, doses=doses, n_repeats=6, seed=1)
    assert ds["thickness_nm"].dims == ("dose", "repeat", "pattern")
    assert ds["dose"].attrs["units"] == "e-/pattern"
    assert ds.sizes == {"dose": 4, "repeat": 6, "pattern": 4}
    sp = ds["thickness_spread_nm"].mean("pattern").values
    ta = (ds["tilt_x_spread_mrad"] + ds["tilt_y_spread_mrad"]).mean("pattern").values
    assert sp[0] > 3 * sp[-1] and sp[-1] < 0.1
    assert ta[0] > ta[-1]
    # threshold: a dose of the grid from which on every spread is within tolerance
    thr = ds.attrs["dose_threshold_thickness"]
    assert thr in doses
    assert (ds["thickness_spread_max_nm"].sel(dose=slice(thr, None)) <= 0.5).all()
    assert np.all(ds["dose_threshold_thickness"].values <= thr)
    np.testing.assert_allclose(ds["thickness_nm_truth"].values, np.repeat(lib["thickness_nm"].values[[6, 16]][None], 2, 0).ravel())
    # reproducible with the seed
    ds2 = A.dose_series(pred, pats, doses=doses[:1], n_repeats=2, seed=1)
    ds3 = A.dose_series(pred, pats, doses=doses[:1], n_repeats=2, seed=1)
    np.testing.assert_array_equal(ds2["thickness_nm"].values, ds3["thickness_nm"].values)


def test_bad_input_is_rejected(tiny, raw_set):
    _, pred = tiny
    good = raw_set["patterns"][:3]
    bad = good.copy()
    bad[1, 5, 5] = np.nan
    with pytest.raises(BadInputError, match="NaN"):
        A.mask_sensitivity(pred, bad)
    with pytest.raises(BadInputError, match="shape"):
        A.mask_sensitivity(pred, good[0, 0])
    with pytest.raises(BadInputError, match="shape"):
        A.background_sweep(pred, good[None], [0.0])
    with pytest.raises(BadInputError, match="at least"):
        A.mask_sensitivity(pred, good[:, :16, :16])
    with pytest.raises(BadInputError, match="truth"):
        A.mask_sensitivity(pred, good, truth={"thickness_nm": [1.0, 2.0]})
    with pytest.raises(BadInputError):
        A.mask_sensitivity(pred, good, inner_mrad=[-1.0])
    with pytest.raises(BadInputError):
        A.background_sweep(pred, good, [-0.1])
    with pytest.raises(BadInputError):
        A.dose_series(pred, good, doses=[0.0, 1e6])
    with pytest.raises(BadInputError, match="n_repeats"):
        A.dose_series(pred, good, n_repeats=1)
    with pytest.raises(BadInputError, match="positive"):
        A.background_sweep(pred, np.zeros((2, 40, 40)), [0.0])


def test_plots(tiny, raw_set, sweep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffkit.pacbed import plots

    lib, pred = tiny
    figs = [plots.plot_mask_sensitivity(sweep), plots.plot_mask_sensitivity(sweep, "tilt", against="truth"),
            plots.plot_mask_sensitivity(sweep, by_range=True)]
    bg = A.background_sweep(pred, raw_set["patterns"][:4], [0.0, 0.003], truth={"thickness_nm": raw_set["thickness_nm"][:4]})
    figs.append(plots.plot_background_sweep(bg))
    ds = A.dose_series(pred, lib["pattern"].isel(tilt=0, thickness_nm=[4]), doses=[1e4, 1e8], n_repeats=2)
    figs.append(plots.plot_dose_series(ds))
    for f in figs:
        assert isinstance(f, matplotlib.figure.Figure)
        plt.close(f)
    with pytest.raises(ValueError):
        plots.plot_mask_sensitivity(sweep, "width")
    hv = pytest.importorskip("holoviews")
    for obj in (plots.hv_mask_sensitivity(sweep), plots.hv_background_sweep(bg), plots.hv_dose_series(ds)):
        assert isinstance(obj, hv.core.dimension.ViewableElement) or isinstance(obj, hv.core.layout.Layoutable)
