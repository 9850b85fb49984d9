"""Hostile catalogs: fsspec options and protocols, data: URLs, paths outside the catalog, YAML bombs, templates."""
from __future__ import annotations

import base64
import os
import time

import pytest
from conftest import catalog_yaml

from diffkit.catalog import open_catalog
from diffkit.errors import BadInputError, UnsafeCatalogError

URL = '"{CATALOG_DIR}/data/wedge.zarr"'


def _write(tmp_path, text, name="hostile.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _with_url(url: str, extra: str = "") -> str:
    return catalog_yaml({"w": "data/wedge.zarr"}).replace(URL, url + extra)


def _refused(path, match, **kw):
    with pytest.raises(UnsafeCatalogError, match=match):
        open_catalog(path, **kw)


# --------------------------------------------------------------------------- fsspec options and protocols


def test_catalog_cannot_choose_a_cache_folder(tmp_path, scan_zarr):
    victim = tmp_path / "victim"
    victim.mkdir()
    for url, so in [('"simplecache::{CATALOG_DIR}/data/wedge.zarr"', f"{{simplecache: {{cache_storage: '{victim}'}}}}"),
                    (URL, f"{{cache_storage: '{victim}'}}")]:
        p = _write(tmp_path, _with_url(url, f"\n      storage_options: {so}"))
        _refused(p, "may not be set by a catalog")
    assert list(victim.iterdir()) == []


def test_catalog_cannot_overwrite_files_through_filecache(tmp_path, scan_zarr):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "zarr.json").write_text("original")
    so = f"\n      storage_options: {{filecache: {{cache_storage: '{victim}', same_names: true}}}}"
    _refused(_write(tmp_path, _with_url('"filecache::{CATALOG_DIR}/data/wedge.zarr"', so)), "may not be set")
    # even without options, a caching protocol named by the catalog is refused
    _refused(_write(tmp_path, _with_url('"filecache::{CATALOG_DIR}/data/wedge.zarr"')),
             "caching protocol 'filecache' is not allowed")
    _refused(_write(tmp_path, _with_url('"blockcache::{CATALOG_DIR}/data/wedge.zarr"')), "'blockcache'")
    assert (victim / "zarr.json").read_text() == "original" and len(list(victim.iterdir())) == 1


def test_data_urls_are_refused(tmp_path, scan_zarr):
    text = catalog_yaml({"w": "data/wedge.zarr"})
    src = "data:text/plain;base64," + base64.b64encode(text.encode()).decode()
    _refused(src, "data: URLs are not allowed")
    _refused(src, "data: URLs are not allowed", protocols=["data"])  # not even on request
    _refused(_write(tmp_path, _with_url('"data:application/octet-stream;base64,AAAA"')), "data: URLs")


def test_remote_and_chained_protocols_need_the_caller(tmp_path, scan_zarr):
    p = _write(tmp_path, catalog_yaml({"w": "data/wedge.zarr"}))
    # refused before any connection is tried (port 9 would hang or fail otherwise)
    _refused("http://127.0.0.1:9/catalog.yaml", "remote protocol 'http' is not allowed")
    _refused("simplecache::" + p.as_uri(), "caching protocol 'simplecache'")
    _refused(_write(tmp_path, _with_url('"s3://bucket/wedge.zarr"'), "s3.yaml"), "remote protocol 's3'")
    # the caller may allow them (then with its own cache folder)
    cache = tmp_path / "my_cache"
    cat = open_catalog("simplecache::" + p.as_uri(), protocols=["simplecache"],
                       storage_options={"simplecache": {"cache_storage": str(cache)}})
    assert list(cat) == ["w"] and cat["w"].read().shape == (6, 5, 16, 16)
    assert any(cache.iterdir())


def test_memory_catalog_needs_the_caller():
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/diffkit_security/cat.yaml", "w") as f:
        f.write("version: 2\nentries: {}\n")
    try:
        _refused("memory://diffkit_security/cat.yaml", "remote protocol 'memory'")
        assert list(open_catalog("memory://diffkit_security/cat.yaml", protocols=["memory"])) == []
    finally:
        fs.rm("/diffkit_security", recursive=True)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("url", ['"../../etc/passwd"', '"/etc/passwd"', '"file:///etc/passwd"',
                                 '"{CATALOG_DIR}/../outside/x.npy"', '"{CATALOG_DIR}/data/../../outside/x.npy"'])
def test_data_paths_stay_in_the_catalog_folder(tmp_path, scan_zarr, url):
    d = tmp_path / "cat"
    d.mkdir()
    _refused(_write(d, _with_url(url)), "lies outside the catalog's folder")


def test_symlink_out_of_the_folder_and_data_roots_opt_in(tmp_path, scan_zarr):
    path, _ = scan_zarr
    d = tmp_path / "cat"
    d.mkdir()
    (d / "link.zarr").symlink_to(path, target_is_directory=True)
    p = _write(d, _with_url('"{CATALOG_DIR}/link.zarr"'))
    _refused(p, "outside the catalog's folder")
    cat = open_catalog(p, data_roots=[path.parent])
    assert cat["w"].read().shape == (6, 5, 16, 16)
    p2 = _write(d, _with_url('"../data/wedge.zarr"'), "rel.yaml")
    assert open_catalog(p2, data_roots=[str(tmp_path / "data")])["w"].read().shape == (6, 5, 16, 16)


def test_relative_data_paths_resolve_against_the_catalog(tmp_path, scan_zarr, monkeypatch):
    p = _write(tmp_path, _with_url('"data/wedge.zarr"'))
    monkeypatch.chdir(scan_zarr[0].parent)  # not the catalog's folder
    assert open_catalog(p)["w"].read().shape == (6, 5, 16, 16)


# --------------------------------------------------------------------------- YAML size and depth


def test_alias_bomb_is_refused_quickly(tmp_path):
    # 63 aliases (below the alias cap), ~400 bytes, 7**9 values when expanded
    text = "version: 2\na0: &a0 [x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 7)}]\n" for i in range(1, 10))
    assert text.count("*") == 63 and len(text) < 500
    t = time.perf_counter()
    _refused(_write(tmp_path, text), "expands to more than")
    assert time.perf_counter() - t < 3


def test_string_alias_bomb_is_refused(tmp_path):
    text = "version: 2\ns: &s '" + "x" * 200_000 + "'\n" + "l: [" + ", ".join(["*s"] * 100) + "]\n"
    _refused(_write(tmp_path, text), "expands to more than")


@pytest.mark.parametrize("text", ["version: 2\nx: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "version: 2\nx: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
                                  "version: 2\n" + "".join(" " * i + f"k{i}:\n" for i in range(300))])
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path, text):
    t = time.perf_counter()
    _refused(_write(tmp_path, text), "nested more than")
    assert time.perf_counter() - t < 3


# --------------------------------------------------------------------------- templates and structure


@pytest.mark.parametrize("old,new", [
    (URL, '"{CATALOG_DIR.__class__.__mro__}"'),
    (URL, '"{CATALOG_DIR[0]}/x.zarr"'),
    ('"{dose}"', '"{dose.__class__.__init__.__globals__}"'),
    ('"{dose}"', '"{dose!r}"'),
    ('"{dose}"', '"{dose:>{CATALOG_DIR.__doc__}}"'),
])
def test_templates_are_plain_names_only(tmp_path, scan_zarr, old, new):
    text = catalog_yaml({"w": "data/wedge.zarr"}).replace(old, new, 1)
    _refused(_write(tmp_path, text), "template other than a plain")


def test_url_templates_other_than_catalog_dir_are_refused(tmp_path, scan_zarr):
    _refused(_write(tmp_path, _with_url('"{CATALOG_DIR}/{region}.zarr"')), "no template but")


@pytest.mark.parametrize("old,new,match", [
    ("  dose:\n", "  CATALOG_DIR:\n    default: /etc\n  dose:\n", "set by diffkit itself"),
    ("    reader: diffkit.catalog:FourDSTEMReader\n", "    reader: diffkit.catalog:FourDSTEMReader\n    to_reader: x\n",
     "is not a key diffkit catalogs use"),
    ('      dose_e_per_frame: "{dose}"\n', '      dose_e_per_frame: "{dose}"\n      mmap_mode: w+\n',
     "is not a key diffkit catalogs use"),
    ('data: "{data(w_file)}"', 'data: "{data(elsewhere)}"', "naming one of the catalog's data"),
    ("default: null", "default: data(w_file)", "is a template"),
])
def test_catalog_structure_is_strict(tmp_path, scan_zarr, old, new, match):
    text = catalog_yaml({"w": "data/wedge.zarr"})
    assert old in text
    _refused(_write(tmp_path, text.replace(old, new, 1)), match)


def test_yaml_errors_do_not_echo_the_file(tmp_path):
    secret = "sk-" + "7" * 24
    p = _write(tmp_path, f"version: 2\napi_key: [{secret}\nother: : x\n", "secrets.txt")
    with pytest.raises(BadInputError, match=r"not valid YAML at line \d+, column \d+") as err:
        open_catalog(p)
    assert secret not in str(err.value) and "api_key" not in str(err.value)


def test_shipped_demo_catalog_still_opens():
    from conftest import ROOT

    cat = open_catalog(ROOT / "catalogs" / "demo.yaml")
    assert set(cat) == {"sto_pacbed_wedge", "sto_pacbed_wedge_19mrad", "si_strain_nbed"}
    for name in cat:
        assert cat[name].data.url.startswith("file://" + os.path.realpath(ROOT / "catalogs"))
