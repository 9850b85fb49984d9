"""Electron scattering factors and relativistic beam constants.

Scattering factors use the parametrisation of I. Lobato & D. Van Dyck,
*Acta Cryst. A* 70 (2014) 636-649: ``f(g) = sum_i a_i (2 + b_i g^2) / (1 + b_i g^2)^2``
with ``g`` in 1/Å and ``f`` in Å. The coefficients are the published values.
"""
from __future__ import annotations

import numpy as np

# Physical constants (CODATA 2018)
_M0C2_KEV = 510.99895  # electron rest energy, keV
_HC_KEV_A = 12.398419843320026  # h*c in keV*Å

LOBATO_PARAMETERS = {
    "C": ((124.4660886213, -220.352857079, 195.2353522805, -98.107936127, 0.0142023041),
           (2.4212084926, 2.3053794375, 2.0485193211, 1.9335255292, 0.0768976818)),
    "O": ((29.9474045242, -77.6101266255, 99.8817764623, -51.2127005506, 0.0081961895),
           (1.3028398788, 1.1579410526, 1.0098854934, 0.9433279714, 0.0433197611)),
    "Mg": ((4.8550104769, -2.6622090648, 0.4780012361, -0.0702307065, 0.0039890583),
           (5.9463927384, 4.1713031252, 0.3982698082, 0.1618861858, 0.0195345056)),
    "Al": ((2.8340956161, -4.2800413338, 4.4219168055, -0.0345774472, 0.0035238594),
           (6.6623502398, 0.5512947222, 0.5093289634, 0.1117848374, 0.0167602352)),
    "Si": ((2.8718914261, -2.061735012, 2.171140242, -0.0663073633, 0.0030107071),
           (5.0848710364, 0.4291781853, 0.3664854342, 0.1197106113, 0.0143994536)),
    "Ti": ((8.5759577524, -210.3315634653, 206.0971726015, 0.0477773949, 0.0005057165),
           (6.0078066888, 2.6028585675, 2.5535234505, 0.0711429484, 0.0048562844)),
    "Fe": ((3.7981009084, -91.6893549382, 91.4454252155, 0.0272754344, 0.0003033799),
           (5.317126459, 1.4971309488, 1.468092418, 0.042724785, 0.0033279186)),
    "Ge": ((3.1824163526, -52.4514037811, 52.9690827162, 0.0114096169, 9.50954e-05),
           (5.0171904086, 0.7123957644, 0.7022801925, 0.0196747296, 0.0018414661)),
    "Sr": ((4.770925093, 1.4759785016, 0.3044513555, 0.0035947498, 3.001e-07),
           (13.366888133, 1.3373837958, 0.1775323694, 0.0077910503, 0.0002822551)),
    "Nb": ((3.1117903911, 2.2025906095, 0.2703307749, 0.0026879919, 2.325e-07),
           (10.6903141343, 1.6531635616, 0.1451151857, 0.0061395635, 0.0002322402)),
    "Ba": ((6.2447518739, 2.3517227142, 0.4742793732, 0.0638113874, 0.0002346513),
           (15.1431354191, 1.453790006, 0.3208356464, 0.0404354532, 0.0008540811)),
    "Pb": ((3.60861021, 2.4505677474, 0.4786395001, 0.0088721424, 1.04002e-05),
           (6.5816259462, 1.0277285266, 0.1335336806, 0.0068486124, 0.0002763889)),}


def wavelength_angstrom(energy_kv: float) -> float:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV.

    >>> round(wavelength_angstrom(200.0), 5)
    0.02508
    """
    e = float(energy_kv)
    return _HC_KEV_A / np.sqrt(e * (2 * _M0C2_KEV + e))


def lorentz_factor(energy_kv: float) -> float:
    """Relativistic factor gamma = 1 + E / (m0 c^2)."""
    return 1.0 + float(energy_kv) / _M0C2_KEV


def electron_scattering_factor(symbol: str, g: np.ndarray) -> np.ndarray:
    """Electron scattering factor f_e(g) in Å of a neutral atom, ``g`` in 1/Å (|g|, not s = g/2)."""
    try:
        a, b = LOBATO_PARAMETERS[symbol]
    except KeyError:
        raise KeyError(
            f"no scattering-factor parameters for element {symbol!r}; known: {sorted(LOBATO_PARAMETERS)}"
        ) from None
    g2 = np.asarray(g, dtype=float) ** 2
    out = np.zeros_like(g2)
    for ai, bi in zip(a, b):
        out += ai * (2.0 + bi * g2) / (1.0 + bi * g2) ** 2
    return out
