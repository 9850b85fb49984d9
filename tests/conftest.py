"""Shared fixtures: small synthetic 4D-STEM scans, diffkit zarr stores and catalogs in tmp_path.

Everything here is built on the fly (a few hundred kB), so the data/io/catalog tests never
depend on the generated demo data in ``catalogs/data``.
"""
from __future__ import annotations

import pathlib
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_frames(scan=(6, 5), det=16, dtype=np.uint16, seed=0, lam=20.0):
    """Poisson frames (scan_y, scan_x, det, det) with a bright centre disk and a row gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices((det, det)) - (det - 1) / 2
    disk = np.where(np.hypot(yy, xx) < det / 4, 1.0, 0.2)
    rows = 1.0 + 0.1 * np.arange(scan[0])[:, None, None, None]
    return rng.poisson(lam * disk[None, None] * rows * np.ones(scan + (1, 1))).astype(dtype)


def make_truth(scan):
    import xarray as xr

    sy, sx = scan
    t = np.linspace(10, 60, sy, dtype=np.float32)[:, None] * np.ones((1, sx), np.float32)
    return xr.Dataset(
        {
            "thickness_nm": (("scan_y", "scan_x"), t, {"units": "nm", "long_name": "specimen thickness"}),
            "tilt_x_mrad": (("scan_y", "scan_x"), np.zeros(scan, np.float32) + 0.5, {"units": "mrad"}),
            "disk_x": (("scan_y", "scan_x", "beam"), np.arange(sy * sx * 3, dtype=np.float32).reshape(sy, sx, 3),
                       {"units": "px"}),
        },
        coords={"h": ("beam", np.array([0, 1, -1]))},
    )


@pytest.fixture
def cal():
    from diffkit.calibration import Calibration

    return Calibration(beam_energy_kv=200, convergence_mrad=13.6, pixel_size_mrad=0.5, scan_step_nm=0.4,
                       material="SrTiO3", zone_axis="001")


@pytest.fixture
def scan_zarr(tmp_path, cal):
    """A diffkit zarr store (6 x 5 scan, 16 px detector, uint16, with truth) and its frames."""
    from diffkit.data import FourDSTEM
    from diffkit.io import save_zarr

    frames = make_frames()
    ds = FourDSTEM(frames, calibration=cal, source="synthetic wedge", truth=make_truth(frames.shape[:2]),
                   attrs={"simulation": {"seed": 0, "dose": float("inf"), "spec": (1, 2)}})
    path = tmp_path / "data" / "wedge.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_zarr(ds, path)
    return path, frames


CATALOG_TEMPLATE = """\
version: 2
metadata:
  description: test catalog
user_parameters:
  dose:
    cls: intake.readers.user_parameters:BaseUserParameter
    default: null
    description: e-/frame
  region:
    cls: intake.readers.user_parameters:BaseUserParameter
    default: null
    description: y0, y1, x0, x1
data:
{data}
entries:
{entries}
"""


def catalog_yaml(entries: dict[str, str]) -> str:
    """Catalog text of the same form as catalogs/demo.yaml: ``{name: url relative to CATALOG_DIR}``."""
    data = "".join(f"  {n}_file:\n    datatype: diffkit.catalog:FourDSTEMData\n"
                   f"    kwargs:\n      url: \"{{CATALOG_DIR}}/{u}\"\n" for n, u in entries.items())
    ent = "".join(f"  {n}:\n    reader: diffkit.catalog:FourDSTEMReader\n    kwargs:\n"
                  f"      data: \"{{data({n}_file)}}\"\n      dose_e_per_frame: \"{{dose}}\"\n"
                  f"      scan_region: \"{{region}}\"\n    metadata:\n      description: {n} test scan\n"
                  for n in entries)
    return CATALOG_TEMPLATE.format(data=data.rstrip("\n"), entries=ent.rstrip("\n"))


@pytest.fixture
def catalog_file(tmp_path, scan_zarr):
    """A catalog in tmp_path with one readable entry (``wedge``) and one whose file is missing."""
    path = tmp_path / "cat.yaml"
    path.write_text(catalog_yaml({"wedge": "data/wedge.zarr", "absent": "data/absent.zarr"}))
    return path


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file (and prints) when imported.

    Returns ``(module_name, marker_path)``; the module is removed from ``sys.modules``
    afterwards.
    """
    name = f"diffkit_evil_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "IMPORTED.marker"
    moddir = tmp_path / "evil_pkgs"
    moddir.mkdir()
    (moddir / f"{name}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        print("EVIL MODULE IMPORTED")

        class Evil:
            def __init__(self, *a, **k):
                pathlib.Path({str(marker)!r}).write_text("instantiated")
    """))
    monkeypatch.syspath_prepend(str(moddir))
    yield name, marker
    sys.modules.pop(name, None)
