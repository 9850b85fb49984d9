"""Command line: exit statuses, one-line errors (traceback only with --debug), data files with calibration options."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from diffkit import cli


@pytest.fixture
def fake_map(monkeypatch):
    """Replace the PACBED mapping by a stub that records its input (the CLI is under test, not the networks)."""
    seen = {}

    def map_pacbed(data, **kw):
        seen["data"] = data
        return xr.Dataset({"thickness_nm": (("y", "x"), np.zeros((1, 1)))})

    monkeypatch.setattr("diffkit.maps.map_pacbed", map_pacbed)
    return seen


def test_successful_map_exits_0_and_prints_no_repr(tmp_path, fake_map, capsys):
    f = tmp_path / "scan.npy"
    np.save(f, np.ones((2, 3, 32, 32), np.float32))
    rc = cli.main(["map", str(f), "--kv", "200", "--convergence", "13.6", "--pixel-size", "0.8",
                   "--material", "SrTiO3", "--zone", "001", "--scan-step", "2"])
    assert rc == 0
    cal = fake_map["data"].calibration
    assert (cal.beam_energy_kv, cal.convergence_mrad, cal.pixel_size_mrad, cal.material, cal.zone_axis,
            cal.scan_step_nm) == (200.0, 13.6, 0.8, "SrTiO3", "001", 2.0)
    assert "Dataset" not in capsys.readouterr().err


def test_missing_file_is_one_line(tmp_path, capsys):
    rc = cli.main(["map", str(tmp_path / "missing.npy")])
    err = capsys.readouterr().err
    assert rc == 1 and "no such file" in err and "missing.npy" in err
    assert "Traceback" not in err and "KeyError" not in err and len(err.strip().splitlines()) == 1


def test_unknown_entry_lists_the_entries(catalog_file, capsys):
    rc = cli.main(["map", "nope", "--catalog", str(catalog_file)])
    err = capsys.readouterr().err
    assert rc == 1 and "no entry 'nope'" in err and "entries: wedge, absent" in err and "Traceback" not in err


def test_runtime_errors_are_one_line_unless_debug(tmp_path, monkeypatch, capsys):
    f = tmp_path / "scan.npy"
    np.save(f, np.ones((2, 3, 32, 32), np.float32))

    def boom(data, **kw):
        raise RuntimeError("deep failure\nsecond line")

    monkeypatch.setattr("diffkit.maps.map_pacbed", boom)
    assert cli.main(["map", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "diffkit map: error: RuntimeError: deep failure second line"
    assert cli.main(["--debug", "map", str(f)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["map", str(f), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_missing_calibration_names_the_options(tmp_path, capsys):
    f = tmp_path / "scan.npy"
    np.save(f, np.ones((2, 3, 32, 32), np.float32))
    assert cli.main(["map", str(f)]) == 1
    err = capsys.readouterr().err
    assert "MissingCalibrationError" in err and "--convergence" in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["map", "--no-such-option"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["map", "x.npy", "--kv", "lots"])
    assert e.value.code == 2


def test_module_entry_point_exit_status(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffkit.cli", "map", str(tmp_path / "missing.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
