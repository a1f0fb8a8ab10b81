"""Random directions in parameter space: filter-normalized, optionally Fisher-masked.

A direction is ``{param name: float32 CPU tensor shaped like the param}``, named as in
``model.named_parameters()`` (tied weights appear once, under their first name).  Each tensor is
seeded by its name, so a direction can be made one tensor at a time: ``write_directions`` streams
a whole surface's directions into their file that way, holding one tensor (and the masks) at a
time; ``make_directions`` returns them as dicts for Python users.

Masks live in ``fisher.masks``, subsets in ``fisher.subsets``, the file in ``direction_file``; their
public names are re-exported here.
"""

import zlib
from typing import Dict, List, Optional, Tuple

import torch

from .. import checks
from ..direction_file import (
    FORMAT,
    GROUPS,
    PRECISIONS,
    DirectionWriter,
    check_directions_finite,
    check_directions_match,
    check_existing_directions,
    count_directions,
    fingerprint,
    load_directions,
    round_to,
    save_directions,
)
from ..errors import UsageError
from ..fisher.masks import MASK_KINDS, ScoreSource, fisher_mask, parse_mask_spec
from ..fisher.subsets import IGNORES, check_subset, perturbable_names, subset_mask
from ..progress import bar as progress_bar
from ..runtime import rank_and_world
from ..sharding import full_tensor

__all__ = ["NORMS", "IGNORES", "MASK_KINDS", "GROUPS", "FORMAT", "PRECISIONS", "normalize_filters",
           "random_direction", "perturbable_names", "orthogonalize", "parse_mask_spec", "fisher_mask", "apply_mask",
           "make_directions", "write_directions", "fingerprint", "save_directions", "check_existing_directions",
           "load_directions", "count_directions", "check_directions_match", "check_directions_finite",
           "interpolation_direction", "trajectory_directions"]

# A direction (or Fisher scores, or a mask): one tensor per parameter, named as in named_parameters().
Direction = Dict[str, torch.Tensor]

NORMS = ("filter", "layer", "none")


# ----------------------------------------------------------------------------- directions
def _filter_axis(module):
    """Axis of a weight that indexes its filters (output units).

    GPT-2's Conv1D stores (in, out), so its filters are columns; nn.Linear (out, in), embeddings
    (tokens, dim) and convolutions (out, in, ...) index filters by their first axis.
    """
    return 1 if type(module).__name__ == "Conv1D" else 0


def _owner_modules(model):
    """{param name: module that owns it}, for the names named_parameters() yields."""
    modules = dict(model.named_modules())
    return {name: modules[name.rpartition(".")[0]] for name, _ in model.named_parameters()}


def _gaussian_like(shape, seed, index, name):
    # Seeded per parameter name, so a tensor's direction does not depend on which other
    # tensors exist or are ignored (e.g. --ignore biasbn vs none gives the same weight directions).
    key = zlib.crc32(f"{int(seed)}/{int(index)}/{name}".encode())
    gen = torch.Generator().manual_seed(key)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def normalize_filters(direction: torch.Tensor, weight: torch.Tensor, axis: int = 0, eps: float = 1e-10) -> torch.Tensor:
    """Rescale each filter of ``direction`` to the norm of the same filter of ``weight`` (Li et al.).

    Args:
        direction: the direction's tensor, same shape as ``weight`` (ndim >= 2).
        weight: the parameter.
        axis: the filter axis.
        eps: added to the direction's filter norms, so a zero filter stays finite.

    Returns:
        A new tensor shaped like ``weight``; filter norms of the result equal those of ``weight``.
    """
    d = direction.movedim(axis, 0)
    w = weight.movedim(axis, 0)
    d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
    w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
    scale = (w_norm / (d_norm + eps)).reshape((-1,) + (1,) * (d.dim() - 1))
    return (d * scale).movedim(0, axis)


def _normalize(direction, weight, norm, axis):
    if norm == "filter":
        return normalize_filters(direction, weight, axis)
    if norm == "layer":
        return direction * (weight.norm() / (direction.norm() + 1e-10))
    return direction


def random_direction(model: torch.nn.Module, seed: int = 0, norm: str = "filter", ignore: str = "biasbn",
                     index: int = 0) -> Direction:
    """One seeded Gaussian direction for ``model``.

    Args:
        model: the model.
        seed: seeds the direction.
        norm: 'filter' (each filter rescaled to the weight's filter norm; rows of nn.Linear and
            embeddings, columns of GPT-2 Conv1D), 'layer' (whole tensor to the weight's norm) or
            'none'.
        ignore: 'biasbn' zeroes 1-D tensors (biases, LayerNorm); 'none' perturbs them along the
            weight itself (its own scale, as in Li et al.'s code) when normalizing, or randomly
            when norm='none'.
        index: which direction of a set (0 = x, 1 = y); each (seed, index) pair is independent.

    Returns:
        {param name: float32 CPU tensor shaped like the param}, in the parameters' units.
    """
    if norm not in NORMS:
        raise UsageError(f"unknown norm '{norm}'; use one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise UsageError(f"unknown ignore '{ignore}'; use one of {', '.join(IGNORES)}")
    owners = _owner_modules(model)
    return {name: direction_tensor(name, param, owners[name], seed, index, norm, ignore)
            for name, param in model.named_parameters()}


def direction_tensor(name: str, param: torch.nn.Parameter, owner: torch.nn.Module, seed: int = 0, index: int = 0,
                     norm: str = "filter", ignore: str = "biasbn") -> torch.Tensor:
    """One tensor of ``random_direction``: float32 on the CPU, shaped like the whole parameter.

    A sharded parameter is gathered for it (a collective: every rank of its group calls this in
    the same order).

    Args:
        name: the parameter's name.
        param: the parameter.
        owner: the module that holds it (its type decides the filter axis).
        seed: seeds the direction.
        index: which direction of a set (0 = x, 1 = y).
        norm: 'filter' | 'layer' | 'none' (see ``random_direction``).
        ignore: 'biasbn' | 'none' (see ``random_direction``).

    Returns:
        A float32 CPU tensor shaped like the whole parameter.
    """
    weight = full_tensor(param).detach().to("cpu", torch.float32)
    if weight.dim() <= 1:
        if ignore == "biasbn":
            return torch.zeros_like(weight)
        if norm == "none":
            return _gaussian_like(weight.shape, seed, index, name)
        return weight.clone()
    d = _gaussian_like(weight.shape, seed, index, name)
    return _normalize(d, weight, norm, _filter_axis(owner))


def orthogonalize(dx: Direction, dy: Direction) -> Direction:
    """Direction ``dy`` minus its projection on ``dx`` (over all tensors at once), at dy's global norm.

    Keeps the support of both (a masked dy stays masked when dx has the same mask).
    """
    dot = sum(float((dx[n].double() * dy[n].double()).sum()) for n in dx)
    xx = sum(float(dx[n].double().pow(2).sum()) for n in dx)
    yy = sum(float(dy[n].double().pow(2).sum()) for n in dy)
    if xx == 0.0:
        return {n: t.clone() for n, t in dy.items()}
    out = {n: (dy[n].double() - (dot / xx) * dx[n].double()) for n in dy}
    new = sum(float(t.pow(2).sum()) for t in out.values())
    scale = (yy / new) ** 0.5 if new > 0 else 1.0
    return {n: (t * scale).float() for n, t in out.items()}


# ----------------------------------------------------------------------------- masks
def apply_mask(direction: Direction, mask: Dict[str, torch.Tensor]) -> Direction:
    """Zero the unselected elements of a direction: {name: direction * mask}.

    Every tensor of the direction needs a mask of the same shape (UsageError names the first one
    that is missing or mis-shaped, e.g. a Fisher file of another model).
    """
    for name, tensor in direction.items():
        if name not in mask or tuple(mask[name].shape) != tuple(tensor.shape):
            got = "no tensor" if name not in mask else f"shape {tuple(mask[name].shape)}"
            raise UsageError(f"the mask (Fisher file) does not match the direction: '{name}' has {got}, the "
                             f"parameter {tuple(tensor.shape)}; was it computed for this model?")
    # +0.0, never -0.0 (which ``tensor * 0`` gives for negative values): exact zeros compress well.
    return {name: tensor.masked_fill(~mask[name].to(device=tensor.device, dtype=torch.bool), 0.0)
            for name, tensor in direction.items()}


def make_directions(model: torch.nn.Module, dims: int = 2, seed: int = 0, norm: str = "filter", ignore: str = "biasbn",
                    fisher: Optional[Direction] = None, subset: str = "all", granularity: str = "global",
                    orthogonal: bool = False) -> Tuple[List[Direction], dict]:
    """The directions of one surface: a list of ``dims`` directions, masked after normalization.

    The same mask applies to every direction.

    Args:
        model: the model.
        dims: 1 or 2 directions.
        seed: seeds the directions and random masks.
        norm: 'filter' | 'layer' | 'none' (see ``random_direction``).
        ignore: 'biasbn' | 'none' (see ``random_direction``).
        fisher: {name: scores shaped like the param}, or None (then subset must be 'all').
        subset: 'top:K' | 'bottom:K' | 'random:K' | 'all' (see ``fisher_mask``).
        granularity: 'global' | 'tensor' (see ``fisher_mask``).
        orthogonal: make the second direction orthogonal to the first (see ``orthogonalize``).

    Returns:
        (directions, settings): a list of {param name: float32 CPU tensor}, and the attributes to
        store with them.

    Raises:
        UsageError: settings out of their domains, or a Fisher that does not fit the model.
    """
    _check_request(dims, subset, fisher)
    dirs = [random_direction(model, seed=seed, norm=norm, ignore=ignore, index=i) for i in range(dims)]
    n_selected = sum(int((t != 0).sum()) for t in dirs[0].values())
    mask = subset_mask(model, fisher, subset, seed=seed, ignore=ignore, granularity=granularity)
    if mask is not None:
        dirs = [apply_mask(d, mask) for d in dirs]
        n_selected = sum(int(m.sum()) for m in mask.values())
    if orthogonal and dims == 2:
        dirs[1] = orthogonalize(dirs[0], dirs[1])
    return dirs, _settings(model, dims, seed, norm, ignore, subset, granularity, orthogonal, n_selected)


def _settings(model, dims, seed, norm, ignore, subset, granularity, orthogonal, n_selected):
    """The attributes a direction file stores about how its directions were made."""
    return {"seed": int(seed), "norm": norm, "ignore": ignore, "subset": subset, "mask_seed": int(seed),
            "mask_granularity": granularity, "orthogonal": bool(orthogonal), "dims": int(dims),
            "n_selected": int(n_selected), "n_parameters": int(sum(p.numel() for p in model.parameters()))}


def _check_request(dims, subset, fisher, precision="float32", seed=0, norm="filter", ignore="biasbn"):
    if dims not in (1, 2):
        raise UsageError(f"dims must be 1 or 2, got {dims}")
    checks.seed(seed)
    # write_directions makes tensors one by one (not through random_direction, which checks these):
    # an unknown norm would otherwise leave the Gaussian unnormalized, silently.
    if norm not in NORMS:
        raise UsageError(f"unknown norm '{norm}'; use one of {', '.join(NORMS)}")
    check_subset(subset, fisher, ignore)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown direction precision '{precision}'; use one of {', '.join(PRECISIONS)}")


def write_directions(path, model: torch.nn.Module, dims: int = 2, seed: int = 0, norm: str = "filter",
                     ignore: str = "biasbn", fisher=None, subset: str = "all", granularity: str = "global",
                     orthogonal: bool = False, precision: str = "float32", settings: Optional[dict] = None,
                     progress: bool = False) -> dict:
    """Make the directions of one surface and write them to a direction file, one tensor at a time.

    The same directions as ``make_directions`` (and so the same file and fingerprint as
    ``save_directions`` of them) for float32 precision, without ever holding a whole direction:
    peak memory above the model is the masks (1 byte per parameter) and a few copies of the
    largest tensor.  Under torch.distributed every rank calls this and rank 0 writes.

    Args:
        path: the direction file (.h5) to write.
        model: the model; a sharded (FSDP2) model is gathered one tensor at a time.
        dims: 1 or 2 directions.
        seed: seed of the directions and of random masks.
        norm: 'filter' | 'layer' | 'none' (see ``random_direction``).
        ignore: 'biasbn' | 'none' (see ``random_direction``).
        fisher: Fisher scores for the mask, as {name: tensor} or a Fisher file's path (read one
            tensor at a time), or None for subset 'all'.
        subset: 'top:K' | 'bottom:K' | 'random:K' | 'all' (see ``fisher_mask``), or 'adapter':
            only the parameters of a PEFT adapter model's adapter (``adapters.adapter_mask``).
        granularity: 'global' | 'tensor' (see ``fisher_mask``).
        orthogonal: make the second direction orthogonal to the first (see ``orthogonalize``).
        precision: 'float32', or 'bfloat16' / 'float16' to round the values to the model's dtype
            (the file then stores them in about half the space, and a surface of a model of that
            dtype holds exactly these values).
        settings: extra attributes to store (model, Fisher file path, ...); the Fisher file's
            corpus is stored as ``fisher_provenance``.
        progress: show progress bars (stderr): over the Fisher scores while masking, then over tensors.

    Returns:
        The attributes written: the settings of ``make_directions``, ``precision``, the extra
        settings and the ``fingerprint``.
    """
    _check_request(dims, subset, fisher, precision, seed, norm, ignore)
    scores = ScoreSource(fisher) if fisher is not None else None  # read once: masks and provenance
    masks = subset_mask(model, scores, subset, seed=seed, ignore=ignore, granularity=granularity,
                        progress=progress and rank_and_world()[0] == 0)
    maker = _TensorMaker(model, seed, norm, ignore, masks)
    projection = _orthogonal_projection(maker) if orthogonal and dims == 2 else None
    attrs = dict(_settings(model, dims, seed, norm, ignore, subset, granularity, orthogonal, 0),
                 precision=precision, **(settings or {}))
    if fisher is not None:
        attrs["fisher_provenance"] = str(scores.metadata.get("corpus", ""))
    if masks is not None:
        attrs["n_selected"] = int(sum(int(m.sum()) for m in masks.values()))
    rank, _ = rank_and_world()
    names = sorted(maker.params)
    bar = progress_bar(total=dims * len(names), desc="directions", unit="tensor", enabled=progress and rank == 0)
    with bar, (DirectionWriter(path, attrs) if rank == 0 else _NoWriter()) as writer:
        for axis in range(dims):
            for name in names:
                values = maker.tensor(name, axis) if axis == 0 or projection is None else projection(name)
                if axis == 0 and masks is None:
                    attrs["n_selected"] += int(torch.count_nonzero(values))
                writer.add(axis, name, round_to(values, precision))
                bar.update(1)
            writer.settings["n_selected"] = attrs["n_selected"]
    attrs["fingerprint"] = writer.fingerprint
    return attrs


class _NoWriter:
    """What ranks other than 0 write: nothing (they take part in the gathers only)."""

    fingerprint = ""

    def __init__(self):
        self.settings = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add(self, axis, name, values):
        pass


class _TensorMaker:
    """One tensor of one direction at a time, as ``make_directions`` makes it.

    Tensors are masked after normalization.
    """

    def __init__(self, model, seed, norm, ignore, masks):
        self.params = dict(model.named_parameters())
        self.owners = _owner_modules(model)
        self.seed, self.norm, self.ignore, self.masks = seed, norm, ignore, masks

    def tensor(self, name: str, axis: int) -> torch.Tensor:
        values = direction_tensor(name, self.params[name], self.owners[name], self.seed, axis, self.norm,
                                  self.ignore)
        if self.masks is not None:
            values.masked_fill_(~self.masks[name], 0.0)  # as apply_mask
        return values


def _orthogonal_projection(maker: _TensorMaker):
    """Map a name to the second direction's tensor made orthogonal to the first.

    As ``orthogonalize`` does over whole directions (the same sums, in the same order, so the same
    numbers).

    Tensors are generated again for each pass (the sums, the new norm, the output) instead of
    being kept: that costs time on the host, and keeping them would cost two whole directions.
    """
    names = list(maker.params)  # the order orthogonalize sums in: named_parameters()
    dot = xx = yy = 0.0
    for name in names:
        dx, dy = maker.tensor(name, 0).double(), maker.tensor(name, 1).double()
        dot, xx, yy = dot + float((dx * dy).sum()), xx + float(dx.pow(2).sum()), yy + float(dy.pow(2).sum())
    if xx == 0.0:
        return lambda name: maker.tensor(name, 1)

    def projected(name):
        return maker.tensor(name, 1).double() - (dot / xx) * maker.tensor(name, 0).double()

    new = 0.0
    for name in names:
        new += float(projected(name).pow(2).sum())
    scale = (yy / new) ** 0.5 if new > 0 else 1.0
    return lambda name: (projected(name) * scale).float()


# Directions between checkpoints live in ``connectivity``; users reach them from here.
from .connectivity import interpolation_direction, trajectory_directions  # noqa: E402
