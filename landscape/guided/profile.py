"""Views of a Fisher estimate, as CSV tables and PNG figures.

Per parameter element (paper Fig. 3a), per dropout site (Fig. 3b), per tensor and per block.

Site scores follow docs/fisher.md: the element-weighted mean Fisher of the parameters whose output the
site drops (``sites.site_scores``), sites found by module name (``sites.find_sites``).
"""

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..errors import UsageError
from ..files import (
    PathLike,
    atomic_output,
    check_distinct_paths,
    check_output_folder,
    replace_together,
    staged_path,
    write_csv,
)
from ..fisher import check_fisher_matches
from ..inputs import check_inputs, stage_model, stage_runtime
from ..models import LoadedModel
from ..outputs import claim_output, figure_metadata
from ..results import StageResult
from ..settings import ProfileSettings
from .sites import find_sites, site_scores

_BLOCK = re.compile(r"^(.*?\.(?:layer|layers|h|block)\.\d+)\.")


def block_of(name):
    """The block a parameter belongs to: 'bert.encoder.layer.3', 'bert.embeddings', 'lm_head'."""
    match = _BLOCK.match(name)
    if match:
        return match.group(1)
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) >= 3 else parts[0]


def parameter_profile(fisher):
    """Every parameter element's Fisher, sorted in descending order: float64 numpy (P,)."""
    values = np.concatenate([t.detach().reshape(-1).to("cpu", torch.float64).numpy() for t in fisher.values()])
    return -np.sort(-values)


def tensor_profile(fisher):
    """Rows per tensor, in file order: name, block, elements, mean, max, share (of the total Fisher)."""
    total = sum(float(t.double().sum()) for t in fisher.values()) or 1.0
    return [{"name": n, "block": block_of(n), "elements": t.numel(), "mean": float(t.double().mean()),
             "max": float(t.max()), "share": float(t.double().sum()) / total} for n, t in fisher.items()]


def block_profile(fisher):
    """Rows per block, in first-seen order: block, elements, mean (element-weighted), share."""
    rows = {}
    for row in tensor_profile(fisher):
        agg = rows.setdefault(row["block"], {"block": row["block"], "elements": 0, "sum": 0.0, "share": 0.0})
        agg["elements"] += row["elements"]
        agg["sum"] += row["mean"] * row["elements"]
        agg["share"] += row["share"]
    return [{"block": r["block"], "elements": r["elements"], "mean": r["sum"] / r["elements"],
             "share": r["share"]} for r in rows.values()]


def site_profile(model, fisher):
    """Rows per dropout site, in model order.

    Args:
        model: the model whose dropout sites are profiled.
        fisher: {param name: tensor shaped like the param}, the Fisher scores.

    Returns:
        One dict per site: site, kind, block, elements, score, normalized (score / highest score),
        rank (1 = lowest score, as in the guided-dropout schedule).

    Raises:
        UsageError: the model has no dropout sites.
    """
    sites = find_sites(model)
    if not sites:
        raise UsageError("the model has no dropout sites to profile")
    scores = site_scores(sites, fisher)
    order = sorted(scores, key=scores.get)
    top = max(scores.values()) or 1.0
    return [{"site": s.name, "kind": s.kind, "block": s.block,
             "elements": sum(fisher[n].numel() for n in s.param_names), "score": scores[s.name],
             "normalized": scores[s.name] / top, "rank": order.index(s.name) + 1} for s in sites]


def _quantile_rows(sorted_values, points=2000):
    """(rank, fraction, fisher) at log-spaced ranks of the sorted profile (with both ends)."""
    count = len(sorted_values)
    ranks = np.unique(np.concatenate([np.geomspace(1, count, points).astype(np.int64),
                                      np.linspace(1, count, points).astype(np.int64)]))
    return [{"rank": int(r), "fraction": r / count, "fisher": float(sorted_values[r - 1])} for r in ranks]


def _save_figure(fig, path, claim=None):
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png", metadata=figure_metadata(path, "png", claim))
    plt.close(fig)
    return path


def plot_parameter_profile(quantiles, total, zeros, path, title="", claim=None):
    """Fig. 3a: Fisher of every parameter, sorted, log scale; ``claim``: the figure's ``outputs.Claim``."""
    return _save_figure(parameter_figure(quantiles, total, zeros, title), path, claim)


def parameter_figure(quantiles, total, zeros, title=""):
    """The matplotlib figure ``plot_parameter_profile`` saves (see there); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots.text import literal

    positive = [(q["fraction"] * 100, q["fisher"]) for q in quantiles if q["fisher"] > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([p[0] for p in positive], [p[1] for p in positive], color="#1f4e79", lw=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("parameters, sorted by Fisher (% of all)")
    ax.set_ylabel("empirical Fisher, mean (∂loss/∂θ)² (nats²; log axis)")
    note = f"{total:,} parameters" + (f"; {zeros:,} exactly zero (not shown)" if zeros else "")
    ax.set_title(literal(f"{title}\n{note}" if title else note), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def profile_title(meta, source=""):
    """What a profile's figures show, from the Fisher file's recorded attributes.

    Args:
        meta: the Fisher file's metadata (``fisher.load_fisher``): its model, samples, seq_len, corpus.
        source: the model it was checked against, named when the file does not say.

    Returns:
        e.g. 'empirical Fisher · embedded model · 2,048 samples × 128 tokens from embedded default'.
    """
    from ..plots.text import model_name

    def count(key):
        try:
            return int(str(meta.get(key)))
        except ValueError:
            return None

    samples, seq_len, corpus = count("samples"), count("seq_len"), meta.get("corpus")
    sample = "" if samples is None else f"{samples:,} samples" + (f" × {seq_len:,} tokens" if seq_len else "")
    sample += f" from {corpus}" if sample and corpus else ""
    return " · ".join(part for part in ("empirical Fisher", model_name(meta.get("model") or source), sample) if part)


def spans_decades(values, ratio=20.0):
    """Whether positive ``values`` are too spread for a linear axis.

    True when the smallest is below 1/``ratio`` of the largest, so that its bar would be a sliver
    next to the largest one.
    """
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > ratio * min(positive)


def plot_bars(labels, values, colors, path, xlabel, title="", legend=None, claim=None):
    """Horizontal bars, first label on top (Fig. 3b style), saved as a PNG at ``path``.

    A log value axis when the values span decades (``spans_decades``), so that small bars stay
    visible next to the largest.  legend: {name: colour} for bars coloured by a category; claim:
    the figure's ``outputs.Claim``, whose stamp it carries.
    """
    return _save_figure(bars_figure(labels, values, colors, xlabel, title, legend), path, claim)


def bars_figure(labels, values, colors, xlabel, title="", legend=None):
    """The matplotlib figure ``plot_bars`` saves (see there); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..plots.text import literal

    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.22 * len(labels) + 1.0)), layout="constrained")
    ax.barh(range(len(labels)), values, color=colors)
    if spans_decades(values):
        ax.set_xscale("log")
        # Bars start a decade edge below the smallest, so that the smallest still has a length.
        ax.set_xlim(left=10.0 ** np.floor(np.log10(min(v for v in values if v > 0) / 2)))
        xlabel += "; log axis"
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([literal(label) for label in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(literal(title), fontsize=10)
    if legend:
        ax.legend(handles=[Patch(color=color, label=name) for name, color in legend.items()], fontsize=7,
                  title="site kind", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig


_KIND_COLORS = {"embeddings": "#8c564b", "attention": "#1f77b4", "hidden": "#ff7f0e",
                "classifier": "#2ca02c", "other": "#7f7f7f"}


# The files of a profile folder: the leading columns of each table; None for a figure.
PROFILE_FILES = {"parameter_quantiles.csv": ("rank", "fraction", "fisher"),
                 "tensors.csv": ("name", "block", "elements", "mean"), "blocks.csv": ("block", "elements", "mean"),
                 "sites.csv": ("site", "kind", "block", "elements"),
                 "parameters.png": None, "blocks.png": None, "sites.png": None}


class ProfileClaims(contextlib.ExitStack):
    """The claims of a profile's files: closing it releases them; ``figures``: {file name: its Claim}."""

    def __init__(self):
        super().__init__()
        self.figures = {}


def claim_profile(out_dir, fisher_path, overwrite=False) -> ProfileClaims:
    """Claim every file of a profile under ``out_dir`` (``outputs.claim_output``).

    Args:
        out_dir: the profile folder.
        fisher_path: the Fisher file the profile is drawn from (its figures' stamp).
        overwrite: replace files that are not a profile's own.

    Returns:
        The claims as one ExitStack (closing it releases them; ``write_profile`` takes its
        ``figures``); none is held when one is refused.

    Raises:
        OutputRefused: a file already there is not a profile's own (its tables, figures of the same
            Fisher file) and ``overwrite`` is off.
    """
    import os

    settings = {"command": "profile", "inputs": [os.path.abspath(fisher_path)]}
    figures = {}
    with ProfileClaims() as claims:
        for name, columns in PROFILE_FILES.items():
            claims.enter_context(claim_output(Path(out_dir) / name, "table" if columns else "figure", overwrite,
                                              columns=columns, settings=None if columns else settings))
            if not columns:  # drawn aside first (``write_profile``), with the same stamp
                figures[name] = claims.enter_context(claim_output(staged_path(Path(out_dir) / name), "figure", True,
                                                                  settings=settings))
        held = claims.pop_all()
        held.figures = figures
        return held


def write_profile(fisher, model, out_dir, title="", claims=None):
    """Write every view under ``out_dir``; returns {what: path}.

    Every file is written aside (``files.staged_path``) and all move into place at the end, so an
    interrupted profile leaves the previous one whole.

    parameters.png / parameter_quantiles.csv (sorted element-wise Fisher), sites.png / sites.csv
    (site scores, normalized to the highest), tensors.csv, blocks.png / blocks.csv.

    Args:
        fisher: {param name: tensor shaped like the param}, the Fisher scores.
        model: the model they were computed on (its dropout sites and blocks).
        out_dir: the profile folder.
        title: a prefix of the figures' titles.
        claims: {file name: Claim} of the figures (``claim_profile(...).figures``), whose stamps they
            carry; None: ``outputs.figure_metadata``'s.
    """
    check_fisher_matches(fisher, model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = parameter_profile(fisher)
    quantiles = _quantile_rows(values)
    sites = site_profile(model, fisher)
    blocks = block_profile(fisher)
    claims = claims or {}
    paths = {"parameter_quantiles": "parameter_quantiles.csv", "parameters_png": "parameters.png",
             "tensors": "tensors.csv", "blocks": "blocks.csv", "sites": "sites.csv", "blocks_png": "blocks.png",
             "sites_png": "sites.png"}
    aside = {what: staged_path(out / name) for what, name in paths.items()}
    write_csv(quantiles, aside["parameter_quantiles"])
    plot_parameter_profile(quantiles, len(values), int((values == 0).sum()), aside["parameters_png"], title,
                           claims.get("parameters.png"))
    write_csv(tensor_profile(fisher), aside["tensors"])
    write_csv(blocks, aside["blocks"])
    write_csv(sites, aside["sites"])
    top_block = max(b["mean"] for b in blocks) or 1.0
    plot_bars([b["block"] for b in blocks], [b["mean"] / top_block for b in blocks], "#1f4e79", aside["blocks_png"],
              "mean Fisher per element, relative to the largest block", title, claim=claims.get("blocks.png"))
    kinds = {s["kind"]: _KIND_COLORS.get(s["kind"], _KIND_COLORS["other"]) for s in sites}
    plot_bars([s["site"] for s in sites], [s["normalized"] for s in sites], [kinds[s["kind"]] for s in sites],
              aside["sites_png"], "site score (element-weighted mean Fisher), relative to the largest site", title,
              legend=kinds, claim=claims.get("sites.png"))
    replace_together([(aside[what], out / name) for what, name in paths.items()])
    return {what: out / name for what, name in paths.items()}


@dataclass
class ProfileResult(StageResult):
    """What ``run_profile`` wrote: ``files``, {what: path} of every table and figure (``path``: the folder)."""

    files: Dict[str, Path]


def run_profile(settings: ProfileSettings, *, out: PathLike, model: Optional[LoadedModel] = None,
                overwrite: bool = False) -> ProfileResult:
    """The profile stage: read a Fisher file, check it against its model, write every view under ``out``.

    The model only gives shapes and dropout sites, so a checkpoint without its pretraining head is
    accepted (and the CPU, the spec's default device, is enough).

    Args:
        settings: the Fisher file and the model it was computed on (``ProfileSettings(fisher=...)``).
        out: the folder to write into (made if missing).
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``).
        overwrite: replace files in ``out`` that a profile did not write.

    Returns:
        a ProfileResult.

    Raises:
        UsageError: ``out`` is a file, the Fisher file is unreadable or was computed on another
            model; ``OutputRefused`` for foreign files in ``out`` unless ``overwrite``.
    """
    from ..fisher import check_fisher_model, load_fisher
    from ..identity import model_fingerprint

    out = check_output_folder(out, "out")  # a file, or a path inside one, before any work
    check_distinct_paths({"out": out}, {"fisher": settings.fisher, "model": settings.model.source})
    check_inputs(settings.model, model, [(settings.fisher, "fisher")])
    with contextlib.ExitStack() as held:
        held.enter_context(claim_output(out, "folder", overwrite))
        claims = held.enter_context(claim_profile(out, settings.fisher, overwrite))
        held.enter_context(stage_runtime(settings.model))
        fisher, meta = load_fisher(settings.fisher)
        loaded = stage_model(settings.model.replace(allow_new_head=True), model)
        weights = model_fingerprint(loaded)
        check_fisher_model(settings.fisher, meta, weights, settings.model.source)
        title = profile_title(meta, loaded.source)
        files = write_profile(fisher, loaded.model, out, title=title, claims=claims.figures)
    return ProfileResult(path=out, settings=settings, computed=len(files), total=len(files),
                         fingerprints={"model_fingerprint": weights}, files=files)
