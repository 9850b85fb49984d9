"""The served dashboards and :func:`serve` (``diffkit serve``).

Each app is a function that builds a fresh component and its template; Panel calls it once
per browser session, so sessions never share state.
"""
from __future__ import annotations


def url_arg(name: str, default=None):
    """A query argument of the current session's URL (``?entry=...``), else ``default``."""
    import panel as pn

    args = getattr(pn.state, "session_args", None) or {}
    vals = args.get(name)
    if not vals:
        return default
    v = vals[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def pacbed_explorer_app():
    from .pacbed_explorer import PacbedExplorer

    return PacbedExplorer(entry=url_arg("entry")).template()


def maps_app():
    from .maps import MapsExplorer

    return MapsExplorer(entry=url_arg("entry")).template()


def strain_app():
    from .strain import StrainExplorer

    return StrainExplorer(entry=url_arg("entry")).template()


#: app name (URL path) -> factory
APPS = {"pacbed_explorer": pacbed_explorer_app, "maps": maps_app, "strain": strain_app}


def app(name: str):
    """Build the app ``name`` (one of :data:`APPS`) for the current session."""
    try:
        return APPS[name]()
    except KeyError:
        raise ValueError(f"unknown app {name!r}; choose from {', '.join(APPS)}") from None


def serve(apps=None, port: int = 5006, address: str = "127.0.0.1", show: bool = False, threaded: bool = False,
          websocket_origin=None, catalog_roots=None, **kw):
    """Serve the dashboards with :func:`panel.serve` (blocking unless ``threaded``).

    Parameters
    ----------
    apps : list of str, optional
        App names (default: all of :data:`APPS`).
    port : int
        TCP port (0 picks a free one).
    address : str
        Bind address. The default ``127.0.0.1`` serves this machine only; ``0.0.0.0`` exposes
        the dashboards to the network (then also pass ``websocket_origin``).
    show : bool
        Open a browser tab.
    threaded : bool
        Run the server in a background thread and return it (tests, notebooks).
    websocket_origin : list of str, optional
        Allowed websocket origins (default: ``localhost:<port>`` and ``<address>:<port>``).
    catalog_roots : list of paths, optional
        Folders the catalog box may open catalogs from (default: the bundled catalogs and the
        working directory); stored in ``$DIFFKIT_CATALOG_ROOTS`` for the sessions.
    **kw
        Passed on to :func:`panel.serve`.
    """
    import os

    import panel as pn

    from ._common import ROOTS_ENV

    if catalog_roots:
        os.environ[ROOTS_ENV] = os.pathsep.join(os.path.realpath(os.fspath(r)) for r in catalog_roots)
    names = list(apps) if apps else list(APPS)
    unknown = [n for n in names if n not in APPS]
    if unknown:
        raise ValueError(f"unknown app(s) {', '.join(unknown)}; choose from {', '.join(APPS)}")
    if websocket_origin is None and port:
        websocket_origin = sorted({f"localhost:{port}", f"127.0.0.1:{port}", f"{address}:{port}"})
    routes = {n: APPS[n] for n in names}
    if port:
        host = "localhost" if address in ("127.0.0.1", "0.0.0.0") else address
        print("diffkit dashboards: " + ", ".join(f"http://{host}:{port}/{n}" for n in names), flush=True)
    return pn.serve(routes, port=port, address=address, show=show, threaded=threaded,
                    websocket_origin=websocket_origin, title={n: f"diffkit · {n.replace('_', ' ')}" for n in names},
                    **kw)
