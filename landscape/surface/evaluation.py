"""Loss of a model perturbed along 1 or 2 directions, at grid points.

``evaluate`` perturbs the weights in place from a kept copy of the base weights (no reloads) and
restores them bit-identically at the end.  The loss at a point is the token-weighted mean target
cross-entropy over every labelled token of the batches (``objectives.sequence_losses``).
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import checks
from ..data.objectives import sequence_losses
from ..errors import UsageError
from ..models import check_kind
from ..progress import bar as progress_bar
from ..runtime import gather_all, rank_and_world
from ..sharding import is_sharded_model, local_tensor, point_groups
from .perturbation import InPlacePerturbation

Batch = Dict[str, torch.Tensor]  # a batch dict, or a direction {param name: tensor}


# ----------------------------------------------------------------------------- grids
def parse_range(text: str, name: str = "x") -> np.ndarray:
    """Parse 'MIN:MAX:NUM' into a float64 array of NUM evenly spaced values from MIN to MAX (inclusive).

    Args:
        text: the range, 'MIN:MAX:NUM'.
        name: what the range is for, in messages ('x', 'y').

    Returns:
        A (NUM,) float64 array.

    Raises:
        UsageError: a malformed range, or one out of its domain (``checks.grid_range``).
    """
    low, high, num = checks.grid_range(text, f"the {name} range")
    return np.linspace(low, high, num)


def grid_points(xs: Sequence[float], ys: Optional[Sequence[float]] = None) -> List[Tuple[float, ...]]:
    """Row-major list of coefficient tuples: (x,) for 1D, (x, y) with x fastest for 2D."""
    if ys is None:
        return [(float(x),) for x in xs]
    return [(float(x), float(y)) for y in ys for x in xs]


# ----------------------------------------------------------------------------- evaluation
def _check_directions(model, directions):
    """Each direction has a tensor for every parameter, shaped like the rows this rank holds."""
    if not 1 <= len(directions) <= 2:
        raise UsageError(f"a surface needs 1 or 2 directions, got {len(directions)}")
    for axis, direction in enumerate(directions):
        for name, param in model.named_parameters():
            want = tuple(local_tensor(param).shape)
            got = tuple(direction[name].shape) if name in direction else None
            if got != want:
                has = "no entry" if got is None else f"shape {got}"
                raise UsageError(f"direction {axis + 1} does not match the model: '{name}' has {has}, the model's "
                                 f"parameter {want}; was it made for another model?")


def _check_reach(model, directions, points) -> None:
    """Refuse a grid whose coefficients times a direction's values overflow the model's dtype.

    The weight there would be inf: every loss at such points would be stored as diverged although
    the model never was.  Coordinates are bounded (``checks.COORD_MAX``), which keeps float32 and
    bfloat16 far from their range; a float16 model (largest value 65504) reaches it much sooner.
    Under torch.distributed each rank checks its rows, and every rank learns the first problem.
    """
    problem = None
    for axis, direction in enumerate(directions):
        reach = max((abs(float(point[axis])) for point in points), default=0.0)
        for name, param in model.named_parameters():
            values = direction[name]
            if problem is not None or not reach or not values.numel() or not param.is_floating_point():
                continue
            top = float(torch.maximum(values.max(), -values.min()))  # no temporary of the tensor's size
            limit = torch.finfo(param.dtype).max / 4  # room for the weight and the other direction's term
            if reach * top > limit:
                problem = (f"the grid reaches {reach:g} along direction {axis + 1}, whose largest value in '{name}' "
                           f"is {top:g}: the weights there overflow the model's {str(param.dtype)[6:]} (largest "
                           f"{torch.finfo(param.dtype).max:g}); use a smaller range")
    problem = next((p for p in gather_all(problem) if p is not None), None)
    if problem is not None:
        raise UsageError(problem)


def loss_and_accuracy(model: torch.nn.Module, batches: List[Batch], kind: str) -> Tuple[float, float]:
    """Token-weighted mean target cross-entropy and token accuracy over all batches.

    Args:
        model: the model, in eval mode.
        batches: list of batch dicts of (B, T) tensors with ``labels``, on the model's device.
        kind: the objective (``models.LoadedModel.kind``).

    Returns:
        (loss in nats per target token, accuracy in [0, 1]).
    """
    check_kind(kind)
    totals = 0.0
    with torch.inference_mode():
        for batch in batches:
            s = sequence_losses(model, batch, kind)
            # Summed on the device: one host transfer per point, not one per batch.
            totals = totals + torch.stack([s.loss_sum.sum(), s.n_tokens.sum(), s.n_correct.sum()]).double()
    loss, tokens, correct = (float(t) for t in totals.cpu()) if torch.is_tensor(totals) else (0.0,) * 3
    if tokens == 0:
        raise UsageError("the evaluation sample has no target tokens")
    return loss / tokens, correct / tokens


class _LossModule(torch.nn.Module):
    """model -> (loss sum, token count, correct count) over a list of batches, for functional_call."""

    def __init__(self, model, batches, kind):
        super().__init__()
        self.model, self.batches, self.kind = model, batches, kind

    def forward(self):
        sums = []
        for batch in self.batches:
            s = sequence_losses(self.model, batch, self.kind)
            sums.append(torch.stack([s.loss_sum.sum().float(), s.n_tokens.sum().float(),
                                     s.n_correct.sum().float()]))
        return torch.stack(sums).sum(0)


def _evaluate_stacked(model, perturbation, batches, points, kind):
    """Several points in one vmapped pass (torch.func): returns [(loss, acc)] per point."""
    from torch.func import functional_call, vmap

    wrapper = _LossModule(model, batches, kind)
    stacked = {"model." + n: t for n, t in perturbation.stacked(points).items()}

    def one(params):
        return functional_call(wrapper, params, (), tie_weights=True, strict=False)

    with torch.inference_mode():
        totals = vmap(one)(stacked).double().cpu()  # (P, 3)
    return [(float(t[0] / t[1]), float(t[2] / t[1])) for t in totals]


def _points_pass(model, perturbation, batch_sets, chunk, kind):
    """[(loss, acc, ...)] for a chunk of points.

    The loss and accuracy on each sample of ``batch_sets`` in turn, at the same perturbed weights;
    one in-place pass per point and sample, or one vmapped pass per sample.
    """
    if len(chunk) == 1:
        perturbation.set(chunk[0])
        return [tuple(v for batches in batch_sets for v in loss_and_accuracy(model, batches, kind))]
    per_sample = [_evaluate_stacked(model, perturbation, batches, chunk, kind) for batches in batch_sets]
    return [tuple(v for pair in point for v in pair) for point in zip(*per_sample)]


def evaluate_rounds(model: torch.nn.Module, directions: List[Batch], batches: List[Batch], points: list,
                    todo: List[int], points_per_pass: int = 1, progress: bool = False,
                    on_results: Optional[Callable[[list], None]] = None, kind: Optional[str] = None,
                    stream: bool = False, eval_batches: Optional[List[Batch]] = None) -> None:
    """The one evaluation loop: the points ``todo`` (indices into ``points``), in rounds.

    Under torch.distributed each point group (a rank, or the K ranks of a sharded model) evaluates
    its share of every round and all ranks see every result; every rank runs the same number of
    rounds, so the collective gathers always pair up.  The weights are restored afterwards, also on
    error or Ctrl-C.

    Args:
        model: the model, in eval mode.
        directions: list of 1 or 2 {name: tensor}.
        batches: list of batch dicts of (B, T) tensors with ``labels``, on the model's device.
        points: list of (x,) or (x, y) coefficient tuples.
        todo: indices into ``points`` to evaluate.
        points_per_pass: points per vmapped pass (see ``evaluate_points``).
        progress: a tqdm bar over points.
        on_results: called as ``on_results([(index, loss, acc), ...])`` after each round; with
            ``eval_batches`` each result is (index, loss, acc, held-out loss, held-out acc), both
            measured at the same perturbed weights.
        kind: the objective (``models.LoadedModel.kind``); required.
        stream: keep the directions in host memory (``InPlacePerturbation``).
        eval_batches: a held-out sample (batch dicts like ``batches``), or None.
    """
    check_kind(kind)
    _check_directions(model, directions)
    _check_reach(model, directions, [points[i] for i in todo])
    group, groups, reports = point_groups(model)
    step = checks.positive_int(points_per_pass, "points_per_pass")  # 0 is refused, not taken as 1
    if step > 1 and is_sharded_model(model):
        raise UsageError("several points per pass need the whole model on each rank; a sharded model "
                         "evaluates one point per pass")
    batch_sets = [batches] + ([eval_batches] if eval_batches is not None else [])
    perturbation = InPlacePerturbation(model, directions, stream=stream)
    bar = progress_bar(total=len(todo), desc="surface", unit="pt", enabled=progress and rank_and_world()[0] == 0)
    try:
        for start in range(0, len(todo), step * groups):
            mine = todo[start + group * step: start + (group + 1) * step]
            results = _points_pass(model, perturbation, batch_sets, [points[i] for i in mine], kind) if mine else []
            mine_results = [(i, *values) for i, values in zip(mine, results)] if reports else []
            gathered = [r for part in gather_all(mine_results) for r in part]
            if on_results is not None:
                on_results(gathered)
            bar.update(len(gathered))
    finally:
        perturbation.restore()
        bar.close()


def evaluate_points(model: torch.nn.Module, directions: List[Batch], batches: List[Batch], points: list,
                    kind: Optional[str] = None, points_per_pass: int = 1, progress: bool = False,
                    on_result: Optional[Callable[[int, float, float], None]] = None,
                    stream: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at each coefficient tuple in ``points``; weights restored afterwards.

    Args:
        model: the model, in eval mode.
        directions: list of 1 or 2 {name: tensor}.
        batches: list of batch dicts of (B, T) tensors with ``labels``, on the model's device.
        points: list of P (x,) or (x, y) coefficient tuples.
        kind: the objective (``models.LoadedModel.kind``); required.
        points_per_pass: > 1 evaluates that many points per vmapped pass (torch.func; for GPUs).
        progress: a tqdm bar over points.
        on_result: called as ``on_result(i, loss, acc)`` as each point finishes.
        stream: directions stay in host memory (``InPlacePerturbation``).

    Returns:
        (loss, accuracy): two float64 arrays (P,); loss in nats per target token.
    """
    losses = np.full(len(points), np.nan)
    accs = np.full(len(points), np.nan)

    def keep(results):
        for i, loss, acc in results:
            losses[i], accs[i] = loss, acc
            if on_result is not None:
                on_result(i, loss, acc)

    evaluate_rounds(model, directions, batches, points, list(range(len(points))), points_per_pass, progress, keep,
                    kind, stream)
    return losses, accs


def evaluate(model: torch.nn.Module, directions: List[Batch], batches: List[Batch], xs: Sequence[float],
             ys: Optional[Sequence[float]] = None, kind: Optional[str] = None, points_per_pass: int = 1,
             progress: bool = False, return_accuracy: bool = False, stream: bool = False):
    """Loss surface of ``model`` along ``directions`` on a grid; the weights are unchanged after.

    The directions are held in the model's dtype on its device (float32 for float32 models), or
    with ``stream`` in float32 in host memory.

    Args:
        model: the model, in eval mode.
        directions: [dx] with ys=None (1D) or [dx, dy] (2D), each {name: tensor}.
        batches: list of batch dicts of (B, T) tensors with ``labels``, on the model's device.
        xs: coefficients along dx.
        ys: coefficients along dy (None: a 1D surface).
        kind: the objective (``models.LoadedModel.kind``); required.
        points_per_pass: points per vmapped pass (see ``evaluate_points``).
        progress: a tqdm bar over points.
        return_accuracy: also return the token accuracy.
        stream: keep the directions in host memory.

    Returns:
        Numpy float64 Z of shape (len(xs),) or (len(ys), len(xs)), Z[iy, ix] = token-weighted mean
        cross-entropy (nats per target token) at base + xs[ix]·dx + ys[iy]·dy; with
        return_accuracy, (Z, accuracy) of the same shape.
    """
    if (ys is None) != (len(directions) == 1):
        raise UsageError("give one direction with xs only, or two directions with xs and ys")
    shape = (len(xs),) if ys is None else (len(ys), len(xs))
    losses, accs = evaluate_points(model, directions, batches, grid_points(xs, ys), kind, points_per_pass,
                                   progress, stream=stream)
    if return_accuracy:
        return losses.reshape(shape), accs.reshape(shape)
    return losses.reshape(shape)


