"""LoRA modules of a PEFT model as dropout sites: names, lookup, and their ``lora_dropout`` p.

The low half of guided LoRA dropout: ``guided.schedule.apply`` uses it to set LoRA sites, and
``guided.lora`` (schedules, wrapping, regularizers) builds on it.  peft is imported only where a
PEFT model is given.
"""

from typing import Optional

from torch import nn

from ..errors import UsageError
from .dropout import GaussianDropout
from .sites import DropoutSite

LORA_KIND = "lora"
_PEFT_PREFIX = "base_model.model."


def is_peft_model(model) -> bool:
    """True for a PEFT ``PeftModel`` (anything with PEFT's ``peft_config`` and ``get_base_model``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def base_parameter_name(name: str) -> str:
    """A parameter name of a PeftModel as the base model names it.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``; a name without PEFT's prefix is returned as it is.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def lora_modules(model) -> dict:
    """{base module name: PEFT LoRA layer} of a PeftModel (empty for any other model)."""
    if not is_peft_model(model):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.get_base_model().named_modules()
            if isinstance(module, LoraLayer)}


def lora_sites(model) -> list:
    """One DropoutSite per LoRA module of a PeftModel, named by the base module it adapts.

    param_names are the base module's parameters as the base model names them (what a Fisher file
    of the base model holds).  UsageError when the model has no LoRA modules.
    """
    modules = lora_modules(model)
    if not modules:
        raise UsageError("the model has no LoRA modules: guided LoRA dropout needs a PEFT LoRA model "
                         "(an adapter folder, or --lora targets=... on the base model)")
    sites = []
    for name, module in modules.items():
        base = module.get_base_layer()
        params = [f"{name}.{p}" for p, _ in base.named_parameters(recurse=False)]
        sites.append(DropoutSite(name=name, kind=LORA_KIND, block=name.rpartition(".")[0], param_names=params))
    return sites


def fisher_by_base_name(fisher: dict) -> dict:
    """A Fisher {name: tensor} keyed by base-model names.

    Whether it was computed on the base model or on a PeftModel (whose base weights are
    ``….base_layer.weight``); LoRA's own A/B entries are dropped (they are not the base module's).
    """
    return {base_parameter_name(n): t for n, t in fisher.items() if ".lora_" not in n}


def _dropout_slots(module):
    """[(ModuleDict, adapter name)] of one LoRA layer's ``lora_dropout`` entries."""
    return [(module.lora_dropout, key) for key in module.lora_dropout.keys()]


def split_probabilities(model, probs: dict):
    """({LoRA site: p}, {other name: p}) of a {name: p} for a PeftModel; ({}, probs) otherwise."""
    modules = lora_modules(model)
    mine = {n: p for n, p in probs.items() if n in modules}
    return mine, {n: p for n, p in probs.items() if n not in modules}


def set_probabilities(model, probs: dict, gaussian: Optional[bool] = None):
    """Set each named LoRA module's ``lora_dropout`` to probability p, in place.

    PEFT builds ``nn.Identity`` instead of a Dropout when its ``lora_dropout`` is 0; that slot gets
    an ``nn.Dropout(p)`` here, so a p set later really drops.  gaussian: True puts
    ``GaussianDropout(p)`` in each slot, False a standard ``nn.Dropout(p)``, None keeps the kind of
    dropout the slot has.  Every p is checked before anything changes.
    """
    modules = lora_modules(model)
    for name, p in probs.items():
        if name not in modules:
            raise UsageError(f"'{name}' is not a LoRA module of this model")
        if not 0.0 <= float(p) < 1.0:
            raise UsageError(f"dropout probability {p} for LoRA site '{name}' is outside [0, 1)")
    for name, p in probs.items():
        for slots, key in _dropout_slots(modules[name]):
            current = slots[key]
            use_gaussian = isinstance(current, GaussianDropout) if gaussian is None else gaussian
            if use_gaussian and not isinstance(current, GaussianDropout):
                slots[key] = GaussianDropout(float(p))
            elif not use_gaussian and type(current) is not nn.Dropout:
                slots[key] = nn.Dropout(float(p))
            else:
                current.p = float(p)
    return model


def current_probabilities(model) -> dict:
    """{LoRA site: the dropout probability its (first) adapter uses now}; 0 for PEFT's Identity."""
    out = {}
    for name, module in lora_modules(model).items():
        slots, key = _dropout_slots(module)[0]
        out[name] = float(getattr(slots[key], "p", 0.0))
    return out


# ---------------------------------------------------------------------------- --lora r=8,alpha=16,...
