"""The curvature stage as one call each: a Hessian report, or eigenvectors as directions.

``run_hessian`` writes a Hessian report (what ``landscape hessian`` does), ``eigen_directions``
writes the top eigenvectors as a direction file (the ``hessian`` kind of ``make_directions``).

Both load the model and the sample, restrict the Hessian to a Fisher subset when asked (P·H·P),
store every setting that changes the numbers with the model's and the sample's fingerprints, claim
their outputs (``outputs.claim_output``) and refuse an output made with other settings unless
``overwrite``.  Errors are ``UsageError`` in the library's terms.
"""

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from .. import adapters, checks
from ..direction_file import check_existing_directions
from ..errors import SettingsMismatch, UsageError
from ..files import PathLike, check_distinct_paths, check_output_path, replace_together, staged_path
from ..identity import MODEL_KEY, model_fingerprint, sample_fingerprint
from ..inputs import check_inputs, sample_batches, stage_model, stage_runtime
from ..models import LoadedModel, ModelSource, loaded_model, model_id
from ..outputs import claim_output
from ..results import StageResult
from ..settings import HVP_METHODS, HessianSettings, SampleSpec
from .report import (
    check_existing_report,
    direction_fingerprint,
    hessian_report,
    mask_size,
    remove_checkpoints,
    save_eigenvectors,
    save_report,
    subset_mask,
)

Log = Optional[Callable[[str], None]]
H5_SUFFIXES = (".h5", ".hdf5")


@dataclass
class HessianResult(StageResult):
    """What ``run_hessian`` wrote.

    ``StageResult``'s ``computed``: the estimates this call ran, 0 when the report was already
    complete with these settings; ``total``: the estimates asked for.  ``vectors``: the
    eigenvectors' direction file, or None; ``report``: the report as a dict (eigenvalues, trace,
    spectrum, settings, provenance; see ``report``).
    """

    vectors: Optional[Path]
    report: dict


def _fisher(fisher, subset, ignore):
    """(Fisher scores or None, the file's metadata, the subset) for a subset of the Hessian.

    A subset the Fisher file does not allow is refused (``fisher.subsets.check_subset``) before
    the file is read.
    """
    from ..fisher import load_fisher
    from ..fisher.subsets import check_subset

    subset = subset or "all"
    check_subset(subset, fisher, ignore)
    if fisher is not None:
        return (*load_fisher(fisher), subset)
    return None, {}, subset


def _masked(loaded: LoadedModel, model: ModelSource, fisher, seed, ignore, granularity, fisher_scores):
    """(the operator's mask, the masking settings, the model's fingerprint).

    A Fisher file computed on another model is refused first.  fisher_scores: what ``_fisher`` gave.
    """
    from ..fisher import check_fisher_model

    scores, meta, subset = fisher_scores
    weights = model_fingerprint(loaded)
    if fisher is not None:
        check_fisher_model(fisher, meta, weights, loaded.source if isinstance(model, LoadedModel) else model)
    mask = subset_mask(loaded.model, scores, subset, seed=seed, ignore=ignore, granularity=granularity)
    masking = {"fisher": str(Path(fisher).resolve()) if fisher is not None else "",
               "fisher_provenance": str(meta.get("corpus", "")), "subset": subset, "mask_seed": int(seed),
               "mask_granularity": granularity, "ignore": ignore}
    return mask, masking, weights


def run_hessian(settings: Optional[HessianSettings] = None, *, out: PathLike, vectors: Optional[PathLike] = None,
                model: Optional[LoadedModel] = None,
                overwrite: bool = False, progress: bool = False, log: Log = None) -> HessianResult:
    """Top eigenpairs, trace and spectral density of the loss Hessian, written as a JSON report.

    The loss is the one surfaces report (token-weighted mean cross-entropy over the sample, eval
    mode).  Long runs keep journals next to ``out`` (``OUT.top.ckpt``, ...); the same call resumes.

    Args:
        settings: the model, the sample (its seed also seeds random masks, the Lanczos start vector
            and the probes), what to compute and the subset (None: ``HessianSettings()``).
        out: the report (.json) to write.
        vectors: also write the top-1/top-2 eigenvectors to this direction file (.h5).
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``).
        overwrite: replace outputs made with other settings (or holding something else).
        progress: progress bars on stderr.
        log: called with one line per stage (None: silent, warnings stay Python warnings).

    Returns:
        A ``HessianResult``.

    Raises:
        UsageError: eigenvectors asked for without eigenpairs, a subset without a Fisher file, a
            Fisher file of another model, a loaded model the settings do not describe, or outputs
            that may not be written (``OutputRefused``, ``OutputBusy``, ``SettingsMismatch``).
    """
    settings = settings or HessianSettings()
    out = check_output_path(out, "out", [".json"])
    vectors = check_output_path(vectors, "vectors", H5_SUFFIXES) if vectors is not None else None
    if vectors is not None and settings.top < 1:
        raise UsageError("eigenvectors need at least one eigenpair")
    check_distinct_paths({"out": out, "vectors": vectors},
                         {"fisher": settings.fisher, "corpus": settings.sample.corpus, "model": settings.model.source})
    check_inputs(settings.model, model, [(settings.fisher, "fisher")])
    with claim_output(out, "hessian-report", overwrite=overwrite), stage_runtime(settings.model), \
            (claim_output(vectors, "directions", overwrite=overwrite) if vectors else contextlib.nullcontext()):
        return _run_hessian(out, vectors, settings, model, overwrite, progress, log)


def _run_hessian(out, vectors, s: HessianSettings, model, overwrite, progress, log) -> HessianResult:
    from ..runtime import barrier, join_torchrun

    device, rank, world = join_torchrun(s.model.device)
    # Under torchrun every rank computes (a group's products are collectives) and rank 0 writes.
    progress, log, writes = progress and rank == 0, log if rank == 0 else None, rank == 0
    loaded, batches, mask, sample, masking = _prepare(s, model, device)
    seed = s.sample.seed
    # The report's own spellings (``corpus_seed``, ``precision``, ``mask_granularity``): reports written before resume.
    recorded = dict(sample, **masking, batch_size=s.sample.batch_size, seed=seed, top=s.top, tol=s.tol,
                    max_iter=s.max_iter, trace=s.trace, spectrum=s.spectrum, steps=s.steps if s.spectrum else None,
                    bins=s.bins if s.spectrum else None, vectors=str(vectors) if vectors else "",
                    # Recorded only when not exact: reports written before the option keep resuming.
                    **({} if s.hvp == "exact" else {"hvp": s.hvp}))
    n_selected = mask_size(loaded.model, mask)
    n_parameters = sum(p.numel() for p in loaded.model.parameters())
    vector_settings = dict(sample, **masking, seed=seed, tol=s.tol, n_selected=n_selected,
                           n_parameters=n_parameters, source="landscape hessian",
                           **({} if s.hvp == "exact" else {"hvp": s.hvp}))
    total = s.top + s.trace + s.spectrum
    result = dict(path=out, settings=s, total=total, fingerprints={MODEL_KEY: sample[MODEL_KEY]}, vectors=vectors)
    done = None if overwrite else _finished(out, recorded, vectors, vector_settings)
    if done is not None:
        return HessianResult(computed=0, report=done, **result)
    if log is not None:
        log(_header(loaded, batches, n_selected, n_parameters, masking, s.sample.seq_len))
    if s.model.shard_size > 1:  # its numbers differ from one process's by rounding: not taken for them
        recorded["shard_size"] = s.model.shard_size
    report = _write(out, vectors, writes, lambda aside: _ranks(hessian_report(
        loaded.model, batches, kind=loaded.kind, top=s.top, trace_samples=s.trace, spectrum_runs=s.spectrum,
        steps=s.steps, bins=s.bins, mask=mask, seed=seed, tol=s.tol, max_iter=s.max_iter,
        checkpoint=out if world == 1 else None, vectors=aside, vector_settings=vector_settings, settings=recorded,
        cache_bytes=int(s.cache_mb * 2**20), basis_bytes=int(s.basis_mb * 2**20), hvp=s.hvp,
        progress=progress, log=log), world, s.model.shard_size))
    barrier()
    return HessianResult(computed=total, report=report, **result)


def _ranks(report: dict, world: int, shard_size: int) -> dict:
    """``report`` with the ranks that computed it in its provenance (as a Fisher file records them)."""
    if world > 1:
        report["provenance"].update(ranks=world, shard_size=shard_size)
    return report


def _write(out, vectors, writes: bool, compute) -> dict:
    """The report ``compute(where the vectors go)`` makes, written with its vectors as one result.

    Both are written aside and move into place together, so an interrupted run (with overwrite: a
    replacement) leaves the finished pair as it was.  Only where ``writes`` (rank 0 under
    torchrun): the other ranks compute with it and write nothing.
    """
    staged = [(staged_path(vectors), vectors)] if vectors is not None else []
    report = compute(staged[0][0] if staged else None)  # every rank gathers the vectors; rank 0 writes them
    if report.get("vectors"):
        report["vectors"]["path"] = str(vectors)
    if writes:
        save_report(staged_path(out), report)
        replace_together([*staged, (staged_path(out), out)])
        remove_checkpoints(out)
    return report


def _header(loaded, batches, n_selected, n_parameters, masking, seq_len) -> str:
    """What a run is about to compute, in one line."""
    return (f"Hessian of {loaded.source} over {n_selected:,} of {n_parameters:,} parameters "
            f"({100.0 * n_selected / max(1, n_parameters):.2f}%, subset {masking['subset']}, ignore "
            f"{masking['ignore']}); sample of {sum(b['labels'].shape[0] for b in batches)} sequences x {seq_len} "
            "tokens")


def _prepare(settings: HessianSettings, model, device=None):
    """(loaded model, batches, mask, the sample's identity, the mask's settings) of a run.

    With ``settings.model.shard_size`` K under torchrun, the model is sharded over groups of K
    ranks with FSDP2 (``sharding.shard_layout``).
    """
    from ..data.corpus import describe_framing
    from ..sharding import shard_layout

    spec, sample = settings.model, settings.sample
    scores = _fisher(settings.fisher, settings.subset, settings.ignore)  # refused before the model is loaded
    loaded = stage_model(spec, model, shard_layout(spec.shard_size), device, corpora=[sample.corpus])
    mask, masking, weights = _masked(loaded, spec.source, settings.fisher, sample.seed, settings.ignore,
                                     settings.granularity, scores)
    batches = sample_batches(loaded, sample)
    identity = {"model": model_id(loaded), "corpus": str(sample.corpus or "embedded"), "fraction": sample.fraction,
                "max_samples": sample.max_samples, "seq_len": sample.seq_len, "corpus_seed": sample.seed,
                "framing": describe_framing(loaded.tokenizer, sample.bos), "precision": spec.dtype,
                MODEL_KEY: weights, **adapters.record(loaded)}
    return loaded, batches, mask, identity, masking


def _finished(out, settings, vectors, vector_settings) -> Optional[dict]:
    """The report at ``out`` when it is complete with these settings (and its vectors unchanged).

    None when the run is to be made; SettingsMismatch when ``out`` or ``vectors`` hold other settings.
    """
    done = check_existing_report(out, settings)
    if done is not None and (vectors is None or (done.get("vectors") or {}).get("fingerprint")
                             == direction_fingerprint(vectors)):
        return done
    if vectors is not None:
        check_existing_directions(vectors, dict(vector_settings, kind="hessian", norm="unit"))
        _check_method(vectors, vector_settings.get("hvp", "exact"))
    return None


def _check_method(path, hvp: str) -> None:
    """SettingsMismatch when the direction file at ``path`` holds eigenvectors of the other product.

    The file records ``hvp`` only when not exact, and ``check_existing_directions`` compares only the
    attributes both sides have, so an absent one is read here as "exact".
    """
    try:
        with h5py.File(path, "r") as handle:
            before = handle.attrs.get("hvp", "exact")
    except (FileNotFoundError, OSError):  # none yet, or not HDF5 (check_existing_directions says so)
        return
    before = before.decode() if isinstance(before, bytes) else str(before)
    if before != hvp:
        raise SettingsMismatch(f"'{path}' holds directions made with other settings (hvp={before!r}, this run "
                               f"has hvp={hvp!r})")


def eigen_directions(out, model: ModelSource = None, *, dims=2, fisher=None, subset="all", granularity="global",
                     ignore="biasbn", seed=0, corpus=None, max_samples=64, seq_len=128, batch_size=16, sample_seed=0,
                     bos="auto", tol=1e-4, device="auto", allow_new_head=False, overwrite=False, progress=False,
                     log: Log = None, hvp: str = "exact") -> dict:
    """Write the top-1 (``dims=1``) or top-2 Hessian eigenvectors as a direction file (unit norm).

    Args:
        out: the direction file (.h5) to write.
        model: hub id, ``from_pretrained`` folder, None (the embedded model) or a ``LoadedModel``;
            loaded in float32.
        dims: 1 or 2 eigenvectors.
        fisher: a Fisher file's path, for ``subset`` (None: no Fisher subset).
        subset: 'top:K' | 'bottom:K' | 'random:K' | 'all' | 'adapter', as for ``run_hessian``.
        granularity: 'global' | 'tensor', as for ``run_hessian``.
        ignore: 'biasbn' | 'none', as for ``run_hessian``.
        seed: seeds the Lanczos start vector and random masks.
        corpus: the sample's corpus (None: the embedded corpus).
        max_samples: sequences in the sample (the default of ``landscape surface``).
        seq_len: tokens per sequence.
        batch_size: sequences per forward pass.
        sample_seed: seed of the sample, as ``surface``'s.
        bos: 'auto' | 'yes' | 'no'.
        tol: eigenpairs converge when |Hv − λv| <= tol·|λ|.
        device: auto | cpu | cuda | cuda:N.
        allow_new_head: accept a checkpoint without its pretraining head.
        overwrite: replace an output made with other settings (or holding something else).
        progress: a progress bar on stderr.
        log: called with each warning as a line 'note: ...' (None: they stay Python warnings).
        hvp: "exact" or "difference": how the Hessian-vector products are formed (``HessianOperator``);
            recorded in the file (as ``hvp``) only when not exact.

    Returns:
        The attributes written: ``kind='hessian'``, ``eigenvalues`` (dims,) descending in
        nats/token per unit², the mask and sample settings with ``model_fingerprint`` and
        ``sample_fingerprint``, ``n_selected``, ``n_parameters``, ``fingerprint``.

    Raises:
        UsageError: as ``run_hessian``, or dims other than 1 or 2.
    """
    from ..data.corpus import describe_framing, load_batches
    from .lanczos import top_eigenpairs
    from .operator import HessianOperator

    if dims not in (1, 2):
        raise UsageError(f"dims must be 1 or 2, got {dims}")
    if hvp not in HVP_METHODS:
        raise UsageError(f"the Hessian-vector product must be one of {', '.join(HVP_METHODS)}, got {hvp!r}")
    tol = checks.OPEN_UNIT.check(tol, "tol")
    SampleSpec(corpus, None, max_samples, seq_len, batch_size, sample_seed, bos)  # refuses a setting out of its domain
    with claim_output(out, "directions", overwrite=overwrite):
        scores = _fisher(fisher, subset, ignore)
        loaded = loaded_model(model, allow_new_head, device=device, dtype="float32")
        mask, masking, weights = _masked(loaded, model, fisher, seed, ignore, granularity, scores)
        batches = load_batches(loaded, corpus=corpus, max_samples=max_samples, seq_len=seq_len,
                               batch_size=batch_size, seed=sample_seed, bos=bos)
        settings = dict(masking, kind="hessian", norm="unit", model=model_id(loaded), model_fingerprint=weights,
                        **adapters.record(loaded), corpus=str(corpus or "embedded"), max_samples=max_samples,
                        seq_len=seq_len, corpus_seed=sample_seed, framing=describe_framing(loaded.tokenizer, bos),
                        sample_fingerprint=sample_fingerprint(batches), seed=seed, tol=tol,
                        n_selected=mask_size(loaded.model, mask),
                        n_parameters=sum(p.numel() for p in loaded.model.parameters()),
                        **({} if hvp == "exact" else {"hvp": hvp}))
        if not overwrite:
            check_existing_directions(out, settings)
            _check_method(out, hvp)
        with warnings.catch_warnings():  # the attention fallback and non-convergence, one line each
            if log is not None:
                warnings.simplefilter("always")
                warnings.showwarning = lambda message, *rest, **kw: log(f"note: {message}")
            hessian = HessianOperator(loaded.model, batches, mask, loaded.kind, hvp=hvp)
            values, vectors = top_eigenpairs(hessian, k=dims, seed=seed, tol=tol, progress=progress)
        fingerprint = save_eigenvectors(out, [hessian.to_dict(v) for v in vectors], values, settings)
    return dict(settings, kind="hessian", eigenvalues=np.asarray([float(v) for v in values]), norm="unit",
                dims=len(vectors[:2]), orthogonal=True, fingerprint=fingerprint)
