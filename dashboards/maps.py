"""Thickness and tilt maps over a 4D-STEM scan (dask chunks, progress, cancel, per-pixel PACBED).

    diffkit serve maps                 # or, as a plain Panel script (localhost only, same-origin websockets):
    panel serve dashboards/maps.py --address 127.0.0.1 --port 5006 \
        --allow-websocket-origin localhost:5006 --allow-websocket-origin 127.0.0.1:5006

Query arguments: ``?entry=<catalog entry>`` (default ``sto_pacbed_wedge``).
"""
import panel as pn

from diffkit.ui import MapsExplorer
from diffkit.ui.apps import url_arg

pn.extension()

MapsExplorer(entry=url_arg("entry")).template().servable()
