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
import os
import posixpath
import re
import string
from typing import Any, Mapping, Sequence

import yaml
from intake.readers.datatypes import FileData
from intake.readers.readers import BaseReader

from .errors import BadInputError, UnsafeCatalogError

__all__ = [
    "ALLOWED_CLASSES",
    "ALLOWED_IMPORTS",
    "CACHING_PROTOCOLS",
    "LOCAL_PROTOCOLS",
    "SAFE_LOAD_OPTIONS",
    "SAFE_STORAGE_OPTIONS",
    "FourDSTEMData",
    "FourDSTEMReader",
    "check_catalog",
    "describe_catalog",
    "open_catalog",
    "parse_catalog_text",
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
_DATA_TEMPLATE = re.compile(r"^\s*data\s*\(")
_DATA_REF = re.compile(r"^\{data\(([A-Za-z0-9_.-]+)\)\}$")
_PLAIN_FIELD = re.compile(r"^[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PLAIN_TAGS = frozenset({"str", "int", "float", "bool", "null", "seq", "map"})
_MAX_BYTES = 1 * 2**20
_MAX_ALIASES = 200
#: bounds on the parsed YAML: nesting depth (collections), nodes and characters after alias expansion
_MAX_DEPTH = 32
_MAX_NODES = 100_000
_MAX_CHARS = 8 * 2**20

#: fsspec protocols that read local files (always allowed)
LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: fsspec protocols that write a cache somewhere: only with ``protocols=`` from the caller
CACHING_PROTOCOLS = frozenset({"simplecache", "filecache", "blockcache", "cached"})
#: ``storage_options`` keys a catalog file may set (read-only switches; no paths, no credentials
#: sources, no cache settings). Everything else comes from the caller's ``storage_options=``.
SAFE_STORAGE_OPTIONS = frozenset({"anon", "requester_pays"})
#: user parameters diffkit sets itself; a catalog may not declare them
RESERVED_PARAMETERS = frozenset({"CATALOG_DIR", "CATALOG_PATH", "STORAGE_OPTIONS"})
_TEMPLATE_NAMES = ("env", "func", "import", "pickle64", "data")

# keys each section may hold (intake copies every key of an entry onto its description object)
_TOP_KEYS = frozenset({"version", "metadata", "user_parameters", "data", "entries", "aliases"})
_ENTRY_KEYS = frozenset({"reader", "kwargs", "metadata", "user_parameters", "output_instance"})
_DATA_KEYS = frozenset({"datatype", "kwargs", "metadata", "user_parameters"})
_UP_KEYS = frozenset({"cls", "default", "description", "dtype", "options", "min", "max"})
_ENTRY_KWARGS = frozenset({"data", "args", "dose_e_per_frame", "scan_region", "seed", "chunks"})
_DATA_KWARGS = frozenset({"url", "storage_options", "reader", "calibration", "options", "metadata"})
_CAL_KEYS = frozenset({"beam_energy_kv", "convergence_mrad", "pixel_size_mrad", "scan_step_nm", "material",
                       "zone_axis"})


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

def _yaml_error(src: str, exc: yaml.YAMLError) -> BadInputError:
    """A YAML syntax error naming line and column only: never a snippet of the file."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = str(getattr(exc, "problem", "") or "syntax error")
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", problem)[:80]  # quoted text comes from the file
    return BadInputError(f"catalog {src!r} is not valid YAML{where} ({problem})")


def _check_tokens(text: str, src: str) -> None:
    """Refuse ``!!python/...`` and any other non-plain YAML tag, alias bombs and deep nesting,
    from the token stream (the scanner does not recurse)."""
    n_alias = depth = 0
    starts = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
              yaml.FlowSequenceStartToken)
    ends = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    try:
        for tok in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(tok, starts):
                depth += 1
                if depth > _MAX_DEPTH:
                    raise UnsafeCatalogError(f"refusing to open catalog {src!r}: YAML nested more than {_MAX_DEPTH} "
                                             f"levels deep (line {tok.start_mark.line + 1})")
            elif isinstance(tok, ends):
                depth -= 1
            elif isinstance(tok, yaml.TagToken):
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
        raise _yaml_error(src, exc) from None


_check_tags = _check_tokens  # former name


def _check_expanded_size(text: str, src: str) -> None:
    """Refuse YAML whose alias/anchor expansion exceeds :data:`_MAX_NODES` nodes or
    :data:`_MAX_CHARS` characters (counted on the node graph, once per distinct node)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(src, exc) from None
    if root is None:
        return
    memo: dict[int, tuple[int, int]] = {}
    # post-order walk with an explicit stack (the graph is a DAG: aliases point to earlier nodes)
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in memo:
            continue
        if isinstance(node, yaml.ScalarNode):
            memo[id(node)] = (1, len(node.value))
            continue
        children = ([c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode) else list(node.value))
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in memo)
            continue
        n, c = 1, 0
        for ch in children:
            cn, cc = memo.get(id(ch), (1, 0))
            n += cn
            c += cc
        memo[id(node)] = (n, c)
        if n > _MAX_NODES or c > _MAX_CHARS:
            raise UnsafeCatalogError(f"refusing to open catalog {src!r}: the YAML expands to more than "
                                     f"{_MAX_NODES} values or {_MAX_CHARS // 2**20} MiB of text (alias bomb?)")


def parse_catalog_text(text: str, src: str = "<catalog>"):
    """Parse catalog YAML safely: plain tags only, at most :data:`_MAX_ALIASES` aliases,
    :data:`_MAX_DEPTH` levels and :data:`_MAX_NODES` values after alias expansion."""
    _check_tokens(text, src)
    _check_expanded_size(text, src)
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise UnsafeCatalogError(f"refusing to open catalog {src!r}: {_yaml_error(src, exc)}") from None
    except yaml.YAMLError as exc:
        raise _yaml_error(src, exc) from None


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
            data_ref = len(path) == 4 and path[0] == "entries" and path[2] == "kwargs" and path[3] == "data" or (
                len(path) == 5 and path[0] == "entries" and path[3] == "args")
            _check_templates(node, src, where, data_ref_ok=data_ref)
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
    _check_structure(doc, src)


def _template_fields(s: str):
    """``(field_name, conversion, format_spec)`` of the ``{...}`` fields intake would format."""
    out = []
    try:
        for _, field, spec, conv in string.Formatter().parse(s):
            if field is not None:
                out.append((field, conv, spec))
    except ValueError:
        pass  # unbalanced braces: intake leaves such a string as it is (fields before the error are kept)
    return out


def _check_templates(s: str, src: str, where: str, data_ref_ok: bool = False) -> None:
    """Templates may only be plain names (``{dose}``, ``{CATALOG_DIR}``) or, where a data
    reference belongs, exactly ``{data(name)}``: no attribute or index access, no conversions
    or format specs (``{CATALOG_DIR.__class__.__mro__}`` would be evaluated by ``str.format``)."""
    if data_ref_ok and _DATA_REF.match(s.strip()):
        return
    for field, conv, spec in _template_fields(s):
        if not _PLAIN_FIELD.match(field) or conv or spec:
            raise _unsafe(src, where, s, "uses a template other than a plain {name} (attribute access, "
                                         "indexing, conversions and format specs are not allowed)")
    if "{data(" in s.replace(" ", ""):
        raise _unsafe(src, where, s, "uses a data reference outside an entry's 'data' argument")


def _mapping(v, src, where) -> Mapping:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise BadInputError(f"catalog {src!r}: {where} must be a mapping, got {type(v).__name__}")
    return v


def _only_keys(m: Mapping, allowed: frozenset, src: str, where: str) -> None:
    bad = sorted(str(k) for k in m if str(k) not in allowed)
    if bad:
        raise _unsafe(src, f"{where}.{bad[0]}", bad[0], f"is not a key diffkit catalogs use here (allowed: "
                                                       f"{sorted(allowed)})")


def _check_plain(v, src, where) -> None:
    """A YAML scalar or a (nested) list of scalars."""
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_plain(x, src, f"{where}.{i}")
    elif not (v is None or isinstance(v, (str, int, float, bool))):
        raise _unsafe(src, where, type(v).__name__, "must be a number, string, null or a list of them")


def _check_user_parameters(ups, src, where) -> None:
    for name, up in _mapping(ups, src, where).items():
        w = f"{where}.{name}"
        if not isinstance(name, str) or not _PLAIN_FIELD.match(name):
            raise _unsafe(src, w, name, "is not a valid parameter name (letters, digits, underscores)")
        if name in RESERVED_PARAMETERS:
            raise _unsafe(src, w, name, "is set by diffkit itself and may not be declared by a catalog")
        if name.startswith(_TEMPLATE_NAMES):
            raise _unsafe(src, w, name, f"may not start with an intake template name {_TEMPLATE_NAMES}")
        if not isinstance(up, Mapping):
            _check_plain(up, src, w)
            continue
        _only_keys(up, _UP_KEYS, src, w)
        for k in ("default", "options", "min", "max"):
            if k in up:
                _check_plain(up[k], src, f"{w}.{k}")
        opts = up.get("options") if isinstance(up.get("options"), (list, tuple)) else []
        for x in (up.get("default"), *opts):
            # intake matches parameter defaults against its templates even without braces
            if isinstance(x, str) and ("{" in x or "}" in x or _DATA_TEMPLATE.match(x) or _TEMPLATE_FUNC.search(x)):
                raise _unsafe(src, f"{w}.default", x, "is a template; parameter values must be plain values")


def _named_sections(doc: Mapping, key: str, src: str, allowed, noun: str, needs: str):
    """Yield (name, where, mapping) for each item of section ``key`` after checking its name, type,
    keys and user parameters."""
    for name, d in _mapping(doc.get(key), src, key).items():
        w = f"{key}.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise _unsafe(src, w, name, f"is not a valid {noun} name (letters, digits, '_', '.', '-')")
        if not isinstance(d, Mapping):
            raise BadInputError(f"catalog {src!r}: {noun} {name!r} needs a '{needs}'")
        _only_keys(d, allowed, src, w)
        _check_user_parameters(d.get("user_parameters"), src, f"{w}.user_parameters")
        yield name, w, d


def _check_structure(doc: Mapping, src: str) -> None:
    """The catalog has exactly the shape diffkit's reader needs (see the module docstring); intake
    copies every key of an entry onto its description object, so unknown keys are refused."""
    _only_keys(doc, _TOP_KEYS, src, "<root>")
    _check_user_parameters(doc.get("user_parameters"), src, "user_parameters")
    data = _mapping(doc.get("data"), src, "data")
    for name, w, d in _named_sections(doc, "data", src, _DATA_KEYS, "data", "datatype"):
        kw = _mapping(d.get("kwargs"), src, f"{w}.kwargs")
        _only_keys(kw, _DATA_KWARGS, src, f"{w}.kwargs")
        if not isinstance(kw.get("url"), str) or not kw["url"].strip():
            raise BadInputError(f"catalog {src!r}: {w}.kwargs.url must be a path or URL string")
        so = _mapping(kw.get("storage_options"), src, f"{w}.kwargs.storage_options")
        bad = sorted(str(k) for k in so if str(k) not in SAFE_STORAGE_OPTIONS)
        if bad:
            raise _unsafe(src, f"{w}.kwargs.storage_options.{bad[0]}", bad[0],
                          f"may not be set by a catalog (allowed: {sorted(SAFE_STORAGE_OPTIONS)}); fsspec options "
                          "such as cache folders come only from open_catalog(storage_options=...)")
        for k, v in so.items():
            if not isinstance(v, (bool, str)) or (isinstance(v, str) and ("/" in v or "\\" in v)):
                raise _unsafe(src, f"{w}.kwargs.storage_options.{k}", v, "must be true/false or a plain word")
        cal = _mapping(kw.get("calibration"), src, f"{w}.kwargs.calibration")
        _only_keys(cal, _CAL_KEYS, src, f"{w}.kwargs.calibration")
        for k, v in cal.items():
            _check_plain(v, src, f"{w}.kwargs.calibration.{k}")
        for k, v in _mapping(kw.get("options"), src, f"{w}.kwargs.options").items():
            _check_plain(v, src, f"{w}.kwargs.options.{k}")
        if kw.get("reader") is not None and not isinstance(kw["reader"], str):
            raise _unsafe(src, f"{w}.kwargs.reader", kw["reader"], "must be a format name")
    for name, w, e in _named_sections(doc, "entries", src, _ENTRY_KEYS, "entry", "reader"):
        kw = _mapping(e.get("kwargs"), src, f"{w}.kwargs")
        _only_keys(kw, _ENTRY_KWARGS, src, f"{w}.kwargs")
        refs = []
        if "data" in kw:
            refs.append(("data", kw["data"]))
        if "args" in kw:
            args = kw["args"]
            if not isinstance(args, (list, tuple)) or len(args) != 1:
                raise _unsafe(src, f"{w}.kwargs.args", args, "must be a one-element list ['{data(name)}']")
            refs.append(("args.0", args[0]))
        if len(refs) > 1:
            raise _unsafe(src, f"{w}.kwargs", "data+args", "gives the data twice")
        for k, ref in refs:
            m = _DATA_REF.match(ref.strip()) if isinstance(ref, str) else None
            if not m or m.group(1) not in data:
                raise _unsafe(src, f"{w}.kwargs.{k}", ref, f"must be '{{data(name)}}' naming one of the catalog's "
                                                           f"data {sorted(data)}")
        for k, v in kw.items():
            if k not in ("data", "args"):
                _check_plain(v, src, f"{w}.kwargs.{k}")
    for a, t in _mapping(doc.get("aliases"), src, "aliases").items():
        if not isinstance(a, str) or not isinstance(t, str):
            raise BadInputError(f"catalog {src!r}: aliases must map names to entry names")


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


# --------------------------------------------------------------------------- where a catalog may read

def _protocols_of(url: str) -> list[str]:
    """fsspec protocols of a (possibly ``::``-chained) URL, outermost first; ``"file"`` for local paths."""
    out = []
    parts = url.split("::")
    for i, part in enumerate(parts):
        part = part.strip()
        if part[:5].lower() == "data:":
            out.append("data")
            continue
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", part)
        if m:
            out.append(m.group(1).lower())
        elif i < len(parts) - 1:  # "filecache::/path": a bare protocol name before the target
            out.append(part.split(":", 1)[0].lower() or "?")
        else:
            out.append("file")
    return out


def _check_protocols(url: str, allowed: frozenset, src: str, what: str) -> list[str]:
    protos = _protocols_of(url)
    head = f"refusing to open catalog {src[:80]!r}" + ("" if what == "catalog" else f": {what} = {url[:200]!r}")
    if "data" in protos:
        raise UnsafeCatalogError(f"{head}: data: URLs are not allowed (a catalog and its data must be files)")
    bad = [p for p in protos if p not in LOCAL_PROTOCOLS and p not in allowed]
    if bad:
        kind = "caching" if bad[0] in CACHING_PROTOCOLS else "remote"
        raise UnsafeCatalogError(
            f"{head}: the {kind} protocol {bad[0]!r} is not allowed; local files "
            f"only unless the caller passes open_catalog(..., protocols={sorted(set(bad))!r}) (a catalog file can "
            "never enable a protocol)")
    return protos


def _strip_file(part: str) -> str:
    m = re.match(r"^(file|local)://", part, re.I)
    return part[m.end():] if m else part


def _norm_url(u: str) -> str:
    scheme, rest = u.split("://", 1)
    host, _, path = rest.partition("/")
    path = posixpath.normpath("/" + path) if path else "/"
    return f"{scheme.lower()}://{host}{path}"


def _inside(p: str, root: str, sep: str) -> bool:
    root = root.rstrip(sep)
    return p == root or p.startswith(root + sep)


class _Policy:
    """What the caller allows: extra protocols, fsspec options, folders (or URL prefixes) the data may lie in."""

    def __init__(self, protocols=(), storage_options=None, data_roots=None):
        if isinstance(protocols, str):
            protocols = (protocols,)
        self.protocols = frozenset(str(p).lower() for p in (protocols or ())) - {"data"}
        self.storage_options = dict(storage_options or {})
        self.local_roots: list[str] = []
        self.url_roots: list[str] = []
        for r in ([data_roots] if isinstance(data_roots, (str, os.PathLike)) else (data_roots or ())):
            r = os.fspath(r)
            if "://" in r and _protocols_of(r)[-1] not in LOCAL_PROTOCOLS:
                self.url_roots.append(_norm_url(r.split("::")[-1]))
            else:
                self.local_roots.append(os.path.realpath(_strip_file(r)))


def _resolve_data_url(raw: str, name: str, src: str, cat_dir: str, cat_path: str, cat_local: bool,
                      policy: _Policy) -> tuple[str, bool]:
    """The absolute URL a data entry reads, after checking protocol and folder: ``(url, is_local)``."""
    u = raw.strip().replace("{CATALOG_DIR}", cat_dir).replace("{CATALOG_PATH}", cat_path)
    where = f"data.{name}.kwargs.url"
    if "{" in u or "}" in u:
        raise _unsafe(src, where, raw, "may use no template but {CATALOG_DIR}")
    protos = _check_protocols(u, policy.protocols, src, where)
    parts = [p.strip() for p in u.split("::")]
    inner = parts[-1]
    outside = ("lies outside the catalog's folder; pass open_catalog(..., data_roots=[folder]) to allow data "
               "elsewhere")
    if protos[-1] in LOCAL_PROTOCOLS:
        p = _strip_file(inner)
        if not os.path.isabs(p):
            if not cat_local:
                inner = posixpath.join(cat_dir, p)
                protos[-1] = "remote"
            else:
                p = os.path.join(cat_dir, p)
    if protos[-1] in LOCAL_PROTOCOLS:
        real = os.path.realpath(p)
        roots = ([cat_dir] if cat_local else []) + policy.local_roots
        if not any(_inside(real, os.path.realpath(r), os.sep) for r in roots):
            raise _unsafe(src, where, raw, outside)
        inner = "file://" + real
    else:
        nu = _norm_url(inner)
        roots = ([] if cat_local else [_norm_url(cat_dir)]) + policy.url_roots
        if not any(_inside(nu, r, "/") for r in roots):
            raise _unsafe(src, where, raw, outside)
        inner = nu
    return "::".join(parts[:-1] + [inner]), len(parts) == 1 and protos[-1] in LOCAL_PROTOCOLS


def _apply_policy(doc: dict, src: str, cat_dir: str, cat_path: str, cat_local: bool, policy: _Policy) -> None:
    """Replace every data URL by its checked absolute form and set its fsspec options (in place)."""
    for name, d in doc["data"].items():
        kw = dict(d.get("kwargs") or {})
        url, local = _resolve_data_url(kw["url"], name, src, cat_dir, cat_path, cat_local, policy)
        kw["url"] = url
        so = {k: v for k, v in (kw.get("storage_options") or {}).items() if k in SAFE_STORAGE_OPTIONS}
        kw["storage_options"] = None if local else ({**so, **policy.storage_options} or None)
        d["kwargs"] = kw


def _read_catalog_bytes(src: str, policy: _Policy) -> tuple[bytes, str, str, bool]:
    """``(bytes, catalog folder, catalog path/URL, is_local)`` of the catalog file."""
    protos = _check_protocols(src, policy.protocols, src, "catalog")
    local = len(protos) == 1 and protos[0] in LOCAL_PROTOCOLS
    try:
        if local:
            p = os.path.realpath(_strip_file(src))
            if os.path.isdir(p):
                raise IsADirectoryError(p)
            with open(p, "rb") as f:
                raw = f.read(_MAX_BYTES + 1)
            return raw, os.path.dirname(p), p, True
        from fsspec.core import url_to_fs

        fs, p = url_to_fs(src, **policy.storage_options)
        with fs.open(p, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
        inner = src.split("::")[-1].strip()
        if protos[-1] in LOCAL_PROTOCOLS:  # e.g. simplecache::file://...: the data folder is still local
            real = os.path.realpath(_strip_file(inner))
            return raw, os.path.dirname(real), real, True
        inner = _norm_url(inner) if "://" in inner else fs.unstrip_protocol(p)
        return raw, posixpath.dirname(inner), inner, False
    except FileNotFoundError:
        raise FileNotFoundError(2, f"catalog not found: {src!r}", src) from None
    except IsADirectoryError:
        raise BadInputError(f"catalog {src!r} is a directory; give the YAML file") from None


# --------------------------------------------------------------------------- public

def open_catalog(path_or_url, *, protocols: Sequence[str] = (), storage_options: dict | None = None,
                 data_roots: Sequence | None = None, **user_parameters):
    """Open an intake-2 catalog of 4D-STEM data after checking it is safe.

    Parameters
    ----------
    path_or_url : str or path-like
        Local path (or ``file://`` URL) of the YAML catalog; other URLs need ``protocols``.
    protocols : sequence of str, optional
        fsspec protocols allowed besides local files, for the catalog and its data, e.g.
        ``("https",)`` or ``("simplecache", "s3")``. Never taken from the catalog; ``data:``
        URLs are always refused.
    storage_options : dict, optional
        fsspec options for those protocols (cache folders, credentials ...). A catalog may
        only set :data:`SAFE_STORAGE_OPTIONS` itself.
    data_roots : sequence of paths or URL prefixes, optional
        Folders the data may lie in besides the catalog's own folder (default: only there).
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
        The catalog names a class, module, template, YAML tag, protocol or data path outside
        what diffkit allows, or is too large or deep (nothing is imported).
    BadInputError
        Not valid YAML / not an intake-2 catalog / unknown or invalid user parameter.
    """
    from intake.readers.entry import Catalog

    src = os.fspath(path_or_url)
    policy = _Policy(protocols, storage_options, data_roots)
    raw, cat_dir, cat_path, local = _read_catalog_bytes(src, policy)
    if len(raw) > _MAX_BYTES:
        raise BadInputError(f"catalog {src!r} is larger than {_MAX_BYTES // 2**20} MiB; not a catalog?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"catalog {src!r} is not UTF-8 text") from None
    doc = parse_catalog_text(text, src)
    if isinstance(doc, Mapping):
        _check_version(doc, src)
    check_catalog(doc, src)
    doc = _normalise(doc, src)
    _apply_policy(doc, src, cat_dir, cat_path, local, policy)
    cat = Catalog.from_dict(doc)
    cat.user_parameters["CATALOG_PATH"] = ("file://" + cat_path) if local else cat_path
    cat.user_parameters["CATALOG_DIR"] = ("file://" + cat_dir) if local else cat_dir
    cat.user_parameters["STORAGE_OPTIONS"] = {}
    if user_parameters:
        declared = sorted(k for k in cat.user_parameters if k not in RESERVED_PARAMETERS)
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
