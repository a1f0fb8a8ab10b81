"""A Hessian-vector product from gradients only: central differences of gradients.

``H·v ≈ (8(∇L(θ + εv) − ∇L(θ − εv)) − (∇L(θ + 2εv) − ∇L(θ − 2εv))) / (12ε)`` needs no double
backward, so it works with attention kernels that have no second derivative (SDPA on CPU, flash)
and with wrappers that cannot take one; it costs four first-order gradients per product (forward
and backward each) where the exact product (``operator.HessianOperator``, ``hvp="exact"``) reuses a
cached graph for one second-order backward.  Its error is the stencil's truncation (O(ε⁴) times the
fifth derivative) plus the gradients' rounding divided by ε (O(machine eps / ε)); ``step`` balances
the two (docs/curvature.md gives the measured errors).
"""

from __future__ import annotations

import math

import torch

from ..data.objectives import sequence_losses

# ε·‖v‖_∞ = DIFFERENCE_STEP·(1 + ‖θ‖)/√n in float32, ‖θ‖ the norm of the n elements of the
# coordinates' parameters: no coordinate moves by more than DIFFERENCE_STEP times the weights' RMS,
# whether v is spread or gathers on few coordinates (a Lanczos vector, the loss's gradient: on
# SmolLM2 the gradient's largest element is 1800 times a spread vector's, so the old rule
# ε·‖v‖ = 2e-4·(1 + ‖θ‖) moved the largest by 0.36 of the RMS, 0.72 at 2ε, and was 0.83 off).
# Measured (docs/curvature.md, "Concentrated vectors"), largest relative error over the loss's
# gradient, 2 random v and Lanczos vectors 1-3, float32: 1.8e-4 on the four tiny test models
# (8 × 32 tokens) and 4.8e-4 on SmolLM2 (1 × 16); on the tiny models 2.5e-3 at 2c (truncation along
# T5's Lanczos vectors), 1.4e-4 at c/2 and 5.2e-4 at c/8 (rounding).
DIFFERENCE_STEP = 3e-3

# (k, w_k): H·v ≈ Σ_k w_k·(∇L(θ + kεv) − ∇L(θ − kεv))/ε, the fourth-order central stencil (its ε²
# terms cancel).  The second-order one ((1, 1/2), two gradients) meets 1e-3 at no single step on the
# test models: along the gradient (critical sharpness's --rayleigh direction), where the third
# derivative is large, it needs c <= 1e-4, where random v's rounding is 3.4e-4 already, and it is
# 9.4e-3 off on T5 at c = 3e-4 (docs/curvature.md).
STENCIL = ((1, 8.0 / 12.0), (2, -1.0 / 12.0))

# Activations whose second derivative is zero almost everywhere but whose gradient jumps at a kink:
# a difference across a kink counts the jump, which the exact product leaves out.
_KINKED = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.Hardtanh, torch.nn.PReLU)


def kinked_activations(model: torch.nn.Module) -> list[str]:
    """Class names of the model's piecewise-linear activation modules (ReLU and kin), sorted."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, _KINKED)})


def step(params: list, v: torch.Tensor, eps: float, shards=None) -> float:
    """ε for a product along v: ``DIFFERENCE_STEP·(eps/eps_float32)^(1/5)·(1 + ‖θ‖)/(√n·‖v‖_∞)`` (0 for v = 0).

    Args:
        params: the coordinates' parameters (their n elements and norm ‖θ‖; off-mask elements count
            too: the weights' RMS, whatever the mask).
        v: the flat vector.
        eps: the machine epsilon of the parameters' dtype (float64 models take a smaller step).
        shards: a ``shards.VectorShards`` when v and the parameters are this rank's pieces
            (sharded with FSDP2): the sums add, and the largest element is the largest of, the
            group's pieces, so every rank takes the same step.
    """
    largest = float(v.abs().max()) if v.numel() else 0.0
    if shards is not None:
        from ..sharding import local_tensor

        largest = shards.largest(largest)
        count = shards.total(float(sum(local_tensor(p).numel() for p in params)))
        norm_theta = math.sqrt(shards.total(sum(float(local_tensor(p).double().square().sum()) for p in params)))
    else:
        count = float(sum(p.numel() for p in params))
        norm_theta = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
    if largest == 0.0:
        return 0.0
    scale = (eps / torch.finfo(torch.float32).eps) ** (1.0 / 5.0)  # the optimum of a 4th-order stencil
    return DIFFERENCE_STEP * scale * (1.0 + norm_theta) / (math.sqrt(count) * largest)


def difference_product(model: torch.nn.Module, space, batches: list, kind: str, v: torch.Tensor,
                       scale: float = 1.0) -> tuple:
    """(Σ over batches of the summed loss's H·v by central difference, Σ target tokens).

    The parameters are perturbed by swapping each one's ``.data`` for ``θ ± kεv`` (new tensors)
    and get their own tensor back afterwards, always (``finally``): bit-identical, no rounding of
    θ + εv − εv, at the cost of one parameter-sized tensor per perturbed block at a time.

    Args:
        model: the model (in eval mode: dropout would make the two gradients differ by noise).
        space: the operator's ``_Space`` (coordinates, ``unflatten``/``flatten``).
        batches: batch dicts with ``labels``.
        kind: the objective for ``objectives.sequence_losses``.
        v: (dim,) float32 on the model's device.
        scale: the step is ``step(...)`` times this (a check of the step compares two).

    Returns:
        ((dim,) float32 unnormalized H·v, float tokens); divide the first by the second for the
        mean loss's product.
    """
    params = space.params
    eps = step(params, v, torch.finfo(params[0].dtype).eps, space.shards) * float(scale)
    out = torch.zeros(space.local_dim, dtype=torch.float32, device=space.device)
    tokens = 0.0
    if eps == 0.0:
        for batch in batches:
            with torch.no_grad():
                tokens += float(sequence_losses(model, batch, kind).n_tokens.sum())
        return out, tokens
    vs = space.unflatten(v)
    if space.shards is not None:
        return _sharded(model, space, batches, kind, vs, eps, out)
    originals = [p.data for p in params]
    try:
        for batch in batches:
            for multiple, weight in STENCIL:
                plus, tokens_b = _gradient(model, space, batch, kind, originals, vs, multiple * eps)
                minus, _ = _gradient(model, space, batch, kind, originals, vs, -multiple * eps)
                # Each pair's difference first, then the sum: the small differences are not added
                # to (and rounded against) a whole gradient.
                out.add_(plus.sub_(minus), alpha=weight)
                del plus, minus
            tokens += tokens_b
    finally:
        for p, data in zip(params, originals):
            p.data = data
    return out.div_(eps), tokens


def _gradient(model, space, batch, kind, originals, vs, shift: float) -> tuple:
    """(flat gradient of the batch's summed loss at θ + shift·v, its target tokens)."""
    for p, data, vb in zip(space.params, originals, vs):
        p.data = data + shift * vb.to(data.dtype)
    losses = sequence_losses(model, batch, kind)
    grads = torch.autograd.grad(losses.loss_sum.sum(), space.params, allow_unused=True)
    return space.flatten(grads), float(losses.n_tokens.sum())


def _sharded(model, space, batches, kind, vs, eps: float, out: torch.Tensor) -> tuple:
    """``difference_product`` on a model sharded with FSDP2: this rank's pieces of H·v.

    FSDP2 gathers each block's rows from its own storage, not from the parameters' ``.data``, so
    the rows this rank holds are written in place (θ ± kεv) and copied back from a copy of them
    afterwards, always: bit-identical again.  Each gradient comes back from FSDP2's reduce-scatter
    in the parameters' ``.grad`` (every rank of the group ran the same batch), whose rows are this
    rank's; every parameter's own ``.grad`` is put back afterwards.
    """
    from ..sharding import local_tensor

    rows = [local_tensor(p) for p in space.params]
    originals = [r.clone() for r in rows]
    every = list(model.parameters())
    grads_before = [p.grad for p in every]
    tokens = 0.0
    try:
        for batch in batches:
            for multiple, weight in STENCIL:
                pair = []
                for shift in (multiple * eps, -multiple * eps):
                    for r, data, vb in zip(rows, originals, vs):
                        r.copy_(data + shift * vb.to(data.dtype))
                    for p in every:
                        p.grad = None
                    losses = sequence_losses(model, batch, kind)
                    losses.loss_sum.sum().backward()
                    pair.append(space.flatten([None if p.grad is None else local_tensor(p.grad) for p in space.params]))
                    tokens_b = float(losses.n_tokens.sum())
                out.add_(pair[0].sub_(pair[1]), alpha=weight)
                del pair
            tokens += tokens_b
    finally:
        with torch.no_grad():
            for r, data in zip(rows, originals):
                r.copy_(data)
        for p, g in zip(every, grads_before):
            p.grad = g
    return out.div_(eps), tokens
