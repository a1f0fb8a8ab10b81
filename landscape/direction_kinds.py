"""Direction files of every kind, by one call: ``make(kind, out, model, ...)``.

=================  ===========================================================  ====================
kind               the directions                                               made by
=================  ===========================================================  ====================
``random``         seeded Gaussian, normalized per filter/layer, optionally     ``write_random``
                   masked by Fisher scores (``directions.write_directions``)
``hessian``        the top-1/top-2 eigenvectors of the loss Hessian (P·H·P)    ``curvature.eigen_directions``
``interpolation``  θ_B − θ_A from one checkpoint to another                     ``paths.write_interpolation``
``trajectory``     the top-2 PCA plane of a training trajectory                 ``paths.write_trajectory``
=================  ===========================================================  ====================

Each writes the direction file with every setting that made it and the model's fingerprint,
claims it (``outputs.claim_output``) and refuses a file made with other settings unless
``overwrite``; ``surface`` reads all of them alike.  ``landscape directions`` is this call.

This module sits above ``surface`` and ``curvature``, the one place that combines them: both
stages are peers (neither imports the other), and the direction file they both write, the model
loading and the subsets they both take live below them (``direction_file``, ``models``,
``fisher.subsets``).
"""

import inspect
from typing import Any, Optional

from . import adapters
from .curvature.stage import eigen_directions
from .errors import UsageError
from .files import PathLike, check_distinct_paths, check_output_path
from .identity import MODEL_KEY, model_fingerprint
from .models import LoadedModel, ModelSource, loaded_model, model_id
from .outputs import claim_output
from .surface.paths import write_interpolation, write_trajectory

KINDS = ("random", "hessian", "interpolation", "trajectory")


def write_random(out, model: ModelSource = None, *, dims=2, seed=0, norm="filter", ignore="biasbn", fisher=None,
                 subset="all", granularity="global", orthogonal=False, dtype="float32", shard_size=1,
                 allow_new_head=False, overwrite=False, progress=False) -> dict:
    """Write seeded random directions for ``model``, filter-normalized and optionally Fisher-masked.

    Under torchrun every rank calls this (``shard_size`` > 1 shards the model with FSDP2 while the
    directions are made) and rank 0 writes.

    Args:
        out: the direction file (.h5) to write.
        model: hub id, ``from_pretrained`` folder, None (the embedded model) or a ``LoadedModel``.
        dims: 1 or 2 directions.
        seed: seed of the directions and of random masks.
        norm: 'filter' | 'layer' | 'none' (see ``random_direction``).
        ignore: 'biasbn' | 'none' (see ``random_direction``).
        fisher: a Fisher file's path for ``subset`` (None: no mask).
        subset: 'top:K' | 'bottom:K' | 'random:K' (K in percent) | 'all', or 'adapter': only the
            parameters of a PEFT adapter ``model`` (no ``fisher``).
        granularity: 'global' | 'tensor': rank elements over the whole model or inside each tensor.
        orthogonal: make the second direction orthogonal to the first.
        dtype: load the weights in this dtype (float32 | bfloat16 | float16) and round the
            directions to it (the file's ``precision``).
        shard_size: ranks per FSDP2 group under torchrun (1: no sharding).
        allow_new_head: accept a checkpoint without its pretraining head (always accepted without
            ``fisher``: random directions need only the weights' shapes).
        overwrite: replace whatever ``out`` holds.
        progress: progress bars on stderr.

    Returns:
        The attributes written (``directions.write_directions``): the settings, ``model``,
        ``fisher``, ``model_fingerprint``, ``n_selected``, ``n_parameters`` and ``fingerprint``.

    Raises:
        UsageError: bad settings, a subset without a Fisher file, a Fisher file of another model,
            or an output that may not be written.
    """
    from .fisher import check_fisher_model, fisher_metadata
    from .runtime import join_torchrun
    from .sharding import shard_layout, shard_model
    from .surface import directions

    subset = subset or "all"
    directions._check_request(dims, subset, fisher, dtype, seed, norm, ignore)  # before anything is loaded
    with claim_output(out, "directions", overwrite=overwrite):
        join_torchrun("cpu")
        layout = shard_layout(shard_size)
        loaded = loaded_model(model, allow_new_head or fisher is None, device="cpu", dtype=dtype)
        weights = model_fingerprint(loaded)  # of the checkpoint's files, unchanged by sharding
        if fisher is not None:
            check_fisher_model(fisher, fisher_metadata(fisher), weights,
                               loaded.source if isinstance(model, LoadedModel) else model)
        shard_model(loaded.model, layout)
        settings = {"model": model_id(loaded), "fisher": str(fisher or ""), MODEL_KEY: weights,
                    **adapters.record(loaded)}
        if not overwrite:
            directions.check_existing_directions(out, dict(
                settings, seed=seed, norm=norm, ignore=ignore, subset=subset, dims=dims,
                mask_granularity=granularity, orthogonal=orthogonal))
        return directions.write_directions(
            out, loaded.model, dims=dims, seed=seed, norm=norm, ignore=ignore, fisher=fisher, subset=subset,
            granularity=granularity, orthogonal=orthogonal, precision=dtype, settings=settings,
            progress=progress)


_MAKERS = {"random": write_random, "hessian": eigen_directions, "interpolation": write_interpolation,
           "trajectory": write_trajectory}


def _options(kind):
    """The keyword options ``kind`` takes (for the refusal of one it does not)."""
    return [name for name, p in inspect.signature(_MAKERS[kind]).parameters.items()
            if name not in ("out", "model") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def make(kind: str = "random", out: Optional[PathLike] = None, model: ModelSource = None, **options: Any) -> dict:
    """Write a direction file of ``kind`` for ``model``; the one entry point of every kind.

    Args:
        kind: 'random' | 'hessian' | 'interpolation' | 'trajectory' (see the module docstring).
        out: the direction file (.h5) to write (required).
        model: hub id, ``from_pretrained`` folder, None (the embedded model) or a
            ``models.LoadedModel`` whose weights are those of its source's files (they identify
            it); for 'interpolation' model A, for 'trajectory' the plane's origin (the last
            checkpoint; None: it is taken to be).
        **options: the options of the kind's writer: ``write_random`` (dims, seed, norm, ignore,
            fisher, subset, ...), ``curvature.eigen_directions`` (dims, fisher, subset, corpus,
            max_samples, tol, ...), ``paths.write_interpolation`` (to), ``paths.write_trajectory``
            (checkpoints); all take ``overwrite`` and ``allow_new_head``.

    Returns:
        The attributes written to the file (settings, provenance and ``fingerprint``); arrays
        (eigenvalues, a trajectory's coordinates) as numpy arrays.

    Raises:
        UsageError: an unknown kind, an option the kind does not take, or the writer's refusals.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown kind of directions '{kind}'; use one of {', '.join(KINDS)}")
    if out is None:
        raise UsageError("give the direction file to write (out=...)")
    out = check_output_path(out, "out", (".h5", ".hdf5"))
    check_distinct_paths({"out": out}, {"model": model, **{k: options.get(k) for k in ("fisher", "corpus", "to",
                                                                                      "trajectory")}})
    allowed = _options(kind)
    for name in options:
        if name not in allowed:
            raise UsageError(f"directions of kind '{kind}' take no option '{name}'; they take "
                             f"{', '.join(allowed)}")
    return _MAKERS[kind](out=out, model=model, **options)
