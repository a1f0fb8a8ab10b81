"""Per-layer rules for exact per-sample gradients from a module's input and output gradient.

One registered rule per module type, as opacus registers its grad samplers: a rule says which of
the module's parameters it covers (its *roles*) and how the per-sample gradient of each is formed
from the module's input ``x`` and the gradient ``g`` of the loss sum with respect to its output.
Supporting a new layer type means writing one rule and registering it; nothing else changes.

Shapes: ``x`` (c, L, d_in) (an embedding's ``x`` is its indices, (c, L) int), ``g`` (c, L, d_out),
for c samples of L rows each, in the model's dtype; rules compute in float32.  A rule adds the
per-sample gradients, (c, *param.shape), into ``out`` (or returns a new tensor when ``out`` is
None): a weight used by several modules (a tied embedding and decoder) gets the sum of its uses
before squaring.  With ``rows=(a, b)`` a rule forms only rows [a, b) of dim 0 of the parameter,
(c, b - a, *param.shape[1:]): the rows a rank of a sharded model holds, or one block of a large
tensor, so that no more than a block of per-sample gradients exists at once.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

PerSampleGrad = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LayerRule:
    """How to get per-sample gradients of one module type's parameters.

    name: for messages; roles: the parameter attribute names it covers (``weight``, ``bias``);
    per_sample_grad(x, g, role, module, param, out=None, rows=None) -> (c, *param.shape), or
    (c, b - a, *param.shape[1:]) for rows=(a, b), added into ``out``; ``param.shape`` is the whole
    tensor's shape (also for a sharded parameter);
    input_is_index: the input is token indices (embeddings), whose gradients touch only the
    rows of the sample's tokens, so the accumulator may keep them sparse.
    """

    name: str
    roles: frozenset
    per_sample_grad: PerSampleGrad
    input_is_index: bool = False


_REGISTRY: List[Tuple[Callable[[str, nn.Module], bool], LayerRule]] = []


def register_rule(matches: Callable[[str, nn.Module], bool], rule: LayerRule) -> LayerRule:
    """Register ``rule`` for modules where ``matches(module name, module)``; later registrations win."""
    _REGISTRY.insert(0, (matches, rule))
    return rule


def rule_for(name: str, module: nn.Module) -> Optional[LayerRule]:
    """The rule for a module, or None: its parameters then get the generic (vmapped) fallback."""
    for matches, rule in _REGISTRY:
        if matches(name, module):
            return rule
    return None


# ----------------------------------------------------------------------------- the rules
def _add(out: Optional[torch.Tensor], part: torch.Tensor, param: torch.Tensor, rows=None) -> torch.Tensor:
    shape = param.shape if rows is None else (rows[1] - rows[0], *param.shape[1:])
    part = part.reshape(part.shape[0], *shape)
    return part if out is None else out.add_(part)


def _cols(t: torch.Tensor, rows) -> torch.Tensor:
    """Float32 ``t`` restricted to [a, b) of its last dim (all of it when ``rows`` is None)."""
    return (t if rows is None else t[..., rows[0]:rows[1]]).float()


def _linear(x, g, role, module, param, out=None, rows=None):
    if role == "bias":
        return _add(out, _cols(g, rows).sum(1), param, rows)
    return _add(out, torch.bmm(_cols(g, rows).transpose(1, 2), x.float()), param, rows)  # (c, out, in)


def _conv1d(x, g, role, module, param, out=None, rows=None):
    # GPT-2's Conv1D stores its weight as (in, out): its rows are input features.
    if role == "bias":
        return _add(out, _cols(g, rows).sum(1), param, rows)
    return _add(out, torch.bmm(_cols(x, rows).transpose(1, 2), g.float()), param, rows)


def _layer_norm(x, g, role, module, param, out=None, rows=None):
    if role == "bias":
        return _add(out, _cols(g, rows).sum(1), param, rows)
    x = x.float()
    normalized = nnf.layer_norm(x, x.shape[-1:], eps=module.eps)
    return _add(out, (_cols(g, rows) * _cols(normalized, rows)).sum(1), param, rows)


def rms_eps(module: nn.Module) -> Optional[float]:
    """The epsilon of an RMS norm (transformers names it ``variance_epsilon`` or ``eps``)."""
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


def _rms_norm(x, g, role, module, param, out=None, rows=None):
    x = x.float()
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + rms_eps(module))
    return _add(out, (_cols(g, rows) * _cols(normalized, rows)).sum(1), param, rows)


def kept_tokens(idx: torch.Tensor, module: nn.Embedding, rows=None) -> torch.Tensor:
    """Tokens that send a gradient to the embedding table (the padding row receives none).

    Args:
        idx: token indices, any shape.
        module: the embedding.
        rows: (a, b): keep only tokens of table rows [a, b) (None: all rows).

    Returns:
        A bool tensor shaped like ``idx``.
    """
    keep = torch.ones_like(idx, dtype=torch.bool) if module.padding_idx is None else idx != module.padding_idx
    if rows is not None:
        keep &= (idx >= rows[0]) & (idx < rows[1])
    return keep


def _embedding(idx, g, role, module, param, out=None, rows=None):
    # Rows are added in place: the dense (c, vocab, width) gradient is never built twice.
    count, (vocab, width) = idx.shape[0], param.shape
    first, height = (0, vocab) if rows is None else (rows[0], rows[1] - rows[0])
    grad = g.new_zeros((count, height, width), dtype=torch.float32) if out is None else out
    keep = kept_tokens(idx, module, rows)
    keys = torch.arange(count, device=idx.device)[:, None] * height + (idx - first)
    grad.view(count * height, width).index_put_((keys[keep],), g[keep].float(), accumulate=True)
    return grad


LINEAR = register_rule(lambda name, m: isinstance(m, nn.Linear),
                       LayerRule("linear", frozenset({"weight", "bias"}), _linear))
CONV1D = register_rule(
    lambda name, m: type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2,
    LayerRule("conv1d", frozenset({"weight", "bias"}), _conv1d))
# T5's bucket table is indexed by (query, key) position and shared by every sample: no rule.
EMBEDDING = register_rule(
    lambda name, m: isinstance(m, nn.Embedding) and m.max_norm is None and not name.endswith("relative_attention_bias"),
    LayerRule("embedding", frozenset({"weight"}), _embedding, input_is_index=True))
LAYER_NORM = register_rule(lambda name, m: isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1,
                           LayerRule("layernorm", frozenset({"weight", "bias"}), _layer_norm))
RMS_NORM = register_rule(
    lambda name, m: (type(m).__name__.endswith("RMSNorm") or type(m).__name__ == "T5LayerNorm")
    and rms_eps(m) is not None,
    LayerRule("rmsnorm", frozenset({"weight"}), _rms_norm))
