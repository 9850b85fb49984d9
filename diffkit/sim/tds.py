"""Thermal diffuse scattering (TDS) in the Einstein model.

The diffuse intensity per atom at scattering vector q (1/Å) is
``gamma^2 f(q)^2 (1 - exp(-B q^2 / 2))`` (Hall & Hirsch 1965). Integrated over the
detector plane it gives the TDS cross-section, hence the mean free path for TDS and
the mean absorptive potential used by :class:`~diffkit.sim.bloch.BlochSolver`. The same
angular distribution, convolved with the probe aperture, is the diffuse background
added to simulated PACBED patterns (it is what the Bloch-wave elastic solution lacks).
"""
from __future__ import annotations

import numpy as np

from .crystals import ZoneCrystal
from .scattering import electron_scattering_factor, lorentz_factor, wavelength_angstrom


def tds_kernel(crystal: ZoneCrystal, energy_kv: float, q: np.ndarray) -> np.ndarray:
    """Einstein-model diffuse intensity per unit cell, dσ/dΩ in Å^2/sr, at |q| (1/Å)."""
    gamma = lorentz_factor(energy_kv)
    q = np.asarray(q, float)
    out = np.zeros_like(q)
    for s in crystal.sites:
        f = gamma * electron_scattering_factor(s.symbol, q)
        out += f**2 * (1.0 - np.exp(-s.b_iso * q**2 / 2.0))
    return out


def tds_mean_free_path_nm(crystal: ZoneCrystal, energy_kv: float, q_max: float = 12.0) -> float:
    """Mean free path (nm) for thermal diffuse scattering out of the elastic wave field."""
    lam = wavelength_angstrom(energy_kv)
    q = np.linspace(0.0, q_max, 6001)
    integrand = tds_kernel(crystal, energy_kv, q) * 2 * np.pi * q  # per cell, per (1/Å)
    sigma_cell = lam**2 * np.trapezoid(integrand, q)  # Å^2 per unit cell
    n_cells = 1.0 / crystal.volume  # cells per Å^3
    if sigma_cell <= 0:  # no thermal vibration (all B = 0): no TDS at all
        return float("inf")
    return 1.0 / (n_cells * sigma_cell) / 10.0


def absorption_ratio(crystal: ZoneCrystal, energy_kv: float, U0: float) -> float:
    """Ratio kappa = U'_0 / U_0 that makes the mean absorption equal the TDS cross-section."""
    lam = wavelength_angstrom(energy_kv)
    ell_A = tds_mean_free_path_nm(crystal, energy_kv) * 10.0
    u0_abs = (1.0 / lam) / (2 * np.pi * ell_A)  # intensity decays as exp(-2 pi U'_0 z / K)
    return float(u0_abs / U0)
