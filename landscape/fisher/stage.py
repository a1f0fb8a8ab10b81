"""The Fisher stages as one call each.

``run_fisher`` (the Fisher file) and ``run_stability`` (the stability table), which ``landscape
fisher``, ``landscape stability``, the demo and Python users call.

Each loads its model from a spec, reads the corpus, claims its output (``outputs.claim_output``),
computes and writes the file with its settings and provenance, and returns a plain result.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .. import checks
from ..defaults import STABILITY_FRACTIONS, STABILITY_TOP
from ..errors import UsageError
from ..files import check_distinct_paths, check_output_path, replace_together, staged_path
from ..outputs import claim_output

BOS_CHOICES = ("auto", "yes", "no")


@dataclass
class FisherResult:
    """What ``run_fisher`` wrote.

    ``path``; ``parameters`` (elements) in ``tensors`` tensors; ``samples`` packed sequences of
    ``seq_len`` tokens; ``metadata``: the file's provenance.
    """

    path: Path
    parameters: int
    tensors: int
    samples: int
    seq_len: int
    metadata: dict


@dataclass
class StabilityResult:
    """What ``run_stability`` wrote.

    ``path``; ``rows`` of the table (one dict per fraction, as in
    the CSV); ``samples`` in the reference sample.
    """

    path: Path
    rows: List[dict]
    samples: int


def check_sample_settings(fraction, max_samples, seq_len, batch_size, seed, bos) -> None:
    """Refuse corpus settings outside their domains (``landscape.checks``), in library terms.

    Args:
        fraction: share of the corpus's documents in (0, 1], or None for all.
        max_samples: cap on packed sequences (>= 1), or None.
        seq_len: tokens per packed sequence.
        batch_size: sequences per forward pass (>= 1).
        seed: sub-sampling seed in [0, 2**32 - 1].
        bos: "auto", "yes" or "no".

    Raises:
        UsageError: naming the first setting out of its domain.
    """
    checks.optional(checks.fraction, fraction, "fraction")
    checks.optional(checks.positive_int, max_samples, "max_samples")
    checks.SEQ_LEN.check(seq_len, "seq_len")
    checks.positive_int(batch_size, "batch_size")
    checks.seed(seed)
    if bos not in BOS_CHOICES:
        raise UsageError(f"bos must be one of {', '.join(BOS_CHOICES)}, got {bos!r}")


def _samples(loaded, corpus, fraction, max_samples, seq_len, seed, bos):
    """All samples of the corpus sub-sample, in seeded document order, and the pad id."""
    from ..data.corpus import load_samples
    from ..data.objectives import pad_token_id

    samples = load_samples(loaded, corpus, fraction, max_samples, seq_len, seed, bos)
    return samples, pad_token_id(loaded.tokenizer)


def _load(model, corpus, dtype, device, allow_new_head, layout=None):
    from ..data.hf_datasets import check_reachable
    from ..models import load_model

    check_reachable(corpus)  # before the model is loaded for nothing
    return load_model(model, device=device, dtype=dtype, allow_new_head=allow_new_head, layout=layout)


def _provenance(out, loaded, corpus, samples, pad, o, weights):
    """The Fisher file's provenance; an existing ``out`` of other settings is refused unless overwrite."""
    from .. import adapters
    from ..data.corpus import batches as make_batches
    from ..data.corpus import describe_framing
    from ..identity import sample_fingerprint
    from .file import check_existing_fisher, provenance

    meta = provenance(loaded.source, corpus, o["fraction"], len(samples), o["seed"],
                      max_samples=o["max_samples"], seq_len=o["seq_len"], dtype=o["dtype"],
                      objective=loaded.kind, framing=describe_framing(loaded.tokenizer, o["bos"]),
                      model_fingerprint=weights, **adapters.record(loaded),
                      sample_fingerprint=sample_fingerprint(make_batches(samples, o["batch_size"], pad)))
    if not o["overwrite"]:
        check_existing_fisher(out, meta)
    return meta


def run_fisher(out, model: Optional[str] = None, corpus: Optional[str] = None, *, fraction: Optional[float] = None,
               max_samples: Optional[int] = None, seq_len: int = 128, batch_size: int = 16, seed: int = 0,
               bos: str = "auto", dtype: str = "float32", device="auto", allow_new_head: bool = False,
               shard_size: int = 1, checkpoint_every: float = 60.0, max_chunk_mb: Optional[float] = None,
               overwrite: bool = False, progress: bool = True) -> FisherResult:
    """Compute the diagonal empirical Fisher of a model on a corpus and write its file.

    Interrupted runs resume from ``<out>.ckpt`` (``<out>.rankR.ckpt`` under torchrun, where the
    samples are split over the ranks); with ``shard_size`` K, groups of K ranks hold one
    FSDP2-sharded copy of the model and the groups split the samples.

    Args:
        out: the Fisher file to write (.safetensors).
        model: hub id or ``from_pretrained`` folder; None for the embedded model.
        corpus: text/JSONL file, HF dataset name or ``save_to_disk`` folder; None for the embedded corpus.
        fraction: seeded document-level share of the corpus in (0, 1]; None for all of it.
        max_samples: at most this many packed sequences; None for all the corpus gives.
        seq_len: tokens per packed sequence.
        batch_size: packed sequences per forward pass.
        seed: seed of the sub-sample.
        bos: BOS token first in every sample: "auto" (as the tokenizer frames a text), "yes", "no".
        dtype: "float32", "tf32", "bfloat16" or "float16".
        device: "auto", "cpu", "cuda" or "cuda:N".
        allow_new_head: accept a checkpoint without its pretraining head (its random head is measured).
        shard_size: ranks per FSDP2-sharded copy of the model under torchrun; 1 = no sharding.
        checkpoint_every: seconds between checkpoints of the running sums.
        max_chunk_mb: memory for per-sample gradients at a time, in MB; None for the default.
        overwrite: replace a file computed with other settings, or holding another kind of file.
        progress: a progress bar on stderr (rank 0 only).

    Returns:
        a FisherResult.

    Raises:
        UsageError: a setting out of its domain, an unwritable ``out``; ``OutputRefused`` or
            ``SettingsMismatch`` for an existing ``out`` unless ``overwrite``; ``OutputBusy`` when
            another process writes it.
    """
    out = check_output_path(out, "out", [".safetensors"])
    check_distinct_paths({"out": out}, {"corpus": corpus, "model": model})
    check_sample_settings(fraction, max_samples, seq_len, batch_size, seed, bos)
    checks.optional(checks.positive_float, max_chunk_mb, "max_chunk_mb")
    checks.positive_int(shard_size, "shard_size")
    with claim_output(out, "fisher", overwrite=overwrite):
        return _run_fisher(out, model, corpus, dict(
            fraction=fraction, max_samples=max_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
            bos=bos, dtype=dtype, device=device, allow_new_head=allow_new_head, shard_size=shard_size,
            checkpoint_every=checkpoint_every, max_chunk_mb=max_chunk_mb, overwrite=overwrite, progress=progress))


def _run_fisher(out, model, corpus, o) -> FisherResult:
    from ..data.corpus import batches as make_batches
    from ..identity import model_fingerprint
    from ..runtime import barrier, join_torchrun
    from ..sharding import shard_layout
    from .file import save_fisher
    from .run import compute_fisher

    device, rank, world = join_torchrun(o["device"])
    layout = shard_layout(o["shard_size"])
    loaded = _load(model, corpus, o["dtype"], device, o["allow_new_head"], layout)
    samples, pad = _samples(loaded, corpus, o["fraction"], o["max_samples"], o["seq_len"], o["seed"], o["bos"])
    weights = model_fingerprint(loaded)  # of the checkpoint's files: the same on every rank, sharded or not
    meta = _provenance(out, loaded, corpus, samples, pad, o, weights)
    on = next(loaded.model.parameters()).device
    # Point groups split the samples as ranks do; the ranks of one group run the same ones.
    mine = samples[layout.group_index::layout.n_groups]
    shard = make_batches(mine, o["batch_size"], pad, on) if mine else []
    settings = {"model": loaded.source, "corpus": corpus, "rank": rank, "world": world,
                **{k: o[k] for k in ("fraction", "max_samples", "seq_len", "batch_size", "seed", "dtype", "bos",
                                     "shard_size")}}
    checkpoint = out.with_name(out.name + (f".rank{rank}" if world > 1 else "") + ".ckpt")
    fisher = compute_fisher(loaded.model, shard, kind=loaded.kind, progress=o["progress"] and rank == 0,
                            checkpoint=checkpoint, checkpoint_every=o["checkpoint_every"],
                            fingerprint=json.dumps(settings, sort_keys=True), max_chunk_mb=o["max_chunk_mb"],
                            layout=layout, model_fingerprint=weights)
    if layout.group_index == 0:  # every group holds the same reduced sums; group 0 writes them
        meta = dict(meta, ranks=world, **({"shard_size": o["shard_size"]} if layout.sharded else {}))
        save_fisher(out, fisher, meta)
    barrier()
    checkpoint.unlink(missing_ok=True)
    return FisherResult(path=out, parameters=sum(t.numel() for t in fisher.values()), tensors=len(fisher),
                        samples=len(samples), seq_len=o["seq_len"], metadata=meta)


def run_stability(out, model: Optional[str] = None, corpus: Optional[str] = None, *,
                  fractions: Sequence[float] = STABILITY_FRACTIONS, top: Sequence[float] = STABILITY_TOP,
                  fraction: Optional[float] = None, max_samples: Optional[int] = None, seq_len: int = 128,
                  batch_size: int = 16, seed: int = 0, bos: str = "auto", dtype: str = "float32", device="auto",
                  allow_new_head: bool = False, max_chunk_mb: Optional[float] = None, fisher_out=None,
                  overwrite: bool = False, progress: bool = True) -> StabilityResult:
    """Fisher stability over nested sub-samples of one reference sample (paper Table 1), as a CSV.

    The Fisher of each nested prefix of the reference sample is estimated in one pass and compared
    with the reference: top-k% overlap and Jaccard, Spearman, relative L1.

    Args:
        out: the table to write (.csv).
        model: hub id or ``from_pretrained`` folder; None for the embedded model.
        corpus: text/JSONL file, HF dataset name or ``save_to_disk`` folder; None for the embedded
            corpus.
        fraction: seeded document-level share of the corpus in (0, 1]; None for all of it.
        max_samples: at most this many packed sequences (the reference sample); None for all.
        seq_len: tokens per packed sequence.
        batch_size: packed sequences per forward pass.
        seed: seed of the sub-sample.
        bos: BOS token first in every sample: "auto", "yes" or "no" (as for ``run_fisher``).
        dtype: "float32", "tf32", "bfloat16" or "float16".
        device: "auto", "cpu", "cuda" or "cuda:N".
        allow_new_head: accept a checkpoint without its pretraining head.
        max_chunk_mb: memory for per-sample gradients at a time, in MB; None for the default.
        progress: a progress bar on stderr.
        fractions: shares of the reference sample, each in (0, 1] (a comma-separated string too).
        top: top-k percentages, each in (0, 100] (a comma-separated string too).
        fisher_out: also write the reference Fisher (all samples), from the same pass, to this
            Fisher file (.safetensors), with the provenance ``run_fisher`` records; None: not written.
        overwrite: replace an ``out`` that is not a stability table (and a ``fisher_out`` of other
            settings).

    Returns:
        a StabilityResult.

    Raises:
        UsageError: a setting out of its domain, an unwritable output; ``OutputRefused`` for an
            output holding another kind of file unless ``overwrite``.
    """
    import contextlib

    from .stability import parse_numbers

    out = check_output_path(out, "out", [".csv"])
    fisher_out = None if fisher_out is None else check_output_path(fisher_out, "fisher_out", [".safetensors"])
    check_distinct_paths({"out": out, "fisher_out": fisher_out}, {"corpus": corpus, "model": model})
    fractions = parse_numbers(_text(fractions), "fractions", 0.0, 1.0)
    top = parse_numbers(_text(top), "top", 0.0, 100.0)
    check_sample_settings(fraction, max_samples, seq_len, batch_size, seed, bos)
    checks.optional(checks.positive_float, max_chunk_mb, "max_chunk_mb")
    o = dict(fraction=fraction, max_samples=max_samples, seq_len=seq_len, batch_size=batch_size, seed=seed, bos=bos,
             dtype=dtype, overwrite=overwrite)
    with contextlib.ExitStack() as held:
        held.enter_context(claim_output(out, "table", overwrite=overwrite, columns=("fraction", "samples")))
        if fisher_out is not None:
            held.enter_context(claim_output(fisher_out, "fisher", overwrite=overwrite))
        loaded = _load(model, corpus, dtype, device, allow_new_head)
        rows, samples = _stability(out, fisher_out, loaded, corpus, fractions, top, o, max_chunk_mb, progress)
    return StabilityResult(path=out, rows=rows, samples=samples)


def _stability(out, fisher_out, loaded, corpus, fractions, top, o, max_chunk_mb, progress):
    """(table rows, reference samples): one pass, the table written, and the reference Fisher when asked."""
    from ..data.corpus import batches as make_batches
    from ..identity import model_fingerprint
    from .file import save_fisher
    from .stability import stability_and_reference, write_csv

    samples, pad = _samples(loaded, corpus, o["fraction"], o["max_samples"], o["seq_len"], o["seed"], o["bos"])
    meta = None
    if fisher_out is not None:
        meta = _provenance(fisher_out, loaded, corpus, samples, pad, o, model_fingerprint(loaded))
    batches = make_batches(samples, o["batch_size"], pad, next(loaded.model.parameters()).device)
    rows, reference = stability_and_reference(loaded.model, batches, fractions, top, kind=loaded.kind,
                                              progress=progress, max_chunk_mb=max_chunk_mb)
    # The table and the reference Fisher are one result: written aside, they move into place together.
    if fisher_out is not None:
        save_fisher(staged_path(fisher_out), reference, dict(meta, ranks=1))
    write_csv(rows, staged_path(out))
    replace_together([(staged_path(out), out)] + ([(staged_path(fisher_out), fisher_out)] if fisher_out else []))
    return rows, len(samples)


def _text(values) -> str:
    """A list of numbers as the comma-separated text ``stability.parse_numbers`` reads."""
    return values if isinstance(values, str) else ",".join(repr(float(v)) for v in values)
