"""Readable figures: user text drawn verbatim, legends where colour means something, log scales
where values span decades, titles that do not overlap, HTML pages titled by what they show."""

import re

import numpy as np
import pytest
import torch

from landscape.cli import main
from landscape.guided import profile
from landscape.plots import draw
from landscape.plots import surfaces as render
from landscape.plots.text import literal, surface_title

MATH = r"$\x$"  # mathtext with an unknown command: matplotlib raises ValueError when it parses it
GRID = np.linspace(-1, 1, 9)


def bowl(X, Y):
    return 2.0 + X ** 2 + 3 * Y ** 2


def test_literal_text_is_never_mathtext():
    import matplotlib.text

    text = matplotlib.text.Text()
    for raw in (MATH, "a $5 and $6 b", r"a\$b", "plain"):
        shown, is_math = text._preprocess_math(literal(raw))
        assert (shown, is_math) == (raw, False)
    assert literal(None) is None


@pytest.mark.slow
def test_plot_and_compare_draw_dollar_signs_in_titles_labels_and_file_names(write_surface, tmp_path, capsys):
    odd = write_surface(f"a{MATH}.h5", bowl, x=GRID, y=GRID)
    plain = write_surface("b.h5", bowl, x=GRID, y=GRID)
    for kind, suffix in (("contour", "png"), ("surface3d", "pdf")):
        assert main(["plot", str(odd), "--kind", kind, "--out", str(tmp_path / f"p.{suffix}")]) == 0
        assert main(["plot", str(plain), "--kind", kind, "--title", MATH, "--out", str(tmp_path / f"t.{suffix}")]) == 0
    assert main(["compare", str(odd), str(plain), "--labels", f"{MATH},b", "--title", MATH, "--kind", "heatmap",
                 "--out", str(tmp_path / "c.png")]) == 0
    curves = [write_surface(f"{MATH}{i}.h5", lambda x, i=i: 1 + i * x ** 2) for i in (1, 2)]
    assert main(["compare", *map(str, curves), "--out", str(tmp_path / "lines.png")]) == 0
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("p.png", "t.pdf", "c.png", "lines.png"))


def test_profile_figures_draw_dollar_signs(tiny_bert, tmp_path):
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) for n, p in
              tiny_bert.model.named_parameters()}
    paths = profile.write_profile(fisher, tiny_bert.model, tmp_path / "prof", title=MATH)
    assert all(paths[k].stat().st_size > 1000 for k in ("parameters_png", "sites_png", "blocks_png"))


def test_bars_use_a_log_axis_when_values_span_decades_and_a_legend_for_colours():
    import matplotlib.pyplot as plt

    kinds = {"embeddings": "#8c564b", "attention": "#1f77b4"}
    wide = profile.bars_figure(["emb", "l0", "head"], [0.04, 0.001, 1.0], ["#8c564b", "#1f77b4", "#1f77b4"],
                               "score", legend=kinds)
    narrow = profile.bars_figure(["a", "b"], [0.5, 1.0], "#1f4e79", "score")
    try:
        ax = wide.axes[0]
        assert ax.get_xscale() == "log" and ax.get_xlim()[0] <= 0.001 / 2  # the smallest bar has a length
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(kinds)
        assert narrow.axes[0].get_xscale() == "linear" and narrow.axes[0].get_legend() is None
    finally:
        plt.close(wide)
        plt.close(narrow)
    assert profile.spans_decades([1.0, 0.01]) and not profile.spans_decades([1.0, 0.2, 0.0])


@pytest.mark.parametrize("kind", ["contourf", "surface3d"])
def test_compare_title_does_not_overlap_the_panel_titles(write_surface, kind):
    paths = [write_surface(f"{name}.h5", lambda X, Y, s=s: 3 + s * (X ** 2 + Y ** 2), x=GRID, y=GRID)
             for name, s in (("top", 10.0), ("bottom", 0.5))]
    surfaces = render.read_all(paths)
    style = render.Style(title="train loss: top-50%, bottom-50%", subtitle="8 samples × 128 tokens").validate()
    fig = draw.mpl_figure(surfaces, ["top-50%", "bottom-50%"], kind, style, ["rise@0.5=1, curv=2"] * 2)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure is outside pyplot: give it a canvas to lay it out
    canvas.draw()
    renderer = canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes[:2]:
        panel = ax.title.get_window_extent(renderer)
        assert ax.title.get_text() and top.y0 >= panel.y1, "the figure title overlaps a panel title"


def test_default_titles_say_what_the_surface_shows(write_surface):
    path = write_surface("s.h5", bowl, x=GRID, y=GRID)
    import h5py

    with h5py.File(path, "a") as handle:
        handle.attrs["model"] = "/models/smollm2-135m-instruct"
        handle.attrs["dir_subset"] = "top:50"
    title = surface_title(render.read_surface(path))
    assert title == "train loss · smollm2-135m-instruct · directions directions.h5 (subset top:50)"
    bare = write_surface("legacy.h5", bowl, x=GRID, y=GRID, legacy=True)
    assert "model.t7_weights" in surface_title(render.read_surface(bare))


def test_html_page_is_titled_and_fills_its_window(write_surface, tmp_path):
    path = write_surface("s.h5", bowl, x=GRID, y=GRID)
    html = render.plot_surface(path, tmp_path / "s.html", kind="surface3d").read_text()
    assert re.search(r"<title>train loss · directions directions\.h5</title>", html)
    assert '"responsive": true' in html  # plotly follows the window's size
    assert re.search(r'<div style="height:100vh; width:100%;">', html)  # the whole window, not 620 px
    assert '"height":' not in html.split("Plotly.newPlot", 1)[1].split("</script>")[0].split('"layout"', 1)[1][:4000]
    page = render.compare_surfaces([path, path], ["a", "b"], tmp_path / "c.html", csv=False)
    assert page and "<title>train loss: a, b</title>" in (tmp_path / "c.html").read_text()
