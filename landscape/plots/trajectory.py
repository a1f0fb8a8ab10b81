"""Contours of a trajectory plane with the checkpoints drawn on them (Li et al. 2018, Fig. 9).

A surface computed along the PCA plane of a trajectory (``landscape directions --trajectory``)
has its checkpoints' coordinates in its direction file, not in the surface file: the surface
stores ``dir_file`` and ``dir_fingerprint``, and the direction file holds
``trajectory_coordinates`` (n, 2), ``trajectory_labels`` and ``explained_variance``.  The points
are read from there when the plot is drawn: from ``dir_file`` as stored (absolute, or relative to
the current folder), else from a file of that name next to the surface file, and only when its
fingerprint is the surface's (the direction file was not remade since).
"""

from pathlib import Path

import numpy as np

from ..surface.file import read_surface
from .surfaces import Style, _default_title, _require_data, output_format, resolve_kind, save_figure
from .text import literal, sample_note


def trajectory_points(surface):
    """The checkpoints of a surface's trajectory in its plane.

    Args:
        surface: a ``Surface`` whose direction file may be a trajectory (PCA) plane.

    Returns:
        (coordinates (n, 2), labels, explained variance), or None when its direction file is not a
        trajectory plane or cannot be found unchanged.
    """
    import h5py

    settings = surface.settings or {}
    stored = str(settings.get("dir_file", "") or "")
    if not stored:
        return None
    candidates = [Path(stored), Path(surface.path).parent / stored, Path(surface.path).parent / Path(stored).name]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            with h5py.File(candidate, "r") as handle:
                attrs = dict(handle.attrs)
        except OSError:
            continue
        if "trajectory_coordinates" not in attrs:
            return None
        fingerprint = _text(attrs.get("fingerprint", ""))
        wanted = str(settings.get("dir_fingerprint", "") or "")
        if wanted and fingerprint and wanted != fingerprint:
            continue
        coords = np.asarray(attrs["trajectory_coordinates"], dtype=float).reshape(-1, 2)
        labels = [_text(v) for v in np.atleast_1d(attrs.get("trajectory_labels", []))]
        if len(labels) != len(coords):
            labels = [str(i + 1) for i in range(len(coords))]
        explained = [float(v) for v in np.atleast_1d(attrs.get("explained_variance", []))]
        return coords, labels, explained
    return None


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def plot_with_trajectory(path, out, kind="contour", field="train_loss", log=False, zmin=None, zmax=None,
                         cmap="viridis", levels=20, title=None, claim=None):
    """Draw a 2D surface with its trajectory's checkpoints, labelled, joined in training order.

    Args:
        path: the surface file (.h5).
        out: the figure to write (.html, .png or .pdf).
        kind: 'contour', 'contourf' or 'heatmap'.
        field: the surface field to draw.
        log: draw log10 of the values.
        zmin: clip values below (in the field's units, before the log); None: no clip.
        zmax: clip values above; None: no clip.
        cmap: a matplotlib colour map name.
        levels: number of contour levels.
        title: the figure's title (None: a default).
        claim: the figure's ``outputs.Claim`` (as for ``plot_surface``).

    Returns:
        The output path, or None (nothing written) when the surface has no trajectory.
    """
    fig = trajectory_figure(path, output_format(out) == "html", kind=kind, field=field, log=log, zmin=zmin,
                            zmax=zmax, cmap=cmap, levels=levels, title=title)
    return None if fig is None else save_figure(fig, out, claim)


def trajectory_figure(path, interactive, kind="contour", field="train_loss", log=False, zmin=None, zmax=None,
                      cmap="viridis", levels=20, title=None):
    """The figure ``plot_with_trajectory`` writes, not written (plotly's when ``interactive``), or None.

    None when the surface has no trajectory; other arguments as for ``plot_with_trajectory``.
    """
    from .draw import figure

    style = Style(log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title).validate()
    surface = read_surface(path, field)
    kind = resolve_kind(kind, surface.dims)
    if surface.dims != 2:
        return None
    found = trajectory_points(surface)
    if found is None:
        return None
    coords, labels, explained = found
    _require_data(surface)
    style.title = style.title or _default_title(surface)
    style.subtitle = sample_note(surface.settings, field)
    if len(explained) >= 2:
        style.title += f" (PCA plane: {explained[0]:.1%} + {explained[1]:.1%} of the variance)"
    fig = figure([surface], [None], kind, style, notes=[None], interactive=interactive)
    if interactive:
        import plotly.graph_objects as go

        fig.add_trace(go.Scatter(x=coords[:, 0], y=coords[:, 1], mode="lines+markers+text", text=labels,
                                 textposition="top center", name="checkpoints",
                                 marker=dict(color="red", size=8), line=dict(color="red", width=1)))
        return fig
    ax = fig.axes[0]
    ax.plot(coords[:, 0], coords[:, 1], "-o", color="red", markersize=4, linewidth=1, zorder=5,
            label="checkpoints, in training order")
    for (x, y), label in zip(coords, labels):
        ax.annotate(literal(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="red")
    ax.legend(fontsize=8, loc="upper right")
    return fig
