"""The figure stage as one call each: ``plot`` and ``compare``.

``plot`` draws one surface, or a Hessian report's spectral density; ``compare`` draws several
surfaces with their sharpness numbers, and the curvature of Hessian reports as extra CSV columns.
What ``landscape plot`` and ``landscape compare`` do.

Both claim their outputs (``outputs.claim_output``): a figure of other inputs, or a file that is
not a figure (or not this table), is refused unless ``overwrite``; a figure of the same inputs is
redrawn.  The claim's settings (the command and the inputs' absolute paths) are stamped into the
figure: the claim is passed to the writer.
"""

import os
from typing import List, Optional, Sequence

from ..errors import UsageError
from ..files import PathLike, check_distinct_paths, check_output_path, replace_together, staged_path
from ..outputs import claim_output
from .surfaces import FORMATS, KINDS_2D, compare_surfaces, default_csv_path, plot_surface

HESSIAN_COLUMNS = ("top_eigenvalue", "trace", "trace_stderr")
FIGURE_SUFFIXES = tuple(f".{f}" for f in FORMATS)
PLOT_KINDS = ("auto", "surface3d", "contour", "contourf", "heatmap", "line", "spectrum")


def _figure_claim(out, command: str, inputs: Sequence, overwrite: bool):
    return claim_output(out, "figure", overwrite=overwrite,
                        settings={"command": command, "inputs": [os.path.abspath(p) for p in inputs]})


def plot(path: PathLike, out: PathLike, kind: str = "auto", field: str = "train_loss", log: bool = False,
         zmin: Optional[float] = None, zmax: Optional[float] = None, cmap: str = "viridis", levels: int = 20,
         title: Optional[str] = None, overwrite: bool = False) -> dict:
    """Draw one surface file, or the spectral density of a Hessian report, to ``out``.

    Contours (and heatmaps) of a surface along a trajectory's PCA plane show its checkpoints,
    labelled and joined in training order.

    Args:
        path: a surface HDF5 file (also the original loss-landscape code's); for ``kind='spectrum'``
            a Hessian report (JSON).
        out: the figure: .html (interactive, offline), .png or .pdf.
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

    Returns:
        {"path": the figure's Path, "kind": the kind drawn, "trajectory": whether checkpoints of
        a trajectory are drawn on it}.

    Raises:
        UsageError: an unknown kind or format, an input that cannot be read or has nothing to
            draw, or an output that may not be written.
    """
    from .spectrum import plot_spectrum
    from .trajectory import plot_with_trajectory

    if kind not in PLOT_KINDS:
        raise UsageError(f"unknown plot kind '{kind}'; use one of {', '.join(PLOT_KINDS)}")
    out = check_output_path(out, "out", FIGURE_SUFFIXES)
    check_distinct_paths({"out": out}, {"path": path})
    with _figure_claim(out, "plot", [path], overwrite) as claim:
        if kind == "spectrum":
            return {"path": plot_spectrum(path, out, log=log, title=title, claim=claim), "kind": kind,
                    "trajectory": False}
        style = dict(field=field, log=log, zmin=zmin, zmax=zmax, cmap=cmap, levels=levels, title=title, claim=claim)
        if kind in KINDS_2D and kind != "surface3d":
            drawn = plot_with_trajectory(path, out, kind=kind, **style)
            if drawn is not None:
                return {"path": drawn, "kind": kind, "trajectory": True}
        return {"path": plot_surface(path, out, kind=kind, **style), "kind": kind, "trajectory": False}


def compare(paths: Sequence[PathLike], out: PathLike, labels: Optional[Sequence[str]] = None,
            csv: Optional[PathLike] = None, hessian: Optional[Sequence[PathLike]] = None,
            radius: Optional[float] = None, fit_radius: Optional[float] = None, kind: str = "auto",
            field: str = "train_loss", log: bool = False, zmin: Optional[float] = None,
            zmax: Optional[float] = None, cmap: str = "viridis", levels: int = 20, title: Optional[str] = None,
            overwrite: bool = False) -> List[dict]:
    """Draw several surfaces of one dimension together, and write their sharpness numbers as CSV.

    Args:
        paths: surface files, all 1D or all 2D.
        out: the figure (.html, .png or .pdf).
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

    Returns:
        The CSV's rows, one dict per surface (``sharpness.COLUMNS``, and ``HESSIAN_COLUMNS`` with
        ``hessian``).

    Raises:
        UsageError: surfaces that cannot be compared, reports not one per surface or of another
            model, or outputs that may not be written.
    """
    from ..surface import sharpness

    out = check_output_path(out, "out", FIGURE_SUFFIXES)
    csv = check_output_path(default_csv_path(out) if csv is None else csv, "csv", (".csv",))
    check_distinct_paths({"out": out, "csv": csv}, {"paths": list(paths), "hessian": list(hessian or [])})
    # The figure and its table are one result: drawn aside, they move into place together.
    with _figure_claim(out, "compare", paths, overwrite), \
            _figure_claim(staged_path(out), "compare", paths, True) as claim, \
            claim_output(csv, "table", overwrite=overwrite, columns=sharpness.COLUMNS[:4]):
        reports = _reports(hessian, paths)
        rows = compare_surfaces(list(paths), None if labels is None else list(labels), staged_path(out), csv=False,
                                radius=radius, fit_radius=fit_radius, kind=kind, field=field, log=log, zmin=zmin,
                                zmax=zmax, cmap=cmap, levels=levels, title=title, claim=claim)
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
