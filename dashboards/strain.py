"""Strain maps (exx, eyy, exy, rotation) of a nanobeam diffraction scan, reference region by box selection.

    panel serve dashboards/strain.py                 # or: diffkit serve strain

Query arguments: ``?entry=<catalog entry>`` (default ``si_strain_nbed``).
"""
import panel as pn

from diffkit.ui import StrainExplorer
from diffkit.ui.apps import url_arg

pn.extension()

StrainExplorer(entry=url_arg("entry")).template().servable()
