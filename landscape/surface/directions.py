"""Random directions in parameter space: filter-normalized, optionally Fisher-masked.

A direction is ``{param name: float32 CPU tensor shaped like the param}``, named as in
``model.named_parameters()`` (tied weights appear once, under their first name).

File format (contract): HDF5, group ``xdirection`` (and ``ydirection`` for 2D), one dataset per
parameter named as in ``named_parameters()``; the settings that produced it are attributes of the
file, plus a content ``fingerprint`` so that surfaces can tell whether a file was regenerated.
"""

import hashlib
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import h5py
import numpy as np
import torch

from ..errors import SettingsMismatch, UsageError
from ..files import atomic_output, require_readable_file
from ..fisher.file import check_fisher_matches
from ..models import check_tensors_match

__all__ = ["NORMS", "IGNORES", "MASK_KINDS", "GROUPS", "FORMAT", "normalize_filters", "random_direction",
           "perturbable_names", "orthogonalize", "parse_mask_spec", "fisher_mask", "apply_mask",
           "make_directions", "fingerprint", "save_directions", "check_existing_directions",
           "load_directions", "count_directions", "check_directions_match", "check_directions_finite",
           "interpolation_direction", "trajectory_directions"]

# A direction (or Fisher scores, or a mask): one tensor per parameter, named as in named_parameters().
Direction = Dict[str, torch.Tensor]

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")
MASK_KINDS = ("top", "bottom", "random")
GROUPS = ("xdirection", "ydirection")
FORMAT = "landscape-directions"


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

    direction, weight: tensors of the same shape (ndim >= 2); axis: the filter axis.
    Returns a new tensor; filter norms of the result equal those of ``weight``.
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
    """One seeded Gaussian direction for ``model``: {param name: float32 CPU tensor}.

    norm: 'filter' (each filter rescaled to the weight's filter norm; rows of nn.Linear and
    embeddings, columns of GPT-2 Conv1D), 'layer' (whole tensor to the weight's norm) or 'none'.
    ignore: 'biasbn' zeroes 1-D tensors (biases, LayerNorm); 'none' perturbs them along the weight
    itself (its own scale, as in Li et al.'s code) when normalizing, or randomly when norm='none'.
    index: which direction of a set (0 = x, 1 = y); each (seed, index) pair is independent.
    """
    if norm not in NORMS:
        raise UsageError(f"unknown norm '{norm}'; use one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise UsageError(f"unknown ignore '{ignore}'; use one of {', '.join(IGNORES)}")
    owners = _owner_modules(model)
    direction = {}
    for name, param in model.named_parameters():
        weight = param.detach().to("cpu", torch.float32)
        if weight.dim() <= 1:
            if ignore == "biasbn":
                direction[name] = torch.zeros_like(weight)
            elif norm == "none":
                direction[name] = _gaussian_like(weight.shape, seed, index, name)
            else:
                direction[name] = weight.clone()
            continue
        d = _gaussian_like(weight.shape, seed, index, name)
        direction[name] = _normalize(d, weight, norm, _filter_axis(owners[name]))
    return direction


def perturbable_names(model: torch.nn.Module, ignore: str = "biasbn") -> List[str]:
    """Names of the parameters a direction with this ``ignore`` setting can move."""
    return [name for name, p in model.named_parameters() if ignore == "none" or p.dim() > 1]


def orthogonalize(dx: Direction, dy: Direction) -> Direction:
    """dy minus its projection on dx (over all tensors at once), rescaled to dy's global norm.

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
def parse_mask_spec(spec: str) -> Tuple[str, float]:
    """'top:K' | 'bottom:K' | 'random:K' | 'all' -> (kind, K percent) with K in (0, 100]."""
    text = str(spec).strip().lower()
    if text == "all":
        return "all", 100.0
    kind, _, value = text.partition(":")
    if kind not in MASK_KINDS or not value:
        raise UsageError(f"mask spec '{spec}' is not top:K, bottom:K, random:K or all (K in percent)")
    try:
        percent = float(value)
    except ValueError:
        raise UsageError(f"mask spec '{spec}': K must be a number of percent in (0, 100]") from None
    if not 0.0 < percent <= 100.0:
        raise UsageError(f"mask spec '{spec}': K must be in (0, 100], got {value}")
    return kind, percent


def _select(scores, kind, count, generator):
    """Bool mask over the flat ``scores`` with exactly ``count`` elements selected."""
    if kind == "random":
        # Uniform random keys + top-k: an exact count without a randperm of the whole model.
        scores = torch.rand(scores.shape, generator=generator, dtype=torch.float32)
        kind = "top"
    # The same set as a stable sort's first ``count`` (ties broken by position), found with one
    # selection instead of sorting: on 135M scores the sort took 24 s (the selection 3.6 s) and
    # 1.6 GB for its values and int64 indices.
    n = scores.numel()
    if count >= n:
        return torch.ones(n, dtype=torch.bool)
    rank = n - count + 1 if kind == "top" else count
    threshold = torch.kthvalue(scores, rank).values
    chosen = scores > threshold if kind == "top" else scores < threshold
    ties = torch.nonzero(scores == threshold).squeeze(1)
    chosen[ties[: count - int(chosen.sum())]] = True
    return chosen


def _count(percent, total):
    return min(total, max(1, round(percent / 100.0 * total)))


def fisher_mask(fisher: Direction, spec: str, seed: int = 0, granularity: str = "global",
                names: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """Element-wise mask from Fisher scores: {param name: bool tensor shaped like the param}.

    spec: 'top:K' keeps the K% of elements with the highest scores, 'bottom:K' the K% lowest,
    'random:K' a seeded random K% (the same count as top:K, the paper's control), 'all' every one.
    granularity: 'global' ranks all elements of all tensors together (exactly round(K%·N)
    selected, ties broken by position); 'tensor' selects K% inside each tensor (the paper code's way).
    names: the tensors that may be selected (e.g. only the perturbable ones); others get all-False.
    NaN scores are never selected by top/bottom.
    """
    kind, percent = parse_mask_spec(spec)
    if granularity not in ("global", "tensor"):
        raise UsageError(f"unknown mask granularity '{granularity}'; use global or tensor")
    names = list(fisher) if names is None else [n for n in fisher if n in set(names)]
    masks = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in fisher.items()}
    if not names:
        return masks
    generator = torch.Generator().manual_seed(int(seed))
    if kind == "all":
        for n in names:
            masks[n] = torch.ones(fisher[n].shape, dtype=torch.bool)
        return masks
    groups = [names] if granularity == "global" else [[n] for n in names]
    for group in groups:
        flat = torch.cat([fisher[n].detach().reshape(-1).float().cpu() for n in group])
        if kind != "random":
            # NaN sorts last in both directions, so it is picked only when nothing else is left.
            flat = torch.nan_to_num(flat, nan=(-float("inf") if kind == "top" else float("inf")))
        chosen = _select(flat, kind, _count(percent, flat.numel()), generator)
        start = 0
        for n in group:
            size = fisher[n].numel()
            masks[n] = chosen[start: start + size].reshape(fisher[n].shape)
            start += size
    return masks


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
    return {name: tensor * mask[name].to(device=tensor.device, dtype=tensor.dtype)
            for name, tensor in direction.items()}


def make_directions(model: torch.nn.Module, dims: int = 2, seed: int = 0, norm: str = "filter", ignore: str = "biasbn",
                    fisher: Optional[Direction] = None, subset: str = "all", granularity: str = "global",
                    orthogonal: bool = False) -> Tuple[List[Direction], dict]:
    """The directions of one surface: a list of ``dims`` directions, masked after normalization.

    fisher: {name: scores} or None (then subset must be 'all').  The same mask applies to every
    direction.  Returns (directions, settings) where settings are the attributes to store.
    """
    if dims not in (1, 2):
        raise UsageError(f"dims must be 1 or 2, got {dims}")
    parse_mask_spec(subset)
    if fisher is None and subset != "all":
        raise UsageError(f"subset '{subset}' needs Fisher scores (a Fisher file)")
    dirs = [random_direction(model, seed=seed, norm=norm, ignore=ignore, index=i) for i in range(dims)]
    n_selected = sum(int((t != 0).sum()) for t in dirs[0].values())
    if fisher is not None:
        check_fisher_matches(fisher, model)
        mask = fisher_mask(fisher, subset, seed=seed, granularity=granularity,
                           names=perturbable_names(model, ignore))
        dirs = [apply_mask(d, mask) for d in dirs]
        n_selected = sum(int(m.sum()) for m in mask.values())
    if orthogonal and dims == 2:
        dirs[1] = orthogonalize(dirs[0], dirs[1])
    settings = {"seed": int(seed), "norm": norm, "ignore": ignore, "subset": subset,
                "mask_seed": int(seed), "mask_granularity": granularity, "orthogonal": bool(orthogonal),
                "dims": int(dims), "n_selected": int(n_selected),
                "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    return dirs, settings


# ----------------------------------------------------------------------------- files
def fingerprint(directions: List[Direction]) -> str:
    """Short content hash of a list of directions (names, shapes and float32 values)."""
    digest = hashlib.sha1()
    for d in directions:
        for name in sorted(d):
            t = d[name].detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_directions(path, directions: List[Direction], settings: Optional[dict] = None) -> str:
    """Write 1 or 2 directions to an HDF5 direction file (atomically); returns its fingerprint.

    directions: list of {param name: tensor}; settings: attributes (str, numbers, bools).
    """
    if len(directions) not in (1, 2):
        raise UsageError(f"a direction file holds 1 or 2 directions, got {len(directions)}")
    stamp = fingerprint(directions)
    with atomic_output(path) as tmp:
        # Through a Python file object: a failed write (full disk) is a clean OSError (HDF5's own
        # writer reports it while freeing objects, noisily, and can crash the process).
        with open(tmp, "wb") as stream, h5py.File(stream, "w") as handle:
            for key, value in (settings or {}).items():
                handle.attrs[key] = "" if value is None else value
            handle.attrs["format"] = FORMAT
            handle.attrs["fingerprint"] = stamp  # of these values, whatever ``settings`` held
            for group_name, direction in zip(GROUPS, directions):
                group = handle.create_group(group_name)
                for name, tensor in direction.items():
                    group.create_dataset(name, data=tensor.detach().to("cpu", torch.float32).numpy())
    return stamp


def check_existing_directions(path, settings) -> None:
    """SettingsMismatch when ``path`` holds directions made with settings other than ``settings``.

    A missing file passes; so does one with the same settings (they are seeded: the same file).
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        with h5py.File(path, "r") as handle:
            old = {k: _attr(v) for k, v in handle.attrs.items()}
    except OSError:
        raise SettingsMismatch(f"'{path}' exists but is not a direction file") from None
    for key in sorted(set(settings) & set(old)):
        now = "" if settings[key] is None else settings[key]
        if old[key] != now:
            raise SettingsMismatch(f"'{path}' holds directions made with other settings "
                                   f"({key}={old[key]!r}, this run has {key}={now!r})")


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_directions(path, model: Optional[torch.nn.Module] = None) -> Tuple[List[Direction], dict]:
    """Read a direction file: returns (list of {name: float32 tensor}, {attribute: value}).

    With ``model``, checks that every parameter has a direction tensor of the right shape and no
    tensor is extra; UsageError names the first mismatch.
    """
    path = require_readable_file(path, "direction file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise UsageError(f"'{path}' is not a direction file (not HDF5); make one with `landscape directions`") from None
    try:
        with handle:
            directions, attrs = _read_groups(handle, path)
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # h5py's words for damaged internals
        raise UsageError(f"direction file '{path}' is damaged ({str(err).splitlines()[0]}); "
                         "make the directions again") from None
    stamp = fingerprint(directions)
    if str(attrs.setdefault("fingerprint", stamp)) != stamp:  # bytes changed on disk after writing
        raise UsageError(f"direction file '{path}' is damaged (its values do not match the fingerprint "
                         "written with them); make the directions again")
    check_directions_finite(directions, path)
    if model is not None:
        check_directions_match(directions, model, path)
    return directions, attrs


def _read_groups(handle, path):
    if "xdirection" not in handle or not isinstance(handle["xdirection"], h5py.Group):
        raise UsageError(f"'{path}' is not a direction file (no 'xdirection' group); "
                         "make one with `landscape directions`")
    attrs = {k: _attr(v) for k, v in handle.attrs.items()}
    directions = []
    for group_name in GROUPS:
        if group_name in handle:
            group = handle[group_name]
            directions.append({name: torch.from_numpy(np.asarray(group[name][()], dtype=np.float32))
                               for name in group})
    return directions, attrs


def count_directions(path) -> int:
    """How many directions (1 or 2) a direction file holds, without reading them."""
    path = require_readable_file(path, "direction file")
    try:
        with h5py.File(path, "r") as handle:
            return sum(name in handle for name in GROUPS)
    except OSError:
        raise UsageError(f"'{path}' is not a direction file (not HDF5); make one with `landscape directions`") from None


def check_directions_match(directions, model, path="directions"):
    """UsageError naming the first tensor whose name or shape does not fit ``model``."""
    for axis, direction in zip(GROUPS, directions):
        check_tensors_match(direction, model, f"direction file '{path}' ({axis})")


def check_directions_finite(directions, path="directions"):
    """UsageError naming the first tensor with a NaN or an infinity: such a direction would make
    every point of a surface NaN."""
    for axis, direction in zip(GROUPS, directions):
        for name, tensor in direction.items():
            if not bool(torch.isfinite(tensor).all()):
                raise UsageError(f"direction file '{path}' holds non-finite values ({axis}/{name}); "
                                 "make the directions again")


# Directions between checkpoints live in ``connectivity``; users reach them from here (DESIGN.md).
from .connectivity import interpolation_direction, trajectory_directions  # noqa: E402
