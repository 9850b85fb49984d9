"""Thickness and tilt maps over a 4D-STEM scan (dask chunks, progress, cancel, per-pixel PACBED).

    panel serve dashboards/maps.py                   # or: diffkit serve maps

Query arguments: ``?entry=<catalog entry>`` (default ``sto_pacbed_wedge``).
"""
import panel as pn

from diffkit.ui import MapsExplorer
from diffkit.ui.apps import url_arg

pn.extension()

MapsExplorer(entry=url_arg("entry")).template().servable()
