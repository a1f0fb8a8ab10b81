"""Drawing surfaces: plotly figures (interactive, HTML) and matplotlib figures (PNG, PDF, inline).

``figure`` draws one or several surfaces side by side and returns the figure object; ``save``
writes it.  Side-by-side panels share the colour scale, the value range and the x and y ranges;
every surface's smallest value is marked and labelled with its place and value; colour bars carry
ticks at round values with as few digits as tell them apart.

Matplotlib figures are made without pyplot (``matplotlib.figure.Figure``): no backend is chosen
here, so a notebook's inline backend is left as it is and nothing is kept in pyplot's registry.
"""

import numpy as np

from ..errors import UsageError
from ..files import atomic_output
from ..outputs import figure_metadata
from .html import write_html
from .text import literal, minimum_note, value_label

# The coordinates are multiples of the direction file's (filter-normalized) directions.
X_LABEL = "x (direction 1)"
Y_LABEL = "y (direction 2)"


def figure(surfaces, labels, kind, style, notes, interactive):
    """The figure of ``surfaces`` (all 1D or all 2D), one panel (2D) or curve (1D) each.

    Args:
        surfaces: ``Surface`` objects.
        labels: one per surface (None: no label).
        kind: a resolved kind (``surfaces.resolve_kind``).
        style: a validated ``surfaces.Style`` (title and subtitle filled in).
        notes: the sharpness note of each surface (None: none).
        interactive: a plotly figure (True) or a matplotlib one (False).
    """
    if interactive:
        return plotly_figure(surfaces, labels, kind, style, notes)
    return mpl_figure(surfaces, labels, kind, style, notes)


def save(fig, out, fmt, claim=None):
    """Write ``fig`` to ``out`` in ``fmt`` ('html' for a plotly figure, 'png'/'pdf' for matplotlib's)."""
    from matplotlib.figure import Figure

    if isinstance(fig, Figure) == (fmt == "html"):
        raise UsageError(f"cannot write {'a matplotlib' if isinstance(fig, Figure) else 'an interactive'} figure "
                         f"as .{fmt}; use {'a .png or .pdf' if isinstance(fig, Figure) else 'an .html'} file name")
    if fmt == "html":
        write_html(fig, out, claim=claim)
        return
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=figure_metadata(out, fmt, claim))


def minimum(surface):
    """(x, y or None, value) of the smallest computed value of ``surface`` (NaN and inf are skipped)."""
    z = np.where(np.isfinite(surface.z), surface.z, np.inf)
    index = np.unravel_index(int(np.argmin(z)), z.shape)
    if surface.dims == 1:
        return float(surface.x[index[0]]), None, float(z[index])
    return float(surface.x[index[1]]), float(surface.y[index[0]]), float(z[index])


def tick_values(low, high, bins=8):
    """(ticks, labels) for a colour bar over [low, high]: round values, with as few decimals as tell them apart.

    Matplotlib's default puts a colour bar's ticks at the contour levels (``7.585``, ``6.292``)
    and with 5 decimals on a narrow range; these are steps of 1, 2 or 5 times a power of ten,
    written with the decimals of the step (at most 3 significant digits unless the range is
    narrower than the values' third digit).
    """
    from matplotlib.ticker import MaxNLocator

    span = high - low
    ticks = [t for t in MaxNLocator(nbins=bins, steps=[1, 2, 5, 10]).tick_values(low, high)
             if low - 1e-9 * span <= t <= high + 1e-9 * span]
    if len(ticks) < 2:
        ticks = [low, high]
    step = min(b - a for a, b in zip(ticks, ticks[1:]))
    decimals = max(0, int(-np.floor(np.log10(step) + 1e-9)))
    labels = [f"{t:.{decimals}f}" for t in ticks]
    while len(set(labels)) < len(labels) and decimals < 12:  # [low, high] themselves: digits until they differ
        decimals += 1
        labels = [f"{t:.{decimals}f}" for t in ticks]
    return [float(t) for t in ticks], ["0" if float(label) == 0 else label for label in labels]


def _shared_xy(surfaces):
    xs = np.concatenate([s.x for s in surfaces])
    ys = np.concatenate([s.y for s in surfaces])
    return (float(xs.min()), float(xs.max())), (float(ys.min()), float(ys.max()))


def _padded(low, high, log):
    """An axis range a little wider than [low, high] (on a log axis: in log10), as plotly and matplotlib pad."""
    if log:
        low, high = np.log10(low), np.log10(high)
    pad = 0.05 * (high - low)
    return float(low - pad), float(high + pad)


def _title_lines(style):
    return "\n".join(part for part in (style.title, style.subtitle) if part)


# --------------------------------------------------------------------------------------------
# plotly
# --------------------------------------------------------------------------------------------

def _plotly_colorscale(cmap, n=21):
    import matplotlib

    colors = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, n))
    return [[float(t), f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})"]
            for t, (r, g, b, _) in zip(np.linspace(0.0, 1.0, n), colors)]


def _panel_title(label, note):
    return " ".join(part for part in (label, f"({note})" if note else None) if part)


def _plotly_title(style):
    return style.title + (f"<br><sub>{style.subtitle}</sub>" if style.subtitle else "")


def plotly_figure(surfaces, labels, kind, style, notes):
    """The plotly figure of ``figure``.  Size: one figure, its panels, axes and marks, drawn in turn."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if kind == "line":
        return _plotly_lines(surfaces, labels, style, notes)
    values = [style.values(s.z) for s in surfaces]
    low, high = style.shown_range(values)
    n = len(surfaces)
    spec_type = "scene" if kind == "surface3d" else "xy"
    titles = [_panel_title(label, note) for label, note in zip(labels, notes)] if n > 1 else None
    fig = make_subplots(rows=1, cols=n, specs=[[{"type": spec_type}] * n], subplot_titles=titles,
                        horizontal_spacing=0.04 if kind == "surface3d" else 0.06)
    value_label = style.value_label(surfaces[0].field)
    for col, (surface, z) in enumerate(zip(surfaces, values), start=1):
        common = dict(x=surface.x, y=surface.y, z=z, coloraxis="coloraxis")
        if kind == "surface3d":
            trace = go.Surface(**common, connectgaps=False)
        elif kind == "heatmap":
            trace = go.Heatmap(**common)
        else:
            trace = go.Contour(**common, contours=dict(start=low, end=high, size=(high - low) / style.levels,
                                                       coloring="lines" if kind == "contour" else "fill"))
        fig.add_trace(trace, row=1, col=col)
        mx, my, mz = minimum(surface)
        note = minimum_note(mx, my, mz)
        marker = dict(symbol="x" if kind == "surface3d" else "star", size=6 if kind == "surface3d" else 12,
                      color="red")
        if kind == "surface3d":
            mark = go.Scatter3d(x=[mx], y=[my], z=[float(style.values(np.array([mz]))[0])], mode="markers+text",
                                text=[note], textfont=dict(color="red"), marker=marker, name=note, showlegend=False)
        else:  # the note points towards the middle of the grid, as in matplotlib's panels
            right = mx <= (surface.x.min() + surface.x.max()) / 2
            up = my < (surface.y.min() + surface.y.max()) / 2
            mark = go.Scatter(x=[mx], y=[my], mode="markers+text", text=[note], cliponaxis=False,
                              textposition=f"{'top' if up else 'bottom'} {'right' if right else 'left'}",
                              marker=marker, name=note, showlegend=False)
        fig.add_trace(mark, row=1, col=col)
    ticks, texts = tick_values(low, high)  # not the contour levels (8.316, 7.952, ...) plotly ticks by default
    fig.update_layout(title=_plotly_title(style), coloraxis=dict(
        colorscale=_plotly_colorscale(style.cmap), cmin=low, cmax=high,
        colorbar=dict(title=value_label, tickmode="array", tickvals=ticks, ticktext=texts)))
    xrange, yrange = _shared_xy(surfaces) if n > 1 else (None, None)  # one panel: as in mpl_figure
    if kind == "surface3d":
        for i in range(1, n + 1):
            fig.layout[f"scene{'' if i == 1 else i}"].update(
                zaxis=dict(range=[low, high], title=value_label), xaxis=dict(range=xrange, title=X_LABEL),
                yaxis=dict(range=yrange, title=Y_LABEL),
                aspectmode="manual", aspectratio=dict(x=1, y=1, z=0.8),  # same box in every panel
                camera=dict(eye=dict(x=1.6, y=1.6, z=1.0)))  # a step back: corners stay in view
    else:
        fig.update_xaxes(title_text=X_LABEL, range=xrange)
        fig.update_yaxes(title_text=Y_LABEL, range=yrange)
    return fig


def _plotly_lines(surfaces, labels, style, notes):
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    fig = go.Figure()
    for i, (surface, label, note) in enumerate(zip(surfaces, labels, notes)):
        z = np.clip(surface.z, style.zmin if style.zmin is not None else -np.inf,
                    style.zmax if style.zmax is not None else np.inf)
        mx, _, mz = minimum(surface)
        name = _panel_title(label or surface.field.replace("_", " "), note)
        color = qualitative.Plotly[i % len(qualitative.Plotly)]  # the curve and its minimum's mark
        fig.add_trace(go.Scatter(x=surface.x, y=z, mode="lines+markers", connectgaps=False, line=dict(color=color),
                                 name=f"{name}; {minimum_note(mx, None, mz)}", legendgroup=str(i)))
        fig.add_trace(go.Scatter(x=[mx], y=[mz], mode="markers", showlegend=False, legendgroup=str(i),
                                 marker=dict(symbol="star", size=12, color=color, line=dict(width=1, color="black"))))
    fig.update_layout(title=_plotly_title(style), xaxis_title="step along the direction",
                      yaxis_title=value_label(surfaces[0].field), yaxis_type="log" if style.log else "linear")
    if style.value_range is not None:
        fig.update_yaxes(range=list(_padded(*style.value_range, style.log)))
    return fig


# --------------------------------------------------------------------------------------------
# matplotlib
# --------------------------------------------------------------------------------------------

def mpl_figure(surfaces, labels, kind, style, notes):
    """The matplotlib figure of ``figure`` (a ``matplotlib.figure.Figure``, outside pyplot)."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if kind == "line":
        return _mpl_lines(surfaces, labels, style, notes)
    values = [style.values(s.z) for s in surfaces]
    low, high = style.shown_range(values)
    norm = Normalize(vmin=low, vmax=high)
    n = len(surfaces)
    subplot_kw = {"projection": "3d"} if kind == "surface3d" else {}
    # Constrained layout places the figure title above the panel titles, never over them.
    fig = Figure(figsize=(5.2 * n + 1.2, 4.8), layout="constrained")
    axes = fig.subplots(1, n, subplot_kw=subplot_kw, squeeze=False)
    xrange, yrange = _shared_xy(surfaces)
    mappable = None
    for ax, surface, z, label, note in zip(axes[0], surfaces, values, labels, notes):
        mappable = _mpl_panel(ax, surface, z, kind, style, norm, (low, high))
        if n > 1:  # one panel keeps its own limits: a trajectory's checkpoints may lie beyond its grid
            ax.set_xlim(*xrange)
            ax.set_ylim(*yrange)
            # Side-by-side panels are narrow: the sharpness note goes on its own line.
            ax.set_title(literal("\n".join(part for part in (label, note) if part)), fontsize=10)
    bar = fig.colorbar(mappable, ax=list(axes[0]), shrink=0.8, pad=0.08 if kind == "surface3d" else 0.05,
                       label=style.value_label(surfaces[0].field))
    ticks, texts = tick_values(low, high)
    bar.set_ticks(ticks, labels=texts)
    fig.suptitle(literal(_wrapped(_title_lines(style), 5.2 * n + 1.2)))
    return fig


def _mpl_panel(ax, surface, z, kind, style, norm, zrange):
    X, Y = np.meshgrid(surface.x, surface.y)
    masked = np.ma.masked_invalid(z)
    cmap = style.cmap
    mx, my, mz = minimum(surface)
    note = literal(minimum_note(mx, my, mz))
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    if kind == "surface3d":
        mappable = ax.plot_surface(X, Y, masked, cmap=cmap, norm=norm, linewidth=0, antialiased=True)
        ax.set_zlim(*zrange)  # the colour bar names the value; a z label would collide with it
        ticks, texts = tick_values(*zrange, bins=5)
        ax.set_zticks(ticks, labels=texts)
        from matplotlib.ticker import MaxNLocator

        for axis in (ax.xaxis, ax.yaxis):  # a 3D box's tick labels crowd one another beyond a few
            axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
        shown = float(style.values(np.array([mz]))[0])
        ax.scatter([mx], [my], [shown], marker="v", color="red", s=30, depthshade=False, zorder=10)
        ax.text(mx, my, shown, f"  {note}", fontsize=7, color="red", zorder=10)
        return mappable
    if kind == "heatmap":
        mappable = ax.pcolormesh(surface.x, surface.y, masked, cmap=cmap, norm=norm, shading="nearest")
    else:
        levels = np.linspace(zrange[0], zrange[1], style.levels + 1)
        draw = ax.contour if kind == "contour" else ax.contourf
        mappable = draw(X, Y, masked, levels=levels, cmap=cmap, norm=norm)
        if kind == "contour":  # the decimals of the level step: neighbouring lines never read alike
            decimals = max(0, int(-np.floor(np.log10(levels[1] - levels[0]) + 1e-9)))
            ax.clabel(mappable, inline=True, fontsize=7, fmt=f"%.{decimals}f")
    ax.plot([0], [0], marker="+", color="black", markersize=10)  # the unperturbed model
    ax.plot([mx], [my], marker="*", color="red", markeredgecolor="white", markersize=12, zorder=6, clip_on=False)
    # The note points towards the middle of the grid, so that a minimum at an edge keeps it inside.
    right = mx <= (surface.x.min() + surface.x.max()) / 2
    up = my < (surface.y.min() + surface.y.max()) / 2
    ax.annotate(note, (mx, my), textcoords="offset points", xytext=(6 if right else -6, 6 if up else -8),
                ha="left" if right else "right", va="bottom" if up else "top", fontsize=7, color="red", zorder=7,
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.7))
    ax.set_aspect("auto")
    return mappable


def _mpl_lines(surfaces, labels, style, notes):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for surface, label, note in zip(surfaces, labels, notes):
        z = np.clip(surface.z, style.zmin if style.zmin is not None else -np.inf,
                    style.zmax if style.zmax is not None else np.inf)
        mx, _, mz = minimum(surface)
        name = _panel_title(label or surface.field.replace("_", " "), note)
        (line,) = ax.plot(surface.x, z, marker="." if len(surface.x) <= 60 else None,
                          label=literal(f"{name}; {minimum_note(mx, None, mz)}"))
        ax.plot([mx], [mz], marker="*", color=line.get_color(), markeredgecolor="black", markersize=11, zorder=5)
    if style.log:
        ax.set_yscale("log")
    if style.value_range is not None:
        low, high = _padded(*style.value_range, style.log)
        ax.set_ylim(*((10 ** low, 10 ** high) if style.log else (low, high)))
    ax.set_xlabel("step along the direction")
    ax.set_ylabel(value_label(surfaces[0].field))  # a log scale is the axis's, not the values'
    ax.set_title(literal(_wrapped(_title_lines(style), 7.5)))
    ax.axvline(0.0, color="grey", linewidth=0.6)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _wrapped(title, width_inches):
    """A title broken into lines that fit a figure ``width_inches`` wide (about 11 characters an inch)."""
    import textwrap

    if not title:
        return title
    width = max(30, int(11 * width_inches))
    return "\n".join(wrapped for line in title.split("\n") for wrapped in textwrap.wrap(line, width=width))
