"""Mixout (Lee et al. 2020): mix each linear layer with its pretrained weights in training.

Every linear layer of the pretrained body mixes with its pretrained weights at rate p in training
(expectation preserved), identity in eval mode.

``use_mixout`` applies it in place (a parametrization per weight; dropout set to 0 as in the
reference) and ``remove_mixout`` gives back plain modules with the trained weights and the original
dropout probabilities, ready for ``save_pretrained``.
"""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError

MIXOUT_UNITS = ("neuron", "element")


class MixoutWeight(nn.Module):
    """Parametrization ``W -> mixout(W; W_pre, p)`` of one weight (Lee et al. 2020).

    In training mode each mixing unit independently takes its pretrained value with probability p:

        W_mix = W_pre + K / (1 - p) * (W - W_pre),   K ~ Bernoulli(1 - p)

    which is the reference's ``Mixout.forward`` (github.com/bloodwass/mixout)
    ``((1 - noise) * target + noise * input - p * target) / (1 - p)`` with noise = K,
    target = W_pre, input = W, rearranged: dropout applied to the deviation W - W_pre, with W_pre
    added back.  With M = 1 - K ~ Bernoulli(p) it is (M*W_pre + (1 - M)*W - p*W_pre) / (1 - p).
    E[W_mix] = W.  Where K = 0 the value is exactly
    W_pre; where K = 1 it is W_pre + (W - W_pre) / (1 - p).  Gradients are autograd's:
    dW_mix/dW = K / (1 - p).  (The reference's hand-written backward returns ``grad * noise``,
    missing that 1 / (1 - p) factor; Adam is nearly invariant to it, SGD is not.)

    A mixing unit is an input neuron (``axis`` = the weight's input dimension: all outgoing weights
    of a neuron mix together; the paper: mixout "replaces all outgoing parameters from a randomly
    selected neuron to the corresponding parameters of u"; the reference: its mask is one row
    ``noise[0]`` repeated over the output rows) or, with ``axis=None``, a single element (the
    paper's "mixconnect").  One mask is drawn per weight access, i.e. per forward call, shared by
    the batch, as in the reference.  Eval mode and p = 0 return W itself.

    Args:
        target: W_pre, shaped like the weight; kept as a frozen, non-persistent buffer (it moves
            with ``.to()`` but never appears in a state dict).
        p: mixing probability in [0, 1).
        axis: input-neuron dimension of the weight (1 for ``nn.Linear`` (out, in), 0 for GPT-2
            ``Conv1D`` (in, out)), or None for element-wise mixing.
    """

    def __init__(self, target: torch.Tensor, p: float, axis=1):
        super().__init__()
        self.p = float(p)
        self.axis = axis
        self.param_order = []  # the layer's parameter names in order, set by use_mixout for removal
        self.register_buffer("target", target.detach().clone(), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The mixed weight, shaped like ``weight``: ``weight`` itself in eval mode or with p = 0."""
        if not self.training or self.p == 0.0:
            return weight  # exactly the plain weight: eval mode is the identity
        if self.axis is None:
            shape = weight.shape
        else:
            shape = [size if d == self.axis else 1 for d, size in enumerate(weight.shape)]
        keep = torch.empty(shape, dtype=weight.dtype, device=weight.device).bernoulli_(1.0 - self.p)
        target = self.target
        return target + (weight - target) * (keep / (1.0 - self.p))

    def extra_repr(self):
        """The rate and unit in the module's printed form."""
        return f"p={self.p}, unit={'element' if self.axis is None else 'neuron'}"


def _input_axis(module):
    """Input-neuron dimension of a mixable layer's weight: 1 for nn.Linear, 0 for Conv1D; else None."""
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return 0
    return None


def _in_any(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _body_modules(model, exclude=None):
    """{name: layer} of the linear layers mixout acts on (see ``use_mixout`` for the rule)."""
    if exclude is None:
        prefix = getattr(model, "base_model_prefix", "")

        def keep(name):
            return bool(prefix) and _in_any(name, [prefix])
    else:
        excluded = [str(e) for e in exclude]

        def keep(name):
            return not _in_any(name, excluded)
    holders = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    return {name: m for name, m in model.named_modules()
            if name and keep(name) and _input_axis(m) is not None
            and holders.get(id(m.weight), 0) == 1}  # a tied weight would come untied if mixed in one use


def _mixout_target(name, module, target):
    if target is None:
        return module.weight.detach()
    key = f"{name}.weight"
    if key not in target:
        raise UsageError(f"the mixout target has no tensor '{key}'; give the pretrained weights of this "
                         "same architecture (a state dict or a model)")
    value = target[key]
    if tuple(value.shape) != tuple(module.weight.shape):
        raise UsageError(f"the mixout target '{key}' has shape {tuple(value.shape)}, the layer "
                         f"{tuple(module.weight.shape)}")
    return value.detach().to(module.weight.device, module.weight.dtype)


def use_mixout(model, p=0.9, target=None, *, exclude=None, unit="neuron"):
    """Mixout on every linear layer of the pretrained body, in place; returns the model.

    Each layer's weight W becomes ``MixoutWeight`` of it (a ``torch.nn.utils.parametrize``
    parametrization): in training mode it mixes with the pretrained weights W_pre at probability p,
    expectation preserved; in eval mode it is W.  W stays the trained parameter (the same Parameter
    object, so an optimizer built before the call keeps working) and gets the gradients.  Biases are
    not mixed (as in the reference ``MixLinear``).  Every dropout site is set to 0, as in the
    reference; ``remove_mixout`` undoes all of it.

    Args:
        model: a transformers model (or any module, with ``exclude`` given).
        p: mixing probability in [0, 1); the paper's GLUE runs use 0.9.
        target: the pretrained weights W_pre: None (the weights at the time of this call, copied
            and frozen), a state dict {``<layer>.weight``: tensor}, or a model of the same
            architecture.
        exclude: module names whose linear layers (and their sub-modules') are left alone.  None:
            every layer outside ``model.base_model_prefix`` (the newly initialized task head, the
            same rule as ``head_linears``).  ``()`` mixes every layer, the head towards its own
            initialization, as the reference's ``apply_mixout`` does.
        unit: "neuron" (all outgoing weights of an input neuron mix together: the paper's mixout
            and the reference implementation) or "element" (each weight alone: mixconnect).

    Layers: ``nn.Linear`` and GPT-2 ``Conv1D``.  A weight tied to another module (an output layer
    sharing the embedding matrix) is left alone, since mixing one of its uses would untie it.
    Memory: one frozen copy of every mixed weight.

    Raises:
        UsageError: p out of range, an unknown unit, mixout already on, no layer to mix, a layer
            already parametrized, or a target that does not fit.
    """
    if not (0.0 <= float(p) < 1.0):
        raise UsageError(f"the mixout probability must be in [0, 1), got {p}")
    if unit not in MIXOUT_UNITS:
        raise UsageError(f"unknown mixout unit '{unit}'; use one of {', '.join(MIXOUT_UNITS)}")
    if getattr(model, "_landscape_mixout", None) is not None:
        raise UsageError("mixout is already on for this model; call remove_mixout first")
    layers = _body_modules(model, exclude)
    if not layers:
        raise UsageError("no linear layer of a pretrained body to apply mixout to (a model without "
                         "base_model_prefix needs the head named in `exclude`)")
    busy = [n for n, m in layers.items() if parametrize.is_parametrized(m, "weight")]
    if busy:
        raise UsageError(f"layer '{busy[0]}' already has a parametrized weight; remove it before mixout")
    if isinstance(target, nn.Module):
        target = target.state_dict()
    if target is not None and not isinstance(target, Mapping):
        raise UsageError("the mixout target must be None, a state dict or a model")
    targets = {name: _mixout_target(name, m, target) for name, m in layers.items()}  # all checked first

    from .schedule import apply, current_probabilities, uniform

    dropout = current_probabilities(model)
    apply(model, uniform(model, 0.0))
    for name, module in layers.items():
        mix = MixoutWeight(targets[name], p, None if unit == "element" else _input_axis(module))
        mix.param_order = list(module._parameters)  # for remove_mixout to restore
        mix.train(module.training)  # a new module starts in training mode; follow the model's mode
        # unsafe=True: skip the registration-time trial evaluation, which would draw a mask and so
        # shift the random stream that a training run's dropout masks come from
        parametrize.register_parametrization(module, "weight", mix, unsafe=True)
    model._landscape_mixout = {"dropout": dropout, "layers": list(layers), "p": float(p), "unit": unit}
    return model


def remove_mixout(model):
    """Undo ``use_mixout``, in place; returns the model.

    Each mixed layer becomes a plain layer again whose ``weight`` is the trained W (the same
    Parameter object), so state-dict keys and ``save_pretrained`` are as before mixout; the frozen
    pretrained copies are freed and every dropout site gets back its probability from before
    ``use_mixout``.  A model without mixout is returned unchanged.
    """
    layers = [m for m in model.modules()
              if parametrize.is_parametrized(m, "weight")
              and any(isinstance(f, MixoutWeight) for f in m.parametrizations["weight"])]
    for module in layers:
        order = list(module.parametrizations["weight"][0].param_order)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        # removal re-registers the weight last; put it back in place so state-dict order is as before
        params = dict(module._parameters)
        module._parameters.clear()
        module._parameters.update({k: params[k] for k in order + [k for k in params if k not in order]})
    state = getattr(model, "_landscape_mixout", None)
    if state is not None:
        from .schedule import apply

        apply(model, state["dropout"])
        del model._landscape_mixout
    return model
