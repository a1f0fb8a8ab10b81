"""A product's vector read one parameter at a time, as the second backward needs it.

A Hessian-vector product's second backward starts at the first-order gradients with v as their
cotangents.  Handed to autograd whole, v (4 bytes per coordinate) is alive for the whole backward
beside the product it makes.  When v is a row of a Krylov basis kept in a file
(``krylov.FileBasis.row``), each gradient's node instead gets a placeholder (one zero, expanded to
the gradient's shape) and a hook that reads its parameter's part of v just before the node runs;
the part is freed once the node has used it.  The node receives the same numbers, so the product
is the same bit for bit (``tests/test_krylov.py``).
"""

from __future__ import annotations

from typing import Callable

import torch


class Cotangents:
    """The cotangents of a second backward's roots: given tensors, or parts of v loaded by node hooks.

    Args:
        pairs: (gradient with its graph, its cotangent): a tensor, or a callable that makes it
            (shaped like the gradient) when the gradient's node is about to run.
    """

    def __init__(self, pairs: list):
        self.roots = [g for g, _ in pairs]
        self.grads: list = []
        self._loads: dict = {}  # node -> [(output slot, placeholder, load)]
        for g, cotangent in pairs:
            if callable(cotangent):
                placeholder = torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
                self._loads.setdefault(g.grad_fn, []).append((g.output_nr, placeholder, cotangent))
                self.grads.append(placeholder)
            else:
                self.grads.append(cotangent.to(g.dtype))

    def attach(self) -> list:
        """Hook the nodes whose cotangents are loaded, for one backward; returns the handles (``remove()`` each)."""
        return [node.register_prehook(_loader(loads)) for node, loads in self._loads.items()]


def _loader(loads: list) -> Callable:
    def prehook(grad_outputs):
        out = list(grad_outputs)
        for slot, placeholder, load in loads:
            part = load().to(placeholder.dtype)
            given = out[slot]
            # The engine hands the placeholder over as it is unless another path added to it.
            out[slot] = part if given is None or given.data_ptr() == placeholder.data_ptr() else given + part
            del part
        return tuple(out)

    return prehook
