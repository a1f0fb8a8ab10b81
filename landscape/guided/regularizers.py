"""Fine-tuning regularizers that guided dropout is compared against, each a real implementation.

- Standard dropout: every site at one probability (``schedule.uniform`` + ``schedule.apply``).
- Gaussian dropout (Wang & Manning 2013): multiplicative noise ``x * (1 + sigma * eps)``,
  ``eps ~ N(0, 1)``, ``sigma = sqrt(p / (1 - p))`` (a standard deviation, not a variance), only in
  training mode.  Attention probabilities get the same noise through a registered attention
  function, because the installed transformers hands attention dropout to eager/SDPA kernels as a
  float instead of calling a module.
- R3F / R4F (Aghajanyan et al. 2020): loss + lambda * symmetric KL between predictions on clean and
  noise-perturbed input embeddings (normal N(0, sigma^2) or uniform U(-sigma, sigma)); R4F also puts
  spectral normalization on the classification head's linear layers.
"""


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .dropout import GaussianDropout, gaussian_noise, gaussian_sigma
from .sites import find_sites, float_dropout_attr

__all__ = ["GAUSSIAN_ATTENTION", "gaussian_sigma", "gaussian_noise", "GaussianDropout",
           "use_gaussian_dropout", "restore_attention", "embedding_noise", "r3f_loss", "head_linears",
           "add_spectral_norm", "remove_spectral_norm", "MIXOUT_UNITS", "MixoutWeight", "use_mixout", "remove_mixout",
           "childtuning_mask", "top_fraction_mask", "use_childtuning", "remove_childtuning"]

GAUSSIAN_ATTENTION = "landscape_gaussian_dropout"


def _gaussian_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention whose probabilities get Gaussian dropout noise with probability ``dropout``.

    query: (B, H, Lq, D); key/value: (B, Hkv, Lk, D) (grouped-query heads are repeated);
    attention_mask: additive float mask broadcastable to (B, H, Lq, Lk) or None.
    Returns (output (B, Lq, H, D), probabilities (B, H, Lq, Lk)).
    """
    if key.shape[1] != query.shape[1]:
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = gaussian_noise(probs, float(dropout), module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_gaussian_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GAUSSIAN_ATTENTION, _gaussian_attention)
    AttentionMaskInterface.register(GAUSSIAN_ATTENTION, eager_mask)


def use_gaussian_dropout(model, p=None):
    """Turn every dropout site of ``model`` into Gaussian dropout, in place; returns the model.

    Dropout modules are replaced by ``GaussianDropout``; attention probabilities are handled by
    switching the model to an eager attention function that applies the Gaussian noise (the
    previous attention implementation is kept in ``model._landscape_previous_attn`` for
    ``restore_attention``).

    Args:
        model: the model.
        p: one probability for all sites, in [0, 1), or None to keep each site's current probability.

    Returns:
        The model.
    """
    modules = dict(model.named_modules())
    for site in find_sites(model):
        module = modules[site.name]
        if isinstance(module, nn.Dropout):
            parent_name, _, child = site.name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, GaussianDropout(module.p if p is None else p))
        elif p is not None:
            setattr(module, float_dropout_attr(module), float(p))
    _register_gaussian_attention()
    model._landscape_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(GAUSSIAN_ATTENTION)
    return model


def restore_attention(model):
    """Undo the attention switch of ``use_gaussian_dropout`` (e.g. before ``save_pretrained``)."""
    previous = getattr(model, "_landscape_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        del model._landscape_previous_attn
    return model


def _symmetric_kl(logits_p, logits_q):
    """Mean over rows of KL(p||q) + KL(q||p) between softmax(logits) rows; logits (B, C)."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return kl_pq + kl_qp


def _rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def embedding_noise(embeds, sigma, noise="normal"):
    """Noise shaped like ``embeds``: N(0, sigma^2) ("normal") or U(-sigma, sigma) ("uniform").

    Args:
        embeds: the embeddings, any shape, e.g. (B, L, H).
        sigma: the noise scale, in the embeddings' units.
        noise: "normal" or "uniform".

    Returns:
        A tensor of ``embeds``' shape, dtype and device.
    """
    if noise == "normal":
        return torch.randn_like(embeds) * sigma
    if noise == "uniform":
        return (torch.rand_like(embeds) * 2.0 - 1.0) * sigma
    raise UsageError(f"unknown R3F noise '{noise}'; use normal or uniform")


def r3f_loss(model, batch, lam=1.0, sigma=1e-5, noise="normal"):
    """R3F objective for a sequence-classification/regression model: (total, task loss, penalty).

    total = task loss on clean inputs + lam * symmetric KL(f(x) || f(x + noise)) over the class
    distributions (mean squared difference for a one-output regression head), the noise added to
    the output of the input (token) embedding layer.  Both passes get ``input_ids``
    (the noise comes in through a forward hook, not ``inputs_embeds``), so a decoder classifier
    (Llama, GPT-2) still finds each row's last non-pad token to classify from.  The noisy pass
    replays the clean pass's random state, so both see the same dropout masks and the penalty
    measures only the input-noise sensitivity; hence at sigma = 0 (or lam = 0) the total equals the
    plain loss exactly.

    Args:
        model: a sequence-classification or regression model.
        batch: dict with ``input_ids`` (B, L), ``attention_mask``, optional ``token_type_ids``, and
            ``labels`` (B,).
        lam: the weight of the penalty.
        sigma: the noise scale (see ``embedding_noise``).
        noise: "normal" or "uniform".

    Returns:
        (total, task loss, penalty): scalar tensors; the losses in nats (cross-entropy) or squared
        label units (regression).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    embedding = model.get_input_embeddings()
    device = batch["input_ids"].device
    # the clean pass draws its dropout masks exactly as a plain training step would
    state = _rng_state(device)
    clean = model(**batch)
    if lam == 0.0:
        return clean.loss, clean.loss, torch.zeros((), device=device)
    shape = (*batch["input_ids"].shape, embedding.weight.shape[-1])
    delta = embedding_noise(torch.zeros(shape, device=device, dtype=embedding.weight.dtype), sigma, noise)
    after = _rng_state(device)
    _set_rng_state(state, device)
    handle = embedding.register_forward_hook(lambda module, args, output: output + delta)
    try:
        noisy = model(**inputs)
    finally:
        handle.remove()
    _set_rng_state(after, device)
    if clean.logits.shape[-1] == 1:
        penalty = F.mse_loss(noisy.logits.float(), clean.logits.float())
    else:
        penalty = _symmetric_kl(clean.logits, noisy.logits)
    return clean.loss + lam * penalty, clean.loss, penalty


def head_linears(model):
    """{name: nn.Linear} of the task head: the linear layers outside the pretrained base model."""
    prefix = getattr(model, "base_model_prefix", "")
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (prefix and (n == prefix or n.startswith(prefix + ".")))}


def add_spectral_norm(model):
    """R4F: spectral normalization on every linear layer of the classification head, in place.

    Call ``remove_spectral_norm`` before saving, so the saved weights are plain tensors under their
    usual names.

    Args:
        model: a classification model.

    Returns:
        The list of module names changed.
    """
    from torch.nn.utils.parametrizations import spectral_norm

    names = list(head_linears(model))
    if not names:
        raise UsageError("R4F needs a classification head with linear layers; this model has none")
    modules = dict(model.named_modules())
    for name in names:
        spectral_norm(modules[name])
    return names


def remove_spectral_norm(model):
    """Fold R4F's spectral normalization into plain weights (the normalized values are kept).

    Only weights whose parametrization is spectral norm are touched: another parametrization (mixout's,
    which ``remove_mixout`` must undo itself to restore dropout and free its pretrained copies) is left.
    """
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and all(
                type(f).__name__ == "_SpectralNorm" for f in module.parametrizations["weight"]):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


# Mixout and ChildTuning-D live in their own modules; they are regularizers users reach from here.
from .childtuning import childtuning_mask, remove_childtuning, top_fraction_mask, use_childtuning  # noqa: E402
from .mixout import MIXOUT_UNITS, MixoutWeight, remove_mixout, use_mixout  # noqa: E402
