"""Computing a surface file: the evaluation loop writing through a resumable ``SurfaceFile``."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UsageError
from ..files import PathLike, json_text
from ..identity import MODEL_KEY, check_file_model
from ..inputs import check_inputs, sample_batches, stage_model, stage_runtime
from ..models import LoadedModel
from ..results import StageResult
from ..runtime import broadcast_from_rank0, rank_and_world
from ..settings import DEFAULT_GRID, GridSpec, SurfaceSettings
from ..sharding import is_sharded, local_rows, local_tensor
from .directions import load_directions
from .evaluation import evaluate_rounds, grid_points
from .file import FIELDS, TRAIN_FIELDS, SurfaceFile, check_grid_size
from .identity import _scalar_attrs, journal_path, surface_identity
from .perturbation import direction_dtype


def load_directions_for(model, dir_file, axes=2, stream=False):
    """The directions of ``dir_file`` as a surface of ``model`` holds them, read one tensor at a time.

    Args:
        model: the model (a sharded rank reads only the rows it holds).
        dir_file: the direction file (.h5).
        axes: the number of directions to read (1 or 2).
        stream: hold them as float32 in host memory rather than in the model's dtype on its device.

    Returns:
        (directions: list of {param name: tensor}, file attributes: dict, the dtype they are held
        in).
    """
    params = dict(model.named_parameters())
    dtype = direction_dtype(local_tensor(next(iter(params.values()))).dtype, stream)
    device = "cpu" if stream else local_tensor(next(iter(params.values()))).device

    def rows(name):
        return local_rows(params[name]) if name in params and is_sharded(params[name]) else None

    directions, attrs = load_directions(dir_file, model, dtype=dtype, device=device, rows=rows, axes=axes)
    return directions, attrs, dtype


def compute_surface_file(out, model, dir_file, batches, xs, ys=None, settings=None, overwrite=False,
                         points_per_pass=1, progress=True, flush_seconds=2.0, info=None, stream=False,
                         eval_batches=None, *, kind: str):
    """Compute (or resume) a surface file: loss and accuracy at every grid point not yet in ``out``.

    Under torch.distributed, points are split over ranks (over groups of ranks for a sharded
    model) and rank 0 writes.

    Args:
        out: the surface file (.h5) to write or resume.
        model: in eval mode on its device (or sharded, ``sharding.shard_model``).
        dir_file: a direction file made for it (a 2-direction file with ys=None gives the 1D
            surface along x).
        batches: the fixed evaluation sample: list of batch dicts with ``labels``.
        xs: coefficients along x.
        ys: coefficients along y (None: 1D).
        settings: extra attributes that identify the run (model, corpus, max_samples, ...).
        overwrite: replace a file computed with other settings instead of refusing it.
        points_per_pass: points per vmapped pass (see ``evaluate_points``).
        progress: a tqdm bar over points.
        flush_seconds: seconds between rewrites of the HDF5 file (the journal records every point).
        info: attributes stored but not compared (batch size, device).
        stream: keep the directions in host memory in float32 (see ``InPlacePerturbation``); by
            default they are held on the model's device in its dtype, and the file records that
            dtype (``direction_dtype``) when it is not float32.
        eval_batches: a held-out sample; its loss and accuracy at every point, in the same pass
            over the grid, become ``test_loss`` and ``test_acc`` (as the original loss-landscape
            code writes them), and its fingerprint is part of the file's identity.
        kind: the objective the losses are measured with (``models.LoadedModel.kind``; a PEFT
            adapter's is its base model's).

    Returns:
        {'path', 'computed', 'total'}: the file and its counts of points.

    Raises:
        SettingsMismatch: ``out`` was computed with other settings and ``overwrite`` is off.
        UsageError: the direction file does not fit the model, or the grid is too large.
    """
    check_grid_size(xs, ys)
    directions, dir_attrs, held = load_directions_for(model, dir_file, 1 if ys is None else 2, stream)
    if ys is not None and len(directions) < 2:
        raise UsageError(f"'{dir_file}' holds one direction; a 2D surface needs a file with two")
    if held != torch.float32:  # the directions are rounded to it: part of what the numbers are
        settings = dict(settings or {}, direction_dtype=str(held).replace("torch.", ""))
    identity = surface_identity(dir_attrs, batches, model, xs, ys, settings, eval_batches, kind=kind)
    if MODEL_KEY in identity and (overwrite or not (Path(out).exists() or journal_path(out).exists())):
        # A fresh start refuses a direction file made for another model; a resume compares the whole
        # identity (the model's fingerprint and the direction file's) with the start's, naming what changed.
        check_file_model(dir_file, "direction file", dir_attrs.get(MODEL_KEY), identity[MODEL_KEY],
                         identity.get("model"))
    attrs = dict(_scalar_attrs(identity), identity=json_text(identity, sort_keys=True),
                 dir_file=str(dir_file), **{k: v for k, v in (info or {}).items() if v is not None})
    rank, _ = rank_and_world()
    surface_file, todo = None, None
    if rank == 0:
        try:
            surface_file = SurfaceFile(out, xs, ys, identity, attrs, overwrite, flush_seconds,
                                       fields=TRAIN_FIELDS if eval_batches is None else FIELDS)
            todo = surface_file.missing()
        except UsageError as err:
            todo = err
    todo = broadcast_from_rank0(todo)
    if isinstance(todo, UsageError):
        raise todo
    points = grid_points(xs, ys)
    if progress and surface_file is not None and 0 < len(todo) < len(points):
        print(f"resuming '{out}': {len(points) - len(todo)} of {len(points)} points done", file=sys.stderr, flush=True)
    complete = False
    try:
        evaluate_rounds(model, directions, batches, points, todo, points_per_pass, progress,
                        surface_file.record if surface_file is not None else None, kind, stream=stream,
                        eval_batches=eval_batches)
        complete = True
    finally:
        if surface_file is not None:
            surface_file.close(complete)
    return {"path": Path(out), "computed": len(todo), "total": len(points)}


@dataclass
class SurfaceResult(StageResult):
    """What ``run_surface`` wrote: ``computed`` grid points now, ``total`` in the grid."""


def run_surface(settings: SurfaceSettings, *, out: PathLike, model: Optional[LoadedModel] = None,
                overwrite: bool = False, progress: bool = True) -> SurfaceResult:
    """The surface stage: the loss and token accuracy on a 1D or 2D grid along a direction file.

    Loads the model and the evaluation sample, then computes (or resumes) every point of the grid.
    Rerunning the same call resumes; under torchrun the grid is split over the ranks (over groups
    of ``settings.model.shard_size`` ranks holding one FSDP2-sharded copy of the model) and rank 0
    writes.

    Args:
        settings: the direction file, the model, the evaluation sample and the grid
            (``SurfaceSettings(directions=...)``; a 2-direction file with no ``y`` range gets
            ``settings.DEFAULT_GRID`` along y unless ``one_d``).
        out: the surface file to write or resume (.h5).
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``).
        overwrite: replace a file computed with other settings, or holding another kind of file.
        progress: a progress bar on stderr.

    Returns:
        a SurfaceResult.

    Raises:
        UsageError: a direction file of another model, a loaded model the settings do not
            describe; ``SettingsMismatch`` or ``OutputRefused`` for an existing ``out`` unless
            ``overwrite``; ``OutputBusy`` when another process writes it.
    """
    from ..files import check_distinct_paths, check_output_path
    from ..outputs import claim_output

    out = check_output_path(out, "out", (".h5", ".hdf5"))
    check_distinct_paths({"out": out}, {"directions": settings.directions, "corpus": settings.sample.corpus,
                                        "eval_corpus": settings.eval_corpus, "model": settings.model.source})
    if overwrite or not (out.exists() or journal_path(out).exists()):  # a resume compares its whole identity
        check_inputs(settings.model, model, [(settings.directions, "directions")])
    with claim_output(out, "surface", overwrite=overwrite), stage_runtime(settings.model):
        xs, ys = _grid_axes(settings.directions, settings.grid)  # before anything heavy is loaded
        return _run_surface(out, settings, model, xs, ys, overwrite, progress)



def _axis(values, name):
    from .evaluation import parse_range

    if isinstance(values, str):
        return parse_range(values, name)
    from .. import checks

    return np.asarray(checks.coordinates(values, f"the {name} coordinates"), dtype=np.float64)


def _grid_axes(directions, grid: GridSpec):
    """(xs, ys) of the grid: ys None for a 1D surface; checked for size before anything is loaded."""
    from ..direction_file import count_directions

    xs = _axis(grid.x, "x")
    ys = None if grid.y is None else _axis(grid.y, "y")
    if not grid.one_d and ys is None and count_directions(directions) == 2:
        ys = _axis(DEFAULT_GRID, "y")
    check_grid_size(xs, ys)
    return xs, ys


def _run_surface(out, settings: SurfaceSettings, model, xs, ys, overwrite, progress):
    from .. import adapters
    from ..data.corpus import describe_framing
    from ..identity import model_fingerprint
    from ..models import model_id
    from ..runtime import join_torchrun
    from ..sharding import shard_layout

    spec, sample = settings.model, settings.sample
    device, _, world = join_torchrun(spec.device)
    layout = shard_layout(spec.shard_size)
    loaded = stage_model(spec, model, layout, device, corpora=[sample.corpus, settings.eval_corpus])
    batches = sample_batches(loaded, sample)
    eval_batches = sample_batches(loaded, sample, corpus=settings.eval_corpus) if settings.eval_corpus else None
    # The surface file's own spellings (``corpus_seed``, ``precision``): files written before resume.
    identity = {"model": model_id(loaded), "corpus": str(sample.corpus or "embedded"),
                "fraction": sample.fraction, "max_samples": sample.max_samples, "seq_len": sample.seq_len,
                "corpus_seed": sample.seed, "precision": spec.dtype,
                "framing": describe_framing(loaded.tokenizer, sample.bos), MODEL_KEY: model_fingerprint(loaded),
                **adapters.record(loaded)}
    if settings.eval_corpus:
        identity["eval_corpus"] = str(settings.eval_corpus)
    info = {"batch_size": sample.batch_size, "device": str(next(loaded.model.parameters()).device),
            "world_size": world, "points_per_pass": settings.points_per_pass, "shard_size": spec.shard_size}
    counts = compute_surface_file(out, loaded.model, settings.directions, batches, xs, ys, settings=identity,
                                  overwrite=overwrite, points_per_pass=settings.points_per_pass,
                                  flush_seconds=settings.flush_seconds, info=info,
                                  stream=settings.stream_directions, progress=progress, eval_batches=eval_batches,
                                  kind=loaded.kind)
    return SurfaceResult(path=counts["path"], settings=settings, computed=counts["computed"], total=counts["total"],
                         fingerprints={MODEL_KEY: identity[MODEL_KEY]})
