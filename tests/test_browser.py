"""The HTML figures really render in a browser: headless Chromium, a screenshot, pixels counted.

Plotly draws 3D surfaces with WebGL; without a GPU Chromium falls back to SwiftShader (software
WebGL).  A page whose WebGL failed shows only a grey box and the colour bar, so the check counts
saturated (coloured) pixels, which only a drawn surface provides in quantity.
"""

import re
import shutil
import subprocess

import numpy as np
import pytest

from landscape.plots import surfaces as render

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (install.sh --dev installs Debian's 'chromium')")

WINDOW = (1000, 700)
# Fraction of the window's pixels that must be strongly coloured.  A drawn viridis surface gives
# about 7%; a page whose WebGL failed gives about 0.7% (the colour bar alone).
MIN_COLOURED_FRACTION = 0.03


def screenshot(html, png, profile, extra_flags=()):
    """Open ``html`` in headless Chromium and save a WINDOW-sized screenshot to ``png``."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             "--use-angle=swiftshader", "--enable-unsafe-swiftshader", f"--user-data-dir={profile}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=5000", f"--screenshot={png}",
             *extra_flags]
    done = subprocess.run([CHROMIUM, *flags, html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"


def coloured_fraction(png, left=1.0):
    """(fraction of strongly coloured pixels, number of distinct colours) of a screenshot.

    left: look only at this leftmost fraction of the width (the plot area, not the legend).
    """
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    rgb = rgb[:, : int(rgb.shape[1] * left)]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    distinct = len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    return float((saturation > 0.2).mean()), distinct


@pytest.fixture
def surface_html(write_surface, tmp_path):
    grid = np.linspace(-1, 1, 31)
    path = write_surface("bowl.h5", lambda X, Y: 2 + X ** 2 + 2 * Y ** 2 + 0.2 * np.sin(4 * X), x=grid, y=grid)
    return render.plot_surface(path, tmp_path / "bowl.html", kind="surface3d")


def test_html_loads_no_remote_scripts(surface_html):
    html = surface_html.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)  # plotly.js is inline, works offline


@pytest.mark.slow
def test_surface3d_html_renders_in_headless_chromium(surface_html, tmp_path):
    png = tmp_path / "shot.png"
    screenshot(surface_html, png, tmp_path / "profile")
    fraction, distinct = coloured_fraction(png)
    assert fraction > MIN_COLOURED_FRACTION, f"only {fraction:.2%} coloured pixels: the surface did not draw"
    assert distinct > 1000  # a shaded surface, not a few flat colours


@pytest.mark.slow
def test_the_pixel_check_catches_a_page_without_webgl(surface_html, tmp_path):
    # Control: the same page with WebGL switched off must fail the check above.
    png = tmp_path / "no_webgl.png"
    screenshot(surface_html, png, tmp_path / "profile", extra_flags=["--disable-webgl", "--disable-3d-apis"])
    fraction, _ = coloured_fraction(png)
    assert fraction < MIN_COLOURED_FRACTION


@pytest.mark.slow
def test_compare_1d_html_renders(write_surface, tmp_path):
    paths = [write_surface(f"c{s}.h5", lambda x, s=s: 1 + s * x ** 2) for s in (1, 4)]
    html = tmp_path / "fig2.html"
    render.compare_surfaces(paths, ["top-80%", "random-80%"], html, csv=False)
    png = tmp_path / "shot.png"
    screenshot(html, png, tmp_path / "profile")
    fraction, _ = coloured_fraction(png, left=0.6)  # the legend (with coloured samples) is on the right
    assert fraction > 0.003, f"only {fraction:.3%} coloured pixels in the plot area: no curves drawn"


@pytest.mark.slow
def test_html_fills_the_browser_window(surface_html, tmp_path):
    # The plot is as large as the window (not a fixed 620 px high box), measured in the page.
    probe = ("<script>setTimeout(function () { var g = document.getElementsByClassName('plotly-graph-div')[0];"
             " document.body.setAttribute('data-size', [g._fullLayout.width, g._fullLayout.height,"
             " window.innerWidth, window.innerHeight].join(' ')); }, 1500);</script></body>")
    page = tmp_path / "probe.html"
    page.write_text(surface_html.read_text().replace("</body>", probe, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([CHROMIUM, *flags, page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    found = re.search(r'data-size="(\d+) (\d+) (\d+) (\d+)"', dom)
    assert found, "the page did not report its size"
    width, height, window_width, window_height = map(int, found.groups())
    assert (width, height) == (window_width, window_height) and height > 400
    assert "<title>bowl" not in dom and re.search(r"<title>train loss[^<]*</title>", dom)
