"""Physics invariants of the Bloch-wave simulation, the PACBED library and the detector model."""
import numpy as np
import pytest
import torch

from diffkit.sim.bloch import BlochSolver
from diffkit.sim.crystals import silicon_001, silicon_110, srtio3_001
from diffkit.sim.detector import DetectorParams, apply_detector
from diffkit.sim.pacbed import LibrarySpec, build_pacbed_library
from diffkit.sim.scattering import electron_scattering_factor, wavelength_angstrom
from diffkit.sim.tds import tds_mean_free_path_nm


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory):
    spec = LibrarySpec(thickness_nm=(2.0, 4.0, 8.0, 16.0, 16.5, 30.0), tilt_max_mrad=0.6, n_px=32, g_max=1.2)
    return build_pacbed_library(spec, cache_dir=tmp_path_factory.mktemp("lib"), progress=False).load()


def test_wavelength_and_scattering_factors():
    assert wavelength_angstrom(200) == pytest.approx(0.025079, abs=2e-6)
    assert wavelength_angstrom(300) == pytest.approx(0.019687, abs=2e-6)
    # f(0) grows with Z; f decreases with g
    f0 = [electron_scattering_factor(e, 0.0) for e in ("O", "Si", "Ti", "Sr")]
    assert np.all(np.diff(f0) > 0)
    g = np.linspace(0, 3, 20)
    assert np.all(np.diff(electron_scattering_factor("Sr", g)) < 0)


def test_bloch_unitary_without_absorption_and_lossy_with():
    s0 = BlochSolver(srtio3_001(), 200, g_max=1.5, absorption=0.0)
    q = np.array([[0.0, 0.0], [3.0, -1.5], [8.0, 5.0]])
    tot = s0.transmitted_fraction(q, [1, 40, 120])
    np.testing.assert_allclose(tot, 1.0, atol=2e-5)
    s1 = BlochSolver(srtio3_001(), 200, g_max=1.5, absorption=0.02)
    tot = s1.transmitted_fraction(q, [1, 40, 120])
    assert np.all(np.diff(tot, axis=1) < 0) and np.all(tot < 1)


def test_bloch_kinematic_limit():
    """For a very thin crystal |phi_g| = pi t |U_g| / K (first Born approximation)."""
    s = BlochSolver(srtio3_001(), 200, g_max=1.5, absorption=0.0)
    t_nm = 0.2
    amp = s.amplitudes([[0.0, 0.0]], [t_nm])[0, :, 0]
    for hk in [(1, 1), (2, 0), (1, 0)]:
        i = int(np.nonzero((s.hk[:, 0] == hk[0]) & (s.hk[:, 1] == hk[1]))[0][0])
        expected = np.pi * t_nm * 10 * abs(s.structure_potential(*hk)) / s.K
        assert abs(amp[i]) == pytest.approx(expected, rel=0.05)


def test_structure_factor_extinctions_and_symmetry():
    s = BlochSolver(silicon_001(), 200, g_max=1.0)
    # diamond [001]: (1,0,0) and (2,1,0)-type ZOLZ reflections are forbidden in the projected cell
    assert abs(s.structure_potential(1, 0)) < 1e-10
    assert abs(s.structure_potential(2, 2)) > 1e-3
    assert len(silicon_110().sites) == 4
    u = s.U
    np.testing.assert_allclose(u, u.conj().T, atol=1e-12)  # Hermitian elastic potential


def test_tds_mean_free_path_plausible():
    # heavier, denser SrTiO3 scatters more than Si; both hundreds of nm at 200 kV
    l_sto = tds_mean_free_path_nm(srtio3_001(), 200)
    l_si = tds_mean_free_path_nm(silicon_001(), 200)
    assert 100 < l_sto < l_si < 2000


def test_library_fourfold_symmetry_at_zero_tilt(tiny_library):
    lib = tiny_library
    i0 = int(np.nonzero((lib.tilt_x_mrad.values == 0) & (lib.tilt_y_mrad.values == 0))[0][0])
    for p in lib.pattern.values[i0]:
        np.testing.assert_allclose(p, np.rot90(p), rtol=1e-4, atol=1e-7 * p.max())
        np.testing.assert_allclose(p, p[:, ::-1], rtol=1e-4, atol=1e-7 * p.max())


def test_tilt_breaks_symmetry_in_the_right_direction(tiny_library):
    lib = tiny_library
    i = int(np.nonzero((lib.tilt_x_mrad.values > 0.5) & (lib.tilt_y_mrad.values == 0))[0][0])
    p = lib.pattern.values[i, 3]  # 16 nm
    # tilt along x keeps the mirror across the x axis (rows) but breaks the mirror across y (columns)
    np.testing.assert_allclose(p, p[::-1, :], rtol=1e-4, atol=1e-7 * p.max())
    assert np.abs(p - p[:, ::-1]).max() > 0.02 * p.max()
    # transpose of the (tx, 0) pattern equals the (0, tx) pattern by symmetry: asymmetric in rows instead
    assert np.abs(p.T - p.T[::-1, :]).max() > 0.02 * p.max()


def test_library_normalisation_and_thickness_ordering(tiny_library):
    P = tiny_library.pattern.values
    tot = P.sum(axis=(2, 3))
    assert np.all(tot <= 1.0 + 1e-5) and np.all(tot > 0.5)
    assert np.all(np.diff(tot[:, [0, 1, 2, 3, 5]], axis=1) < 0)  # more scattering out of the field with thickness

    def ncc(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    p = P[0]
    # patterns 0.5 nm apart are nearly identical; far apart, clearly different
    assert ncc(p[3], p[4]) > 0.99
    assert ncc(p[3], p[4]) > ncc(p[3], p[2]) > ncc(p[3], p[0])
    assert ncc(p[0], p[5]) < ncc(p[3], p[4]) - 0.03


def test_library_is_cached_and_resumes(tmp_path):
    spec = LibrarySpec(thickness_nm=(5.0,), tilt_max_mrad=0.0, n_px=32, g_max=1.0, tds=False)
    a = build_pacbed_library(spec, cache_dir=tmp_path, progress=False)
    assert a.attrs["complete"]
    b = build_pacbed_library(spec, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(a.pattern.values, b.pattern.values)
    assert len(list(tmp_path.glob("*.zarr"))) == 1


def test_detector_dose_noise_and_geometry():
    n = 64
    yy, xx = np.mgrid[:n, :n]
    disk = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 10**2).astype(np.float32)
    p = DetectorParams.identity(2)
    p.dose[:] = [1e4, 1e7]
    g = torch.Generator().manual_seed(0)
    y = apply_detector(np.stack([disk, disk]), p, generator=g).numpy()
    assert y[0].sum() == pytest.approx(1e4, rel=0.05)
    assert np.allclose(y[0], np.round(y[0]))  # counts
    rel_noise = [np.std(y[i][disk > 0]) / np.mean(y[i][disk > 0]) for i in range(2)]
    assert rel_noise[0] > 10 * rel_noise[1]  # Poisson: noise falls as 1/sqrt(dose)
    # a shift of (dy, dx) moves the centre of mass by the same amount
    p = DetectorParams.identity(1)
    p.shift_px[:] = [3.0, -2.0]
    z = apply_detector(disk[None], p).numpy()[0]
    cy, cx = (z * yy).sum() / z.sum(), (z * xx).sum() / z.sum()
    assert (cy - 31.5, cx - 31.5) == pytest.approx((3.0, -2.0), abs=0.05)
    # same seed, same noise
    p = DetectorParams.identity(1)
    p.dose[:] = 1e5
    a = apply_detector(disk[None], p, generator=torch.Generator().manual_seed(1))
    b = apply_detector(disk[None], p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_affine_similarity_part_matches_detector_rotation_and_scale():
    """The rotation/scale part of the residual affine distortion is what the evaluation and the
    alignment training take as ground truth: a pure-rotation affine must equal the detector
    rotation by -phi, a pure-scale affine the camera-length scale."""
    import dataclasses

    from diffkit.sim.detector import DetectorParams, apply_detector, similarity_part

    n = 64
    yy, xx = np.indices((n, n)) - (n - 1) / 2
    pat = (np.hypot(yy, xx) < 14) * (1.0 + 0.5 * (xx > 3) + 0.3 * (yy > 5)) + 0.01  # no symmetry
    pats = np.stack([pat, pat]).astype(np.float32)
    phi = np.deg2rad(7.0)
    rot = np.array([[np.cos(phi), np.sin(phi)], [-np.sin(phi), np.cos(phi)]])
    aff = np.stack([rot, 1.03 * np.eye(2)])
    k, phi_deg = similarity_part(aff)
    np.testing.assert_allclose(k, [1.0, 1.03], atol=1e-12)
    np.testing.assert_allclose(phi_deg, [7.0, 0.0], atol=1e-9)

    ident = DetectorParams.identity(2)
    by_affine = apply_detector(pats, dataclasses.replace(ident, affine=aff)).numpy()
    by_geometry = apply_detector(pats, dataclasses.replace(ident, rotation_deg=np.array([-7.0, 0.0]),
                                                           scale=np.array([1.0, 1.03]))).numpy()
    for a, b in zip(by_affine, by_geometry):  # same geometry (the scale also rescales counts per px)
        a, b = a / a.sum(), b / b.sum()
        assert np.abs(a - b).max() < 1e-3 * a.max()
    # and a wrong sign is clearly different
    wrong = apply_detector(pats[:1], dataclasses.replace(ident.subset([0]), rotation_deg=np.array([7.0]))).numpy()[0]
    assert np.abs(wrong - by_affine[0]).max() > 0.1 * by_affine[0].max()
