"""Strain definition, lattice fit, lattice guess and phase classification (no networks needed)."""
import numpy as np
import pytest

from diffkit.errors import BadInputError
from diffkit.sim.crystals import get_crystal
from diffkit.strain import nbed
from diffkit.strain.lattice import (autocorrelation, fit_lattice, lattice_guess_autocorrelation, linearised_strain,
                                    reduce_basis, reference_lattice, region_mask, strain_from_deformation,
                                    strain_from_lattice)
from diffkit.strain.phases import Phase, classify_lattices, lattice_metrics

G0 = np.array([[23.0, 23.0], [-23.0, 23.0]])  # columns: Si 220-type vectors in px


def test_exact_strain_definition_recovers_input_and_differs_from_linearised():
    for exx, eyy, exy, th in [(0.01, 0.0, 0.0, 0.0), (0.0085, -0.002, 0.003, 0.15), (-0.01, 0.01, -0.004, -0.3)]:
        F = nbed.deformation_gradient(exx, eyy, exy, th)
        G = np.linalg.inv(F).T @ G0  # g = F^-T g0
        e = strain_from_lattice(G, G0)
        assert e["exx"] == pytest.approx(exx, abs=1e-12)
        assert e["eyy"] == pytest.approx(eyy, abs=1e-12)
        assert e["exy"] == pytest.approx(exy, abs=1e-12)
        assert e["theta_deg"] == pytest.approx(th, abs=1e-10)
    # py4DSTEM's linearised form (e = 1 - beta) is biased by -e^2 for a stretch e
    for e1 in (0.0085, 0.01, 0.02):
        G = np.linalg.inv(nbed.deformation_gradient(e1, 0.0)).T @ G0
        lin = linearised_strain(G, G0)["exx"]
        assert lin == pytest.approx(e1 / (1 + e1), abs=1e-12)
        assert lin - e1 == pytest.approx(-e1**2, rel=0.05)  # -1.0e-4 at 1 %
    assert linearised_strain(np.linalg.inv(nbed.deformation_gradient(0.01, 0)).T @ G0, G0)["exx"] - 0.01 < -9.8e-5


def test_strain_frame_rotation_and_polar_rotation():
    F = nbed.deformation_gradient(0.01, 0.0, 0.0, 0.0)
    e = strain_from_deformation(F, frame_rotation_deg=90.0)
    assert e["eyy"] == pytest.approx(0.01, abs=1e-12) and e["exx"] == pytest.approx(0.0, abs=1e-12)
    e45 = strain_from_deformation(F, frame_rotation_deg=45.0)
    assert e45["exx"] == pytest.approx(0.005, abs=1e-12) and e45["exy"] == pytest.approx(-0.005, abs=1e-12)
    # rotation from the polar decomposition is exact; for a rigid rotation R the infinitesimal
    # strain (R + R^T)/2 - I = (cos t - 1) I is second order (-6e-6 at 0.2 deg)
    R = nbed._rot(0.2)
    e = strain_from_deformation(R)
    assert e["theta_deg"] == pytest.approx(0.2, abs=1e-12)
    assert e["exx"] == pytest.approx(np.cos(np.deg2rad(0.2)) - 1, abs=1e-15) and abs(e["exx"]) < 1e-5


def _lattice_points(G, o, hk):
    return o[None] + hk @ G.T


def test_fit_lattice_recovers_exact_vectors_with_missing_disks_and_outliers():
    rng = np.random.default_rng(0)
    F = nbed.deformation_gradient(0.007, -0.003, 0.002, 0.4)
    G = np.linalg.inv(F).T @ G0
    hk = np.array([(h, k) for h in range(-2, 3) for k in range(-2, 3)])
    pos = _lattice_points(G, np.array([63.7, 62.9]), hk)
    keep = rng.random(len(pos)) > 0.25
    keep[hk.tolist().index([0, 0])] = True
    p = pos[keep]
    # two spurious detections (noise blobs) far from lattice points
    p = np.vstack([p, [[40.0, 75.0], [90.0, 50.0]]])
    w = np.ones(len(p))
    fit = fit_lattice(p, w, G_guess=G0 * 1.01, origin_guess=(63.5, 63.5))
    assert fit.status == 0
    np.testing.assert_allclose(fit.G, G, atol=1e-6)
    assert fit.n_disks == keep.sum()
    e = strain_from_lattice(fit.G, G0)
    assert e["exx"] == pytest.approx(0.007, abs=1e-7) and e["exy"] == pytest.approx(0.002, abs=1e-7)


def test_fit_lattice_from_simulated_exact_disk_positions():
    tab = nbed.disk_intensity_table(nbed.small_table_spec())
    F = nbed.deformation_gradient(np.array([0.0, 0.01, -0.004]), np.array([0.0, -0.002, 0.006]),
                                  np.array([0.0, 0.001, 0.0]), np.array([0.0, 0.1, -0.2]))
    pos = nbed.disk_positions(tab, F, pixel_size_mrad=0.4, detector_px=128, rotation_deg=7.0)
    fits = fit_lattice(pos, None, G_guess=reduce_basis(np.linalg.inv(np.eye(2)).T @ (tab.g_mrad[1:3].T / 0.4)),
                       origin_guess=(63.5, 63.5))
    G = fits.G
    assert np.all(fits.status == 0)
    e = strain_from_lattice(G, G[0])
    R = nbed._rot(7.0)
    for i in range(3):
        Fd = R @ F[i] @ R.T  # the field in the detector frame
        want = strain_from_deformation(Fd)
        for k in ("exx", "eyy", "exy", "theta_deg"):
            assert e[k][i] == pytest.approx(want[k], abs=1e-9)


def test_autocorrelation_lattice_guess_from_noiseless_pattern():
    tab = nbed.disk_intensity_table(nbed.small_table_spec())
    F = nbed.deformation_gradient(0.005, 0.0)[None]
    im, pos = nbed.render_nbed(tab, F, [60.0], convergence_mrad=2.0, pixel_size_mrad=0.45, detector_px=96,
                               rotation_deg=10.0)
    G = lattice_guess_autocorrelation(im[0].numpy())
    o = pos[0, 0]
    # both guessed vectors must be lattice vectors of the true lattice, within 2 %
    true = pos[0, 1:5] - o
    for v in G.T:
        d = np.min(np.linalg.norm(true - v, axis=1))
        assert d < 0.02 * np.linalg.norm(v)
    ac = autocorrelation(im[0].numpy())
    assert ac.shape == (191, 191) and np.argmax(ac) == ac.size // 2  # zero displacement at the centre, no log


def test_reference_lattice_and_region_parsing():
    G = np.broadcast_to(G0, (4, 5, 2, 2)).copy()
    G[0, 0] *= 1.5
    st = np.zeros((4, 5), int)
    st[1, 1] = 3
    ref = reference_lattice(G, (slice(0, 4), slice(0, 5)), st)
    np.testing.assert_allclose(ref, G0)  # median ignores the outlier
    assert region_mask((0, 2, 1, 3), (4, 5)).sum() == 4
    with pytest.raises(BadInputError):
        reference_lattice(np.full((2, 2, 2, 2), np.nan), None)
    with pytest.raises(BadInputError):
        region_mask(np.ones((3, 3), bool), (4, 5))


def test_phase_classification_by_lattice_distances():
    si = Phase.from_crystal(get_crystal("Si", "001"))
    sto = Phase.from_crystal(get_crystal("SrTiO3", "001"))
    si110 = Phase.from_crystal(get_crystal("Si", "110"))
    # Si [001]: reduced ZOLZ basis = 220-type, |g| = sqrt(8)/a, 90 degrees
    assert si.g1 == pytest.approx(np.sqrt(8) / 5.431, rel=1e-9) and si.angle_deg == pytest.approx(90.0)
    assert sto.g1 == pytest.approx(1 / 3.905, rel=1e-9)
    phases = [si, sto, si110]
    B_si = np.array([[2, 2], [-2, 2]]).T / 5.431
    B_sto = np.eye(2) / 3.905
    rot = nbed._rot(23.0)
    cases = [
        (rot @ B_si, 0),
        (np.linalg.inv(nbed.deformation_gradient(0.006, -0.004, 0.002)).T @ B_si, 0),  # strained Si still Si
        (rot @ B_sto * 1.005, 1),
        (B_si * 1.06, -1),  # 6 % off everything: unknown
        (np.array([[1.0, 0.0], [0.5, 1.0]]).T / 3.905, -1),  # wrong angle
    ]
    G = np.stack([c[0] for c in cases])
    idx, mis = classify_lattices(G, phases, tolerance=0.02, angle_tolerance_deg=2.0)
    assert idx.tolist() == [c[1] for c in cases]
    assert np.all(mis[idx >= 0] <= 1)
    l1, l2, ang = lattice_metrics(G)
    assert np.all(l1 <= l2) and np.all((ang >= 60 - 1e-9) & (ang <= 90 + 1e-9))
    # Si [110] has a rectangular-centred ZOLZ lattice: {111} and {002}/{220} distances
    assert 1 / si110.g1 == pytest.approx(5.431 / np.sqrt(3), rel=1e-6)
