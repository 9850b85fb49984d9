"""diffkit.data.FourDSTEM: validation, lazy content checks, PACBED, virtual images, chunking, dose."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from conftest import make_frames, make_truth

from diffkit.calibration import Calibration
from diffkit.data import FRAME_STATUS_REASONS, FourDSTEM, frame_chunks, validate_4d
from diffkit.errors import BadInputError, MissingCalibrationError

# --------------------------------------------------------------------------- construction / validation


def test_basic_properties_and_lazy_whole_frame_chunks(cal):
    a = make_frames((6, 5), 16)
    ds = FourDSTEM(a, calibration=cal, source="mem")
    assert isinstance(ds.data, da.Array)
    assert ds.shape == (6, 5, 16, 16) and ds.scan_shape == (6, 5) and ds.detector_shape == (16, 16)
    assert ds.dtype == np.uint16
    assert ds.data.chunks[2] == (16,) and ds.data.chunks[3] == (16,)
    np.testing.assert_array_equal(ds.data.compute(), a)


def test_dask_input_split_detector_is_rechunked_to_whole_frames():
    a = da.zeros((4, 4, 32, 32), chunks=(2, 2, 8, 8), dtype=np.float32)
    ds = FourDSTEM(a)
    assert ds.data.chunks[2:] == ((32,), (32,))
    assert ds.data.chunks[:2] == ((2, 2), (2, 2))  # scan chunks kept


def test_3d_stack_with_scan_shape_is_reshaped():
    a = make_frames((3, 4), 8)
    ds = FourDSTEM(a.reshape(12, 8, 8), scan_shape=(3, 4))
    assert ds.shape == (3, 4, 8, 8)
    np.testing.assert_array_equal(ds.data.compute(), a)


def test_3d_stack_wrong_scan_shape():
    with pytest.raises(BadInputError, match=r"scan_shape \(5, 5\) has 25 positions .* 12 frames"):
        FourDSTEM(np.zeros((12, 8, 8)), scan_shape=(5, 5), source="stack.npy")


def test_3d_stack_without_scan_shape_says_how_to_fix():
    with pytest.raises(BadInputError, match=r"got 3D shape \(12, 8, 8\).*scan_shape"):
        FourDSTEM(np.zeros((12, 8, 8)), source="stack.npy")


@pytest.mark.parametrize("shape", [(16, 16), (2, 2, 2, 8, 8), (8,)])
def test_wrong_ndim_names_shape_and_source(shape):
    with pytest.raises(BadInputError) as err:
        FourDSTEM(np.zeros(shape), source="weird.h5")
    msg = str(err.value)
    assert str(shape) in msg and "weird.h5" in msg and f"{len(shape)}D" in msg


@pytest.mark.parametrize("dtype,word", [(bool, "boolean"), (np.complex64, "complex"), (object, "object"),
                                        ("U3", "string")])
def test_non_numeric_dtype_refused(dtype, word):
    a = np.zeros((2, 2, 4, 4), dtype=dtype)
    with pytest.raises(BadInputError) as err:
        FourDSTEM(a, source="scan.npy")
    assert word in str(err.value) and "scan.npy" in str(err.value)
    assert isinstance(err.value, ValueError)  # generic handlers keep working


def test_non_square_detector_refused():
    with pytest.raises(BadInputError, match=r"detector not square in 'rect\.zarr': frames are 16 x 12 px"):
        FourDSTEM(np.zeros((2, 2, 16, 12)), source="rect.zarr")


def test_empty_array_refused():
    with pytest.raises(BadInputError, match=r"empty 4D-STEM array .*\(0, 3, 8, 8\)"):
        FourDSTEM(np.zeros((0, 3, 8, 8)))


def test_validate_4d_is_cheap_and_public():
    # validate_4d only looks at shape/dtype: a dask array of NaNs passes, content checks are separate
    a = da.full((2, 2, 4, 4), np.nan, chunks=(1, 2, 4, 4))
    assert validate_4d(a, "x") is a
    with pytest.raises(BadInputError, match="expected an array"):
        validate_4d([1, 2, 3], "list")


def test_non_native_byte_order_becomes_native():
    a = make_frames((2, 2), 8).astype(">u2")
    ds = FourDSTEM(a)
    assert ds.dtype.isnative and ds.dtype == np.uint16
    np.testing.assert_array_equal(ds.data.compute(), a)


def test_calibration_validation_and_dicts():
    with pytest.raises(BadInputError, match="beam_energy_kv must be a positive"):
        Calibration(beam_energy_kv=-200)
    ds = FourDSTEM(np.ones((2, 2, 4, 4)), calibration={"beam_energy_kv": 300, "calibration.pixel_size_mrad": 0.2})
    assert ds.calibration.beam_energy_kv == 300.0 and ds.calibration.pixel_size_mrad == 0.2
    with pytest.raises(BadInputError, match="unknown calibration field"):
        FourDSTEM(np.ones((2, 2, 4, 4)), calibration={"voltage": 300})


def test_truth_must_match_scan():
    with pytest.raises(BadInputError, match=r"truth map 'thickness_nm' .* scan shape \(6, 5\), the data has \(4, 5\)"):
        FourDSTEM(np.ones((4, 5, 4, 4)), truth=make_truth((6, 5)), source="sim")


def test_repr_shows_shape_chunks_dtype_calibration_and_missing():
    ds = FourDSTEM(np.ones((4, 5, 8, 8), np.uint16), Calibration(beam_energy_kv=200, pixel_size_mrad=0.5),
                   source="scan.zarr")
    r = repr(ds)
    assert "(4, 5, 8, 8)" in r and "uint16" in r and "chunks (4, 5, 8, 8)" in r
    assert "200 kV" in r and "0.5 mrad/px" in r
    assert "missing: convergence_mrad, scan_step_nm, material, zone_axis" in r


# --------------------------------------------------------------------------- content checks


def _bad_scan():
    a = make_frames((4, 5), 16).astype(np.float32)
    a[0, 1, 3, 3] = np.nan          # NaN frame
    a[1, 2, 0, 0] = np.inf          # inf frame
    a[2, 3] = 0                     # empty frame
    return a


def test_frame_status_codes_are_lazy_and_correct():
    a = _bad_scan()
    ds = FourDSTEM(a, source="bad.npy")
    st = ds.frame_status()
    assert isinstance(st, da.Array) and st.dtype == np.uint8 and st.shape == (4, 5)
    st = st.compute()
    expect = np.zeros((4, 5), np.uint8)
    expect[0, 1] = expect[1, 2] = 1
    expect[2, 3] = 2
    np.testing.assert_array_equal(st, expect)
    assert FRAME_STATUS_REASONS[1].startswith("non-finite") and FRAME_STATUS_REASONS[2].startswith("empty")


def test_saturated_integer_frames_use_dtype_max():
    a = make_frames((3, 3), 20)  # 400 px per frame, 1 % = 4 px
    a[0, 0].flat[:5] = 65535     # 1.25 % -> saturated
    a[1, 1].flat[:3] = 65535     # 0.75 % -> ok
    st = FourDSTEM(a).frame_status().compute()
    assert st[0, 0] == 3 and st[1, 1] == 0 and st.sum() == 3


def test_saturation_value_for_float_data():
    a = make_frames((2, 2), 10).astype(np.float32)
    a[1, 0].flat[:10] = 1000.0
    assert FourDSTEM(a).frame_status().compute().sum() == 0  # float: no default saturation level
    assert FourDSTEM(a, saturation_value=1000).frame_status().compute()[1, 0] == 3
    assert FourDSTEM(a).frame_status(saturation_value=999).compute()[1, 0] == 3


def test_check_summarises_and_raises():
    ds = FourDSTEM(_bad_scan(), source="bad.npy")
    s = ds.check()
    assert not s["ok"] and s["n_bad"] == 3 and s["n_frames"] == 20
    assert s["counts"][FRAME_STATUS_REASONS[1]] == 2 and s["counts"][FRAME_STATUS_REASONS[2]] == 1
    assert s["positions"][FRAME_STATUS_REASONS[2]] == [(2, 3)]
    with pytest.raises(BadInputError) as err:
        ds.check(raise_on_bad=True)
    msg = str(err.value)
    assert "bad.npy" in msg and "NaN" in msg and "empty" in msg and "(2, 3)" in msg
    assert FourDSTEM(make_frames((2, 2), 8)).check(raise_on_bad=True)["ok"]


# --------------------------------------------------------------------------- PACBED / virtual images


def test_pacbed_mean_excludes_bad_frames():
    a = _bad_scan()
    ds = FourDSTEM(a, source="bad.npy")
    good = np.ones((4, 5), bool)
    good[0, 1] = good[1, 2] = good[2, 3] = False
    p = ds.pacbed()
    assert p.dtype == np.float64 and p.shape == (16, 16)
    np.testing.assert_allclose(p, a[good].astype(np.float64).mean(0))
    # a region
    np.testing.assert_allclose(ds.pacbed(y=slice(3, 4), x=slice(0, 2)), a[3, 0:2].mean((0,)))
    np.testing.assert_allclose(ds.pacbed(y=3, x=4), a[3, 4])
    assert np.isnan(ds.pacbed(skip_bad=False)).any()


def test_pacbed_region_without_usable_frame():
    a = _bad_scan()
    with pytest.raises(BadInputError, match=r"no usable frame .* 'bad\.npy'"):
        FourDSTEM(a, source="bad.npy").pacbed(y=2, x=3)
    with pytest.raises(BadInputError, match="outside the scan"):
        FourDSTEM(a).pacbed(y=10)


def test_virtual_image_needs_pixel_size():
    ds = FourDSTEM(make_frames((2, 2), 8), Calibration(beam_energy_kv=200), source="nocal.npy")
    with pytest.raises(MissingCalibrationError, match=r"pixel_size_mrad \(mrad/px\)"):
        ds.virtual_image(0, 5)


def test_virtual_image_bright_field_and_annulus(cal):
    a = make_frames((3, 4), 16)
    ds = FourDSTEM(a, cal)
    r = np.hypot(*(np.indices((16, 16)) - 7.5)) * cal.pixel_size_mrad  # detector centre (7.5, 7.5) px
    bf = ds.virtual_image(0, 2.0)
    assert isinstance(bf.data, da.Array)  # lazy
    np.testing.assert_allclose(bf.values, (a * (r < 2.0)).sum((2, 3)))
    adf = ds.virtual_image(2.0, 4.0)
    np.testing.assert_allclose(adf.values, (a * ((r >= 2.0) & (r < 4.0))).sum((2, 3)))
    assert bf.dims == ("scan_y", "scan_x") and bf.attrs["units"] == "counts"
    np.testing.assert_allclose(bf.scan_x.values, np.arange(4) * 0.4)
    assert bf.scan_x.attrs["units"] == "nm"
    off = ds.virtual_image(0, 1.0, center_px=(3, 3))
    np.testing.assert_allclose(off.values, (a * (np.hypot(*(np.indices((16, 16)) - 3)) * 0.5 < 1.0)).sum((2, 3)))
    with pytest.raises(BadInputError, match="0 <= inner < outer"):
        ds.virtual_image(3, 2)


def test_virtual_image_without_scan_step_uses_positions():
    ds = FourDSTEM(make_frames((2, 3), 8), Calibration(pixel_size_mrad=1.0))
    v = ds.virtual_image(0, 2)
    assert v.attrs["scan_units"] == "px" and v.scan_x.attrs["units"] == "px"
    np.testing.assert_array_equal(v.scan_x.values, [0, 1, 2])


def test_to_xarray_dask_backed_with_units(cal):
    x = FourDSTEM(make_frames((2, 3), 8), cal, source="s").to_xarray()
    assert x.dims == ("scan_y", "scan_x", "det_y", "det_x") and isinstance(x.data, da.Array)
    assert x.det_x.attrs["units"] == "mrad" and x.scan_y.attrs["units"] == "nm"
    np.testing.assert_allclose(x.det_x.values, (np.arange(8) - 3.5) * 0.5)
    assert x.attrs["calibration.beam_energy_kv"] == 200.0 and x.attrs["source"] == "s"
    y = FourDSTEM(make_frames((2, 3), 8)).to_xarray()
    assert y.det_x.attrs["units"] == "px" and y.scan_y.attrs["units"] == "px"


# --------------------------------------------------------------------------- chunking / cropping


def test_frame_chunks_target_and_wide_rows():
    ch = frame_chunks((256, 256, 128, 128), 2)
    assert ch[1:] == (256, 128, 128)
    nbytes = np.prod(ch) * 2
    assert 32 * 2**20 <= nbytes <= 64 * 2**20
    # one scan row bigger than the target: split the row, frames stay whole
    ch = frame_chunks((4, 4096, 256, 256), 4)
    assert ch[0] == 1 and ch[2:] == (256, 256) and np.prod(ch) * 4 <= 64 * 2**20
    assert frame_chunks((10, 10, 8, 8), 2, rows=3) == (3, 10, 8, 8)


def test_rechunk_for_frames_on_a_large_lazy_array():
    big = da.zeros((128, 128, 128, 128), dtype=np.uint16, chunks=(128, 16, 16, 128))  # 512 MiB, never computed
    ds = FourDSTEM(big).rechunk_for_frames()
    rows = ds.data.chunks[0]
    assert ds.data.chunks[1] == (128,) and ds.data.chunks[2:] == ((128,), (128,))
    assert 32 * 2**20 <= rows[0] * 128 * 128 * 128 * 2 <= 64 * 2**20
    ds4 = ds.rechunk_for_frames(rows=4)
    assert set(ds4.data.chunks[0]) == {4}


def test_crop_data_and_truth():
    a = make_frames((6, 5), 8)
    ds = FourDSTEM(a, truth=make_truth((6, 5)), source="sim")
    c = ds.crop(slice(1, 4), slice(2, 5))
    assert c.shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(c.data.compute(), a[1:4, 2:5])
    np.testing.assert_array_equal(c.truth.thickness_nm.values, ds.truth.thickness_nm.values[1:4, 2:5])
    r = ds.crop_region((0, 2, 0, 1))
    assert r.shape == (2, 1, 8, 8) and r.attrs["region"] == [0, 2, 0, 1]
    with pytest.raises(BadInputError, match=r"not inside the 6 x 5 scan in 'sim'"):
        ds.crop_region((0, 7, 0, 2))
    with pytest.raises(BadInputError, match="selects no scan positions"):
        ds.crop(slice(3, 3))


# --------------------------------------------------------------------------- dose


def test_with_dose_mean_and_poisson_statistics():
    a = np.full((8, 8, 16, 16), 7, np.uint16)  # uniform: every pixel has the same expectation
    ds = FourDSTEM(a)
    lam = 5.0
    d = ds.with_dose(lam * 256, seed=3)
    x = d.data.compute()
    assert x.dtype == np.float32 and np.all(x == np.round(x))  # counts
    assert abs(x.sum((2, 3)).mean() - lam * 256) < 4 * np.sqrt(lam * 256 / 64)
    assert abs(x.mean() - lam) < 0.05 and abs(x.var() / x.mean() - 1) < 0.05  # Poisson: var == mean
    np.testing.assert_array_equal(x, ds.with_dose(lam * 256, seed=3).data.compute())  # reproducible
    assert not np.array_equal(x, ds.with_dose(lam * 256, seed=4).data.compute())
    assert d.attrs["dose_e_per_frame"] == lam * 256


def test_with_dose_crop_commutes_and_nan_pixels_stay_nan():
    a = make_frames((6, 5), 8).astype(np.float32)
    a[2, 2, 0, 0] = np.nan
    ds = FourDSTEM(a, attrs={"frame_sum_mean": 100.0}).rechunk_for_frames(rows=2)
    full = ds.with_dose(50, seed=1)
    np.testing.assert_array_equal(full.crop(slice(2, 5), slice(1, 4)).data.compute(),
                                  full.data.compute()[2:5, 1:4])
    x = full.data.compute()
    assert np.isnan(x[2, 2, 0, 0]) and np.isnan(x).sum() == 1  # non-finite pixels stay NaN, nothing else
    assert full.frame_status().compute()[2, 2] == 1
    # reference from attrs: scale = 50 / 100
    np.testing.assert_allclose(np.nanmean(x), np.nanmean(a) * 0.5, rtol=0.05)


@pytest.mark.parametrize("dose", [0, -5, float("nan"), "lots"])
def test_with_dose_rejects_bad_dose(dose):
    with pytest.raises(BadInputError, match="dose"):
        FourDSTEM(np.ones((2, 2, 4, 4))).with_dose(dose)
