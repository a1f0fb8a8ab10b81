"""export: a surface file in another tool's format (VTK XML PolyData for ParaView)."""


from ..files import check_output_path
from . import options
from .common import add_overwrite_arg


def register(subparsers):
    parser = subparsers.add_parser(
        "export", help="write a 2D surface as a .vtp file for ParaView (like the original h52vtp.py)",
        description="A 2D surface file as VTK XML PolyData: a point per grid point (x, y, z = the value), a quad "
                    "per grid cell, the value as point data, as the original loss-landscape code's h52vtp.py "
                    "writes it. ParaView opens it directly.")
    parser.add_argument("--vtk", required=True, metavar="S.h5",
                        help="surface file to export (2D, every point computed; ours or the original code's)")
    parser.add_argument("--out", required=True, help="the .vtp file to write")
    parser.add_argument("--field", default="train_loss", choices=("train_loss", "train_acc", "test_loss", "test_acc"),
                        help="dataset to export")
    parser.add_argument("--log", action="store_true",
                        help="z = ln(value + 0.1), as the original's --log (default: z = the value)")
    parser.add_argument("--zmax", type=options.POSITIVE, default=None,
                        help="clip values above this before the log, as the original's --zmax; needed when the "
                             "loss diverged (+inf) somewhere (default: no clipping)")
    add_overwrite_arg(parser)
    parser.set_defaults(func=run_export)


def run_export(args):
    from ..plots.vtk import export_vtp

    out = check_output_path(args.out, "--out", [".vtp"])
    result = export_vtp(args.vtk, out, field=args.field, log=args.log, zmax=args.zmax, overwrite=args.overwrite)
    print(f"wrote {result['path']}: {result['points']} points, {result['polys']} quads ({args.field}"
          f"{', ln(value + 0.1)' if args.log else ''}{f', clipped at {args.zmax:g}' if args.zmax is not None else ''})")
    return 0
