"""Served dashboards: documented serve commands bind localhost with an origin check; the catalog box
opens only local catalogs under the server's roots and never echoes file contents."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT, catalog_yaml

pytest.importorskip("panel")


def _serve_commands():
    """Every ``panel serve`` command line in the docs, README and dashboard scripts (continuations joined)."""
    out = []
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "dashboards").glob("*.py"))]
    for f in files:
        text = re.sub(r"\\\n\s*", " ", f.read_text())
        in_code = f.suffix == ".py"
        for line in text.splitlines():
            if line.strip().startswith("```"):
                in_code = not in_code
                continue
            m = re.search(r"(^|\s)(panel serve .*)", line)
            if m and in_code:
                out.append((f.name, m.group(2)))
    return out


def test_documented_panel_serve_commands_bind_localhost_with_origin_check():
    cmds = _serve_commands()
    assert len(cmds) >= 4  # docs/dashboards.md and the three dashboard scripts
    for where, cmd in cmds:
        assert re.search(r"--address (127\.0\.0\.1|localhost)\b", cmd), (where, cmd)
        assert "--allow-websocket-origin" in cmd and "--allow-websocket-origin *" not in cmd, (where, cmd)


def _source(path, roots):
    from diffkit.ui import CatalogSource

    return CatalogSource(catalog_path=str(path), roots=roots)


def test_catalog_box_opens_only_under_its_roots(tmp_path, scan_zarr):
    inside = tmp_path / "cat.yaml"
    inside.write_text(catalog_yaml({"w": "data/wedge.zarr"}))
    src = _source(inside, [tmp_path])
    assert src.error == "" and src.entry == "w" and src.read().shape == (6, 5, 16, 16)
    other = tmp_path / "elsewhere"
    other.mkdir()
    src = _source(inside, [other])
    assert src.entry is None and "is not under a folder this server opens catalogs from" in src.error
    # a symbolic link inside the roots that points out of them
    (other / "link.yaml").symlink_to(inside)
    assert "is not under a folder" in _source(other / "link.yaml", [other]).error


@pytest.mark.parametrize("typed", ["data:text/plain;base64,dmVyc2lvbjogMgo=", "http://127.0.0.1:9/c.yaml",
                                   "simplecache::file:///etc/hosts", "/etc/passwd", "../../../../etc/passwd"])
def test_catalog_box_refuses_urls_and_outside_paths(tmp_path, typed):
    src = _source(typed, [tmp_path])
    assert src.entry is None and src._catalog is None
    assert "only local catalog files" in src.error or "is not under a folder" in src.error


def test_catalog_box_errors_do_not_echo_file_contents(tmp_path):
    secret = "sk-" + "9" * 20
    for text in (f"api_key: [{secret}\nx: : y\n", f"version: 2\napi_key: {secret}\n",
                 f"version: 2\nentries:\n  x:\n    reader: os.system\n    kwargs: {{command: '{secret}'}}\n"):
        f = tmp_path / "notes.txt"
        f.write_text(text)
        src = _source(f, [tmp_path])
        assert src.entry is None and src.error.startswith("Could not open catalog")
        assert secret not in src.error and "api_key" not in src.error and "os.system" not in src.error


def test_default_roots_and_server_roots(tmp_path, monkeypatch):
    from diffkit.ui._common import DEMO_CATALOG, ROOTS_ENV, catalog_roots

    monkeypatch.delenv(ROOTS_ENV, raising=False)
    monkeypatch.delenv("DIFFKIT_CATALOG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert set(catalog_roots()) == {str(DEMO_CATALOG.parent.resolve()), str(tmp_path.resolve())}
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path / "a"))
    assert catalog_roots() == [str((tmp_path / "a").resolve())]


def test_cli_serve_passes_catalog_roots(monkeypatch, tmp_path):
    import diffkit.ui as ui
    from diffkit import cli

    seen = {}
    monkeypatch.setattr(ui, "serve", lambda **kw: seen.update(kw), raising=False)
    monkeypatch.setattr("diffkit.ui.apps.serve", lambda **kw: seen.update(kw))
    assert cli.main(["serve", "--catalog-root", str(tmp_path)]) == 0
    assert seen["catalog_roots"] == [str(tmp_path)] and seen["address"] == "127.0.0.1"
