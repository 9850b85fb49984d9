"""diffkit's Bloch-wave PACBEDs of SrTiO3 [001] against a stored abTEM multislice reference.

The reference (``tests/data/abtem_reference_sto_13.6mrad.npz``) was made by
``benchmarks/bloch_vs_abtem.py --write-reference`` with abTEM 1.0.11 in a separate
environment (static lattice, 200 kV, 13.6 mrad, 16x16-cell supercell, 6x6 probe positions,
thicknesses 51/154/256 cells = 19.9/60.1/100.0 nm, tilt 0 and 2.41 mrad along +x); abTEM
is not needed here. See docs/simulation_validation.md.

To stay fast the comparison with abTEM uses the coarse 32-px grid of the reference and
renders diffkit's PACBED exactly as ``build_pacbed_library`` does (partial waves at the
odd fine-grid points, beam g of partial wave p on the pixel centre p + g, incident
direction p + tilt) but solves only the directions of a half (tilted along x) or a quarter
(untilted) of the aperture, the rest following from the mirror symmetry of the [001] zone.
A separate test checks that this rendering is identical to a library built by
``build_pacbed_library``.
"""
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from diffkit.sim.bloch import BlochSolver
from diffkit.sim.compare import ncc
from diffkit.sim.crystals import srtio3_001
from diffkit.sim.pacbed import LibrarySpec, build_pacbed_library

REF_PATH = pathlib.Path(__file__).parent / "data" / "abtem_reference_sto_13.6mrad.npz"
G_MAX = 2.5  # 1/Å; smaller values are not converged for a static (B = 0) lattice at 60-100 nm


def static_srtio3():
    """SrTiO3 [001] with B = 0 on every site: the static lattice of an abTEM potential (no
    Debye-Waller damping; the library's absorption ratio is then exactly 0)."""
    return srtio3_001().scaled_debye_waller(0.0)


def pacbed_at_pixel_centres(solver: BlochSolver, spec: LibrarySpec, tilt_steps: int, thickness_nm):
    """PACBED (n_thickness, ky, kx) on ``spec``'s pixel grid for a tilt of ``tilt_steps`` fine steps
    along +x, rendered like ``build_pacbed_library`` (elastic part, unit incident intensity)."""
    m = spec.steps_per_g
    n = spec.n_px
    r = spec.convergence_mrad / spec.fine_step_mrad
    c = np.arange(-int(r) - 2, int(r) + 3)
    c = c[c % 2 != 0]
    px_, py_ = np.meshgrid(c, c, indexing="ij")
    inside = np.hypot(px_, py_) < r
    p = np.stack([px_[inside], py_[inside]], axis=1)  # (x, y) fine coordinates, odd
    n_partial = len(p)
    keep = p[:, 1] > 0  # mirror y -> -y holds for tilts along x
    if tilt_steps == 0:
        keep &= p[:, 0] > 0  # and x -> -x without tilt
    p = p[keep]
    q_mrad = (p + np.array([tilt_steps, 0])) * spec.fine_step_mrad
    inten = solver.beam_intensities(q_mrad, thickness_nm, batch=32)  # (P, n_beams, T)
    kx = p[:, None, 0] + solver.hk[None, :, 0] * m
    ky = p[:, None, 1] + solver.hk[None, :, 1] * m
    col = (kx + n - 1) // 2
    row = (ky + n - 1) // 2
    ok = (col >= 0) & (col < n) & (row >= 0) & (row < n)
    out = np.zeros((len(thickness_nm), n, n))
    for t in range(len(thickness_nm)):
        np.add.at(out[t], (row[ok], col[ok]), inten[..., t][ok])
    out = out + out[:, ::-1, :]
    if tilt_steps == 0:
        out = out + out[:, :, ::-1]
    return out / n_partial


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF_PATH))


@pytest.fixture(scope="module")
def test_spec(ref):
    spec = LibrarySpec(crystal=static_srtio3(), n_px=int(ref["n_px_test"]), tilt_max_mrad=0.0, tds=False)
    assert spec.pixel_size_mrad == pytest.approx(float(ref["pixel_size_mrad_test"]), rel=1e-9)
    return spec


@pytest.fixture(scope="module")
def tilt_steps(ref, test_spec):
    steps = float(ref["tilt_x_mrad"][1]) / test_spec.fine_step_mrad
    assert steps == pytest.approx(round(steps), abs=1e-6)
    return int(round(steps))


@pytest.fixture(scope="module")
def diffkit_patterns(ref, test_spec, tilt_steps):
    solver = BlochSolver(test_spec.crystal, test_spec.energy_kv, g_max=G_MAX, absorption=0.0)
    t = ref["thickness_nm"]
    return np.stack([pacbed_at_pixel_centres(solver, test_spec, s, t) for s in (0, tilt_steps)])


def test_reference_file_is_small_and_on_diffkits_grids(ref):
    assert REF_PATH.stat().st_size < 1_000_000
    info = json.loads(str(ref["info"]))
    assert info["abtem"]["abtem_version"].startswith("1.")
    for key, npx in (("", "n_px"), ("_test", "n_px_test")):
        spec = LibrarySpec(n_px=int(ref[npx]), tilt_max_mrad=0.0)
        assert spec.pixel_size_mrad == pytest.approx(float(ref["pixel_size_mrad" + key]), rel=1e-9)
        for name in ("binned", "centres"):
            a = ref[name + key]
            assert a.dtype == np.float32 and a.shape == (2, 3, spec.n_px, spec.n_px)
            assert np.all(np.isfinite(a)) and a.min() >= 0
    # the untilted abTEM pattern has the 4mm symmetry; the tilted one only the mirror across x (rows)
    p0, p1 = ref["centres"][0, -1], ref["centres"][1, -1]
    assert np.abs(p0 - p0.T).max() < 1e-3 * p0.max() and np.abs(p0 - p0[:, ::-1]).max() < 1e-3 * p0.max()
    assert np.abs(p1 - p1[::-1, :]).max() < 1e-3 * p1.max() and np.abs(p1 - p1[:, ::-1]).max() > 0.1 * p1.max()


def test_symmetric_rendering_equals_the_library(tmp_path, ref, test_spec, tilt_steps):
    """The rendering used below is the library's (same pixels, tilt sign, normalisation)."""
    t = tuple(float(v) for v in ref["thickness_nm"])
    spec = dataclasses.replace(test_spec, thickness_nm=t, g_max=1.2,
                               tilt_max_mrad=tilt_steps * test_spec.fine_step_mrad * (1 - 1e-9))
    lib = build_pacbed_library(spec, cache_dir=tmp_path, progress=False).load()
    assert lib.attrs["absorption_ratio"] == 0.0
    solver = BlochSolver(spec.crystal, spec.energy_kv, g_max=spec.g_max, absorption=0.0)
    tx, ty = lib.tilt_x_mrad.values, lib.tilt_y_mrad.values
    for s in (0, tilt_steps):
        i = int(np.nonzero(np.isclose(tx, s * spec.fine_step_mrad) & (ty == 0))[0][0])
        mine = pacbed_at_pixel_centres(solver, spec, s, t)
        np.testing.assert_allclose(lib.pattern.values[i], mine, rtol=2e-4, atol=1e-6 * mine.max())


@pytest.mark.parametrize("it", [0, 1], ids=["untilted", "tilt_x_2.41mrad"])
def test_ncc_against_abtem(ref, diffkit_patterns, it):
    """NCC >= 0.99 at 20, 60 and 100 nm against abTEM's samples at the same pixel centres."""
    for iz, t in enumerate(ref["thickness_nm"]):
        r = ncc(diffkit_patterns[it, iz], ref["centres_test"][it, iz])
        assert r >= 0.99, f"tilt {ref['tilt_x_mrad'][it]:.2f} mrad, {t:.1f} nm: NCC {r:.4f}"


def test_tilt_direction_agrees_with_abtem(ref, diffkit_patterns):
    """abTEM Probe(tilt=(+t, 0)) corresponds to diffkit tilt_x = +t, not to its mirror image."""
    for iz in range(len(ref["thickness_nm"])):
        a = ref["centres_test"][1, iz]
        same = ncc(diffkit_patterns[1, iz], a)
        mirrored = ncc(diffkit_patterns[1, iz][:, ::-1], a)
        assert same > mirrored + 0.02, (iz, same, mirrored)


def test_intensity_scale_agrees_with_abtem(ref, diffkit_patterns):
    """Absolute scale: both are fractions of the incident intensity per pixel. abTEM's static-lattice
    multislice loses intensity to the higher-order Laue zones (FOLZ ring at ~113 mrad) and beyond its
    band limit, which a zero-order-Laue-zone Bloch solution keeps in the field, hence the loose bound;
    the bright-field disk must still agree closely at 20 nm."""
    n = diffkit_patterns.shape[-1]
    c = (np.arange(n) - (n - 1) / 2) * float(ref["pixel_size_mrad_test"])
    disk = np.hypot(c[:, None], c[None, :]) < 0.8 * float(ref["convergence_mrad"])
    ratio = diffkit_patterns[0, 0][disk].sum() / ref["centres_test"][0, 0][disk].sum()
    assert 0.9 < ratio < 1.1, ratio
    tot = diffkit_patterns.sum(axis=(-2, -1)) / ref["centres_test"].sum(axis=(-2, -1))
    assert np.all((tot > 1.0) & (tot < 1.35)), tot
