"""The figure stage as one call each: ``plot`` and ``compare``.

``plot`` draws one surface, or a Hessian report's spectral density; ``compare`` draws several
surfaces with their sharpness numbers, and the curvature of Hessian reports as extra CSV columns.
What ``landscape plot`` and ``landscape compare`` do; without an output path, each returns the
figure object (plotly's or matplotlib's) and writes nothing, for a notebook to show inline.

Both claim their outputs (``outputs.claim_output``): a figure of other inputs, or a file that is
not a figure (or not this table), is refused unless ``overwrite``; a figure of the same inputs is
redrawn.  The claim's settings (the command and the inputs' absolute paths) are stamped into the
figure: the claim is passed to the writer.
"""

import os
from typing import Any, Optional, Sequence, Tuple

from ..errors import UsageError
from ..files import PathLike, check_distinct_paths, check_output_path, replace_together, staged_path
from ..outputs import claim_output
from .surfaces import (
    FORMATS,
    KINDS_2D,
    compare_figure,
    compare_surfaces,
    default_csv_path,
    output_format,
    resolve_kind,
    save_figure,
    surface_figure,
)

HESSIAN_COLUMNS = ("top_eigenvalue", "trace", "trace_stderr")
FIGURE_SUFFIXES = tuple(f".{f}" for f in FORMATS)
PLOT_KINDS = ("auto", "surface3d", "contour", "contourf", "heatmap", "line", "spectrum")


def _figure_claim(out, command: str, inputs: Sequence, overwrite: bool):
    return claim_output(out, "figure", overwrite=overwrite,
                        settings={"command": command, "inputs": [os.path.abspath(p) for p in inputs]})


def plot(path: PathLike, out: Optional[PathLike] = None, kind: str = "auto", field: str = "train_loss",
         log: bool = False, zmin: Optional[float] = None, zmax: Optional[float] = None, cmap: str = "viridis",
         levels: int = 20, title: Optional[str] = None, overwrite: bool = False,
         value_range: Optional[Tuple[float, float]] = None, interactive: Optional[bool] = None) -> Any:
    """Draw one surface file, or the spectral density of a Hessian report: to ``out``, or as a figure object.

    The title says what is drawn (the field, the model, the directions) and, under it, the sample
    the surface was evaluated on; values carry their unit (loss in nats); a 2D figure marks its
    smallest value with its place.  Contours (and heatmaps) of a surface along a trajectory's PCA
    plane show its checkpoints, labelled and joined in training order.

    Args:
        path: a surface HDF5 file (also the original loss-landscape code's); for ``kind='spectrum'``
            a Hessian report (JSON).
        out: the figure: .html (interactive, offline), .png or .pdf.  None: nothing is written and
            the figure object is returned, for a notebook to show.
        kind: auto | surface3d | contour | contourf | heatmap (2D) | line (1D) | spectrum; auto is
            surface3d in 2D, line in 1D.
        field: the dataset to draw (train_loss | train_acc | test_loss | test_acc).
        log: log10 of the values (for a spectrum: a log density axis).
        zmin: clip values below this (in their own units, before the log; None: no clipping).
        zmax: clip values above this (None: no clipping).
        cmap: a matplotlib colour map name.
        levels: contour levels, in [2, 500].
        title: the figure's title (None: one from the file's name).
        overwrite: replace an ``out`` that is not a figure of this input.
        value_range: (low, high) of the value axis and colour scale, to share it with figures shown
            beside this one (``plots.surfaces.value_range`` of all their files; None: this surface's own).
        interactive: without ``out``, a plotly ``Figure`` (True) or a matplotlib ``Figure`` (False);
            None: plotly for surface3d (a 3D surface is turned by hand), matplotlib otherwise.  With
            ``out`` its extension decides (.html is plotly).

    Returns:
        With ``out``: {"path": the figure's Path, "kind": the kind drawn, "trajectory": whether
        checkpoints of a trajectory are drawn on it}.  Without: the figure object.

    Raises:
        UsageError: an unknown kind or format, an input that cannot be read or has nothing to
            draw, or an output that may not be written.
    """
    if kind not in PLOT_KINDS:
        raise UsageError(f"unknown plot kind '{kind}'; use one of {', '.join(PLOT_KINDS)}")
    if out is None:
        return _plot_figure(path, kind, _interactive(interactive, kind, path), field=field, log=log, zmin=zmin,
                            zmax=zmax, cmap=cmap, levels=levels, title=title, value_range=value_range)[0]
    out = check_output_path(out, "out", FIGURE_SUFFIXES)
    check_distinct_paths({"out": out}, {"path": path})
    with _figure_claim(out, "plot", [path], overwrite) as claim:
        fig, trajectory = _plot_figure(path, kind, output_format(out) == "html", field=field, log=log, zmin=zmin,
                                       zmax=zmax, cmap=cmap, levels=levels, title=title, value_range=value_range)
        return {"path": save_figure(fig, out, claim), "kind": kind, "trajectory": trajectory}


def _interactive(interactive, kind, path):
    """Whether a figure returned (not written) is plotly's: ``interactive``, else True only for 3D surfaces."""
    if interactive is not None:
        return bool(interactive)
    if kind == "auto":
        from ..surface.file import read_surface

        kind = resolve_kind(kind, read_surface(path).dims)
    return kind == "surface3d"


def _plot_figure(path, kind, interactive, value_range=None, **style):
    """(figure, whether a trajectory's checkpoints are on it) of ``plot``."""
    from .spectrum import spectrum_figure
    from .trajectory import trajectory_figure

    if kind == "spectrum":
        return spectrum_figure(path, interactive, log=style["log"], title=style["title"]), False
    if kind in KINDS_2D and kind != "surface3d":
        fig = trajectory_figure(path, interactive, kind=kind, **style)
        if fig is not None:
            return fig, True
    return surface_figure(path, interactive, kind=kind, value_range=value_range, **style), False


def compare(paths: Sequence[PathLike], out: Optional[PathLike] = None, labels: Optional[Sequence[str]] = None,
            csv: Optional[PathLike] = None, hessian: Optional[Sequence[PathLike]] = None,
            radius: Optional[float] = None, fit_radius: Optional[float] = None, kind: str = "auto",
            field: str = "train_loss", log: bool = False, zmin: Optional[float] = None,
            zmax: Optional[float] = None, cmap: str = "viridis", levels: int = 20, title: Optional[str] = None,
            overwrite: bool = False, value_range: Optional[Tuple[float, float]] = None,
            interactive: Optional[bool] = None) -> Any:
    """Draw several surfaces of one dimension together, and write their sharpness numbers as CSV.

    2D panels share the colour scale and the x, y and value ranges; each surface's smallest value
    is marked with its place and value.

    Args:
        paths: surface files, all 1D or all 2D.
        out: the figure (.html, .png or .pdf).  None: nothing is written (no CSV either) and the
            figure object is returned; ``sharpness.summarize_all`` gives the numbers.
        labels: one per surface (None: the file names).
        csv: the CSV (None: ``<out name>.sharpness.csv`` next to ``out``).
        hessian: Hessian reports (JSON), one per surface in order, each of the surface's model:
            their top eigenvalue, trace and its standard error become the columns
            ``top_eigenvalue``, ``trace``, ``trace_stderr`` (NaN, an empty cell, where absent).
        radius: radius of the loss rise, in direction units (None: half the grid's half-width).
        fit_radius: radius of the quadratic fit for the curvature (None: two grid steps).
        kind: as for ``plot``, without spectrum.
        field: as for ``plot``.
        log: as for ``plot``.
        zmin: as for ``plot``.
        zmax: as for ``plot``.
        cmap: as for ``plot``.
        levels: as for ``plot``.
        title: as for ``plot`` (None: the field and the labels).
        overwrite: replace outputs that are not this figure or table.
        value_range: as for ``plot``: give figures shown side by side the same one.
        interactive: as for ``plot``.

    Returns:
        With ``out``: the CSV's rows, one dict per surface (``sharpness.COLUMNS``, and
        ``HESSIAN_COLUMNS`` with ``hessian``).  Without: the figure object.

    Raises:
        UsageError: surfaces that cannot be compared, reports not one per surface or of another
            model, or outputs that may not be written.
    """
    from ..surface import sharpness

    style = dict(kind=kind, field=field, log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title,
                 radius=radius, fit_radius=fit_radius, value_range=value_range)
    labels = None if labels is None else list(labels)
    if out is None:
        _reports(hessian, paths)  # refused as with an output, though nothing shows them
        return compare_figure(list(paths), labels, _interactive(interactive, kind, list(paths)[0]), **style)[0]
    out = check_output_path(out, "out", FIGURE_SUFFIXES)
    csv = check_output_path(default_csv_path(out) if csv is None else csv, "csv", (".csv",))
    check_distinct_paths({"out": out, "csv": csv}, {"paths": list(paths), "hessian": list(hessian or [])})
    # The figure and its table are one result: drawn aside, they move into place together.
    with _figure_claim(out, "compare", paths, overwrite), \
            _figure_claim(staged_path(out), "compare", paths, True) as claim, \
            claim_output(csv, "table", overwrite=overwrite, columns=sharpness.COLUMNS[:4]):
        reports = _reports(hessian, paths)
        rows = compare_surfaces(list(paths), labels, staged_path(out), csv=False, claim=claim, **style)
        columns = sharpness.COLUMNS
        if reports is not None:
            from ..curvature.report import report_numbers

            for row, report in zip(rows, reports):
                row.update(report_numbers(report))
            columns = sharpness.COLUMNS + HESSIAN_COLUMNS
        sharpness.write_csv(rows, staged_path(csv), columns)
        replace_together([(staged_path(csv), csv), (staged_path(out), out)])
    return rows


def _reports(hessian, surfaces) -> Optional[list]:
    """The Hessian reports joined to ``surfaces`` (one each, of the surface's model), or None."""
    from ..curvature.report import load_report

    if hessian is None:
        return None
    hessian = [str(p) for p in hessian]
    if any(not p.strip() for p in hessian) or len(hessian) != len(surfaces):
        raise UsageError(f"{len(hessian)} Hessian report(s) for {len(surfaces)} surface file(s); give one "
                         "`landscape hessian` JSON per surface, in the same order")
    reports = [load_report(p) for p in hessian]
    for report_path, report, surface_path in zip(hessian, reports, surfaces):
        _check_same_model(report_path, report, surface_path)
    return reports


def _check_same_model(report_path, report, surface_path) -> None:
    """A Hessian report joined to a surface must be of the surface's model (when both say which)."""
    from ..identity import MODEL_KEY, same_model
    from ..surface.file import read_surface

    made_for = str((report.get("settings") or {}).get(MODEL_KEY) or "")
    surface_model = str(read_surface(surface_path).settings.get(MODEL_KEY) or "")
    if same_model(made_for, surface_model) is False:  # None: one says nothing, or two fingerprint versions
        raise UsageError(f"Hessian report '{report_path}' is of another model (model fingerprint {made_for}) than "
                         f"surface '{surface_path}' ({surface_model}); give the report of the surface's model")


def format_curvature(rows) -> str:
    """The curvature columns of ``compare``'s rows as a text table (label, top eigenvalue, trace ± stderr)."""
    lines = [f"{'label':<24} {'top eigenvalue':>15} {'trace':>12} {'± stderr':>10}"]
    for row in rows:
        lines.append(f"{str(row['label'])[:24]:<24} {row['top_eigenvalue']:>15.6g} {row['trace']:>12.6g} "
                     f"{row['trace_stderr']:>10.2g}")
    return "\n".join(lines)
