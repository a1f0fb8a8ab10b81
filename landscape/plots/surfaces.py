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
from ..surface.file import read_surface
from .text import common_model, common_sample, sample_note, surface_title, value_label

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
    value_range: (low, high) of the value axis and colour scale, in the value's own units, so that
    figures shown side by side share it (None: the drawn values' own range).
    """

    log: bool = False
    zmin: "float | None" = None
    zmax: "float | None" = None
    cmap: str = "viridis"
    levels: int = 20
    title: "str | None" = None
    value_range: "tuple | None" = None
    subtitle: str = ""  # what the figure was computed on (the sample), under the title

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
        if self.value_range is not None:
            low, high = (checks.finite_float(v, "value range") for v in self.value_range)
            if low >= high or (self.log and low <= 0):
                raise UsageError(f"value range ({low}, {high}) must be increasing{' and positive' if self.log else ''}")
            self.value_range = (low, high)
        return self

    def values(self, z):
        """Clip and (for log) transform values for colouring; NaN stays NaN."""
        z = np.clip(z, self.zmin if self.zmin is not None else -np.inf, self.zmax if self.zmax is not None else np.inf)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)
        return z

    def value_label(self, field):
        """The axis label of ``field``'s values with their unit: 'train loss (nats)' (log10 on a log scale)."""
        return value_label(field, self.log)

    def shown_range(self, values):
        """(low, high) of the colour scale and value axis: ``value_range`` (as shown), else the values' own."""
        if self.value_range is not None:
            low, high = self.value_range
            return (float(np.log10(low)), float(np.log10(high))) if self.log else (low, high)
        finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values])
        low, high = float(finite.min()), float(finite.max())
        if high <= low:  # a flat surface still needs a non-empty colour range
            high = low + max(abs(low) * 1e-6, 1e-12)
        return low, high


def value_range(paths, field="train_loss"):
    """(smallest, largest) computed value of ``field`` over several surface files.

    Give it as ``value_range`` to figures that are shown side by side, so that they share their
    value axis.

    Raises:
        UsageError: a file that cannot be read, or no computed value in any of them.
    """
    finite = [s.z[np.isfinite(s.z)] for s in (read_surface(p, field) for p in paths)]
    finite = np.concatenate([f.ravel() for f in finite]) if finite else np.zeros(0)
    if finite.size == 0:
        raise UsageError("none of the surface files has a computed point yet")
    return float(finite.min()), float(finite.max())


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
                 cmap="viridis", levels=20, title=None, claim=None, value_range=None):
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
        value_range: (low, high) of the value axis and colour scale (None: the surface's own).

    Returns:
        The output path.

    Raises:
        UsageError: a bad input file or setting.
    """
    fmt = output_format(out)
    fig = surface_figure(path, fmt == "html", kind=kind, field=field, log=log, zmin=zmin, zmax=zmax, cmap=cmap,
                         levels=levels, title=title, value_range=value_range)
    return save_figure(fig, out, claim)


def surface_figure(path, interactive, kind="auto", field="train_loss", log=False, zmin=None, zmax=None,
                   cmap="viridis", levels=20, title=None, value_range=None):
    """The figure ``plot_surface`` writes, not written: a plotly ``Figure`` when ``interactive``, else matplotlib's.

    Its title says what is drawn (field, model, directions) and, under it, the sample it was
    evaluated on (from the file's attributes); a 2D figure marks the smallest value.  Other
    arguments as for ``plot_surface``.
    """
    from .draw import figure

    style = Style(log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title,
                  value_range=value_range).validate()
    surface = read_surface(path, field)
    kind = resolve_kind(kind, surface.dims)
    _require_data(surface)
    style.title = style.title or _default_title(surface)
    style.subtitle = sample_note(surface.settings, field)
    return figure([surface], [None], kind, style, notes=[None], interactive=interactive)


def save_figure(fig, out, claim=None):
    """Write a figure of ``surface_figure``/``compare_figure`` to ``out`` (its format from the name); returns ``out``.

    Raises:
        UsageError: an extension other than .html, .png or .pdf, or an HTML name for a matplotlib
            figure (or the other way round).
    """
    from .draw import save

    save(fig, out, output_format(out), claim)
    return Path(out)


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------

def compare_surfaces(paths, labels, out, kind="auto", field="train_loss", log=False, zmin=None, zmax=None,
                     cmap="viridis", levels=20, title=None, csv=None, radius=None, fit_radius=None, claim=None,
                     value_range=None):
    """Draw several surfaces of the same dimension together to ``out``, with sharpness numbers.

    1D: one curve per file on a shared axis.  2D: one panel per file, side by side, sharing the
    colour scale, the z range and the x and y ranges.  Each surface's smallest value is marked and
    its place and value written next to it.  The sharpness summary (``landscape.sharpness``,
    computed at a common ``radius`` / ``fit_radius``) goes into the legend entries / panel titles
    and into the CSV ``csv``.

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
        value_range: (low, high) of the value axis and colour scale, shared with other figures
            (``value_range(paths)`` of all of them; None: these surfaces' own).

    Returns:
        The summary rows (list of dicts, see ``sharpness.summarize``).
    """
    from ..surface import sharpness

    fmt = output_format(out)
    fig, rows = compare_figure(paths, labels, fmt == "html", kind=kind, field=field, log=log, zmin=zmin, zmax=zmax,
                               cmap=cmap, levels=levels, title=title, radius=radius, fit_radius=fit_radius,
                               value_range=value_range)
    save_figure(fig, out, claim)
    if csv is not False:
        sharpness.write_csv(rows, default_csv_path(out) if csv is None else csv)
    return rows


def compare_figure(paths, labels, interactive, kind="auto", field="train_loss", log=False, zmin=None, zmax=None,
                   cmap="viridis", levels=20, title=None, radius=None, fit_radius=None, value_range=None):
    """(figure, summary rows) of ``compare_surfaces``, nothing written; plotly's figure when ``interactive``."""
    from ..surface import sharpness
    from .draw import figure

    style = Style(log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title,
                  value_range=value_range).validate()
    labels = check_labels(labels, paths)
    surfaces = read_all(paths, field)
    kind = resolve_kind(kind, surfaces[0].dims)
    for surface in surfaces:
        _require_data(surface)
    rows = sharpness.summarize_all(surfaces, labels, radius=radius, fit_radius=fit_radius)
    notes = [sharpness.short_note(row) for row in rows]
    model = common_model(surfaces)
    style.title = style.title or f"{field.replace('_', ' ')}{f' · {model}' if model else ''}: {', '.join(labels)}"
    style.subtitle = common_sample(surfaces)
    return figure(surfaces, labels, kind, style, notes, interactive=interactive), rows


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


