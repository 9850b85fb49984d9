"""Least-squares fitting against the simulated library and the hybrid CNN + LSF (diffkit.pacbed.lsf)."""
import numpy as np
import pytest
import torch

from diffkit.errors import BadInputError
from diffkit.pacbed import lsf as M
from diffkit.sim.detector import DetectorParams, apply_detector


def _tiny_setup(base):
    """Tiny library + smoke model under ``base`` (same folder as test_analysis.py: built once per session)."""
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
def lsflib(tiny):
    # the 32-px test library is coarse: a slightly stronger matched low-pass than the default
    return M.LsfLibrary.from_dataset(tiny[0], smooth_px=0.75)


@pytest.fixture(scope="session")
def truths(lsflib):
    s = lsflib.tilt_step_mrad
    return [(5.5, -s, s), (10.0, s, 0.0), (6.0, 0.0, -s), (7.5, -s, -s), (9.0, s, -s), (4.5, s, s), (11.5, 0.0, 0.0)]


@pytest.fixture(scope="session")
def distorted(tiny, lsflib, truths):
    """Library patterns on a finer raw detector, shifted, scaled and rotated, with a little noise;
    the starting geometry is off by (0.4, -0.3) px, 1 % and 0.7 degrees."""
    lib, _ = tiny
    pats = np.array([M.signed_library_pattern(lib, *t) for t in truths])
    n = len(pats)
    rng = np.random.default_rng(1)
    p = DetectorParams.identity(n)
    p.scale[:] = rng.uniform(0.97, 1.03, n)
    p.rotation_deg[:] = rng.uniform(-3, 3, n)
    p.shift_px[:] = rng.uniform(-1.5, 1.5, (n, 2))
    p.dose[:] = 1e8
    ratio, out = 0.5, 80
    x = apply_detector(pats, p, out_px=out, pixel_ratio=ratio, generator=torch.Generator().manual_seed(3)).numpy()
    c = (out - 1) / 2
    true_geo = dict(center_y_px=c + p.shift_px[:, 0], center_x_px=c + p.shift_px[:, 1],
                    disk_radius_px=lsflib.disk_radius_px * p.scale / ratio, rotation_deg=-p.rotation_deg)
    start = dict(center_y_px=true_geo["center_y_px"] + 0.4, center_x_px=true_geo["center_x_px"] - 0.3,
                 disk_radius_px=true_geo["disk_radius_px"] * 1.01, rotation_deg=true_geo["rotation_deg"] + 0.7)
    return x, true_geo, start


@pytest.fixture(scope="session")
def full_fit(lsflib, distorted):
    x, _, start = distorted
    return M.lsf_fit(lsflib, x, geometry=start)


def test_f_closed_form_is_the_least_squares_optimum():
    rng = np.random.default_rng(0)
    sim = rng.random((3, 12, 12))
    exp = 2.5 * sim + rng.normal(0, 0.05, sim.shape) + 0.3
    w = np.ones((12, 12))
    w[:2] = 0
    chi2, f, b = M.chi2_closed_form(exp, sim, weights=w)
    for i in range(3):
        m = w.ravel() > 0
        A = sim[i].ravel()[m][:, None]
        f_ls = np.linalg.lstsq(A, exp[i].ravel()[m], rcond=None)[0][0]
        assert f[i] == pytest.approx(f_ls, rel=1e-12)
        assert chi2[i] == pytest.approx(((exp[i] - f[i] * sim[i]) ** 2 * w).sum(), rel=1e-10)
        for df in (-1e-3, 1e-3):
            assert ((exp[i] - (f[i] + df) * sim[i]) ** 2 * w).sum() > chi2[i]
    assert np.all(b == 0)
    chi2b, fb, bb = M.chi2_closed_form(exp, sim, fit_background=True)
    for i in range(3):
        A = np.stack([sim[i].ravel(), np.ones(144)], 1)
        (f_ls, b_ls), *_ = np.linalg.lstsq(A, exp[i].ravel(), rcond=None)
        assert (fb[i], bb[i]) == pytest.approx((f_ls, b_ls), rel=1e-10)
        assert chi2b[i] == pytest.approx(((exp[i] - fb[i] * sim[i] - bb[i]) ** 2).sum(), rel=1e-9)
    assert np.all(M.chi2_closed_form(exp, sim, fit_background=True)[0] <= M.chi2_closed_form(exp, sim)[0])


def test_signed_tilt_grid_and_symmetry(tiny, lsflib):
    lib, _ = tiny
    m = (len(lsflib.tilt_axis_mrad) - 1) // 2
    assert lsflib.n_signed == (2 * m + 1) ** 2 and (lsflib.tilt_lut >= 0).all()  # full square of signed tilts
    s = lsflib.tilt_step_mrad
    p = M.signed_library_pattern(lib, 5.0, s, 0.0)
    np.testing.assert_array_equal(M.signed_library_pattern(lib, 5.0, -s, 0.0), p[:, ::-1])  # mirror columns: -tilt_x
    np.testing.assert_array_equal(M.signed_library_pattern(lib, 5.0, 0.0, s), p.T)  # transpose: swap
    np.testing.assert_array_equal(M.signed_library_pattern(lib, 5.0, 0.0, -s), p.T[::-1])  # mirror rows: -tilt_y
    with pytest.raises(BadInputError):
        M.signed_library_pattern(lib, 5.25, s, 0.0)


def test_noiseless_library_patterns_recovered_exactly(tiny, lsflib, truths):
    lib, _ = tiny
    pats = np.array([M.signed_library_pattern(lib, *t) for t in truths])
    r = M.lsf_fit(lsflib, pats, geometry="library")
    np.testing.assert_array_equal(r["thickness_nm"].values, [t[0] for t in truths])
    np.testing.assert_allclose(r["tilt_x_mrad"].values, [t[1] for t in truths], atol=1e-9)  # signs included
    np.testing.assert_allclose(r["tilt_y_mrad"].values, [t[2] for t in truths], atol=1e-9)
    assert (r["chi2_relative"].values < 1e-6).all()
    c = (lsflib.n_px - 1) / 2
    np.testing.assert_allclose(r["center_y_px"].values, c, atol=0.01)
    np.testing.assert_allclose(r["rotation_deg"].values, 0.0, atol=0.05)
    # the intensity factor: a pattern scaled by 7 gives f = 7 (library pattern smoothed the same way)
    r7 = M.lsf_fit(lsflib, 7 * pats[:1], geometry="library", geometry_search=M.GeometrySearch.fixed())
    assert float(r7["scale_factor"][0]) == pytest.approx(7.0, rel=1e-5)


def test_distorted_patterns_within_one_grid_step(lsflib, truths, distorted, full_fit):
    x, true_geo, start = distorted
    r = full_fit
    dt = np.abs(r["thickness_nm"].values - [t[0] for t in truths])
    da = np.abs(np.concatenate([r["tilt_x_mrad"].values - [t[1] for t in truths],
                                r["tilt_y_mrad"].values - [t[2] for t in truths]]))
    assert (dt <= 0.5 + 1e-9).all(), dt
    assert (da <= lsflib.tilt_step_mrad + 1e-9).all(), da
    assert np.mean(dt == 0) >= 0.5
    # the geometry search moves towards the true geometry
    for k, tol in (("center_y_px", 0.25), ("center_x_px", 0.25), ("rotation_deg", 0.5)):
        err_fit = np.abs(r[k].values - true_geo[k])
        err_start = np.abs(start[k] - true_geo[k])
        assert np.median(err_fit) < np.median(err_start) and np.median(err_fit) < tol, k
    s_fit = np.abs(r["disk_radius_px"].values / true_geo["disk_radius_px"] - 1)
    assert np.median(s_fit) < 0.005
    # uncertainty bookkeeping
    assert (r["thickness_lo_nm"] <= r["thickness_nm"]).all() and (r["thickness_hi_nm"] >= r["thickness_nm"]).all()
    assert (r["n_candidates"] == lsflib.n_signed * lsflib.n_thickness).all()
    land = r["chi2_landscape"]
    assert land.dims == ("pattern", "grid_thickness_nm", "grid_tilt_y_mrad", "grid_tilt_x_mrad")
    assert np.allclose(land.min(("grid_thickness_nm", "grid_tilt_y_mrad", "grid_tilt_x_mrad")).values, r["chi2"].values,
                       rtol=1e-3)


def test_hybrid_finds_the_full_lsf_minimum(lsflib, truths, distorted, full_fit):
    x, _, start = distorted
    n = len(truths)
    t = np.array([tt[0] for tt in truths])
    est = {"thickness_nm": t + np.where(np.arange(n) % 2, 2.0, -2.0),  # CNN-like errors inside the window
           "tilt_x_mrad": np.array([tt[1] for tt in truths]) + 0.3,
           "tilt_y_mrad": np.array([tt[2] for tt in truths]) - 0.3, **start}
    h = M.hybrid_fit(lsflib, x, estimates=est)
    for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
        np.testing.assert_array_equal(h[k].values, full_fit[k].values)
    # same grid minimum; the sub-pixel geometry polish starts from a different window, so chi2 agrees to 1 %
    np.testing.assert_allclose(h["chi2"].values, full_fit["chi2"].values, rtol=1e-2)
    assert (h["n_candidates"] < full_fit["n_candidates"]).all()
    assert not h["at_edge"].any()
    # outside the library frame of the window the landscape is empty
    assert np.isnan(h["chi2_landscape"].values).any()
    # a CNN estimate 6 nm off: the best fit lands on the window edge, the window widens and the
    # hybrid still finds the global minimum
    est2 = dict(est, thickness_nm=t + 6.0)
    h2 = M.hybrid_fit(lsflib, x[:3], estimates={k: v[:3] for k, v in est2.items()})
    assert (h2["widened"] >= 1).any()
    np.testing.assert_array_equal(h2["thickness_nm"].values, full_fit["thickness_nm"].values[:3])
    np.testing.assert_allclose(h2["chi2"].values, full_fit["chi2"].values[:3], rtol=1e-6)


def test_hybrid_with_the_cnn(tiny, lsflib, distorted):
    _, pred = tiny
    x, _, _ = distorted
    h = M.hybrid_fit(lsflib, x[:2], pred)
    for k in ("cnn_thickness_nm", "cnn_tilt_x_mrad", "thickness_window_nm", "widened", "at_edge", "chi2"):
        assert k in h and h[k].sizes == {"pattern": 2}
    assert h.attrs["cnn_seconds"] >= 0 and h.attrs["lsf_seconds"] > 0
    assert np.isfinite(h["thickness_nm"]).all()


def test_plot_chi2_landscape(full_fit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffkit.pacbed import plots

    fig = plots.plot_chi2_landscape(full_fit, pattern=1)
    assert len(fig.axes) >= 2
    plt.close(fig)
    hv = pytest.importorskip("holoviews")
    assert isinstance(plots.hv_chi2_landscape(full_fit, pattern=0), hv.Layout)


def test_bad_input_is_rejected(lsflib, distorted):
    x, _, start = distorted
    with pytest.raises(BadInputError, match="NaN"):
        y = x[:1].copy()
        y[0, 3, 3] = np.nan
        M.lsf_fit(lsflib, y, geometry={k: v[:1] for k, v in start.items()})
    with pytest.raises(BadInputError, match="shape"):
        M.lsf_fit(lsflib, x[0, 0])
    with pytest.raises(BadInputError, match="shape"):
        M.lsf_fit(lsflib, x[None])
    with pytest.raises(BadInputError, match="library"):
        M.lsf_fit(lsflib, x[:1], geometry="library")  # 80 px, not the library's 32
    with pytest.raises(BadInputError, match="one value per pattern"):
        M.lsf_fit(lsflib, x[:2], geometry={k: v[:3] for k, v in start.items()})
    with pytest.raises(BadInputError, match="screen_margin"):
        M.lsf_fit(lsflib, x[:1], geometry={k: v[:1] for k, v in start.items()},
                  geometry_search=M.GeometrySearch(screen_margin=-0.1))
    with pytest.raises(BadInputError, match="coarse_axes"):
        M.lsf_fit(lsflib, x[:1], geometry={k: v[:1] for k, v in start.items()},
                  geometry_search=M.GeometrySearch(coarse_axes=(4,)))
    with pytest.raises(BadInputError, match="no library candidate"):
        M.lsf_fit(lsflib, x[:1], geometry={k: v[:1] for k, v in start.items()}, search={"thickness_nm": (200, 300)})
    with pytest.raises(BadInputError, match="unknown search"):
        M.lsf_fit(lsflib, x[:1], geometry={k: v[:1] for k, v in start.items()}, search={"defocus": (0, 1)})
    with pytest.raises(BadInputError, match="positive"):
        M.lsf_fit(lsflib, np.zeros((1, 40, 40)))
    with pytest.raises(BadInputError):
        M.hybrid_fit(lsflib, x[:1])  # neither predictor nor estimates
    with pytest.raises(BadInputError):
        M.LsfLibrary(np.zeros((2, 3, 8)), [1, 2, 3], [0, 1], [0, 0], {"pixel_size_mrad": 1.0, "disk_radius_px": 2.0})


def test_linearised_screen_predicts_the_refined_chi2(lsflib, distorted, truths):
    """The closed-form linearised Gauss-Newton chi2 used to skip refinements: with no geometry
    axes it is the exact chi2 at that geometry; with them it is lower, and from a start 0.4 px,
    1 % and 0.7 deg off it predicts 90 % of the way to the chi2 at the true geometry."""
    x, true_geo, start = distorted
    keys = ("center_y_px", "center_x_px", "disk_radius_px", "rotation_deg")
    g0 = np.array([start[k][0] for k in keys])
    gt = np.array([true_geo[k][0] for k in keys])
    cand = np.argwhere(lsflib.search_mask())
    rows = lsflib.cand_tilt[cand[:, 0]] * lsflib.n_thickness + cand[:, 1]
    ops = lsflib.cand_op[cand[:, 0]]
    sc = M._Scorer(lsflib, torch.as_tensor(x[0]), g0, int(lsflib.n_px / 2 - 4), True)
    dense = M._Candidates(lsflib, rows, ops, gather=False)
    exact0, _ = M._score_candidates(sc, sc.resample(g0[None]), dense)
    exact_t, _ = M._score_candidates(sc, sc.resample(gt[None]), dense)
    # the hybrid's path (rows gathered, one product per op) scores the same, up to the float32
    # cancellation of <E,E> - f <E,S> - b <E,1> (refined candidates are then scored exactly)
    gathered = M._Candidates(lsflib, rows, ops, gather=True)
    np.testing.assert_allclose(M._score_candidates(sc, sc.resample(g0[None]), gathered)[0], exact0, rtol=3e-3)
    G = np.tile(g0, (len(rows), 1))
    S = dense.patterns(np.arange(len(rows)))
    np.testing.assert_array_equal(S.numpy(), gathered.patterns(np.arange(len(rows))).numpy())
    lin0 = M._linearised_chi2(sc, G, S, rows, [])
    lin = M._linearised_chi2(sc, G, S, rows, [0, 1, 2, 3])
    np.testing.assert_allclose(lin0, exact0, rtol=1e-3)
    assert (lin <= lin0 * (1 + 1e-6)).all()
    best = int(np.argmin(exact_t))  # the true candidate at the true geometry
    assert lin[best] < exact0[best] - 0.9 * (exact0[best] - exact_t[best])


def test_screening_keeps_the_minimum(lsflib, distorted, full_fit):
    x, _, start = distorted
    plain = M.lsf_fit(lsflib, x, geometry=start, geometry_search=M.GeometrySearch(screen_margin=None),
                      return_landscape=False)
    for k in ("thickness_nm", "tilt_x_mrad", "tilt_y_mrad"):
        np.testing.assert_array_equal(plain[k].values, full_fit[k].values)
    np.testing.assert_allclose(plain["chi2"].values, full_fit["chi2"].values, rtol=1e-6)
