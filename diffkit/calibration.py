"""Experimental calibration of a 4D-STEM data set, with explicit units.

A value of ``None`` means *not known*; diffkit never substitutes a silent default.
Analyses call :meth:`Calibration.require` for the values they need and get a
:class:`~diffkit.errors.MissingCalibrationError` naming what is missing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import BadInputError, MissingCalibrationError

_UNITS = {
    "beam_energy_kv": "kV",
    "convergence_mrad": "mrad",
    "pixel_size_mrad": "mrad/px",
    "scan_step_nm": "nm",
    "material": "",
    "zone_axis": "",
}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration of a 4D-STEM acquisition.

    Parameters
    ----------
    beam_energy_kv : float, optional
        Accelerating voltage in kV.
    convergence_mrad : float, optional
        Probe convergence semi-angle in mrad.
    pixel_size_mrad : float, optional
        Detector (reciprocal-space) pixel size in mrad/px.
    scan_step_nm : float, optional
        Real-space scan step in nm.
    material : str, optional
        Material label, e.g. ``"SrTiO3"``.
    zone_axis : str, optional
        Zone-axis label, e.g. ``"001"``.

    Examples
    --------
    >>> cal = Calibration(beam_energy_kv=200, convergence_mrad=13.6)
    >>> cal.require("beam_energy_kv", "convergence_mrad")
    >>> cal.missing
    ('pixel_size_mrad', 'scan_step_nm', 'material', 'zone_axis')
    """

    beam_energy_kv: float | None = None
    convergence_mrad: float | None = None
    pixel_size_mrad: float | None = None
    scan_step_nm: float | None = None
    material: str | None = None
    zone_axis: str | None = None

    def __post_init__(self):
        for name in ("beam_energy_kv", "convergence_mrad", "pixel_size_mrad", "scan_step_nm"):
            v = getattr(self, name)
            if v is None:
                continue
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise BadInputError(f"calibration {name} must be a number in {_UNITS[name]}, got {v!r}") from None
            if not math.isfinite(fv) or fv <= 0:
                raise BadInputError(f"calibration {name} must be a positive finite number in {_UNITS[name]}, got {v!r}")
            object.__setattr__(self, name, fv)
        for name in ("material", "zone_axis"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, str(v).strip("[] "))

    @property
    def missing(self) -> tuple[str, ...]:
        """Names of the calibration values that are not set."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None)

    def require(self, *names: str, purpose: str = "this analysis") -> None:
        """Raise :class:`MissingCalibrationError` if any of ``names`` is not set."""
        miss = [n for n in names if getattr(self, n) is None]
        if miss:
            desc = ", ".join(f"{n} ({_UNITS[n]})" if _UNITS[n] else n for n in miss)
            raise MissingCalibrationError(
                f"{purpose} needs calibration values that are not set: {desc}. "
                "Pass them explicitly, e.g. Calibration(beam_energy_kv=200, convergence_mrad=13.6, ...)."
            )

    def to_attrs(self) -> dict[str, Any]:
        """Flat dict for zarr/HDF5/xarray attrs; unknown values are stored as ``None``."""
        return {f"calibration.{k}": v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Calibration":
        """Inverse of :meth:`to_attrs`; also accepts plain keys without the prefix."""
        kw = {}
        for f in dataclasses.fields(cls):
            for key in (f"calibration.{f.name}", f.name):
                if key in attrs and attrs[key] is not None:
                    kw[f.name] = attrs[key]
                    break
        return cls(**kw)

    def replace(self, **changes) -> "Calibration":
        """Return a copy with some values changed."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def units(name: str) -> str:
        """Unit string of a calibration field."""
        return _UNITS[name]
