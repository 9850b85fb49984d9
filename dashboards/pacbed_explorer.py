"""PACBED explorer: tap or box-select a region of a 4D-STEM scan, get its thickness and mistilt.

    diffkit serve pacbed_explorer                 # or, as a plain Panel script (localhost only, same-origin websockets):
    panel serve dashboards/pacbed_explorer.py --address 127.0.0.1 --port 5006 \
        --allow-websocket-origin localhost:5006 --allow-websocket-origin 127.0.0.1:5006

Query arguments: ``?entry=<catalog entry>`` (default ``sto_pacbed_wedge``).
"""
import panel as pn

from diffkit.ui import PacbedExplorer
from diffkit.ui.apps import url_arg

pn.extension()

PacbedExplorer(entry=url_arg("entry")).template().servable()
