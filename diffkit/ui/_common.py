"""Pieces shared by the dashboard components: catalog source, messages, array helpers.

Nothing here holds module-level mutable state: every component instance (one per
notebook cell or per served session) owns its catalog, data and results.
"""
from __future__ import annotations

import os
import pathlib
import traceback

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers the bokeh backend (options need it)
import numpy as np
import panel as pn
import param

hv.Store.set_current_backend("bokeh")

#: The repository's demo catalog (the working tree / editable install layout).
DEMO_CATALOG = pathlib.Path(__file__).resolve().parent.parent.parent / "catalogs" / "demo.yaml"


def default_catalog() -> str:
    """``$DIFFKIT_CATALOG`` if set, else the bundled demo catalog (relative to the working
    directory when it lies below it, as when serving from the repository root)."""
    env = os.environ.get("DIFFKIT_CATALOG")
    if env:
        return env
    try:
        return str(DEMO_CATALOG.relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(DEMO_CATALOG)


#: Environment variable naming the folders (``os.pathsep``-separated) the catalog box may open
#: catalogs from; set by ``diffkit serve --catalog-root`` / ``serve(catalog_roots=...)``.
ROOTS_ENV = "DIFFKIT_CATALOG_ROOTS"


def catalog_roots() -> list[str]:
    """Folders the catalog box opens catalogs from: ``$DIFFKIT_CATALOG_ROOTS`` when set, else the
    bundled catalogs folder and the working directory; plus the folder of ``$DIFFKIT_CATALOG``."""
    env = os.environ.get(ROOTS_ENV, "")
    roots = [r for r in env.split(os.pathsep) if r.strip()] or [str(DEMO_CATALOG.parent), os.getcwd()]
    dc = os.environ.get("DIFFKIT_CATALOG", "")
    if dc and "://" not in dc and "::" not in dc and not dc.lower().startswith("data:"):
        roots.append(os.path.dirname(os.path.abspath(dc)))
    return [os.path.realpath(r) for r in roots]


def check_catalog_path(path: str, roots=None) -> str:
    """The real path of a catalog typed into the box, if it is a local file under one of ``roots``
    (default :func:`catalog_roots`); else :class:`~diffkit.errors.UnsafeCatalogError` (no URLs,
    no ``data:``, nothing outside the roots, symbolic links resolved)."""
    from ..errors import UnsafeCatalogError

    s = str(path).strip()
    low = s.lower()
    if low.startswith("data:") or "::" in s or ("://" in s and not low.startswith("file://")):
        raise UnsafeCatalogError(f"catalog {s!r}: only local catalog files can be opened here (no URLs)")
    real = os.path.realpath(s[7:] if low.startswith("file://") else s)
    roots = catalog_roots() if roots is None else [os.path.realpath(r) for r in roots]
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        shown = ", ".join(short_source(r) or "." for r in roots)
        raise UnsafeCatalogError(f"catalog {s!r} is not under a folder this server opens catalogs from ({shown})")
    return real


def catalog_error_text(exc: BaseException) -> str:
    """What the page may say about a catalog that did not open: never text from the file itself
    (the details go to the server log)."""
    from ..errors import BadInputError, UnsafeCatalogError

    if isinstance(exc, UnsafeCatalogError) and str(exc).startswith("catalog "):
        return str(exc)  # from check_catalog_path: names only what the visitor typed
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, UnsafeCatalogError):
        return ("refused by the safe catalog loader (it names something outside diffkit's allow-list or reads "
                "outside its folder; details in the server log)")
    if isinstance(exc, BadInputError):
        return "not a diffkit catalog (details in the server log)"
    return f"{type(exc).__name__} (details in the server log)"


def as_numpy(x) -> np.ndarray:
    """Compute dask/xarray objects and return a numpy array."""
    if hasattr(x, "compute") and not isinstance(x, np.ndarray):
        x = x.compute()
    return np.asarray(getattr(x, "values", x))


def short_source(source) -> str:
    """A data source for display: paths below the working directory are shown relative to it."""
    text = str(source or "")
    try:
        p = pathlib.Path(text)
        if p.is_absolute():
            return str(p.resolve().relative_to(pathlib.Path.cwd().resolve()))
    except (ValueError, OSError):
        pass
    return text


def error_text(exc: BaseException) -> str:
    """One-line, user-facing description of an exception (class name + message)."""
    msg = str(exc).strip() or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {msg}"


def log_exception(exc: BaseException) -> None:
    """Log an error shown in the page: one line at warning level, the traceback at debug level."""
    pn.state.log(error_text(exc), level="warning")
    pn.state.log("".join(traceback.format_exception(exc)).rstrip(), level="debug")


class CatalogSource(param.Parameterized):
    """An intake catalog (opened with :func:`diffkit.catalog.open_catalog`) and a chosen entry.

    Errors (missing file, unsafe catalog, unreadable entry) never raise out of a widget
    callback: they are stored in :attr:`error` and shown by the owning component.
    """

    catalog_path = param.String(default="", doc="Path or URL of an intake catalog (YAML)")
    entry = param.Selector(default=None, objects=[], allow_None=True, doc="Data set in the catalog")
    error = param.String(default="", doc="Last error opening the catalog or reading an entry")
    describe = param.Dict(default={}, doc="Short description of each entry")

    def __init__(self, preferred=(), autoload: bool = True, roots=None, **params):
        params.setdefault("catalog_path", default_catalog() if autoload else "")
        #: folders catalogs may be opened from (default :func:`catalog_roots`, read at each open)
        self._roots = None if roots is None else list(roots)
        self._real_path = None
        self._preferred = tuple(preferred)
        self._catalog = None
        self._cache: dict = {}
        super().__init__(**params)
        if autoload:
            self._open()

    @param.depends("catalog_path", watch=True)
    def _open(self):
        self._catalog = None
        self._cache = {}
        self.describe = {}
        path = (self.catalog_path or "").strip()
        if not path:
            self.param.entry.objects = []
            self.entry = None
            self.error = "No catalog given."
            return
        self._real_path = None
        try:
            from ..catalog import open_catalog

            real = check_catalog_path(path, self._roots)
            cat = open_catalog(real)
            names = list(cat)
        except Exception as exc:  # noqa: BLE001 - shown to the user (without file contents)
            log_exception(exc)
            self.param.entry.objects = []
            self.entry = None
            self.error = f"Could not open catalog {path!r}: {catalog_error_text(exc)}"
            return
        self._real_path = real
        self._catalog = cat
        self.describe = self._describe(cat, names)
        self.param.entry.objects = names
        choice = next((n for n in self._preferred if n in names), names[0] if names else None)
        self.error = "" if names else f"Catalog {path!r} has no entries."
        if self.entry == choice:
            self.param.trigger("entry")
        else:
            self.entry = choice

    @staticmethod
    def _describe(cat, names):
        try:
            from ..catalog import describe_catalog

            d = describe_catalog(cat)
        except Exception:  # noqa: BLE001 - description is optional
            return {}
        out = {}
        if hasattr(d, "iterrows"):  # pandas.DataFrame indexed by entry name
            for name, row in d.iterrows():
                err = str(row.get("error", "") or "")
                out[str(name)] = err and f"(unreadable: {err})" or str(row.get("description", "") or "")
        elif isinstance(d, dict):
            out = {str(k): (v if isinstance(v, str) else str(v)) for k, v in d.items()}
        return out

    def read(self, entry: str | None = None, **user_parameters):
        """Read an entry (a :class:`diffkit.data.FourDSTEM`); cached per source and parameters.

        Raises the loader's exception; callers turn it into a UI message.
        """
        entry = entry or self.entry
        if entry is None:
            raise LookupError(self.error or "no data set selected")
        key = (entry, tuple(sorted(user_parameters.items())))
        if key not in self._cache:
            if user_parameters:
                from ..catalog import open_catalog

                if self._real_path is None:
                    raise LookupError(self.error or "catalog not open")
                cat = open_catalog(self._real_path, **user_parameters)
            else:
                cat = self._catalog
            if cat is None:
                raise LookupError(self.error or "catalog not open")
            self._cache[key] = cat[entry].read()
        return self._cache[key]


def button(label: str, kind: str = "default", **kw):
    """A :class:`panel.widgets.Button` (``label``/``color`` on Panel >= 1.9, ``name``/``button_type`` before)."""
    params = pn.widgets.Button.param
    if "label" in params and "color" in params:
        return pn.widgets.Button(label=label, color=kind, **kw)
    return pn.widgets.Button(name=label, button_type=kind, **kw)


def source_widgets(source: CatalogSource, given_data=None):
    """Catalog path box and data-set selector, or a note when the component was given data directly."""
    if given_data is not None:
        return pn.pane.Markdown(f"**Data:** {short_source(getattr(given_data, 'source', '')) or 'given in Python'}",
                                sizing_mode="stretch_width")
    return pn.Param(source.param, parameters=["catalog_path", "entry"], show_name=False,
                    widgets={"catalog_path": {"type": pn.widgets.TextInput, "name": "Catalog (path or URL)",
                                              "css_classes": ["diffkit-catalog"]},
                             "entry": {"type": pn.widgets.Select, "name": "Data set", "css_classes": ["diffkit-entry"]}})


def make_source(catalog, entry, default_entry, data):
    """The component's :class:`CatalogSource` (not opened when ``data`` is given)."""
    kw = {"catalog_path": catalog} if catalog else {}
    # a catalog given in Python (not typed into the box) is trusted: its folder joins the roots
    if catalog and "://" not in str(catalog) and "::" not in str(catalog):
        kw["roots"] = catalog_roots() + [os.path.dirname(os.path.realpath(str(catalog)))]
    src = CatalogSource(preferred=(entry,) if entry else (default_entry,), autoload=data is None, **kw)
    if entry and entry in src.param.entry.objects and src.entry != entry:
        src.entry = entry
    return src


def calibration_text(cal) -> str:
    """Markdown line with the calibration values (unknown ones marked)."""
    if cal is None:
        return "calibration: *unknown*"
    from ..calibration import Calibration

    parts = []
    for name, label in (("beam_energy_kv", "E"), ("convergence_mrad", "α"), ("pixel_size_mrad", "pixel"),
                        ("scan_step_nm", "scan step"), ("material", ""), ("zone_axis", "zone")):
        v = getattr(cal, name, None)
        u = Calibration.units(name)
        if v is None:
            parts.append(f"{label or name} *unknown*")
        elif isinstance(v, float):
            parts.append(f"{label} {v:.4g} {u}".strip())
        else:
            parts.append(f"{label} [{v}]" if label else str(v))
    return " · ".join(parts)


def scan_axes(shape, cal):
    """Scan axes ``(x, y, unit)``: nm when the scan step is known, else positions."""
    ny, nx = shape
    step = getattr(cal, "scan_step_nm", None) if cal is not None else None
    if step:
        return np.arange(nx) * step, np.arange(ny) * step, "nm"
    return np.arange(nx, dtype=float), np.arange(ny, dtype=float), "position"
