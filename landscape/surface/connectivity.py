"""Directions between checkpoints.

The straight path from one model to another, and the PCA plane of a training trajectory (Li et al.
2018, section 7).

Both give ordinary direction dicts ({param name: float32 tensor}) that ``save_directions`` writes
and ``surface`` reads like any other.
"""

from typing import Dict, List, Sequence, Tuple

import torch

from ..errors import UsageError

Direction = Dict[str, torch.Tensor]


def _float32_params(model: torch.nn.Module) -> Direction:
    return {name: p.detach().to("cpu", torch.float32) for name, p in model.named_parameters()}


def interpolation_direction(model_a: torch.nn.Module, model_b: torch.nn.Module) -> Direction:
    """{name: θ_b − θ_a}, float32: along it x = 0 is model A and x = 1 is model B.

    Keyed by model A's parameters.  A parameter B lacks (a pretraining head, when B is a
    fine-tuned classifier of the same body) gets zero: it stays A's along the path.  Parameters
    with the same name but another shape are refused, as is a B that shares nothing with A.

    Args:
        model_a: the model at x = 0.
        model_b: the model at x = 1.

    Returns:
        {param name: float32 CPU tensor shaped like A's param}.

    Raises:
        UsageError: a shared name with another shape, or no shared parameter.
    """
    a, b = _float32_params(model_a), _float32_params(model_b)
    shared = [name for name in a if name in b]
    if not shared:
        raise UsageError("the two models share no parameter names: they are not checkpoints of one model")
    for name in shared:
        if a[name].shape != b[name].shape:
            raise UsageError(f"parameter '{name}' has shape {tuple(a[name].shape)} in the first model and "
                             f"{tuple(b[name].shape)} in the second: they are not checkpoints of one model")
    return {name: (b[name] - a[name]) if name in b else torch.zeros_like(a[name]) for name in a}


def trajectory_directions(checkpoints: Sequence[Direction]) -> Tuple[List[Direction], List[float],
                                                                     List[Tuple[float, float]]]:
    """The top-2 PCA plane of a trajectory, relative to its last checkpoint (Li et al. 2018).

    The rows θ_i − θ_last (i < last) are centred and decomposed by SVD, as Li et al. do with
    sklearn's PCA.

    Args:
        checkpoints: the parameters of each checkpoint in training order ({name: tensor}, the
            same names and shapes); the last one is the origin of the plane.

    Returns:
        (two unit-norm directions, explained variance ratio of each, each checkpoint's coordinates
        (x, y) = projections of θ_i − θ_last on the two directions; the last is (0, 0)).
    """
    if len(checkpoints) < 4:  # 3 differences from the last, centred, span at most 2 directions
        raise UsageError(f"a trajectory plane needs at least 4 checkpoints, got {len(checkpoints)}")
    names = list(checkpoints[-1])
    for index, ckpt in enumerate(checkpoints):
        if list(ckpt) != names or any(ckpt[n].shape != checkpoints[-1][n].shape for n in names):
            raise UsageError(f"checkpoint {index + 1} has other parameters than the last one: "
                             "a trajectory must come from one model")
    last = torch.cat([checkpoints[-1][n].reshape(-1).double() for n in names])
    rows = torch.stack([torch.cat([c[n].reshape(-1).double() for n in names]) - last for c in checkpoints[:-1]])
    centred = rows - rows.mean(0, keepdim=True)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    if len(singular) < 2 or singular[1] <= 0:
        raise UsageError("the checkpoints span fewer than two directions; give checkpoints that differ")
    variance = singular.pow(2)
    explained = [float(v) for v in (variance[:2] / variance.sum())]
    axes = basis[:2]  # (2, P), unit rows
    coords = [(float(rows[i] @ axes[0]), float(rows[i] @ axes[1])) for i in range(len(rows))] + [(0.0, 0.0)]
    directions = []
    for axis in axes:
        direction, start = {}, 0
        for name in names:
            size = checkpoints[-1][name].numel()
            direction[name] = axis[start: start + size].reshape(checkpoints[-1][name].shape).float()
            start += size
        directions.append(direction)
    return directions, explained, coords


def model_parameters(model: torch.nn.Module) -> Direction:
    """A model's parameters as a float32 CPU dict, the input ``trajectory_directions`` takes."""
    return _float32_params(model)
