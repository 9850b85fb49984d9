"""diffkit's frozen-phonon multislice: against abTEM (stored reference), the Bloch solver, and itself."""
import dataclasses

import numpy as np
import pytest

from diffkit.sim.bloch import BlochSolver
from diffkit.sim.compare import bloch_pacbed_on_samples, ncc, read_thickness
from diffkit.sim.crystals import srtio3_001
from diffkit.sim.multislice import (MultisliceSpec, build_multislice_pacbeds, default_scan_per_cell,
                                    multislice_image, multislice_nbed, multislice_pacbed, to_pixel_grid)

REF = "tests/data/abtem_multislice_sto_small.npz"


def static(cr=None):
    return (cr or srtio3_001()).scaled_debye_waller(0.0)


def on_reference_grid(d, k):
    sel = np.isin(np.round(d.kx_mrad.values, 3), np.round(k, 3))
    assert sel.sum() == len(k)
    return d.values[:, sel][:, :, sel]


@pytest.fixture(scope="module")
def ref():
    with np.load(REF, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def small_spec(**kw):
    base = dict(crystal=srtio3_001(), cells=(4, 4), sampling_A=3.905 / 40, n_phonons=4, phonon_seed=7,
                scan_per_cell=6, max_angle_mrad=26)
    base.update(kw)
    return MultisliceSpec(**base)


def test_static_lattice_matches_abtem(ref):
    """Static SrTiO3 [001], 5-20 nm, with and without tilt: NCC >= 0.9999 and thickness read-out within 0.2 nm."""
    spec = small_spec(crystal=static(), n_phonons=0)
    for it, tilt in enumerate(ref["tilts_mrad"]):
        d = on_reference_grid(multislice_pacbed(spec, ref["cells"] * 0.3905, tuple(tilt), progress=False), ref["k_mrad"])
        for i in range(len(ref["cells"])):
            assert ncc(d[i], ref["static"][it, i]) > 0.9999
            assert np.sum(np.abs(d[i] - ref["static"][it, i])) < 0.01  # fraction of the incident beam
    # thickness read off abTEM's patterns with a diffkit series every unit cell
    series = multislice_pacbed(spec, np.arange(1, 56) * 0.3905, progress=False)
    S = on_reference_grid(series, ref["k_mrad"])
    t_read = read_thickness(ref["static"][0], S, series.thickness_nm.values)
    np.testing.assert_allclose(t_read, ref["cells"] * 0.3905, atol=0.2)


def test_frozen_phonons_close_to_abtem(ref):
    """Frozen phonons: diffkit (its own seed) is as close to abTEM as abTEM's two seeds are to each other,
    up to abTEM's own discretisation at this grid (see docs/simulation_validation.md), and far closer than
    the static lattice is (thermal scattering is really there)."""
    d = on_reference_grid(multislice_pacbed(small_spec(), ref["cells"] * 0.3905, progress=False), ref["k_mrad"])
    for i in range(len(ref["cells"])):
        a1, a2 = ref["fp1"][0, i], ref["fp2"][0, i]
        seed_spread = np.sqrt(np.mean((a1 - a2) ** 2))
        diff = np.sqrt(np.mean((d[i] - a1) ** 2))
        static_diff = np.sqrt(np.mean((ref["static"][0, i] - a1) ** 2))
        assert diff < 2.0 * seed_spread
        assert diff < 0.5 * static_diff


def test_tilt_convention_and_zolz_limit_match_bloch():
    """A thin static crystal: multislice = Bloch-wave ZOLZ solution (same potentials), tilt sign included."""
    cr = static()
    spec = MultisliceSpec(crystal=cr, cells=(4, 4), sampling_A=0.1, n_phonons=0, max_angle_mrad=26)
    sol = BlochSolver(cr, 200.0, g_max=2.5, absorption=0.0)
    d = multislice_pacbed(spec, [4.0], tilt_mrad=(2.0, -1.0), progress=False)
    ky, kx = d.ky_mrad.values, d.kx_mrad.values
    b = bloch_pacbed_on_samples(sol, ky, kx, 13.6, (2.0, -1.0), d.thickness_nm.values)
    mirror = bloch_pacbed_on_samples(sol, ky, kx, 13.6, (-2.0, -1.0), d.thickness_nm.values)
    assert ncc(d.values[0], b[0]) > 0.9995
    # the tilt is a small effect at 4 nm: the right sign leaves a far smaller residual than the mirror
    assert 1 - ncc(d.values[0], b[0]) < 0.2 * (1 - ncc(d.values[0], mirror[0]))


def test_deterministic_batched_and_flux():
    """Same seed = same pattern whatever the batch size; intensity is conserved without phonons."""
    spec = MultisliceSpec(cells=(2, 2), sampling_A=0.15, n_phonons=2, max_angle_mrad=60)
    a = multislice_pacbed(spec, [3.0, 6.0], progress=False, batch=64)
    b = multislice_pacbed(spec, [3.0, 6.0], progress=False, batch=7)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-9)
    c = multislice_pacbed(dataclasses.replace(spec, phonon_seed=1), [3.0, 6.0], progress=False)
    assert not np.allclose(a.values, c.values)
    s = multislice_pacbed(dataclasses.replace(spec, crystal=static(), n_phonons=0, max_angle_mrad=200), [3.0],
                          progress=False)
    assert 0.97 < float(s.sum()) <= 1.0 + 1e-4  # the rest left through the band limit


def test_outputs_nbed_image_cache_and_cancel(tmp_path):
    spec = MultisliceSpec(cells=(2, 2), sampling_A=0.15, n_phonons=1, max_angle_mrad=60)
    n = multislice_nbed(spec, [3.0], position_A=(0.0, 0.0), progress=False)
    assert n.dims == ("thickness_nm", "ky_mrad", "kx_mrad") and n.thickness_nm.values[0] == pytest.approx(3.124)
    img = multislice_image(spec, [3.0], [(7.0, 14.0), (40.0, 60.0)], scan_gpts=(4, 4), progress=False)
    assert img.shape == (2, 1, 4, 4)
    abf, adf = img.values[0, 0], img.values[1, 0]
    # on an atom column (0, 0) ABF is darker and ADF brighter than between columns
    assert abf[0, 0] < abf.max() and adf[0, 0] > adf.min()
    ds = build_multislice_pacbeds(spec, [(0.0, 0.0)], [2.0, 3.0], cache_dir=tmp_path, progress=False)
    cached = build_multislice_pacbeds(spec, [(0.0, 0.0)], [2.0, 3.0], cache_dir=tmp_path, progress=False,
                                      cancel=lambda: True)  # served from the cache: nothing to cancel
    np.testing.assert_array_equal(ds["pattern"].values, cached["pattern"].values)
    with pytest.raises(RuntimeError, match="cancelled"):
        build_multislice_pacbeds(spec, [(1.0, 0.0)], [2.0], cache_dir=tmp_path, progress=False, cancel=lambda: True)
    # binning onto a field wider than every sample's box conserves the intensity exactly
    binned = to_pixel_grid(ds["pattern"].values, ds.ky_mrad.values, ds.kx_mrad.values, 140, 1.0)
    np.testing.assert_allclose(binned.sum((-2, -1)), ds["pattern"].values.sum((-2, -1)), rtol=1e-5)
    # and puts the undiffracted disk's centre on the pixel grid's centre (k = 0 is a pixel corner)
    c = binned[0, 0]
    np.testing.assert_allclose(c[69, 69], c[70, 70], rtol=1e-4)


def test_default_scan_is_exact():
    """floor(2 alpha / g) + 1 positions: 5 at 13.6 mrad, 6 at 19.1 mrad (SrTiO3, 200 kV); 5 x 5 equals 7 x 7."""
    assert default_scan_per_cell(MultisliceSpec(convergence_mrad=13.6)) == 5
    assert default_scan_per_cell(MultisliceSpec(convergence_mrad=19.1)) == 6
    spec = MultisliceSpec(crystal=static(), cells=(2, 2), sampling_A=0.15, n_phonons=0, max_angle_mrad=40)
    a = multislice_pacbed(spec, [5.0], progress=False)
    b = multislice_pacbed(dataclasses.replace(spec, scan_per_cell=7), [5.0], progress=False)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-3, atol=1e-7)
