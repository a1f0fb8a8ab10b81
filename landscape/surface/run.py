"""Computing a surface file: the evaluation loop writing through a resumable ``SurfaceFile``."""

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UsageError
from ..identity import MODEL_KEY, check_file_model
from ..runtime import broadcast_from_rank0, rank_and_world
from ..sharding import is_sharded, local_rows, local_tensor
from .directions import load_directions
from .evaluation import evaluate_rounds, grid_points
from .file import FIELDS, TRAIN_FIELDS, SurfaceFile, check_grid_size
from .journal import _scalar_attrs, journal_path, surface_identity
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


def run_surface(out, directions, model: Optional[str] = None, corpus: Optional[str] = None, *,
                x="-1:1:21", y=None, one_d: bool = False, fraction: Optional[float] = None,
                max_samples: Optional[int] = 64, seq_len: int = 128, batch_size: int = 16, seed: int = 0,
                bos: str = "auto", dtype: str = "float32", device="auto", allow_new_head: bool = False,
                shard_size: int = 1, points_per_pass: int = 1, flush_seconds: float = 2.0,
                stream_directions: bool = False, eval_corpus: Optional[str] = None, overwrite: bool = False,
                progress: bool = True) -> dict:
    """The surface stage: the loss and token accuracy on a 1D or 2D grid along a direction file.

    Loads the model and the evaluation sample, then computes (or resumes) every point of the grid.

    Rerunning the same call resumes; under torchrun the grid is split over the ranks (over groups
    of ``shard_size`` ranks holding one FSDP2-sharded copy of the model) and rank 0 writes.

    Args:
        out: the surface file to write or resume (.h5).
        directions: a direction file made for ``model`` (``directions.write_directions``).
        model: hub id or ``from_pretrained`` folder; None for the embedded model.
        corpus: the evaluation corpus (as for ``fisher.run_fisher``); None for the embedded corpus.
        x: "MIN:MAX:NUM" (or the coefficients, a 1-D sequence) along the first direction.
        y: the same along the second direction; None: "-1:1:21" for a 2-direction file unless ``one_d``.
        one_d: only the first direction of a 2-direction file.
        fraction: seeded document-level fraction of the corpus, in (0, 1]; None: all of it.
        max_samples: at most this many packed sequences; None: all.
        seq_len: tokens per packed sequence.
        batch_size: packed sequences per forward pass (not part of the surface's identity).
        seed: seed of the sub-sample (recorded as ``corpus_seed``).
        bos: "auto", "yes" or "no": a BOS token first in every sample.
        dtype: "float32", "tf32", "bfloat16" or "float16".
        device: "auto", "cpu", "cuda" or "cuda:N".
        allow_new_head: accept a checkpoint without its pretraining head.
        shard_size: ranks per sharded copy of the model under torchrun; 1 = no sharding.
        points_per_pass: grid points per vmapped forward pass.
        flush_seconds: seconds between rewrites of the HDF5 file (every point is journaled at once).
        stream_directions: hold the directions in host memory in float32 (``InPlacePerturbation``).
        eval_corpus: a held-out corpus: its loss and accuracy at every point (``test_loss``,
            ``test_acc``) in the same pass, on a sample drawn with the same settings; None: none.
        overwrite: replace a file computed with other settings, or holding another kind of file.
        progress: a progress bar on stderr.

    Returns:
        {'path': Path, 'computed': points computed now, 'total': points in the grid}.

    Raises:
        UsageError: a setting out of its domain, contradicting ``one_d`` and ``y``, a direction
            file of another model; ``SettingsMismatch`` or ``OutputRefused`` for an existing ``out``
            unless ``overwrite``; ``OutputBusy`` when another process writes it.
    """
    from .. import checks
    from ..files import check_distinct_paths, check_output_path
    from ..fisher.stage import check_sample_settings
    from ..outputs import claim_output

    out = check_output_path(out, "out", (".h5", ".hdf5"))
    check_distinct_paths({"out": out}, {"directions": directions, "corpus": corpus, "eval_corpus": eval_corpus,
                                        "model": model})
    check_sample_settings(fraction, max_samples, seq_len, batch_size, seed, bos)
    checks.positive_int(points_per_pass, "points_per_pass")
    checks.non_negative_float(flush_seconds, "flush_seconds")
    checks.positive_int(shard_size, "shard_size")
    with claim_output(out, "surface", overwrite=overwrite):
        xs, ys = _grid_axes(directions, x, y, one_d)  # before anything heavy is loaded
        return _run_surface(out, directions, model, corpus, xs, ys, dict(
            fraction=fraction, max_samples=max_samples, seq_len=seq_len, batch_size=batch_size, seed=seed, bos=bos,
            dtype=dtype, device=device, allow_new_head=allow_new_head, shard_size=shard_size,
            points_per_pass=points_per_pass, flush_seconds=flush_seconds, stream=stream_directions,
            eval_corpus=eval_corpus, overwrite=overwrite, progress=progress))


def _axis(values, name):
    from .evaluation import parse_range

    return parse_range(values, name) if isinstance(values, str) else np.asarray(values, dtype=np.float64)


def _grid_axes(directions, x, y, one_d):
    """(xs, ys) of the grid: ys None for a 1D surface; checked for size before anything is loaded."""
    from .direction_file import count_directions

    xs = _axis(x, "x")
    ys = None if y is None else _axis(y, "y")
    if one_d and ys is not None:
        raise UsageError("one_d and y contradict each other; drop one")
    if not one_d and ys is None and count_directions(directions) == 2:
        ys = _axis("-1:1:21", "y")
    check_grid_size(xs, ys)
    return xs, ys


def _run_surface(out, dir_file, model, corpus, xs, ys, o):
    from .. import adapters
    from ..data.corpus import describe_framing, load_batches
    from ..data.hf_datasets import check_reachable
    from ..identity import model_fingerprint
    from ..models import load_model, model_id
    from ..runtime import join_torchrun
    from ..sharding import shard_layout

    device, _, world = join_torchrun(o["device"])
    layout = shard_layout(o["shard_size"])
    check_reachable(corpus)
    check_reachable(o["eval_corpus"])  # before the model is loaded for nothing
    loaded = load_model(model, device=device, dtype=o["dtype"], allow_new_head=o["allow_new_head"], layout=layout)
    sampling = dict(fraction=o["fraction"], max_samples=o["max_samples"], seq_len=o["seq_len"],
                    batch_size=o["batch_size"], seed=o["seed"], bos=o["bos"])
    batches = load_batches(loaded, corpus=corpus, **sampling)
    eval_batches = load_batches(loaded, corpus=o["eval_corpus"], **sampling) if o["eval_corpus"] else None
    settings = {"model": model_id(loaded), "corpus": str(corpus or "embedded"),
                "fraction": o["fraction"], "max_samples": o["max_samples"], "seq_len": o["seq_len"],
                "corpus_seed": o["seed"], "precision": str(o["dtype"]).lower(),
                "framing": describe_framing(loaded.tokenizer, o["bos"]), MODEL_KEY: model_fingerprint(loaded),
                **adapters.record(loaded)}
    if o["eval_corpus"]:
        settings["eval_corpus"] = str(o["eval_corpus"])
    info = {"batch_size": o["batch_size"], "device": str(next(loaded.model.parameters()).device),
            "world_size": world, "points_per_pass": o["points_per_pass"], "shard_size": o["shard_size"]}
    return compute_surface_file(out, loaded.model, dir_file, batches, xs, ys, settings=settings,
                                overwrite=o["overwrite"], points_per_pass=o["points_per_pass"],
                                flush_seconds=o["flush_seconds"], info=info, stream=o["stream"],
                                progress=o["progress"], eval_batches=eval_batches)
