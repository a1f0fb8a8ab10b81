"""``landscape finetune``: fine-tune with guided dropout against the regularizers it replaces."""

from pathlib import Path

from ..defaults import FINETUNE_EMBEDDED, FINETUNE_LORA_LR, FINETUNE_PAPER
from ..errors import UsageError
from ..files import check_output_path
from .common import floats


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
    p.add_argument("--p-upper", type=float, default=0.1, help="guided schedule from --fisher: upper bound")
    p.add_argument("--p-lower", type=float, default=0.0, help="guided schedule from --fisher: lower bound")
    p.add_argument("--fractions", default="1.0", help="training-set fractions, e.g. 1,0.5,0.25,0.1")
    p.add_argument("--restarts", type=int, default=6,
                   help="restart seeds per fraction (default 6: with n restarts the exact paired Wilcoxon p cannot "
                        "go below 2/2^n, so 6 is the fewest that can reach p < 0.05)")
    p.add_argument("--seed", type=int, default=0, help="first restart seed")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/test split")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share when the dataset has one split")
    p.add_argument("--max-train", type=int, default=None,
                   help=f"cap on training rows at fraction 1 {_by_model('max_train')}")
    p.add_argument("--max-test", type=int, default=None, help=f"cap on test rows {_by_model('max_test')}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate {_by_model('lr')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per step {_by_model('batch_size')}")
    p.add_argument("--seq-len", type=int, default=None, help=f"max tokens per example {_by_model('seq_len')}")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training rows")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up share of all steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--dropout", type=float, default=0.1, help="standard/Gaussian dropout probability")
    p.add_argument("--r3f-lambda", type=float, default=1.0,
                   help="r3f/r4f: weight of the symmetric KL between the outputs on clean and on noised embeddings")
    p.add_argument("--r3f-sigma", type=float, default=1e-5, help="r3f/r4f: scale of the embedding noise")
    p.add_argument("--r3f-noise", default="normal", choices=["normal", "uniform"],
                   help="r3f/r4f: distribution of the embedding noise")
    p.add_argument("--mixout-p", type=float, default=0.9,
                   help="mixout: probability of mixing a body weight back to its pretrained value")
    p.add_argument("--childtuning-reserve", type=float, default=0.3,
                   help="ChildTuning-D: share of the body's elements that train, those with the highest task "
                        "Fisher on the run's training subset")
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
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch; 0 = torch's choice; 1 is much faster on a busy machine")
    p.add_argument("--out", required=True,
                   help="summary CSV: per regularizer, fraction and metric the mean, IQR, and the paired "
                        "difference from dropout (diff_vs_dropout, ci_low, ci_high, p_value)")
    p.add_argument("--runs-out", default=None,
                   help="per-run CSV, also the sweep's journal (default: <out>_runs.csv)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the per-run CSV afresh instead of resuming it (needed when settings changed; "
                        "default: resume)")
    p.add_argument("--plot", default=None, help="figure (.png/.pdf/.svg; default: <out>.png)")
    p.set_defaults(func=run)
    return p


def _by_model(key):
    """'(default: E on the embedded model, P with --model)' for a setting that depends on the model."""
    paper = FINETUNE_PAPER[key]
    return (f"(default: {FINETUNE_EMBEDDED[key]} on the embedded model, "
            f"{'all' if paper is None else paper} with --model, as in the paper)")


def _check(args, regularizers, fractions):
    from ..guided.training import REGULARIZERS

    unknown = [r for r in regularizers if r not in REGULARIZERS]
    if unknown or not regularizers:
        raise UsageError(f"unknown regularizer '{(unknown or [''])[0]}'; use any of {', '.join(REGULARIZERS)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UsageError(f"--fractions must be in (0, 1]; got {args.fractions}")
    if args.restarts < 1 or args.epochs < 1:
        raise UsageError("--restarts and --epochs must be at least 1")
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    if "mixout" in regularizers and not 0.0 <= args.mixout_p < 1.0:
        raise UsageError(f"--mixout-p must be in [0, 1), got {args.mixout_p}")
    if "childtuning" in regularizers and not 0.0 < args.childtuning_reserve <= 1.0:
        raise UsageError(f"--childtuning-reserve must be in (0, 1], got {args.childtuning_reserve}")
    if args.lora is not None:
        from ..guided import lora

        lora.require_peft("--lora")
        lora.parse_lora_spec(args.lora)
        lora.check_lora_regularizers(regularizers)


def _outputs(args):
    """(summary CSV, per-run CSV, figure), each checked writable before anything trains."""
    out = Path(args.out)
    runs_out = Path(args.runs_out) if args.runs_out else out.with_name(out.stem + "_runs.csv")
    plot_out = Path(args.plot) if args.plot else out.with_suffix(".png")
    check_output_path(out, "--out", [".csv"])
    check_output_path(runs_out, "--runs-out", [".csv"])
    check_output_path(plot_out, "--plot", [".png", ".pdf", ".svg"])
    return out, runs_out, plot_out


def _config(args):
    from ..guided.training import FinetuneConfig
    from ..models import resolve_device

    defaults = FINETUNE_EMBEDDED if args.model is None else FINETUNE_PAPER
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    lr = FINETUNE_LORA_LR if args.lora is not None and args.lr is None else pick(args.lr, "lr")
    config = FinetuneConfig(lr=lr, batch_size=pick(args.batch_size, "batch_size"),
                            seq_len=pick(args.seq_len, "seq_len"), epochs=args.epochs, warmup=args.warmup,
                            weight_decay=args.weight_decay, dropout=args.dropout, r3f_lambda=args.r3f_lambda,
                            r3f_sigma=args.r3f_sigma, r3f_noise=args.r3f_noise, mixout_p=args.mixout_p,
                            childtuning_reserve=args.childtuning_reserve, device=str(resolve_device(args.device)),
                            lora=args.lora)
    return config, pick(args.max_train, "max_train"), pick(args.max_test, "max_test")


def _probe(args, regularizers, train_data):
    """Load the classifier once before the first run trains: (the guided schedule, from --schedule or
    --fisher, checked against the model, or None; the model's dropout site names)."""
    from ..guided import schedule
    from ..guided.sites import find_sites
    from ..guided.training import SCHEDULE_REGULARIZERS, check_regularizers, load_classifier

    needs_schedule = [r for r in regularizers if r in SCHEDULE_REGULARIZERS]
    if needs_schedule and not (args.schedule or args.fisher):
        try:
            check_regularizers(regularizers, None)
        except UsageError as err:
            raise UsageError(f"{err}: give --schedule schedule.json or --fisher F.safetensors") from None
    model, _ = load_classifier(args.model, train_data, "cpu")
    if args.lora is not None:
        from ..guided import lora

        model = lora.wrap_classifier(model, args.lora)
        sites = list(lora.lora_modules(model))
    else:
        sites = [s.name for s in find_sites(model)]
    if not needs_schedule:
        return None, sites
    guided = schedule.schedule_from_args(model, schedule_path=args.schedule, fisher_path=args.fisher,
                                         p_upper=args.p_upper, p_lower=args.p_lower)
    if args.lora is not None:
        lora.lora_probabilities(model, "guided", 0.0, guided)  # refuses a schedule for other LoRA targets
    else:
        schedule.apply(model, guided)  # refuses a schedule made for another model, in one line
    return guided, sites


def run(args):
    import time

    from ..data.labelled import load_labelled, split_train_test, subsample
    from ..files import write_csv
    from ..guided import sweep
    from ..guided.metrics import metrics_for

    regularizers = [r.strip() for r in args.regularizer.split(",") if r.strip()]
    fractions = floats(args.fractions, "--fractions")
    _check(args, regularizers, fractions)
    out, runs_out, plot_out = _outputs(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config, max_train, max_test = _config(args)
    train_data, test_data = load_labelled(args.dataset, args.text_column, args.label_column, args.pair_column,
                                          args.task)
    if train_data.skipped:
        print(f"skipped {train_data.skipped} row(s) without a text or a label")
    if test_data is None:
        train_data, test_data = split_train_test(train_data, args.test_fraction, args.split_seed)
    if max_test is not None and len(test_data) > max_test:
        test_data = subsample(test_data, 1.0, args.split_seed, cap=max_test)
    metrics = metrics_for(train_data.task)
    metric = args.metric or metrics[0]
    if metric not in metrics:
        raise UsageError(f"--metric {metric} does not fit a {train_data.task} task; use one of {', '.join(metrics)}")
    guided, sites = _probe(args, regularizers, train_data)
    from ..guided.training import DROPOUT_ONLY_REGULARIZERS

    idle = [r for r in regularizers if r in DROPOUT_ONLY_REGULARIZERS]
    if not sites and idle:
        print(f"note: this model has no dropout sites, so {', '.join(idle)} train exactly like 'none'")
    print(f"{train_data.task}: {min(len(train_data), max_train or len(train_data))} training rows at fraction 1, "
          f"{len(test_data)} test rows; lr {config.lr}, batch {config.batch_size}, seq len {config.seq_len}, "
          f"{config.epochs} epochs, device {config.device}" + (f", LoRA {config.lora}" if config.lora else ""))
    started = time.perf_counter()
    rows = sweep.data_paucity(args.model, train_data, test_data, regularizers, fractions, args.restarts, config,
                              guided, args.save_models, args.seed, max_train, runs_path=runs_out,
                              overwrite=args.overwrite, log=print)
    summary = sweep.summarize_runs(rows, metrics)
    write_csv(summary, out)
    sweep.plot_paucity(summary, metric, plot_out, title=f"{Path(args.dataset or 'movie snippets').name}: "
                                                       f"{args.restarts} restarts")
    print(sweep.format_summary(summary, metric))
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s; wrote {out}, {runs_out}, {plot_out}")
    return 0
