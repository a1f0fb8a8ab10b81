"""``landscape finetune``: fine-tune with guided dropout against the regularizers it replaces."""

from ..settings import FinetuneSettings
from .generated import add_output_arguments, add_settings_arguments, settings_from_args


def register(subparsers):
    p = subparsers.add_parser(
        "finetune", help="fine-tune with guided dropout against baselines (data-paucity sweep)",
        description="Fine-tune for sequence classification/regression once per regularizer, training-set "
                    "fraction and restart seed; write per-run and summary CSVs (mean, IQR, and each regularizer "
                    "minus dropout paired over the same restarts: mean difference, bootstrap 95% CI, Wilcoxon p) "
                    "and a plot (stars: p < 0.05 and CI excluding 0). The per-run CSV is a journal: rerunning the "
                    "same command skips finished runs; changed settings are refused unless --overwrite. "
                    "Without --model/--dataset: the embedded model on the embedded movie-snippet sentiment set.")
    add_settings_arguments(p, FinetuneSettings)
    p.add_argument("--save-models", default=None,
                   help="save each fine-tuned model under DIR/<reg>_f<frac>_s<seed> (default: not saved; with "
                        "--lora, PEFT adapter folders)")
    add_output_arguments(p, "summary CSV: per regularizer, fraction and metric the mean, IQR, and the paired "
                            "difference from dropout (diff_vs_dropout, ci_low, ci_high, p_value)",
                         overwrite_help="start the per-run CSV afresh instead of resuming it (needed when settings "
                                        "changed), and replace outputs that hold another kind of file (default: "
                                        "resume, refuse)")
    p.add_argument("--runs-out", default=None,
                   help="per-run CSV, also the sweep's journal (default: <out>_runs.csv)")
    p.add_argument("--plot", default=None, help="figure (.png/.pdf/.svg; default: <out>.png)")
    p.set_defaults(func=run, applies_threads=True)
    return p


def run(args):
    from ..errors import UsageError
    from ..guided import sweep
    from ..guided.finetune import ScheduleMissing, run_finetune

    try:
        result = run_finetune(settings_from_args(FinetuneSettings, args), out=args.out, runs_out=args.runs_out,
                              plot=args.plot, save_models=args.save_models, overwrite=args.overwrite, log=print)
    except ScheduleMissing as err:
        raise UsageError(f"{err.reason}: give --schedule schedule.json or --fisher F.safetensors") from None
    print(sweep.format_summary(result.summary, result.metric))
    print(f"{len(result.rows)} runs in {result.seconds:.0f} s; wrote {result.path}, {result.runs_out}, {result.plot}")
    return 0
