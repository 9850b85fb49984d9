"""The notebooks run top to bottom (nbclient) and are stored without outputs; the Binder
configuration is valid and the dashboards start under jupyter-panel-proxy's command line.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DEMO = pathlib.Path(os.environ.get("DIFFKIT_CATALOG") or ROOT / "catalogs" / "demo.yaml")  # the notebooks read it too
#: notebooks taking more than ~20 s on two CPU cores (still part of the default run)
SLOW = {"04_maps_on_dask", "05_train_your_own_model", "06_strain_mapping"}
BUDGET_S = 150  # each notebook must finish within ~2 minutes on 2 cores (plus kernel start)


#: catalog entries each notebook reads
NEEDS = {"06_strain_mapping": ("si_strain_nbed",)}


def _unreadable(entries) -> str:
    """Why one of the catalog entries cannot be read ("" when all can)."""
    from diffkit.catalog import open_catalog

    try:
        cat = open_catalog(str(DEMO))
        for e in entries:
            cat[e].read()
    except Exception as exc:  # noqa: BLE001 - the data files are generated separately
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_notebooks_exist():
    names = {nb.stem for nb in NOTEBOOKS}
    assert {"01_quickstart", "02_pacbed_thickness_tilt", "03_sensitivity_analysis", "04_maps_on_dask",
            "05_train_your_own_model", "06_strain_mapping"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_outputs_are_stripped(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", [pytest.param(nb, marks=[pytest.mark.slow] if nb.stem in SLOW else [])
                                  for nb in NOTEBOOKS], ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    if not DEMO.exists():
        pytest.skip("demo catalog catalogs/demo.yaml not found")
    why = _unreadable(NEEDS.get(path.stem, ("sto_pacbed_wedge",)))
    if why:
        pytest.skip(f"demo data for {path.name} not readable: {why}")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=BUDGET_S * 2, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute(env=dict(os.environ, OMP_NUM_THREADS="2", DIFFKIT_NOTEBOOK_TMP=str(tmp_path)))
    elapsed = time.perf_counter() - t0
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s (budget {BUDGET_S} s)"


# --------------------------------------------------------------------------- Binder

def test_binder_environment():
    env = yaml.safe_load((ROOT / "binder" / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    deps = [d for d in env["dependencies"] if isinstance(d, str)]
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in deps}
    assert "python=3.11" in deps
    for pkg in ("pytorch-cpu", "jupyter-panel-proxy", "jupyter_bokeh", "panel", "holoviews", "datashader", "dask",
                "distributed", "xarray", "zarr", "intake", "h5py", "safetensors", "colorcet"):
        assert pkg in names, pkg
    assert not any(n in names for n in ("pytorch", "pytorch-gpu", "cudatoolkit")), "Binder has no GPU"
    post = (ROOT / "binder" / "postBuild")
    assert os.access(post, os.X_OK)
    text = post.read_text()
    assert "pip install --no-deps -e ." in text and "jupyter-panel-proxy.yml" in text


def _proxy_config():
    """The proxy's own reading of its config: yaml.BaseLoader (every value a string)."""
    return yaml.load((ROOT / "binder" / "jupyter-panel-proxy.yml").read_text(), Loader=yaml.BaseLoader)


def _proxy_apps(config):
    found = []
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # the proxy globs relative to the Jupyter server's start directory
        for spec in config.get("apps", []):
            found += glob.glob(spec)
    finally:
        os.chdir(cwd)
    exclude = config.get("exclude_patterns", []) + ["*setup.py", "*dodo.py", "*.ipynb_checkpoints*"]
    return [a for a in found if not any(fnmatch.fnmatch(a, p) for p in exclude)]


def test_panel_proxy_config_serves_only_dashboards_without_dev_mode():
    config = _proxy_config()
    apps = _proxy_apps(config)
    assert sorted(apps) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dashboards").glob("*.py"))
    assert {pathlib.Path(a).stem for a in apps} == {"pacbed_explorer", "maps", "strain"}
    for flag in ("dev", "autoreload", "warm"):
        assert not config.get(flag, ""), f"{flag} must be off (an empty string: values are read as strings)"
    for app in apps:
        assert (ROOT / app).read_text().rstrip().endswith(".servable()")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboards_start_under_the_proxy_command_line():
    """``panel serve <apps> --allow-websocket-origin * --port P --prefix {base_url}panel`` as the proxy runs it."""
    if not DEMO.exists():
        pytest.skip("demo catalog catalogs/demo.yaml not found")
    config = _proxy_config()
    port = _free_port()
    prefix = "/user/binder-test/panel"
    cmd = [sys.executable, "-m", "panel", "serve", *_proxy_apps(config), "--allow-websocket-origin", "*",
           "--port", str(port), "--prefix", prefix, "--disable-index-redirect", "--address", "127.0.0.1"]
    for flag in ("autoreload", "warm", "admin", "dev", "reuse_sessions", "liveness"):
        if config.get(flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}{prefix}"
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"{base}/maps", timeout=120) as r:
                    assert r.status == 200
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() - t0 < 120, "server did not start"
                time.sleep(0.5)
        for app in ("pacbed_explorer", "maps", "strain"):
            with urllib.request.urlopen(f"{base}/{app}", timeout=180) as r:
                body = r.read().decode()
                assert r.status == 200 and "bokeh" in body.lower(), app
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "Traceback" not in out, out[-3000:]
