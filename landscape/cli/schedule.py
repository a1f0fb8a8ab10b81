"""``landscape schedule``: a guided dropout schedule (JSON) from a Fisher file and a model."""

from ..settings import ScheduleSettings
from .generated import add_output_arguments, add_settings_arguments, settings_from_args


def register(subparsers):
    parser = subparsers.add_parser(
        "schedule", help="guided dropout schedule from a Fisher file",
        description="Score every dropout site of the model by the element-weighted mean Fisher of the "
                    "parameters it drops, sort ascending and give the lowest-scored site --p-upper, the "
                    "highest --p-lower (paper eq. 9-10 for --shape linear).")
    add_settings_arguments(parser, ScheduleSettings)
    add_output_arguments(parser, "schedule JSON to write",
                         overwrite_help="replace an --out that is not a dropout schedule (default: refuse)")
    parser.set_defaults(func=run, applies_threads=True)
    return parser


def run(args):
    from ..guided.schedule import format_table
    from ..guided.schedule_stage import run_schedule

    sched = run_schedule(settings_from_args(ScheduleSettings, args), out=args.out, overwrite=args.overwrite).schedule
    print(format_table(sched))
    if sched.unscored:
        print(f"not scored (no Fisher entries), left unchanged: {', '.join(sched.unscored)}")
    print(f"wrote {args.out}")
    return 0
