"""``landscape schedule``: a guided dropout schedule (JSON) from a Fisher file and a model."""

from . import options
from .common import add_model_args, add_overwrite_arg


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
    parser.add_argument("--lora", nargs="?", const="", default=None, metavar="SPEC",
                        help="guided LoRA dropout (needs landscape[lora]): one site per module LoRA adapts, named "
                             "by the base module and scored by its Fisher, so the schedule serves any rank. The "
                             "modules: those of a PEFT adapter --model (give --lora alone), or SPEC on the base "
                             "model, as `finetune --lora`, e.g. targets=q_proj,v_proj (default: dropout sites)")
    parser.add_argument("--out", required=True, help="schedule JSON to write")
    add_overwrite_arg(parser, "replace an --out that is not a dropout schedule (default: refuse)")
    parser.set_defaults(func=run)
    return parser


def run(args):
    from ..guided.schedule import format_table
    from ..guided.schedule_stage import run_schedule

    sched = run_schedule(args.fisher, args.out, args.model, p_upper=args.p_upper, p_lower=args.p_lower,
                         shape=args.shape, gamma=args.gamma, dtype=args.dtype, device=args.device,
                         lora=args.lora, overwrite=args.overwrite)
    print(format_table(sched))
    if sched.unscored:
        print(f"not scored (no Fisher entries), left unchanged: {', '.join(sched.unscored)}")
    print(f"wrote {args.out}")
    return 0
