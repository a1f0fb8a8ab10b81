"""plot, compare: the command line of ``plots.plot`` and ``plots.compare``."""

from ..errors import UsageError
from . import options
from .common import add_overwrite_arg


def register(subparsers):
    _register_plot(subparsers)
    _register_compare(subparsers)


def _add_style_args(parser, kinds_help):
    parser.add_argument("--out", required=True, help="output file: .html (interactive, offline), .png or .pdf")
    parser.add_argument("--kind", default="auto", help=kinds_help)
    parser.add_argument("--field", default="train_loss",
                        help="dataset to draw: train_loss | train_acc | test_loss | test_acc")
    parser.add_argument("--log", action="store_true", help="log scale for the values (default: linear)")
    parser.add_argument("--zmin", type=options.FINITE, default=None,
                        help="clip values below this (default: no clipping)")
    parser.add_argument("--zmax", type=options.FINITE, default=None,
                        help="clip values above this (default: no clipping)")
    parser.add_argument("--cmap", default="viridis", help="matplotlib colour map name")
    parser.add_argument("--levels", type=options.CONTOUR_LEVELS, default=20, help="contour levels")
    parser.add_argument("--title", default=None, help="figure title (default: from the file names)")
    add_overwrite_arg(parser, "replace an --out (or --csv) that is not a figure (or table) of these inputs "
                              "(default: refuse; a figure of the same inputs is redrawn)")


def _style_kwargs(args):
    return dict(kind=args.kind, field=args.field, log=args.log, zmin=args.zmin, zmax=args.zmax,
                cmap=args.cmap, levels=args.levels, title=args.title, overwrite=args.overwrite)


def _register_plot(subparsers):
    parser = subparsers.add_parser("plot", help="render a surface file (3D surface, contour, heatmap, 1D curve)")
    parser.add_argument("surface", help="surface HDF5 file (also from the original loss-landscape code); "
                                        "for --kind spectrum, a `landscape hessian` JSON report")
    _add_style_args(parser, "auto | surface3d | contour | contourf | heatmap (2D) | line (1D) | spectrum "
                            "(Hessian density; --log: log density); auto = surface3d for 2D, line for 1D; "
                            "contours of a trajectory plane show its checkpoints")
    parser.set_defaults(func=_run_plot)


def _run_plot(args):
    from ..plots import plot

    drawn = plot(args.surface, args.out, **_style_kwargs(args))
    print(f"wrote {drawn['path']}" + (" (with the trajectory's checkpoints)" if drawn["trajectory"] else ""))


def _register_compare(subparsers):
    parser = subparsers.add_parser("compare", help="compare several surface files, with sharpness numbers")
    parser.add_argument("surfaces", nargs="+", help="surface HDF5 files, all 1D or all 2D")
    parser.add_argument("--labels", default=None, help="comma-separated labels, one per file (default: file names)")
    parser.add_argument("--csv", default=None,
                        help="sharpness CSV (default: next to --out, as <out name>.sharpness.csv)")
    parser.add_argument("--radius", type=options.NON_NEGATIVE, default=None,
                        help="radius for the loss rise (default: half the grid's half-width)")
    parser.add_argument("--fit-radius", type=options.POSITIVE, default=None,
                        help="radius of the quadratic fit for the curvature (default: two grid steps)")
    parser.add_argument("--hessian", default=None, metavar="H1.json,H2.json,...",
                        help="`landscape hessian` reports, one per surface in order: their top eigenvalue, trace "
                             "and its standard error become CSV columns top_eigenvalue, trace, trace_stderr "
                             "(default: no curvature columns)")
    _add_style_args(parser, "2D: auto | surface3d | contour | contourf | heatmap (auto = surface3d); 1D: line")
    parser.set_defaults(func=_run_compare)


def parse_labels(text):
    """'a,b,c' -> ['a', 'b', 'c']; None stays None."""
    if text is None:
        return None
    labels = [label.strip() for label in text.split(",")]
    if any(not label for label in labels):
        raise UsageError(f"--labels '{text}' has an empty label; give one non-empty label per file")
    return labels


def _run_compare(args):
    from ..plots import compare
    from ..plots.figures import format_curvature
    from ..plots.surfaces import default_csv_path
    from ..surface.sharpness import format_table

    csv_path = args.csv or default_csv_path(args.out)
    reports = [p.strip() for p in args.hessian.split(",")] if args.hessian else None
    rows = compare(args.surfaces, args.out, labels=parse_labels(args.labels), csv=csv_path, hessian=reports,
                   radius=args.radius, fit_radius=args.fit_radius, **_style_kwargs(args))
    print(format_table(rows))
    if reports:
        print(format_curvature(rows))
    print(f"wrote {args.out} and {csv_path}")
