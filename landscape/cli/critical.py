"""critical-sharpness: the command line of ``critical.run_critical_sharpness`` (and of a sweep over checkpoints)."""

from ..settings import CriticalSharpnessSettings
from .generated import add_output_arguments, add_settings_arguments, settings_from_args


def register(subparsers):
    # "resolve": --model is generated once per spec and given again here, repeatable, for a sweep.
    parser = subparsers.add_parser(
        "critical-sharpness", conflict_handler="resolve",
        help="critical sharpness 2/eta_c along an update step, from forward passes only",
        description="Critical sharpness (Kalra et al. 2026): eta_c is the smallest step along the update d at which "
                    "the loss of the sample rises back above its value at the origin, found by a line search of at "
                    "most 10 forward passes to --tolerance; lambda_c = 2/eta_c. d is -grad L (--direction gradient), "
                    "-sign grad L (sign) or a direction file; --update-corpus takes d from another corpus "
                    "(relative critical sharpness). A direction along which the loss rises at once is refused, "
                    "never flipped. Writes a JSON report; rerunning the same command reads it back. Several "
                    "--model (or one folder of checkpoints) write a CSV --out and a figure of lambda_c across them; an "
                    "interrupted sweep rerun with the same settings keeps the checkpoints already measured. Under "
                    "torchrun, --shard-size K shards the model with FSDP2 (--rayleigh then needs --hvp difference and "
                    "--dtype float32, as hessian does).")
    add_settings_arguments(parser, CriticalSharpnessSettings)
    group = next(g for g in parser._action_groups if g.title == "model")
    group.add_argument("--model", dest="source", action="append", metavar="MODEL",
                       help=CriticalSharpnessSettings.__dataclass_fields__["model"].default_factory.__dataclass_fields__
                       ["source"].metadata["help"] + "; give it several times, or a folder of checkpoints, for a "
                       "sweep (CSV --out and a figure)")
    add_output_arguments(parser, "JSON report to write (.json); with several checkpoints the table (.csv)")
    parser.add_argument("--vectors", default=None,
                        help="also write the update direction as walked (no normalization) as a direction file "
                             "(.h5) for `surface --directions` (default: the report only)")
    parser.add_argument("--plot", default=None,
                        help="with several checkpoints: the figure of lambda_c across them (.png, .pdf, .svg) "
                             "(default: --out with .png)")
    parser.set_defaults(func=run, applies_threads=True)
    return parser


def run(args):
    from ..critical_sweep import checkpoints_of
    from ..errors import UsageError

    sources = args.source or [None]
    checkpoints = checkpoints_of(sources) if sources != [None] else sources
    if len(checkpoints) > 1:
        if args.vectors:
            raise UsageError("--vectors writes one model's direction: give one --model")
        return _sweep(args, checkpoints)
    if args.plot:
        raise UsageError("--plot draws a sweep: give several --model (or a folder of checkpoints)")
    args.source = checkpoints[0]
    return _one(args)


def _one(args):
    from ..critical import run_critical_sharpness

    result = run_critical_sharpness(settings_from_args(CriticalSharpnessSettings, args), out=args.out,
                                    vectors=args.vectors, overwrite=args.overwrite, progress=not args.quiet,
                                    log=None if args.quiet else _say)
    report = result.report
    if not _first_rank():  # under torchrun, rank 0 speaks for every rank
        return 0
    if not result.computed:
        print(f"{result.path} is complete with these settings; nothing to do")
    print(f"critical lr {report['critical_lr']:.6g}, critical sharpness {report['critical_sharpness']:.6g} "
          f"({report['forward_passes']} forward passes, loss at the origin {report['loss_at_origin']:.6g})")
    if not report["converged"]:
        print(f"note: the bracket closed to {report['reached']:.3g} relative, not to the tolerance "
              f"{report['tolerance']:g}, within the forward-pass budget")
    if "rayleigh_quotient" in report:
        print(f"Rayleigh quotient d'Hd/d'd {report['rayleigh_quotient']:.6g}")
    if result.computed:
        print(f"wrote {result.path}" + (f" and {result.vectors}" if result.vectors else ""))
    return 0


def _sweep(args, checkpoints):
    from ..critical_sweep import run_critical_sweep

    args.source = None
    settings = settings_from_args(CriticalSharpnessSettings, args)
    result = run_critical_sweep(settings, checkpoints, out=args.out, plot=args.plot, overwrite=args.overwrite,
                                log=None if args.quiet else _say)
    if not _first_rank():
        return 0
    for row in result.rows:
        print(f"{row['checkpoint']}: critical sharpness {row['critical_sharpness']:.6g}")
    kept = result.total - result.computed
    print(f"wrote {result.path} and {result.plot}" + (f" ({kept} of {result.total} checkpoints from the journal "
                                                      "of an earlier run)" if kept else ""))
    return 0


def _first_rank() -> bool:
    from ..runtime import rank_and_world

    return rank_and_world()[0] == 0


def _say(line: str) -> None:
    """One line of the run's log, from rank 0 only (the ranks of a sharded run all log the same steps)."""
    if _first_rank():
        print(line, flush=True)
