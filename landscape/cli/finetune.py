"""``landscape finetune``: fine-tune with guided dropout against the regularizers it replaces."""

from ..defaults import FINETUNE_EMBEDDED, FINETUNE_PAPER
from . import options
from .common import add_threads_arg


def register(subparsers):
    p = subparsers.add_parser(
        "finetune", help="fine-tune with guided dropout against baselines (data-paucity sweep)",
        description="Fine-tune for sequence classification/regression once per regularizer, training-set "
                    "fraction and restart seed; write per-run and summary CSVs (mean, IQR, and each regularizer "
                    "minus dropout paired over the same restarts: mean difference, bootstrap 95% CI, Wilcoxon p) "
                    "and a plot (stars: p < 0.05 and CI excluding 0). The per-run CSV is a journal: rerunning the "
                    "same command skips finished runs; changed settings are refused unless --overwrite. "
                    "Without --model/--dataset: the embedded model on the embedded movie-snippet sentiment set.")
    p.add_argument("--model", default=None,
                   help="HF model id or from_pretrained folder (default: the embedded model)")
    p.add_argument("--dataset", default=None,
                   help="CSV/TSV/JSONL with text and label columns, or a HF dataset name/folder "
                        "(default: the embedded sentiment set)")
    p.add_argument("--text-column", default="text", help="column of the text, the first of a pair")
    p.add_argument("--pair-column", default=None,
                   help="second text column for sentence-pair tasks (default: single texts)")
    p.add_argument("--label-column", default="label", help="column of the label")
    p.add_argument("--task", default="auto", choices=["auto", "classification", "regression"],
                   help="auto: classification for non-numeric labels or integers with at most max(20, rows/50) "
                        "distinct values, regression otherwise")
    p.add_argument("--regularizer", default="dropout,gaussian,guided,r3f",
                   help="comma-separated: none, dropout, gaussian, guided, dropout-matched (uniform at the guided "
                        "schedule's mean p), guided-shuffled (the schedule's probabilities on a random permutation "
                        "of its sites, a new one per restart seed), r3f, r4f, mixout, childtuning (ChildTuning-D). "
                        "guided, dropout-matched and guided-shuffled need --schedule or --fisher; dropout is the "
                        "baseline of the paired statistics")
    p.add_argument("--schedule", default=None,
                   help="guided dropout schedule JSON (from `landscape schedule`; default: made from --fisher)")
    p.add_argument("--fisher", default=None, help="pretraining Fisher file to compute the guided schedule from "
                                                  "instead (default: none; give it or --schedule for guided)")
    p.add_argument("--p-upper", type=options.BELOW_ONE, default=0.1, help="guided schedule from --fisher: upper bound")
    p.add_argument("--p-lower", type=options.BELOW_ONE, default=0.0, help="guided schedule from --fisher: lower bound")
    p.add_argument("--fractions", type=options.FRACTIONS, default="1.0",
                   help="training-set fractions, e.g. 1,0.5,0.25,0.1")
    p.add_argument("--restarts", type=options.RESTARTS, default=6,
                   help="restart seeds per fraction (6: with n restarts the exact paired Wilcoxon p cannot go "
                        "below 2/2^n, so 6 is the fewest that can reach p < 0.05)")
    p.add_argument("--seed", type=options.SEED, default=0, help="first restart seed")
    p.add_argument("--split-seed", type=options.SEED, default=0, help="seed of the fixed train/test split")
    p.add_argument("--test-fraction", type=options.OPEN_UNIT, default=0.2,
                   help="test share when the dataset has one split")
    p.add_argument("--max-train", type=options.POSITIVE_INT, default=None,
                   help=f"cap on training rows at fraction 1 {_by_model('max_train')}")
    p.add_argument("--max-test", type=options.POSITIVE_INT, default=None,
                   help=f"cap on test rows {_by_model('max_test')}")
    p.add_argument("--lr", type=options.POSITIVE, default=None, help=f"peak learning rate {_by_model('lr')}")
    p.add_argument("--batch-size", type=options.POSITIVE_INT, default=None,
                   help=f"examples per step {_by_model('batch_size')}")
    p.add_argument("--seq-len", type=options.SEQ_LEN, default=None,
                   help=f"max tokens per example {_by_model('seq_len')}")
    p.add_argument("--epochs", type=options.EPOCHS, default=3, help="passes over the training rows")
    p.add_argument("--warmup", type=options.SHARE, default=0.1, help="warm-up share of all steps")
    p.add_argument("--weight-decay", type=options.NON_NEGATIVE, default=0.0, help="AdamW weight decay")
    p.add_argument("--dropout", type=options.BELOW_ONE, default=0.1, help="standard/Gaussian dropout probability")
    _add_regularizer_args(p)
    p.add_argument("--metric", default=None, help="metric to plot: accuracy|f1|mcc (classification, default "
                                                  "accuracy) or pearson|spearman (regression, default pearson)")
    p.add_argument("--lora", default=None, metavar="SPEC",
                   help="fine-tune with LoRA (needs peft: pip install 'landscape[lora]') instead of all weights, "
                        "e.g. r=8,alpha=16,targets=q_proj,v_proj (default targets: PEFT's for the architecture; "
                        "alpha 2r). Regularizers then set each LoRA module's lora_dropout: none, dropout, gaussian, "
                        "guided (from --fisher of the base model or a `schedule --lora` file), dropout-matched, "
                        "guided-shuffled; default lr 5e-4 (default: full fine-tuning)")
    p.add_argument("--save-models", default=None,
                   help="save each fine-tuned model under DIR/<reg>_f<frac>_s<seed> (default: not saved; with "
                        "--lora, PEFT adapter folders)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_threads_arg(p)
    p.add_argument("--out", required=True,
                   help="summary CSV: per regularizer, fraction and metric the mean, IQR, and the paired "
                        "difference from dropout (diff_vs_dropout, ci_low, ci_high, p_value)")
    p.add_argument("--runs-out", default=None,
                   help="per-run CSV, also the sweep's journal (default: <out>_runs.csv)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the per-run CSV afresh instead of resuming it (needed when settings changed), "
                        "and replace outputs that hold another kind of file (default: resume, refuse)")
    p.add_argument("--plot", default=None, help="figure (.png/.pdf/.svg; default: <out>.png)")
    p.set_defaults(func=run)
    return p


def _add_regularizer_args(p):
    """The hyper-parameters of the regularizers other than dropout."""
    p.add_argument("--r3f-lambda", type=options.NON_NEGATIVE, default=1.0,
                   help="r3f/r4f: weight of the symmetric KL between the outputs on clean and on noised embeddings")
    p.add_argument("--r3f-sigma", type=options.POSITIVE, default=1e-5, help="r3f/r4f: scale of the embedding noise")
    p.add_argument("--r3f-noise", default="normal", choices=["normal", "uniform"],
                   help="r3f/r4f: distribution of the embedding noise")
    p.add_argument("--mixout-p", type=options.BELOW_ONE, default=0.9,
                   help="mixout: probability of mixing a body weight back to its pretrained value")
    p.add_argument("--childtuning-reserve", type=options.FRACTION, default=0.3,
                   help="ChildTuning-D: share of the body's elements that train, those with the highest task "
                        "Fisher on the run's training subset")


def _by_model(key):
    """'(default: E on the embedded model, P with --model)' for a setting that depends on the model."""
    paper = FINETUNE_PAPER[key]
    return (f"(default: {FINETUNE_EMBEDDED[key]} on the embedded model, "
            f"{'all' if paper is None else paper} with --model, as in the paper)")


def run(args):
    from ..errors import UsageError
    from ..guided import sweep
    from ..guided.finetune import SETTINGS, ScheduleMissing, run_finetune

    try:
        result = run_finetune(log=print, **{name: getattr(args, name) for name in SETTINGS})
    except ScheduleMissing as err:
        raise UsageError(f"{err.reason}: give --schedule schedule.json or --fisher F.safetensors") from None
    print(sweep.format_summary(result.summary, result.metric))
    print(f"{len(result.rows)} runs in {result.seconds:.0f} s; wrote {result.out}, {result.runs_out}, {result.plot}")
    return 0
