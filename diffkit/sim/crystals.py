"""Crystal structures seen down a zone axis, as used by the Bloch-wave solver.

A :class:`ZoneCrystal` is an orthogonal cell whose ``c`` axis is the beam direction
(the zone axis). Only the zero-order Laue zone is used by the solver, so the
structure enters through its projected cell (``a`` x ``b``) and atom positions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class Site:
    """One atom: element symbol, fractional position (x, y, z) and Debye-Waller B in Å^2."""

    symbol: str
    xyz: tuple[float, float, float]
    b_iso: float


@dataclasses.dataclass(frozen=True)
class ZoneCrystal:
    """Orthogonal cell with the zone axis along ``c``.

    Parameters
    ----------
    name : str
        Label, e.g. ``"SrTiO3"``.
    zone : str
        Zone-axis label, e.g. ``"001"``.
    a, b, c : float
        Cell edges in Å; ``c`` is along the beam.
    sites : tuple of Site
        Atoms in the cell.
    """

    name: str
    zone: str
    a: float
    b: float
    c: float
    sites: tuple[Site, ...]

    @property
    def volume(self) -> float:
        """Cell volume in Å^3."""
        return self.a * self.b * self.c

    def key(self) -> str:
        """Stable short hash of the structure (for cache keys)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def scaled_debye_waller(self, factor) -> "ZoneCrystal":
        """Return the cell with every site's B multiplied by ``factor`` (a number, or one per site);
        ``0`` gives the static lattice."""
        f = np.broadcast_to(np.asarray(factor, float), (len(self.sites),))
        return dataclasses.replace(self, sites=tuple(dataclasses.replace(s, b_iso=float(s.b_iso * v))
                                                     for s, v in zip(self.sites, f)))

    def strained(self, exx: float = 0.0, eyy: float = 0.0) -> "ZoneCrystal":
        """Return the cell with its in-plane edges scaled by (1 + exx), (1 + eyy)."""
        return dataclasses.replace(self, a=self.a * (1 + exx), b=self.b * (1 + eyy))

    @classmethod
    def from_ase(cls, atoms, name: str, zone: str, b_iso: float | dict = 0.5) -> "ZoneCrystal":
        """Build from an ``ase.Atoms`` with an orthogonal cell whose third axis is the beam.

        ``b_iso`` is a Debye-Waller B (Å^2) for all atoms or a dict per element.
        """
        cell = np.asarray(atoms.cell)
        if not np.allclose(cell - np.diag(np.diag(cell)), 0, atol=1e-6):
            raise ValueError("from_ase needs an orthogonal cell with the zone axis along c (rotate/orthogonalise first)")
        frac = atoms.get_scaled_positions(wrap=True)
        sites = []
        for sym, p in zip(atoms.get_chemical_symbols(), frac):
            bi = b_iso[sym] if isinstance(b_iso, dict) else float(b_iso)
            sites.append(Site(sym, tuple(float(v) for v in p), bi))
        a, b, c = np.diag(cell)
        return cls(name, zone, float(a), float(b), float(c), tuple(sites))


def srtio3_001(a: float = 3.905) -> ZoneCrystal:
    """Cubic perovskite SrTiO3 (Pm-3m, a = 3.905 Å) down [001].

    Debye-Waller B at room temperature (Å^2): Sr 0.56, Ti 0.41, O 0.65.
    """
    return ZoneCrystal(
        "SrTiO3", "001", a, a, a,
        (
            Site("Sr", (0.0, 0.0, 0.0), 0.56),
            Site("Ti", (0.5, 0.5, 0.5), 0.41),
            Site("O", (0.5, 0.5, 0.0), 0.65),
            Site("O", (0.5, 0.0, 0.5), 0.65),
            Site("O", (0.0, 0.5, 0.5), 0.65),
        ),
    )


def silicon_001(a: float = 5.431) -> ZoneCrystal:
    """Diamond-cubic Si (a = 5.431 Å) down [001], B = 0.47 Å^2."""
    base = [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)]
    sites = []
    for x, y, z in base:
        sites.append(Site("Si", (x, y, z), 0.47))
        sites.append(Site("Si", ((x + 0.25) % 1, (y + 0.25) % 1, (z + 0.25) % 1), 0.47))
    return ZoneCrystal("Si", "001", a, a, a, tuple(sites))


def silicon_110(a: float = 5.431) -> ZoneCrystal:
    """Diamond-cubic Si down [110]: orthogonal cell a/sqrt2 x a x a/sqrt2 (x along [1-10], y along [001])."""
    s2 = np.sqrt(2.0)
    # conventional cubic positions, rotated so that x' = (x - y)/sqrt2, y' = z, z' = (x + y)/sqrt2
    base = [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)]
    cubic = [p for x, y, z in base for p in ((x, y, z), (x + 0.25, y + 0.25, z + 0.25))]
    A, B, C = a / s2, a, a / s2
    sites = {}
    for x, y, z in cubic:
        for shift in [(i, j, k) for i in range(-1, 2) for j in range(-1, 2) for k in range(-1, 2)]:
            X, Y, Z = (np.array((x, y, z)) + shift) * a
            xp, yp, zp = (X - Y) / s2, Z, (X + Y) / s2
            f = (round((xp / A) % 1, 6) % 1, round((yp / B) % 1, 6) % 1, round((zp / C) % 1, 6) % 1)
            sites[f] = Site("Si", f, 0.47)
    return ZoneCrystal("Si", "110", A, B, C, tuple(sites.values()))


BUILTIN_CRYSTALS = {
    ("SrTiO3", "001"): srtio3_001,
    ("Si", "001"): silicon_001,
    ("Si", "110"): silicon_110,
}


def get_crystal(material: str, zone: str) -> ZoneCrystal:
    """Built-in crystal by (material, zone), e.g. ``get_crystal("SrTiO3", "001")``."""
    key = (material, str(zone).strip("[] "))
    if key not in BUILTIN_CRYSTALS:
        raise KeyError(f"no built-in crystal {key}; known: {sorted(BUILTIN_CRYSTALS)}")
    return BUILTIN_CRYSTALS[key]()
