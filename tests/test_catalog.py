"""diffkit.catalog: safe intake-2 catalogs, lazy entries, dose/region parameters, hostile catalogs."""
from __future__ import annotations

import copy
import importlib.metadata
import pathlib
import sys

import dask.array as da
import numpy as np
import pytest
import yaml
from conftest import ROOT, catalog_yaml

from diffkit.catalog import FourDSTEMData, FourDSTEMReader, check_catalog, describe_catalog, open_catalog
from diffkit.data import FourDSTEM
from diffkit.errors import BadInputError, UnsafeCatalogError

# --------------------------------------------------------------------------- listing / lazy reading


def test_listing_and_lazy_read(catalog_file, scan_zarr, cal):
    _, frames = scan_zarr
    cat = open_catalog(catalog_file)
    assert list(cat) == ["wedge", "absent"]
    reader = cat["wedge"]
    assert isinstance(reader, FourDSTEMReader) and isinstance(reader.data, FourDSTEMData)
    assert reader.data.url.startswith("file://") and reader.data.url.endswith("data/wedge.zarr")
    ds = reader.read()
    assert isinstance(ds, FourDSTEM) and isinstance(ds.data, da.Array)  # lazy
    assert ds.calibration == cal and ds.truth is not None
    assert ds.attrs["description"] == "wedge test scan"
    np.testing.assert_array_equal(ds.data.compute(), frames)
    assert cat.wedge.read().shape == frames.shape  # attribute access works too


def test_relative_and_url_paths_resolve_against_catalog_dir(catalog_file, monkeypatch):
    monkeypatch.chdir(catalog_file.parent.parent)
    rel = pathlib.Path(catalog_file.parent.name) / catalog_file.name
    assert open_catalog(str(rel))["wedge"].read().shape == (6, 5, 16, 16)
    assert open_catalog(catalog_file.as_uri())["wedge"].read().shape == (6, 5, 16, 16)


def test_describe_catalog_table(catalog_file):
    df = describe_catalog(open_catalog(catalog_file))
    assert list(df.index) == ["wedge", "absent"]
    assert {"description", "shape", "dtype", "calibration", "truth", "error"} <= set(df.columns)
    row = df.loc["wedge"]
    assert row["shape"] == "(6, 5, 16, 16)" and row["dtype"] == "uint16" and row["error"] == ""
    assert "beam_energy_kv=200 kV" in row["calibration"] and "thickness_nm" in row["truth"]
    assert "FileNotFoundError" in df.loc["absent", "error"] and "absent.zarr" in df.loc["absent", "error"]


def test_missing_entry_file_fails_on_read_not_open(catalog_file):
    cat = open_catalog(catalog_file)
    with pytest.raises(FileNotFoundError, match="absent.zarr"):
        cat["absent"].read()


# --------------------------------------------------------------------------- user parameters


def test_default_dose_is_data_as_stored(catalog_file, scan_zarr):
    _, frames = scan_zarr
    ds = open_catalog(catalog_file, dose=None)["wedge"].read()
    assert ds.dtype == np.uint16
    np.testing.assert_array_equal(ds.data.compute(), frames)


def test_dose_parameter_sets_mean_dose_with_poisson_noise(catalog_file, scan_zarr):
    _, frames = scan_zarr
    ref = frames.reshape(30, -1).sum(1).astype(float)
    dose = 500.0
    ds = open_catalog(catalog_file, dose=dose)["wedge"].read()
    assert isinstance(ds.data, da.Array) and ds.attrs["dose_e_per_frame"] == dose
    x = ds.data.compute()
    sums = x.reshape(30, -1).sum(1)
    # mean dose: expectation exactly `dose`, Poisson error sqrt(dose / 30 frames)
    assert abs(sums.mean() - dose) < 4 * np.sqrt(dose / 30)
    # each frame keeps its relative intensity (scale = dose / mean stored frame sum)
    np.testing.assert_allclose(sums, ref * dose / ref.mean(), rtol=0.35)
    # Poisson statistics: over the 30 frames of one scan row... use the pixel-wise expectation
    lam = frames.astype(float) * dose / ref.mean()
    z = (x - lam) / np.sqrt(np.maximum(lam, 1e-9))
    assert abs(z[lam > 1].mean()) < 0.05 and abs(z[lam > 1].var() - 1) < 0.1
    # the same catalog call gives the same noise (seeded), cat(dose=...) works as well
    np.testing.assert_array_equal(x, open_catalog(catalog_file)(dose=dose)["wedge"].read().data.compute())


def test_region_parameter_crops(catalog_file, scan_zarr):
    _, frames = scan_zarr
    ds = open_catalog(catalog_file, region=(1, 4, 2, 5))["wedge"].read()
    assert ds.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(ds.data.compute(), frames[1:4, 2:5])
    assert ds.truth.thickness_nm.shape == (3, 3)
    # dose and region together: the crop of the resampled scan (same noise as the full scan)
    full = open_catalog(catalog_file, dose=300)["wedge"].read().data.compute()
    part = open_catalog(catalog_file, dose=300, region=[1, 4, 2, 5])["wedge"].read().data.compute()
    np.testing.assert_array_equal(part, full[1:4, 2:5])


@pytest.mark.parametrize("params,match", [({"dose": -1}, "dose must be a positive"),
                                          ({"dose": "much"}, "dose must be a positive"),
                                          ({"region": (3, 1, 0, 2)}, "is empty"),
                                          ({"region": (0, 1, 2)}, "four non-negative integers"),
                                          ({"exposure": 3}, r"no user parameter\(s\) \['exposure'\]")])
def test_bad_user_parameters(catalog_file, params, match):
    with pytest.raises(BadInputError, match=match):
        open_catalog(catalog_file, **params)


def test_region_outside_scan_fails_on_read(catalog_file):
    cat = open_catalog(catalog_file, region=(0, 99, 0, 2))
    with pytest.raises(BadInputError, match=r"not inside the 6 x 5 scan"):
        cat["wedge"].read()


# --------------------------------------------------------------------------- hostile catalogs

_GOOD_DATA = {"datatype": "diffkit.catalog:FourDSTEMData", "kwargs": {"url": "{CATALOG_DIR}/data/wedge.zarr"}}


def _hostile_docs(mod):
    ref = f"{mod}:Evil"
    base = lambda: {"version": 2, "user_parameters": {}, "metadata": {},  # noqa: E731
                    "data": {"f": copy.deepcopy(_GOOD_DATA)},
                    "entries": {"bad": {"reader": "diffkit.catalog:FourDSTEMReader",
                                        "kwargs": {"data": "{data(f)}"}}}}
    cases = {}
    d = base(); d["entries"]["bad"]["reader"] = ref; cases["entries.bad.reader"] = d  # noqa: E702
    d = base(); d["data"]["f"]["datatype"] = ref; cases["data.f.datatype"] = d  # noqa: E702
    d = base(); d["user_parameters"]["dose"] = {"cls": ref, "default": None}  # noqa: E702
    cases["user_parameters.dose.cls"] = d
    d = base(); d["entries"]["bad"]["output_instance"] = ref; cases["entries.bad.output_instance"] = d  # noqa: E702
    d = base(); d["entries"]["bad"]["cls"] = ref; cases["entries.bad.cls"] = d  # noqa: E702
    d = base(); d["metadata"]["imports"] = [mod]; cases["metadata.imports"] = d  # noqa: E702
    d = base(); d["entries"]["bad"]["metadata"] = {"plugin_hint": f"{mod}.Evil"}  # noqa: E702
    cases["entries.bad.metadata.plugin_hint"] = d
    d = base(); d["entries"]["bad"]["kwargs"]["chunks"] = "{func(%s)}" % ref  # noqa: E702
    cases["entries.bad.kwargs.chunks"] = d
    d = base(); d["data"]["f"]["kwargs"]["options"] = {"dataset": ref}  # noqa: E702
    cases["data.f.kwargs.options.dataset"] = d
    d = base(); d["data"]["f"]["kwargs"]["options"] = {"mmap_mode": "w+"}  # noqa: E702 - would truncate files
    cases["data.f.kwargs.options"] = d
    d = base(); d["user_parameters"]["seed"] = {"default": "import(%s)" % ref}  # noqa: E702
    cases["user_parameters.seed.default"] = d
    d = base()
    d["user_parameters"]["seed"] = {"cls": "intake.readers.user_parameters:SimpleUserParameter",
                                    "dtype": "eval", "default": "0"}
    cases["user_parameters.seed.dtype"] = d
    return cases


def test_hostile_catalogs_are_refused_without_importing(tmp_path, evil_module):
    mod, marker = evil_module
    cases = _hostile_docs(mod)
    assert len(cases) == 12
    for where, doc in cases.items():
        p = tmp_path / "hostile.yaml"
        p.write_text(yaml.safe_dump(doc))
        with pytest.raises(UnsafeCatalogError) as err:
            open_catalog(p)
        msg = str(err.value)
        assert where in msg, (where, msg)
        assert (mod in msg or "eval" in msg or "mmap_mode" in msg) and "Nothing from this catalog was imported" in msg
        assert str(p) in msg
        assert mod not in sys.modules, where
        assert not marker.exists(), where
    # positive control: the same catalog handed to intake directly does import the module
    import intake

    doc = cases["entries.bad.reader"]
    doc["aliases"] = {"bad": "bad"}
    for section in ("entries", "data"):
        for e in doc[section].values():
            e.setdefault("metadata", {})
            e.setdefault("user_parameters", {})
    doc["entries"]["bad"]["output_instance"] = None
    p.write_text(yaml.safe_dump(doc))
    try:
        intake.readers.entry.Catalog.from_yaml_file(str(p))["bad"]
    except Exception:  # noqa: BLE001 - Evil is no reader; what matters is that it was imported
        pass
    assert mod in sys.modules and marker.exists()


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "ran.marker"
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']", "!!python/name:os.system",
                f"!python/object/apply:pathlib.Path.touch ['{marker}']"):
        p = tmp_path / "tag.yaml"
        p.write_text(f"version: 2\nentries:\n  x: {tag}\n")
        with pytest.raises(UnsafeCatalogError, match=r"YAML tag '!!?python/.*' at line 3 is not allowed"):
            open_catalog(p)
        assert not marker.exists()


def test_check_catalog_accepts_demo_yaml():
    doc = yaml.safe_load((ROOT / "catalogs" / "demo.yaml").read_text())
    check_catalog(doc, "demo.yaml")
    assert doc["version"] == 2
    assert set(doc["entries"]) == {"sto_pacbed_wedge", "sto_pacbed_wedge_19mrad", "si_strain_nbed"}
    urls = {d["kwargs"]["url"] for d in doc["data"].values()}
    assert urls == {"{CATALOG_DIR}/data/sto_pacbed_wedge.zarr", "{CATALOG_DIR}/data/sto_pacbed_wedge_19mrad.zarr",
                    "{CATALOG_DIR}/data/si_strain_nbed.zarr"}
    assert doc["user_parameters"]["dose"]["default"] is None and doc["user_parameters"]["region"]["default"] is None


def test_demo_catalog_with_swapped_data(tmp_path, scan_zarr):
    """demo.yaml unchanged, data files replaced: swapping demo data is a data change only."""
    path, frames = scan_zarr  # tmp_path/data/wedge.zarr
    import shutil

    (tmp_path / "demo.yaml").write_text((ROOT / "catalogs" / "demo.yaml").read_text())
    shutil.copytree(path, tmp_path / "data" / "si_strain_nbed.zarr")
    cat = open_catalog(tmp_path / "demo.yaml", dose=100)
    assert list(cat) == ["sto_pacbed_wedge", "sto_pacbed_wedge_19mrad", "si_strain_nbed"]
    ds = cat["si_strain_nbed"].read()
    assert ds.shape == frames.shape and ds.attrs["dose_e_per_frame"] == 100


def test_demo_catalog_data_if_generated():
    demo = ROOT / "catalogs" / "demo.yaml"
    if not (ROOT / "catalogs" / "data" / "sto_pacbed_wedge.zarr").exists():
        pytest.skip("demo data not generated (diffkit simulate demo)")
    ds = open_catalog(demo)["sto_pacbed_wedge"].read()
    assert ds.calibration.convergence_mrad == pytest.approx(13.6) and ds.truth is not None


@pytest.mark.parametrize("text,exc,match", [
    ("version: 2\nentries: [1, 2\n", BadInputError, "not valid YAML"),
    ("sources:\n  x: {driver: csv}\n", BadInputError, "intake-1 catalog"),
    ("- 1\n- 2\n", BadInputError, "not a YAML mapping"),
    ("version: 2\nentries:\n  x: {kwargs: {}}\n", BadInputError, "needs a 'reader'"),
])
def test_malformed_catalogs(tmp_path, text, exc, match):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(exc, match=match):
        open_catalog(p)


def test_missing_catalog(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        open_catalog(tmp_path / "nope.yaml")


def test_hand_written_catalog_gets_aliases(tmp_path, scan_zarr):
    p = tmp_path / "c.yaml"
    p.write_text(catalog_yaml({"one": "data/wedge.zarr"}))
    cat = open_catalog(p)
    assert list(cat) == ["one"] and cat["one"].read().shape == (6, 5, 16, 16)


def test_intake_entry_point_registered():
    try:
        eps = importlib.metadata.entry_points(group="intake.imports")
    except TypeError:  # pragma: no cover - very old importlib.metadata
        eps = importlib.metadata.entry_points().get("intake.imports", [])
    if not any(ep.name == "diffkit" for ep in eps):
        pytest.skip("diffkit is not installed (no entry points)")
    assert {ep.name: ep.value for ep in eps}["diffkit"] == "diffkit.catalog"


def test_reader_without_catalog_and_intake_written_catalog(tmp_path, scan_zarr):
    path, frames = scan_zarr
    r = FourDSTEMReader(str(path), scan_region=[0, 2, 0, 3])
    np.testing.assert_array_equal(r.read().data.compute(), frames[:2, :3])
    # a catalog written by intake itself from diffkit's reader passes the safety check and reads back
    r.to_cat("wedge").to_yaml_file(str(tmp_path / "written.yaml"))
    cat = open_catalog(tmp_path / "written.yaml")
    assert list(cat) == ["wedge"] and cat["wedge"].read().shape == (2, 3, 16, 16)
