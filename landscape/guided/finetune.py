"""The fine-tuning stage as one call.

``run_finetune`` runs the data-paucity sweep (each regularizer, training-set fraction and restart
seed), then writes the per-run journal, the summary CSV and the figure; ``landscape finetune`` and
Python users call it.

The sweep itself (runs, journal, statistics, figure) lives in ``guided.sweep``; this module turns
settings into it: outputs claimed, the labelled data split, the classifier probed for its dropout
sites, the guided schedule read or computed and checked against the model.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from ..defaults import FINETUNE_EMBEDDED, FINETUNE_LORA_LR, FINETUNE_PAPER
from ..errors import UsageError
from ..files import PathLike, check_distinct_paths, check_output_folder, check_output_path, staged_path
from ..results import StageResult
from ..settings import FinetuneSettings

__all__ = ["FinetuneResult", "FinetuneSettings", "ScheduleMissing", "run_finetune"]


class ScheduleMissing(UsageError):
    """A regularizer built from the guided schedule, without a schedule or a Fisher file to make it.

    ``reason`` is the refusal without the remedy (the command line names its own options).
    """

    def __init__(self, reason: str):
        super().__init__(f"{reason}: give a schedule file (schedule) or a Fisher file (fisher)")
        self.reason = reason


@dataclass
class FinetuneResult(StageResult):
    """What ``run_finetune`` wrote.

    ``path`` is the summary CSV; ``computed``: runs trained by this call, ``total``: runs in the
    sweep (the others were resumed from the journal); ``fingerprints``: the model's, as the
    journal records it.  Own fields: ``rows`` (one dict per run, as in the per-run CSV),
    ``summary`` (as in the summary CSV), the ``metric`` plotted, the per-run CSV ``runs_out``, the
    figure ``plot``, ``seconds`` of the sweep.
    """

    rows: List[dict]
    summary: List[dict]
    metric: str
    runs_out: Path
    plot: Path
    seconds: float

    @property
    def out(self) -> Path:
        """The summary CSV (``path``), by the name of the option that gave it."""
        return self.path


@dataclass
class _Outputs:
    """Where a sweep writes (checked and claimed by ``_outputs``)."""

    out: Path
    runs_out: Path
    plot: Path
    figure: object  # the claim of the staged figure, for ``sweep.plot_paucity``
    save_models: Optional[str]
    overwrite: bool


def _check(s: FinetuneSettings) -> None:
    """What the settings' own domains cannot see: the data home, and LoRA's needs (peft, its spec, regularizers)."""
    if s.dataset is None:  # the embedded sentiment set lives in the data home: refuse a file there now
        from ..datahome import data_home

        data_home()
    if s.lora is not None:
        from . import lora

        lora.require_peft("LoRA fine-tuning")
        lora.parse_lora_spec(s.lora)
        lora.check_lora_regularizers(list(s.regularizer))


def _outputs(s: FinetuneSettings, out, runs_out, plot, save_models, overwrite, held) -> _Outputs:
    """The summary CSV, per-run CSV, figure and model folder, each checked writable and claimed into ``held``."""
    from ..outputs import claim_output

    out = Path(out)
    runs_out = Path(runs_out) if runs_out else out.with_name(out.stem + "_runs.csv")
    plot_out = Path(plot) if plot else out.with_suffix(".png")
    save_models = None if save_models is None else str(save_models)
    check_output_path(out, "out", [".csv"])
    check_output_path(runs_out, "runs_out", [".csv"])
    check_output_path(plot_out, "plot", [".png", ".pdf", ".svg"])
    check_distinct_paths({"out": out, "runs_out": runs_out, "plot": plot_out, "save_models": save_models},
                         {"dataset": s.dataset, "schedule": s.schedule, "fisher": s.fisher, "model": s.model.source})

    def claim(path, kind, **options):
        return held.enter_context(claim_output(path, kind, overwrite=overwrite, **options))

    claim(runs_out, "table", columns=("regularizer", "fraction", "seed", "n_train"))
    claim(out, "table", columns=("regularizer", "fraction", "n_train", "metric"))
    stamp = {"command": "finetune", "inputs": [str(runs_out.resolve())]}
    claim(plot_out, "figure", settings=stamp)
    # The summary and the figure are drawn aside and move into place with the journal (``_sweep``).
    figure = held.enter_context(claim_output(staged_path(plot_out), "figure", overwrite=True, settings=stamp))
    if save_models:
        from ..outputs import check_saved_models
        from .sweep import model_folder

        check_output_folder(save_models, "save_models")  # a file there failed after training
        claim(save_models, "folder")
        check_saved_models([model_folder(save_models, reg, fraction, seed) for reg in s.regularizer
                            for fraction in s.fractions for seed in range(s.seed, s.seed + s.restarts)], overwrite)
    return _Outputs(out, runs_out, plot_out, figure, save_models, overwrite)


def _config(s: FinetuneSettings):
    from ..runtime import resolve_device
    from .training import FinetuneConfig

    defaults = FINETUNE_EMBEDDED if s.model.source is None else FINETUNE_PAPER
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    lr = FINETUNE_LORA_LR if s.lora is not None and s.lr is None else pick(s.lr, "lr")
    config = FinetuneConfig(lr=lr, batch_size=pick(s.batch_size, "batch_size"),
                            seq_len=pick(s.seq_len, "seq_len"), epochs=s.epochs, warmup=s.warmup,
                            weight_decay=s.weight_decay, dropout=s.dropout, r3f_lambda=s.r3f_lambda,
                            r3f_sigma=s.r3f_sigma, r3f_noise=s.r3f_noise, mixout_p=s.mixout_p,
                            childtuning_reserve=s.childtuning_reserve, device=str(resolve_device(s.model.device)),
                            lora=s.lora)
    return config, pick(s.max_train, "max_train"), pick(s.max_test, "max_test")


def _probe(s: FinetuneSettings, train_data):
    """Load the classifier once before the first run trains.

    Returns (the guided schedule, from ``schedule`` or ``fisher``, checked against the model, or
    None; the model's dropout site names).
    """
    from . import schedule
    from .schedule_stage import schedule_from_args
    from .sites import find_sites
    from .training import SCHEDULE_REGULARIZERS, check_regularizers, load_classifier

    needs_schedule = [r for r in s.regularizer if r in SCHEDULE_REGULARIZERS]
    if needs_schedule and not (s.schedule or s.fisher):
        try:
            check_regularizers(list(s.regularizer), None)
        except UsageError as err:
            raise ScheduleMissing(str(err)) from None
    if needs_schedule:
        from ..inputs import check_inputs

        check_inputs(s.model, None, [(s.schedule, "schedule"), (s.fisher, "fisher")])  # before the model loads
    model, _ = load_classifier(s.model.source, train_data, "cpu")
    if s.lora is not None:
        from . import lora

        model = lora.wrap_classifier(model, s.lora)
        sites = list(lora.lora_modules(model))
    else:
        sites = [site.name for site in find_sites(model)]
    if not needs_schedule:
        return None, sites
    from ..identity import source_fingerprint

    guided = schedule_from_args(model, schedule_path=s.schedule, fisher_path=s.fisher, p_upper=s.p_upper,
                                p_lower=s.p_lower, model_fingerprint=source_fingerprint(s.model.source) or "",
                                model_spec=s.model.source)
    if s.lora is not None:
        lora.lora_probabilities(model, "guided", 0.0, guided)  # refuses a schedule for other LoRA targets
    else:
        schedule.apply(model, guided)  # refuses a schedule made for another model, in one line
    return guided, sites


def _data(s: FinetuneSettings, max_test, log):
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


def run_finetune(settings: FinetuneSettings, *, out: PathLike, runs_out: Optional[PathLike] = None,
                 plot: Optional[PathLike] = None, save_models: Optional[PathLike] = None, overwrite: bool = False,
                 log: Optional[Callable[[str], None]] = print) -> FinetuneResult:
    """Fine-tune once per regularizer, training-set fraction and restart seed.

    Writes the per-run CSV (the sweep's journal: a rerun skips finished runs), the summary CSV and
    the figure.  The summary holds, per regularizer, fraction and metric, the mean, IQR, and each
    regularizer minus dropout paired over the same restarts (mean difference, bootstrap 95% CI,
    Wilcoxon p).  Without a model source or ``dataset``: the embedded model on the embedded
    movie-snippet sentiment set.  Every run loads the checkpoint afresh with a new head, so no
    loaded model is taken.  ``settings.model.threads`` applies for the call's duration.

    Args:
        settings: the sweep (``FinetuneSettings``; its fields are the command's options).
        out: the summary CSV to write.
        runs_out: the per-run CSV, also the journal (None: ``<out>_runs.csv``).
        plot: the figure, .png/.pdf/.svg (None: ``<out>.png``).
        save_models: a folder to save each fine-tuned model in, under ``<reg>_f<frac>_s<seed>``
            (with ``lora``: PEFT adapter folders); None: not saved.
        overwrite: start the journal afresh instead of resuming it (needed when the settings
            changed), and replace outputs that hold another kind of file.
        log: takes one line of text for progress and notes (e.g. ``print``); None: quiet.

    Returns:
        a FinetuneResult.

    Raises:
        UsageError: a metric that does not fit the task, a schedule or Fisher file of another model
            (``ScheduleMissing`` when a regularizer needs a schedule and neither file is given);
            ``SettingsMismatch`` for a journal of other settings unless ``overwrite``;
            ``OutputRefused`` for outputs holding another kind of file unless ``overwrite``.
    """
    import contextlib

    from ..inputs import stage_runtime

    if not isinstance(settings, FinetuneSettings):
        raise UsageError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    log = log or (lambda line: None)
    _check(settings)
    with contextlib.ExitStack() as held:
        paths = _outputs(settings, out, runs_out, plot, save_models, overwrite, held)
        with stage_runtime(settings.model):
            return _sweep(settings, paths, log)


def _sweep(s: FinetuneSettings, paths: _Outputs, log) -> FinetuneResult:
    from ..files import write_csv
    from ..identity import MODEL_KEY, source_fingerprint
    from . import sweep
    from .metrics import metrics_for
    from .training import DROPOUT_ONLY_REGULARIZERS

    config, max_train, max_test = _config(s)
    train_data, test_data = _data(s, max_test, log)
    metrics = metrics_for(train_data.task)
    metric = s.metric or metrics[0]
    if metric not in metrics:
        raise UsageError(f"metric {metric} does not fit a {train_data.task} task; use one of {', '.join(metrics)}")
    guided, sites = _probe(s, train_data)
    idle = [r for r in s.regularizer if r in DROPOUT_ONLY_REGULARIZERS]
    if not sites and idle:
        log(f"note: this model has no dropout sites, so {', '.join(idle)} train exactly like 'none'")
    log(f"{train_data.task}: {min(len(train_data), max_train or len(train_data))} training rows at fraction 1, "
        f"{len(test_data)} test rows; lr {config.lr}, batch {config.batch_size}, seq len {config.seq_len}, "
        f"{config.epochs} epochs, device {config.device}" + (f", LoRA {config.lora}" if config.lora else ""))
    started = time.perf_counter()
    result, trained = {}, []

    def finish(rows):
        # Drawn aside: with --overwrite the finished sweep's three files stay until all three are new.
        result["summary"] = sweep.summarize_runs(rows, metrics)
        write_csv(result["summary"], staged_path(paths.out))
        sweep.plot_paucity(result["summary"], metric, staged_path(paths.plot), claim=paths.figure,
                           title=f"{Path(s.dataset or 'movie snippets').name}: {s.restarts} restarts")
        return [(staged_path(paths.out), paths.out), (staged_path(paths.plot), paths.plot)]

    rows = sweep.data_paucity(s.model.source, train_data, test_data, list(s.regularizer), list(s.fractions),
                              s.restarts, config, guided, paths.save_models, s.seed, max_train,
                              runs_path=paths.runs_out, overwrite=paths.overwrite, log=log, finish=finish,
                              trained=trained)
    return FinetuneResult(path=paths.out, settings=s, computed=len(trained), total=len(rows),
                          fingerprints={MODEL_KEY: source_fingerprint(s.model.source) or ""}, rows=rows,
                          summary=result["summary"], metric=metric, runs_out=paths.runs_out, plot=paths.plot,
                          seconds=time.perf_counter() - started)
