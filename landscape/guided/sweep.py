"""Data-paucity sweeps: fine-tune once per (regularizer, fraction, restart seed), then summarize.

``data_paucity`` runs the grid, resumable through its per-run CSV (a ``journal.Journal`` of CSV lines).
``guided.paucity`` (whose names this module re-exports) summarizes it: ``summarize_runs`` reports
each regularizer's mean and inter-quartile range of the task metric (the paper's Figure 4) and its
paired difference against ``dropout`` over the same restarts (``guided.stats``); ``plot_paucity``
draws it, ``format_summary`` prints it.

Settings fingerprint: every run row carries ``settings``, a short hash of what all runs of a sweep
share (model, its weights' ``identity.source_fingerprint``, the train/test data after reading,
splitting and the test cap, the training cap, and every ``FinetuneConfig`` field but the device and
the regularizer-specific ones), and
``reg_settings``, a hash of what only its regularizer uses (the guided schedule's site -> p list for
guided / dropout-matched / guided-shuffled, ``mixout_p``, ``childtuning_reserve``, the R3F
settings).  Resuming refuses, with ``SettingsMismatch``, a journal holding a run of other shared
settings, or a run of a regularizer in this sweep made with other settings of its own; runs of
regularizers outside this sweep are kept as they are.  The settings behind each fingerprint are
kept in ``<runs>.settings.json``, so a refusal can name what changed: the model's weights or the
data first, by name.
"""

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from ..data.labelled import subsample
from ..errors import SettingsMismatch, UsageError
from ..files import atomic_output, json_text, replace_together, staged_path
from ..journal import CsvLines, Journal
from ..outputs import claim_output
from ..progress import bar as progress_bar
from . import schedule as sched
from .metrics import metrics_for
from .paucity import (  # noqa: F401 (names of this module before the split)
    ALPHA,
    BASELINE,
    format_summary,
    is_significant,
    plot_paucity,
    reach_words,
    summarize_runs,
)
from .training import SCHEDULE_REGULARIZERS, FinetuneConfig, check_regularizers, finetune_once, run_schedule

TEXT_COLUMNS = ("regularizer", "schedule_sha", "settings", "reg_settings")
# FinetuneConfig fields only some regularizers use: in their reg_settings, not the shared settings
_OWN_FIELDS = {"r3f": ("r3f_lambda", "r3f_sigma", "r3f_noise"), "r4f": ("r3f_lambda", "r3f_sigma", "r3f_noise"),
               "mixout": ("mixout_p",), "childtuning": ("childtuning_reserve",)}
_OWN_WORDS = {"r3f": "--r3f-lambda/--r3f-sigma/--r3f-noise", "r4f": "--r3f-lambda/--r3f-sigma/--r3f-noise",
              "mixout": "--mixout-p", "childtuning": "--childtuning-reserve"}


def run_columns(task):
    """Columns of the per-run CSV of a ``task`` ('classification' or 'regression') sweep."""
    return ["regularizer", "fraction", "seed", "n_train", *metrics_for(task), "final_train_loss", "seconds",
            "schedule_mean_p", "schedule_sha", "shuffle_seed", "settings", "reg_settings"]


def check_run_row(task):
    """The schema of one row of a ``task`` sweep's per-run CSV, as ``RunJournal`` reads it back.

    A regularizer name, fraction in (0, 1], integer seed and n_train, metrics finite in their range
    ([0, 1] for accuracy and F1, [-1, 1] for correlations), seconds >= 0, fingerprints present; a
    diverged run's final_train_loss may be NaN or infinite.
    """
    bounded = {"accuracy": 0.0, "f1": 0.0, "mcc": -1.0, "pearson": -1.0, "spearman": -1.0}

    def check(row, schema, where):
        def at(column):
            return f"{where}, column {column}"

        for column in ("regularizer", "settings", "reg_settings"):
            if not row[column]:
                schema.fail(f"is damaged: {at(column)} is empty")
        fraction = schema.number(row["fraction"], at("fraction"))
        if not 0 < fraction <= 1:
            schema.fail(f"is damaged: {at('fraction')} is {fraction:g}, not in (0, 1]")
        schema.integer(row["seed"], at("seed"))
        schema.integer(row["n_train"], at("n_train"), minimum=1)
        for metric in metrics_for(task):
            value = schema.number(row[metric], at(metric), minimum=bounded[metric])
            if value > 1:
                schema.fail(f"is damaged: {at(metric)} is {value:g}, above 1")
        schema.number(row["final_train_loss"], at("final_train_loss"), allow_nan=True, finite=False)
        schema.number(row["seconds"], at("seconds"), minimum=0.0)
        if row["schedule_mean_p"] is not None:
            schema.number(row["schedule_mean_p"], at("schedule_mean_p"), minimum=0.0)
        if row["shuffle_seed"] is not None:
            schema.integer(row["shuffle_seed"], at("shuffle_seed"))
    return check


def model_folder(save_models, reg, fraction, seed) -> Path:
    """Where ``data_paucity`` saves the model of one run under ``save_models``."""
    return Path(save_models) / f"{reg}_f{fraction:g}_s{seed}"


def _digest(value, length=12):
    return hashlib.sha256(json_text(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _data_digest(data):
    return _digest([data.task, data.label_names, data.texts, data.pairs, data.labels], 16)


def sweep_settings(model_spec, train_data, test_data, config, cap=None, regularizers=(), guided=None):
    """(shared settings, {regularizer: its own settings}): what the fingerprints hash."""
    from ..identity import MODEL_KEY, source_fingerprint

    own = {f for fields in _OWN_FIELDS.values() for f in fields}
    shared = {"model": "embedded" if model_spec is None else str(model_spec),
              MODEL_KEY: source_fingerprint(model_spec) or "",
              "train_data": _data_digest(train_data), "test_data": _data_digest(test_data), "max_train": cap,
              **{k: v for k, v in dataclasses.asdict(config).items() if k not in own and k != "device"
                 and not (k == "lora" and v is None)}}  # journals from before --lora keep their fingerprint
    per_reg = {}
    for reg in regularizers:
        mine = {"regularizer": reg, **{f: getattr(config, f) for f in _OWN_FIELDS.get(reg, ())}}
        if reg in SCHEDULE_REGULARIZERS and guided is not None:
            mine["schedule"] = _digest([(s.name, repr(float(s.p))) for s in guided.sites], 16)  # order matters
        per_reg[reg] = mine
    return shared, per_reg


def _settings_file(runs_path):
    return Path(str(runs_path) + ".settings.json")


def _remember_settings(runs_path, shared, per_reg):
    """Add this sweep's settings to ``<runs>.settings.json`` ({fingerprint: settings})."""
    path = _settings_file(runs_path)
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    for settings in [shared, *per_reg.values()]:
        known[_digest(settings)] = json.loads(json_text(settings, default=str))
    with atomic_output(path) as tmp:
        tmp.write_text(json_text(known, indent=1, sort_keys=True) + "\n")


def _what_changed(runs_path, old_fingerprint, new_settings):
    try:
        old = json.loads(_settings_file(runs_path).read_text()).get(old_fingerprint)
    except (OSError, ValueError, AttributeError):
        old = None
    if not isinstance(old, dict):
        return ""
    from ..identity import differences

    new = json.loads(json_text(new_settings, default=str))
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differences(old, new)]
    return f" ({'; '.join(changed)})" if changed else ""


def _refuse_changed_content(runs_path, old_fingerprint, shared):
    """SettingsMismatch naming the model or the data when that is what changed since the journal's runs."""
    from ..identity import MODEL_KEY, refuse_changed_resume

    try:
        old = json.loads(_settings_file(runs_path).read_text()).get(old_fingerprint)
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(old, dict):
        return
    refuse_changed_resume(runs_path, {MODEL_KEY: old.get(MODEL_KEY)}, {MODEL_KEY: shared[MODEL_KEY]})
    data = next((k for k in ("train_data", "test_data") if old.get(k) != shared[k]), None)
    if data is not None:
        raise SettingsMismatch(f"cannot resume '{runs_path}': the {data.replace('_', ' ')} changed since its runs "
                               f"were made (fingerprint {old.get(data)} then, {shared[data]} now); rerun with "
                               "the same data")


def _same_settings(runs_path, old_fingerprint, shared) -> bool:
    """Whether the settings behind an older hash are this sweep's (``identity.differences``).

    A journal whose runs recorded a version-1 model fingerprint hashes to another value for the same
    model and settings.
    """
    from ..identity import differences

    try:
        old = json.loads(_settings_file(runs_path).read_text()).get(old_fingerprint)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(old, dict) and not differences(old, json.loads(json_text(shared, default=str)))


def _check_journal(journal, regularizers, shared, per_reg):
    """SettingsMismatch unless every run in the journal fits this sweep's settings."""
    shared_fp = _digest(shared)
    for row in journal.rows:
        if row["settings"] != shared_fp and not _same_settings(journal.path, row["settings"], shared):
            changed = _what_changed(journal.path, row["settings"], shared)
            _refuse_changed_content(journal.path, row["settings"], shared)
            raise SettingsMismatch(
                f"'{journal.path}' holds runs made with other settings{changed}"
                " (model, dataset, split, caps, lr, epochs, batch size, sequence length, warm-up, weight decay "
                "or dropout); resuming would mix them")
        reg = row["regularizer"]
        if reg in per_reg and row["reg_settings"] != _digest(per_reg[reg]):
            what = "guided schedule" if reg in SCHEDULE_REGULARIZERS else _OWN_WORDS.get(reg, "setting of its own")
            raise SettingsMismatch(
                f"'{journal.path}' holds {reg} runs made with another {what}"
                f"{_what_changed(journal.path, row['reg_settings'], per_reg[reg])}; resuming would mix them")


def _steps(n, config):
    return config.epochs * math.ceil(n / config.batch_size)


def _schedule_record(reg, guided, seed):
    used = run_schedule(reg, guided, seed)
    if used is None:
        return {"schedule_mean_p": None, "schedule_sha": None, "shuffle_seed": None}
    return {"schedule_mean_p": sched.mean_p(used), "schedule_sha": sched.assignment_hash(used),
            "shuffle_seed": seed if reg == "guided-shuffled" else None}


def data_paucity(model_spec, train_data, test_data, regularizers, fractions=(1.0,), restarts=6, config=None,
                 guided=None, save_models=None, first_seed=0, cap=None, show_progress=True, runs_path=None,
                 overwrite=False, log=None, finish=None, trained=None):
    """Fine-tune once per (regularizer, fraction, restart seed); returns one dict per run, in plan order.

    Each row: regularizer, fraction, seed, n_train, the test metrics, final_train_loss, seconds,
    schedule_mean_p / schedule_sha (mean p and assignment hash of the schedule the run used, for the
    regularizers built from the guided schedule), shuffle_seed (guided-shuffled: the permutation seed,
    which is the restart seed), settings / reg_settings (fingerprints, see the module docstring).
    Restart seeds are ``first_seed .. first_seed + restarts - 1``; all regularizers see the same
    sub-samples, so runs pair by (fraction, seed).

    Args:
        model_spec: the pretrained model (hub id or folder) to fine-tune.
        train_data: the training ``LabelledData``, sub-sampled per (fraction, seed).
        test_data: the test ``LabelledData``.
        regularizers: keys of ``REGULARIZERS``.
        fractions: training fractions in (0, 1].
        restarts: restart seeds per (regularizer, fraction).
        config: a ``FinetuneConfig`` (None: the defaults).
        guided: the guided schedule, for the regularizers built from it.
        save_models: a folder to save each run's model in (``model_folder``), or None.
        first_seed: the first restart seed.
        cap: use at most this many training rows at fraction 1 (see ``subsample``).
        show_progress: a tqdm bar over training steps.
        runs_path: the per-run CSV, used as the journal: runs already in it (same regularizer, fraction
            and seed, same settings) are not redone, and each new run is appended as soon as it ends.
        overwrite: replace a journal with other settings instead of refusing it.  The new runs go to a
            staged journal (``files.staged_path``: an interrupted replacement is resumed by the next call with
            ``overwrite``, or afresh if its settings differ), and ``runs_path`` keeps the old sweep until all is done.
        log: a function taking one line of text (e.g. ``print``) for what the resume found; None: quiet.
        finish: called with the rows once every run is done; returns (staged file, output) pairs
            of the rest of the result (a summary, a figure), moved into place with the journal.
        trained: a list to append each run this call trains to, as (regularizer, fraction, seed); or None.

    Returns:
        One dict per run, in plan order.

    Raises:
        SettingsMismatch: a journal with other settings, without ``overwrite``.
    """
    config = config or FinetuneConfig()
    check_regularizers(regularizers, guided)
    plan = [(r, float(f), first_seed + k) for f in fractions for k in range(restarts) for r in regularizers]
    shared, per_reg = sweep_settings(model_spec, train_data, test_data, config, cap, regularizers, guided)
    fingerprints = {r: (_digest(shared), _digest(per_reg[r])) for r in regularizers}
    journal, journal_path = None, None
    if runs_path is not None:
        journal_path = staged_path(runs_path) if overwrite else Path(runs_path)
        journal = _open_journal(journal_path, train_data.task, regularizers, (shared, per_reg), overwrite)
    try:
        done = {}
        if journal is not None:
            _remember_settings(journal_path, shared, per_reg)
            done = _resumed(journal, plan, f"{'the replacement of ' if overwrite else 'from '}{runs_path}", log)
        todo = [key for key in plan if key not in done]
        subsets = {(f, s): subsample(train_data, f, s, cap) for _, f, s in plan}
        total = sum(_steps(len(subsets[(f, s)]), config) for _, f, s in todo)
        with progress_bar(total=total, desc="fine-tuning", unit="step", enabled=show_progress, leave=True) as bar:
            for reg, fraction, seed in todo:
                subset = subsets[(fraction, seed)]
                save_dir = None if save_models is None else model_folder(save_models, reg, fraction, seed)
                started = time.perf_counter()
                metrics = finetune_once(model_spec, subset, test_data, reg, seed, config, guided, save_dir, bar)
                row = {"regularizer": reg, "fraction": fraction, "seed": seed, "n_train": len(subset), **metrics,
                       "seconds": round(time.perf_counter() - started, 2), **_schedule_record(reg, guided, seed),
                       "settings": fingerprints[reg][0], "reg_settings": fingerprints[reg][1]}
                if journal is not None:
                    journal.append(row)
                    row = journal.rows[-1]  # as read back: the same values whether resumed or not
                done[(reg, fraction, seed)] = row
                if trained is not None:
                    trained.append((reg, fraction, seed))
                bar.set_postfix_str(f"{reg} f={fraction:g} s={seed}")
    finally:
        if journal is not None:
            journal.close()
    rows = [done[key] for key in plan]
    _complete(rows, finish, journal_path if overwrite else None, runs_path)
    return rows


def _complete(rows, finish, staged_journal, runs_path) -> None:
    """Write the rest of the result (``finish``) and move the staged files into place together."""
    pairs = list(finish(rows)) if finish is not None else []
    if staged_journal is not None and runs_path is not None:  # the new sweep is whole: it replaces the old
        pairs = [(staged_journal, runs_path), (_settings_file(staged_journal), _settings_file(runs_path)), *pairs]
    replace_together(pairs)


def _resumed(journal, plan, what, log) -> dict:
    """{(regularizer, fraction, seed): row} of the runs ``journal`` holds, said in one line to ``log``."""
    done = {}
    for row in journal.rows:
        done.setdefault((row["regularizer"], float(row["fraction"]), int(row["seed"])), row)
    if log is not None and (journal.rows or journal.dropped_tail):
        found = sum(key in done for key in plan)
        log(f"resuming {what}: {found} of {len(plan)} runs already done"
            + (", a torn last line dropped" if journal.dropped_tail else ""))
    return done


class RunJournal:
    """A sweep's per-run CSV as its journal: ``rows`` (the runs read at open), ``append``, ``close``.

    A ``journal.Journal`` of ``CsvLines``, claimed for this sweep alone (``outputs.claim_output``)
    until ``close``.  Each row read back goes through ``check`` (the sweep's schema of a run), so a
    hand-edited cell is one line naming the file, the line and the column; a table of other columns
    is refused with ``SettingsMismatch``.
    """

    def __init__(self, path, columns, overwrite=False, text_columns=(), check=None):
        self.path = Path(path)
        # A file that is not a table is refused here, a table of other columns by the journal.
        self._claim = claim_output(self.path, "table", overwrite)
        try:
            self.journal = Journal(self.path, "sweep", {"columns": list(columns)}, what="per-run CSV",
                                   remedy="correct or delete that line, or rerun with --overwrite",
                                   lines=CsvLines(columns, text_columns), check=check, refuse=_other_columns,
                                   fresh=overwrite)
        except OSError as err:
            self._claim.release()
            raise UsageError(f"cannot write the per-run CSV '{self.path}': {err.strerror or err}") from None
        except BaseException:
            self._claim.release()
            raise
        self.rows, self.dropped_tail = self.journal.records, self.journal.dropped_tail

    def append(self, row: dict) -> None:
        """Write one run as one CSV line, flushed and fsynced, and add it to ``rows`` as read back."""
        self.journal.append(row)

    def close(self) -> None:
        """Release the claim on the CSV."""
        self._claim.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _other_columns(path, stored, current):
    header = stored["columns"]
    raise SettingsMismatch(f"'{path}' has the columns of another sweep ({', '.join(header[:6])}"
                           f"{', ...' if len(header) > 6 else ''}), not this one's")


def _open_journal(path, task, regularizers, settings, restart):
    """The sweep's journal at ``path``, its runs checked against this sweep's ``settings``.

    ``restart``: ``path`` is a staged replacement, which starts afresh when it holds other runs
    (an interrupted replacement by another sweep) instead of refusing them.
    """
    from ..schema import DamagedFile

    def open_it(fresh):
        return RunJournal(path, run_columns(task), fresh, TEXT_COLUMNS, check_run_row(task))

    journal = None
    try:
        journal = open_it(False)
        _check_journal(journal, regularizers, *settings)
        return journal
    except (SettingsMismatch, DamagedFile):
        if journal is not None:
            journal.close()
        if not restart:
            raise
    return open_it(True)
