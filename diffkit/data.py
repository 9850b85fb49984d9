"""The 4D-STEM data model: a lazy (dask) array of diffraction frames plus its calibration.

:class:`FourDSTEM` holds a dask array with dimensions ``(scan_y, scan_x, det_y, det_x)``
(scan positions, then detector pixels), a :class:`~diffkit.calibration.Calibration`, a
``source`` label, optional ground-truth maps (simulated data) and free-form ``attrs``.
Construction does cheap checks only (shape, dtype); content checks (NaN/inf, empty or
saturated frames) run lazily through :meth:`FourDSTEM.frame_status` and :meth:`FourDSTEM.check`.

Chunks are whole detector frames and a few scan rows (:func:`frame_chunks`, about 48 MB a
chunk), which is what every diffkit analysis maps over.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .calibration import Calibration
from .errors import BadInputError

__all__ = [
    "DIMS",
    "FRAME_STATUS_REASONS",
    "FourDSTEM",
    "frame_chunks",
    "validate_4d",
]

#: Dimension names of the 4D array: scan rows, scan columns, detector rows, detector columns.
DIMS = ("scan_y", "scan_x", "det_y", "det_x")

#: Meaning of the codes returned by :meth:`FourDSTEM.frame_status`.
FRAME_STATUS_REASONS = {
    0: "ok",
    1: "non-finite values (NaN or inf)",
    2: "empty (all pixels zero)",
    3: "saturated (more than 1 % of pixels at the saturation value)",
    4: "negative counts (a pixel below -5 % of the frame maximum)",
}

#: A pixel below ``-NEGATIVE_FRACTION * max(frame maximum, 1)`` marks a frame as having negative
#: counts (status 4); dark-subtraction noise of a few counts in a bright frame stays ok.
NEGATIVE_FRACTION = 0.05

#: Fraction of pixels at the saturation value above which a frame counts as saturated.
SATURATED_FRACTION = 0.01

#: Default chunk size target, bytes (whole frames, a few scan rows).
TARGET_CHUNK_BYTES = 48 * 2**20


def _where(source: str) -> str:
    return f"in {source!r}" if source else "in the given array"


#: Largest plausible detector pixel size (mrad/px): 100 px then span 10 rad.
MAX_PIXEL_SIZE_MRAD = 100.0


def check_disk_radius(convergence_mrad, pixel_size_mrad, detector_shape, purpose: str = "this analysis") -> float:
    """Disk radius (px) = convergence (mrad) / pixel size (mrad/px); :class:`BadInputError` unless it
    lies between 1 px and the detector's size (a wrong unit or a typo, e.g. 1e6 mrad/px)."""
    for name, v in (("convergence_mrad", convergence_mrad), ("pixel_size_mrad", pixel_size_mrad)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not (math.isfinite(v) and v > 0):
            raise BadInputError(f"{purpose}: {name} must be a positive finite number, got {v!r}")
    if float(pixel_size_mrad) > MAX_PIXEL_SIZE_MRAD:
        raise BadInputError(f"{purpose}: pixel size {float(pixel_size_mrad):g} mrad/px is not a diffraction detector's "
                            f"(at most {MAX_PIXEL_SIZE_MRAD:g} mrad/px); check the unit (mrad/px)")
    r = float(convergence_mrad) / float(pixel_size_mrad)
    size = max(int(v) for v in tuple(detector_shape)[-2:])
    if not (math.isfinite(r) and 1.0 <= r <= size):
        raise BadInputError(
            f"{purpose}: convergence {float(convergence_mrad):g} mrad at {float(pixel_size_mrad):g} mrad/px gives a "
            f"disk radius of {r:.3g} px on a {'x'.join(str(int(v)) for v in tuple(detector_shape)[-2:])} px detector; "
            f"expected 1-{size} px: check convergence_mrad and pixel_size_mrad (units mrad, mrad/px)")
    return r


def frame_chunks(shape, itemsize: int, rows: int | None = None,
                 target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[int, int, int, int]:
    """Chunk shape of whole detector frames and a few scan rows.

    Parameters
    ----------
    shape : (int, int, int, int)
        Array shape ``(scan_y, scan_x, det_y, det_x)``.
    itemsize : int
        Bytes per pixel.
    rows : int, optional
        Scan rows per chunk; default: as many as fit in ``target_bytes`` (at least 1).
    target_bytes : int
        Target chunk size in bytes (default 48 MiB).

    Returns
    -------
    (rows, cols, det_y, det_x)
        ``cols`` is the whole scan width unless one scan row alone exceeds ``target_bytes``.
    """
    sy, sx, dy, dx = (int(s) for s in shape)
    frame = max(dy * dx * int(itemsize), 1)
    row = frame * max(sx, 1)
    if rows is not None:
        rows = int(rows)
        if rows < 1:
            raise BadInputError(f"rows per chunk must be >= 1, got {rows}")
        return (min(rows, max(sy, 1)), max(sx, 1), dy, dx)
    if row > target_bytes:
        cols = max(1, min(sx, target_bytes // frame))
        return (1, cols, dy, dx)
    rows = max(1, min(sy, target_bytes // row))
    return (rows, max(sx, 1), dy, dx)


def validate_4d(array, source: str = "", scan_shape=None):
    """Check shape and dtype of a 4D-STEM array (cheap: no data is read).

    Parameters
    ----------
    array : array-like with ``shape`` and ``dtype`` (numpy, dask, zarr, h5py ...)
        ``(scan_y, scan_x, det_y, det_x)``, or a 3D stack ``(N, det_y, det_x)`` together
        with ``scan_shape``.
    source : str
        Name of the file or object, used in error messages.
    scan_shape : (int, int), optional
        ``(scan_y, scan_x)`` to reshape a 3D frame stack into a scan (``N == scan_y * scan_x``).

    Returns
    -------
    array
        The input (reshaped when a 3D stack and ``scan_shape`` were given).

    Raises
    ------
    BadInputError
        Wrong number of dimensions, non-numeric or complex dtype, empty array, or a
        non-square detector; the message names the shape and ``source``.
    """
    where = _where(source)
    shape = getattr(array, "shape", None)
    dtype = getattr(array, "dtype", None)
    if shape is None or dtype is None:
        raise BadInputError(f"expected an array (scan_y, scan_x, det_y, det_x) {where}, got {type(array).__name__}")
    shape = tuple(int(s) for s in shape)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise BadInputError(f"unsupported dtype {dtype!r} {where}: 4D-STEM data must be real numbers") from None
    if dtype.kind not in "iuf":
        kind = {"b": "boolean", "c": "complex", "O": "object", "U": "string", "S": "bytes", "V": "structured/void",
                "M": "datetime", "m": "timedelta"}.get(dtype.kind, dtype.kind)
        raise BadInputError(f"unsupported dtype {dtype} ({kind}) {where}: 4D-STEM data must be real numbers "
                            "(unsigned/signed integer or float)")
    if len(shape) == 3 and scan_shape is not None:
        try:
            sy, sx = (int(s) for s in scan_shape)
        except (TypeError, ValueError):
            raise BadInputError(f"scan_shape must be two integers (scan_y, scan_x), got {scan_shape!r}") from None
        if sy * sx != shape[0]:
            raise BadInputError(f"scan_shape {(sy, sx)} has {sy * sx} positions but the frame stack {where} has "
                                f"{shape[0]} frames (shape {shape})")
        if hasattr(array, "reshape") and not _is_lazy_file_array(array):
            array = array.reshape((sy, sx) + shape[1:])
        else:
            import dask.array as da

            array = da.from_array(array, chunks=(max(1, sx),) + shape[1:]).reshape((sy, sx) + shape[1:])
        shape = (sy, sx) + shape[1:]
    elif scan_shape is not None and len(shape) == 4 and tuple(int(s) for s in scan_shape) != shape[:2]:
        raise BadInputError(f"scan_shape {tuple(scan_shape)} does not match the array {where} of shape {shape}")
    if len(shape) != 4:
        hint = " (a 3D frame stack needs scan_shape=(scan_y, scan_x))" if len(shape) == 3 else ""
        raise BadInputError(f"expected a 4D array (scan_y, scan_x, det_y, det_x) {where}, got {len(shape)}D "
                            f"shape {shape}{hint}")
    if min(shape) == 0:
        raise BadInputError(f"empty 4D-STEM array {where}: shape {shape}")
    if shape[2] != shape[3]:
        raise BadInputError(f"detector not square {where}: frames are {shape[2]} x {shape[3]} px "
                            f"(shape {shape}); crop or pad the frames to a square detector")
    return array


def _is_lazy_file_array(a) -> bool:
    """h5py datasets / zarr arrays: reshape would read everything."""
    mod = type(a).__module__
    return mod.startswith("h5py") or mod.startswith("zarr")


def _as_dask(array, chunks="auto"):
    import dask.array as da

    if isinstance(array, da.Array):
        if chunks not in (None, "auto", "keep"):
            return array.rechunk(_resolve_chunks(array.shape, array.dtype, chunks))
        return array
    if chunks in (None, "auto", "keep"):
        chunks = frame_chunks(array.shape, np.dtype(array.dtype).itemsize)
    else:
        chunks = _resolve_chunks(array.shape, array.dtype, chunks)
    return da.from_array(array, chunks=chunks)


def _resolve_chunks(shape, dtype, chunks):
    if chunks in (None, "auto", "keep"):
        return frame_chunks(shape, np.dtype(dtype).itemsize)
    if isinstance(chunks, (int, np.integer)):
        return frame_chunks(shape, np.dtype(dtype).itemsize, rows=int(chunks))
    return chunks


def _idx(v, n: int, name: str) -> slice:
    """Normalise an int / slice / None to a slice in range ``[0, n)``."""
    if v is None:
        return slice(None)
    if isinstance(v, slice):
        return v
    if isinstance(v, (int, np.integer)):
        i = int(v)
        if not -n <= i < n:
            raise BadInputError(f"{name}={i} is outside the scan (0 .. {n - 1})")
        i %= n
        return slice(i, i + 1)
    raise BadInputError(f"{name} must be an int or a slice, got {type(v).__name__}")


def _jsonable(v):
    """Attrs value as plain JSON types (non-finite floats become strings)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if v is None or isinstance(v, str):
        return v
    return str(v)


class FourDSTEM:
    """A 4D-STEM scan: lazy frames ``(scan_y, scan_x, det_y, det_x)`` plus calibration.

    Parameters
    ----------
    data : dask array or array-like
        Frames, counts per pixel, dims ``(scan_y, scan_x, det_y, det_x)``; a 3D stack
        ``(N, det_y, det_x)`` is accepted with ``scan_shape``. Numpy / zarr / h5py inputs
        are wrapped in dask with whole-frame chunks; dask inputs keep their scan chunks but
        are rechunked so each chunk holds whole frames.
    calibration : Calibration or dict, optional
        Experimental calibration (None values = unknown).
    source : str
        Where the data came from (file path, catalog entry ...), used in messages.
    truth : xarray.Dataset or dict of arrays, optional
        Ground-truth maps of simulated data; every variable's first two dims are
        ``(scan_y, scan_x)`` and match the scan shape.
    attrs : dict, optional
        Free-form metadata (JSON-serialisable values are preserved by :func:`diffkit.io.save_zarr`).
        ``attrs["frame_sum_mean"]`` (counts/frame), when present, is the mean frame sum of
        the whole scan used as the dose reference by :meth:`with_dose`.
    scan_shape : (int, int), optional
        Scan shape for a 3D frame stack.
    saturation_value : float, optional
        Pixel value (counts) counted as saturated; default the dtype maximum for integer
        data, none for float data.

    Raises
    ------
    BadInputError
        Wrong ndim, non-numeric dtype, empty array, non-square detector, bad truth maps.

    Examples
    --------
    >>> import numpy as np
    >>> ds = FourDSTEM(np.ones((4, 5, 16, 16), np.uint16), Calibration(pixel_size_mrad=0.5))
    >>> ds.scan_shape, ds.detector_shape
    ((4, 5), (16, 16))
    """

    def __init__(self, data, calibration: Calibration | Mapping | None = None, source: str = "",
                 truth=None, attrs: Mapping | None = None, *, scan_shape=None,
                 saturation_value: float | None = None):
        import dask.array as da

        self.source = str(source or "")
        data = validate_4d(data, self.source, scan_shape=scan_shape)
        data = _as_dask(data)
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        if len(data.chunks[2]) != 1 or len(data.chunks[3]) != 1:
            data = data.rechunk({2: -1, 3: -1})
        assert isinstance(data, da.Array)
        self.data = data
        self.calibration = _as_calibration(calibration)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.saturation_value = None if saturation_value is None else float(saturation_value)
        self.truth = self._check_truth(truth)

    # ------------------------------------------------------------------ basics
    def _check_truth(self, truth):
        if truth is None:
            return None
        import xarray as xr

        if isinstance(truth, Mapping) and not isinstance(truth, xr.Dataset):
            truth = xr.Dataset({k: (DIMS[:2] + tuple(f"dim_{k}_{i}" for i in range(np.ndim(v) - 2)), np.asarray(v))
                                for k, v in truth.items()})
        if not isinstance(truth, xr.Dataset):
            raise BadInputError(f"truth must be an xarray.Dataset of (scan_y, scan_x) maps, got {type(truth).__name__}")
        sy, sx = self.scan_shape
        for name, var in truth.data_vars.items():
            if tuple(var.dims[:2]) != DIMS[:2]:
                raise BadInputError(f"truth map {name!r} {_where(self.source)} has dims {var.dims}; "
                                    "the first two must be (scan_y, scan_x)")
            if var.shape[:2] != (sy, sx):
                raise BadInputError(f"truth map {name!r} {_where(self.source)} has scan shape {var.shape[:2]}, "
                                    f"the data has {(sy, sx)}")
        return truth

    def _replace(self, data=None, truth=..., attrs=None, source=None) -> "FourDSTEM":
        return FourDSTEM(self.data if data is None else data, calibration=self.calibration,
                         source=self.source if source is None else source,
                         truth=self.truth if truth is ... else truth,
                         attrs=self.attrs if attrs is None else attrs, saturation_value=self.saturation_value)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(scan_y, scan_x, det_y, det_x)``: scan positions and detector pixels."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def scan_shape(self) -> tuple[int, int]:
        """``(scan_y, scan_x)``: number of scan positions along each axis."""
        return self.shape[:2]

    @property
    def detector_shape(self) -> tuple[int, int]:
        """``(det_y, det_x)``: detector pixels."""
        return self.shape[2:]

    @property
    def dtype(self) -> np.dtype:
        """Pixel dtype of the stored frames."""
        return self.data.dtype

    @property
    def chunks(self):
        """Dask chunks of :attr:`data`."""
        return self.data.chunks

    @property
    def nbytes(self) -> int:
        """Size of the full array in bytes."""
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        mib = self.nbytes / 2**20
        c = tuple(int(ch[0]) for ch in self.data.chunks)
        cmib = np.prod(c) * self.dtype.itemsize / 2**20
        cal = self.calibration
        parts = []
        for name, label in (("beam_energy_kv", ""), ("convergence_mrad", "alpha "), ("pixel_size_mrad", "pixel "),
                            ("scan_step_nm", "step ")):
            v = getattr(cal, name)
            if v is not None:
                parts.append(f"{label}{v:g} {Calibration.units(name)}")
        if cal.material is not None:
            parts.append(str(cal.material) + (f" [{cal.zone_axis}]" if cal.zone_axis else ""))
        elif cal.zone_axis is not None:
            parts.append(f"[{cal.zone_axis}]")
        lines = [f"<FourDSTEM {self.source!r}",
                 f"  shape (scan_y, scan_x, det_y, det_x) = {self.shape} {self.dtype}, {mib:.1f} MiB",
                 f"  chunks {c} = {cmib:.1f} MiB, {self.data.npartitions} chunks",
                 f"  calibration: {', '.join(parts) if parts else 'none'}"]
        if cal.missing:
            lines.append(f"  missing: {', '.join(cal.missing)}")
        if self.truth is not None:
            lines.append(f"  truth: {', '.join(map(str, self.truth.data_vars))}")
        return "\n".join(lines) + ">"

    # ------------------------------------------------------------------ chunking / cropping
    def rechunk_for_frames(self, rows: int | None = None, target_bytes: int = TARGET_CHUNK_BYTES) -> "FourDSTEM":
        """Copy with chunks of whole frames and ``rows`` scan rows (default: ~48 MiB a chunk).

        Parameters
        ----------
        rows : int, optional
            Scan rows per chunk.
        target_bytes : int
            Target chunk size in bytes when ``rows`` is not given.
        """
        ch = frame_chunks(self.shape, self.dtype.itemsize, rows=rows, target_bytes=target_bytes)
        return self._replace(data=self.data.rechunk(ch))

    def crop(self, y=slice(None), x=slice(None)) -> "FourDSTEM":
        """Scan sub-region (lazy), with the truth maps cropped alike.

        Parameters
        ----------
        y, x : slice or int
            Scan rows / columns (positions, not nm).
        """
        sy, sx = self.scan_shape
        ys, xs = _idx(y, sy, "y"), _idx(x, sx, "x")
        ny, nx = len(range(*ys.indices(sy))), len(range(*xs.indices(sx)))
        if ny == 0 or nx == 0:
            raise BadInputError(f"crop y={y}, x={x} selects no scan positions of the {sy} x {sx} scan "
                                f"{_where(self.source)}")
        truth = None if self.truth is None else self.truth.isel(scan_y=ys, scan_x=xs)
        return self._replace(data=self.data[ys, xs], truth=truth)

    def crop_region(self, region) -> "FourDSTEM":
        """Crop to ``region = (y0, y1, x0, x1)`` (scan positions, half-open, like slices)."""
        try:
            y0, y1, x0, x1 = (int(v) for v in region)
        except (TypeError, ValueError):
            raise BadInputError(f"region must be four integers (y0, y1, x0, x1), got {region!r}") from None
        sy, sx = self.scan_shape
        if not (0 <= y0 < y1 <= sy and 0 <= x0 < x1 <= sx):
            raise BadInputError(f"region (y0, y1, x0, x1) = {(y0, y1, x0, x1)} is not inside the {sy} x {sx} scan "
                                f"{_where(self.source)}")
        out = self.crop(slice(y0, y1), slice(x0, x1))
        out.attrs = dict(self.attrs, region=[y0, y1, x0, x1])
        return out

    # ------------------------------------------------------------------ content checks
    def frame_status(self, saturation_value: float | None = None):
        """Lazy per-frame status codes, a dask array ``(scan_y, scan_x)`` of uint8.

        Codes (see :data:`FRAME_STATUS_REASONS`): 0 ok, 1 non-finite values (NaN/inf),
        2 empty (all-zero), 3 saturated (more than 1 % of the pixels at or above the
        saturation value), 4 negative counts (see :data:`NEGATIVE_FRACTION`). The first
        matching code wins.

        Parameters
        ----------
        saturation_value : float, optional
            Saturation level in counts; default ``self.saturation_value`` or, for integer
            data, the dtype maximum (e.g. 65535 for uint16). Float data without a value
            are never flagged as saturated.
        """
        sat = self.saturation_value if saturation_value is None else float(saturation_value)
        if sat is None and self.dtype.kind in "iu":
            sat = float(np.iinfo(self.dtype).max)
        is_float = self.dtype.kind == "f"

        def status(block):
            out = np.zeros(block.shape[:2], np.uint8)
            if block.size == 0:
                return out
            npx = block.shape[2] * block.shape[3]
            if block.dtype.kind in "if":
                with np.errstate(invalid="ignore"):
                    lo = np.nanmin(np.where(np.isfinite(block), block, 0), axis=(2, 3)) if is_float else \
                        block.min(axis=(2, 3))
                    hi = np.nanmax(np.where(np.isfinite(block), block, 0), axis=(2, 3)) if is_float else \
                        block.max(axis=(2, 3))
                out[lo < -NEGATIVE_FRACTION * np.maximum(hi.astype(np.float64), 1.0)] = 4
            if sat is not None:
                nsat = (block >= sat).sum(axis=(2, 3))
                out[nsat > SATURATED_FRACTION * npx] = 3
            out[~np.any(block != 0, axis=(2, 3))] = 2
            if is_float:
                out[~np.all(np.isfinite(block), axis=(2, 3))] = 1
            return out

        return self.data.map_blocks(status, dtype=np.uint8, drop_axis=(2, 3))

    def check(self, raise_on_bad: bool = False, saturation_value: float | None = None, **compute_kw) -> dict:
        """Compute :meth:`frame_status` and summarise it.

        Parameters
        ----------
        raise_on_bad : bool
            Raise :class:`BadInputError` when any frame is not ok.
        saturation_value : float, optional
            See :meth:`frame_status`.
        **compute_kw
            Passed to ``dask.compute`` (e.g. ``scheduler=``).

        Returns
        -------
        dict
            ``n_frames``, ``n_bad``, ``counts`` (reason -> number of frames), ``positions``
            (reason -> up to 5 ``(y, x)`` scan positions), ``status`` (the uint8 code map),
            ``ok`` (bool) and a one-line ``message``.
        """
        import dask

        (codes,) = dask.compute(self.frame_status(saturation_value), **compute_kw)
        codes = np.asarray(codes)
        counts = {FRAME_STATUS_REASONS[c]: int((codes == c).sum()) for c in FRAME_STATUS_REASONS if c}
        positions = {FRAME_STATUS_REASONS[c]: [tuple(int(i) for i in p) for p in np.argwhere(codes == c)[:5]]
                     for c in FRAME_STATUS_REASONS if c}
        n_bad = int((codes != 0).sum())
        if n_bad:
            parts = [f"{n} {r} (first at (y, x) {positions[r][0]})" for r, n in counts.items() if n]
            msg = f"{n_bad} of {codes.size} frames {_where(self.source)} are not usable: " + "; ".join(parts)
        else:
            msg = f"all {codes.size} frames {_where(self.source)} are ok"
        summary = {"n_frames": int(codes.size), "n_bad": n_bad, "counts": counts, "positions": positions,
                   "status": codes, "ok": n_bad == 0, "message": msg}
        if raise_on_bad and n_bad:
            raise BadInputError(msg)
        return summary

    # ------------------------------------------------------------------ analyses
    def pacbed(self, y=slice(None), x=slice(None), skip_bad: bool = True, **compute_kw) -> np.ndarray:
        """Position-averaged CBED: mean frame over a scan region, float64 counts/px.

        Parameters
        ----------
        y, x : slice or int
            Scan rows / columns (positions).
        skip_bad : bool
            Leave out frames with NaN/inf values and all-zero frames (default). With
            ``False`` every frame counts (a NaN frame makes the result NaN).
        **compute_kw
            Passed to ``dask.compute``.

        Returns
        -------
        numpy.ndarray (det_y, det_x) float64

        Raises
        ------
        BadInputError
            The region is empty or holds no usable frame.
        """
        import dask
        import dask.array as da

        sub = self.crop(y, x).data.astype(np.float64)
        if not skip_bad:
            (mean,) = dask.compute(sub.mean(axis=(0, 1)), **compute_kw)
            return np.asarray(mean, np.float64)
        good = (sub != 0).any(axis=(2, 3))
        if self.dtype.kind == "f":
            good = good & da.isfinite(sub).all(axis=(2, 3))
        total = da.where(good[..., None, None], sub, 0.0).sum(axis=(0, 1))
        total, count = dask.compute(total, good.sum(), **compute_kw)
        count = int(count)
        if count == 0:
            raise BadInputError(f"no usable frame in scan region y={y}, x={x} {_where(self.source)}: "
                                "all frames are empty or contain NaN/inf")
        return np.asarray(total, np.float64) / count

    def _center(self, center_px):
        dy, dx = self.detector_shape
        if center_px is None:
            return (dy - 1) / 2, (dx - 1) / 2
        if isinstance(center_px, str) and center_px == "com":
            p = self.pacbed()
            yy, xx = np.indices(p.shape, dtype=float)
            tot = p.sum()
            if not tot > 0:
                raise BadInputError(f"cannot find the pattern centre {_where(self.source)}: mean pattern is empty")
            return float((yy * p).sum() / tot), float((xx * p).sum() / tot)
        try:
            cy, cx = (float(v) for v in center_px)
        except (TypeError, ValueError):
            raise BadInputError(f"center_px must be (y, x) in px, 'com' or None, got {center_px!r}") from None
        return cy, cx

    def virtual_image(self, inner_mrad: float, outer_mrad: float, center_px=None):
        """Annular virtual-detector image (lazy): detector counts summed over ``inner <= r < outer``.

        Parameters
        ----------
        inner_mrad, outer_mrad : float
            Inner and outer detector radii in mrad (``inner_mrad=0``: bright field).
        center_px : (float, float) or "com", optional
            Pattern centre ``(y, x)`` in detector px; default the detector centre
            ``((det_y - 1) / 2, (det_x - 1) / 2)``; ``"com"``: centre of mass of the mean
            pattern (reads the whole scan once).

        Returns
        -------
        xarray.DataArray (scan_y, scan_x), dask-backed, counts; coordinates in nm when the
        scan step is known, else in scan positions (``attrs["units"] == "px"``).

        Raises
        ------
        MissingCalibrationError
            ``calibration.pixel_size_mrad`` is not set.
        BadInputError
            Radii not ``0 <= inner < outer`` or the annulus holds no detector pixel.
        """
        import xarray as xr

        self.calibration.require("pixel_size_mrad", purpose="virtual_image (detector radii in mrad)")
        inner, outer = float(inner_mrad), float(outer_mrad)
        if not (math.isfinite(inner) and 0 <= inner < outer):
            raise BadInputError(f"virtual detector radii must satisfy 0 <= inner < outer (mrad), "
                                f"got inner={inner_mrad}, outer={outer_mrad}")
        cy, cx = self._center(center_px)
        pix = self.calibration.pixel_size_mrad
        yy, xx = np.indices(self.detector_shape, dtype=np.float64)
        r = np.hypot(yy - cy, xx - cx) * pix
        mask = ((r >= inner) & (r < outer)).astype(np.float64)
        if not mask.any():
            raise BadInputError(f"virtual detector {inner}-{outer} mrad about (y, x) = ({cy:.1f}, {cx:.1f}) px "
                                f"contains no detector pixel (pixel size {pix} mrad/px, detector "
                                f"{self.detector_shape} px)")

        def vimg(block):
            return np.tensordot(block, mask, axes=((2, 3), (0, 1)))

        img = self.data.map_blocks(vimg, dtype=np.float64, drop_axis=(2, 3))
        coords, units = self._scan_coords()
        kind = "bright field" if inner == 0 else "annular"
        return xr.DataArray(img, dims=DIMS[:2], coords=coords, name="virtual_image",
                            attrs={"long_name": f"virtual {kind} image {inner:g}-{outer:g} mrad", "units": "counts",
                                   "inner_mrad": inner, "outer_mrad": outer, "center_px": [cy, cx],
                                   "mask_pixels": int(mask.sum()), "scan_units": units, "source": self.source})

    def _scan_coords(self):
        import xarray as xr

        sy, sx = self.scan_shape
        step = self.calibration.scan_step_nm
        if step is not None:
            return ({"scan_y": xr.Variable("scan_y", np.arange(sy) * step, {"units": "nm", "long_name": "scan y"}),
                     "scan_x": xr.Variable("scan_x", np.arange(sx) * step, {"units": "nm", "long_name": "scan x"})},
                    "nm")
        return ({"scan_y": xr.Variable("scan_y", np.arange(sy), {"units": "px", "long_name": "scan y (position)"}),
                 "scan_x": xr.Variable("scan_x", np.arange(sx), {"units": "px", "long_name": "scan x (position)"})},
                "px")

    def to_xarray(self):
        """The frames as a dask-backed :class:`xarray.DataArray` with coordinates and units.

        Scan coordinates are in nm when ``scan_step_nm`` is known (else positions, units
        ``"px"``); detector coordinates are scattering angles in mrad about the detector
        centre when ``pixel_size_mrad`` is known (else detector px). Calibration values are
        in ``attrs`` as ``calibration.<name>``.
        """
        import xarray as xr

        coords, scan_units = self._scan_coords()
        dy, dx = self.detector_shape
        pix = self.calibration.pixel_size_mrad
        for name, n in (("det_y", dy), ("det_x", dx)):
            if pix is not None:
                coords[name] = xr.Variable(name, (np.arange(n) - (n - 1) / 2) * pix,
                                           {"units": "mrad", "long_name": f"{name} scattering angle"})
            else:
                coords[name] = xr.Variable(name, np.arange(n), {"units": "px", "long_name": f"{name} pixel"})
        attrs = {"units": "counts", "source": self.source, "scan_units": scan_units}
        attrs.update(self.calibration.to_attrs())
        return xr.DataArray(self.data, dims=DIMS, coords=coords, name="frames", attrs=attrs)

    # ------------------------------------------------------------------ dose
    def frame_sum_mean(self, max_frames: int = 1024, **compute_kw) -> float:
        """Mean total counts per frame (finite, non-empty frames), counts/frame.

        Uses ``attrs["frame_sum_mean"]`` when present (written by :func:`diffkit.io.save_zarr`
        for the whole scan); otherwise averages up to ``max_frames`` frames on a regular
        grid of scan positions.
        """
        v = self.attrs.get("frame_sum_mean")
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            return float(v)
        import dask

        sy, sx = self.scan_shape
        n = sy * sx
        if n <= max_frames:
            sub = self.data
        else:
            step = max(1, int(math.ceil(math.sqrt(n / max_frames))))
            sub = self.data[::step, ::step]
        sums = sub.astype(np.float64).sum(axis=(2, 3))
        (s,) = dask.compute(sums, **compute_kw)
        s = np.asarray(s).ravel()
        s = s[np.isfinite(s) & (s > 0)]
        if s.size == 0:
            raise BadInputError(f"cannot set a dose {_where(self.source)}: no finite, non-empty frame found")
        return float(s.mean())

    def with_dose(self, dose: float, seed: int = 0, reference: float | None = None) -> "FourDSTEM":
        """Resample the frames at a given dose (lazy): rescale, then Poisson noise.

        The frames are scaled by ``dose / reference`` so the mean frame sum is ``dose``
        electrons, then each pixel is drawn from a Poisson distribution with that mean.
        Each chunk draws from its own generator seeded by ``(seed, chunk start indices)``,
        so the result is reproducible for the same ``seed`` and chunking, and a crop of
        the result equals the result of the crop. Non-finite pixels stay NaN (so
        :meth:`frame_status` still flags their frames); negative values count as 0.

        Parameters
        ----------
        dose : float
            Mean electrons per frame (e-/frame), > 0.
        seed : int
            Non-negative seed of the random generator.
        reference : float, optional
            Mean frame sum of the stored data (counts/frame); default :meth:`frame_sum_mean`.

        Returns
        -------
        FourDSTEM
            float32 counts; ``attrs["dose_e_per_frame"]`` and ``attrs["dose_seed"]`` set.
        """
        dose = _positive_number(dose, "dose (e-/frame)")
        seed = int(seed)
        if seed < 0:
            raise BadInputError(f"seed must be a non-negative integer, got {seed}")
        ref = _positive_number(reference, "reference frame sum") if reference is not None else self.frame_sum_mean()
        scale = dose / ref

        def poisson(block, block_info=None):
            start = [int(lo) for lo, _ in block_info[0]["array-location"]]
            rng = np.random.default_rng([seed] + start)
            lam = block.astype(np.float64) * scale
            bad = ~np.isfinite(lam)
            lam[bad] = 0.0
            np.maximum(lam, 0.0, out=lam)
            out = rng.poisson(lam).astype(np.float32)
            if bad.any():
                out[bad] = np.nan
            return out

        data = self.data.map_blocks(poisson, dtype=np.float32)
        attrs = dict(self.attrs, dose_e_per_frame=dose, dose_seed=seed, dose_reference_frame_sum=ref)
        attrs["frame_sum_mean"] = dose
        out = self._replace(data=data, attrs=attrs)
        out.saturation_value = None
        return out


def _positive_number(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BadInputError(f"{name} must be a positive number, got {v!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise BadInputError(f"{name} must be a positive finite number, got {v!r}")
    return f


def _as_calibration(cal) -> Calibration:
    if cal is None:
        return Calibration()
    if isinstance(cal, Calibration):
        return cal
    if isinstance(cal, Mapping):
        import dataclasses

        names = {f.name for f in dataclasses.fields(Calibration)}
        plain = {k.removeprefix("calibration."): v for k, v in cal.items()}
        unknown = sorted(set(plain) - names)
        if unknown:
            raise BadInputError(f"unknown calibration field(s) {unknown}; known: {sorted(names)}")
        return Calibration(**{k: v for k, v in plain.items() if v is not None})
    raise BadInputError(f"calibration must be a Calibration or a dict, got {type(cal).__name__}")
