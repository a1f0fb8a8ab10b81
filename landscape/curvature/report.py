"""One Hessian run as files.

The operator's mask for a subset, the top eigenpairs, trace and spectrum with resumable
checkpoints, the JSON report, and the eigenvectors as a direction file.

This is what ``landscape hessian`` and ``landscape directions --kind hessian`` call; everything
here raises errors in the library's terms (no command-line flags).

The report (JSON, ``FORMAT``): ``settings`` (everything that changes the numbers, as given by the caller),
``provenance`` (sample fingerprint, sizes, versions, attention used), ``loss`` at the weights, ``eigenvalues``
(descending) with their relative residuals (measured: one more product per returned vector; ``estimated_residuals``
are Lanczos' own), ``trace`` {mean, stderr (null for one probe: strict JSON has no NaN), samples}, ``spectrum``
(histogram edges, centers, density and the quadrature nodes/weights), ``vectors`` (the direction file and its
fingerprint), ``seconds`` per stage. Units: the loss is nats per target token; eigenvalues, trace and spectrum are
nats/token per (unit of parameter)².

Checkpoints: ``<prefix>.top.ckpt``, ``<prefix>.trace.ckpt``, ``<prefix>.spectrum.ckpt`` (JSON-lines journals, see
``checkpoint``), written as units finish and removed by ``remove_checkpoints`` once the report is written; a rerun
with the same settings resumes from them, one with other settings is refused.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import __version__, numerics
from ..errors import SettingsMismatch, UsageError
from ..files import PathLike, atomic_output, json_text, require_readable_file
from ..fisher.subsets import perturbable_names
from ..fisher.subsets import subset_mask as fisher_subset_mask
from ..identity import refuse_changed
from ..schema import Schema
from .checkpoint import _identity, _Journal
from .estimators import spectrum as estimate_spectrum
from .estimators import trace as estimate_trace
from .krylov import DEFAULT_BASIS_BYTES
from .lanczos import top_eigenpairs
from .operator import DEFAULT_CACHE_BYTES, HessianOperator, _ModelState

FORMAT = "landscape-hessian"
CHECKPOINTS = ("top", "trace", "spectrum")
DIRECTION_KIND = "hessian"


# ----------------------------------------------------------------------------- the operator's mask
def subset_mask(model: torch.nn.Module, fisher=None, subset: str = "all", seed: int = 0,
                ignore: str = "biasbn", granularity: str = "global") -> Optional[dict]:
    """The mask of the Hessian restricted to a subset of parameters (P·H·P), or None for all of them.

    The coordinates are the perturbable elements, as for directions (``ignore``: 'biasbn' leaves
    out 1-D tensors, 'none' keeps every trainable element), restricted to the subset of
    ``fisher.subsets.subset_mask`` ('top:K' / 'bottom:K' / 'random:K' by Fisher score, seeded by
    ``seed``; 'all'; 'adapter'), which refuses what it cannot make.  ``fisher``: scores (a dict or
    a Fisher file's path) or None; ``granularity``: 'global' | 'tensor' (``fisher_mask``).

    Returns:
        {param name: bool tensor shaped like the param}, or None when the mask keeps every
        trainable element.
    """
    mask = fisher_subset_mask(model, fisher, subset, seed=seed, ignore=ignore, granularity=granularity)
    if mask is not None or ignore == "none":
        return mask
    keep = set(perturbable_names(model, ignore))  # 'all' without scores: every perturbable element
    return {n: torch.full(tuple(p.shape), n in keep, dtype=torch.bool) for n, p in model.named_parameters()}


def mask_size(model: torch.nn.Module, mask: Optional[dict]) -> int:
    """Number of trainable elements the mask keeps (all of them for None)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if mask is None:
        return sum(p.numel() for _, p in params)
    return sum(int(torch.as_tensor(mask[n]).sum()) for n, _ in params if n in mask)


# ----------------------------------------------------------------------------- the eigenvectors as directions
def save_eigenvectors(path, vectors: list, values, settings: Optional[dict] = None) -> str:
    """Write the top-1 (or top-2) eigenvectors as a direction file; returns its fingerprint.

    The file is an ordinary direction file (``surface`` reads it): ``xdirection`` = eigenvector 1,
    ``ydirection`` = eigenvector 2, each of unit norm over all elements (a step x = 1 moves the
    weights by 1 in Euclidean norm; near 0 the loss along it is L0 + g·x + λ·x²/2).  Attributes:
    ``kind='hessian'``, ``eigenvalues``, ``norm='unit'``, and ``settings`` (mask, sample, ...).

    Args:
        path: the direction file (.h5) to write.
        vectors: 1 or 2 eigenvectors, each {param name: float32 tensor shaped like the param}.
        values: their eigenvalues (nats/token per unit²).
        settings: further attributes to store.

    Returns:
        The file's content fingerprint.
    """
    from ..direction_file import save_directions

    vectors = list(vectors)[:2]
    values = [float(v) for v in list(values)[: len(vectors)]]
    attrs = dict(settings or {})
    attrs.update(kind=DIRECTION_KIND, eigenvalues=np.asarray(values, dtype=np.float64), norm="unit",
                 dims=len(vectors), orthogonal=True)
    return save_directions(path, vectors, attrs)


def direction_fingerprint(path) -> Optional[str]:
    """The fingerprint attribute of an existing direction file, or None."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("fingerprint")
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


# ----------------------------------------------------------------------------- the run
def checkpoint_paths(prefix) -> dict:
    """{'top', 'trace', 'spectrum'}: the journals of a run whose report goes to ``prefix``."""
    return {name: Path(f"{prefix}.{name}.ckpt") for name in CHECKPOINTS}


def remove_checkpoints(prefix) -> None:
    """Delete the journals of the run whose report goes to ``prefix`` (missing ones are fine)."""
    for path in checkpoint_paths(prefix).values():
        path.unlink(missing_ok=True)


def hessian_report(model: torch.nn.Module, batches: list, *, kind: str, top: int = 2, trace_samples: int = 0,
                   spectrum_runs: int = 0, steps: int = 80, bins: int = 200, mask: Optional[dict] = None,
                   seed: int = 0, tol: float = 1e-4, max_iter: int = 500, checkpoint=None, vectors=None,
                   vector_settings: Optional[dict] = None, settings: Optional[dict] = None,
                   cache_bytes: int = DEFAULT_CACHE_BYTES, progress: bool = False, hvp: str = "exact",
                   log: Optional[Callable[[str], None]] = None, basis_bytes: int = DEFAULT_BASIS_BYTES) -> dict:
    """Top eigenpairs, trace and spectrum of the loss Hessian (P·H·P with ``mask``), as a report dict.

    One ``HessianOperator`` serves every estimator, so the sample's first-order graphs are built
    once (while they fit ``cache_bytes``) and the attention fallback happens once.

    Args:
        model: a transformers LM (masked, causal, seq2seq or classifier), any device.
        batches: list of batch dicts (B, T) on the model's device, with ``labels`` (the loss is the
            one surfaces report).
        kind: the objective (``models.LoadedModel.kind``).
        top: eigenpairs (0: none).
        trace_samples: Hutchinson probes (0: no trace).
        spectrum_runs: SLQ runs of ``steps`` Lanczos steps (0: no spectrum).
        steps: Lanczos steps per SLQ run.
        bins: histogram bins of the spectrum.
        mask: {param name: bool tensor shaped like the param}; None keeps every element.
        seed: seeds the Lanczos start vector, the probes and the SLQ start vectors.
        tol: the eigenpairs' relative residual tolerance.
        max_iter: the eigenpairs' Hessian-vector product budget.
        checkpoint: path prefix of the journals (``checkpoint_paths``); None: no resume.
        vectors: path of a direction file for the top-1/top-2 eigenvectors (needs top >= 1), with
            ``vector_settings`` as its attributes.
        vector_settings: attributes of the direction file ``vectors``.
        settings: stored as the report's ``settings`` (identifies the run; see ``check_existing_report``).
        cache_bytes: budget for the cached first-order graphs (see ``HessianOperator``).
        hvp: "exact" or "difference": how each Hessian-vector product is formed (``HessianOperator``).
        basis_bytes: a Lanczos basis (eigenpairs', each spectrum run's) beyond this goes to a file (``krylov``).
        progress: tqdm bars over products.
        log: called with one line per finished stage (e.g. ``print``).

    Returns:
        The report dict (the contract of ``check_report``).

    Raises:
        UsageError: nothing to compute, negative counts, or eigenvectors asked without eigenpairs.
    """
    _check_counts(top, trace_samples, spectrum_runs, vectors)
    say = log or (lambda line: None)
    paths = checkpoint_paths(checkpoint) if checkpoint is not None else {}
    # One operator for every stage: one cache of first-order graphs, one attention fallback.
    op = HessianOperator(model, batches, mask, kind, cache_bytes=cache_bytes, hvp=hvp)
    report = {"format": FORMAT, "settings": dict(settings or {}), "provenance": _provenance(model, op),
              "loss": _loss(model, op), "eigenvalues": None, "eigenpairs": None, "trace": None, "spectrum": None,
              "vectors": None, "warnings": [], "seconds": {}}
    common = dict(seed=seed, progress=progress, basis_bytes=basis_bytes)
    fallback = []

    def show(message, category, filename, lineno, file=None, line=None):
        # Said at once, and once, however many stages the fallback is reported to.
        text = str(message)
        if "attention" in text:
            if not fallback:
                fallback.append(text)
                say(f"note: {text}")
        elif text not in report["warnings"]:
            report["warnings"].append(text)
            say(f"warning: {text}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            with op:
                _stages(report, op, (int(top), int(trace_samples), int(spectrum_runs), int(steps), int(bins)),
                        common, (float(tol), int(max_iter)), paths, (vectors, vector_settings), say)
        finally:
            op.clear()
    if log is None:
        for text in fallback[:1] + report["warnings"]:
            warnings.warn(text, stacklevel=2)
    report["provenance"]["attention_fallback"] = fallback[0] if fallback else ""
    return report


def _stages(report, op, counts, common, tolerance, paths, vectors, say):
    """The eigenpairs, trace and spectrum into ``report``, all on ``op``.

    counts = (top, trace samples, spectrum runs, steps, bins); tolerance = (tol, max_iter);
    vectors = (path or None, its attributes).
    """
    top, trace_samples, spectrum_runs, steps, bins = counts
    if top:
        start = time.perf_counter()
        report.update(_top(op, top, common, *tolerance, paths.get("top"), *vectors))
        report["seconds"]["eigenpairs"] = round(time.perf_counter() - start, 3)
        say(f"top eigenvalues: {', '.join(f'{v:.6g}' for v in report['eigenvalues'])} "
            f"({report['eigenpairs']['products']} products, largest relative residual "
            f"{max(report['eigenpairs']['residuals']):.1e})")
    if trace_samples:
        _add_trace(report, op, trace_samples, common, paths.get("trace"), say)
    if spectrum_runs:
        _add_spectrum(report, op, (spectrum_runs, steps, bins), common, paths.get("spectrum"), say)


def _check_counts(top, trace_samples, spectrum_runs, vectors):
    if int(top) < 0 or int(trace_samples) < 0 or int(spectrum_runs) < 0:
        raise UsageError("the numbers of eigenpairs, trace probes and spectrum runs must be 0 or more")
    if not (top or trace_samples or spectrum_runs):
        raise UsageError("nothing to compute: ask for eigenpairs, a trace or a spectrum")
    if vectors is not None and int(top) < 1:
        raise UsageError("eigenvectors need at least one eigenpair")


def _add_trace(report, op, samples, common, journal_path, say):
    """The Hutchinson trace (mean ± standard error) into ``report``, with its seconds."""
    start = time.perf_counter()
    mean, stderr = estimate_trace(op, samples=samples, checkpoint=journal_path, seed=common["seed"],
                                  progress=common["progress"])  # no basis
    report["trace"] = {"mean": mean, "stderr": stderr, "samples": samples, "probe": "rademacher",
                       "per_coordinate": mean / op.dim}
    report["seconds"]["trace"] = round(time.perf_counter() - start, 3)
    say(f"trace: {mean:.6g} ± {stderr:.2g} (standard error, {samples} probes)")


def _add_spectrum(report, op, sizes, common, journal_path, say):
    """The SLQ spectral density into ``report``, with its seconds; sizes = (runs, steps, bins)."""
    runs, steps, bins = sizes
    start = time.perf_counter()
    density = estimate_spectrum(op, runs=runs, steps=steps, bins=bins, checkpoint=journal_path, **common)
    report["spectrum"] = dict(density.to_dict(), runs=runs, steps=steps, bins=bins, ritz_mean=density.ritz_mean)
    report["seconds"]["spectrum"] = round(time.perf_counter() - start, 3)
    say(f"spectrum: {runs} runs x {steps} steps, Ritz values in "
        f"[{min(min(n) for n in density.nodes):.4g}, {max(max(n) for n in density.nodes):.4g}]")


def _top(op, k, common, tol, max_iter, journal_path, vectors, vector_settings):
    identity = _identity(op, "top", common["seed"], k=k, tol=tol, max_iter=max_iter, residuals="measured")
    journal = _Journal(journal_path, identity, _top_record(k)) if journal_path is not None else None
    record = journal.records.get(0) if journal else None
    want_file = vectors is not None
    reuse = record is not None and (not want_file or (
        record.get("fingerprint") is not None and direction_fingerprint(vectors) == record["fingerprint"]))
    if reuse:
        journal.say_resumed(k, k, "eigenpairs", common["progress"])
        values, info = record["values"], record["info"]
        fingerprint = record.get("fingerprint")
    else:
        values, vecs, lanczos = top_eigenpairs(op, k=k, tol=tol, max_iter=max_iter, return_info=True, **common)
        values = [float(v) for v in values]
        info = {"products": lanczos.products, "residuals": lanczos.residuals, "converged": lanczos.converged,
                "estimated_residuals": lanczos.estimated}
        dicts = [op.to_dict(v) for v in vecs[:2]] if want_file else None  # a collective on a sharded model
        fingerprint = save_eigenvectors(vectors, dicts, values, vector_settings) if want_file and op.writes else None
        if journal:
            journal.add(0, values=values, info=info, fingerprint=fingerprint)
    out = {"eigenvalues": values, "eigenpairs": dict(info, k=k, tol=tol, max_iter=max_iter)}
    if want_file:
        out["vectors"] = {"path": str(vectors), "fingerprint": fingerprint, "count": min(k, 2)}
    return out


def _top_record(k: int):
    """The schema of the top journal's record: k finite eigenvalues, their info, a fingerprint."""
    def check(record: dict, schema, where: str) -> None:
        schema.numbers(schema.field(record, "values", where), f"{where}: values", length=k)
        _check_eigenpairs(schema, schema.field(record, "info", where), k, f"{where}: info")
        fingerprint = schema.field(record, "fingerprint", where, optional=True)
        if fingerprint is not None:
            schema.text(fingerprint, f"{where}: fingerprint")
    return check


def _check_eigenpairs(schema, info, k: int, where: str) -> None:
    schema.mapping(info, where)
    schema.numbers(schema.field(info, "residuals", where), f"{where}.residuals", length=k, minimum=0.0)
    schema.integer(schema.field(info, "products", where), f"{where}.products", minimum=k)
    schema.boolean(schema.field(info, "converged", where), f"{where}.converged")


def _loss(model, op: HessianOperator) -> float:
    """The loss at the weights (eval mode, float32 as the products see it)."""
    from ..data.objectives import sequence_losses

    state = _ModelState(model)
    try:
        with torch.no_grad():
            parts = [sequence_losses(model, b, op.kind) for b in op.batches]
    finally:
        state.restore()
    tokens = float(sum(float(p.n_tokens.sum()) for p in parts))
    return float(sum(float(p.loss_sum.sum()) for p in parts)) / tokens if tokens else float("nan")


def _provenance(model, op: HessianOperator) -> dict:
    from ..identity import sample_fingerprint

    return {"sample_fingerprint": sample_fingerprint(op.batches),
            "n_samples": int(sum(b["labels"].shape[0] for b in op.batches)),
            "n_target_tokens": int(sum(int((b["labels"] != -100).sum()) for b in op.batches)),
            "objective": op.kind, "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "n_coordinates": int(op.dim), "dtype": numerics.held_dtype(model),
            "device": str(op.device), "landscape": __version__, "torch": torch.__version__,
            "python": platform.python_version(),
            "units": "loss: nats per target token; eigenvalues, trace, spectrum: nats/token per unit^2"}


# ----------------------------------------------------------------------------- the report file
def save_report(path, report: dict) -> Path:
    """Write a report as JSON (atomically)."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json_text(report, indent=1) + "\n")
    return Path(path)


def load_report(path: PathLike) -> dict:
    """Read a report written by ``save_report`` (UsageError if it is not one)."""
    path = require_readable_file(path, "Hessian report")
    try:
        report = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"'{path}' is not a Hessian report (not JSON); make one with `landscape hessian`") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise UsageError(f"'{path}' is not a Hessian report; make one with `landscape hessian`")
    if isinstance(report.get("trace"), dict) and report["trace"].get("stderr", 0) is None:
        report["trace"]["stderr"] = float("nan")  # strict JSON's null for one probe's undefined error
    check_report(report, path)
    return report


def check_report(report: dict, path) -> None:
    """Check the report's schema (DamagedFile, one line, at the first field that breaks it).

    The schema: ``settings`` and ``provenance`` objects, ``n_coordinates`` >= 1, a finite ``loss``; at least one of
    ``eigenvalues`` (finite, descending, with ``eigenpairs``: a residual >= 0 each, products,
    converged), ``trace`` (finite mean, stderr >= 0 or NaN for one probe, samples >= 1) and
    ``spectrum`` (strictly increasing finite edges, one density >= 0 per bin integrating to 1,
    per run as many nodes as weights); ``vectors`` null or an object with a path.
    """
    schema = Schema("Hessian report", path, "make it again with `landscape hessian`")
    schema.mapping(schema.field(report, "settings"), "settings")
    provenance = schema.mapping(schema.field(report, "provenance"), "provenance")
    schema.integer(schema.field(provenance, "n_coordinates", "provenance"), "provenance.n_coordinates", minimum=1)
    schema.number(schema.field(report, "loss"), "loss")
    values = schema.field(report, "eigenvalues", optional=True)
    if values is not None:
        values = schema.numbers(values, "eigenvalues")
        if not len(values) or np.any(np.diff(values) > 0):
            schema.fail("is damaged: 'eigenvalues' is empty or not in descending order")
        _check_eigenpairs(schema, schema.field(report, "eigenpairs"), len(values), "eigenpairs")
    trace = schema.field(report, "trace", optional=True)
    if trace is not None:
        schema.mapping(trace, "trace")
        samples = schema.integer(schema.field(trace, "samples", "trace"), "trace.samples", minimum=1)
        schema.number(schema.field(trace, "mean", "trace"), "trace.mean")
        schema.number(schema.field(trace, "stderr", "trace"), "trace.stderr", minimum=0.0, allow_nan=samples == 1)
    spectrum = schema.field(report, "spectrum", optional=True)
    if spectrum is not None:
        _check_spectrum(schema, schema.mapping(spectrum, "spectrum"))
    if values is None and trace is None and spectrum is None:
        schema.fail("holds no eigenvalues, trace or spectrum")
    vectors = schema.field(report, "vectors", optional=True)
    if vectors is not None:
        schema.text(schema.field(schema.mapping(vectors, "vectors"), "path", "vectors"), "vectors.path")


def _check_spectrum(schema, spectrum: dict) -> None:
    edges = schema.numbers(schema.field(spectrum, "edges", "spectrum"), "spectrum.edges", increasing=True)
    if len(edges) < 2:
        schema.fail("is damaged: 'spectrum.edges' needs at least 2 values")
    density = schema.numbers(schema.field(spectrum, "density", "spectrum"), "spectrum.density",
                             length=len(edges) - 1, minimum=0.0)
    if abs(float(np.sum(density * np.diff(edges))) - 1) > 1e-6:
        schema.fail("is damaged: 'spectrum.density' does not integrate to 1")
    for key in ("runs", "steps", "bins"):
        schema.integer(schema.field(spectrum, key, "spectrum"), f"spectrum.{key}", minimum=1)
    nodes, weights = schema.field(spectrum, "nodes", "spectrum"), schema.field(spectrum, "weights", "spectrum")
    if not isinstance(nodes, list) or not isinstance(weights, list) or len(nodes) != len(weights):
        schema.fail("is damaged: 'spectrum.nodes' and 'spectrum.weights' are not lists of one entry per run")
    for run, (n, w) in enumerate(zip(nodes, weights)):
        count = len(schema.numbers(n, f"spectrum.nodes[{run}]"))
        schema.numbers(w, f"spectrum.weights[{run}]", length=count, minimum=0.0)


def check_existing_report(path, settings: dict) -> Optional[dict]:
    """The report already at ``path`` when it was made with ``settings``.

    Args:
        path: the report (.json).
        settings: this run's settings.

    Returns:
        The report dict, or None when there is none.

    Raises:
        SettingsMismatch: it was made with other settings.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        old = load_report(path)
    except UsageError:
        raise SettingsMismatch(f"'{path}' exists but is not a Hessian report") from None
    refuse_changed(path, old.get("settings", {}), settings, holds="a Hessian report")
    return old


def report_numbers(report: dict) -> dict:
    """The sharpness columns of a report: top_eigenvalue, trace, trace_stderr (NaN when absent)."""
    values = report.get("eigenvalues") or []
    trace = report.get("trace") or {}
    return {"top_eigenvalue": float(values[0]) if values else float("nan"),
            "trace": float(trace.get("mean", float("nan"))), "trace_stderr": float(trace.get("stderr", float("nan")))}
