"""Figures say what they show (issue 30, item 8): the model and the sample from the file's own
attributes, units, one value range for figures shown side by side, readable colour-bar ticks, each
surface's minimum marked with its place; and ``plot``/``compare`` without an output path give the
figure object, for a notebook, and write nothing."""

import collections
import re

import numpy as np
import pytest

from landscape import plots
from landscape.errors import UsageError
from landscape.guided import profile
from landscape.plots import draw
from landscape.plots.surfaces import value_range

GRID = np.linspace(-1, 1, 9)
SAMPLE = {"model": "/models/smollm2-135m-instruct", "n_samples": 8, "seq_len": 128, "n_target_tokens": 1000,
          "corpus": "wiki"}


def _with_attrs(path, attrs):
    import h5py

    with h5py.File(path, "a") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = value
    return path


def _off_centre(X, Y):
    return 6.3 + (X - 0.5) ** 2 + 2 * (Y + 0.25) ** 2  # its minimum (6.3) lies at (0.5, -0.25)


def _significant_digits(text):
    digits = re.sub(r"[^0-9]", "", text.replace("−", "-")).lstrip("0")
    return len(digits.rstrip("0")) if "." not in text else len(digits)


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_titles_name_the_model_and_the_sample_and_values_their_unit(write_surface):
    path = _with_attrs(write_surface("s.h5", _off_centre, x=GRID, y=GRID), SAMPLE)
    fig = plots.plot(path, kind="contour")
    title = fig._suptitle.get_text()
    assert "smollm2-135m-instruct" in title and "8 samples × 128 tokens, 1,000 scored, from wiki" in title
    assert fig.axes[-1].get_ylabel() == "train loss (nats)"  # the colour bar
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("x (direction 1)", "y (direction 2)")
    page = plots.plot(path, kind="surface3d")
    assert "8 samples × 128 tokens" in page.layout.title.text
    assert page.layout.coloraxis.colorbar.title.text == "train loss (nats)"
    line = plots.plot(write_surface("l.h5", lambda x: 1 + x ** 2))
    assert line.axes[0].get_ylabel() == "train loss (nats)"


def test_the_html_page_title_carries_the_sample(write_surface, tmp_path):
    path = _with_attrs(write_surface("s.h5", _off_centre, x=GRID, y=GRID), SAMPLE)
    plots.plot(path, tmp_path / "s.html")
    text = (tmp_path / "s.html").read_text()
    assert re.search(r"<title>train loss · smollm2-135m-instruct · directions directions\.h5 "
                     r"\(8 samples × 128 tokens, 1,000 scored, from wiki\)</title>", text)


@pytest.mark.parametrize("kind", ["contour", "contourf", "heatmap", "surface3d"])
def test_colour_bar_ticks_are_round_values_with_few_digits(write_surface, kind):
    # 6.28 .. 7.72, as the demo's surfaces: contour levels put ticks at 7.585, 7.370, ... before.
    path = write_surface("s.h5", lambda X, Y: 6.28 + 0.72 * (X ** 2 + Y ** 2), x=GRID, y=GRID)
    fig = plots.plot(path, kind=kind, interactive=False)
    bar = fig.axes[-1]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert len(labels) >= 3 and all(_significant_digits(label) <= 3 for label in labels), labels
    low, high = bar.get_ylim()
    assert all(low - 1e-9 <= t <= high + 1e-9 for t in bar.get_yticks())


def test_tick_values_on_a_narrow_range_tell_the_ticks_apart():
    ticks, labels = draw.tick_values(6.2846, 6.292)  # the demo's bottom-50% surface
    assert len(set(labels)) == len(labels) >= 3 and all(6.2846 <= t <= 6.292 for t in ticks)
    assert all(len(label.split(".")[1]) <= 3 for label in labels), labels  # 5 decimals before
    assert draw.tick_values(0.0, 3000.0)[1] == ["0", "500", "1000", "1500", "2000", "2500", "3000"]


@pytest.mark.parametrize("kind", ["contour", "surface3d"])
def test_the_comparison_marks_each_minimum_and_says_where_it_is(write_surface, kind):
    paths = [write_surface("a.h5", _off_centre, x=GRID, y=GRID),
             write_surface("b.h5", lambda X, Y: 7.0 + X ** 2 + Y ** 2, x=GRID, y=GRID)]
    fig = plots.compare(paths, labels=["a", "b"], kind=kind, interactive=False)
    texts = _texts(fig)
    assert any("min 6.3 at (0.5, -0.25)" in t for t in texts) and any("min 7 at (0, 0)" in t for t in texts)
    page = plots.compare(paths, labels=["a", "b"], kind=kind, interactive=True)
    marks = [trace.text[0] for trace in page.data if getattr(trace, "mode", None) == "markers+text"]
    assert marks == ["min 6.3 at (0.5, -0.25)", "min 7 at (0, 0)"]


def test_1d_comparison_marks_each_minimum_in_its_legend(write_surface):
    paths = [write_surface("a.h5", lambda x: 2 + (x - 0.3) ** 2, x=np.linspace(-1, 1, 11))]
    fig = plots.compare(paths, labels=["a"])
    assert "min 2.01 at 0.2" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_side_by_side_panels_share_their_x_y_and_value_ranges(write_surface):
    wide = write_surface("wide.h5", lambda X, Y: 1 + X ** 2 + Y ** 2, x=np.linspace(-2, 2, 9), y=GRID)
    narrow = write_surface("narrow.h5", lambda X, Y: 3 + X ** 2 + Y ** 2, x=GRID, y=np.linspace(-0.5, 0.5, 5))
    fig = plots.compare([wide, narrow], labels=["w", "n"], kind="contourf")
    panels = fig.axes[:2]
    assert panels[0].get_xlim() == panels[1].get_xlim() == (-2.0, 2.0)
    assert panels[0].get_ylim() == panels[1].get_ylim() == (-1.0, 1.0)
    page = plots.compare([wide, narrow], labels=["w", "n"], kind="heatmap", interactive=True)
    assert page.layout.xaxis.range == page.layout.xaxis2.range == (-2.0, 2.0)


def test_figures_shown_side_by_side_share_their_value_axis(write_surface):
    # The README's topk_sweep.png and random_controls.png: two comparisons, one loss axis.
    x = np.linspace(-1, 1, 11)
    top = [write_surface(f"top{s}.h5", lambda x, s=s: 6.3 + s * x ** 2, x=x) for s in (0.5, 1.0)]
    rand = [write_surface(f"rand{s}.h5", lambda x, s=s: 6.3 + s * x ** 2, x=x) for s in (0.01, 0.02)]
    shared = value_range(top + rand)
    assert shared == (6.3, 7.3)
    figures = [plots.compare(group, value_range=shared) for group in (top, rand)]
    assert figures[0].axes[0].get_ylim() == figures[1].axes[0].get_ylim()
    low, high = figures[1].axes[0].get_ylim()
    assert low < 6.3 and high > 7.3
    pages = [plots.compare(group, value_range=shared, interactive=True) for group in (top, rand)]
    assert pages[0].layout.yaxis.range == pages[1].layout.yaxis.range


def test_plot_and_compare_without_an_output_return_the_figure_and_write_nothing(write_surface, tmp_path,
                                                                                 monkeypatch):
    import matplotlib.figure
    import plotly.graph_objects as go

    path = write_surface("s.h5", _off_centre, x=GRID, y=GRID)
    curve = write_surface("c.h5", lambda x: 1 + x ** 2)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert isinstance(plots.plot(path), go.Figure)  # auto: surface3d, turned by hand
    assert isinstance(plots.plot(path, kind="contour"), matplotlib.figure.Figure)
    assert isinstance(plots.plot(path, kind="heatmap", interactive=True), go.Figure)
    assert isinstance(plots.plot(curve), matplotlib.figure.Figure)
    assert isinstance(plots.compare([path, path], labels=["a", "b"]), go.Figure)
    assert isinstance(plots.compare([curve, curve], labels=["a", "b"]), matplotlib.figure.Figure)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UsageError, match="give each surface"):
        plots.compare([path, path], labels=["a", "a"])


def test_a_returned_figure_is_the_one_a_path_writes(write_surface, tmp_path):
    path = write_surface("s.h5", _off_centre, x=GRID, y=GRID)
    fig = plots.plot(path, kind="contour")
    plots.plot(path, tmp_path / "p.png", kind="contour")
    from landscape.plots.surfaces import save_figure

    save_figure(fig, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000 and (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(UsageError, match="cannot write a matplotlib figure as .html"):
        save_figure(fig, tmp_path / "q.html")


def test_profile_figures_name_the_fisher_s_model_and_sample_and_say_log_axis():
    meta = {"model": "/models/smollm2-135m-instruct", "samples": "2048", "seq_len": "128", "corpus": "wiki"}
    title = profile.profile_title(meta, "/elsewhere/checkpoint")
    assert title == "empirical Fisher · smollm2-135m-instruct · 2,048 samples × 128 tokens from wiki"
    fig = profile.bars_figure(["a", "b"], [1.0, 0.001], "#1f4e79", "mean Fisher per element, relative to the "
                              "largest block", title)
    try:
        label = fig.axes[0].get_xlabel()
        assert label == "mean Fisher per element, relative to the largest block; log axis"
        assert "(normalized)" not in label and fig.axes[0].get_title() == title
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    parameters = profile.parameter_figure([{"fraction": 0.5, "fisher": 1e-3}, {"fraction": 1.0, "fisher": 1e-6}],
                                          2, 0, title)
    try:
        assert "nats²" in parameters.axes[0].get_ylabel() and title in parameters.axes[0].get_title()
    finally:
        plt.close(parameters)


def test_the_demo_draws_its_sweep_and_controls_on_one_loss_axis(write_surface, tmp_path, monkeypatch):
    from landscape import demo
    from landscape.plots import surfaces

    surf, figs = tmp_path / "surfaces", tmp_path / "figures"
    surf.mkdir()
    figs.mkdir()
    specs_2d = [("all", "all"), ("top50", "top:50"), ("bottom50", "bottom:50")]
    specs_1d = [("top5", "top:5"), ("top1", "top:1"), ("random5", "random:5"), ("random1", "random:1")]
    for name, _ in specs_2d:
        write_surface(f"surfaces/{name}_2d.h5", lambda X, Y: 6.3 + X ** 2 + Y ** 2, x=GRID, y=GRID)
    for i, (name, spec) in enumerate(specs_1d):  # the controls are far flatter than the sweep
        scale = 1.0 / (i + 1) if spec.startswith("top") else 0.01 / (i + 1)
        write_surface(f"surfaces/{name}_1d.h5", lambda x, s=scale: 6.3 + s * x ** 2)
    drawn, real_save = {}, surfaces.save_figure

    def save(fig, out, claim=None):
        drawn[out.name] = fig
        return real_save(fig, out, claim)

    monkeypatch.setattr(surfaces, "save_figure", save)
    demo._figures(surf, figs, specs_2d, specs_1d, claims=collections.defaultdict(lambda: None))
    sweep, controls = drawn["topk_sweep.png"].axes[0], drawn["random_controls.png"].axes[0]
    assert sweep.get_ylim() == controls.get_ylim()
    assert controls.get_ylim()[1] > 7.3  # the sweep's highest loss fits on the controls' axis


def test_an_interactive_colour_bar_has_the_same_round_ticks(write_surface):
    path = write_surface("s.h5", lambda X, Y: 6.28 + 0.72 * (X ** 2 + Y ** 2), x=GRID, y=GRID)
    bar = plots.plot(path, kind="contour", interactive=True).layout.coloraxis.colorbar
    assert list(bar.ticktext) == ["6.4", "6.6", "6.8", "7.0", "7.2", "7.4", "7.6"]
    assert list(bar.tickvals) == pytest.approx([6.4, 6.6, 6.8, 7.0, 7.2, 7.4, 7.6])


def test_contour_labels_carry_the_decimals_of_the_level_step(write_surface):
    # The demo's bottom-50% surface spans 6.2846 .. 6.35: '%.3g' labelled neighbouring lines all '6.29'.
    path = write_surface("s.h5", lambda X, Y: 6.2846 + 0.03 * (X ** 2 + Y ** 2), x=GRID, y=GRID)
    fig = plots.plot(path, kind="contour")
    labels = [t for t in _texts(fig) if not t.startswith("min ")]
    assert labels and all(re.fullmatch(r"6\.\d{3}", t) for t in labels), labels
