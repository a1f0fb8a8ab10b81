"""Read loss-surface files and draw them: interactive HTML (plotly) and static PNG/PDF (matplotlib).

Surface files are HDF5 with ``xcoordinates`` (nx,), optionally ``ycoordinates`` (ny,), and
``train_loss`` / ``train_acc`` shaped (nx,) in 1D or (ny, nx) in 2D, ``Z[iy, ix]`` being the value
at ``(x[ix], y[iy])``; NaN marks points not computed yet.  Files written by the original
loss-landscape code (Li et al. 2018) are read too: they declare the 2D shape as (nx, ny) but fill
it in the flat order of ``meshgrid(x, y)``, i.e. row-major over (ny, nx), and mark points not
computed yet with -1.

Public entry points: ``read_surface``, ``plot_surface``, ``compare_surfaces``.
Plotting libraries are imported lazily so that reading a surface stays cheap.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import checks
from ..errors import UsageError
from ..files import atomic_output
from ..outputs import figure_metadata
from ..surface.file import read_surface
from .html import write_html
from .text import common_model, literal, surface_title

FORMATS = ("html", "png", "pdf")
KINDS_2D = ("surface3d", "contour", "contourf", "heatmap")
KINDS_1D = ("line",)
PLOT_KINDS = KINDS_2D + KINDS_1D


# --------------------------------------------------------------------------------------------
# Options shared by plot and compare
# --------------------------------------------------------------------------------------------

@dataclass
class Style:
    """How values become colours and heights.

    log: show log10 of the value (2D) or a log value axis (1D).  zmin/zmax: clip values to this
    range (in the value's own units, before the log).  cmap: a matplotlib colour map name, also
    used (sampled) for the HTML output so both look alike.  levels: number of contour levels.
    """

    log: bool = False
    zmin: "float | None" = None
    zmax: "float | None" = None
    cmap: str = "viridis"
    levels: int = 20
    title: "str | None" = None

    def validate(self):
        """Check and normalize the settings; returns the style itself.

        Raises:
            UsageError: non-finite or inverted bounds, too many contour levels, a non-positive zmax on
                a log scale, or an unknown colour map.
        """
        import matplotlib

        self.zmin = checks.optional(checks.finite_float, self.zmin, "zmin")
        self.zmax = checks.optional(checks.finite_float, self.zmax, "zmax")
        # Bounded: each level is drawn as its own set of paths, and 50 million of them never finish.
        self.levels = checks.CONTOUR_LEVELS.check(self.levels, "contour levels")
        if self.zmin is not None and self.zmax is not None and self.zmin >= self.zmax:
            raise UsageError(f"zmin ({self.zmin}) must be below zmax ({self.zmax})")
        if self.log and self.zmax is not None and self.zmax <= 0:
            raise UsageError("zmax must be positive on a log scale")
        if self.cmap not in matplotlib.colormaps:
            raise UsageError(f"unknown colour map '{self.cmap}'; use a matplotlib name such as viridis, "
                             "coolwarm, magma or terrain")
        return self

    def values(self, z):
        """Clip and (for log) transform values for colouring; NaN stays NaN."""
        z = np.clip(z, self.zmin if self.zmin is not None else -np.inf, self.zmax if self.zmax is not None else np.inf)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)
        return z

    def value_label(self, field):
        """The axis label of values of ``field`` (e.g. 'train_loss'), with 'log10' on a log scale."""
        name = field.replace("_", " ")
        return f"log10 {name}" if self.log else name


def output_format(out):
    """The output format from the file extension of ``out``: 'html', 'png' or 'pdf'."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UsageError(f"cannot tell the format of '{out}': use a .html, .png or .pdf file name")
    return suffix


def resolve_kind(kind, dims):
    """Check ``kind`` against the surface dimension; 'auto' means surface3d in 2D, line in 1D."""
    if kind in (None, "auto"):
        return "surface3d" if dims == 2 else "line"
    if kind not in PLOT_KINDS:
        raise UsageError(f"unknown plot kind '{kind}'; use one of {', '.join(PLOT_KINDS)}")
    if dims == 1 and kind not in KINDS_1D:
        raise UsageError(f"kind '{kind}' needs a 2D surface but the file is 1D; draw it as a line")
    if dims == 2 and kind not in KINDS_2D:
        raise UsageError(f"kind '{kind}' needs a 1D surface but the file is 2D; use one of {', '.join(KINDS_2D)}")
    return kind


def _require_data(surface):
    if np.isfinite(surface.z).any():
        return
    if np.isinf(surface.z).any():  # +inf: computed, and the loss diverged there
        raise UsageError(f"'{surface.path}': the loss diverged (+inf) at every computed point, so there is "
                         "nothing to draw; use a smaller --x/--y range")
    raise UsageError(f"'{surface.path}' has no computed points yet; run or resume 'landscape surface' first")


def _default_title(surface):
    return surface_title(surface)


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------

def plot_surface(path, out, kind="auto", field="train_loss", log=False, zmin=None, zmax=None,
                 cmap="viridis", levels=20, title=None, claim=None):
    """Draw one surface file to ``out`` (.html: self-contained plotly; .png/.pdf: matplotlib).

    Nothing is written when the input is bad or drawing fails.

    Args:
        path: the surface file (.h5).
        out: the figure to write (.html, .png or .pdf).
        kind: auto | surface3d | contour | contourf | heatmap (2D) | line (1D).
        field: the surface field to draw.
        log: show log10 of the values.
        zmin: clip values below (in the field's units, before the log); None: no clip.
        zmax: clip values above; None: no clip.
        cmap: a matplotlib colour map name.
        levels: number of contour levels.
        title: the figure's title (None: a default).
        claim: the figure's ``outputs.Claim``, whose stamp it carries (None: ``outputs.figure_metadata``'s).

    Returns:
        The output path.

    Raises:
        UsageError: a bad input file or setting.
    """
    fmt = output_format(out)
    style = Style(log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title).validate()
    surface = read_surface(path, field)
    kind = resolve_kind(kind, surface.dims)
    _require_data(surface)
    style.title = style.title or _default_title(surface)
    if fmt == "html":
        fig = _plotly_figure([surface], [None], kind, style, notes=[None])
        write_html(fig, out, claim=claim)
    else:
        fig = _mpl_figure([surface], [None], kind, style, notes=[None])
        _save_mpl(fig, out, fmt, claim)
    return Path(out)


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------

def compare_surfaces(paths, labels, out, kind="auto", field="train_loss", log=False, zmin=None, zmax=None,
                     cmap="viridis", levels=20, title=None, csv=None, radius=None, fit_radius=None, claim=None):
    """Draw several surfaces of the same dimension together to ``out``, with sharpness numbers.

    1D: one curve per file on a shared axis.  2D: one panel per file, side by side, sharing the
    colour scale and the z range.  The sharpness summary (``landscape.sharpness``, computed at a
    common ``radius`` / ``fit_radius``) goes into the legend entries / panel titles and into the
    CSV ``csv``.

    Args:
        paths: the surface files (.h5), all 1D or all 2D.
        labels: one per path, or None for the file names.
        out: the figure to write (.html, .png or .pdf).
        kind: as for ``plot_surface``.
        field: the surface field to draw.
        log: show log10 of the values.
        zmin: clip values below; None: no clip.
        zmax: clip values above; None: no clip.
        cmap: a matplotlib colour map name.
        levels: number of contour levels.
        title: the figure's title (None: a default).
        csv: the sharpness CSV (None: ``<out name>.sharpness.csv`` next to ``out``; False: no CSV).
        radius: the common sharpness radius (see ``sharpness.summarize_all``).
        fit_radius: the common curvature fit radius.
        claim: as for ``plot_surface``.

    Returns:
        The summary rows (list of dicts, see ``sharpness.summarize``).
    """
    from ..surface import sharpness

    fmt = output_format(out)
    style = Style(log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title).validate()
    labels = check_labels(labels, paths)
    surfaces = read_all(paths, field)
    kind = resolve_kind(kind, surfaces[0].dims)
    for surface in surfaces:
        _require_data(surface)
    rows = sharpness.summarize_all(surfaces, labels, radius=radius, fit_radius=fit_radius)
    notes = [sharpness.short_note(row) for row in rows]
    model = common_model(surfaces)
    style.title = style.title or f"{field.replace('_', ' ')}{f' · {model}' if model else ''}: {', '.join(labels)}"
    if fmt == "html":
        write_html(_plotly_figure(surfaces, labels, kind, style, notes), out, claim=claim)
    else:
        _save_mpl(_mpl_figure(surfaces, labels, kind, style, notes), out, fmt, claim)
    if csv is not False:
        sharpness.write_csv(rows, default_csv_path(out) if csv is None else csv)
    return rows


def default_csv_path(out):
    """Where compare writes its sharpness CSV by default: ``X.png`` -> ``X.sharpness.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.sharpness.csv")


def read_all(paths, field="train_loss"):
    """Read several surface files; they must all be 1D or all 2D (UsageError otherwise)."""
    if not paths:
        raise UsageError("give at least one surface file")
    surfaces = [read_surface(p, field) for p in paths]
    dims = {s.dims for s in surfaces}
    if len(dims) > 1:
        kinds = ", ".join(f"{s.path.name}: {s.dims}D" for s in surfaces)
        raise UsageError(f"cannot compare 1D and 2D surfaces together ({kinds})")
    return surfaces


def check_labels(labels, paths):
    """One label per file; None means the file names without their extension."""
    if labels is None:
        return [Path(p).stem for p in paths]
    labels = list(labels)
    if len(labels) != len(paths):
        raise UsageError(f"got {len(labels)} labels for {len(paths)} surface files; give one label per file")
    repeat = checks.first_repeat(labels)
    if repeat is not None:  # the sharpness CSV's rows and the legend would not say which surface is which
        raise UsageError(f"label '{repeat}' is given twice; give each surface its own label")
    return labels


# --------------------------------------------------------------------------------------------
# plotly (HTML)
# --------------------------------------------------------------------------------------------

def _plotly_colorscale(cmap, n=21):
    import matplotlib

    colors = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, n))
    return [[float(t), f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})"]
            for t, (r, g, b, _) in zip(np.linspace(0.0, 1.0, n), colors)]


def _shared_range(values):
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values])
    low, high = float(finite.min()), float(finite.max())
    if high <= low:  # a flat surface still needs a non-empty colour range
        high = low + max(abs(low) * 1e-6, 1e-12)
    return low, high


def _panel_title(label, note):
    return " ".join(part for part in (label, f"({note})" if note else None) if part)


def _plotly_figure(surfaces, labels, kind, style, notes):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if kind == "line":
        return _plotly_lines(surfaces, labels, style, notes)
    values = [style.values(s.z) for s in surfaces]
    low, high = _shared_range(values)
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
    fig.update_layout(title=style.title, coloraxis=dict(colorscale=_plotly_colorscale(style.cmap), cmin=low,
                                                        cmax=high, colorbar=dict(title=value_label)))
    if kind == "surface3d":
        for i in range(1, n + 1):
            fig.layout[f"scene{'' if i == 1 else i}"].update(
                zaxis=dict(range=[low, high], title=value_label), xaxis_title="x", yaxis_title="y",
                aspectmode="manual", aspectratio=dict(x=1, y=1, z=0.8),  # same box in every panel
                camera=dict(eye=dict(x=1.6, y=1.6, z=1.0)))  # a step back: corners stay in view
    else:
        fig.update_xaxes(title_text="x")
        fig.update_yaxes(title_text="y")
    return fig


def _plotly_lines(surfaces, labels, style, notes):
    import plotly.graph_objects as go

    fig = go.Figure()
    for surface, label, note in zip(surfaces, labels, notes):
        z = np.clip(surface.z, style.zmin if style.zmin is not None else -np.inf,
                    style.zmax if style.zmax is not None else np.inf)
        fig.add_trace(go.Scatter(x=surface.x, y=z, mode="lines+markers", connectgaps=False,
                                 name=_panel_title(label or surface.field.replace("_", " "), note)))
    fig.update_layout(title=style.title, xaxis_title="step along the direction",
                      yaxis_title=surfaces[0].field.replace("_", " "), yaxis_type="log" if style.log else "linear",
                      showlegend=len(surfaces) > 1 or labels[0] is not None)
    return fig


# --------------------------------------------------------------------------------------------
# matplotlib (PNG, PDF)
# --------------------------------------------------------------------------------------------

def _mpl_figure(surfaces, labels, kind, style, notes):
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    if kind == "line":
        return _mpl_lines(surfaces, labels, style, notes)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    values = [style.values(s.z) for s in surfaces]
    low, high = _shared_range(values)
    norm = Normalize(vmin=low, vmax=high)
    n = len(surfaces)
    subplot_kw = {"projection": "3d"} if kind == "surface3d" else {}
    # Constrained layout places the figure title above the panel titles, never over them.
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n + 1.2, 4.8), subplot_kw=subplot_kw, squeeze=False,
                             layout="constrained")
    mappable = None
    for ax, surface, z, label, note in zip(axes[0], surfaces, values, labels, notes):
        mappable = _mpl_panel(ax, surface, z, kind, style, norm, (low, high))
        if n > 1:
            # Side-by-side panels are narrow: the sharpness note goes on its own line.
            ax.set_title(literal("\n".join(part for part in (label, note) if part)), fontsize=10)
    fig.colorbar(mappable, ax=list(axes[0]), shrink=0.8, pad=0.08 if kind == "surface3d" else 0.05,
                 label=style.value_label(surfaces[0].field))
    fig.suptitle(literal(_wrapped(style.title, 5.2 * n + 1.2)))
    plt.close(fig)  # keep pyplot's registry empty; the Figure object is still saved later
    return fig


def _mpl_panel(ax, surface, z, kind, style, norm, zrange):
    X, Y = np.meshgrid(surface.x, surface.y)
    masked = np.ma.masked_invalid(z)
    cmap = style.cmap
    if kind == "surface3d":
        mappable = ax.plot_surface(X, Y, masked, cmap=cmap, norm=norm, linewidth=0, antialiased=True)
        ax.set_zlim(*zrange)  # the colour bar names the value; a z label would collide with it
        from matplotlib.ticker import MaxNLocator

        for axis in (ax.xaxis, ax.yaxis):  # a 3D box's tick labels crowd one another beyond a few
            axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
    elif kind == "heatmap":
        mappable = ax.pcolormesh(surface.x, surface.y, masked, cmap=cmap, norm=norm, shading="nearest")
    else:
        levels = np.linspace(zrange[0], zrange[1], style.levels + 1)
        draw = ax.contour if kind == "contour" else ax.contourf
        mappable = draw(X, Y, masked, levels=levels, cmap=cmap, norm=norm)
        if kind == "contour":
            ax.clabel(mappable, inline=True, fontsize=7, fmt="%.3g")
    if kind != "surface3d":
        ax.plot([0], [0], marker="+", color="black", markersize=10)  # the unperturbed model
        ax.set_aspect("auto")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return mappable


def _mpl_lines(surfaces, labels, style, notes):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for surface, label, note in zip(surfaces, labels, notes):
        z = np.clip(surface.z, style.zmin if style.zmin is not None else -np.inf,
                    style.zmax if style.zmax is not None else np.inf)
        ax.plot(surface.x, z, marker="." if len(surface.x) <= 60 else None,
                label=literal(_panel_title(label or surface.field.replace("_", " "), note)))
    if style.log:
        ax.set_yscale("log")
    ax.set_xlabel("step along the direction")
    ax.set_ylabel(surfaces[0].field.replace("_", " "))
    ax.set_title(literal(_wrapped(style.title, 7.5)))
    ax.axvline(0.0, color="grey", linewidth=0.6)
    if len(surfaces) > 1 or labels[0] is not None:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plt.close(fig)
    return fig


def _wrapped(title, width_inches):
    """A title broken into lines that fit a figure ``width_inches`` wide (about 11 characters an inch)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width=max(30, int(11 * width_inches)))) if title else title


def _save_mpl(fig, out, fmt, claim=None):
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=figure_metadata(out, fmt, claim))
