"""Thickness / tilt maps over 4D-STEM scans: local PACBED windows, streamed on dask chunks.

A *map* measures thickness and mistilt on local PACBED patterns, i.e. on the mean frame of
a window of ``window = (wy, wx)`` scan positions, with windows every ``step = (sy, sx)``
positions (tiled when ``step == window``, sliding when ``step < window``). Only whole
windows are used: window ``(i, j)`` covers scan rows ``i*sy .. i*sy + wy - 1`` and columns
``j*sx .. j*sx + wx - 1``, so the map has ``ny = (scan_y - wy) // sy + 1`` rows (and
trailing scan positions that do not fill a window are not used).

The map is cut into *blocks* of windows (``chunks=``, windows per block). One task per
block reads the scan region its windows need (windows that cross chunk borders of the
input are read across the border, never dropped), averages the good frames, runs the
predictor in batches and, with ``store=``, writes its own region of the zarr output and
then its completion flag. Re-running with the same arguments skips finished blocks, so an
interrupted or cancelled run resumes where it stopped and yields the identical map.

Bad frames (NaN/inf, all-zero, saturated: more than 1 % of pixels at the saturation value,
by default the dtype maximum for integer data) are left out of the window average; a window
without any good frame is masked (NaN) with a status code (:data:`STATUS_REASONS`).

Schedulers: dask's local threads (default), ``"sync"``, ``"processes"``, or a dask
``distributed`` cluster (a ``distributed.Client`` or a scheduler address
``"tcp://host:port"``). The predictor is loaded once per worker, never per block.

Examples
--------
>>> from diffkit.maps import map_pacbed
>>> ds = map_pacbed(scan, window=(8, 8), store="map.zarr")  # doctest: +SKIP
>>> ds.thickness_nm.plot()  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pickle
import threading
import traceback
from typing import Any, Callable, Mapping

import numpy as np

from .calibration import Calibration
from .data import _jsonable
from .errors import BadInputError, DiffkitError

__all__ = [
    "Cancelled",
    "OPTIONAL_PREDICTION_VARIABLES",
    "PREDICTION_VARIABLES",
    "STATUS_REASONS",
    "StoreMismatchError",
    "local_pacbeds",
    "map_pacbed",
    "window_grid",
]

#: Meaning of the ``status`` codes of a map (also in ``ds.attrs["status_reasons"]``).
STATUS_REASONS = {
    0: "ok",
    1: "no usable frame: non-finite values (NaN or inf)",
    2: "no usable frame: empty (all pixels zero)",
    3: "no usable frame: saturated (more than 1 % of pixels at the saturation value)",
    4: "out of distribution (predictor flagged the pattern)",
}

#: Fraction of pixels at the saturation value above which a frame counts as saturated.
SATURATED_FRACTION = 0.01

#: ``ood_reason`` of a window that was not measured (no usable frame; see ``status``).
NOT_MEASURED = 255
#: ``ood_reason`` of a window the predictor flagged without a reason code diffkit knows.
OOD_UNKNOWN = 254

#: Float outputs of the predictor stored in the map: name -> (units, long name).
PREDICTION_VARIABLES = {
    "thickness_nm": ("nm", "specimen thickness"),
    "thickness_std_nm": ("nm", "thickness standard deviation"),
    "tilt_x_mrad": ("mrad", "mistilt along x"),
    "tilt_y_mrad": ("mrad", "mistilt along y"),
    "tilt_x_std_mrad": ("mrad", "standard deviation of the x mistilt"),
    "tilt_y_std_mrad": ("mrad", "standard deviation of the y mistilt"),
    "tilt_magnitude_mrad": ("mrad", "mistilt magnitude"),
    "tilt_azimuth_deg": ("degree", "mistilt azimuth (from +x towards +y)"),
}

#: Float outputs stored when the predictor gives them (NaN otherwise).
OPTIONAL_PREDICTION_VARIABLES = {
    "rotation_std_deg": ("degree", "68 % half-width of the pattern rotation, i.e. of the crystal axes the tilt "
                                   "and its azimuth refer to (large in thin regions)"),
}

_REQUIRED_KEYS = tuple(PREDICTION_VARIABLES) + ("ood",)
_FLOAT_VARIABLES = {**PREDICTION_VARIABLES, **OPTIONAL_PREDICTION_VARIABLES}
_STORE_FORMAT = 2
#: default windows per block and patterns per ``predict_batch`` call when the predictor runs on
#: a CUDA GPU (benchmarks/map_throughput.py on an H100: 256^2 map 6.3 s -> 2.3 s, i.e. I/O-bound)
GPU_BLOCK_WINDOWS = 1024
_STORE_KIND = "diffkit.maps.map_pacbed"


class Cancelled(DiffkitError):
    """A map was cancelled (progress callback returned ``False`` or raised this).

    Raise it from a ``callback`` to stop a run after the chunks in flight; ``map_pacbed``
    then raises a ``Cancelled`` with ``done``, ``total`` and ``store`` set. Calling
    ``map_pacbed`` again with the same arguments and store resumes the run.
    """

    def __init__(self, message: str = "cancelled", done: int | None = None, total: int | None = None,
                 store: str | None = None):
        super().__init__(message)
        self.done, self.total, self.store = done, total, store


class StoreMismatchError(BadInputError):
    """An existing map store was written with different arguments than this call."""


# ---------------------------------------------------------------------------------------------
# inputs and window geometry
# ---------------------------------------------------------------------------------------------
def _pair(v, name: str, allow_float: bool = False):
    if v is None:
        return None
    if np.isscalar(v):
        v = (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise BadInputError(f"{name} must be a number or a pair (y, x), got {v!r}") from None
    out = []
    for x in (a, b):
        if allow_float:
            try:
                fx = float(x)
            except (TypeError, ValueError):
                raise BadInputError(f"{name} must be numbers, got {v!r}") from None
            if not (math.isfinite(fx) and fx > 0):
                raise BadInputError(f"{name} must be positive, got {v!r}")
            out.append(fx)
        else:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) and not (
                    isinstance(x, (float, np.floating)) and float(x).is_integer()):
                raise BadInputError(f"{name} must be whole numbers of scan positions, got {v!r}")
            if int(x) < 1:
                raise BadInputError(f"{name} must be >= 1 scan position, got {v!r}")
            out.append(int(x))
    return tuple(out)


def _as_calibration(cal) -> Calibration:
    if cal is None:
        return Calibration()
    if isinstance(cal, Calibration):
        return cal
    if isinstance(cal, Mapping):
        return Calibration.from_attrs(dict(cal))
    raise BadInputError(f"calibration must be a diffkit.Calibration or a dict, got {type(cal).__name__}")


@dataclasses.dataclass
class _Input:
    data: Any  # dask array (scan_y, scan_x, det_y, det_x), detector axes in one chunk
    calibration: Calibration
    source: str
    saturation_value: float | None
    is_float: bool


def _prepare_input(data, calibration=None, saturation_value=None) -> _Input:
    import dask.array as da

    source = ""
    cal = None
    sat = None
    if hasattr(data, "calibration") and hasattr(data, "data") and not isinstance(data, np.ndarray):
        cal = data.calibration
        source = str(getattr(data, "source", "") or "")
        sat = getattr(data, "saturation_value", None)
        data = data.data
    if calibration is not None:
        explicit = _as_calibration(calibration)
        if cal is not None:  # explicit values override the data's own calibration
            cal = _as_calibration(cal).replace(**{k: v for k, v in dataclasses.asdict(explicit).items()
                                                  if v is not None})
        else:
            cal = explicit
    cal = _as_calibration(cal)
    try:
        from .data import validate_4d
    except ImportError:  # pragma: no cover - data.py is optional for this module
        validate_4d = None
    if validate_4d is not None:
        data = validate_4d(data, source)
    else:  # pragma: no cover
        shape = getattr(data, "shape", None)
        if shape is None or len(shape) != 4:
            raise BadInputError(f"expected a 4D array (scan_y, scan_x, det_y, det_x), got shape {shape}")
        if np.dtype(data.dtype).kind not in "iuf":
            raise BadInputError(f"unsupported dtype {data.dtype}: 4D-STEM data must be real numbers")
    if not isinstance(data, da.Array):
        try:
            from .data import frame_chunks

            chunks = frame_chunks(data.shape, np.dtype(data.dtype).itemsize)
        except ImportError:  # pragma: no cover
            chunks = (max(1, 2**24 // int(np.prod(data.shape[1:]) * data.dtype.itemsize)), -1, -1, -1)
        data = da.from_array(data, chunks=chunks)
    if len(data.chunks[2]) != 1 or len(data.chunks[3]) != 1:
        data = data.rechunk({2: -1, 3: -1})
    dtype = np.dtype(data.dtype)
    if saturation_value is not None:
        sat = float(saturation_value)
    elif sat is not None:
        sat = float(sat)
    elif dtype.kind in "iu":
        sat = float(np.iinfo(dtype).max)
    return _Input(data=data, calibration=cal, source=source, saturation_value=sat, is_float=dtype.kind == "f")


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """Geometry of a map: windows over the scan and the blocks (chunks) of windows.

    Attributes are in scan positions: ``scan`` (scan_y, scan_x), ``window``, ``step``,
    ``shape`` (ny, nx) of the map, ``chunks`` (windows per block, y and x).
    """

    scan: tuple[int, int]
    window: tuple[int, int]
    step: tuple[int, int]
    chunks: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple((s - w) // st + 1 for s, w, st in zip(self.scan, self.window, self.step))

    @property
    def nblocks(self) -> tuple[int, int]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))

    @property
    def total(self) -> int:
        a, b = self.nblocks
        return a * b

    def block(self, bi: int, bj: int):
        """``(i0, i1, j0, j1)`` window ranges and ``(r0, r1, c0, c1)`` scan region of a block."""
        (by, bx), (ny, nx) = self.chunks, self.shape
        (wy, wx), (sy, sx) = self.window, self.step
        i0, j0 = bi * by, bj * bx
        i1, j1 = min(i0 + by, ny), min(j0 + bx, nx)
        return (i0, i1, j0, j1), (i0 * sy, (i1 - 1) * sy + wy, j0 * sx, (j1 - 1) * sx + wx)

    def blocks(self):
        nby, nbx = self.nblocks
        for bi in range(nby):
            for bj in range(nbx):
                yield bi, bj

    def centres_px(self):
        """Window centres (y, x) in scan positions."""
        (ny, nx), (wy, wx), (sy, sx) = self.shape, self.window, self.step
        return np.arange(ny) * sy + (wy - 1) / 2, np.arange(nx) * sx + (wx - 1) / 2


def window_grid(scan_shape, window=None, step=None, *, window_nm=None, step_nm=None, scan_step_nm=None,
                chunks=None, data_chunks=None, min_block_windows: int | None = None) -> WindowGrid:
    """Resolve window/step (positions or nm) and the block size into a :class:`WindowGrid`.

    ``window`` / ``step`` are scan positions (int or (y, x)); ``window_nm`` / ``step_nm`` are
    nm and need ``scan_step_nm``. ``step`` defaults to ``window`` (tiled windows).
    ``chunks`` is windows per block; by default as many window rows/columns as fit in one
    input chunk (``data_chunks``, the dask chunks of the scan axes). ``min_block_windows``
    grows that default by whole input chunks of rows until a block holds at least that many
    windows (a GPU is only busy with large batches).
    """
    sy_, sx_ = (int(s) for s in scan_shape)
    if window is not None and window_nm is not None:
        raise BadInputError("give either window= (scan positions) or window_nm=, not both")
    if step is not None and step_nm is not None:
        raise BadInputError("give either step= (scan positions) or step_nm=, not both")
    if (window_nm is not None or step_nm is not None) and scan_step_nm is None:
        raise BadInputError("window_nm=/step_nm= need the scan step: set calibration.scan_step_nm (nm) "
                            "or give window=/step= in scan positions")
    if window_nm is not None:
        wn = _pair(window_nm, "window_nm", allow_float=True)
        window = tuple(max(1, int(round(w / scan_step_nm))) for w in wn)
    if step_nm is not None:
        sn = _pair(step_nm, "step_nm", allow_float=True)
        step = tuple(max(1, int(round(s / scan_step_nm))) for s in sn)
    if window is None:
        raise BadInputError("map_pacbed needs the local PACBED window: window=(wy, wx) scan positions "
                            "or window_nm= (with calibration.scan_step_nm)")
    window = _pair(window, "window")
    step = window if step is None else _pair(step, "step")
    if window[0] > sy_ or window[1] > sx_:
        raise BadInputError(f"window {window} (scan positions) is larger than the {sy_} x {sx_} scan")
    grid = WindowGrid((sy_, sx_), window, step, (1, 1))
    ny, nx = grid.shape
    if chunks is None:
        if data_chunks is not None:
            cr, cc = int(data_chunks[0][0]), int(data_chunks[1][0])
        else:
            cr, cc = sy_, sx_
        chunks = (max(1, cr // step[0]), max(1, cc // step[1]))
        if min_block_windows:
            rows = chunks[0]
            while rows * min(chunks[1], nx) < min_block_windows and rows < ny:
                rows += chunks[0]
            chunks = (rows, chunks[1])
    chunks = _pair(chunks, "chunks")
    return WindowGrid((sy_, sx_), window, step, (min(chunks[0], ny), min(chunks[1], nx)))


# ---------------------------------------------------------------------------------------------
# per-block numerics (run on workers)
# ---------------------------------------------------------------------------------------------
def _frame_status(region: np.ndarray, sat: float | None, is_float: bool) -> np.ndarray:
    """Per-frame code (R, C): 0 ok, 1 non-finite, 2 empty, 3 saturated (first matching wins).

    One max/min pass over the frames; saturated pixels are counted only in frames whose
    maximum reaches the saturation value.
    """
    R, C = region.shape[:2]
    out = np.zeros(R * C, np.uint8)
    if region.size == 0:
        return out.reshape(R, C)
    flat = region.reshape(R * C, -1)
    npx = flat.shape[1]
    with np.errstate(invalid="ignore"):
        mx = flat.max(axis=1)
        mn = flat.min(axis=1) if (is_float or region.dtype.kind == "i") else None
        if sat is not None:
            cand = np.flatnonzero(mx >= sat)
            if cand.size:
                nsat = (flat[cand] >= sat).sum(axis=1)
                out[cand[nsat > SATURATED_FRACTION * npx]] = 3
        out[(mx == 0) if mn is None else ((mx == 0) & (mn == 0))] = 2
        if is_float:
            out[~(np.isfinite(mx) & np.isfinite(mn))] = 1
    return out.reshape(R, C)


def _window_sum_2d(a: np.ndarray, n, window, step) -> np.ndarray:
    """Window sums of a (R, C, ...) array over scan axes, separably, fixed summation order."""
    (ny, nx), (wy, wx), (sy, sx) = n, window, step
    t = None
    for dy in range(wy):
        part = a[dy:dy + (ny - 1) * sy + 1:sy]
        t = part.astype(np.float64, copy=True) if t is None else t.__iadd__(part)
    s = None
    for dx in range(wx):
        part = t[:, dx:dx + (nx - 1) * sx + 1:sx]
        s = part.copy() if s is None else s.__iadd__(part)
    return s


def _accumulator_dtype(dtype, n_terms: int):
    """Narrowest dtype that sums ``n_terms`` values of ``dtype`` exactly (float64 for floats)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2 and n_terms * int(np.iinfo(dtype).max) < 2**32:
        return np.uint32
    if dtype.kind == "i" and dtype.itemsize <= 2 and n_terms * (int(np.iinfo(dtype).max) + 1) < 2**31:
        return np.int32
    if dtype.kind in "iu" and dtype.itemsize <= 4:
        return np.int64
    return np.float64


def _window_means(region: np.ndarray, n, window, step, sat, is_float):
    """Mean of the good frames per window, number of good frames and window status code.

    Returns ``mean`` (ny, nx, H, W) float64 (NaN where no good frame), ``count`` (ny, nx)
    int32 and ``status`` (ny, nx) uint8 (0, or the most frequent bad-frame code).
    """
    (ny, nx), (wy, wx), (sy, sx) = n, window, step
    fs = _frame_status(region, sat, is_float)
    good = fs == 0
    H, W = region.shape[2:]
    src = region if good.all() else np.where(good[..., None, None], region, 0)
    acc = _accumulator_dtype(region.dtype, wy * wx)  # exact integer sums for integer data
    # y pass: sums over the wy rows of each window row (full columns), then the x pass
    t = src[0:(ny - 1) * sy + 1:sy].astype(acc)
    for dy in range(1, wy):
        t += src[dy:dy + (ny - 1) * sy + 1:sy]
    total = t[:, 0:(nx - 1) * sx + 1:sx].copy()
    for dx in range(1, wx):
        total += t[:, dx:dx + (nx - 1) * sx + 1:sx]
    total = total.astype(np.float64, copy=False)
    count = _window_sum_2d(good.astype(np.float64), n, window, step).astype(np.int32)
    status = np.zeros((ny, nx), np.uint8)
    empty = count == 0
    if empty.any():
        codes = np.stack([_window_sum_2d((fs == c).astype(np.float64), n, window, step) for c in (1, 2, 3)], -1)
        status[empty] = (np.argmax(codes, axis=-1) + 1).astype(np.uint8)[empty]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / np.where(empty, np.nan, count)[..., None, None]
    return mean, count, status


_MASK_CACHE: dict = {}


def _virtual_masks(det_shape, vspec) -> dict:
    """Boolean detector masks {name: (H, W)} for the virtual detectors in ``vspec``."""
    if not vspec:
        return {}
    key = (tuple(det_shape), json.dumps(vspec, sort_keys=True))
    if key not in _MASK_CACHE:
        cy, cx = vspec["center_px"]
        yy, xx = np.indices(det_shape, dtype=np.float64)
        r = np.hypot(yy - cy, xx - cx) * vspec["pixel_size_mrad"]
        _MASK_CACHE[key] = {name: ((r >= lo) & (r < hi)).astype(np.float64)
                            for name, (lo, hi) in vspec["detectors"].items()}
    return _MASK_CACHE[key]


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """Everything a block task needs besides its scan region and the predictor (small, picklable)."""

    grid: WindowGrid
    saturation_value: float | None
    is_float: bool
    batch_size: int
    options: tuple  # predictor options as sorted (key, value) pairs
    vspec: dict | None
    ood_reason_codes: dict | None  # str reason -> code, for predictors that return strings
    variables: tuple  # names of the output variables in order
    store: str | None


# process-wide predictor cache: one predictor object per worker process, keyed by a token
_PREDICTORS: dict = {}
_PREDICTORS_LOCK = threading.Lock()
_MAX_CACHED = 4


class _PredictorRef:
    """Picklable handle of a predictor, resolved once per worker process.

    In the process that made it, ``get()`` returns the object itself. Pickled (processes /
    distributed workers), it carries either the predictor's pickle or a loader (for the
    shipped models); the first ``get()`` in a worker builds the object and caches it by
    token, so every later block on that worker reuses it.
    """

    def __init__(self, token: str, obj=None, payload: bytes | None = None, loader=None, card_id=None):
        self.token, self._obj, self.payload, self.loader, self.card_id = token, obj, payload, loader, card_id

    def __getstate__(self):
        return {"token": self.token, "_obj": None, "payload": self.payload, "loader": self.loader,
                "card_id": self.card_id}

    def get(self):
        if self._obj is not None:
            return self._obj
        with _PREDICTORS_LOCK:
            p = _PREDICTORS.get(self.token)
            if p is None:
                p = self.loader() if self.loader is not None else pickle.loads(self.payload)
                got = getattr(p, "card_id", None)
                if self.card_id is not None and got != self.card_id:
                    raise BadInputError(f"this worker loaded model {got!r} but the map was started with "
                                        f"{self.card_id!r}: install the same diffkit version and models "
                                        "on every worker")
                while len(_PREDICTORS) >= _MAX_CACHED:
                    _PREDICTORS.pop(next(iter(_PREDICTORS)))
                _PREDICTORS[self.token] = p
            self._obj = p
            return p


def _load_shipped(calibration, device=None):
    from .pacbed import load_predictor

    return load_predictor(calibration, device=device)


class _BlockFailure:
    """An exception raised in a block task, returned as a value so the group finishes cleanly."""

    def __init__(self, bi, bj, exc: BaseException):
        self.bi, self.bj = bi, bj
        self.tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")

    def reraise(self):
        exc = self.exc
        if hasattr(exc, "add_note"):
            exc.add_note(f"(in map block {(self.bi, self.bj)}; worker traceback:\n{self.tb})")
        raise exc


def _to_codes(reason, n, codes: dict | None) -> np.ndarray:
    r = np.asarray(reason)
    if r.shape != (n,):
        raise BadInputError(f"predictor.predict_batch returned 'ood_reason' of shape {r.shape}, expected ({n},)")
    if r.dtype.kind in "iub":
        return r.astype(np.uint8)
    codes = codes or {}
    out = np.full(n, OOD_UNKNOWN, np.uint8)
    for i, s in enumerate(r.astype(str)):
        s = s.strip()
        out[i] = codes.get(s, 0 if s in ("", "ok", "none") else OOD_UNKNOWN)
    return out


def _predict(pred, patterns: np.ndarray, spec: _BlockSpec) -> dict:
    n = len(patterns)
    out = {k: [] for k in (*_REQUIRED_KEYS, *OPTIONAL_PREDICTION_VARIABLES)}
    reasons = []
    opts = dict(spec.options)
    for s in range(0, n, spec.batch_size):
        batch = np.ascontiguousarray(patterns[s:s + spec.batch_size], dtype=np.float32)
        res = pred.predict_batch(batch, **opts)
        m = len(batch)
        for k in _REQUIRED_KEYS:
            if k not in res:
                raise BadInputError(f"predictor.predict_batch did not return {k!r} (got keys {sorted(res)})")
            v = np.asarray(res[k])
            if v.shape != (m,):
                raise BadInputError(f"predictor.predict_batch returned {k!r} of shape {v.shape}, expected ({m},)")
            out[k].append(v)
        for k in OPTIONAL_PREDICTION_VARIABLES:
            v = np.asarray(res[k], dtype=np.float64) if k in res else np.full(m, np.nan)
            if v.shape != (m,):
                raise BadInputError(f"predictor.predict_batch returned {k!r} of shape {v.shape}, expected ({m},)")
            out[k].append(v)
        reasons.append(_to_codes(res["ood_reason"], m, spec.ood_reason_codes) if "ood_reason" in res
                       else np.where(np.asarray(res["ood"], bool), OOD_UNKNOWN, 0).astype(np.uint8))
    merged = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    merged["ood_reason"] = np.concatenate(reasons) if reasons else np.zeros(0, np.uint8)
    return merged


def _block_results(region: np.ndarray, pred, spec: _BlockSpec, bi: int, bj: int) -> dict:
    grid = spec.grid
    (i0, i1, j0, j1), _ = grid.block(bi, bj)
    n = (i1 - i0, j1 - j0)
    region = np.asarray(region)
    mean, count, status = _window_means(region, n, grid.window, grid.step, spec.saturation_value, spec.is_float)
    ok = count > 0
    res = {k: np.full(n, np.nan, np.float32) for k in _FLOAT_VARIABLES}
    ood = ~ok  # masked windows count as not measured
    reason = np.where(ok, 0, NOT_MEASURED).astype(np.uint8)
    pats = mean[ok] if ok.any() else None
    if pats is not None:
        p = _predict(pred, pats, spec)
        for k in _FLOAT_VARIABLES:
            res[k][ok] = p[k].astype(np.float32)
        ood = ood.copy()
        ood[ok] = p["ood"].astype(bool)
        reason[ok] = p["ood_reason"]
        status = np.where((status == 0) & ood, 4, status).astype(np.uint8)
    res["ood"] = ood
    res["ood_reason"] = reason
    res["status"] = status
    res["n_frames"] = count
    masks = _virtual_masks(region.shape[2:], spec.vspec)
    if masks:
        vals = None
        if pats is not None:  # all virtual detectors in one pass over the window means
            m = np.stack([masks[k].ravel() for k in masks], axis=1)
            vals = pats.reshape(len(pats), -1) @ m
        for c, name in enumerate(masks):
            v = np.full(n, np.nan, np.float32)
            if vals is not None:
                v[ok] = vals[:, c].astype(np.float32)
            res[name] = v
    return {k: res[k] for k in spec.variables}


def _run_block(region, pred, spec: _BlockSpec, bi: int, bj: int):
    """Task body: one block of windows. Writes to the store when there is one."""
    try:
        if isinstance(pred, _PredictorRef):
            pred = pred.get()
        res = _block_results(region, pred, spec, bi, bj)
        if spec.store is None:
            return ("result", bi, bj, res)
        import zarr

        g = zarr.open_group(spec.store, mode="r+")
        (i0, i1, j0, j1), _ = spec.grid.block(bi, bj)
        for k, v in res.items():
            g[k][i0:i1, j0:j1] = v
        g["done"][bi:bi + 1, bj:bj + 1] = np.ones((1, 1), np.uint8)  # only after the data
        return ("done", bi, bj, None)
    except Exception as exc:  # noqa: BLE001 - re-raised in the client
        return _BlockFailure(bi, bj, exc)


def _window_block(region, spec_grid, sat, is_float, bi, bj):
    (i0, i1, j0, j1), _ = spec_grid.block(bi, bj)
    mean, count, status = _window_means(np.asarray(region), (i1 - i0, j1 - j0), spec_grid.window, spec_grid.step,
                                        sat, is_float)
    return mean, status, count


# ---------------------------------------------------------------------------------------------
# local PACBED windows as a lazy dask array
# ---------------------------------------------------------------------------------------------
def local_pacbeds(data, window=None, step=None, *, window_nm=None, step_nm=None, calibration=None,
                  saturation_value=None, chunks=None, return_status: bool = False):
    """Local PACBED patterns: the mean of the good frames over windows of scan positions (lazy).

    Parameters
    ----------
    data : FourDSTEM, dask or numpy array (scan_y, scan_x, det_y, det_x)
        The scan; never loaded whole (each output block reads only its scan region).
    window : int or (int, int)
        Window size in scan positions (y, x).
    step : int or (int, int), optional
        Window spacing in scan positions; default ``window`` (tiled). ``step < window``:
        sliding (overlapping) windows.
    window_nm, step_nm : float or (float, float), optional
        The same in nm (rounded to whole positions); need ``calibration.scan_step_nm``.
    calibration : Calibration or dict, optional
        Overrides the data's calibration values that it sets.
    saturation_value : float, optional
        Counts at which a pixel is saturated; default the dtype maximum for integer data
        (float data: no saturation check unless given).
    chunks : (int, int), optional
        Windows per output block (default: about one input chunk of scan rows per block).
    return_status : bool
        Also return the status code map (uint8, :data:`STATUS_REASONS` 0-3) and the number
        of good frames per window (int32), both dask arrays (ny, nx).

    Returns
    -------
    dask.array.Array (ny, nx, det_y, det_x) float64
        Mean counts per pixel and frame; NaN for windows without a good frame.
        ``ny = (scan_y - wy) // sy + 1`` (only whole windows).

    Examples
    --------
    >>> pats = local_pacbeds(scan, window=(4, 4), step=(2, 2))  # doctest: +SKIP
    >>> pats[0, 0].compute().shape  # doctest: +SKIP
    (128, 128)
    """
    import dask
    import dask.array as da

    inp = _prepare_input(data, calibration, saturation_value)
    grid = window_grid(inp.data.shape[:2], window, step, window_nm=window_nm, step_nm=step_nm,
                       scan_step_nm=inp.calibration.scan_step_nm, chunks=chunks, data_chunks=inp.data.chunks)
    H, W = inp.data.shape[2:]
    nby, nbx = grid.nblocks
    rows_p, rows_s, rows_c = [], [], []
    for bi in range(nby):
        rp, rs, rc = [], [], []
        for bj in range(nbx):
            (i0, i1, j0, j1), (r0, r1, c0, c1) = grid.block(bi, bj)
            n = (i1 - i0, j1 - j0)
            d = dask.delayed(_window_block, pure=True, nout=3)(inp.data[r0:r1, c0:c1], grid,
                                                               inp.saturation_value, inp.is_float, bi, bj)
            rp.append(da.from_delayed(d[0], n + (H, W), dtype=np.float64))
            rs.append(da.from_delayed(d[1], n, dtype=np.uint8))
            rc.append(da.from_delayed(d[2], n, dtype=np.int32))
        rows_p.append(rp)
        rows_s.append(rs)
        rows_c.append(rc)
    def grid2d(rows):
        return da.concatenate([da.concatenate(r, axis=1) for r in rows], axis=0)

    pats = grid2d(rows_p)
    if return_status:
        return pats, grid2d(rows_s), grid2d(rows_c)
    return pats


# ---------------------------------------------------------------------------------------------
# the map
# ---------------------------------------------------------------------------------------------
def _hash(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]


def _virtual_spec(cal: Calibration, det_shape, center_px):
    """Virtual BF (r < alpha) and ADF (2 alpha <= r < 4 alpha) detectors, or (None, note)."""
    miss = [n for n in ("pixel_size_mrad", "convergence_mrad") if getattr(cal, n) is None]
    if miss:
        return None, ("virtual_bf/virtual_adf not computed: calibration lacks "
                      + ", ".join(f"{m} ({Calibration.units(m)})" for m in miss))
    H, W = det_shape
    if center_px is None:
        cy, cx = (H - 1) / 2, (W - 1) / 2
    else:
        try:
            cy, cx = (float(v) for v in center_px)
        except (TypeError, ValueError):
            raise BadInputError(f"center_px must be (y, x) detector px, got {center_px!r}") from None
    a = cal.convergence_mrad
    spec = {"center_px": [cy, cx], "pixel_size_mrad": cal.pixel_size_mrad,
            "detectors": {"virtual_bf": [0.0, a], "virtual_adf": [2 * a, 4 * a]}}
    masks = _virtual_masks(det_shape, spec)
    empty = [k for k, m in masks.items() if not m.any()]
    note = ""
    for k in empty:
        spec["detectors"].pop(k)
        note += f"{k} not computed: its annulus holds no detector pixel. "
    return (spec if spec["detectors"] else None), note.strip()


def _coords(grid: WindowGrid, cal: Calibration):
    import xarray as xr

    cy, cx = grid.centres_px()
    step = cal.scan_step_nm
    if step is not None:
        return {"y": xr.Variable("y", cy * step, {"units": "nm", "long_name": "window centre y"}),
                "x": xr.Variable("x", cx * step, {"units": "nm", "long_name": "window centre x"}),
                "y_px": xr.Variable("y", cy, {"units": "px", "long_name": "window centre y (scan position)"}),
                "x_px": xr.Variable("x", cx, {"units": "px", "long_name": "window centre x (scan position)"})}, "nm"
    return {"y": xr.Variable("y", cy, {"units": "px", "long_name": "window centre y (scan position)"}),
            "x": xr.Variable("x", cx, {"units": "px", "long_name": "window centre x (scan position)"})}, "px"


def _var_meta(variables, vspec, ood_reasons) -> dict:
    meta = {k: {"units": u, "long_name": ln} for k, (u, ln) in _FLOAT_VARIABLES.items()}
    meta["ood"] = {"units": "", "long_name": "out of distribution (not a trustworthy measurement)"}
    reasons = {str(k): v for k, v in (ood_reasons or {}).items()}
    reasons.setdefault(str(OOD_UNKNOWN), "flagged by the predictor (reason not given as a known code)")
    reasons[str(NOT_MEASURED)] = "not measured: no usable frame in the window (see status)"
    meta["ood_reason"] = {"units": "", "long_name": "predictor's out-of-distribution reason code",
                          "reasons": json.dumps(reasons)}
    meta["status"] = {"units": "", "long_name": "window status code",
                      "flag_values": list(STATUS_REASONS), "flag_meanings": json.dumps(
                          {str(k): v for k, v in STATUS_REASONS.items()})}
    meta["n_frames"] = {"units": "", "long_name": "good frames averaged in the window"}
    for k, (lo, hi) in (vspec or {}).get("detectors", {}).items():
        meta[k] = {"units": "counts", "long_name": f"virtual {'bright' if k == 'virtual_bf' else 'annular dark'} "
                   f"field {lo:g}-{hi:g} mrad, mean counts per frame of the window",
                   "inner_mrad": lo, "outer_mrad": hi, "center_px": vspec["center_px"]}
    return {k: meta[k] for k in variables}


_DTYPES = {"ood": np.bool_, "ood_reason": np.uint8, "status": np.uint8, "n_frames": np.int32}
_FILL = {"ood": False, "ood_reason": 0, "status": 0, "n_frames": 0}


def _open_or_create_store(path: str, grid: WindowGrid, variables, meta, args: dict, attrs: dict, coords,
                          overwrite: bool):
    """Create the zarr store or check an existing one; returns the ``done`` block map."""
    import zarr

    h = args["hash"]
    exists = os.path.exists(os.path.join(path, "zarr.json")) or os.path.exists(os.path.join(path, ".zgroup"))
    if exists and not overwrite:
        g = zarr.open_group(path, mode="r+")
        old = dict(g.attrs).get("map_args")
        if old is None:
            raise StoreMismatchError(f"{path!r} exists but is not a diffkit map store; choose another path "
                                     "or pass overwrite=True to replace it")
        if old.get("hash") != h:
            diff = [f"{k}: store has {old.get(k)!r}, this call {v!r}" for k, v in args.items()
                    if k != "hash" and old.get(k) != v]
            diff += [f"{k}: store has {old[k]!r}, this call has none" for k in old if k not in args]
            raise StoreMismatchError(
                f"map store {path!r} was written with different arguments, so its finished chunks cannot be "
                "reused: " + "; ".join(diff or ["argument hash differs"])
                + ". Call again with the store's arguments to resume, use another store path, "
                "or pass overwrite=True to start over.")
        return np.asarray(g["done"][:]).astype(bool)
    if os.path.exists(path) and not overwrite and os.listdir(path):
        raise StoreMismatchError(f"{path!r} exists and is not a zarr map store; choose another path "
                                 "or pass overwrite=True")
    g = zarr.open_group(path, mode="w")
    ny, nx = grid.shape
    for k in variables:
        dt = np.dtype(_DTYPES.get(k, np.float32))
        g.create_array(k, shape=(ny, nx), chunks=grid.chunks, dtype=dt,
                       fill_value=_FILL.get(k, np.nan), dimension_names=("y", "x"),
                       attributes=_jsonable(meta[k]))
    for name, var in coords.items():
        g.create_array(name, shape=var.shape, chunks=var.shape, dtype=var.dtype, dimension_names=var.dims,
                       attributes=_jsonable(var.attrs))
        g[name][:] = var.values
    nby, nbx = grid.nblocks
    g.create_array("done", shape=(nby, nbx), chunks=(1, 1), dtype=np.uint8, fill_value=0,
                   dimension_names=("block_y", "block_x"),
                   attributes={"long_name": "1 when the block of windows is written", "units": ""})
    g.attrs.update(_jsonable(dict(attrs, map_args=args, complete=False)))
    return np.zeros((nby, nbx), bool)


def _resolve_scheduler(scheduler):
    """('local', dask scheduler name) or ('distributed', client, owned)."""
    if scheduler is None:
        return ("local", "threads", None, False)
    if isinstance(scheduler, str):
        s = scheduler.lower()
        if s in ("threads", "threading", "threaded"):
            return ("local", "threads", None, False)
        if s in ("sync", "synchronous", "single-threaded"):
            return ("local", "sync", None, False)
        if s in ("processes", "multiprocessing"):
            return ("local", "processes", None, False)
        if "://" in scheduler:
            from distributed import Client

            return ("distributed", None, Client(scheduler), True)
        raise BadInputError(f"scheduler must be 'threads', 'sync', 'processes', a scheduler address "
                            f"'tcp://host:port' or a distributed.Client, got {scheduler!r}")
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover
        Client = None
    if Client is not None and isinstance(scheduler, Client):
        return ("distributed", None, scheduler, False)
    raise BadInputError(f"scheduler must be 'threads', 'sync', 'processes', a scheduler address or a "
                        f"distributed.Client, got {type(scheduler).__name__}")


class _Progress:
    """tqdm bar + user callback; remembers a cancel request or a callback error."""

    def __init__(self, total, initial, progress, callback):
        self.total, self.done, self.callback = total, initial, callback
        self.cancelled = False
        self.error = None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="map_pacbed", unit="chunk")
        self._notify()

    def _notify(self):
        if self.callback is None or self.cancelled or self.error is not None:
            return
        try:
            if self.callback(self.done, self.total) is False:
                self.cancelled = True
        except Cancelled:
            self.cancelled = True
        except Exception as exc:  # noqa: BLE001 - re-raised by map_pacbed after the chunks in flight
            self.error = exc

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        self._notify()

    @property
    def stop(self):
        return self.cancelled or self.error is not None

    def close(self):
        if self.bar is not None:
            self.bar.close()


def map_pacbed(data, window=None, step=None, predictor=None, calibration=None, store=None, scheduler=None,
               progress: bool = True, callback: Callable[[int, int], Any] | None = None, batch_size: int | None = None,
               background: float | None = None, *, window_nm=None, step_nm=None, chunks=None,
               saturation_value: float | None = None, center_px=None, device=None, num_workers: int | None = None,
               predict_options: Mapping | None = None, overwrite: bool = False):
    """Thickness and mistilt maps from local PACBED windows, computed chunk by chunk.

    Parameters
    ----------
    data : FourDSTEM, dask or numpy array (scan_y, scan_x, det_y, det_x)
        The scan (read block by block, never loaded whole).
    window, step : int or (int, int)
        Local PACBED window and window spacing in scan positions (``step`` default
        ``window``: tiled; smaller: sliding windows). Or ``window_nm=`` / ``step_nm=``.
    predictor : object, optional
        Anything with ``predict_batch(patterns (N, H, W) float32, **options) -> dict`` of
        (N,) arrays and a ``card_id``. Default: the shipped model for the calibration,
        ``diffkit.pacbed.load_predictor(calibration)``.
    calibration : Calibration or dict, optional
        For a plain array; for a FourDSTEM, values set here override the data's own.
    store : str or path, optional
        A ``.zarr`` directory: results are written block by block with a completion flag
        per block; calling again with the same arguments resumes (finished blocks are
        skipped). A store written with other arguments raises :class:`StoreMismatchError`.
    scheduler : None, "threads", "sync", "processes", "tcp://host:port" or distributed.Client
        Where the blocks run (default: dask's local threads).
    progress : bool
        Show a tqdm progress bar (terminal or notebook).
    callback : callable(done_chunks, total_chunks), optional
        Called once at the start and after every finished block (main thread). Returning
        ``False`` or raising :class:`Cancelled` stops after the blocks in flight;
        ``map_pacbed`` then raises :class:`Cancelled` (the store stays resumable).
    batch_size : int, optional
        Patterns per ``predict_batch`` call (default 256; 1024 when the predictor is on CUDA).
    background : float, optional
        Passed to the predictor as ``background_strength`` (uniform background fraction
        per nm of thickness, see :meth:`diffkit.pacbed.PacbedPredictor.predict_batch`).
    chunks : (int, int), optional
        Windows per block (default: about one input chunk of scan rows per block; on CUDA,
        whole input chunks of rows until a block holds >= 1024 windows).
    saturation_value : float, optional
        Saturated pixel value in counts; default the dtype maximum for integer data.
    center_px : (float, float), optional
        Pattern centre (y, x) on the detector for the virtual BF/ADF images; default the
        detector centre.
    device : optional
        Torch device for the shipped predictor (default: CUDA when available).
    num_workers : int, optional
        Threads/processes of the local schedulers (default: CPU count).
    predict_options : dict, optional
        Further keyword arguments for ``predict_batch``. ``pixel_size_mrad`` is passed
        from the calibration when it is known, unless given here.
    overwrite : bool
        Replace an existing store instead of resuming it.

    Returns
    -------
    xarray.Dataset
        Dims ``(y, x)`` (window centres; nm when ``scan_step_nm`` is known, else scan
        positions), variables ``thickness_nm, thickness_std_nm, tilt_x_mrad, tilt_y_mrad,
        tilt_x_std_mrad, tilt_y_std_mrad, tilt_magnitude_mrad, tilt_azimuth_deg`` and
        ``rotation_std_deg`` (NaN when the predictor does not give it) (float32, NaN where masked), ``ood`` (bool), ``ood_reason``, ``status`` (uint8,
        :data:`STATUS_REASONS`), ``n_frames`` and, with ``pixel_size_mrad`` and
        ``convergence_mrad`` known, ``virtual_bf`` / ``virtual_adf``. Units in each
        variable's attrs; provenance (model card, window, step, source, calibration,
        version, date, argument hash) in ``ds.attrs``.

    Raises
    ------
    BadInputError
        Wrong shape/dtype, bad window/step, a predictor returning malformed output.
    StoreMismatchError
        ``store`` holds a map made with other arguments.
    Cancelled
        The callback cancelled the run.

    Examples
    --------
    >>> ds = map_pacbed(scan, window=(8, 8), store="wedge_map.zarr")  # doctest: +SKIP
    >>> ds = map_pacbed(scan, window=(8, 8), store="wedge_map.zarr")  # resumes / reuses  # doctest: +SKIP
    """
    import xarray as xr

    import diffkit

    inp = _prepare_input(data, calibration, saturation_value)
    cal = inp.calibration
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise BadInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    det_shape = tuple(int(s) for s in inp.data.shape[2:])

    # --- predictor (loaded once here: its card id is part of the provenance and the store hash)
    shipped = predictor is None
    if shipped:
        predictor = _load_shipped(cal, device)
    # on a GPU, default blocks hold >= GPU_BLOCK_WINDOWS windows (measured: 2.8x faster maps)
    on_gpu = getattr(getattr(predictor, "device", None), "type", None) == "cuda"
    grid = window_grid(inp.data.shape[:2], window, step, window_nm=window_nm, step_nm=step_nm,
                       scan_step_nm=cal.scan_step_nm, chunks=chunks, data_chunks=inp.data.chunks,
                       min_block_windows=GPU_BLOCK_WINDOWS if on_gpu else None)
    if batch_size is None:
        batch_size = GPU_BLOCK_WINDOWS if on_gpu else 256
    if not hasattr(predictor, "predict_batch"):
        raise BadInputError(f"predictor must have a predict_batch(patterns, **options) method, "
                            f"got {type(predictor).__name__}")
    card_id = getattr(predictor, "card_id", None)
    if not card_id:
        raise BadInputError("predictor must have a non-empty card_id (model card id) for the map's provenance")
    req = getattr(predictor, "input_requirements", None) or {}
    min_px = req.get("min_px") if isinstance(req, Mapping) else None
    if min_px and min(det_shape) < min_px:
        raise BadInputError(f"model {card_id} needs detector frames of at least {min_px} x {min_px} px, "
                            f"the data has {det_shape[0]} x {det_shape[1]}")
    opts = dict(predict_options or {})
    if background is not None:
        opts.setdefault("background_strength", float(background))
    if cal.pixel_size_mrad is not None:
        opts.setdefault("pixel_size_mrad", cal.pixel_size_mrad)
    ood_reasons = getattr(predictor, "ood_reasons", None)
    if ood_reasons is None and shipped:
        from .pacbed import OOD_REASONS as ood_reasons
    ood_reasons = dict(ood_reasons) if ood_reasons else None

    vspec, vnote = _virtual_spec(cal, det_shape, center_px)
    variables = tuple(_FLOAT_VARIABLES) + ("ood", "ood_reason", "status", "n_frames")
    if vspec:
        variables += tuple(vspec["detectors"])
    coords, scan_units = _coords(grid, cal)
    meta = _var_meta(variables, vspec, ood_reasons)

    # --- provenance and the argument hash of the store
    args = _jsonable({
        "kind": _STORE_KIND, "format": _STORE_FORMAT,
        "card_id": str(card_id), "window": grid.window, "step": grid.step, "chunks": grid.chunks,
        "data_shape": tuple(inp.data.shape), "dtype": str(inp.data.dtype), "source": inp.source,
        "batch_size": int(batch_size), "predict_options": dict(sorted(opts.items())),
        "saturation_value": inp.saturation_value, "calibration": cal.to_attrs(), "virtual": vspec,
    })
    args["hash"] = _hash(args)
    attrs = {
        "title": "diffkit local-PACBED thickness and mistilt map",
        "model_card_id": str(card_id), "window": list(grid.window), "step": list(grid.step),
        "window_units": "scan positions", "chunks": list(grid.chunks), "source": inp.source,
        "scan_shape": list(grid.scan), "detector_shape": list(det_shape), "dtype": str(inp.data.dtype),
        "scan_units": scan_units, "diffkit_version": getattr(diffkit, "__version__", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args_hash": args["hash"], "predict_options": json.dumps(_jsonable(opts), sort_keys=True),
        "status_reasons": dict(STATUS_REASONS), "saturation_value": inp.saturation_value,
        "bad_frames": "frames with NaN/inf, all-zero frames and saturated frames are left out of the window mean",
        **cal.to_attrs(),
    }
    if window_nm is not None:
        attrs["window_nm_requested"] = _jsonable(_pair(window_nm, "window_nm", allow_float=True))
    if step_nm is not None:
        attrs["step_nm_requested"] = _jsonable(_pair(step_nm, "step_nm", allow_float=True))
    if scan_units == "px":
        attrs["note_coords"] = "scan step unknown (calibration.scan_step_nm): coordinates are scan positions"
    if vnote:
        attrs["note_virtual_images"] = vnote

    store_path = None if store is None else os.fspath(store)
    if store_path is not None:
        done_map = _open_or_create_store(store_path, grid, variables, meta, args, attrs, coords, overwrite)
    else:
        done_map = np.zeros(grid.nblocks, bool)

    spec = _BlockSpec(grid=grid, saturation_value=inp.saturation_value, is_float=inp.is_float,
                      batch_size=int(batch_size), options=tuple(sorted(opts.items())), vspec=vspec,
                      ood_reason_codes={v: k for k, v in ood_reasons.items()} if ood_reasons else None,
                      variables=variables, store=store_path)
    todo = [(bi, bj) for bi, bj in grid.blocks() if not done_map[bi, bj]]
    results: dict = {}
    mode, local_sched, client, own_client = _resolve_scheduler(scheduler) if todo else ("none", None, None, False)

    def region(bi, bj):
        _, (r0, r1, c0, c1) = grid.block(bi, bj)
        return inp.data[r0:r1, c0:c1]

    prog = _Progress(grid.total, grid.total - len(todo), progress, callback)
    failure = None
    try:
        if prog.stop:
            pass
        elif mode == "local":
            failure = _run_local(todo, region, predictor, shipped, cal, device, spec, local_sched, num_workers,
                                 prog, results)
        elif mode == "distributed":
            failure = _run_distributed(todo, region, predictor, shipped, cal, device, spec, client, prog, results)
    finally:
        prog.close()
        if own_client:
            client.close()
    if failure is not None:
        failure.reraise()
    if prog.error is not None:
        raise prog.error
    if prog.cancelled:
        where = (f"; the store {store_path!r} holds the finished chunks: call map_pacbed again with the same "
                 "arguments to resume") if store_path else " (no store=, so the finished chunks were not kept)"
        raise Cancelled(f"map cancelled after {prog.done} of {grid.total} chunks{where}", prog.done, grid.total,
                        store_path)

    # --- assemble
    ny, nx = grid.shape
    if store_path is not None:
        import zarr

        g = zarr.open_group(store_path, mode="r+")
        if not dict(g.attrs).get("complete"):
            g.attrs.update({"complete": True, "date_completed":
                            datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        arrays = {k: np.asarray(g[k][:]) for k in variables}
        attrs["date"] = dict(g.attrs).get("date", attrs["date"])
        attrs["store"] = store_path
    else:
        arrays = {k: np.full((ny, nx), _FILL.get(k, np.nan), np.dtype(_DTYPES.get(k, np.float32)))
                  for k in variables}
        for (bi, bj), res in results.items():
            (i0, i1, j0, j1), _ = grid.block(bi, bj)
            for k in variables:
                arrays[k][i0:i1, j0:j1] = res[k]
    ds = xr.Dataset({k: (("y", "x"), arrays[k], meta[k]) for k in variables}, coords=coords, attrs=attrs)
    return ds


def _run_local(todo, region, predictor, shipped, cal, device, spec, sched, num_workers, prog, results):
    import dask
    from dask.callbacks import Callback

    nw = int(num_workers or dask.config.get("num_workers", None) or os.cpu_count() or 1)
    pool = None
    if sched == "processes":
        import pickle as _pk
        import uuid
        from concurrent.futures import ProcessPoolExecutor
        from functools import partial

        import cloudpickle
        from dask.multiprocessing import get_context, initialize_worker_process

        if shipped:
            ref = _PredictorRef(f"shipped:{predictor.card_id}:{device}", loader=partial(_load_shipped, cal, device),
                                card_id=predictor.card_id)
        else:
            try:
                payload = cloudpickle.dumps(predictor, protocol=_pk.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise BadInputError(f"scheduler='processes' needs a picklable predictor: {exc}") from exc
            ref = _PredictorRef(f"obj:{predictor.card_id}:{uuid.uuid4().hex}", payload=payload,
                                card_id=predictor.card_id)
        pool = ProcessPoolExecutor(nw, mp_context=get_context(),
                                   initializer=partial(initialize_worker_process, user_initializer=None))
        compute_kw = {"scheduler": "processes", "pool": pool}
    else:
        ref = _PredictorRef(f"local:{id(predictor)}", obj=predictor)
        compute_kw = {"scheduler": "sync"} if sched == "sync" else {"scheduler": "threads", "num_workers": nw}
    group = 1 if sched == "sync" else nw
    failure = None
    try:
        pred_d = dask.delayed(ref, pure=False)  # one graph node: the same reference for every block
        for g0 in range(0, len(todo), group):
            if prog.stop or failure is not None:
                break
            tasks = [dask.delayed(_run_block, pure=False)(region(bi, bj), pred_d, spec, bi, bj)
                     for bi, bj in todo[g0:g0 + group]]
            keys = {t.key for t in tasks}
            finished = {}

            class _CB(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    if key in keys and key not in finished:
                        finished[key] = True
                        if not isinstance(result, _BlockFailure):
                            prog.step()

            with _CB():
                outs = dask.compute(*tasks, **compute_kw)
            for out in outs:
                if isinstance(out, _BlockFailure):
                    failure = failure or out
                elif out[0] == "result":
                    results[(out[1], out[2])] = out[3]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return failure


def _run_distributed(todo, region, predictor, shipped, cal, device, spec, client, prog, results):
    from distributed import as_completed

    if shipped:
        from functools import partial

        pred = _PredictorRef(f"shipped:{predictor.card_id}:{device}", loader=partial(_load_shipped, cal, device),
                             card_id=predictor.card_id)
    else:
        pred = client.scatter(predictor, broadcast=True, hash=False)
    import dask

    tasks = [dask.delayed(_run_block, pure=False)(region(bi, bj), pred, spec, bi, bj) for bi, bj in todo]
    futures = client.compute(tasks)
    failure = None
    ac = as_completed(futures)
    try:
        for fut in ac:
            out = fut.result()
            fut.release()
            if isinstance(out, _BlockFailure):
                failure = out
                break
            kind, bi, bj, res = out
            if kind == "result":
                results[(bi, bj)] = res
            prog.step()
            if prog.stop:
                break
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        if not shipped:
            client.cancel([pred])
    return failure
