"""Weak bad input: renamed text files, negative counts, impossible calibration, one saturated frame in a strain map."""
from __future__ import annotations

import numpy as np
import pytest

from diffkit.calibration import Calibration
from diffkit.data import FRAME_STATUS_REASONS, FourDSTEM
from diffkit.errors import BadInputError
from diffkit.io import load


@pytest.mark.parametrize("content", [b"api_key: 123\nhello world\n", b"PK\x03\x04 zip bytes", b""])
def test_non_npy_file_named_npy(tmp_path, content):
    f = tmp_path / "scan.npy"
    f.write_bytes(content)
    with pytest.raises(BadInputError, match="not a .npy file|.npz archive") as err:
        load(f)
    assert "allow_pickle" not in str(err.value) and "api_key" not in str(err.value)


def test_object_npy_is_refused_without_pickle_advice(tmp_path):
    f = tmp_path / "obj.npy"
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match="Python objects") as err:
        load(f)
    assert "allow_pickle" not in str(err.value)
    np.save(f, np.ones((2, 2, 8, 8), complex))
    with pytest.raises(BadInputError, match="complex128"):
        load(f)


def test_negative_counts_are_not_ok():
    a = np.random.default_rng(0).poisson(50, (3, 4, 16, 16)).astype(np.float32)
    a[0, 1] *= -1
    a[2, 3, 0, 0] = -100
    r = FourDSTEM(a).check()
    assert not r["ok"] and r["n_bad"] == 2 and r["counts"][FRAME_STATUS_REASONS[4]] == 2
    assert r["positions"][FRAME_STATUS_REASONS[4]] == [(0, 1), (2, 3)]
    with pytest.raises(BadInputError, match="negative counts"):
        FourDSTEM(a.astype(np.int32)).check(raise_on_bad=True)
    # small dark-subtraction noise in a bright frame stays ok
    b = a.copy()
    b[0, 1] = 50
    b[2, 3, 0, 0] = -2
    assert FourDSTEM(b).check()["ok"]


def test_impossible_pixel_size_is_an_error_not_no_contrast():
    from diffkit.pacbed import load_predictor

    pred = load_predictor(material="SrTiO3", zone="001", energy_kv=200, convergence_mrad=13.6, device="cpu")
    pats = np.ones((1, 96, 96), np.float32)
    for px in (1e6, 1e-6):
        with pytest.raises(BadInputError, match="pixel"):
            pred.predict_batch(pats, pixel_size_mrad=px)


# --------------------------------------------------------------------------- strain maps


@pytest.fixture(scope="module")
def nbed_scan():
    from diffkit.strain import nbed
    from diffkit.strain.detect import load_disk_models

    table = nbed.disk_intensity_table(nbed.small_table_spec())
    z = np.zeros((2, 3))
    scan = nbed.simulate_nbed(z, z, z, None, thickness_nm=50, tilt_mrad=None, tables=[table], convergence_mrad=1.0,
                              pixel_size_mrad=0.2, detector_px=128, dose=2e5, blur_px=0.5, background=0.003, seed=5)
    return np.round(scan.patterns).astype(np.uint16), scan.calibration, load_disk_models(device="cpu")


@pytest.mark.parametrize("kind", ["whole frame", "block"])
def test_one_saturated_frame_never_sinks_a_strain_map(nbed_scan, kind):
    from diffkit.strain.mapping import map_strain

    p, cal, models = nbed_scan
    p = p.copy()
    if kind == "whole frame":
        p[1, 1] = 65535
    else:
        p[1, 1, 30:100, 30:100] = 65535
    ds = map_strain(FourDSTEM(p, calibration=cal), None, models=models, progress=False)
    st = ds.status.values
    assert st[1, 1] == 6 and np.isnan(ds.exx.values[1, 1])
    assert (st == 0).sum() == st.size - 1
    assert "saturated" in ds.attrs["status_codes"]


@pytest.mark.parametrize("cal,match", [
    (dict(convergence_mrad=1e6, pixel_size_mrad=0.2), "disk radius"),
    (dict(convergence_mrad=1.0, pixel_size_mrad=1e6), "pixel size"),
    (dict(pixel_size_mrad=1e6), "pixel size"),
])
def test_impossible_strain_calibration_is_a_clear_error(nbed_scan, cal, match):
    from diffkit.strain.mapping import map_strain

    p, _, models = nbed_scan
    with pytest.raises(BadInputError, match=match):
        map_strain(p, None, calibration=Calibration(**cal), models=models, progress=False)
