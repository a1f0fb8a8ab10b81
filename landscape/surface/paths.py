"""Direction files of paths between checkpoints (Li et al. 2018, section 7).

The straight line from one model to another, and the PCA plane of a training trajectory.

``write_interpolation`` and ``write_trajectory`` load the checkpoints (float32, on the CPU), make
the directions (``connectivity``), and write them with their settings and provenance: the models'
sources and fingerprints, and for a trajectory the explained variance and each checkpoint's
coordinates.  Both claim their output (``outputs.claim_output``) and refuse a file of other settings
unless ``overwrite``.  They are the ``interpolation`` and ``trajectory`` kinds of
``landscape.make_directions``.
"""

import math
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from .. import adapters
from ..direction_file import check_existing_directions, save_directions
from ..errors import UsageError
from ..identity import MODEL_KEY, model_fingerprint
from ..models import LoadedModel, ModelSource, loaded_model, model_id  # noqa: F401 (names of this module)
from ..outputs import claim_output
from .connectivity import interpolation_direction, model_parameters, trajectory_directions


def save_checked(out, directions: List[dict], settings: dict, overwrite: bool = False) -> str:
    """Write ``directions`` with ``settings`` to ``out`` after refusing a file of other settings.

    Args:
        out: the direction file (.h5).
        directions: 1 or 2 {param name: tensor}.
        settings: the file's attributes.
        overwrite: replace a file made with other settings.

    Returns:
        The directions' fingerprint.

    Raises:
        SettingsMismatch: ``out`` holds directions of other settings (and not ``overwrite``).
    """
    if not overwrite:
        check_existing_directions(out, settings)
    return save_directions(out, directions, settings)


def write_interpolation(out, model: ModelSource = None, to: ModelSource = None, allow_new_head: bool = False,
                        overwrite: bool = False) -> dict:
    """Write the one direction θ_B − θ_A from ``model`` (A, at x = 0) to ``to`` (B, at x = 1).

    Args:
        out: the direction file (.h5) to write.
        model: model A (hub id, folder, None for the embedded model, or a ``LoadedModel``).
        to: model B, of the same architecture (required).
        allow_new_head: accept checkpoints without their pretraining head.
        overwrite: replace whatever ``out`` holds.

    Returns:
        The attributes written: ``kind='interpolation'``, ``model``/``model_fingerprint`` (A),
        ``to``/``to_fingerprint`` (B), ``distance`` |θ_B − θ_A| (Euclidean, over all elements),
        ``n_selected``, ``n_parameters``, ``fingerprint``.

    Raises:
        UsageError: no ``to``, models that are not checkpoints of one architecture, or an output
            that may not be written.
    """
    if to is None:
        raise UsageError("an interpolation needs the model to go to (to=...)")
    with claim_output(out, "directions", overwrite=overwrite):
        model_a = loaded_model(model, allow_new_head, device="cpu", dtype="float32")
        model_b = loaded_model(to, allow_new_head, device="cpu", dtype="float32")
        if model_a.adapter and not model_b.adapter:
            raise UsageError("the model is a PEFT adapter and the one to go to a plain model: give the plain model "
                             "(the base) as the model and the adapter as the one to go to; the direction is then "
                             "in the base's parameters")
        # base -> adapter: the adapter's merged weights (base names); adapter -> adapter: their own parameters
        plain_b = adapters.merged_model(model_b) if not model_a.adapter else model_b.model
        direction = interpolation_direction(model_a.model, plain_b)
        distance = math.sqrt(sum(float(t.double().pow(2).sum()) for t in direction.values()))
        settings = {"kind": "interpolation", "model": model_id(model_a), MODEL_KEY: model_fingerprint(model_a),
                    "to": model_id(model_b), "to_fingerprint": model_fingerprint(model_b), "norm": "none",
                    "ignore": "none", "subset": "all", "dims": 1, "distance": distance,
                    "n_selected": sum(int((t != 0).sum()) for t in direction.values()),
                    "n_parameters": sum(p.numel() for p in model_a.model.parameters()), **adapters.record(model_a),
                    **{f"to_{k}": v for k, v in adapters.record(model_b).items()}}
        settings["fingerprint"] = save_checked(out, [direction], settings, overwrite)
    return settings


def write_trajectory(out, checkpoints: Sequence[ModelSource], model: ModelSource = None, allow_new_head: bool = False,
                     overwrite: bool = False) -> dict:
    """Write the top-2 PCA plane of a trajectory, centred on its last checkpoint.

    Args:
        out: the direction file (.h5) to write.
        checkpoints: at least 4 checkpoints (folders, hub ids or ``LoadedModel``), in training order.
        model: the surface's model, which must be the last checkpoint (None: it is taken to be).
        allow_new_head: accept checkpoints without their pretraining head.
        overwrite: replace whatever ``out`` holds.

    Returns:
        The attributes written: ``kind='trajectory'``, ``model`` and ``model_fingerprint`` of the
        last checkpoint, ``explained_variance`` (2,), ``trajectory_coordinates`` (n, 2) in units
        of the unit-norm axes (the last is (0, 0)), ``trajectory_labels`` (folder names),
        ``trajectory_checkpoints``, ``n_selected``, ``n_parameters``, ``fingerprint``.

    Raises:
        UsageError: fewer than 4 checkpoints, checkpoints of different models, a ``model`` other
            than the last checkpoint, or an output that may not be written.
    """
    import h5py

    checkpoints = list(checkpoints)
    if len(checkpoints) < 4:
        raise UsageError(f"a trajectory plane needs at least 4 checkpoints, got {len(checkpoints)}")
    with claim_output(out, "directions", overwrite=overwrite):
        loaded = [loaded_model(c, allow_new_head, device="cpu", dtype="float32") for c in checkpoints]
        params = [model_parameters(m.model) for m in loaded]
        dirs, explained, coords = trajectory_directions(params)
        last = loaded[-1]
        if model is not None:
            _check_origin(loaded_model(model, allow_new_head, device="cpu", dtype="float32"), params[-1],
                          checkpoints[-1], model)
        labels = [_label(c) for c in checkpoints]
        settings = {"kind": "trajectory", "model": model_id(last), MODEL_KEY: model_fingerprint(last),
                    "norm": "unit", "ignore": "none", "subset": "all", "dims": 2, "orthogonal": True,
                    "n_selected": sum(int((t != 0).sum()) for t in dirs[0].values()),
                    "n_parameters": sum(p.numel() for p in last.model.parameters()),
                    "explained_variance": np.asarray(explained, dtype=np.float64),
                    "trajectory_coordinates": np.asarray(coords, dtype=np.float64),
                    "trajectory_labels": np.asarray(labels, dtype=h5py.string_dtype()),
                    "trajectory_checkpoints": np.asarray([model_id(m) for m in loaded], dtype=h5py.string_dtype())}
        settings["fingerprint"] = save_checked(out, dirs, settings, overwrite)
    return settings


def _name(spec: ModelSource) -> str:
    return spec.source if isinstance(spec, LoadedModel) else str(spec)


def _label(checkpoint: ModelSource) -> str:
    """A checkpoint's name in figures: its folder's name (or the hub id)."""
    return Path(_name(checkpoint)).name or _name(checkpoint)


def _check_origin(model: LoadedModel, last: dict, last_spec, spec) -> None:
    """UsageError unless ``model`` has the weights of the plane's origin, the last checkpoint."""
    own = model_parameters(model.model)
    if list(own) != list(last) or any(not torch.equal(own[n], last[n]) for n in own):
        raise UsageError(f"the plane's origin is the last checkpoint '{_name(last_spec)}' but the model "
                         f"'{_name(spec)}' has other weights; use that last checkpoint as the model, or leave "
                         "the model out")
