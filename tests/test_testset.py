"""Multislice test sets: reproducible draws, pickle-free files, clear errors, scored by the shipped model."""
import dataclasses

import numpy as np
import pytest

from diffkit.errors import BadInputError
from diffkit.sim.testset import MultisliceTestSetSpec, _tilt_draws, build_multislice_testset, load_testset

TINY = MultisliceTestSetSpec(n_tilts=1, thicknesses_per_tilt=3, cells=2, sampling_A=0.2, n_phonons=1,
                             thickness_nm=(4.0, 9.0), seed=990001)


def test_draws_are_independent_physics():
    """Each tilt gets its own phonon seed and Debye-Waller factors within ±20 % of the defaults."""
    spec = dataclasses.replace(TINY, n_tilts=6)
    draws = _tilt_draws(spec)
    assert len({d[2] for d in draws}) == 6
    from diffkit.sim.crystals import srtio3_001

    base = np.array([s.b_iso for s in srtio3_001().sites])
    for tilt, crystal, _ in draws:
        b = np.array([s.b_iso for s in crystal.sites])
        assert np.all(np.abs(b / base - 1) <= 0.2) and not np.allclose(b, base)
        assert np.hypot(*tilt) <= spec.tilt_max_mrad
    assert [d[0] for d in _tilt_draws(spec)] == [d[0] for d in draws]  # reproducible


def test_build_save_load_and_score(tmp_path):
    path = tmp_path / "ts.npz"
    test = build_multislice_testset(TINY, out=path, cache_dir=tmp_path / "cache", progress=False)
    loaded = load_testset(path)
    assert loaded["patterns"].shape == (3, 128, 128)
    np.testing.assert_array_equal(loaded["patterns"], test["patterns"])
    # thicknesses are whole unit cells of SrTiO3 inside the range
    t = loaded["thickness_nm"]
    assert np.all((t >= 3.9) & (t <= 9.1))
    np.testing.assert_allclose(t / 0.3905, np.round(t / 0.3905), atol=1e-3)
    assert loaded["meta"]["physics"] == "multislice" and len(loaded["meta"]["tilts"]) == 1
    from diffkit.models.pacbed_eval import evaluate
    from diffkit.pacbed import load_predictor

    rep, pred = evaluate(load_predictor(material="SrTiO3", zone="001", energy_kv=200, convergence_mrad=13.6), loaded)
    assert rep["n"] == 3 and 0.0 <= rep["thickness_within_2nm"] <= 1.0
    assert np.isfinite(pred["thickness_nm"]).all()


def test_bad_test_set_files(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_testset(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(BadInputError, match="not a readable"):
        load_testset(tmp_path / "junk.npz")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(BadInputError, match="not a diffkit PACBED test set"):
        load_testset(tmp_path / "foreign.npz")


def test_card_cross_physics_row_reproduces():
    """The model card's multislice row is what the stored independent test set gives today."""
    from diffkit.models.pacbed_eval import evaluate
    from diffkit.pacbed import load_predictor

    pred = load_predictor(material="SrTiO3", zone="001", energy_kv=200, convergence_mrad=13.6)
    card = pred.card["cross_physics"]["multislice"]
    rep, _ = evaluate(pred, load_testset("tests/data/multislice_testset_sto_13.6mrad.npz"))
    for k in ("thickness_within_1nm", "thickness_within_2nm", "tilt_within_0.25mrad", "thickness_coverage_68"):
        assert abs(rep[k] - card[k]) <= 0.05, k


def test_cli_evaluate_test_set(capsys, tmp_path):
    from diffkit.cli import main

    rc = main(["evaluate", "pacbed", "--test-set", "tests/data/multislice_testset_sto_13.6mrad.npz"])
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "thickness_within_2nm" in out and "own simulator (card)" in out
    assert main(["evaluate", "pacbed", "--test-set", str(tmp_path / "missing.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err
