"""diffkit.io: round trips for every native format, vendor formats via rosettasciio, bad files."""
from __future__ import annotations

import json
import pickle
import sys
import types

import dask.array as da
import h5py
import numpy as np
import pytest
import zarr
from conftest import make_frames, make_truth

from diffkit.calibration import Calibration
from diffkit.data import FourDSTEM
from diffkit.errors import BadInputError
from diffkit.io import electron_wavelength_nm, load, reciprocal_to_mrad, save_zarr

# --------------------------------------------------------------------------- npy


def test_npy_round_trip_lazy_memmap(tmp_path):
    a = make_frames((6, 5), 16)
    p = tmp_path / "scan.npy"
    np.save(p, a)
    ds = load(p, calibration=Calibration(pixel_size_mrad=0.5))
    assert isinstance(ds.data, da.Array) and ds.source == str(p)
    assert ds.data.chunks[2:] == ((16,), (16,))
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.calibration.pixel_size_mrad == 0.5 and ds.calibration.beam_energy_kv is None
    # the graph references the file, it does not embed the data (safe to ship to dask workers)
    assert len(pickle.dumps(ds.data)) < a.nbytes / 4
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds.data)).compute(), a)


def test_npy_rows_per_chunk_and_3d_stack(tmp_path):
    a = make_frames((6, 5), 8)
    p = tmp_path / "stack.npy"
    np.save(p, a.reshape(30, 8, 8))
    ds = load(p, scan_shape=(6, 5), chunks=2)
    assert ds.data.chunks == ((2, 2, 2), (5,), (8,), (8,))
    np.testing.assert_array_equal(ds.data.compute(), a)
    with pytest.raises(BadInputError, match=r"3D shape \(30, 8, 8\).*scan_shape"):
        load(p)


def test_truncated_npy_is_a_clear_error(tmp_path):
    p = tmp_path / "cut.npy"
    np.save(p, make_frames((4, 4), 16))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInputError) as err:
        load(p)
    assert str(p) in str(err.value) and "truncated" in str(err.value)
    assert err.value.__suppress_context__  # no numpy traceback chained under it


def test_garbage_npy(tmp_path):
    p = tmp_path / "junk.npy"
    p.write_bytes(b"this is not a numpy file at all" * 10)
    with pytest.raises(BadInputError, match="junk.npy"):
        load(p)


def test_npy_content_is_not_checked_at_load_but_by_check(tmp_path):
    a = make_frames((3, 3), 8).astype(np.float32)
    a[1, 1] = np.nan
    p = tmp_path / "nan.npy"
    np.save(p, a)
    ds = load(p)  # cheap: no data read
    with pytest.raises(BadInputError, match=r"1 of 9 frames in '.*nan\.npy'.*non-finite.*\(1, 1\)"):
        ds.check(raise_on_bad=True)


# --------------------------------------------------------------------------- HDF5 / EMD


def test_hdf5_single_4d_dataset_with_calibration_attrs(tmp_path):
    a = make_frames((5, 4), 16)
    p = tmp_path / "scan.h5"
    with h5py.File(p, "w") as f:
        f["meta/counts"] = np.arange(3)
        d = f.create_dataset("entry/frames", data=a, chunks=(1, 4, 16, 16), compression="gzip")
        d.attrs.update({"calibration.beam_energy_kv": 300.0, "calibration.convergence_mrad": 20.0,
                        "calibration.material": "Si"})
    ds = load(p)
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.attrs["hdf5_dataset"] == "entry/frames"
    assert (ds.calibration.beam_energy_kv, ds.calibration.convergence_mrad, ds.calibration.material) == (300, 20, "Si")
    # explicit calibration overrides field by field, keeps the rest
    ds2 = load(p, calibration=Calibration(beam_energy_kv=200, pixel_size_mrad=0.3))
    assert ds2.calibration.beam_energy_kv == 200 and ds2.calibration.convergence_mrad == 20
    assert ds2.calibration.pixel_size_mrad == 0.3 and ds2.calibration.material == "Si"
    assert len(pickle.dumps(ds.data)) < a.nbytes / 4


def test_hdf5_several_or_no_4d_datasets(tmp_path):
    p = tmp_path / "two.hdf5"
    with h5py.File(p, "w") as f:
        f["a"] = np.zeros((2, 2, 4, 4))
        f["b"] = np.ones((2, 2, 4, 4))
    with pytest.raises(BadInputError, match=r"several 4D datasets \(a, b\).*dataset="):
        load(p)
    np.testing.assert_array_equal(load(p, dataset="b").data.compute(), 1)
    with pytest.raises(BadInputError, match=r"dataset 'c' not found"):
        load(p, dataset="c")
    q = tmp_path / "none.h5"
    with h5py.File(q, "w") as f:
        f["img"] = np.zeros((8, 8))
    with pytest.raises(BadInputError, match=r"no 4D dataset .*none\.h5.*img \(8, 8\)"):
        load(q)


def test_hdf5_3d_stack_reshaped_lazily(tmp_path):
    a = make_frames((4, 3), 8)
    p = tmp_path / "stack.h5"
    with h5py.File(p, "w") as f:
        f["frames"] = a.reshape(12, 8, 8)
    ds = load(p, scan_shape=(4, 3), chunks=1)
    assert ds.data.chunks[0] == (1, 1, 1, 1)
    np.testing.assert_array_equal(ds.data.compute(), a)
    np.testing.assert_array_equal(ds.data[2:4, 1:3].compute(), a[2:4, 1:3])


def test_emd_02_layout_and_dim_calibration(tmp_path):
    a = make_frames((4, 5), 16)
    p = tmp_path / "scan.emd"
    with h5py.File(p, "w") as f:
        f.attrs.update({"version_major": 0, "version_minor": 2})
        g = f.create_group("data/scan_1")
        g.attrs["emd_group_type"] = 1
        g["data"] = a
        for i, (vals, units) in enumerate([(np.arange(4) * 0.25, "nm"), (np.arange(5) * 2.5, "Å"),
                                           (np.arange(16) * 0.1, "1/nm"), (np.arange(16) * 0.1, "1/nm")], 1):
            d = g.create_dataset(f"dim{i}", data=vals)
            d.attrs["units"] = units
        f["data/other/data"] = np.zeros((3, 3))  # not 4D, ignored
    ds = load(p, calibration={"beam_energy_kv": 200})
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.attrs["hdf5_dataset"] == "data/scan_1/data"
    assert ds.calibration.scan_step_nm == pytest.approx(0.25)
    # 0.1 1/nm at 200 kV: 0.1 * 0.0025079 nm * 1000 = 0.25079 mrad/px
    assert ds.calibration.pixel_size_mrad == pytest.approx(0.1 * electron_wavelength_nm(200) * 1e3)
    assert load(p).calibration.pixel_size_mrad is None  # 1/nm without a beam energy: left unknown


def test_truncated_hdf5_is_a_clear_error(tmp_path):
    p = tmp_path / "cut.h5"
    with h5py.File(p, "w") as f:
        f["frames"] = make_frames((8, 8), 32)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInputError) as err:
        load(p)
    assert str(p) in str(err.value) and "truncated" in str(err.value)


# --------------------------------------------------------------------------- zarr


def test_zarr_round_trip_with_truth(scan_zarr, cal):
    path, frames = scan_zarr
    ds = load(path)
    np.testing.assert_array_equal(ds.data.compute(), frames)
    assert ds.calibration == cal
    assert ds.attrs["simulation"] == {"seed": 0, "dose": "inf", "spec": [1, 2]}
    assert ds.attrs["original_source"] == "synthetic wedge"
    assert ds.attrs["frame_sum_mean"] == pytest.approx(frames.reshape(30, -1).sum(1).mean())
    ref = make_truth(frames.shape[:2])
    assert set(ds.truth.data_vars) == {"thickness_nm", "tilt_x_mrad", "disk_x"}
    np.testing.assert_array_equal(ds.truth.thickness_nm.values, ref.thickness_nm.values)
    assert ds.truth.thickness_nm.dims == ("scan_y", "scan_x")
    assert ds.truth.thickness_nm.attrs["units"] == "nm"
    assert ds.truth.thickness_nm.attrs["long_name"] == "specimen thickness"
    assert ds.truth.disk_x.dims == ("scan_y", "scan_x", "beam")
    np.testing.assert_array_equal(ds.truth.h.values, [0, 1, -1])


def test_zarr_layout_on_disk(scan_zarr):
    path, frames = scan_zarr
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["diffkit_format"] == "4dstem-v1"
    assert g.attrs["calibration.convergence_mrad"] == 13.6 and g.attrs["calibration.material"] == "SrTiO3"
    z = g["data"]
    assert z.chunks[1:] == frames.shape[1:]  # whole scan rows x whole frames
    assert z.compressors and z.metadata.dimension_names == ("scan_y", "scan_x", "det_y", "det_x")
    t = g["truth"]["thickness_nm"]
    assert t.attrs["units"] == "nm" and t.attrs["long_name"] == "specimen thickness"
    assert t.metadata.dimension_names == ("scan_y", "scan_x")
    json.dumps(dict(g.attrs))  # plain JSON
    assert not (path.parent / (path.name + ".tmp")).exists()


class _CountingArray:
    """Array-like that records the size of every read (to prove writes stream chunk by chunk)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim
        self.reads = []

    def __getitem__(self, key):
        out = self.a[key]
        self.reads.append(out.size)
        return out


def test_save_zarr_streams_chunks(tmp_path):
    a = make_frames((12, 4), 8)
    src = _CountingArray(a)
    ds = FourDSTEM(da.from_array(src, chunks=(2, 4, 8, 8)))
    save_zarr(ds, tmp_path / "s.zarr", rows=3)
    assert max(src.reads) <= 3 * 4 * 64  # never more than one stored chunk (3 rows) at a time
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["data"]
    assert z.chunks == (3, 4, 8, 8)
    np.testing.assert_array_equal(z[...], a)


def test_save_zarr_overwrite_rules(tmp_path, scan_zarr):
    path, frames = scan_zarr
    ds = FourDSTEM(np.ones((2, 2, 4, 4), np.float32))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_zarr(ds, path)
    save_zarr(ds, path, overwrite=True)
    assert load(path).shape == (2, 2, 4, 4) and load(path).truth is None
    d = tmp_path / "not_a_store"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not a zarr store"):
        save_zarr(ds, d, overwrite=True)
    assert (d / "precious.txt").exists()


def test_plain_zarr_array_and_file_url(tmp_path):
    a = make_frames((3, 3), 8)
    zarr.save_array(str(tmp_path / "plain.zarr"), a)
    ds = load((tmp_path / "plain.zarr").as_uri())
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.calibration.missing  # nothing known


# --------------------------------------------------------------------------- errors common to all formats


def test_missing_file(tmp_path):
    p = tmp_path / "nowhere" / "scan.zarr"
    with pytest.raises(FileNotFoundError, match=r"nowhere/scan\.zarr"):
        load(p)


def test_unknown_suffix_lists_formats(tmp_path):
    p = tmp_path / "scan.tiffx"
    p.write_bytes(b"x")
    with pytest.raises(BadInputError) as err:
        load(p)
    msg = str(err.value)
    assert "scan.tiffx" in msg and "'.tiffx'" in msg
    for suf in (".npy", ".h5", ".emd", ".zarr", ".mib", ".xml", ".blo", ".dm4"):
        assert suf in msg


def test_reader_argument_overrides_suffix(tmp_path):
    a = make_frames((2, 2), 8)
    p = tmp_path / "scan.bin"
    with open(p, "wb") as f:
        np.save(f, a)
    np.testing.assert_array_equal(load(p, reader="npy").data.compute(), a)
    with pytest.raises(BadInputError, match="unknown reader 'tiff'"):
        load(p, reader="tiff")


def test_unknown_option_is_a_type_error(tmp_path):
    p = tmp_path / "scan.npy"
    np.save(p, make_frames((2, 2), 8))
    with pytest.raises(TypeError, match="dataset"):
        load(p, dataset="x")


@pytest.mark.parametrize("shape,match", [((3, 3, 16, 12), "detector not square"), ((16, 16), "got 2D shape"),
                                         ((2, 2, 2, 8, 8), "got 5D shape")])
def test_bad_shapes_in_files_name_the_file(tmp_path, shape, match):
    for suffix in (".npy", ".h5", ".zarr"):
        p = tmp_path / f"bad{suffix}"
        if suffix == ".npy":
            np.save(p, np.zeros(shape, np.uint16))
        elif suffix == ".h5":
            with h5py.File(p, "w") as f:
                f["frames"] = np.zeros(shape, np.uint16)
        else:
            zarr.save_array(str(p), np.zeros(shape, np.uint16))
        with pytest.raises(BadInputError, match=match) as err:
            load(p, dataset="frames") if suffix == ".h5" else load(p)
        assert str(p) in str(err.value)


def test_complex_data_in_file_refused(tmp_path):
    p = tmp_path / "cplx.npy"
    np.save(p, np.zeros((2, 2, 4, 4), np.complex64))
    with pytest.raises(BadInputError, match=r"complex.*cplx\.npy"):
        load(p)


def test_unit_helpers():
    assert electron_wavelength_nm(200) == pytest.approx(0.0025079, rel=1e-4)
    assert electron_wavelength_nm(300) == pytest.approx(0.0019687, rel=1e-4)
    assert reciprocal_to_mrad(0.5, "mrad", None) == 0.5
    assert reciprocal_to_mrad(1e-3, "rad", None) == pytest.approx(1.0)
    assert reciprocal_to_mrad(0.01, "1/Å", 200) == pytest.approx(0.1 * electron_wavelength_nm(200) * 1e3)
    assert reciprocal_to_mrad(0.1, "1/nm", None) is None and reciprocal_to_mrad(0.1, "cm", 200) is None


# --------------------------------------------------------------------------- vendor formats (rosettasciio)


def _write_mib(path, frames):
    """Minimal Merlin MIB file: one 384-byte ASCII header + big-endian U16 pixels per frame."""
    _, _, h, w = frames.shape
    with open(path, "wb") as f:
        for i, fr in enumerate(frames.reshape(-1, h, w)):
            head = ",".join(["MQ1", f"{i + 1:06d}", "00384", "01", f"{w:04d}", f"{h:04d}", "U16", "   1x1", "01",
                             "2024-01-01T10:00:00.000000Z", "1000000ns", "0", ""]).encode()
            f.write(head + b" " * (384 - len(head)))
            f.write(fr[::-1].astype(">u2").tobytes())  # rsciio flips det_y on reading


def test_mib_round_trip(tmp_path):
    pytest.importorskip("rsciio.quantumdetector")
    a = make_frames((3, 4), 16)
    p = tmp_path / "scan.mib"
    _write_mib(p, a)
    ds = load(p, scan_shape=(3, 4), calibration=Calibration(beam_energy_kv=300))
    assert ds.dtype == np.uint16 and ds.dtype.isnative and ds.shape == (3, 4, 16, 16)
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.calibration.beam_energy_kv == 300 and ds.calibration.pixel_size_mrad is None


def test_garbled_mib(tmp_path):
    pytest.importorskip("rsciio.quantumdetector")
    p = tmp_path / "bad.mib"
    p.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(BadInputError, match=r"bad\.mib.*Merlin"):
        load(p)


def test_empad_round_trip_with_reciprocal_calibration(tmp_path):
    pytest.importorskip("rsciio.empad")
    rng = np.random.default_rng(0)
    a = rng.random((3, 4, 128, 128)).astype("<f4")
    raw = np.zeros((3, 4, 130, 128), "<f4")  # EMPAD frames carry 2 extra rows
    raw[:, :, :128] = a
    raw.tofile(tmp_path / "scan_x4_y3.raw")
    xml = tmp_path / "scan.xml"
    xml.write_text('<root><raw_file filename="scan_x4_y3.raw"/><pix_x>4</pix_x><pix_y>3</pix_y></root>')
    ds = load(xml, q_calibration=0.1, calibration={"beam_energy_kv": 200})
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.calibration.pixel_size_mrad == pytest.approx(0.1 * electron_wavelength_nm(200) * 1e3)


@pytest.fixture
def blockfile_writer(monkeypatch):
    """rosettasciio's blockfile writer; it imports scikit-image at module level but only uses it
    for intensity rescaling, which uint8 data never needs, so a stand-in is used when absent."""
    pytest.importorskip("rsciio")
    try:
        import skimage  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "skimage", types.ModuleType("skimage"))
    from rsciio.blockfile import file_writer

    return file_writer


def test_blockfile_round_trip(tmp_path, blockfile_writer):
    a = make_frames((3, 4), 16).astype(np.uint8)
    axes = [{"name": "y", "size": 3, "scale": 2.5, "offset": 0, "units": "nm", "navigate": True},
            {"name": "x", "size": 4, "scale": 2.5, "offset": 0, "units": "nm", "navigate": True},
            {"name": "ky", "size": 16, "scale": 0.1, "offset": 0, "units": "cm", "navigate": False},
            {"name": "kx", "size": 16, "scale": 0.1, "offset": 0, "units": "cm", "navigate": False}]
    sig = {"data": a, "axes": axes, "metadata": {}, "attributes": {"_lazy": False},
           "original_metadata": {"blockfile_header": {"Beam_energy": 300000, "Note": ""}}}
    p = tmp_path / "scan.blo"
    blockfile_writer(str(p), sig, show_progressbar=False)
    ds = load(p)
    np.testing.assert_array_equal(ds.data.compute(), a)
    assert ds.calibration.scan_step_nm == pytest.approx(2.5)
    assert ds.calibration.beam_energy_kv == pytest.approx(300)
    assert ds.calibration.pixel_size_mrad is None  # camera-plane cm cannot become mrad
    assert ds.attrs["detector_axes_units"] == "cm"


def test_garbled_dm4(tmp_path):
    pytest.importorskip("rsciio.digitalmicrograph")
    p = tmp_path / "bad.dm4"
    p.write_bytes(b"\x00\x00\x00\x04" + b"\xff" * 64)
    with pytest.raises(BadInputError, match=r"bad\.dm4.*DigitalMicrograph"):
        load(p)
