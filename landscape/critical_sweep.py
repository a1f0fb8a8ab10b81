"""Critical sharpness across checkpoints: one CSV row per checkpoint and a figure of λ_c along them.

``run_critical_sweep`` measures each checkpoint as ``run_critical_sharpness`` does (the same
settings, the model's source replaced), one model in memory at a time, and writes the table and
the figure once every checkpoint is measured (each is claimed first, so a busy or foreign output
is refused before any work).  With another ``update_corpus`` each row has both the relative
critical sharpness λ_c^{corpus→update} (``critical_sharpness``) and the update loss's own
(``update_critical_sharpness``), from the same gradient: the pair the paper's plots along
training show.

A sweep resumes per checkpoint: each row, once measured, is journaled beside the table
(``<out>.journal``, ``journal.Journal``), and a rerun with the same settings and checkpoints keeps
those rows (a checkpoint whose weight files changed since, or whose row was measured under other
code numerics, ``numerics_now``, is refused) and measures the others.
A rerun with other settings is refused in one line unless ``overwrite``, which starts afresh.

Under torchrun each checkpoint is loaded sharded over groups of ``settings.model.shard_size``
ranks (``critical.run_critical_sharpness`` says how); rank 0 writes the journal, the table and
the figure, and every rank learns from it which checkpoints are done.
"""

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .critical import measure, prepare
from .errors import NumericsMismatch, SettingsMismatch, UsageError
from .files import PathLike, atomic_output, check_distinct_paths, check_output_path, write_csv
from .identity import MODEL_KEY, same_model, source_fingerprint
from .journal import Journal
from .numerics import NUMERICS_KEY
from .outputs import claim_output
from .results import StageResult
from .settings import CriticalSharpnessSettings

COLUMNS = ("checkpoint", "critical_lr", "critical_sharpness", "loss_at_origin", "forward_passes", "converged",
           "update_critical_sharpness", "update_loss_at_origin", "update_forward_passes", "rayleigh_quotient",
           MODEL_KEY)
_MARKERS = ("config.json", "adapter_config.json")  # what makes a folder a checkpoint
KIND = "critical-sweep"  # the journal's kind


@dataclass
class CriticalSweepResult(StageResult):
    """What ``run_critical_sweep`` wrote: ``path`` the CSV, ``plot`` the figure, ``rows`` the table.

    ``computed``: the checkpoints measured by this call (the others came from the journal of an
    earlier run); ``total``: every checkpoint.
    """

    plot: Path
    rows: List[dict]


def checkpoints_of(sources: Sequence[str]) -> List[str]:
    """The checkpoints named by ``sources``: as given, or the checkpoint subfolders of one folder.

    A single folder that is not itself a checkpoint (no config.json or adapter_config.json) stands
    for its subfolders that are, in natural order (checkpoint-900 before checkpoint-1000).

    Raises:
        UsageError: such a folder holds no checkpoint.
    """
    sources = [str(s) for s in sources]
    if len(sources) == 1 and Path(sources[0]).is_dir() and not _is_checkpoint(Path(sources[0])):
        found = sorted((p for p in Path(sources[0]).iterdir() if p.is_dir() and _is_checkpoint(p)),
                       key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
        if not found:
            raise UsageError(f"'{sources[0]}' is neither a checkpoint nor a folder of checkpoints (no subfolder "
                             "holds a config.json or adapter_config.json)")
        return [str(p) for p in found]
    return sources


def _is_checkpoint(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in _MARKERS)


def run_critical_sweep(settings: CriticalSharpnessSettings, checkpoints: Sequence[str], *, out: PathLike,
                       plot: Optional[PathLike] = None, overwrite: bool = False,
                       log: Optional[Callable[[str], None]] = None) -> CriticalSweepResult:
    """λ_c of each checkpoint (and λ_c relative, with an update corpus) as a CSV and a figure.

    Args:
        settings: as for ``run_critical_sharpness``; its model source is replaced by each checkpoint.
        checkpoints: model sources in order (hub ids, folders, PEFT adapter folders).
        out: the table (.csv).
        plot: the figure (.png, .pdf or .svg; None: ``out`` with .png).
        overwrite: replace outputs that hold something else, and start afresh rather than keep the
            rows an earlier run journaled.
        log: called with one line per checkpoint and stage (None: silent).

    Returns:
        A ``CriticalSweepResult``.

    Raises:
        UsageError: fewer than two checkpoints, or what ``run_critical_sharpness`` raises;
            ``SettingsMismatch`` when the journal holds a sweep of other settings or checkpoints, or
            a row of a checkpoint whose weights changed since (unless ``overwrite``).
    """
    from .inputs import stage_runtime
    from .runtime import join_torchrun, rank_and_world
    from .sharding import shard_layout

    log = log or (lambda line: None)
    if len(checkpoints) < 2:
        raise UsageError(f"a sweep needs at least two checkpoints, got {len(checkpoints)}")
    out = check_output_path(out, "out", [".csv"])
    plot = check_output_path(Path(out).with_suffix(".png") if plot is None else plot, "plot", [".png", ".pdf", ".svg"])
    check_distinct_paths({"out": out, "plot": plot}, {"corpus": settings.sample.corpus,
                                                      "update_corpus": settings.update_corpus})
    # The settings' own model is none of the checkpoints: left out, as the command line leaves it.
    drawn = dict(settings.replace(source=None).identity(), checkpoints=list(checkpoints))
    with claim_output(out, "table", overwrite=overwrite, columns=COLUMNS[:2]), \
            claim_output(plot, "figure", overwrite=overwrite, settings=drawn) as claim, stage_runtime(settings.model):
        join_torchrun(settings.model.device)
        layout = shard_layout(settings.model.shard_size)  # one mesh for every checkpoint
        journal, done = _open_journal(out, drawn, overwrite, settings.model.dtype)
        rows, computed = [], 0
        for index, checkpoint in enumerate(checkpoints):
            row = done.get(checkpoint)
            log(f"[{index + 1}/{len(checkpoints)}] {checkpoint}" + (" (measured before)" if row else ""))
            if row is None:
                row = _row(settings.replace(source=checkpoint), checkpoint, log, layout)
                computed += 1
                if journal is not None:  # the code numerics it was measured under, when a change applies
                    stamp = numerics_now(checkpoint, settings.model.dtype)
                    journal.append({"checkpoint": checkpoint, "row": row, **({NUMERICS_KEY: stamp} if stamp else {})})
                gc.collect()  # the previous model goes before the next one loads
            rows.append(row)
        if rank_and_world()[0] == 0:
            write_csv(rows, out, COLUMNS)
            _figure(rows, plot, settings, claim)
    return CriticalSweepResult(path=out, settings=settings, computed=computed, total=len(rows), fingerprints={},
                               plot=plot, rows=rows)


def journal_path(out) -> Path:
    """The journal of the sweep whose table is ``out``: the same path with ``.journal`` appended."""
    return Path(str(out) + ".journal")


def _open_journal(out: Path, identity: dict, overwrite: bool, dtype: str):
    """(the journal, on rank 0, else None; {checkpoint: row} of the rows it holds that still stand).

    Rank 0 reads it and every rank learns the rows, or the refusal (raised on every rank, so no
    rank waits for the others at a later collective).
    """
    from .runtime import broadcast_from_rank0, rank_and_world

    journal, done, refusal = None, {}, None
    if rank_and_world()[0] == 0:
        try:
            journal = Journal(journal_path(out), KIND, identity, what="critical-sharpness sweep journal",
                              remedy="delete it to start over", check=_check_record, fresh=overwrite)
            done = {r["checkpoint"]: r["row"] for r in journal.records}
            for record in journal.records:
                _check_unchanged(out, record["checkpoint"], record["row"])
                _check_numerics(out, record, dtype)
        except UsageError as err:
            refusal = err
    shared = broadcast_from_rank0((done, None if refusal is None else (isinstance(refusal, SettingsMismatch),
                                                                      str(refusal))))
    if refusal is not None:
        raise refusal
    done, failed = shared
    if failed is not None:
        raise (SettingsMismatch if failed[0] else UsageError)(failed[1])
    return journal, done


def _check_record(record, schema, where: str) -> None:
    """A journal record: {"checkpoint": text, "row": {every column}}."""
    schema.mapping(record, where)
    schema.text(schema.field(record, "checkpoint", where), f"{where}: checkpoint")
    row = schema.mapping(schema.field(record, "row", where), f"{where}: row")
    for column in COLUMNS:
        schema.field(row, column, f"{where}: row")


def _check_unchanged(out: Path, checkpoint: str, row: dict) -> None:
    """Refuse a journaled row of a checkpoint whose weight files are not those it was measured on."""
    if same_model(row.get(MODEL_KEY), source_fingerprint(checkpoint)) is False:
        raise SettingsMismatch(f"cannot resume '{out}': the checkpoint '{checkpoint}' changed since it was measured "
                               "(its weight files have another fingerprint); delete the journal to start over")


def numerics_now(checkpoint: str, dtype: str) -> str:
    """The code numerics stamp (``numerics.stamp``) of ``checkpoint`` loaded in ``dtype``, without its weights.

    Built from its configuration on the meta device, as ``models.load_model`` would build it (an
    adapter: its base's), so a journaled row is checked without loading the model it measured.
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    from . import numerics
    from .adapters import is_adapter_folder, read_config, resolve_base
    from .datahome import EMBEDDED_MODEL_DIR
    from .models import kind_from_config
    from .runtime import storage_dtype, transformers_silenced

    source = checkpoint
    if is_adapter_folder(source):
        source = resolve_base(read_config(Path(source))[0], Path(source)) or str(EMBEDDED_MODEL_DIR)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the configuration of '{checkpoint}': {str(err).splitlines()[0]}") from None
    head = {"mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "classification": AutoModelForSequenceClassification}[kind_from_config(config)]
    with transformers_silenced(), torch.device("meta"):
        model = head.from_config(config)
    return numerics.stamp(model, storage_dtype(dtype))


def _check_numerics(out: Path, record: dict, dtype: str) -> None:
    """Refuse a journaled row measured under other code numerics than this code's for its checkpoint."""
    from . import numerics

    then, now = record.get(NUMERICS_KEY), numerics_now(record["checkpoint"], dtype)
    if numerics.normalized(then) != numerics.normalized(now):
        raise NumericsMismatch(
            f"cannot resume '{out}': the row of '{record['checkpoint']}' was measured under other numerics than "
            f"this code computes with for it (numerics {numerics.describe(then)} then, {numerics.describe(now)} "
            f"now: {numerics.explain(then, now)}); the table would mix two forwards, so start it over")


def _row(s: CriticalSharpnessSettings, checkpoint: str, log, layout=None) -> dict:
    loaded, batches, update, file_direction, recorded = prepare(s, layout=layout)
    report, _ = measure(s, loaded, batches, update, file_direction, recorded, log, own=True)
    own = report.get("update") or {}
    return {"checkpoint": checkpoint, "critical_lr": report["critical_lr"],
            "critical_sharpness": report["critical_sharpness"], "loss_at_origin": report["loss_at_origin"],
            "forward_passes": report["forward_passes"], "converged": report["converged"],
            "update_critical_sharpness": own.get("critical_sharpness", ""),
            "update_loss_at_origin": own.get("loss_at_origin", ""),
            "update_forward_passes": own.get("forward_passes", ""),
            "rayleigh_quotient": report.get("rayleigh_quotient", ""), MODEL_KEY: report[MODEL_KEY]}


def _figure(rows: List[dict], path: Path, s: CriticalSharpnessSettings, claim) -> None:
    """λ_c (log scale) against the checkpoints, in order; the relative one beside the update's own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows)), 4.2))
    relative = s.update_corpus is not None
    label = "λ_c relative (corpus loss along the update)" if relative else "λ_c"
    ax.plot(x, [r["critical_sharpness"] for r in rows], marker="o", label=label)
    if any(r["update_critical_sharpness"] != "" for r in rows):
        ax.plot(x, [r["update_critical_sharpness"] for r in rows], marker="s", label="λ_c of the update's own loss")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([_plain(Path(r["checkpoint"]).name or r["checkpoint"]) for r in rows], rotation=45,
                       ha="right", fontsize=8)
    ax.set_ylabel("critical sharpness 2/η_c")
    ax.set_title(_plain(f"critical sharpness along {s.direction} steps"), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plt.close(fig)
    fmt = path.suffix.lstrip(".")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=claim.figure_metadata(fmt))


def _plain(text: str) -> str:
    """``text`` as matplotlib shows it literally (a $ would start mathtext)."""
    return str(text).replace("$", r"\$")
