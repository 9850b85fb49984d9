"""Strain maps (exx, eyy, exy, rotation) of a nanobeam diffraction scan, reference region by box selection.

    diffkit serve strain                 # or, as a plain Panel script (localhost only, same-origin websockets):
    panel serve dashboards/strain.py --address 127.0.0.1 --port 5006 \
        --allow-websocket-origin localhost:5006 --allow-websocket-origin 127.0.0.1:5006

Query arguments: ``?entry=<catalog entry>`` (default ``si_strain_nbed``).
"""
import panel as pn

from diffkit.ui import StrainExplorer
from diffkit.ui.apps import url_arg

pn.extension()

StrainExplorer(entry=url_arg("entry")).template().servable()
