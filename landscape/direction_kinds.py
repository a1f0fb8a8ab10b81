"""Direction files of every kind, by one call: ``make(settings, out=...)`` (``landscape.make_directions``).

=================  ===========================================================  ====================
kind               the directions                                               made by
=================  ===========================================================  ====================
``random``         seeded Gaussian, normalized per filter/layer, optionally     ``_write_random``
                   masked by Fisher scores (``directions.write_directions``)
``hessian``        the top-1/top-2 eigenvectors of the loss Hessian (P·H·P)    ``curvature.eigen_directions``
``interpolation``  θ_B − θ_A from one checkpoint to another                     ``paths.write_interpolation``
``trajectory``     the top-2 PCA plane of a training trajectory                 ``paths.write_trajectory``
=================  ===========================================================  ====================

``settings.DirectionsSettings`` gives the kind and its settings.  Each writer stores every setting
that made the directions and the model's fingerprint, claims the file (``outputs.claim_output``)
and refuses one made with other settings unless ``overwrite``; ``surface`` reads all of them
alike.  ``landscape directions`` is this call.

This module sits above ``surface`` and ``curvature``, the one place that combines them: both
stages are peers (neither imports the other), and the direction file they both write, the model
loading and the subsets they both take live below them (``direction_file``, ``models``,
``fisher.subsets``).
"""

from dataclasses import dataclass
from typing import Callable, Optional

from . import adapters
from .curvature.stage import eigen_directions
from .errors import SettingsRefused, UsageError
from .files import PathLike, check_distinct_paths, check_output_path
from .identity import MODEL_KEY, model_fingerprint
from .inputs import check_inputs, stage_model, stage_runtime
from .models import LoadedModel, ModelSource, loaded_model, model_id
from .outputs import claim_output
from .results import StageResult
from .settings import DIRECTION_KINDS as KINDS
from .settings import DirectionsSettings
from .surface.paths import write_interpolation, write_trajectory

__all__ = ["KINDS", "DirectionsResult", "make"]
Log = Optional[Callable[[str], None]]


@dataclass
class DirectionsResult(StageResult):
    """What ``make`` wrote.

    ``StageResult``'s ``computed`` and ``total``: the directions written (1 or 2); ``attributes``:
    the attributes written to the file (settings, provenance and ``fingerprint``; eigenvalues and a
    trajectory's coordinates as numpy arrays).
    """

    attributes: dict


def make(settings: Optional[DirectionsSettings] = None, *, out: PathLike, model: Optional[LoadedModel] = None,
         overwrite: bool = False, progress: bool = False, log: Log = None) -> DirectionsResult:
    """Write a direction file of the settings' kind; the one entry point of every kind.

    A file that exists with the same settings is written again (the directions are seeded: the
    same file); one made with other settings is refused unless ``overwrite``.

    Args:
        settings: the kind and its settings (None: ``DirectionsSettings()``, random directions of
            the embedded model).
        out: the direction file (.h5) to write.
        model: a ``models.LoadedModel`` already in memory whose weights are those of its source's
            files (they identify it); None: load ``settings.model``.  For 'interpolation' model A,
            for 'trajectory' the plane's origin (the last checkpoint).
        overwrite: replace an output made with other settings (or holding something else).
        progress: progress bars on stderr (random and hessian).
        log: called with each warning of the hessian kind as a line 'note: ...' (None: they stay
            Python warnings).

    Returns:
        A ``DirectionsResult``.

    Raises:
        UsageError: settings that are not ``DirectionsSettings``, a loaded model the settings
            contradict, or the writer's refusals (a subset without a Fisher file, a Fisher file of
            another model, an output that may not be written, ...).
    """
    settings = DirectionsSettings() if settings is None else settings
    if not isinstance(settings, DirectionsSettings):
        raise UsageError(f"settings must be a DirectionsSettings (landscape.settings), got {type(settings).__name__}")
    out = check_output_path(out, "out", (".h5", ".hdf5"))
    check_distinct_paths({"out": out}, {"model": settings.model.source, "fisher": settings.fisher,
                                        "corpus": settings.sample.corpus, "to": settings.to})
    if model is not None:
        stage_model(settings.model, model)  # refuses a loaded model the settings do not describe
    elif (settings.kind == "interpolation" and adapters.is_adapter_folder(settings.model.source)
          and not adapters.is_adapter_folder(settings.to)):  # refused before anything is loaded
        raise SettingsRefused("{model} is a PEFT adapter and {to} a plain model: give the plain model (the base) as "
                              "{model} and the adapter as {to}; the direction is then in the base's parameters")
    check_inputs(settings.model, model, [(settings.fisher, "fisher")])
    source = model if model is not None else settings.model.source
    with stage_runtime(settings.model):
        attributes = _write(settings, out, source, overwrite, progress, log)
    count = int(attributes["dims"])
    fingerprints = {key: str(attributes[key]) for key in (MODEL_KEY, "sample_fingerprint", "to_fingerprint")
                    if key in attributes}
    return DirectionsResult(path=out, settings=settings, computed=count, total=count, fingerprints=fingerprints,
                            attributes=attributes)


def _write(s: DirectionsSettings, out, model: ModelSource, overwrite, progress, log) -> dict:
    """The attributes the writer of the settings' kind wrote to ``out``."""
    spec = s.model
    if s.kind == "interpolation":
        return write_interpolation(out, model, to=s.to, allow_new_head=spec.allow_new_head, overwrite=overwrite)
    if s.kind == "trajectory":
        return write_trajectory(out, list(s.checkpoints), model=model, allow_new_head=spec.allow_new_head,
                                overwrite=overwrite)
    if s.kind == "hessian":
        sample = s.sample
        return eigen_directions(out, model, dims=s.dims, fisher=s.fisher, subset=s.subset, granularity=s.granularity,
                                ignore=s.ignore, seed=s.seed, corpus=sample.corpus, max_samples=sample.max_samples,
                                seq_len=sample.seq_len, batch_size=sample.batch_size, sample_seed=sample.seed,
                                bos=sample.bos, tol=s.tol, device=spec.device, allow_new_head=spec.allow_new_head,
                                overwrite=overwrite, progress=progress, log=log, hvp=s.hvp)
    return _write_random(out, model, s, overwrite, progress)


def _write_random(out, model: ModelSource, s: DirectionsSettings, overwrite, progress) -> dict:
    """Write seeded random directions, filter-normalized and optionally Fisher-masked.

    Under torchrun every rank calls this (``shard_size`` > 1 shards the model with FSDP2 while the
    directions are made) and rank 0 writes.  A checkpoint without its pretraining head is always
    accepted without a Fisher file: random directions need only the weights' shapes.

    Returns:
        The attributes written (``directions.write_directions``): the settings, ``model``,
        ``fisher``, ``model_fingerprint``, ``n_selected``, ``n_parameters`` and ``fingerprint``.
    """
    from .fisher import check_fisher_model, fisher_metadata
    from .runtime import join_torchrun
    from .sharding import shard_layout, shard_model
    from .surface import directions

    dims, seed, norm, ignore, fisher, subset = s.dims, s.seed, s.norm, s.ignore, s.fisher, s.subset
    dtype = s.model.dtype
    directions._check_request(dims, subset, fisher, dtype, seed, norm, ignore)  # before anything is loaded
    with claim_output(out, "directions", overwrite=overwrite):
        join_torchrun("cpu")
        layout = shard_layout(s.model.shard_size)
        loaded = loaded_model(model, s.model.allow_new_head or fisher is None, device="cpu", dtype=dtype)
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
                mask_granularity=s.granularity, orthogonal=s.orthogonal))
        return directions.write_directions(
            out, loaded.model, dims=dims, seed=seed, norm=norm, ignore=ignore, fisher=fisher, subset=subset,
            granularity=s.granularity, orthogonal=s.orthogonal, precision=dtype, settings=settings,
            progress=progress)
