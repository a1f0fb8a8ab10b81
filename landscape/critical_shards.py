"""Critical sharpness of a sharded (FSDP2) model: the gradient as local shards, their sums, the direction's file.

Under ``--shard-size K`` each rank of a shard group holds 1/K of every parameter
(``landscape.sharding``).  The update direction is kept the same way: {name: this rank's rows},
which is what the surfaces' evaluator perturbs a sharded model with, so the line search's
forward passes need nothing gathered.  Three things do cross ranks: the gradient (FSDP2's own
backward reduce-scatters it into each rank's rows), the sums over the whole direction (an
all-reduce over the group), and the direction file, gathered one tensor at a time for rank 0 to
write.  With world / K > 1 groups every group computes the same gradient (the groups replicate it:
there is one update to take); the line search's single points are evaluated by the first group.

Unsharded, every function here is the plain computation on whole tensors.
"""

from typing import Dict, List, Optional, Tuple

import torch

from .direction_file import DirectionWriter
from .runtime import all_reduce_sum, broadcast_from_rank0, rank_and_world
from .sharding import collective_errors, full_tensor, is_sharded, local_tensor, point_groups, sharded_like

Direction = Dict[str, torch.Tensor]


def sharded_gradient(model: torch.nn.Module, batches: List[dict], kind: str,
                     trainable: List[Tuple[str, torch.nn.Parameter]]) -> Tuple[List[torch.Tensor], float, float]:
    """(float32 sums of this rank's rows of ∇(loss sum) per trainable parameter, loss sum, target tokens).

    One forward and ``backward`` per batch on the sharded model: FSDP2 gathers each unit's
    parameters for it and reduce-scatters the gradient into ``param.grad`` (this rank's rows, the
    mean over the group, whose ranks all ran the same batch: the gradient itself).  Each batch's
    gradient is added in float32 and ``param.grad`` dropped, as the unsharded path adds each
    batch's ``autograd.grad``; gradients the parameters held before are put back afterwards.
    Every rank of the group calls this with the same batches.
    """
    from .data.objectives import sequence_losses

    sums = [torch.zeros(local_tensor(p).shape, dtype=torch.float32, device=local_tensor(p).device)
            for _, p in trainable]
    total, tokens = 0.0, 0.0
    params = list(model.parameters())
    held = [p.grad for p in params]  # backward adds into .grad: a caller's gradients are set aside, then restored
    try:
        with torch.enable_grad(), collective_errors():
            for batch in batches:
                for param in params:
                    param.grad = None
                losses = sequence_losses(model, batch, kind)
                loss = losses.loss_sum.sum()
                loss.backward()
                for acc, (_, param) in zip(sums, trainable):
                    if param.grad is not None:
                        acc.add_(local_tensor(param.grad).float())
                total += float(loss.detach().double())
                tokens += float(losses.n_tokens.sum())
    finally:
        for param, grad in zip(params, held):
            param.grad = grad
    return sums, total, tokens


def group_sum(value: float, model: torch.nn.Module) -> float:
    """``value`` summed over the shard group of ``model`` (a collective); itself when unsharded.

    A sum over a direction held as local rows (its squared norm, its slope) is each rank's partial
    sum until it is added over the group: every rank of the group calls this, in the same order.
    """
    sharded = next((p for p in model.parameters() if is_sharded(p)), None)
    if sharded is None:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=local_tensor(sharded).device)
    with collective_errors():
        all_reduce_sum(box, sharded.device_mesh.get_group())
    return float(box.cpu())


def zeros_like_local(param: torch.Tensor) -> torch.Tensor:
    """A float32 zero shaped like this rank's rows of ``param``, holding no memory (an expanded scalar)."""
    rows = local_tensor(param)
    return torch.zeros((), dtype=torch.float32, device=rows.device).expand(rows.shape)


def write_direction(path, model: torch.nn.Module, direction: Direction, attrs: dict) -> Optional[str]:
    """Write ``direction`` (this rank's rows of each tensor) whole to a direction file; its fingerprint.

    Sharded, each tensor is gathered over the first group (a collective per tensor, in sorted
    name order, the file's order) and rank 0 writes it, so the file is the one an unsharded run
    writes; one tensor at a time is whole in memory.  Every rank calls this; every rank gets the
    fingerprint (rank 0's).

    Args:
        path: the direction file (.h5) to write.
        model: the model ``direction`` is shaped like.
        direction: {name: this rank's rows, float32}.
        attrs: the file's attributes (text, numbers, booleans).
    """
    params = dict(model.named_parameters())
    rank, world = rank_and_world()
    group, _, _ = point_groups(model)
    fingerprint = None
    if group == 0:
        writer = DirectionWriter(path, attrs) if rank == 0 else None
        with writer if writer is not None else _Silent():
            for name in sorted(direction):
                values = direction[name].detach().float()
                if is_sharded(params[name]):
                    values = full_tensor(sharded_like(values.contiguous(), params[name]))
                if writer is not None:
                    writer.add(0, name, values)
        fingerprint = writer.fingerprint if writer is not None else None
    return broadcast_from_rank0(fingerprint) if world > 1 else fingerprint


class _Silent:
    """The writer's place on ranks that only take part in the gathers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
