"""The fine-tuning stage as one call.

``run_finetune`` runs the data-paucity sweep (each regularizer, training-set fraction and restart
seed), then writes the per-run journal, the summary CSV and the figure; ``landscape finetune`` and
Python users call it.

The sweep itself (runs, journal, statistics, figure) lives in ``guided.sweep``; this module turns
settings into it: outputs claimed, the labelled data split, the classifier probed for its dropout
sites, the guided schedule read or computed and checked against the model.
"""

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, List, Optional

from .. import checks
from ..defaults import FINETUNE_EMBEDDED, FINETUNE_LORA_LR, FINETUNE_PAPER
from ..errors import UsageError
from ..files import check_distinct_paths, check_output_folder, check_output_path, staged_path


@dataclass
class FinetuneSettings:
    """Every setting of a sweep (the ``landscape finetune`` options, by the same names).

    ``regularizer`` and ``fractions`` are comma-separated text or lists; ``lr``, ``batch_size``,
    ``seq_len``, ``max_train`` and ``max_test`` left None take the model's defaults
    (``defaults.FINETUNE_EMBEDDED`` for the embedded model, ``FINETUNE_PAPER`` with a ``model``).
    ``lora``, a spec such as "r=8,alpha=16,targets=q_proj,v_proj" (needs peft), fine-tunes LoRA
    adapters instead of all weights; the regularizers then set each LoRA module's ``lora_dropout``
    (``guided.lora``) and ``lr`` left None is ``defaults.FINETUNE_LORA_LR``.
    """

    out: str
    model: Optional[str] = None
    dataset: Optional[str] = None
    text_column: str = "text"
    pair_column: Optional[str] = None
    label_column: str = "label"
    task: str = "auto"
    regularizer: object = "dropout,gaussian,guided,r3f"
    schedule: Optional[str] = None
    fisher: Optional[str] = None
    p_upper: float = 0.1
    p_lower: float = 0.0
    fractions: object = "1.0"
    restarts: int = 6
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = 0.2
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    epochs: int = 3
    warmup: float = 0.1
    weight_decay: float = 0.0
    dropout: float = 0.1
    r3f_lambda: float = 1.0
    r3f_sigma: float = 1e-5
    r3f_noise: str = "normal"
    mixout_p: float = 0.9
    childtuning_reserve: float = 0.3
    metric: Optional[str] = None
    save_models: Optional[str] = None
    device: str = "auto"
    runs_out: Optional[str] = None
    overwrite: bool = False
    plot: Optional[str] = None
    lora: Optional[str] = None


SETTINGS = tuple(f.name for f in fields(FinetuneSettings))


class ScheduleMissing(UsageError):
    """A regularizer built from the guided schedule, without a schedule or a Fisher file to make it.

    ``reason`` is the refusal without the remedy (the command line names its own options).
    """

    def __init__(self, reason: str):
        super().__init__(f"{reason}: give a schedule file (schedule) or a Fisher file (fisher)")
        self.reason = reason


@dataclass
class FinetuneResult:
    """What ``run_finetune`` did.

    ``rows`` (one dict per run, as in the per-run CSV), ``summary``
    (as in the summary CSV), the ``metric`` plotted, the files written, ``seconds`` of the sweep.
    """

    rows: List[dict]
    summary: List[dict]
    metric: str
    out: Path
    runs_out: Path
    plot: Path
    seconds: float


def _listed(value) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]


def _check(s, regularizers):
    """(regularizers, fractions) checked in library terms; the rest is ``FinetuneConfig``'s."""
    from .training import REGULARIZERS

    unknown = [r for r in regularizers if r not in REGULARIZERS]
    if unknown or not regularizers:
        raise UsageError(f"unknown regularizer '{(unknown or [''])[0]}'; use any of {', '.join(REGULARIZERS)}")
    repeat = checks.first_repeat(regularizers)
    if repeat is not None:  # its runs would be trained twice and paired with dropout twice
        raise UsageError(f"regularizer '{repeat}' is listed twice; list each regularizer once")
    fractions = s.fractions if isinstance(s.fractions, str) else ",".join(repr(float(f)) for f in s.fractions)
    checks.RESTARTS.check(s.restarts, "restarts")
    checks.seed(s.seed)
    checks.seed(s.split_seed, "split_seed")
    checks.OPEN_UNIT.check(s.test_fraction, "test_fraction")
    for name in ("max_train", "max_test"):
        checks.optional(checks.positive_int, getattr(s, name), name)
    if s.dataset is None:  # the embedded sentiment set lives in the data home: refuse a file there now
        from ..datahome import data_home

        data_home()
    if s.lora is not None:
        from . import lora

        lora.require_peft("LoRA fine-tuning")
        lora.parse_lora_spec(s.lora)
        lora.check_lora_regularizers(regularizers)
    return checks.number_list(fractions, "fractions", checks.FRACTION)


def _outputs(s, regularizers, fractions, held):
    """(summary CSV, per-run CSV, figure, the figure's claim), each checked writable and claimed into ``held``."""
    from ..outputs import claim_output

    out = Path(s.out)
    runs_out = Path(s.runs_out) if s.runs_out else out.with_name(out.stem + "_runs.csv")
    plot_out = Path(s.plot) if s.plot else out.with_suffix(".png")
    check_output_path(out, "out", [".csv"])
    check_output_path(runs_out, "runs_out", [".csv"])
    check_output_path(plot_out, "plot", [".png", ".pdf", ".svg"])
    check_distinct_paths({"out": out, "runs_out": runs_out, "plot": plot_out, "save_models": s.save_models},
                         {"dataset": s.dataset, "schedule": s.schedule, "fisher": s.fisher, "model": s.model})

    def claim(path, kind, **options):
        return held.enter_context(claim_output(path, kind, overwrite=s.overwrite, **options))

    claim(runs_out, "table", columns=("regularizer", "fraction", "seed", "n_train"))
    claim(out, "table", columns=("regularizer", "fraction", "n_train", "metric"))
    stamp = {"command": "finetune", "inputs": [str(runs_out.resolve())]}
    claim(plot_out, "figure", settings=stamp)
    # The summary and the figure are drawn aside and move into place with the journal (``_sweep``).
    figure = held.enter_context(claim_output(staged_path(plot_out), "figure", overwrite=True, settings=stamp))
    if s.save_models:
        from ..outputs import check_saved_models
        from .sweep import model_folder

        check_output_folder(s.save_models, "save_models")  # a file there failed after training
        claim(s.save_models, "folder")
        check_saved_models([model_folder(s.save_models, reg, fraction, seed) for reg in regularizers
                            for fraction in fractions for seed in range(s.seed, s.seed + s.restarts)], s.overwrite)
    return out, runs_out, plot_out, figure


def _config(s):
    from ..runtime import resolve_device
    from .training import FinetuneConfig

    defaults = FINETUNE_EMBEDDED if s.model is None else FINETUNE_PAPER
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    lr = FINETUNE_LORA_LR if s.lora is not None and s.lr is None else pick(s.lr, "lr")
    config = FinetuneConfig(lr=lr, batch_size=pick(s.batch_size, "batch_size"),
                            seq_len=pick(s.seq_len, "seq_len"), epochs=s.epochs, warmup=s.warmup,
                            weight_decay=s.weight_decay, dropout=s.dropout, r3f_lambda=s.r3f_lambda,
                            r3f_sigma=s.r3f_sigma, r3f_noise=s.r3f_noise, mixout_p=s.mixout_p,
                            childtuning_reserve=s.childtuning_reserve, device=str(resolve_device(s.device)),
                            lora=s.lora)
    return config, pick(s.max_train, "max_train"), pick(s.max_test, "max_test")


def _probe(s, regularizers, train_data):
    """Load the classifier once before the first run trains.

    Returns (the guided schedule, from ``schedule`` or ``fisher``, checked against the model, or
    None; the model's dropout site names).
    """
    from . import schedule
    from .schedule_stage import schedule_from_args
    from .sites import find_sites
    from .training import SCHEDULE_REGULARIZERS, check_regularizers, load_classifier

    needs_schedule = [r for r in regularizers if r in SCHEDULE_REGULARIZERS]
    if needs_schedule and not (s.schedule or s.fisher):
        try:
            check_regularizers(regularizers, None)
        except UsageError as err:
            raise ScheduleMissing(str(err)) from None
    model, _ = load_classifier(s.model, train_data, "cpu")
    if s.lora is not None:
        from . import lora

        model = lora.wrap_classifier(model, s.lora)
        sites = list(lora.lora_modules(model))
    else:
        sites = [site.name for site in find_sites(model)]
    if not needs_schedule:
        return None, sites
    from ..identity import source_fingerprint

    guided = schedule_from_args(model, schedule_path=s.schedule, fisher_path=s.fisher,
                                         p_upper=s.p_upper, p_lower=s.p_lower,
                                         model_fingerprint=source_fingerprint(s.model) or "", model_spec=s.model)
    if s.lora is not None:
        lora.lora_probabilities(model, "guided", 0.0, guided)  # refuses a schedule for other LoRA targets
    else:
        schedule.apply(model, guided)  # refuses a schedule made for another model, in one line
    return guided, sites


def _data(s, max_test, log):
    """(train, test) labelled data: the dataset's own test split, or a seeded split of its rows."""
    from ..data.labelled import load_labelled, split_train_test, subsample

    train_data, test_data = load_labelled(s.dataset, s.text_column, s.label_column, s.pair_column, s.task)
    if train_data.skipped:
        log(f"skipped {train_data.skipped} row(s) without a text or a label")
    if test_data is None:
        train_data, test_data = split_train_test(train_data, s.test_fraction, s.split_seed)
    if max_test is not None and len(test_data) > max_test:
        test_data = subsample(test_data, 1.0, s.split_seed, cap=max_test)
    return train_data, test_data


def run_finetune(settings: Optional[FinetuneSettings] = None, *, log: Optional[Callable[[str], None]] = print,
                 **options) -> FinetuneResult:
    """Fine-tune once per regularizer, training-set fraction and restart seed.

    Writes the per-run CSV (the sweep's journal: a rerun skips finished runs), the summary CSV and
    the figure.

    The summary holds, per regularizer, fraction and metric, the mean, IQR, and each regularizer
    minus dropout paired over the same restarts (mean difference, bootstrap 95% CI, Wilcoxon p).
    Without ``model``/``dataset``: the embedded model on the embedded movie-snippet sentiment set.

    Args:
        settings: a FinetuneSettings; or its fields as keyword ``options`` (``out`` is required).
        log: takes one line of text for progress and notes (e.g. ``print``); None: quiet.
        **options: FinetuneSettings fields, when ``settings`` is None.

    Returns:
        a FinetuneResult.

    Raises:
        UsageError: an unknown regularizer, a setting out of its domain, a metric that does not
            fit the task, a schedule or Fisher file of another model; ``SettingsMismatch`` for a
            journal of other settings unless ``overwrite``; ``OutputRefused`` for outputs holding
            another kind of file unless ``overwrite``.
    """
    import contextlib

    s = settings if settings is not None else FinetuneSettings(**options)
    log = log or (lambda line: None)
    regularizers = _listed(s.regularizer)
    fractions = _check(s, regularizers)
    with contextlib.ExitStack() as held:
        return _sweep(s, regularizers, fractions, _outputs(s, regularizers, fractions, held), log)


def _sweep(s, regularizers, fractions, paths, log) -> FinetuneResult:
    from ..files import write_csv
    from . import sweep
    from .metrics import metrics_for
    from .training import DROPOUT_ONLY_REGULARIZERS

    out, runs_out, plot_out, figure = paths
    config, max_train, max_test = _config(s)
    train_data, test_data = _data(s, max_test, log)
    metrics = metrics_for(train_data.task)
    metric = s.metric or metrics[0]
    if metric not in metrics:
        raise UsageError(f"metric {metric} does not fit a {train_data.task} task; use one of {', '.join(metrics)}")
    guided, sites = _probe(s, regularizers, train_data)
    idle = [r for r in regularizers if r in DROPOUT_ONLY_REGULARIZERS]
    if not sites and idle:
        log(f"note: this model has no dropout sites, so {', '.join(idle)} train exactly like 'none'")
    log(f"{train_data.task}: {min(len(train_data), max_train or len(train_data))} training rows at fraction 1, "
        f"{len(test_data)} test rows; lr {config.lr}, batch {config.batch_size}, seq len {config.seq_len}, "
        f"{config.epochs} epochs, device {config.device}" + (f", LoRA {config.lora}" if config.lora else ""))
    started = time.perf_counter()
    result = {}

    def finish(rows):
        # Drawn aside: with --overwrite the finished sweep's three files stay until all three are new.
        result["summary"] = sweep.summarize_runs(rows, metrics)
        write_csv(result["summary"], staged_path(out))
        sweep.plot_paucity(result["summary"], metric, staged_path(plot_out), claim=figure,
                           title=f"{Path(s.dataset or 'movie snippets').name}: {s.restarts} restarts")
        return [(staged_path(out), out), (staged_path(plot_out), plot_out)]

    rows = sweep.data_paucity(s.model, train_data, test_data, regularizers, fractions, s.restarts, config,
                              guided, s.save_models, s.seed, max_train, runs_path=runs_out,
                              overwrite=s.overwrite, log=log, finish=finish)
    return FinetuneResult(rows=rows, summary=result["summary"], metric=metric, out=out, runs_out=runs_out,
                          plot=plot_out, seconds=time.perf_counter() - started)
