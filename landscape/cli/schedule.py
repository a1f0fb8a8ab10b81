"""``landscape schedule``: a guided dropout schedule (JSON) from a Fisher file and a model."""

from ..errors import UsageError
from . import options
from .common import add_model_args, add_overwrite_arg, claim, load_model_from_args


def register(subparsers):
    parser = subparsers.add_parser(
        "schedule", help="guided dropout schedule from a Fisher file",
        description="Score every dropout site of the model by the element-weighted mean Fisher of the "
                    "parameters it drops, sort ascending and give the lowest-scored site --p-upper, the "
                    "highest --p-lower (paper eq. 9-10 for --shape linear).")
    parser.add_argument("fisher", help="Fisher file (safetensors) written by `landscape fisher`")
    add_model_args(parser)
    parser.add_argument("--p-upper", type=options.BELOW_ONE, default=0.1, help="probability of the lowest-scored site")
    parser.add_argument("--p-lower", type=options.BELOW_ONE, default=0.0, help="probability of the highest-scored site")
    parser.add_argument("--shape", default="linear", choices=["linear", "log", "power"],
                        help="linear in rank (paper), normalized log score, or a power of the rank")
    parser.add_argument("--gamma", type=options.POSITIVE, default=2.0, help="exponent of --shape power")
    parser.add_argument("--out", required=True, help="schedule JSON to write")
    add_overwrite_arg(parser, "replace an --out that is not a dropout schedule (default: refuse)")
    parser.set_defaults(func=run)
    return parser


def run(args):
    from ..files import check_output_path
    from ..fisher import check_fisher_model, load_fisher
    from ..guided import schedule
    from ..identity import model_fingerprint

    check_output_path(args.out, "--out", [".json"])
    claim(args, args.out, "schedule")
    if not args.gamma > 0:  # also refuses NaN
        raise UsageError(f"--gamma must be positive, got {args.gamma}")
    fisher, meta = load_fisher(args.fisher)
    loaded = load_model_from_args(args, allow_new_head=True)  # the model only gives shapes and sites
    weights = model_fingerprint(loaded)
    check_fisher_model(args.fisher, meta, weights, args.model)
    sched = schedule.guided_dropout(loaded.model, fisher, p_upper=args.p_upper, p_lower=args.p_lower,
                                    shape=args.shape, gamma=args.gamma, model_source=loaded.source,
                                    fisher_source=str(args.fisher), model_fingerprint=weights)
    schedule.save_schedule(sched, args.out)
    print(schedule.format_table(sched))
    if sched.unscored:
        print(f"not scored (no Fisher entries), left unchanged: {', '.join(sched.unscored)}")
    print(f"wrote {args.out}")
    return 0
