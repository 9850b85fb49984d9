"""refine="model": fitting each NBED pattern with its simulated disks (diffkit.strain.modelfit)."""
import numpy as np
import pytest

from diffkit.calibration import Calibration
from diffkit.errors import BadInputError, MissingCalibrationError
from diffkit.strain import nbed
from diffkit.strain.detect import load_disk_models
from diffkit.strain.mapping import map_strain
from diffkit.strain.modelfit import match_table


@pytest.fixture(scope="module")
def table():
    return nbed.disk_intensity_table(nbed.small_table_spec())


@pytest.fixture(scope="module")
def thick_scan(table):
    """Strongly dynamical disks (alpha = 2 mrad, 5 px radius, 60-88 nm wedge, tilt up to 0.4 mrad, 1e6 e-):
    strain-free columns 0-3, then exx 0.85 %, eyy -0.3 %, exy 0.2 %."""
    Y, X = 8, 8
    exx = np.zeros((Y, X))
    exx[:, 4:] = 0.0085
    eyy = np.where(exx > 0, -0.003, 0.0)
    exy = np.where(exx > 0, 0.002, 0.0)
    yy, xx = np.mgrid[:Y, :X]
    tilt = np.stack([(xx - 3.5) / 3.5 * 0.3, (yy - 3.5) / 3.5 * 0.3], -1)
    scan = nbed.simulate_nbed(exx, eyy, exy, None, thickness_nm=60 + 4 * yy, tilt_mrad=tilt, tables=[table],
                              convergence_mrad=2.0, pixel_size_mrad=0.4, detector_px=128, dose=1e6, blur_px=0.5,
                              background=0.003, center_offset_px=(0.3, -0.2), seed=21)
    ref = np.zeros((Y, X), bool)
    ref[:, :4] = True
    return scan, ref


def test_model_refinement_reaches_the_precision_goals(thick_scan, table):
    """Issue goals: strain-free std <= 2e-4 and bias <= 1e-4, where the networks alone give ~1e-3.

    Measured on this scan: networks alone (general model) std 0.4-1.4e-3; model fit std 0.9-1.2e-4,
    bias <= 0.25e-4, thickness within 0.1 nm, tilt within 0.01 mrad, chi2/px 1.0. The model fit is
    shot-noise limited: at 5e5 e- this scan gives std 1.2-2.1e-4 (32 reference patterns; the
    benchmark's 48 x 48 scan 1.2-1.8e-4), so the test runs at 1e6 e- to keep a margin. The model uses
    the simulation's own tables here; test_model_refinement_survives_a_detector_psf_tail and
    docs/strain.md say what that does and does not test.
    """
    scan, ref = thick_scan
    models = load_disk_models("disks_nbed", device="cpu")
    cnn = map_strain(scan.patterns, ref, calibration=scan.calibration, method="subimage-cnn", models=models,
                     progress=False)
    ds = map_strain(scan.patterns, ref, calibration=scan.calibration, method="subimage-cnn", models=models,
                    progress=False, refine="model", model_table=table)
    assert np.all(ds.status.values == 0)
    tr = scan.truth
    strained = ~ref
    worst_cnn = 0.0
    for k in ("exx", "eyy", "exy"):
        e = ds[k].values - tr[k].values
        assert np.std(ds[k].values[ref]) < 2e-4, (k, np.std(ds[k].values[ref]))
        assert abs(np.mean(e[strained])) < 1e-4, (k, np.mean(e[strained]))
        assert np.std(e[strained]) < 2.5e-4, k
        worst_cnn = max(worst_cnn, np.std(cnn[k].values[ref]))
    assert worst_cnn > 4e-4  # the networks alone do not reach the goal on these disks
    assert np.abs(ds.thickness_nm.values - tr.thickness_nm.values).max() < 0.5
    tilt = np.stack([ds.tilt_x_mrad.values, ds.tilt_y_mrad.values], -1)
    ttrue = np.stack([tr.tilt_x_mrad.values, tr.tilt_y_mrad.values], -1)
    assert np.abs(tilt - ttrue).max() < 0.03
    assert np.nanmedian(ds.chi2_per_px.values) < 1.5  # the model explains the counts (Poisson)
    assert "thickness_nm" not in cnn  # by-products only with refine="model"


def test_model_refinement_needs_crystal_and_convergence(thick_scan, table):
    scan, ref = thick_scan
    models = load_disk_models("disks_nbed", device="cpu")
    cal = Calibration(pixel_size_mrad=0.4, beam_energy_kv=200.0)
    with pytest.raises(MissingCalibrationError, match="convergence"):
        map_strain(scan.patterns[:2], None, calibration=cal, models=models, progress=False, refine="model")
    cal = Calibration(pixel_size_mrad=0.4, beam_energy_kv=200.0, convergence_mrad=2.0)
    with pytest.raises(MissingCalibrationError, match="material"):
        map_strain(scan.patterns[:2], None, calibration=cal, models=models, progress=False, refine="model")
    with pytest.raises(BadInputError, match="refine must be"):
        map_strain(scan.patterns[:2], None, calibration=cal, models=models, progress=False, refine="physics")


def test_wrong_crystal_is_refused(table):
    """A lattice that does not belong to the table's crystal (spacing or symmetry) is a clear error."""
    sto = nbed.disk_intensity_table(nbed.small_table_spec("SrTiO3", "001"))
    hk = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    Gsi = np.array([[-1.0, 0.0], [0.0, -1.0]]) * 13.06 / 0.4  # Si [001] 220 at 200 kV, 0.4 mrad/px
    m = match_table(table, Gsi, hk, pixel_size_mrad=0.4)
    assert (m.beams >= 0).all()
    with pytest.raises(BadInputError, match="mrad/px"):
        match_table(sto, Gsi, hk, pixel_size_mrad=0.4)
    with pytest.raises(BadInputError, match="anisotropic"):
        match_table(table, np.array([[32.65, 0.0], [0.0, 20.0]]), hk)


def test_model_refinement_survives_a_detector_psf_tail(table):
    """Data the model was not made from: 10 % of the detector PSF in a sigma = 3 px tail (the model's
    broad PSF component is 2.5 px wide, its amount fitted per disk).

    Measured: networks std 0.6-1.7e-3 (they were trained with a Gaussian blur only), model fit
    std 1.4-1.5e-4, bias <= 0.6e-4, thickness within 0.2 nm.
    """
    import torch

    from diffkit.strain.nbed import gaussian_blur

    Y, X = 8, 8
    exx = np.zeros((Y, X))
    exx[:, 4:] = 0.0085
    yy, xx = np.mgrid[:Y, :X]
    scan = nbed.simulate_nbed(exx, None, None, None, thickness_nm=60 + 4 * yy, tables=[table], convergence_mrad=2.0,
                              pixel_size_mrad=0.4, detector_px=128, dose=np.inf, blur_px=0.5, background=0.003,
                              center_offset_px=(0.3, -0.2), seed=22)
    x = torch.as_tensor(scan.patterns.reshape(-1, 128, 128))
    y = 0.9 * x + 0.1 * gaussian_blur(x, 3.0)
    gen = torch.Generator().manual_seed(5)
    counts = torch.poisson(y / y.sum((1, 2), keepdim=True) * 1e6, generator=gen).numpy().reshape(Y, X, 128, 128)
    ref = np.zeros((Y, X), bool)
    ref[:, :4] = True
    models = load_disk_models("disks_nbed", device="cpu")
    kw = dict(calibration=scan.calibration, method="subimage-cnn", models=models, progress=False)
    cnn = map_strain(counts, ref, **kw)
    ds = map_strain(counts, ref, refine="model", model_table=table, **kw)
    tr = scan.truth
    for k in ("exx", "eyy", "exy"):
        assert np.std(ds[k].values[ref]) < 2.5e-4, (k, np.std(ds[k].values[ref]))
        assert np.std(ds[k].values[ref]) < 0.5 * np.std(cnn[k].values[ref]), k
        assert abs(np.mean(ds[k].values[~ref] - tr[k].values[~ref])) < 1e-4, k
    assert np.abs(ds.thickness_nm.values - tr.thickness_nm.values).max() < 1.0


def test_model_refinement_resumes_from_its_store(thick_scan, table, tmp_path):
    """An interrupted refine="model" map resumes from its zarr store and equals the uninterrupted map."""
    scan, ref = thick_scan
    models = load_disk_models("disks_nbed", device="cpu")
    kw = dict(calibration=scan.calibration, method="subimage-cnn", models=models, progress=False, refine="model",
              model_table=table)

    class Stop(Exception):
        pass

    def stop_after_two(done, total, partial):
        if done >= 4:
            raise Stop

    store = tmp_path / "model.zarr"
    with pytest.raises(Stop):
        map_strain(scan.patterns, ref, store=store, chunk_rows=2, callback=stop_after_two, **kw)
    resumed = map_strain(scan.patterns, ref, store=store, chunk_rows=2, **kw)
    whole = map_strain(scan.patterns, ref, **kw)
    for k in ("exx", "eyy", "exy", "thickness_nm", "tilt_x_mrad"):
        np.testing.assert_allclose(resumed[k].values, whole[k].values, atol=1e-6)
