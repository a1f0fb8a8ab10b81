"""vᵀ·H·v without the product vector: each parameter's share of H·v dotted with v as it is made.

Hutchinson's trace needs only the number zᵀ·H·z of each probe, not H·z.  ``Quadratic`` takes the
place of the operator's flat accumulator in the second backwards: each share of a parameter's
gradient is dotted with the parameter's share of v (in float64, a block at a time) as the node that
made it finishes (``take``, from ``routes.Routes``; a share that reaches the parameter some other way
is dotted after it is accumulated) and dropped, so at most the parameters whose backward is under
way hold a share of H·v, where the flat accumulator holds a float32 vector of every coordinate (4 bytes per parameter).
"""

from __future__ import annotations

from typing import Optional

import torch

# Elements per float64 block of a dot product: no float64 copy of a whole parameter.
BLOCK = 2**20


def block_dot(a: torch.Tensor, b: torch.Tensor, block: int = BLOCK) -> float:
    """aᵀb of two flat tensors in float64, ``block`` elements at a time.

    Every inner product and norm of the Hessian's flat vectors goes through here or ``block_rows_dot``:
    torch's float32 dot products, norms and matrix-vector products on the CPU add long vectors in a
    few float32 running sums, off by 2e-4 relative at 2^23 elements and 1.5% at SmolLM2's 134M
    (measured, torch 2.13), enough to take a Lanczos basis far from orthonormal.
    """
    return float(sum(float(torch.dot(a[i: i + block].double(), b[i: i + block].double()))
                     for i in range(0, a.numel(), block)))


def block_rows_dot(rows: torch.Tensor, w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The products ``rows @ w`` summed in float64: (count,) float64 on w's device.

    Args:
        rows: (count, n) of any float dtype (e.g. a Krylov basis).
        w: (n,).
        block: the columns go to float64 about this many elements of ``rows`` at a time.
    """
    count = max(1, rows.shape[0])
    width = max(1, block // count)  # a float64 copy of at most ``block`` elements at a time
    out = torch.zeros(rows.shape[0], dtype=torch.float64, device=w.device)
    for i in range(0, w.numel(), width):
        out += rows[:, i: i + width].double() @ w[i: i + width].double()
    return out


def shaped_dot(v: torch.Tensor, t: torch.Tensor, block: int = BLOCK) -> float:
    """vᵀt of two tensors of one shape, ``t`` of any strides (a transposed view: no contiguous copy of it).

    Contiguous: ``block_dot`` of the flat tensors.  Otherwise blocks of whole rows (of at most
    ``block`` elements where a row allows), each row block made contiguous on its own.
    """
    if t.is_contiguous() or t.dim() < 2:
        return block_dot(v.reshape(-1), t.reshape(-1), block)
    rows = max(1, block // max(1, t[0].numel()))
    return float(sum(float(torch.dot(v[i: i + rows].reshape(-1).double(), t[i: i + rows].reshape(-1).double()))
                     for i in range(0, t.shape[0], rows)))


class Quadratic:
    """Σ over the second backwards of vᵀ·(their gradient), accumulated per parameter (``result()``).

    The same use as the operator's ``_Accumulator``: ``prepare`` before the first backward (it
    empties the parameters' ``.grad`` and hooks them), ``fold`` after each (nothing to do: the hooks
    took every share), and the parameters' own ``.grad`` and hooks are put back on leaving.

    Args:
        params: the coordinates' parameters, in the space's block order.
        vs: v's share of each, shaped like the parameter (zeros off a mask, so the dot over the whole
            parameter is the dot over its kept elements).
    """

    def __init__(self, params: list, vs: list):
        self.params, self.vs = params, vs
        self.total = 0.0
        self.saved: Optional[list] = None
        self.hooks: list = []

    def prepare(self) -> None:
        """Before the first backward: the parameters' ``.grad`` emptied and hooked (once)."""
        if self.saved is not None:
            return
        self.saved = [p.grad for p in self.params]
        for p, v in zip(self.params, self.vs):
            p.grad = None
            self.hooks.append(p.register_post_accumulate_grad_hook(self._taker(v)))

    def _taker(self, v: torch.Tensor):
        flat = v.reshape(-1)

        def take(param: torch.Tensor) -> None:
            if param.grad is None:  # every share went to ``take`` (the hook runs all the same)
                return
            self.total += block_dot(flat, param.grad.reshape(-1))
            param.grad = None  # its share is in the total: nothing parameter-sized outlives its backward

        return take

    def take(self, block: int, share: torch.Tensor) -> None:
        """Dot one share of a block's H·v (shaped as its parameter, any strides) with v's share (``routes``)."""
        self.total += shaped_dot(self.vs[block], share)

    def fold(self) -> None:
        """After a backward: nothing left to add (the hooks took each share as it was made)."""

    def result(self) -> float:
        """The accumulated vᵀ·(Σ gradients), a float (0.0 when there was no backward)."""
        return self.total

    def __enter__(self) -> "Quadratic":
        return self

    def __exit__(self, *exc) -> bool:
        for hook in self.hooks:
            hook.remove()
        for p, grad in zip(self.params, self.saved or ()):
            p.grad = grad
        return False
