"""PACBED explorer: tap or box-select a region of a 4D-STEM scan, get its thickness and mistilt.

    panel serve dashboards/pacbed_explorer.py        # or: diffkit serve pacbed_explorer

Query arguments: ``?entry=<catalog entry>`` (default ``sto_pacbed_wedge``).
"""
import panel as pn

from diffkit.ui import PacbedExplorer
from diffkit.ui.apps import url_arg

pn.extension()

PacbedExplorer(entry=url_arg("entry")).template().servable()
