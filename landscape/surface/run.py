"""Computing a surface file: the evaluation loop writing through a resumable ``SurfaceFile``."""

import json
from pathlib import Path

import torch

from ..errors import UsageError
from ..identity import MODEL_KEY, check_file_model
from ..runtime import broadcast_from_rank0, rank_and_world
from ..sharding import is_sharded, local_rows, local_tensor
from .directions import load_directions
from .evaluation import evaluate_rounds, grid_points
from .file import FIELDS, TRAIN_FIELDS, SurfaceFile, _scalar_attrs, check_grid_size, journal_path, surface_identity
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
                         eval_batches=None):
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
    identity = surface_identity(dir_attrs, batches, model, xs, ys, settings, eval_batches)
    if MODEL_KEY in identity and (overwrite or not (Path(out).exists() or journal_path(out).exists())):
        # A fresh start refuses a direction file made for another model; a resume compares the whole
        # identity (the model's fingerprint and the direction file's) with the start's, naming what changed.
        check_file_model(dir_file, "direction file", dir_attrs.get(MODEL_KEY), identity[MODEL_KEY],
                         identity.get("model"))
    attrs = dict(_scalar_attrs(identity), identity=json.dumps(identity, sort_keys=True),
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
    complete = False
    try:
        evaluate_rounds(model, directions, batches, points, todo, points_per_pass, progress,
                        surface_file.record if surface_file is not None else None, stream=stream,
                        eval_batches=eval_batches)
        complete = True
    finally:
        if surface_file is not None:
            surface_file.close(complete)
    return {"path": Path(out), "computed": len(todo), "total": len(points)}
