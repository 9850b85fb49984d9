"""Strain maps with the shipped disk networks: known field, detection, phases, virtual images, bad input, resume."""
import numpy as np
import pytest

from diffkit.calibration import Calibration
from diffkit.errors import BadInputError, MissingCalibrationError
from diffkit.sim.crystals import get_crystal
from diffkit.strain import nbed
from diffkit.strain.detect import detect_disks, load_disk_models
from diffkit.strain.mapping import map_strain
from diffkit.strain.phases import Phase, phase_map
from diffkit.strain.virtual import virtual_image


@pytest.fixture(scope="module")
def models():
    return load_disk_models(device="cpu")


@pytest.fixture(scope="module")
def table():
    return nbed.disk_intensity_table(nbed.small_table_spec())


@pytest.fixture(scope="module")
def field_scan(table):
    """8 x 10 scan: strain-free reference columns 0-2, then exx 0.85 %, eyy -0.3 %, exy 0.2 % (and a ramp)."""
    Y, X = 8, 10
    exx = np.zeros((Y, X))
    exx[:, 3:] = 0.0085
    exx[:, 7:] = np.linspace(0.002, 0.01, 3)
    eyy = np.where(exx > 0, -0.003, 0.0)
    exy = np.where(exx > 0, 0.002, 0.0)
    yy, xx = np.mgrid[:Y, :X]
    scan = nbed.simulate_nbed(exx, eyy, exy, None, thickness_nm=50 + 3 * yy, tilt_mrad=None, tables=[table],
                              convergence_mrad=1.0, pixel_size_mrad=0.2, detector_px=128, dose=2e6, blur_px=0.5,
                              background=0.003, seed=5)
    ref = np.zeros((Y, X), bool)
    ref[:, :3] = True
    return scan, ref


def test_known_strain_field_is_recovered(field_scan, models):
    """exx 0.85 %, eyy -0.3 %, exy 0.2 % and a 0.2-1 % ramp against a strain-free reference.

    Measured on this scan (dynamical Si [001] disks, 1 mrad, 2e6 e-): bias ~4e-4, strain-free
    std ~5-6e-4, rms error ~6-7e-4 (the issue's goals, 1e-4 bias and 2e-4 std, are NOT reached:
    the sub-image CNN's centre errors follow the dynamical contrast in the disks; see docs/strain.md).
    """
    scan, ref = field_scan
    ds = map_strain(scan.patterns, ref, calibration=scan.calibration, models=models, progress=False)
    assert np.all(ds.status.values == 0)
    tr = scan.truth
    err = {k: ds[k].values - tr[k].values for k in ("exx", "eyy", "exy")}
    for k, e in err.items():
        assert np.abs(np.mean(e[~ref])) < 6e-4, (k, np.mean(e[~ref]))  # bias
        assert np.std(ds[k].values[ref]) < 9e-4, (k, np.std(ds[k].values[ref]))  # precision (strain-free)
        assert np.sqrt(np.mean(e**2)) < 1e-3, k
    # and the exact definition on the true disk positions of the same scan is exact
    from diffkit.strain.lattice import fit_lattice, strain_from_lattice

    T = np.stack([scan.truth.disk_x.values, scan.truth.disk_y.values], -1).astype(float)
    f = fit_lattice(T.reshape(-1, T.shape[2], 2), None, np.isfinite(T[..., 0]).reshape(-1, T.shape[2]),
                    G_guess=np.array([[ds.attrs["lattice_guess_G_px"]]]).reshape(2, 2),
                    origin_guess=ds.attrs["lattice_guess_origin_px"])
    G = f.G.reshape(T.shape[0], T.shape[1], 2, 2)
    ex = strain_from_lattice(G, np.median(G[ref], axis=0))
    assert np.abs(ex["exx"] - scan.truth.exx.values).max() < 2e-6  # float32 truth positions
    # the ramp is resolved
    assert np.all(np.diff(ds.exx.values[:, 7:].mean(0)) > 0.003)
    assert ds.attrs["strain_definition"].startswith("F = G^-T G0^T")


def test_detection_recall_precision_on_held_out_patterns(models):
    """Patterns from a seed the training never used; required disks: whole, SNR >= 8 (see the model card)."""
    import torch

    from diffkit.models.disks_training import DiskTrainConfig, draw_batch, render_pool

    cfg = DiskTrainConfig()
    tabs = [nbed.disk_intensity_table(nbed.small_table_spec("Si", "001")),
            nbed.disk_intensity_table(nbed.small_table_spec("SrTiO3", "001"))]
    rng = np.random.default_rng(424242)
    # realistic NBED conditions: 4.5-6 px disks, random rotation, centre, thickness, tilt, strain up to 1 %
    cfg.alpha_mrad = (0.8, 1.9)  # within the small tables' direction range
    cfg.tilt_max_mrad = 0.8
    cfg.thickness_nm = (25.0, 115.0)
    cfg.radius_px = (4.5, 6.0)
    cfg.large_deformation_fraction = 0.0
    cfg.small_strain = 0.01
    pool = render_pool(tabs, 96, rng, cfg, H=96)
    x, pos, cls, rad, dose = draw_batch(pool, np.arange(96), rng, cfg, torch.Generator().manual_seed(7), augment=False,
                                        dose=np.full(96, 5e5))
    det = detect_disks(x, models=models, refine="cnn")  # default objectness threshold 0.6
    n_req = n_found = n_pred = n_ok = 0
    errs = []
    for b in range(96):
        P = det.positions[b][det.valid[b]]
        n_pred += len(P)
        on = np.isfinite(pos[b][:, 0])
        T = pos[b][on]  # every simulated disk (a detection of a faint disk is not a false positive)
        C = cls[b][on]
        n_req += int((C == 2).sum())
        if len(P) == 0:
            continue
        d = np.linalg.norm(P[:, None] - T[None], axis=-1)
        n_ok += int((d.min(1) < 0.5 * rad[b]).sum())
        for j in np.nonzero(C == 2)[0]:
            i = int(np.argmin(d[:, j]))
            if d[i, j] < 0.5 * rad[b]:
                n_found += 1
                errs.append(P[i] - T[j])
    recall, precision = n_found / n_req, n_ok / n_pred
    assert recall >= 0.99, recall  # measured 0.998
    assert precision >= 0.97, precision  # measured 0.983
    assert np.median(np.linalg.norm(errs, axis=1)) < 0.15


def test_nan_and_empty_frames_are_masked_not_fatal(field_scan, models):
    scan, ref = field_scan
    p = scan.patterns.copy()
    p[4, 5] = np.nan
    p[5, 6] = 0.0
    p[6, 7, 10:20, 10:20] = np.inf
    ds = map_strain(p, ref, calibration=scan.calibration, models=models, progress=False)
    st = ds.status.values
    assert st[4, 5] == 2 and st[5, 6] == 2 and st[6, 7] == 2
    assert np.isnan(ds.exx.values[4, 5]) and np.isnan(ds.exx.values[5, 6])
    assert (st == 0).sum() == st.size - 3
    det = detect_disks(p[4:6, 5:7].reshape(4, 128, 128), models=models)
    assert det.status.tolist() == [2, 0, 0, 2] and det.valid[0].sum() == 0
    with pytest.raises(BadInputError):
        map_strain(p[0], ref, models=models, progress=False)  # 3D, not a scan
    with pytest.raises(BadInputError):
        map_strain(p, np.zeros_like(ref), models=models, progress=False)  # empty reference region
    with pytest.raises(BadInputError):
        detect_disks(np.zeros((2, 2, 8, 8, 8)), models=models)


def test_missing_calibration_gives_clear_errors(field_scan, models):
    scan, ref = field_scan
    phases = [Phase.from_crystal(get_crystal("Si", "001"))]
    with pytest.raises(MissingCalibrationError, match="pixel_size_mrad"):
        phase_map(scan.patterns, phases, Calibration(beam_energy_kv=200), models=models)
    with pytest.raises(MissingCalibrationError):
        phase_map(scan.patterns, phases, None, models=models)
    with pytest.raises(MissingCalibrationError, match="pixel_size_mrad"):
        virtual_image(scan.patterns, "bf", calibration=Calibration(), outer_mrad=1.0)
    # strain itself needs no calibration
    ds = map_strain(scan.patterns[:3, :4], ref[:3, :4], calibration=None, models=models, progress=False)
    assert np.all(ds.status.values == 0)


def test_phase_map_of_two_phase_scan(models):
    t_si = nbed.disk_intensity_table(nbed.small_table_spec("Si", "001"))
    t_sto = nbed.disk_intensity_table(nbed.small_table_spec("SrTiO3", "001"))
    Y, X = 4, 6
    phase = np.zeros((Y, X), int)
    phase[:, 3:] = 1
    exx = np.where(phase == 0, 0.004, -0.003)  # a little strain in both: still classified
    scan = nbed.simulate_nbed(exx, 0.0, None, None, thickness_nm=60.0, phase=phase, tables=[t_si, t_sto],
                              convergence_mrad=1.0, pixel_size_mrad=0.2, detector_px=128, dose=5e5, seed=2,
                              rotation_deg=8.0)
    cands = [Phase.from_crystal(get_crystal("Si", "001")), Phase.from_crystal(get_crystal("SrTiO3", "001")),
             Phase.from_crystal(get_crystal("Si", "110"))]
    pm = phase_map(scan.patterns, cands, scan.calibration, models=models)
    np.testing.assert_array_equal(pm.phase.values, phase)
    assert np.nanmax(pm.mismatch.values) <= 1
    # d-spacings: Si 220 = 1.920 Å, SrTiO3 100 = 3.905 Å (strain within 0.5 %)
    assert np.allclose(pm.d1_angstrom.values[:, :3], 5.431 / np.sqrt(8), rtol=0.01)
    assert np.allclose(pm.d1_angstrom.values[:, 3:], 3.905, rtol=0.01)
    # with only Si candidates, the SrTiO3 region is 'unknown'
    pm2 = phase_map(scan.patterns, cands[:1], scan.calibration, models=models)
    assert np.all(pm2.phase.values[:, 3:] == -1) and np.all(pm2.phase.values[:, :3] == 0)


def test_virtual_bright_and_dark_field_images(table):
    Y, X = 2, 8
    t = np.broadcast_to(np.linspace(20, 115, X), (Y, X))
    scan = nbed.simulate_nbed(np.zeros((Y, X)), 0.0, thickness_nm=t, tables=[table], convergence_mrad=1.5,
                              pixel_size_mrad=0.3, detector_px=96, dose=np.inf, blur_px=0.3, background=0.0,
                              radial_background=0.0)
    p = scan.patterns
    cal = scan.calibration
    bf = virtual_image(p, "bf", calibration=cal)
    adf = virtual_image(p, "adf", calibration=cal)
    c = np.array(bf.attrs["center_px"])
    assert np.allclose(c, (47.5, 47.5), atol=0.05)
    yy, xx = np.mgrid[:96, :96]
    m = np.hypot(xx - c[0], yy - c[1]) < 1.5 / 0.3
    np.testing.assert_allclose(bf.values, (p * m).sum((2, 3)), rtol=1e-6)
    # BF (r < alpha) and ADF (r >= alpha) partition the detector exactly
    adf1 = virtual_image(p, "adf", calibration=cal, inner_mrad=1.5)
    np.testing.assert_allclose(bf.values + adf1.values, p.sum((2, 3), dtype=np.float64), rtol=1e-6)
    assert adf.attrs["inner_px"] == pytest.approx(1.5 * 1.5 / 0.3)
    # Bragg dark field on the (2, 2) disk of the known lattice
    k = int(np.nonzero((scan.truth.h.values == 2) & (scan.truth.k.values == 2))[0][0])
    k1 = int(np.nonzero((scan.truth.h.values == 2) & (scan.truth.k.values == -2))[0][0])
    d22 = np.array([scan.truth.disk_x.values[0, 0, k], scan.truth.disk_y.values[0, 0, k]]) - c
    d2m = np.array([scan.truth.disk_x.values[0, 0, k1], scan.truth.disk_y.values[0, 0, k1]]) - c
    G = np.stack([d22, d2m], 1)
    df = virtual_image(p, "df", calibration=cal, hk=(1, 0), lattice=(G, c))
    m2 = np.hypot(xx - c[0] - d22[0], yy - c[1] - d22[1]) < 5
    np.testing.assert_allclose(df.values, (p * m2).sum((2, 3)), rtol=1e-6)
    # Pendelloesung: with thickness, intensity swings between the undiffracted and the 220 disks
    assert np.corrcoef(bf.values[0], df.values[0])[0, 1] < -0.5
    with pytest.raises(BadInputError):
        virtual_image(p, "hologram", calibration=cal)


def test_strain_map_resumes_from_its_zarr_store(field_scan, models, tmp_path):
    scan, ref = field_scan
    store = tmp_path / "strain.zarr"
    calls = []

    class Stop(Exception):
        pass

    def stop_after_two(done, total, partial):
        calls.append(done)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        map_strain(scan.patterns, ref, calibration=scan.calibration, models=models, store=store, chunk_rows=2,
                   progress=False, callback=stop_after_two)
    import zarr

    done = zarr.open_group(str(store), mode="r")["done"][:]
    assert done.tolist() == [True, True, False, False]
    seen = []
    ds = map_strain(scan.patterns, ref, calibration=scan.calibration, models=models, store=store, chunk_rows=2,
                    progress=False, callback=lambda d, t, p: seen.append(d))
    assert seen == [6, 8]  # only the two missing blocks were processed
    full = map_strain(scan.patterns, ref, calibration=scan.calibration, models=models, chunk_rows=2, progress=False)
    for k in ("exx", "eyy", "exy", "g1x", "status"):
        np.testing.assert_allclose(ds[k].values, full[k].values, rtol=0, atol=1e-12)
    g = zarr.open_group(str(store), mode="r")
    np.testing.assert_allclose(g["exx"][:], full.exx.values, atol=1e-12)
    # a store made with other settings is not silently mixed
    with pytest.raises(BadInputError):
        map_strain(scan.patterns, ref, calibration=scan.calibration, models=models, store=store, chunk_rows=3,
                   progress=False)
