"""demo: the whole pipeline on the embedded model and corpus."""

from ..defaults import DemoSettings
from . import options
from .common import add_threads_arg
from .generated import add_quiet_arg


def register(subparsers):
    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo", help="the whole pipeline on the embedded model and corpus",
        description="Fisher → stability → profile → directions → surfaces → figures → guided dropout "
                    "schedule, on the embedded model and corpus.  Stages whose files exist are kept, "
                    "so rerunning continues an interrupted demo.")
    parser.add_argument("--out", default="landscape_demo", help="output folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_threads_arg(parser)
    add_quiet_arg(parser)
    parser.add_argument("--fisher-samples", type=options.POSITIVE_INT, default=defaults.fisher_samples,
                        help="sequences for the Fisher and stability")
    parser.add_argument("--eval-samples", type=options.POSITIVE_INT, default=defaults.eval_samples,
                        help="sequences of the fixed surface evaluation sample")
    parser.add_argument("--grid-2d", type=options.RANGE, default=defaults.grid_2d,
                        help="MIN:MAX:NUM of both axes of the 2D surfaces")
    parser.add_argument("--grid-1d", type=options.RANGE, default=defaults.grid_1d, help="MIN:MAX:NUM of the 1D curves")
    parser.add_argument("--points-per-pass", type=options.POSITIVE_INT, default=defaults.points_per_pass,
                        help="grid points evaluated per forward pass; more helps on a GPU")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute every stage, replacing files in --out that the demo did not write; "
                             "the new run is built beside --out and moved in once complete "
                             "(default: keep finished stages, refuse foreign files)")
    parser.set_defaults(func=run, applies_threads=True)


def run(args):
    from ..demo import run_demo
    from ..runtime import resolve_device

    settings = DemoSettings(fisher_samples=args.fisher_samples, eval_samples=args.eval_samples,
                            grid_2d=args.grid_2d, grid_1d=args.grid_1d, points_per_pass=args.points_per_pass)
    paths = run_demo(args.out, settings, device=resolve_device(args.device), overwrite=args.overwrite,
                     threads=args.threads)
    print(f"\nall results are under {args.out}/:")
    for name in ("figures", "profile", "stability", "schedule", "fisher"):
        print(f"  {name:<10} {paths[name]}")
    return 0
