"""Each weight's shares of a second backward taken as they are made, not summed by autograd first.

A weight is used twice in the gradient's graph: by the forward (``x @ Wᵀ``) and by the first
backward (``grad_y @ W``), so a product's second backward sends each weight two contributions.
Autograd's engine keeps the first in the input buffer of the node they meet at (the weight's
``AccumulateGrad``, or the transpose the forward made of it) until the second arrives, then adds
them, out of place when one is a transposed view: three parameter-sized tensors at once, for every
weight whose second share is still on its way (measured on a bfloat16 Llama of width 512 and
vocabulary 32000: about 1.2 bytes per parameter for the MLP matrices, and up to 4.5 with the
output layer's vocabulary x width shares, their sum and its float32 weight; docs/curvature.md).

``Routes`` finds, once per graph, every node output that reaches a coordinate's parameter directly
or through pure views of it (a transpose, a reshape), and hooks those nodes: the hook hands each
share, viewed as the parameter, to the caller's ``take(block, share)`` (the operator's
accumulator adds it into its vector, the quadratic form dots it with v) and passes nothing on, so
no share waits in a buffer.  The sums are the engine's own: shares are taken in the order the
engine would have added them, so a product over one backward is the same bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch

# Backward nodes of ops that only view their input (no arithmetic): a share pushed through one of
# them is the same numbers, so taking it before the node changes no sum.
_VIEWS = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
                    "ReshapeAliasBackward0", "AliasBackward0", "SqueezeBackward0", "SqueezeBackward1",
                    "SqueezeBackward2", "UnsqueezeBackward0"})


class Routes:
    """The node outputs of a gradient's graph that end at a coordinate's parameter.

    Args:
        grads: the first-order gradients (with their graph) whose second backward will run.
        params: the coordinates' parameters, in block order (``take`` gets the index).
    """

    def __init__(self, grads: list, params: list):
        index = {id(p): i for i, p in enumerate(params)}
        self._ends: dict = {}  # node -> (block index, the view nodes from it to the parameter) or None
        self.routes: dict = {}  # node -> [(output slot, block index, view nodes to apply)]
        stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
        seen = set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            for slot, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                end = self._end(nxt, index)
                if end is not None:
                    self.routes.setdefault(node, []).append((slot, *end))
                else:
                    stack.append(nxt)
        self._ends = {}

    def _end(self, node, index: dict):
        """(block, view nodes to apply) when every output of ``node`` ends at one coordinate's parameter."""
        if node in self._ends:
            return self._ends[node]
        end = None
        if type(node).__name__ == "AccumulateGrad":
            block = index.get(id(node.variable))
            end = None if block is None else (block, ())
        elif type(node).__name__ in _VIEWS:
            edges = [nxt for nxt, _ in node.next_functions if nxt is not None]
            after = self._end(edges[0], index) if len(edges) == 1 and len(node.next_functions) == 1 else None
            end = None if after is None else (after[0], (node,) + after[1])
        self._ends[node] = end
        return end

    def attach(self, take: Callable[[int, torch.Tensor], None]) -> list:
        """Hook the routed nodes for one backward; returns the handles (``remove()`` each after it).

        Args:
            take: called with (block index, the share shaped as the parameter, any strides) as
                each share is made; the share goes nowhere else.
        """
        return [node.register_hook(_hook(routes, take)) for node, routes in self.routes.items()]


def _hook(routes: list, take: Callable):
    def hook(grad_inputs, grad_outputs):
        out = list(grad_inputs)
        for slot, block, views in routes:
            share = out[slot]
            if share is None:
                continue
            out[slot] = None  # before take: the node's list no longer holds it once taken
            for view in views:
                share = view(share)
                share = share[0] if isinstance(share, tuple) else share
            take(block, share)
            del share
        return tuple(out)

    return hook


def undifferentiable(grads: list, params: list) -> str:
    """The op whose backward has no derivative in a gradient's graph, on a path to a parameter ("" if none).

    Autograd records such a backward (PyTorch's SDPA on CPU, for one) as a ``NotImplemented`` node,
    which fails only when a second backward reaches it; found here, the graph can be recorded
    again with another kernel before any vector of a product is made.  Only nodes a backward
    to ``params`` runs count (they reach one of their accumulators), as the engine runs no other.

    Args:
        grads: first-order gradients with their graph.
        params: the parameters a second backward would differentiate with respect to.

    Returns:
        The forward op's backward node's name (``ScaledDotProductFlashAttentionForCpuBackward0``),
        or "" when every node on a path to ``params`` has a derivative.
    """
    targets = {id(p) for p in params}
    reaches: dict = {}  # node -> whether it reaches a target's accumulator (False while being walked)
    stack = [(g.grad_fn, False) for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node, walked = stack.pop()
        edges = [nxt for nxt, _ in node.next_functions if nxt is not None]
        if walked:  # a DAG: every edge's node is done before its parent comes back
            reaches[node] = any(reaches[nxt] for nxt in edges)
            if reaches[node] and node.name() == "torch::autograd::NotImplemented":
                return edges[-1].name() if edges else node.name()
        elif node not in reaches:
            if type(node).__name__ == "AccumulateGrad":
                reaches[node] = id(node.variable) in targets
                continue
            reaches[node] = False
            stack.append((node, True))
            stack.extend((nxt, False) for nxt in edges if nxt not in reaches)
    return ""
