"""The Hessian's vectors on a model sharded with FSDP2, and its work split over point groups.

On a model sharded over a group of K ranks (``sharding.shard_model``), each rank holds some rows of
every parameter, so it holds the matching pieces of every flat vector over the Hessian's
coordinates: ``VectorShards`` says which (contiguous stretches of the single process's flat
vector, in its order) and sums what an inner product or a norm adds over the group.  Every rank of
the group must make the same reductions in the same order: the estimators call them at the same
points of the same loop on every rank.

Under torchrun the point groups (world / K of them, or every rank without sharding) split the
independent units of work, the Hutchinson probes and the quadrature runs (``PointSplit``); a
group's ranks run the same units, since each product is a collective over the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..runtime import all_reduce_sum, gather_all, rank_and_world
from ..settings import refuse_unshardable_hessian
from ..sharding import collective_device, collective_errors, is_sharded, local_rows, local_tensor


class VectorShards:
    """This rank's pieces of the Hessian's flat vectors, on a shard group.

    Args:
        slices: (start in the whole vector, length) of each piece this rank holds, in order; the
            local vector is their concatenation.
        dim: the whole vector's length (the single process's coordinates).
        group: the ProcessGroup of the shard group.
    """

    def __init__(self, slices: list, dim: int, group):
        self.slices = [(int(s), int(n)) for s, n in slices if int(n)]
        self.dim = int(dim)
        self.group = group
        self.local_dim = sum(n for _, n in self.slices)
        self._starts = torch.tensor([s for s, _ in self.slices], dtype=torch.long)
        self._offsets = torch.tensor([0] + [n for _, n in self.slices], dtype=torch.long).cumsum(0)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the group, in place (partial sums of inner products)."""
        with collective_errors():
            return all_reduce_sum(tensor, self.group)

    def total(self, value: float) -> float:
        """A float summed over the group, in float64."""
        return float(self.reduce(torch.tensor([float(value)], dtype=torch.float64, device=collective_device()))[0])

    def largest(self, value: float) -> float:
        """The largest of a float over the group, in float64."""
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
        with collective_errors():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return float(tensor[0])

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's pieces of a whole (dim,) vector, concatenated."""
        if not self.slices:
            return full[:0].clone()
        return torch.cat([full[s: s + n] for s, n in self.slices])

    def global_index(self, position: int) -> int:
        """The index in the whole vector of this rank's local element ``position``."""
        piece = int(torch.searchsorted(self._offsets, torch.tensor(int(position)), right=True)) - 1
        return int(self._starts[piece]) + int(position) - int(self._offsets[piece])

    def signs(self, rows: torch.Tensor) -> torch.Tensor:
        """Per row of ``rows`` (count, local_dim), ±1: the sign of the row's largest-magnitude element.

        The element is the whole row's first largest one, as ``argmax`` finds it in one process.
        """
        count = rows.shape[0]
        largest = torch.full((count,), -1.0, dtype=torch.float64)
        position = torch.zeros(count, dtype=torch.long)
        sign = torch.ones(count, dtype=torch.float64)
        if rows.shape[1]:
            peak, position = rows.abs().max(dim=1)
            largest = peak.double().cpu()
            position = position.cpu()
            sign = torch.where(rows[torch.arange(count), position.to(rows.device)] >= 0, 1.0, -1.0).double().cpu()
        return self.agree(largest, position, sign).to(device=rows.device, dtype=rows.dtype)

    def agree(self, largest: torch.Tensor, position: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Per row, the sign of the whole row's first largest element, from each rank's own.

        Args:
            largest: (count,) this rank's largest magnitude per row (-1: it holds no element).
            position: (count,) its local position (the first largest).
            sign: (count,) the sign of that element, ±1.

        Returns:
            (count,) float64 CPU ±1, the same on every rank of the group.
        """
        import torch.distributed as dist

        count = largest.numel()
        index = [float(self.global_index(int(p))) if float(m) >= 0 else 0.0 for m, p in zip(largest, position)]
        local = torch.stack([largest.double(), torch.tensor(index, dtype=torch.float64), sign.double()], dim=1)
        local = local.to(collective_device())
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        with collective_errors():
            dist.all_gather(gathered, local, group=self.group)
        table = torch.stack([g.cpu() for g in gathered])  # (ranks, count, 3)
        out = torch.ones(count, dtype=torch.float64)
        for i in range(count):
            # The largest magnitude; among equal ones the smallest index in the whole vector.
            best = min(range(table.shape[0]), key=lambda r: (-float(table[r, i, 0]), float(table[r, i, 1])))
            out[i] = float(table[best, i, 2])
        return out


@dataclass
class PointSplit:
    """This process's share of independent units of work under torchrun.

    index: this rank's point group; count: the number of groups; reports: whether this rank
    reports its group's results (the first rank of the group).
    """

    index: int
    count: int
    reports: bool

    def mine(self, unit: int) -> bool:
        """Whether this group runs unit ``unit`` (units are dealt round-robin)."""
        return int(unit) % self.count == self.index

    def gather(self, done: dict) -> dict:
        """Every group's {unit: result}, on every rank (each group's reporting rank's results)."""
        merged = {}
        for part in gather_all(dict(done) if self.reports else {}):
            merged.update(part)
        return merged


def point_split(model: torch.nn.Module) -> Optional[PointSplit]:
    """How the point groups split the estimators' units for ``model``; None in one process."""
    from ..sharding import point_groups

    if rank_and_world()[1] == 1:
        return None
    return PointSplit(*point_groups(model))


def local_part(param: torch.Tensor) -> tuple:
    """(this rank's [start, stop) rows of a sharded parameter or None, the elements it holds)."""
    if not is_sharded(param):
        return None, param
    return local_rows(param), local_tensor(param)


def rows_of(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole tensor shaped like ``param`` (all of it when not sharded)."""
    rows = local_part(param)[0]
    return tensor if rows is None else tensor[rows[0]: rows[1]]


def check_shardable(model: torch.nn.Module, hvp: str) -> None:
    """Refuse what a model sharded with FSDP2 cannot give: a double backward, or a cast to float32.

    The rule is ``settings.refuse_unshardable_hessian``'s (the settings of the stages call it too),
    applied to the precisions the model's parameters hold.
    """
    refuse_unshardable_hessian(hvp, [str(p.dtype).replace("torch.", "") for p in model.parameters()])
