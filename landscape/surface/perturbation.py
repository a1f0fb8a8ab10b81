"""Moving a model's weights along directions in place, and back bit for bit.

Memory is the constraint here (a surface of an 8B model must fit on one GPU), so beside the model
this keeps only what a point needs: one copy of each perturbed tensor (to restore it) and the
directions, in the model's own dtype.  Per parameter, for a bfloat16 model: 2 bytes of base and
2 per direction; for a float32 model: 4 and 4 per direction.  With ``stream=True`` the directions
stay in host memory in float32 and go to the device at each point (on a bfloat16 device, 2 bytes
per parameter: the base copy alone).

Sharded models (FSDP2, ``landscape.sharding``) are perturbed through their local shards: each
rank moves the rows it holds, and the directions given are those rows.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from ..sharding import local_tensor

# The float32 sum of a non-float32 tensor is formed in blocks: a scratch block, and (on CPU) one
# float32 copy of a direction's block that type promotion makes.  A block is 1/256 of the perturbed
# elements (~0.03 bytes per parameter for both), at least 1M elements (fewer would cost more in
# per-block overhead than they save) and at most 64M (256 MiB; an 8B model's embedding is 525M).
BLOCK_SHARE, MIN_BLOCK, MAX_BLOCK = 256, 1 << 20, 1 << 26


def direction_dtype(param_dtype: torch.dtype, stream: bool = False) -> torch.dtype:
    """The dtype directions are held in for a model of ``param_dtype``.

    Args:
        param_dtype: the model's parameter dtype.
        stream: whether directions are streamed from host memory.

    Returns:
        float32 when streamed from the host or for float32 (and float64) models, otherwise the
        model's own dtype.
    """
    if stream or param_dtype in (torch.float32, torch.float64):
        return torch.float32
    return param_dtype


@dataclass
class _Entry:
    """One perturbed tensor: a copy of its base values and its directions."""

    name: str
    target: torch.Tensor  # the parameter's data (or local shard), written in place
    base: torch.Tensor  # a copy of the target
    parts: List[torch.Tensor]  # one per direction, shaped like the target


class InPlacePerturbation:
    """Sets a model's weights to base + Σ c_i·d_i in place; ``restore`` puts the base back bit for bit.

    Args:
        model: the model; its parameters (or local shards) are written in place.
        directions: 1 or 2 {param name: tensor}, each tensor shaped like the parameter's local
            shard (the whole parameter when unsharded).  Tensors that are zero in every direction
            are neither copied nor touched.
        stream: keep the directions in host memory (float32) and copy them to the device at each
            point, for models whose directions do not fit beside them.

    The sum is formed in float32 as (base + c_1·d_1) + c_0·d_0 and rounded once to the model's
    dtype.  For float32 models it is written straight into the parameter (the same operations,
    and so the same bits, as before directions could be held in other dtypes).  The numbers do
    not depend on the order points are visited in.
    """

    def __init__(self, model: torch.nn.Module, directions: Sequence[Dict[str, torch.Tensor]], stream: bool = False):
        self.stream = stream
        self.entries: List[_Entry] = []
        for name, param in model.named_parameters():
            parts = [d[name] for d in directions]
            if not any(bool(t.any()) for t in parts):
                continue
            self.entries.append(self._entry(name, local_tensor(param), parts))
        self._scratch = {}  # device -> float32 block for non-float32 sums

    def _entry(self, name, target, parts) -> _Entry:
        dtype = direction_dtype(target.dtype, self.stream)
        device = "cpu" if self.stream else target.device
        return _Entry(name, target, target.detach().clone(), [t.to(device=device, dtype=dtype) for t in parts])

    @torch.no_grad()
    def set(self, coeffs: Sequence[float]) -> None:
        """Weights to (base + Σ_{i≥1} coeffs[i]·d_i) + coeffs[0]·d_0, formed in float32.

        Terms with a zero coefficient are skipped (adding 0·d changes nothing).
        """
        coeffs = [float(c) for c in coeffs]
        # (base + y·dy) + x·dx: the order in which every surface file so far was formed.
        terms = [(c, i) for i, c in enumerate(coeffs) if c != 0.0 and i > 0]
        terms += [(coeffs[0], 0)] if coeffs[0] != 0.0 else []
        for entry in self.entries:
            if entry.target.dtype == torch.float32 and not self.stream:
                _sum_into(entry.target, entry.base, entry.parts, terms)
            else:
                self._set_in_blocks(entry, terms)

    def _set_in_blocks(self, entry, terms):
        flat_target, flat_base = entry.target.view(-1), entry.base.view(-1)
        flat_parts = [p.view(-1) for p in entry.parts]
        scratch = self._block(entry.target.device)
        for start in range(0, flat_target.numel(), len(scratch)):
            stop = min(start + len(scratch), flat_target.numel())
            block = scratch[: stop - start]
            block.copy_(flat_base[start:stop])
            for coeff, i in terms:
                # A float32 direction from the host, or one in the model's dtype: either way the
                # product and the sum are formed in float32 (type promotion into ``block``).
                block.add_(flat_parts[i][start:stop].to(block.device, non_blocking=True), alpha=coeff)
            flat_target[start:stop].copy_(block)

    def _block(self, device):
        if device not in self._scratch:
            sizes = [e.target.numel() for e in self.entries]
            size = min(max(sum(sizes) // BLOCK_SHARE, MIN_BLOCK), MAX_BLOCK, max(sizes))
            self._scratch[device] = torch.empty(size, dtype=torch.float32, device=device)
        return self._scratch[device]

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights back, bit for bit."""
        for entry in self.entries:
            entry.target.copy_(entry.base)

    def stacked(self, points: List[Sequence[float]]) -> Dict[str, torch.Tensor]:
        """{param name: (P, *shape)} parameter sets for P coefficient tuples, for a vmapped pass.

        This holds P copies of every perturbed tensor: it trades memory for speed, on GPUs.
        """
        coeffs = torch.tensor(points, dtype=torch.float32)
        out = {}
        for entry in self.entries:
            c = coeffs.to(entry.base.device)
            total = entry.base.float().unsqueeze(0).expand((len(points),) + tuple(entry.base.shape)).clone()
            for i, part in enumerate(entry.parts):
                part = part.to(entry.base.device).float()
                total += c[:, i].reshape((-1,) + (1,) * part.dim()) * part.unsqueeze(0)
            out[entry.name] = total.to(entry.target.dtype)
        return out


def _sum_into(target, base, parts, terms):
    """Set ``target = (base + c_a·d_a) + c_b·d_b``, in the target's dtype, without a temporary."""
    if not terms:
        target.copy_(base)
        return
    (first, i), rest = terms[0], terms[1:]
    torch.add(base, parts[i], alpha=first, out=target)
    for coeff, j in rest:
        target.add_(parts[j], alpha=coeff)
