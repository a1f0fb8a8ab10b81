"""``landscape schedule``: a guided dropout schedule (JSON) from a Fisher file and a model."""

from ..errors import UsageError
from .common import add_model_args, load_model_from_args


def register(subparsers):
    parser = subparsers.add_parser(
        "schedule", help="guided dropout schedule from a Fisher file",
        description="Score every dropout site of the model by the element-weighted mean Fisher of the "
                    "parameters it drops, sort ascending and give the lowest-scored site --p-upper, the "
                    "highest --p-lower (paper eq. 9-10 for --shape linear).")
    parser.add_argument("fisher", help="Fisher file (safetensors) written by `landscape fisher`")
    add_model_args(parser)
    parser.add_argument("--p-upper", type=float, default=0.1, help="probability of the lowest-scored site")
    parser.add_argument("--p-lower", type=float, default=0.0, help="probability of the highest-scored site")
    parser.add_argument("--shape", default="linear", choices=["linear", "log", "power"],
                        help="linear in rank (paper), normalized log score, or a power of the rank")
    parser.add_argument("--gamma", type=float, default=2.0, help="exponent of --shape power")
    parser.add_argument("--lora", nargs="?", const="", default=None, metavar="SPEC",
                        help="guided LoRA dropout (needs landscape[lora]): one site per module LoRA adapts, named "
                             "by the base module and scored by its Fisher, so the schedule serves any rank. The "
                             "modules: those of a PEFT adapter --model (give --lora alone), or SPEC on the base "
                             "model, as `finetune --lora`, e.g. targets=q_proj,v_proj (default: dropout sites)")
    parser.add_argument("--out", required=True, help="schedule JSON to write")
    parser.set_defaults(func=run)
    return parser


def run(args):
    from ..files import check_output_path
    from ..fisher import load_fisher
    from ..guided import lora, schedule

    check_output_path(args.out, "--out", [".json"])
    if not args.gamma > 0:  # also refuses NaN
        raise UsageError(f"--gamma must be positive, got {args.gamma}")
    fisher, _ = load_fisher(args.fisher)
    loaded = load_model_from_args(args, allow_new_head=True)  # the model only gives shapes and sites
    make, model = schedule.guided_dropout, loaded.model
    if args.lora is not None:
        make, model = lora.lora_schedule, _lora_model(loaded, args.lora)
    sched = make(model, fisher, p_upper=args.p_upper, p_lower=args.p_lower, shape=args.shape, gamma=args.gamma,
                 model_source=loaded.source, fisher_source=str(args.fisher))
    schedule.save_schedule(sched, args.out)
    print(schedule.format_table(sched))
    if sched.unscored:
        print(f"not scored (no Fisher entries), left unchanged: {', '.join(sched.unscored)}")
    print(f"wrote {args.out}")
    return 0


def _lora_model(loaded, spec):
    """The PeftModel whose LoRA modules are the schedule's sites: the adapter --model, or the base
    wrapped with LoRA of ``spec``."""
    from ..guided import lora

    lora.require_peft("--lora")
    if lora.is_peft_model(loaded.model):
        if spec:
            raise UsageError("--model is a PEFT adapter: its LoRA modules are the sites; give --lora without a SPEC")
        return loaded.model
    task = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS"}.get(loaded.kind)
    return lora.wrap(loaded.model, lora.parse_lora_spec(spec), task)
