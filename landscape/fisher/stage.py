"""The Fisher stages as one call each.

``run_fisher`` (the Fisher file) and ``run_stability`` (the stability table), which ``landscape
fisher``, ``landscape stability``, the demo and Python users call.

Each loads its model from a spec, reads the corpus, claims its output (``outputs.claim_output``),
computes and writes the file with its settings and provenance, and returns a plain result.
"""

from dataclasses import dataclass
from typing import List, Optional

from ..files import PathLike, check_distinct_paths, check_output_path, json_text, replace_together, staged_path
from ..inputs import stage_model, stage_runtime
from ..models import LoadedModel
from ..outputs import claim_output
from ..results import StageResult
from ..settings import FisherSettings, StabilitySettings


@dataclass
class FisherResult(StageResult):
    """What ``run_fisher`` wrote (``StageResult``'s fields: samples computed and in the file).

    ``parameters`` (elements) in ``tensors`` tensors; ``samples`` packed sequences of ``seq_len``
    tokens; ``metadata``: the file's provenance.
    """

    parameters: int
    tensors: int
    samples: int
    seq_len: int
    metadata: dict


@dataclass
class StabilityResult(StageResult):
    """What ``run_stability`` wrote (``StageResult``'s fields: the reference's samples).

    ``rows`` of the table (one dict per fraction, as in the CSV); ``samples`` in the reference sample.
    """

    rows: List[dict]
    samples: int


def _samples(loaded, sample):
    """All samples of the corpus sub-sample, in seeded document order, and the pad id."""
    from ..data.corpus import load_samples
    from ..data.objectives import pad_token_id

    samples = load_samples(loaded, sample.corpus, sample.fraction, sample.max_samples, sample.seq_len, sample.seed,
                           sample.bos)
    return samples, pad_token_id(loaded.tokenizer)


def _provenance(out, loaded, settings, samples, pad, weights, overwrite):
    """The Fisher file's provenance; an existing ``out`` of other settings is refused unless overwrite."""
    from .. import adapters
    from ..data.corpus import batches as make_batches
    from ..data.corpus import describe_framing
    from ..identity import sample_fingerprint
    from .file import check_existing_fisher, provenance

    sample = settings.sample
    meta = provenance(loaded.source, sample.corpus, sample.fraction, len(samples), sample.seed,
                      max_samples=sample.max_samples, seq_len=sample.seq_len, dtype=settings.model.dtype,
                      objective=loaded.kind, framing=describe_framing(loaded.tokenizer, sample.bos),
                      model_fingerprint=weights, **adapters.record(loaded),
                      sample_fingerprint=sample_fingerprint(make_batches(samples, sample.batch_size, pad)))
    if not overwrite:
        check_existing_fisher(out, meta)
    return meta


def run_fisher(settings: Optional[FisherSettings] = None, *, out: PathLike, model: Optional[LoadedModel] = None,
               overwrite: bool = False, progress: bool = True) -> FisherResult:
    """Compute the diagonal empirical Fisher of a model on a sample and write its file.

    Interrupted runs resume from ``<out>.ckpt`` (``<out>.rankR.ckpt`` under torchrun, where the
    samples are split over the ranks); with ``settings.model.shard_size`` K, groups of K ranks hold
    one FSDP2-sharded copy of the model and the groups split the samples.

    Args:
        settings: the model, the sample and the run's settings (None: ``FisherSettings()``, the
            embedded model on every sequence of the embedded corpus).
        out: the Fisher file to write (.safetensors).
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``).
        overwrite: replace a file computed with other settings, or holding another kind of file.
        progress: a progress bar on stderr (rank 0 only).

    Returns:
        a FisherResult.

    Raises:
        UsageError: an unwritable ``out``, a loaded model the settings do not describe;
            ``OutputRefused`` or ``SettingsMismatch`` for an existing ``out`` unless ``overwrite``;
            ``OutputBusy`` when another process writes it.
    """
    settings = settings or FisherSettings()
    out = check_output_path(out, "out", [".safetensors"])
    check_distinct_paths({"out": out}, {"corpus": settings.sample.corpus, "model": settings.model.source})
    with claim_output(out, "fisher", overwrite=overwrite), stage_runtime(settings.model):
        return _run_fisher(out, settings, model, overwrite, progress)


def _run_fisher(out, settings: FisherSettings, model, overwrite, progress) -> FisherResult:
    from ..data.corpus import batches as make_batches
    from ..identity import model_fingerprint
    from ..runtime import barrier, join_torchrun
    from ..sharding import shard_layout
    from .file import save_fisher
    from .run import compute_fisher

    device, rank, world = join_torchrun(settings.model.device)
    layout = shard_layout(settings.model.shard_size)
    sample = settings.sample
    loaded = stage_model(settings.model, model, layout, device, corpora=[sample.corpus])
    samples, pad = _samples(loaded, sample)
    weights = model_fingerprint(loaded)  # of the checkpoint's files: the same on every rank, sharded or not
    meta = _provenance(out, loaded, settings, samples, pad, weights, overwrite)
    on = next(loaded.model.parameters()).device
    # Point groups split the samples as ranks do; the ranks of one group run the same ones.
    mine = samples[layout.group_index::layout.n_groups]
    shard = make_batches(mine, sample.batch_size, pad, on) if mine else []
    _say_if_long(loaded.model, len(mine), sample.seq_len, progress and rank == 0)
    identity = {"model": loaded.source, "rank": rank, "world": world, "shard_size": settings.model.shard_size,
                "batch_size": sample.batch_size, **settings.identity()}
    checkpoint = out.with_name(out.name + (f".rank{rank}" if world > 1 else "") + ".ckpt")
    fisher = compute_fisher(loaded.model, shard, kind=loaded.kind, progress=progress and rank == 0,
                            checkpoint=checkpoint, checkpoint_every=settings.checkpoint_every,
                            fingerprint=json_text(identity, sort_keys=True), max_chunk_mb=settings.max_chunk_mb,
                            layout=layout, model_fingerprint=weights)
    if layout.group_index == 0:  # every group holds the same reduced sums; group 0 writes them
        meta = dict(meta, ranks=world, **({"shard_size": settings.model.shard_size} if layout.sharded else {}))
        save_fisher(out, fisher, meta)
    barrier()
    checkpoint.unlink(missing_ok=True)
    return FisherResult(path=out, settings=settings, computed=len(samples), total=len(samples),
                        fingerprints=_fingerprints(meta), parameters=sum(t.numel() for t in fisher.values()),
                        tensors=len(fisher), samples=len(samples), seq_len=sample.seq_len, metadata=meta)


def _say_if_long(model, samples: int, seq_len: int, say: bool) -> None:
    """Before a long pass, one line on stderr with its estimate and the options that shorten it."""
    import sys

    from .budget import long_sample_note

    note = long_sample_note(model, samples, seq_len) if say else None
    if note:
        print(note, file=sys.stderr, flush=True)


def _fingerprints(meta: dict) -> dict:
    """The model's and the sample's fingerprints of a file's provenance."""
    return {key: meta[key] for key in ("model_fingerprint", "sample_fingerprint") if key in meta}


def run_stability(settings: Optional[StabilitySettings] = None, *, out: PathLike, model: Optional[LoadedModel] = None,
                  fisher_out: Optional[PathLike] = None, overwrite: bool = False,
                  progress: bool = True) -> StabilityResult:
    """Fisher stability over nested sub-samples of one reference sample (paper Table 1), as a CSV.

    The Fisher of each nested prefix of the reference sample is estimated in one pass and compared
    with the reference: top-k% overlap and Jaccard, Spearman, relative L1.

    Args:
        settings: the model, the reference sample, the fractions and the top-k percentages
            (None: ``StabilitySettings()``).
        out: the table to write (.csv).
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``).
        fisher_out: also write the reference Fisher (all samples), from the same pass, to this
            Fisher file (.safetensors), with the provenance ``run_fisher`` records; None: not written.
        overwrite: replace an ``out`` that is not a stability table (and a ``fisher_out`` of other
            settings).
        progress: a progress bar on stderr.

    Returns:
        a StabilityResult.

    Raises:
        UsageError: an unwritable output, a loaded model the settings do not describe;
            ``OutputRefused`` for an output holding another kind of file unless ``overwrite``.
    """
    import contextlib

    settings = settings or StabilitySettings()
    out = check_output_path(out, "out", [".csv"])
    fisher_out = None if fisher_out is None else check_output_path(fisher_out, "fisher_out", [".safetensors"])
    check_distinct_paths({"out": out, "fisher_out": fisher_out},
                         {"corpus": settings.sample.corpus, "model": settings.model.source})
    with contextlib.ExitStack() as held:
        held.enter_context(claim_output(out, "table", overwrite=overwrite, columns=("fraction", "samples")))
        if fisher_out is not None:
            held.enter_context(claim_output(fisher_out, "fisher", overwrite=overwrite))
        held.enter_context(stage_runtime(settings.model))
        loaded = stage_model(settings.model, model, corpora=[settings.sample.corpus])
        rows, samples, meta = _stability(out, fisher_out, loaded, settings, overwrite, progress)
    return StabilityResult(path=out, settings=settings, computed=samples, total=samples,
                           fingerprints=_fingerprints(meta or {}), rows=rows, samples=samples)


def _stability(out, fisher_out, loaded, settings, overwrite, progress):
    """(table rows, reference samples, the Fisher's provenance or None): one pass, the table written."""
    from ..data.corpus import batches as make_batches
    from ..identity import model_fingerprint
    from .file import save_fisher
    from .stability import stability_and_reference, write_csv

    samples, pad = _samples(loaded, settings.sample)
    weights = model_fingerprint(loaded)
    meta = None
    if fisher_out is not None:
        meta = _provenance(fisher_out, loaded, settings, samples, pad, weights, overwrite)
    batches = make_batches(samples, settings.sample.batch_size, pad, next(loaded.model.parameters()).device)
    _say_if_long(loaded.model, len(samples), settings.sample.seq_len, progress)
    # The one pass is the long part (the demo's Fisher): interrupted, it resumes from its checkpoint.
    checkpoint = out.with_name(out.name + ".ckpt")
    identity = {"model": loaded.source, "batch_size": settings.sample.batch_size, **settings.identity()}
    rows, reference = stability_and_reference(loaded.model, batches, list(settings.fractions), list(settings.top),
                                              kind=loaded.kind, progress=progress,
                                              max_chunk_mb=settings.max_chunk_mb, checkpoint=checkpoint,
                                              checkpoint_every=settings.checkpoint_every,
                                              fingerprint=json_text(identity, sort_keys=True),
                                              model_fingerprint=weights)
    # The table and the reference Fisher are one result: written aside, they move into place together.
    if fisher_out is not None:
        meta = dict(meta, ranks=1)
        save_fisher(staged_path(fisher_out), reference, meta)
    write_csv(rows, staged_path(out))
    replace_together([(staged_path(out), out)] + ([(staged_path(fisher_out), fisher_out)] if fisher_out else []))
    checkpoint.unlink(missing_ok=True)
    return rows, len(samples), meta
