"""Dense references for the curvature tests: every one by a method independent of ``curvature``.

* ``dense_hessian``: the Hessian of a causal LM's token-weighted cross-entropy by
  forward-over-reverse products on every unit vector (the operator uses double backward);
* ``dense_hessian_of``: the Hessian of any scalar in a few tensors, one double backward per
  coordinate (for a loss built by hand, e.g. in an adapter's factors alone);
* ``finite_difference_hvp``: (g(θ+εv) − g(θ−εv)) / 2ε in float64, for models too big for a dense H;
* ``symmetric_matrix``: Q·diag(λ)·Qᵀ with known eigenvalues (so known trace and spectrum);
* ``masked_submatrix``: the principal submatrix of a dense H on a mask's elements.

All in float64 on the CPU; sizes of a few thousand coordinates at most.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence
from unittest import mock

import torch

from ..data import objectives
from ..data.objectives import sequence_losses


def dense_hessian(model: torch.nn.Module, batches: Sequence[dict], chunk: int = 384):
    """(H float64 (n, n), names): Hessian of Σ token CE / Σ tokens of a causal LM over its trainable parameters.

    The loss is written here by hand (shifted next-token cross-entropy, labels -100 ignored), not
    taken from ``objectives``.  Forward-over-reverse (``jvp`` of ``grad``) on every unit vector,
    vmapped: a method independent of the operator's double backward.  Not ``torch.func.hessian``:
    in torch 2.13 its reverse-over-reverse half gets LayerNorm weights wrong when the LayerNorm
    input also depends on the parameters (``jacrev(jacrev(f))`` disagrees with finite
    differences there).  Coordinates: the trainable parameters in ``named_parameters()`` order.
    """
    from torch.func import functional_call, grad, jvp, vmap

    ref = copy.deepcopy(model).double().eval()
    ref.set_attn_implementation("eager")
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [ref.get_parameter(n).shape for n in names]
    flat = torch.cat([ref.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[offset: offset + shape.numel()].view(shape)
            offset += shape.numel()
        total, count = 0.0, 0
        for b in batches:
            logits = functional_call(ref, params, (), {"input_ids": b["input_ids"],
                                                       "attention_mask": b["attention_mask"]}).logits
            targets = b["labels"][:, 1:]
            keep = targets != -100
            total = total + torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum")
            count += int(keep.sum())
        return total / count

    def column(e):
        return jvp(grad(loss), (flat,), (e,))[1]

    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    H = torch.cat([vmap(column)(part) for part in eye.split(chunk)])
    return ((H + H.T) / 2).detach(), names


def dense_hessian_of(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The symmetrized Hessian of the scalar ``loss`` in ``params`` (flattened in order), by rows.

    One double backward per coordinate: ``loss`` must have been computed with a graph (float64
    recommended).
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, list(params), retain_graph=True)])
            for g in flat]
    dense = torch.stack(rows).detach()
    return (dense + dense.T) / 2


def _float64_token_losses(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets


def finite_difference_hvp(model: torch.nn.Module, batches: Sequence[dict], v: Sequence[torch.Tensor], kind: str,
                          eps: float = 2e-3) -> torch.Tensor:
    """(g(θ+εv) − g(θ−εv)) / 2ε in float64: g the gradient of ``sequence_losses``' token-weighted mean.

    In float64 (sequence_losses' cross-entropy too); T5's RMSNorm still squares in float32, whose
    rounding error divided by ε is what limits ε from below.

    Args:
        model: the model (copied; its weights are untouched).
        batches: batch dicts with ``labels``.
        v: one tensor per trainable parameter, in ``parameters()`` order.
        kind: the objective (``models.LoadedModel.kind``).
        eps: the step.

    Returns:
        The flat (n,) float64 product over the trainable parameters.
    """
    ref = copy.deepcopy(model).double().eval()
    params = [p for p in ref.parameters() if p.requires_grad]

    def grad_at(sign):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(sign * eps * d.double())
        total, tokens = 0.0, 0.0
        for b in batches:
            s = sequence_losses(ref, b, kind)
            total, tokens = total + s.loss_sum.sum(), tokens + float(s.n_tokens.sum())
        grads = torch.autograd.grad(total / tokens, params, allow_unused=True)
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(sign * eps * d.double())
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])

    with mock.patch.object(objectives, "_token_losses", _float64_token_losses):
        return (grad_at(1) - grad_at(-1)) / (2 * eps)


def symmetric_matrix(eigenvalues: Sequence[float], seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Q·diag(eigenvalues)·Qᵀ for a seeded random orthogonal Q: a symmetric matrix of known spectrum."""
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    matrix = (q * values) @ q.T
    return ((matrix + matrix.T) / 2).to(dtype)


def masked_submatrix(H: torch.Tensor, mask: Optional[dict], names: Sequence[str]):
    """(H[keep][:, keep], keep): the principal submatrix on a mask's elements.

    ``names`` orders H's coordinates (each parameter's elements flattened in turn); None keeps all.
    """
    if mask is None:
        return H, torch.ones(H.shape[0], dtype=torch.bool)
    keep = torch.cat([torch.as_tensor(mask[n]).reshape(-1).bool() for n in names])
    return H[keep][:, keep], keep
