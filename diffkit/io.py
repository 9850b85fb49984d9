"""Read 4D-STEM data into :class:`~diffkit.data.FourDSTEM` (lazily) and write diffkit's zarr layout.

Formats (chosen by suffix, or by ``reader=``):

==============  ========================  ===============================================
reader          suffixes                  notes
==============  ========================  ===============================================
``npy``         ``.npy``                  memory-mapped; a 3D stack needs ``scan_shape=``
``hdf5``        ``.h5 .hdf5 .hdf .emd``   ``dataset=`` path, EMD 0.2 ``/data/*/data``, or
                                          the single 4D dataset; ``calibration.*`` attrs
``zarr``        ``.zarr`` (directory)     diffkit layout (below) or a single 4D array
``mib``         ``.mib``                  Merlin/Quantum Detectors, via rosettasciio
``empad``       ``.xml``                  EMPAD, via rosettasciio
``blockfile``   ``.blo``                  ASTAR/NanoMegas, via rosettasciio
``dm``          ``.dm3 .dm4``             DigitalMicrograph, via rosettasciio
==============  ========================  ===============================================

diffkit's zarr layout (``diffkit_format: "4dstem-v1"``): a zarr group with

* array ``data`` ``(scan_y, scan_x, det_y, det_x)``, chunks of a few scan rows x whole
  frames, compressed;
* group attrs ``calibration.<name>`` (:meth:`Calibration.to_attrs`), ``source``,
  ``frame_sum_mean`` (mean counts per frame), ``attrs`` (free-form metadata);
* optional group ``truth`` with one array per ground-truth map, dims ``(scan_y, scan_x, ...)``,
  attrs ``units`` and ``long_name`` (coordinates are stored alike with ``diffkit_coord: true``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np

from .calibration import Calibration
from .data import DIMS, FourDSTEM, _jsonable, frame_chunks, validate_4d
from .errors import BadInputError

__all__ = ["FORMATS", "SUFFIXES", "load", "save_zarr", "electron_wavelength_nm", "reciprocal_to_mrad"]

ZARR_FORMAT_TAG = "4dstem-v1"

#: reader name -> (suffixes, description)
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "npy": ((".npy",), "numpy .npy (memory-mapped)"),
    "hdf5": ((".h5", ".hdf5", ".hdf", ".emd"), "HDF5 / EMD 0.2"),
    "zarr": ((".zarr",), "zarr directory (diffkit layout or one 4D array)"),
    "mib": ((".mib",), "Merlin / Quantum Detectors MIB (rosettasciio)"),
    "empad": ((".xml",), "EMPAD .xml + .raw (rosettasciio)"),
    "blockfile": ((".blo",), "ASTAR / NanoMegas blockfile (rosettasciio)"),
    "dm": ((".dm3", ".dm4"), "DigitalMicrograph (rosettasciio)"),
}
#: suffix -> reader name
SUFFIXES = {suf: name for name, (sufs, _) in FORMATS.items() for suf in sufs}


def _supported() -> str:
    return "; ".join(f"{' '.join(s)} ({d})" for s, d in FORMATS.values())


# --------------------------------------------------------------------------- physics helpers

def electron_wavelength_nm(beam_energy_kv: float) -> float:
    """Relativistic electron wavelength in nm for an accelerating voltage in kV (200 kV -> 0.002508 nm)."""
    v = float(beam_energy_kv) * 1e3
    return 1.2264262862108 / math.sqrt(v * (1.0 + 0.97846914e-6 * v))


_RECIP_PER_NM = {"1/nm": 1.0, "nm^-1": 1.0, "nm-1": 1.0, "1 / nm": 1.0, "1/Å": 10.0, "1/A": 10.0, "Å^-1": 10.0,
                 "1/angstrom": 10.0, "A^-1": 10.0, "1 / Å": 10.0, "1/pm": 1e3, "1/m": 1e-9, "1/um": 1e-3,
                 "1/µm": 1e-3}
_ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3, "µrad": 1e-3, "urad": 1e-3, "deg": 1e3 * math.pi / 180, "°": 1e3 * math.pi / 180}
_LENGTH_NM = {"nm": 1.0, "Å": 0.1, "A": 0.1, "angstrom": 0.1, "Angstrom": 0.1, "pm": 1e-3, "µm": 1e3, "um": 1e3,
              "m": 1e9, "mm": 1e6}


def reciprocal_to_mrad(value: float, units: str, beam_energy_kv: float | None) -> float | None:
    """Convert a detector pixel size to mrad/px.

    ``mrad``/``rad``/``deg`` convert directly; reciprocal lengths (``1/nm``, ``1/Å`` ...,
    meaning 1/d) need the beam energy (kV): angle = wavelength x q (small angles). Returns
    ``None`` when the units are unknown or the beam energy is needed but missing.
    """
    if value is None or units is None:
        return None
    u = str(units).strip()
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(v) and v > 0):
        return None
    if u in _ANGLE_MRAD:
        return v * _ANGLE_MRAD[u]
    if u in _RECIP_PER_NM:
        if beam_energy_kv is None:
            return None
        return v * _RECIP_PER_NM[u] * electron_wavelength_nm(beam_energy_kv) * 1e3
    return None


def _length_nm(value, units) -> float | None:
    if value is None or units is None:
        return None
    u = str(units).strip()
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if u in _LENGTH_NM and math.isfinite(v) and v > 0:
        return v * _LENGTH_NM[u]
    return None


def _merge_calibration(file_cal: Calibration, explicit) -> Calibration:
    """``explicit`` (Calibration or dict) overrides ``file_cal`` field by field (None = keep file value)."""
    from .data import _as_calibration

    if explicit is None:
        return file_cal
    exp = _as_calibration(explicit)
    changes = {f.name: getattr(exp, f.name) for f in dataclasses.fields(Calibration) if getattr(exp, f.name) is not None}
    return file_cal.replace(**changes)


def _explicit_energy(explicit) -> float | None:
    if explicit is None:
        return None
    if isinstance(explicit, Calibration):
        return explicit.beam_energy_kv
    if isinstance(explicit, Mapping):
        v = explicit.get("beam_energy_kv", explicit.get("calibration.beam_energy_kv"))
        return None if v is None else float(v)
    return None


# --------------------------------------------------------------------------- lazy, picklable file arrays

class _NpyFrames:
    """Read-only, picklable view of a ``.npy`` file, memory-mapped on first access in each process."""

    def __init__(self, path: str, file_shape, dtype, shape=None):
        self.path = path
        self.file_shape = tuple(file_shape)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape or file_shape)
        self.ndim = len(self.shape)
        self._mm = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        return d

    def _array(self):
        if self._mm is None:
            mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
            self._mm = mm.reshape(self.shape)
        return self._mm

    def __getitem__(self, key):
        return np.array(self._array()[key])


class _H5Frames:
    """Picklable lazy view of one HDF5 dataset (opened on first access in each process)."""

    def __init__(self, path: str, dataset: str, file_shape, dtype, shape=None):
        self.path = path
        self.dataset = dataset
        self.file_shape = tuple(file_shape)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape or file_shape)
        self.ndim = len(self.shape)
        self._ds = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_ds"] = None
        return d

    def _dataset(self):
        if self._ds is None:
            import h5py

            self._ds = h5py.File(self.path, "r")[self.dataset]
        return self._ds

    def __getitem__(self, key):
        ds = self._dataset()
        try:
            if self.file_shape == self.shape:
                return np.asarray(ds[key])
            # 3D stack (N, H, W) seen as (Y, X, H, W): read whole scan rows, then select
            key = key if isinstance(key, tuple) else (key,)
            key = key + (slice(None),) * (4 - len(key))
            Y, X = self.shape[:2]
            ys = key[0] if isinstance(key[0], slice) else slice(int(key[0]), int(key[0]) + 1)
            y0, y1, _ = ys.indices(Y)
            rows = np.asarray(ds[y0 * X:y1 * X]).reshape((y1 - y0, X) + self.shape[2:])
            out = rows[(slice(None, None, ys.step),) + key[1:]]
            if not isinstance(key[0], slice):
                out = out[0]
            return out
        except OSError as exc:
            raise BadInputError(f"cannot read dataset {self.dataset!r} of {self.path!r} (truncated or corrupt "
                                f"HDF5 file?): {exc}") from None


def _from_lazy(obj, name: str, chunks):
    import dask.array as da

    ch = _chunk_spec(obj.shape, obj.dtype, chunks)
    return da.from_array(obj, chunks=ch, name=name, asarray=False, fancy=False)


def _chunk_spec(shape, dtype, chunks):
    if chunks in (None, "auto"):
        return frame_chunks(shape, np.dtype(dtype).itemsize)
    if isinstance(chunks, (int, np.integer)):
        return frame_chunks(shape, np.dtype(dtype).itemsize, rows=int(chunks))
    return chunks


def _token(path: str, *extra) -> str:
    from dask.base import tokenize

    st = os.stat(path)
    return tokenize(os.path.abspath(path), st.st_size, st.st_mtime_ns, *extra)


# --------------------------------------------------------------------------- path handling

def _local_path(path) -> tuple[str, bool]:
    """(path, is_local): ``file://`` URLs become local paths; other URLs stay as they are."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = p.decode()
    if "://" in p:
        proto = p.split("://", 1)[0]
        if proto in ("file", "local"):
            from fsspec.core import url_to_fs

            _, lp = url_to_fs(p)
            return lp, True
        return p, False
    return os.path.expanduser(p), True


def _reader_for(path: str, reader: str | None) -> str:
    if reader is not None:
        r = str(reader).lower().lstrip(".")
        if r in FORMATS:
            return r
        if "." + r in SUFFIXES:
            return SUFFIXES["." + r]
        raise BadInputError(f"unknown reader {reader!r} for {path!r}; supported readers: {', '.join(FORMATS)}")
    p = path.rstrip("/\\")
    low = p.lower()
    for suf, name in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if low.endswith(suf):
            return name
    if os.path.isdir(p) and any(os.path.exists(os.path.join(p, f)) for f in ("zarr.json", ".zgroup", ".zarray")):
        return "zarr"
    suffix = pathlib.PurePath(p).suffix or "(none)"
    raise BadInputError(f"unsupported file type {suffix!r} for {path!r}; supported: {_supported()}; "
                        "or pass reader=<one of " + ", ".join(FORMATS) + ">")


# --------------------------------------------------------------------------- public: load

def load(path, calibration: Calibration | Mapping | None = None, reader: str | None = None, chunks="auto",
         **kw) -> FourDSTEM:
    """Open a 4D-STEM file lazily as :class:`~diffkit.data.FourDSTEM`.

    Parameters
    ----------
    path : str or path-like
        File (or zarr directory); ``file://`` URLs are accepted, other URLs only for zarr.
    calibration : Calibration or dict, optional
        Overrides the calibration read from the file field by field (a ``None`` field
        keeps the file's value).
    reader : str, optional
        Force a reader (see :data:`FORMATS`) instead of choosing by suffix.
    chunks : "auto", int or tuple
        ``"auto"``: whole frames and a few scan rows (~48 MiB a chunk; zarr keeps its
        stored chunks when they hold whole frames); an int: scan rows per chunk; a tuple:
        explicit dask chunks.
    **kw
        Reader options: ``scan_shape=(scan_y, scan_x)`` (3D stacks: npy, HDF5, mib),
        ``dataset=`` (HDF5 dataset path), ``storage_options=`` (remote zarr),
        ``saturation_value=`` (counts), and for vendor formats any keyword of the
        rosettasciio ``file_reader`` (e.g. ``q_calibration`` for EMPAD).

    Returns
    -------
    FourDSTEM

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    BadInputError
        Unknown suffix, unreadable/truncated file, wrong shape or dtype.
    """
    raw = os.fspath(path) if not isinstance(path, str) else path
    p, local = _local_path(raw)
    name = _reader_for(p, reader)
    if local and not os.path.exists(p):
        raise FileNotFoundError(2, f"no such file or directory: {p!r}", p)
    if not local and name != "zarr":
        raise BadInputError(f"remote URLs are only supported for zarr stores; download {raw!r} first")
    saturation_value = kw.pop("saturation_value", None)
    fn = {"npy": _load_npy, "hdf5": _load_hdf5, "zarr": _load_zarr}.get(name)
    if fn is not None:
        ds = fn(p, calibration, chunks, **kw)
    else:
        ds = _load_vendor(p, name, calibration, chunks, **kw)
    if saturation_value is not None:
        ds.saturation_value = float(saturation_value)
    return ds


def _no_extra(kw, reader):
    if kw:
        raise TypeError(f"unexpected option(s) for the {reader} reader: {sorted(kw)}")


def open_npy(path) -> np.ndarray:
    """Memory-map a plain numeric ``.npy`` array (never pickled objects); :class:`BadInputError`
    with a plain reason for anything else (text, ``.npz``, object or complex arrays, damaged header)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        # never numpy's own message: for non-.npy bytes it suggests allow_pickle=True
        kind = "a .npz archive" if magic[:2] == b"PK" else "not a .npy file (no NumPy header; text or another format?)"
        raise BadInputError(f"cannot read {path!r}: it is {kind}; diffkit reads plain .npy arrays (numeric dtypes, "
                            "no pickled objects)")
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        msg = str(exc)
        why = ("it holds Python objects (pickled data), which diffkit never loads"
               if "pickle" in msg or "Python objects" in msg or "object" in msg else "truncated or damaged header")
        raise BadInputError(f"cannot read {path!r} as a .npy file: {why}") from None
    if not isinstance(mm, np.ndarray):
        raise BadInputError(f"{path!r} does not hold a single numpy array")
    if mm.dtype.kind not in "biuf":
        raise BadInputError(f"{path!r} holds {mm.dtype} data; diffkit needs numeric (integer or float) counts")
    return mm


def _load_npy(path, calibration, chunks, scan_shape=None, **kw) -> FourDSTEM:
    _no_extra(kw, "npy")
    mm = open_npy(path)
    file_shape, dtype = mm.shape, mm.dtype
    del mm
    view = validate_4d(_ShapeOnly(file_shape, dtype), path, scan_shape=scan_shape)
    obj = _NpyFrames(path, file_shape, dtype, shape=view.shape)
    arr = _from_lazy(obj, "npy-" + _token(path, obj.shape), chunks)
    return FourDSTEM(arr, calibration=_merge_calibration(Calibration(), calibration), source=path)


class _ShapeOnly:
    """Stand-in with shape/dtype, so validate_4d checks (and reshapes) metadata without data."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def reshape(self, shape):
        return _ShapeOnly(shape, self.dtype)


# --------------------------------------------------------------------------- HDF5 / EMD

def _h5_datasets(f):
    import h5py

    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append((name, obj.shape))

    f.visititems(visit)
    return found


def _emd_dims(f, group: str, beam_energy_kv):
    """Scan step (nm) and pixel size (mrad) from EMD 0.2 ``dim1..dim4`` vectors."""
    out = {}
    try:
        g = f[group]
        dims = [g.get(f"dim{i}") for i in range(1, 5)]
        for i, d in enumerate(dims):
            if d is None or d.shape[0] < 2:
                continue
            units = d.attrs.get("units", b"")
            units = units.decode() if isinstance(units, bytes) else str(units)
            step = abs(float(d[1]) - float(d[0]))
            if i < 2:
                v = _length_nm(step, units)
                if v is not None:
                    out.setdefault("scan_step_nm", v)
            else:
                v = reciprocal_to_mrad(step, units, beam_energy_kv)
                if v is not None:
                    out.setdefault("pixel_size_mrad", v)
    except Exception:  # noqa: BLE001 - calibration from dims is best effort
        return {}
    return out


def _load_hdf5(path, calibration, chunks, dataset: str | None = None, scan_shape=None, **kw) -> FourDSTEM:
    import h5py

    _no_extra(kw, "hdf5")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BadInputError(f"cannot open {path!r} as HDF5 (truncated or not an HDF5 file?): {exc}") from None
    with f:
        if dataset is None:
            dataset = _find_h5_dataset(f, path, scan_shape)
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise BadInputError(f"dataset {dataset!r} not found in {path!r}; datasets: "
                                + ", ".join(f"{n} {s}" for n, s in _h5_datasets(f)))
        d = f[dataset]
        file_shape, dtype = d.shape, d.dtype
        view = validate_4d(_ShapeOnly(file_shape, dtype), f"{path}:{dataset}", scan_shape=scan_shape)
        attrs = {}
        for src in (f.attrs, f[dataset].parent.attrs, d.attrs):
            attrs.update({k: (v.decode() if isinstance(v, bytes) else v) for k, v in src.items()})
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
        cal_attrs = {k: v for k, v in attrs.items() if k.startswith("calibration.")}
        try:
            file_cal = Calibration.from_attrs(cal_attrs)
        except BadInputError as exc:
            raise BadInputError(f"bad calibration attributes in {path!r}: {exc}") from None
        energy = _explicit_energy(calibration) or file_cal.beam_energy_kv
        dims_cal = _emd_dims(f, d.parent.name, energy)
        if dims_cal:
            file_cal = Calibration(**{**dims_cal, **{k: v for k, v in dataclasses.asdict(file_cal).items()
                                                     if v is not None}})
        # probe the last frame so truncated data fail here, not deep inside a computation
        try:
            if d.size and len(file_shape) >= 3:
                np.asarray(d[tuple(int(n) - 1 for n in file_shape[:-2])])
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read dataset {dataset!r} of {path!r} (truncated or corrupt HDF5 file?): "
                                f"{exc}") from None
    obj = _H5Frames(path, dataset, file_shape, dtype, shape=view.shape)
    arr = _from_lazy(obj, "h5-" + _token(path, dataset, obj.shape), chunks)
    extra = {k: v for k, v in attrs.items() if not k.startswith("calibration.") and _simple(v)}
    return FourDSTEM(arr, calibration=_merge_calibration(file_cal, calibration), source=path,
                     attrs={"hdf5_dataset": dataset, **({"hdf5_attrs": extra} if extra else {})})


def _simple(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _find_h5_dataset(f, path, scan_shape) -> str:
    # EMD 0.2: groups under /data with emd_group_type == 1 hold a "data" dataset
    if "data" in f and hasattr(f["data"], "keys"):
        cands = []
        for k in f["data"].keys():
            g = f["data"][k]
            if hasattr(g, "keys") and "data" in g and int(g.attrs.get("emd_group_type", 1)) == 1:
                if len(g["data"].shape) == 4 or (scan_shape is not None and len(g["data"].shape) == 3):
                    cands.append(f"data/{k}/data")
        if len(cands) == 1:
            return cands[0]
    all_ds = _h5_datasets(f)
    four = [n for n, s in all_ds if len(s) == 4]
    if len(four) == 1:
        return four[0]
    if not four and scan_shape is not None:
        three = [n for n, s in all_ds if len(s) == 3]
        if len(three) == 1:
            return three[0]
    listing = ", ".join(f"{n} {s}" for n, s in all_ds) or "none"
    if len(four) > 1:
        raise BadInputError(f"{path!r} holds several 4D datasets ({', '.join(four)}); pass dataset=<path>")
    raise BadInputError(f"no 4D dataset (scan_y, scan_x, det_y, det_x) in {path!r}; datasets: {listing}"
                        + ("; pass dataset= and scan_shape= for a 3D frame stack" if all_ds else ""))


# --------------------------------------------------------------------------- zarr

def _open_zarr(path, storage_options=None, mode="r"):
    import zarr

    try:
        return zarr.open(path, mode=mode, storage_options=storage_options) if storage_options else \
            zarr.open(path, mode=mode)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds
        raise BadInputError(f"cannot open {path!r} as a zarr store: {exc}") from None


def _load_zarr(path, calibration, chunks, storage_options=None, scan_shape=None, **kw) -> FourDSTEM:
    import dask.array as da
    import zarr

    _no_extra(kw, "zarr")
    node = _open_zarr(path, storage_options)
    attrs: dict[str, Any] = {}
    truth = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        if "data" in node and isinstance(node["data"], zarr.Array):
            z = node["data"]
        else:
            arrays = [(n, a) for n, a in node.arrays() if a.ndim == 4]
            if len(arrays) != 1:
                raise BadInputError(f"zarr group {path!r} has no array 'data' and "
                                    f"{'several' if arrays else 'no'} 4D arrays ({[n for n, _ in arrays]})")
            z = arrays[0][1]
        if "truth" in node and isinstance(node["truth"], zarr.Group):
            truth = _read_truth(node["truth"])
    else:
        z = node
    validate_4d(_ShapeOnly(z.shape, z.dtype), path, scan_shape=scan_shape if z.ndim == 3 else None)
    if z.ndim == 3:
        arr = da.from_zarr(z, chunks=(max(1, int(scan_shape[1])),) + z.shape[1:])
        arr = arr.reshape(tuple(int(s) for s in scan_shape) + z.shape[1:])
    elif chunks in (None, "auto") and tuple(z.chunks[2:]) == tuple(z.shape[2:]):
        arr = da.from_zarr(z)
    else:
        arr = da.from_zarr(z, chunks=_chunk_spec(z.shape, z.dtype, chunks))
    try:
        file_cal = Calibration.from_attrs({k: v for k, v in attrs.items() if k.startswith("calibration.")})
    except BadInputError as exc:
        raise BadInputError(f"bad calibration attributes in {path!r}: {exc}") from None
    extra = dict(attrs.get("attrs") or {})
    if isinstance(attrs.get("frame_sum_mean"), (int, float)):
        extra["frame_sum_mean"] = float(attrs["frame_sum_mean"])
    if attrs.get("source") and attrs["source"] != path:
        extra.setdefault("original_source", str(attrs["source"]))
    return FourDSTEM(arr, calibration=_merge_calibration(file_cal, calibration), source=path, truth=truth,
                     attrs=extra)


def _read_truth(group):
    import xarray as xr

    data_vars, coords = {}, {}
    for name, a in group.arrays():
        at = dict(a.attrs)
        dims = at.pop("dims", None)
        if dims is None:
            dims = list(getattr(a.metadata, "dimension_names", None) or [f"{name}_dim{i}" for i in range(a.ndim)])
        is_coord = bool(at.pop("diffkit_coord", False))
        var = xr.Variable(tuple(dims), np.asarray(a[...]), at)
        (coords if is_coord else data_vars)[name] = var
    return xr.Dataset(data_vars, coords=coords, attrs=dict(group.attrs))


# --------------------------------------------------------------------------- vendor formats (rosettasciio)

_RSCIIO = {"mib": "rsciio.quantumdetector", "empad": "rsciio.empad", "blockfile": "rsciio.blockfile",
           "dm": "rsciio.digitalmicrograph"}


def _load_vendor(path, name, calibration, chunks, scan_shape=None, **kw) -> FourDSTEM:
    import importlib

    modname = _RSCIIO[name]
    try:
        mod = importlib.import_module(modname)
    except ImportError as exc:
        raise ImportError(f"reading {FORMATS[name][1]} files needs rosettasciio ({modname}): "
                          f"pip install 'diffkit[vendor]' ({exc})") from exc
    if name == "mib" and scan_shape is not None:
        kw.setdefault("navigation_shape", (int(scan_shape[1]), int(scan_shape[0])))  # rsciio wants (x, y)
        scan_shape = None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signals = mod.file_reader(path, lazy=True, **kw)
    except FileNotFoundError:
        raise
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise
        raise BadInputError(f"cannot read {path!r} as {FORMATS[name][1]}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - vendor readers raise anything on garbled input
        raise BadInputError(f"cannot read {path!r} as {FORMATS[name][1]} (truncated or corrupt file?): "
                            f"{type(exc).__name__}: {exc}") from None
    sig = _pick_signal(signals, path, scan_shape)
    data = sig["data"]
    if not hasattr(data, "dask"):
        import dask.array as da

        data = da.from_array(data, chunks=_chunk_spec(data.shape, data.dtype, "auto"))
    data = validate_4d(data, path, scan_shape=scan_shape)
    data = data.rechunk(_chunk_spec(data.shape, data.dtype, chunks))
    file_cal, notes = _calibration_from_rsciio(sig, _explicit_energy(calibration))
    return FourDSTEM(data, calibration=_merge_calibration(file_cal, calibration), source=path,
                     attrs={"reader": name, **notes})


def _pick_signal(signals, path, scan_shape):
    ok = [s for s in signals if getattr(s.get("data"), "ndim", 0) == 4
          or (scan_shape is not None and getattr(s.get("data"), "ndim", 0) == 3)]
    if not ok:
        shapes = [tuple(getattr(s.get("data"), "shape", ())) for s in signals]
        raise BadInputError(f"no 4D data set in {path!r} (found shapes {shapes}); "
                            "a 3D frame stack needs scan_shape=(scan_y, scan_x)")
    return ok[0]


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _apply_mapping(sig) -> dict:
    """Metadata with rosettasciio's ``mapping`` (original_metadata path -> metadata path, fn) applied."""
    import copy

    md = copy.deepcopy(dict(sig.get("metadata") or {}))
    om = sig.get("original_metadata") or {}
    for src, target in (sig.get("mapping") or {}).items():
        try:
            dest, fn = target if isinstance(target, tuple) else (target, None)
            v = _get(om, *src.split("."))
            if v is None:
                continue
            v = fn(v) if fn is not None else v
            d = md
            keys = dest.split(".")
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d.setdefault(keys[-1], v)
        except Exception:  # noqa: BLE001 - metadata mapping is best effort
            continue
    return md


def _calibration_from_rsciio(sig, explicit_energy) -> tuple[Calibration, dict]:
    md = _apply_mapping(sig)
    tem = _get(md, "Acquisition_instrument", "TEM") or {}
    energy = tem.get("beam_energy") if isinstance(tem, Mapping) else None
    conv = tem.get("convergence_angle") if isinstance(tem, Mapping) else None
    kw: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    try:
        if energy is not None and float(energy) > 0:
            kw["beam_energy_kv"] = float(energy)
        if conv is not None and float(conv) > 0:
            kw["convergence_mrad"] = float(conv)
    except (TypeError, ValueError):
        pass
    axes = sig.get("axes") or []
    nav = [a for a in axes if a.get("navigate")]
    det = [a for a in axes if not a.get("navigate")]
    if len(nav) >= 1:
        steps = [_length_nm(a.get("scale"), a.get("units")) for a in nav[-2:]]
        steps = [s for s in steps if s is not None]
        if steps:
            kw["scan_step_nm"] = steps[-1]
            if len(steps) == 2 and abs(steps[0] - steps[1]) > 0.01 * steps[1]:
                notes["scan_step_y_nm"] = steps[0]
    if det:
        e = explicit_energy or kw.get("beam_energy_kv")
        pix = [reciprocal_to_mrad(a.get("scale"), a.get("units"), e) for a in det[-2:]]
        pix = [p for p in pix if p is not None]
        if pix:
            kw["pixel_size_mrad"] = pix[-1]
        else:
            units = {str(a.get("units")) for a in det}
            notes["detector_axes_units"] = ", ".join(sorted(units))
    return Calibration(**kw), notes


# --------------------------------------------------------------------------- public: save_zarr

def save_zarr(dataset: FourDSTEM, path, overwrite: bool = False, rows: int | None = None, **compute_kw) -> str:
    """Write a :class:`FourDSTEM` in diffkit's zarr layout, streaming chunk by chunk with dask.

    Parameters
    ----------
    dataset : FourDSTEM
    path : str or path-like
        Target directory (conventionally ``*.zarr``); remote fsspec URLs are written in place.
    overwrite : bool
        Replace an existing zarr store at ``path`` (a non-zarr directory is never replaced).
    rows : int, optional
        Scan rows per stored chunk; default ~48 MiB chunks of whole frames.
    **compute_kw
        Passed to ``dask.compute`` (e.g. ``scheduler=``).

    Returns
    -------
    str
        The path written. Local stores are written to ``<path>.tmp`` and renamed when
        complete, so an interrupted write never leaves a half-written store at ``path``.
    """
    import dask
    import dask.array as da
    import zarr

    if not isinstance(dataset, FourDSTEM):
        raise BadInputError(f"save_zarr needs a FourDSTEM, got {type(dataset).__name__}")
    p, local = _local_path(path)
    if local:
        p = os.path.abspath(p)
        if os.path.exists(p):
            if not overwrite:
                raise FileExistsError(17, f"{p!r} exists; pass overwrite=True to replace it", p)
            if not (os.path.isdir(p) and any(os.path.exists(os.path.join(p, f)) for f in ("zarr.json", ".zgroup"))):
                raise BadInputError(f"refusing to overwrite {p!r}: it is not a zarr store")
        target = p + ".tmp"
        if os.path.exists(target):
            shutil.rmtree(target)
    else:
        target = p
    ch = frame_chunks(dataset.shape, dataset.dtype.itemsize, rows=rows)
    arr = dataset.data.rechunk(ch)
    root = zarr.open_group(target, mode="w")
    z = root.create_array("data", shape=arr.shape, dtype=arr.dtype, chunks=ch,
                          compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                          dimension_names=DIMS, fill_value=0,
                          attributes={"units": "counts", "long_name": "diffraction frames"})
    # arr's chunks are exactly the zarr chunks, so every task writes whole zarr chunks: da.store
    # streams them without locks (da.to_zarr would re-plan the chunking and can merge chunks)
    store = da.store(arr, z, lock=False, compute=False, return_stored=False)
    sums = arr.astype(np.float64).sum(axis=(2, 3))
    good = da.isfinite(sums) & (sums > 0)
    fsum = da.where(good, sums, 0.0).sum()
    _, total, n = dask.compute(store, fsum, good.sum(), **compute_kw)
    attrs = {"diffkit_format": ZARR_FORMAT_TAG, "dims": list(DIMS), "source": dataset.source,
             "frame_sum_mean": float(total) / int(n) if int(n) else None}
    attrs.update(_jsonable(dataset.calibration.to_attrs()))
    extra = {k: v for k, v in dataset.attrs.items() if k != "frame_sum_mean"}
    attrs["attrs"] = _jsonable(extra)
    root.attrs.update(attrs)
    if dataset.truth is not None:
        _write_truth(root, dataset.truth)
    if local:
        if os.path.exists(p):
            shutil.rmtree(p)
        os.replace(target, p)
    return p


def _write_truth(root, truth):
    """Ground-truth maps (and numeric coordinates) as arrays of group ``truth``; labels are skipped."""
    g = root.create_group("truth")
    items = [(n, v.variable, False) for n, v in truth.data_vars.items()]
    items += [(n, v.variable, True) for n, v in truth.coords.items()]
    skipped = []
    for name, var, is_coord in items:
        values = np.asarray(var.values)
        if values.dtype.kind not in "iufb" or values.ndim == 0:
            skipped.append(str(name))
            continue
        at = _jsonable(dict(var.attrs))
        at.setdefault("units", "")
        at.setdefault("long_name", str(name))
        at["dims"] = list(map(str, var.dims))
        if is_coord:
            at["diffkit_coord"] = True
        a = g.create_array(str(name), shape=values.shape, dtype=values.dtype, chunks=values.shape,
                           dimension_names=tuple(map(str, var.dims)), attributes=at,
                           fill_value=np.nan if values.dtype.kind == "f" else 0)
        a[...] = values
    attrs = _jsonable(dict(truth.attrs))
    if skipped:
        attrs["diffkit_skipped_variables"] = skipped
    g.attrs.update(attrs)
