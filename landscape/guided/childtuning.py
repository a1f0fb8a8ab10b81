"""ChildTuning-D (Xu et al. 2021, "Raise a Child in Large Language Model").

Fine-tune only the parameters with the highest *task* Fisher, computed once before training from
the training data.
"""

import functools

import torch

from ..errors import UsageError
from .mixout import _in_any

# ------------------------------------------------------------------------------------------------
# ChildTuning-D (Xu et al. 2021, "Raise a Child in Large Language Model").
#
# Choices (and where they differ from the reference, AliceMind/ChildTuning):
# - Task Fisher: exact per-sample squared gradients of the task loss, ``fisher.compute_fisher``,
#   model in eval mode: the paper's F = (1/|D|) sum_j (d log p(y_j|x_j) / d theta)^2.  The
#   reference sums squared *batch* gradients (clipped), in train mode (dropout on).
# - Child: the ``reserve`` fraction of the pretrained body's elements with the highest Fisher, one
#   global threshold over the whole body (embeddings, encoder layers, pooler), exactly
#   round(reserve * N) elements (ties at the threshold broken by parameter order).  The reference
#   uses ``>= np.percentile``, which keeps more on ties, and ranks only parameters whose name
#   contains "layer" (the encoder), leaving embeddings and pooler always trainable.
# - The newly initialized head (everything outside ``base_model_prefix``) is always trainable and
#   not part of the ranking, as in the reference.
# - Masking: a gradient hook per parameter zeroes the gradient outside the child before it reaches
#   ``.grad``.  With (Adam)W the child's complement therefore gets zero gradients from the first
#   step on: its moments stay exactly 0 and its Adam update is 0, but decoupled weight decay still
#   shrinks it by lr * weight_decay per step, the same as the reference's ChildTuningAdamW (which
#   masks the gradient inside the optimizer, then applies weight decay to every parameter).  One
#   difference: gradient clipping sees the masked gradient here, the full one in the reference.


def _head_parameter_names(model):
    """Names of the parameters outside ``model.base_model_prefix``: the newly initialized head."""
    prefix = getattr(model, "base_model_prefix", "")
    return [n for n, _ in model.named_parameters() if not (prefix and _in_any(n, [prefix]))]


def top_fraction_mask(scores, fraction):
    """{name: bool tensor} keeping exactly round(fraction * N) elements with the highest scores.

    One global threshold over all tensors of ``scores`` ({name: tensor}, N elements in all); ties at
    the threshold are kept in name order, then element order, so the count is exact.  Masks are on
    the CPU, shaped like the scores.
    """
    if not (0.0 < float(fraction) <= 1.0):
        raise UsageError(f"the fraction of elements to keep must be in (0, 1], got {fraction}")
    names = list(scores)
    if not names:
        raise UsageError("no scores to select from")
    flat = torch.cat([scores[n].detach().reshape(-1).to("cpu", torch.float32) for n in names])
    if torch.isnan(flat).any():
        raise UsageError("the scores contain NaN (did the loss diverge?); recompute them")
    total = flat.numel()
    k = round(float(fraction) * total)
    keep = torch.zeros(total, dtype=torch.bool)
    if k == total:
        keep[:] = True
    elif k > 0:
        kth = torch.kthvalue(flat, total - k + 1).values  # the k-th largest score
        keep = flat > kth
        short = k - int(keep.sum())
        if short > 0:
            keep[(flat == kth).nonzero().squeeze(1)[:short]] = True
    masks, start = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = keep[start:start + size].reshape(scores[n].shape)
        start += size
    return masks


def childtuning_mask(model, batches, reserve=0.3):
    """ChildTuning-D's child network: {param name: bool tensor}, True = trained.

    Computes the task Fisher of ``model`` (a sequence classifier or regressor with its new head)
    once, on the training ``batches`` (dicts that ``model(**batch)`` accepts, with ``labels`` (B,);
    one row per sample), in eval mode (the mode is restored afterwards), and keeps the ``reserve``
    fraction of the pretrained body's elements with the highest Fisher (see ``top_fraction_mask``).
    Only body parameters are named: the head is always trainable and ``use_childtuning`` leaves
    unnamed parameters alone.  Masks are on the CPU.

    Raises:
        UsageError: reserve outside (0, 1], or a model without a pretrained body to select from.
    """
    from ..fisher import compute_fisher

    if not (0.0 < float(reserve) <= 1.0):
        raise UsageError(f"the ChildTuning reserve fraction must be in (0, 1], got {reserve}")
    head = set(_head_parameter_names(model))
    body = [n for n, p in model.named_parameters() if p.requires_grad and n not in head]
    if not body:
        raise UsageError("the model has no trainable pretrained-body parameters (no base_model_prefix?)")
    was_training = model.training
    model.eval()
    try:
        fisher = compute_fisher(model, batches, kind="classification")  # the classifier's (or regressor's) task loss
    finally:
        model.train(was_training)
    return top_fraction_mask({n: fisher[n] for n in body}, reserve)


def _zero_outside(drop, grad):
    return grad.masked_fill(drop, 0)


def use_childtuning(model, mask):
    """Train only the child network: gradients outside ``mask`` become 0, in place; returns the model.

    Parameters the mask does not name (the new head) keep their whole gradient.  Implemented as a
    gradient hook per named parameter, so it works with any optimizer; see the block comment above
    for what AdamW's moments and weight decay then do.  ``remove_childtuning`` undoes it.

    Args:
        model: the model.
        mask: {param name: bool tensor shaped like the parameter}, True = trained
            (``childtuning_mask``).

    Returns:
        The model.

    Raises:
        UsageError: already on, or a mask entry the model has no parameter for / of another shape.
    """
    if getattr(model, "_landscape_childtuning", None) is not None:
        raise UsageError("ChildTuning is already on for this model; call remove_childtuning first")
    params = dict(model.named_parameters())
    for name, m in mask.items():
        if name not in params:
            raise UsageError(f"the ChildTuning mask names '{name}', which this model does not have")
        if tuple(m.shape) != tuple(params[name].shape):
            raise UsageError(f"the ChildTuning mask of '{name}' has shape {tuple(m.shape)}, the "
                             f"parameter {tuple(params[name].shape)}")
    handles = []
    for name, m in mask.items():
        param = params[name]
        if param.requires_grad:
            drop = ~m.to(param.device, torch.bool)
            handles.append(param.register_hook(functools.partial(_zero_outside, drop)))
    model._landscape_childtuning = handles
    return model


def remove_childtuning(model):
    """Undo ``use_childtuning``: ordinary gradients again; returns the model (unchanged if not on)."""
    for handle in getattr(model, "_landscape_childtuning", None) or []:
        handle.remove()
    if hasattr(model, "_landscape_childtuning"):
        del model._landscape_childtuning
    return model
