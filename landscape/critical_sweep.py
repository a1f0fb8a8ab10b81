"""Critical sharpness across checkpoints: one CSV row per checkpoint and a figure of λ_c along them.

``run_critical_sweep`` measures each checkpoint as ``run_critical_sharpness`` does (the same
settings, the model's source replaced), one model in memory at a time, and writes the table and
the figure once every checkpoint is measured (each is claimed first, so a busy or foreign output
is refused before any work).  With another ``update_corpus`` each row has both the relative
critical sharpness λ_c^{corpus→update} (``critical_sharpness``) and the update loss's own
(``update_critical_sharpness``), from the same gradient: the pair the paper's plots along
training show.
"""

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .critical import measure, prepare
from .errors import UsageError
from .files import PathLike, atomic_output, check_distinct_paths, check_output_path, write_csv
from .identity import MODEL_KEY
from .outputs import claim_output
from .results import StageResult
from .settings import CriticalSharpnessSettings

COLUMNS = ("checkpoint", "critical_lr", "critical_sharpness", "loss_at_origin", "forward_passes", "converged",
           "update_critical_sharpness", "update_loss_at_origin", "update_forward_passes", "rayleigh_quotient",
           MODEL_KEY)
_MARKERS = ("config.json", "adapter_config.json")  # what makes a folder a checkpoint


@dataclass
class CriticalSweepResult(StageResult):
    """What ``run_critical_sweep`` wrote: ``path`` the CSV, ``plot`` the figure, ``rows`` the table."""

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
        overwrite: replace outputs that hold something else.
        log: called with one line per checkpoint and stage (None: silent).

    Returns:
        A ``CriticalSweepResult``.

    Raises:
        UsageError: fewer than two checkpoints, or what ``run_critical_sharpness`` raises.
    """
    from .inputs import stage_runtime

    log = log or (lambda line: None)
    if len(checkpoints) < 2:
        raise UsageError(f"a sweep needs at least two checkpoints, got {len(checkpoints)}")
    out = check_output_path(out, "out", [".csv"])
    plot = check_output_path(Path(out).with_suffix(".png") if plot is None else plot, "plot", [".png", ".pdf", ".svg"])
    check_distinct_paths({"out": out, "plot": plot}, {"corpus": settings.sample.corpus,
                                                      "update_corpus": settings.update_corpus})
    drawn = dict(settings.identity(), checkpoints=list(checkpoints))
    with claim_output(out, "table", overwrite=overwrite, columns=COLUMNS[:2]), \
            claim_output(plot, "figure", overwrite=overwrite, settings=drawn) as claim, stage_runtime(settings.model):
        rows = []
        for index, checkpoint in enumerate(checkpoints):
            log(f"[{index + 1}/{len(checkpoints)}] {checkpoint}")
            rows.append(_row(settings.replace(source=checkpoint), checkpoint, log))
            gc.collect()  # the previous model goes before the next one loads
        write_csv(rows, out, COLUMNS)
        _figure(rows, plot, settings, claim)
    return CriticalSweepResult(path=out, settings=settings, computed=len(rows), total=len(rows), fingerprints={},
                               plot=plot, rows=rows)


def _row(s: CriticalSharpnessSettings, checkpoint: str, log) -> dict:
    loaded, batches, update, file_direction, recorded = prepare(s)
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
