"""surface."""

from ..settings import SurfaceSettings
from .generated import add_output_arguments, add_settings_arguments, settings_from_args


def register(subparsers):
    parser = subparsers.add_parser(
        "surface", help="loss grid along directions (resumable HDF5)",
        description="Loss and token accuracy at every point of a 1D or 2D grid along the directions of a "
                    "direction file. Rerunning the same command resumes; under torchrun the grid is "
                    "sharded over ranks.")
    add_settings_arguments(parser, SurfaceSettings)
    add_output_arguments(parser, "surface file to write or resume (.h5)")
    parser.set_defaults(func=run_surface, applies_threads=True)


def run_surface(args):
    from ..runtime import rank_and_world
    from ..surface import run_surface as surface_stage

    result = surface_stage(settings_from_args(SurfaceSettings, args), out=args.out, overwrite=args.overwrite,
                           progress=not args.quiet)
    if rank_and_world()[0] == 0:
        print(f"wrote {result.path}: {result.computed} point(s) computed now, {result.total} in the grid")
    return 0
