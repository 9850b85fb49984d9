"""Intake-2 catalogs of 4D-STEM data sets, opened safely.

An intake catalog is a YAML file that names the classes intake should import to read each
entry, so opening an untrusted catalog with intake alone can run arbitrary code.
:func:`open_catalog` therefore parses the YAML itself (``yaml.safe_load``, ``!!python``
tags refused), walks every value and refuses (:class:`~diffkit.errors.UnsafeCatalogError`)
any class, module or template function that is not on diffkit's allow-list, *before*
intake sees the catalog; nothing named by a refused catalog is imported.

Usage::

    cat = open_catalog("catalogs/demo.yaml")          # or open_catalog(url, dose=200, region=(0, 16, 0, 16))
    list(cat)                                          # entry names
    scan = cat["sto_pacbed_wedge"].read()              # lazy FourDSTEM (cat.sto_pacbed_wedge.read() also works)
    describe_catalog(cat)                              # table: name, description, shape, dtype, calibration

Catalog user parameters (set on the catalog, ``open_catalog(path, dose=...)`` or ``cat(dose=...)``):

``dose`` (e-/frame, default ``None`` = data as stored)
    frames are scaled to this mean dose and Poisson-resampled lazily, one seeded random
    generator per chunk (:meth:`diffkit.data.FourDSTEM.with_dose`).
``region`` (``(y0, y1, x0, x1)`` scan positions, default ``None`` = whole scan)
    crop of the scan.

Entry format (intake 2, ``version: 2``)::

    user_parameters:
      dose: {cls: "intake.readers.user_parameters:BaseUserParameter", default: null, description: ...}
    data:
      wedge_file:
        datatype: "diffkit.catalog:FourDSTEMData"
        kwargs: {url: "{CATALOG_DIR}/data/wedge.zarr"}        # + reader:, calibration:, options:
    entries:
      wedge:
        reader: "diffkit.catalog:FourDSTEMReader"
        kwargs: {data: "{data(wedge_file)}", dose_e_per_frame: "{dose}", scan_region: "{region}"}
        metadata: {description: ...}

``aliases``, ``metadata``, missing ``kwargs``/``metadata``/``user_parameters`` are filled in
(each entry is listed under its own name).
"""
from __future__ import annotations

import importlib.util
import math
import re
from typing import Any, Mapping

import yaml
from intake.readers.datatypes import FileData
from intake.readers.readers import BaseReader

from .errors import BadInputError, UnsafeCatalogError

__all__ = [
    "ALLOWED_CLASSES",
    "ALLOWED_IMPORTS",
    "SAFE_LOAD_OPTIONS",
    "FourDSTEMData",
    "FourDSTEMReader",
    "check_catalog",
    "describe_catalog",
    "open_catalog",
]

_UP = "intake.readers.user_parameters:"

#: Class references a catalog may name, by the key they appear under.
ALLOWED_CLASSES: dict[str, frozenset] = {
    "reader": frozenset({"diffkit.catalog:FourDSTEMReader"}),
    "datatype": frozenset({"diffkit.catalog:FourDSTEMData"}),
    "output_instance": frozenset({"diffkit.data:FourDSTEM"}),
    "cls": frozenset({_UP + n for n in ("BaseUserParameter", "SimpleUserParameter", "OptionsUserParameter",
                                        "BoundedNumberUserParameter", "MultiOptionUserParameter")}
                     | {"intake.readers.entry:ReaderDescription", "intake.readers.entry:DataDescription",
                        "diffkit.catalog:FourDSTEMReader", "diffkit.catalog:FourDSTEMData"}),
}
_ALL_REFS = frozenset().union(*ALLOWED_CLASSES.values())

#: Top-level packages a catalog's ``metadata.imports`` may list (only checked, never imported by intake).
ALLOWED_IMPORTS = frozenset({"diffkit", "intake", "dask", "numpy", "xarray", "zarr", "h5py", "fsspec", "rsciio"})

#: builtins a SimpleUserParameter may coerce with (``dtype``); never ``eval``/``exec``/``open`` ...
_SAFE_DTYPES = frozenset({"int", "float", "str", "bool", "list", "tuple", "dict", "object"})

#: keys whose value is an importable class or module reference
_CLASS_KEYS = frozenset({"cls", "reader", "datatype", "output_instance", "func", "class", "module", "driver",
                         "plugin", "plugins", "loader", "constructor"})

#: options a catalog may pass to :func:`diffkit.io.load` (never e.g. ``mmap_mode``, which could write files)
SAFE_LOAD_OPTIONS = frozenset({"dataset", "scan_shape", "saturation_value", "q_calibration", "navigation_shape",
                               "first_frame", "last_frame", "remove_nans"})

_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_][\w.]*$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_TEMPLATE_FUNC = re.compile(r"(^|\{)\s*(func|import|pickle64|env)\s*\(")
_PLAIN_TAGS = frozenset({"str", "int", "float", "bool", "null", "seq", "map"})
_MAX_BYTES = 4 * 2**20
_MAX_ALIASES = 200


# --------------------------------------------------------------------------- intake classes

class FourDSTEMData(FileData):
    """A 4D-STEM data file (any format :func:`diffkit.io.load` reads).

    Parameters
    ----------
    url : str
        Path or URL (``{CATALOG_DIR}/...`` in catalogs).
    storage_options : dict, optional
        fsspec options for remote zarr stores.
    reader : str, optional
        Force a diffkit reader (``npy``, ``hdf5``, ``zarr``, ``mib``, ``empad``, ``blockfile``, ``dm``).
    calibration : dict, optional
        Calibration values overriding the file's, e.g. ``{beam_energy_kv: 200}`` (kV, mrad,
        mrad/px, nm as in :class:`~diffkit.calibration.Calibration`).
    options : dict, optional
        Extra keywords for :func:`diffkit.io.load` (``dataset``, ``scan_shape`` ...).
    """

    structure = {"array"}
    filepattern = ""  # never claims files in intake's type guessing

    def __init__(self, url, storage_options: dict | None = None, reader: str | None = None,
                 calibration: dict | None = None, options: dict | None = None, metadata: dict | None = None):
        self.reader = reader
        self.calibration = dict(calibration) if calibration else None
        self.options = dict(options) if options else {}
        bad = sorted(set(self.options) - SAFE_LOAD_OPTIONS)
        if bad:
            raise UnsafeCatalogError(f"load option(s) {bad} are not allowed in catalogs; allowed: "
                                     f"{sorted(SAFE_LOAD_OPTIONS)}")
        super().__init__(url, storage_options=storage_options, metadata=metadata)


_UNSET = object()


class FourDSTEMReader(BaseReader):
    """Read a :class:`FourDSTEMData` into a lazy :class:`diffkit.data.FourDSTEM`.

    Reader keywords (catalog ``kwargs``): ``dose_e_per_frame`` (e-/frame, None = as
    stored; catalogs template it as ``"{dose}"``), ``scan_region`` (``(y0, y1, x0, x1)``
    scan positions, None = whole scan; ``"{region}"``), ``seed`` (int, Poisson
    resampling), ``chunks`` (as for :func:`diffkit.io.load`). ``read(dose=..., region=...)``
    overrides both for one read.

    The keyword names differ from the catalog's user-parameter names on purpose: intake
    treats a keyword named like a user parameter as that parameter's value and drops it,
    so ``cat(dose=...)`` would otherwise never reach the reader.
    """

    implements = {FourDSTEMData}
    imports = {"dask", "zarr", "numpy", "xarray"}
    output_instance = "diffkit.data:FourDSTEM"

    def _read(self, data, dose_e_per_frame=None, scan_region=None, seed: int = 0, chunks="auto",
              dose=_UNSET, region=_UNSET, **kw):
        from .io import load

        if kw:
            raise TypeError(f"unexpected keyword(s) for FourDSTEMReader.read: {sorted(kw)}")
        dose = check_dose(dose_e_per_frame if dose is _UNSET else dose)
        region = check_region(scan_region if region is _UNSET else region)
        opts = dict(data.options or {})
        if data.storage_options:
            opts["storage_options"] = data.storage_options
        ds = load(data.url, calibration=data.calibration, reader=data.reader, chunks=chunks, **opts)
        if dose is not None:
            ds = ds.with_dose(dose, seed=int(seed))
        if region is not None:
            ds = ds.crop_region(region)
        desc = (self.metadata or {}).get("description")
        if desc:
            ds.attrs.setdefault("description", desc)
        return ds


def check_dose(dose):
    """``None`` or a positive finite dose in e-/frame (float); else :class:`BadInputError`."""
    if dose is None or (isinstance(dose, str) and dose.strip().lower() in ("", "none", "null")):
        return None
    try:
        d = float(dose)
    except (TypeError, ValueError):
        raise BadInputError(f"dose must be a positive number of electrons per frame (or None), got {dose!r}") from None
    if not (math.isfinite(d) and d > 0):
        raise BadInputError(f"dose must be a positive finite number of electrons per frame, got {dose!r}")
    return d


def check_region(region):
    """``None`` or ``(y0, y1, x0, x1)`` ints with ``y0 < y1`` and ``x0 < x1``; else :class:`BadInputError`."""
    if region is None or (isinstance(region, str) and region.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(region, str):
        region = [s for s in re.split(r"[,\s]+", region.strip("()[] ")) if s]
    try:
        vals = [float(v) for v in region]
    except (TypeError, ValueError):
        raise BadInputError(f"region must be (y0, y1, x0, x1) scan positions, got {region!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) and v == int(v) and v >= 0 for v in vals):
        raise BadInputError(f"region must be four non-negative integers (y0, y1, x0, x1), got {region!r}")
    y0, y1, x0, x1 = (int(v) for v in vals)
    if not (y0 < y1 and x0 < x1):
        raise BadInputError(f"region (y0, y1, x0, x1) = {(y0, y1, x0, x1)} is empty: need y0 < y1 and x0 < x1")
    return (y0, y1, x0, x1)


# --------------------------------------------------------------------------- the safety check

def _unsafe(src: str, where: str, value, why: str) -> UnsafeCatalogError:
    return UnsafeCatalogError(
        f"refusing to open catalog {src!r}: {where} = {value!r} {why}. Nothing from this catalog was imported. "
        f"diffkit catalogs may only name {sorted(ALLOWED_CLASSES['reader'] | ALLOWED_CLASSES['datatype'])} "
        "and intake's user-parameter classes.")


def _check_tags(text: str, src: str) -> None:
    """Refuse ``!!python/...`` and any other non-plain YAML tag, and alias bombs, from the token stream."""
    n_alias = 0
    try:
        for tok in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(tok, yaml.TagToken):
                handle, suffix = tok.value
                tag = f"{handle or ''}{suffix}"
                plain = handle == "!!" and suffix in _PLAIN_TAGS
                if not plain:
                    line = tok.start_mark.line + 1
                    raise UnsafeCatalogError(
                        f"refusing to open catalog {src!r}: YAML tag {tag!r} at line {line} is not allowed "
                        "(python object tags can run code; diffkit catalogs are plain YAML). "
                        "Nothing from this catalog was imported.")
            elif isinstance(tok, yaml.AliasToken):
                n_alias += 1
                if n_alias > _MAX_ALIASES:
                    raise UnsafeCatalogError(f"refusing to open catalog {src!r}: more than {_MAX_ALIASES} YAML "
                                             "aliases (possible alias bomb)")
    except yaml.YAMLError as exc:
        raise BadInputError(f"catalog {src!r} is not valid YAML: {exc}") from None


def _importable_top(name: str) -> bool:
    top = name.split(".", 1)[0].split(":", 1)[0]
    try:
        return importlib.util.find_spec(top) is not None  # top-level lookup only: runs no module code
    except (ImportError, ValueError):
        return False


def check_catalog(doc: Any, src: str = "<catalog>") -> None:
    """Raise :class:`UnsafeCatalogError` if the parsed catalog ``doc`` names anything not allow-listed.

    Checked everywhere in the document: class/module keys (``cls``, ``reader``,
    ``datatype``, ``output_instance``, ``func`` ...), any ``package.module:attr`` string,
    intake template functions (``{func(...)}``, ``{import(...)}``, ``{pickle64(...)}``,
    ``{env(...)}``), ``imports`` lists, user-parameter ``dtype``; in ``metadata`` sections
    also any dotted name whose top-level module is importable. Nothing is imported.
    """
    from .io import FORMATS

    def walk(node, path: tuple):
        where = ".".join(map(str, path)) or "<root>"
        in_meta = "metadata" in path
        in_up = "user_parameters" in path
        if isinstance(node, Mapping):
            for k, v in node.items():
                ks = str(k)
                kp = path + (ks,)
                kwhere = ".".join(map(str, kp))
                if ks in _CLASS_KEYS:
                    if v is None and ks in ("output_instance", "reader"):
                        pass
                    elif not isinstance(v, str):
                        raise _unsafe(src, kwhere, v, "must be a class reference string")
                    elif ks == "reader" and v in FORMATS:
                        pass  # diffkit file-format name (FourDSTEMData.reader)
                    elif v not in ALLOWED_CLASSES.get(ks, _ALL_REFS) and not (ks == "cls" and v in _ALL_REFS):
                        raise _unsafe(src, kwhere, v, "is not on diffkit's allow-list")
                if ks == "options" and len(path) >= 1 and path[-1] == "kwargs" and isinstance(v, Mapping):
                    bad = sorted(set(map(str, v)) - SAFE_LOAD_OPTIONS)
                    if bad:
                        raise _unsafe(src, kwhere, bad, f"are not allowed load options ({sorted(SAFE_LOAD_OPTIONS)})")
                if ks == "imports":
                    items = v if isinstance(v, (list, tuple, set)) else [v]
                    for it in items:
                        top = str(it).split(".", 1)[0].split(":", 1)[0]
                        if top not in ALLOWED_IMPORTS:
                            raise _unsafe(src, kwhere, it, f"is not an allowed import ({sorted(ALLOWED_IMPORTS)})")
                if in_up and ks in ("dtype", "keytype") and v is not None and str(v) not in _SAFE_DTYPES:
                    raise _unsafe(src, kwhere, v, f"is not an allowed parameter type ({sorted(_SAFE_DTYPES)})")
                walk(v, kp)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        elif isinstance(node, str):
            s = node.strip()
            if _TEMPLATE_FUNC.search(s):
                raise _unsafe(src, where, node, "uses an intake template function (func/import/pickle64/env), "
                                                "which can import code or read the environment")
            if _REF.match(s) and s not in _ALL_REFS:
                raise _unsafe(src, where, node, "looks like an import reference and is not on diffkit's allow-list")
            if ((in_meta or in_up) and _DOTTED.match(s) and s.split(".", 1)[0] not in ALLOWED_IMPORTS
                    and _importable_top(s)):
                raise _unsafe(src, where, node, "names an importable module and is not on diffkit's allow-list")
        elif isinstance(node, (bytes, bytearray)):
            raise _unsafe(src, where, "<binary>", "is binary data, which diffkit catalogs never need")

    if not isinstance(doc, Mapping):
        raise BadInputError(f"catalog {src!r} is not a YAML mapping (got {type(doc).__name__})")
    walk(doc, ())


def _check_version(doc: Mapping, src: str) -> None:
    if doc.get("version") != 2:
        if "sources" in doc:
            raise BadInputError(f"catalog {src!r} is an intake-1 catalog ('sources:'); diffkit needs an intake-2 "
                                "catalog ('version: 2', 'entries:'), see catalogs/README.md")
        raise BadInputError(f"catalog {src!r} is not an intake-2 catalog: 'version: 2' missing")


def _normalise(doc: dict, src: str) -> dict:
    _check_version(doc, src)
    out = dict(doc)
    for key in ("entries", "data", "user_parameters", "metadata", "aliases"):
        v = out.get(key)
        if v is None:
            out[key] = {}
        elif not isinstance(v, Mapping):
            raise BadInputError(f"catalog {src!r}: {key!r} must be a mapping, got {type(v).__name__}")
        else:
            out[key] = dict(v)
    for name, e in list(out["entries"].items()):
        if not isinstance(e, Mapping) or "reader" not in e:
            raise BadInputError(f"catalog {src!r}: entry {name!r} needs a 'reader'")
        e = dict(e)
        e.setdefault("kwargs", {})
        e.setdefault("metadata", {})
        e.setdefault("user_parameters", {})
        e.setdefault("output_instance", "diffkit.data:FourDSTEM")
        out["entries"][name] = e
    for name, d in list(out["data"].items()):
        if not isinstance(d, Mapping) or "datatype" not in d:
            raise BadInputError(f"catalog {src!r}: data {name!r} needs a 'datatype'")
        d = dict(d)
        d.setdefault("kwargs", {})
        d.setdefault("metadata", {})
        d.setdefault("user_parameters", {})
        out["data"][name] = d
    for name, up in list(out["user_parameters"].items()):
        if isinstance(up, Mapping):
            up = dict(up)
            up.setdefault("cls", _UP + "BaseUserParameter")
            up.setdefault("default", None)
            up.setdefault("description", "")
            out["user_parameters"][name] = up
    targets = set(out["aliases"].values())
    for name in out["entries"]:
        if name not in targets and name not in out["aliases"]:
            out["aliases"][name] = name
    for alias, target in out["aliases"].items():
        if target not in out["entries"] and target not in out["data"]:
            raise BadInputError(f"catalog {src!r}: alias {alias!r} points to unknown entry {target!r}")
    return out


# --------------------------------------------------------------------------- public

def open_catalog(path_or_url, **user_parameters):
    """Open an intake-2 catalog of 4D-STEM data after checking it is safe.

    Parameters
    ----------
    path_or_url : str or path-like
        Local path or fsspec URL of the YAML catalog.
    **user_parameters
        Values for the catalog's user parameters, e.g. ``dose=200`` (e-/frame) or
        ``region=(0, 16, 0, 16)`` (scan positions).

    Returns
    -------
    intake.readers.entry.Catalog
        ``list(cat)`` gives the entry names; ``cat["name"]`` (or ``cat.name``) is an intake
        reader whose ``.read()`` returns a lazy :class:`diffkit.data.FourDSTEM`.

    Raises
    ------
    FileNotFoundError
        No file at ``path_or_url``.
    UnsafeCatalogError
        The catalog names a class, module, template function or YAML tag outside
        diffkit's allow-list (nothing is imported).
    BadInputError
        Not valid YAML / not an intake-2 catalog / unknown or invalid user parameter.
    """
    import os

    from fsspec.core import url_to_fs
    from intake.readers.entry import Catalog

    src = os.fspath(path_or_url)
    fs, p = url_to_fs(src)
    try:
        with fs.open(p, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"catalog not found: {src!r}", src) from None
    except IsADirectoryError:
        raise BadInputError(f"catalog {src!r} is a directory; give the YAML file") from None
    if len(raw) > _MAX_BYTES:
        raise BadInputError(f"catalog {src!r} is larger than {_MAX_BYTES // 2**20} MiB; not a catalog?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"catalog {src!r} is not UTF-8 text") from None
    _check_tags(text, src)
    try:
        doc = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise UnsafeCatalogError(f"refusing to open catalog {src!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise BadInputError(f"catalog {src!r} is not valid YAML: {exc}") from None
    if isinstance(doc, Mapping):
        _check_version(doc, src)
    check_catalog(doc, src)
    doc = _normalise(doc, src)
    cat = Catalog.from_dict(doc)
    cat.user_parameters["CATALOG_PATH"] = fs.unstrip_protocol(p)
    cat.user_parameters["CATALOG_DIR"] = fs.unstrip_protocol(fs._parent(p))
    cat.user_parameters["STORAGE_OPTIONS"] = {}
    if user_parameters:
        declared = sorted(k for k in cat.user_parameters if k not in ("CATALOG_PATH", "CATALOG_DIR", "STORAGE_OPTIONS"))
        unknown = sorted(set(user_parameters) - set(declared))
        if unknown:
            raise BadInputError(f"catalog {src!r} has no user parameter(s) {unknown}; declared: {declared}")
        if "dose" in user_parameters:
            user_parameters["dose"] = check_dose(user_parameters["dose"])
        if "region" in user_parameters:
            r = check_region(user_parameters["region"])
            user_parameters["region"] = None if r is None else list(r)
        cat = cat(**user_parameters)
    return cat


def describe_catalog(cat) -> "pandas.DataFrame":  # noqa: F821
    """Small table of a catalog's entries for dashboards: one row per entry name.

    Columns: ``description``, ``shape`` (scan_y, scan_x, det_y, det_x), ``dtype``,
    ``calibration`` (short text, unknown values listed as missing), ``truth`` (names of
    the ground-truth maps) and ``error`` (why the entry could not be opened, else "").
    Reading is lazy (only metadata); the ``dose``/``region`` parameters are not applied.
    """
    import pandas as pd

    rows = []
    for name in list(cat):
        row = {"name": name, "description": "", "shape": "", "dtype": "", "calibration": "", "truth": "",
               "error": ""}
        try:
            reader = cat[name]
            row["description"] = str((reader.metadata or {}).get("description", "")).strip()
            ds = reader.read(dose=None, region=None)
            row["shape"] = str(ds.shape)
            row["dtype"] = str(ds.dtype)
            row["calibration"] = _calibration_text(ds.calibration)
            row["truth"] = ", ".join(map(str, ds.truth.data_vars)) if ds.truth is not None else ""
        except Exception as exc:  # noqa: BLE001 - shown in the table
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    df = pd.DataFrame(rows, columns=["name", "description", "shape", "dtype", "calibration", "truth", "error"])
    return df.set_index("name")


def _calibration_text(cal) -> str:
    from .calibration import Calibration

    parts = []
    for n in ("beam_energy_kv", "convergence_mrad", "pixel_size_mrad", "scan_step_nm"):
        v = getattr(cal, n)
        if v is not None:
            parts.append(f"{n}={v:g} {Calibration.units(n)}")
    for n in ("material", "zone_axis"):
        v = getattr(cal, n)
        if v is not None:
            parts.append(f"{n}={v}")
    if cal.missing:
        parts.append("missing: " + ", ".join(cal.missing))
    return "; ".join(parts)
