"""The served dashboards in a real browser (Playwright driving Debian's chromium).

One ``panel serve`` process on a free localhost port serves the three apps of ``dashboards/``;
each test loads an app, drives it like a user and checks what the page shows. Screenshots go
to ``test-artifacts/`` (copy good ones to ``docs/screenshots/``).

Run only these: ``pytest -m browser``. Skipped, with the reason, when ``chromium`` or the
Python ``playwright`` package is missing (never runs ``playwright install``).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.browser

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
APPS = ("pacbed_explorer", "maps", "strain")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None:
    pytest.skip("chromium not installed (apt-get install -y chromium); browser tests skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Python package playwright not installed")


def _need(entry: str) -> None:
    """Skip unless the demo catalog's ``entry`` can be read (its data files are generated separately)."""
    from diffkit.catalog import open_catalog

    catalog = os.environ.get("DIFFKIT_CATALOG") or str(ROOT / "catalogs" / "demo.yaml")
    try:
        open_catalog(catalog)[entry].read()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"demo entry {entry} not readable: {type(exc).__name__}: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"panel serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def server():
    """``panel serve dashboards/*.py`` on 127.0.0.1:<free port>; yields the base URL."""
    catalog = pathlib.Path(os.environ.get("DIFFKIT_CATALOG") or ROOT / "catalogs" / "demo.yaml")
    if not catalog.exists():
        pytest.skip(f"demo catalog {catalog} not found")
    port = _free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "panel_serve.log", "w")
    cmd = [sys.executable, "-m", "panel", "serve", *[f"dashboards/{a}.py" for a in APPS], "--port", str(port),
           "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-threads", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="2", BOKEH_PY_LOG_LEVEL="warning")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    pg = browser.new_page(viewport={"width": 1600, "height": 1150})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    pg.close()


def _shot(page, name):
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


_DEEP_TEXT = """els => els.map(el => {
    const walk = n => {
        let s = n.shadowRoot ? walk(n.shadowRoot) : "";
        for (const c of n.childNodes) {
            if (c.nodeType === 3) s += c.textContent;
            else if (c.nodeType === 1 && c.tagName !== "STYLE" && c.tagName !== "SCRIPT") s += walk(c);
        }
        return s;
    };
    return walk(el);
}).join("\\n")"""


def _text(locator) -> str:
    """Text of the matched elements including their shadow DOM (Panel panes render inside one)."""
    return locator.evaluate_all(_DEEP_TEXT)


def _wait_change(get, before, timeout_s=90.0, poll_ms=300):
    """Poll ``get()`` until it differs from ``before``; returns the new value."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        now = get()
        if now and now != before:
            return now
        time.sleep(poll_ms / 1000)
    raise AssertionError(f"nothing changed within {timeout_s} s (still {before!r})")


def _wait_for(get, needle, timeout_s=120.0, poll_ms=300):
    """Poll ``get()`` until it contains ``needle``; returns it."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        now = get()
        if needle in now:
            return now
        time.sleep(poll_ms / 1000)
    raise AssertionError(f"{needle!r} did not appear within {timeout_s} s (last: {now!r})")


def _press(page, selector, key, n):
    handle = page.locator(f"{selector} .noUi-handle").first
    handle.focus()
    for _ in range(n):
        page.keyboard.press(key)


def test_pacbed_explorer(server, page):
    _need("sto_pacbed_wedge")
    page.goto(f"{server}/pacbed_explorer", timeout=120_000)
    numbers = page.locator(".pacbed-numbers table")
    numbers.wait_for(timeout=120_000)
    entry = page.locator(".diffkit-entry select")
    options = entry.locator("option").all_inner_texts()
    assert "sto_pacbed_wedge" in options
    # pick a data set: another entry, then back to the 13.6 mrad wedge
    first = _text(numbers)
    others = [o for o in options if o not in ("sto_pacbed_wedge", "si_strain_nbed")]
    if others:
        entry.select_option(others[0])
        _wait_change(lambda: _text(page.locator(".pacbed-numbers table")) + _text(page.locator(".diffkit-error")),
                     first)
        entry.select_option("sto_pacbed_wedge")
        page.locator(".pacbed-numbers table").wait_for(timeout=120_000)
        _wait_change(lambda: _text(page.locator(".pacbed-numbers table")), "")
    assert "thickness" in _text(numbers) and "nm" in _text(numbers)
    net = page.locator(".diffkit-network-input canvas").first
    net.wait_for()
    page.wait_for_timeout(1000)
    picture0 = net.screenshot()
    before = _text(numbers)

    # background slider: the network re-runs, the numbers change and the removed background is reported
    _press(page, ".diffkit-background", "PageUp", 1)
    bg = _text(page.locator(".diffkit-background .bk-slider-title")).split(":")[-1].strip()
    assert float(bg) > 0
    after_bg = _wait_for(lambda: _text(numbers), f"background {bg}")
    assert "background removed" in after_bg and after_bg != before

    # band-pass mask (width, then inner radius): the settings row, the numbers and the masked picture change
    _press(page, ".diffkit-mask-width", "PageUp", 1)
    width = float(_text(page.locator(".diffkit-mask-width .bk-slider-title")).split(":")[-1])
    _press(page, ".diffkit-mask-inner", "PageUp", 2)
    inner = float(_text(page.locator(".diffkit-mask-inner .bk-slider-title")).split(":")[-1])
    assert width > 0 and inner > 0
    after_mask = _wait_for(lambda: _text(numbers), f"mask {inner:g} + {width:g} mrad")
    assert after_mask != after_bg
    page.wait_for_timeout(1500)
    picture1 = net.screenshot()
    assert picture1 != picture0
    sens = _text(page.locator(".diffkit-sensitivity"))
    assert "Mask sensitivity" in sens or page.locator(".diffkit-sensitivity canvas").count() >= 2
    _shot(page, "pacbed_explorer")
    assert not page.errors, page.errors


def test_maps_run_to_completion(server, page):
    _need("sto_pacbed_wedge")
    page.set_viewport_size({"width": 1600, "height": 1700})  # the template's main area scrolls: show all maps
    page.goto(f"{server}/maps", timeout=120_000)
    page.locator(".diffkit-run button").wait_for(timeout=120_000)
    assert "sto_pacbed_wedge" in page.locator(".diffkit-entry select").input_value()
    page.locator(".diffkit-run button").click()
    status = page.locator(".diffkit-status")
    t0 = time.time()
    while "Done" not in _text(status):
        assert time.time() - t0 < 150, f"map did not finish: {_text(status)!r}"
        assert "failed" not in _text(page.locator(".diffkit-error")).lower(), _text(page.locator(".diffkit-error"))
        page.wait_for_timeout(500)
    maps = page.locator(".diffkit-maps canvas")
    maps.first.wait_for(timeout=60_000)
    page.wait_for_timeout(2500)
    assert maps.count() >= 4
    assert "RMSE" in _text(page.locator(".diffkit-summary"))
    # tap a map pixel: the PACBED of that window appears with its values
    box = page.locator(".diffkit-maps canvas").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.3)
    page.locator(".diffkit-pixel").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    _shot(page, "maps")
    assert not page.errors, page.errors


def test_two_sessions_map_at_once_and_cancel(server, browser):
    """A long map in one session does not block another session; Cancel stops it."""
    _need("sto_pacbed_wedge")
    a = browser.new_page(viewport={"width": 1400, "height": 1000})
    b = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        for pg in (a, b):
            pg.goto(f"{server}/maps", timeout=120_000)
            pg.locator(".diffkit-run button").wait_for(timeout=120_000)
        _press(a, ".diffkit-window", "Home", 1)  # window 1: one PACBED per probe position, the longest map
        _wait_for(lambda: _text(a.locator(".diffkit-window .bk-slider-title")), ": 1")
        a.locator(".diffkit-run button").click()
        _wait_for(lambda: _text(a.locator(".diffkit-status")), "done")  # progress "n/N done, t s" while running
        b.locator(".diffkit-run button").click()  # the other session maps meanwhile
        _wait_for(lambda: _text(b.locator(".diffkit-status")), "Done", timeout_s=120)
        status_a = _text(a.locator(".diffkit-status"))
        if "Done" in status_a:
            pytest.skip(f"the long map finished before it could be cancelled ({status_a})")
        a.locator(".diffkit-cancel button").click()
        _wait_for(lambda: _text(a.locator(".diffkit-status")), "Cancelled", timeout_s=120)
        assert a.locator(".diffkit-run button").is_enabled()
    finally:
        a.close()
        b.close()


def test_strain_dashboard(server, page):
    _need("si_strain_nbed")
    page.goto(f"{server}/strain", timeout=120_000)
    page.locator(".diffkit-run button").wait_for(timeout=120_000)
    err = _text(page.locator(".diffkit-error"))
    if err:  # strain mapping not installed / no disk model: a clear message, no traceback
        assert "Traceback" not in err
        _shot(page, "strain")
        pytest.skip(f"strain mapping unavailable, dashboard shows: {err[:200]}")
    page.locator(".diffkit-run button").click()
    status = page.locator(".diffkit-status")
    t0 = time.time()
    while "Done" not in _text(status):
        assert time.time() - t0 < 150, f"strain map did not finish: {_text(status)!r}"
        assert not _text(page.locator(".diffkit-error")), _text(page.locator(".diffkit-error"))
        page.wait_for_timeout(500)
    page.locator(".diffkit-maps canvas").first.wait_for(timeout=60_000)
    page.wait_for_timeout(2500)
    _shot(page, "strain")
    assert not page.errors, page.errors
