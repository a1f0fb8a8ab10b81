"""Guided LoRA dropout: one dropout probability per LoRA module, from the Fisher of the module it adapts.

PEFT's LoRA computes ``base(x) + B(A(dropout(x))) * scale`` with one ``lora_dropout`` per adapted
module.  A LoRA *site* is such a module, named by the base module it adapts
(``model.layers.3.self_attn.q_proj``, not PEFT's ``base_model.model.…`` path), and scored by the
element-weighted mean pretraining Fisher of that base module's parameters (its weight, and bias if
it has one).  Site names and scores do not depend on the LoRA rank, so one schedule serves any rank
and any adapter over the same targets.  ``schedule.apply`` on a ``PeftModel`` sets these
probabilities (``set_probabilities``); they act in training mode and are off in eval, like every
``nn.Dropout``.

``peft`` is the optional extra ``landscape[lora]``; without it, anything that needs it raises one
UsageError naming the extra.
"""

import re
import warnings

from .. import checks
from ..adapters import INSTALL_HINT, require_peft  # noqa: F401 (names of this module before)
from ..errors import UsageError
from .lora_sites import (  # noqa: F401 (names of this module before the split)
    LORA_KIND,
    base_parameter_name,
    current_probabilities,
    fisher_by_base_name,
    is_peft_model,
    lora_modules,
    lora_sites,
    set_probabilities,
    split_probabilities,
)


def lora_schedule(model, fisher, p_upper=0.1, p_lower=0.0, shape="linear", gamma=2.0, model_source="",
                  fisher_source="", model_fingerprint=""):
    """Guided LoRA dropout schedule of a PeftModel from a Fisher of its base model (paper eq. 9-10).

    Args:
        model: a PeftModel with LoRA modules.
        fisher: {parameter name: diagonal Fisher}, of the base model (or of the PeftModel).
        p_upper: the probability of the lowest-scored site (as ``schedule.guided_dropout``).
        p_lower: the probability of the highest-scored site.
        shape: "linear", "log" or "power" (as ``schedule.guided_dropout``).
        gamma: the exponent of the "power" shape.
        model_source: recorded in the schedule.
        fisher_source: recorded in the schedule.
        model_fingerprint: the model's ``identity.model_fingerprint``, recorded in the schedule.

    Returns:
        A ``schedule.Schedule`` whose sites are the adapted base modules (kind "lora").

    Raises:
        UsageError: no LoRA modules, or a Fisher without an entry for an adapted module.
    """
    from ..checks import dropout_bounds
    from . import schedule as sched
    from .sites import site_scores

    dropout_bounds(p_upper, p_lower)
    sites = lora_sites(model)
    scores = site_scores(sites, fisher_by_base_name(fisher))
    order = sorted(sites, key=lambda s: scores[s.name])
    probs = sched._probabilities(shape, [scores[s.name] for s in order], p_upper, p_lower, gamma)
    entries = [sched.SiteProbability(name=s.name, kind=LORA_KIND, block=s.block, score=scores[s.name], rank=r,
                                     p=float(p)) for r, (s, p) in enumerate(zip(order, probs))]
    return sched.Schedule(sites=entries, model=model_source, fisher=fisher_source, shape=shape, p_upper=p_upper,
                          p_lower=p_lower, model_fingerprint=model_fingerprint)


_SPEC_KEYS = {"r": int, "alpha": float, "targets": str, "layers": str}


def parse_lora_spec(text: str) -> dict:
    """'r=8,alpha=16,targets=q_proj,v_proj' -> {'r': 8, 'alpha': 16.0, 'targets': ['q_proj', 'v_proj']}.

    Keys: r (rank, default 8), alpha (default 2 r), targets (module names, comma- or
    plus-separated; default PEFT's for the architecture), layers (block indices to adapt, e.g.
    ``18-29`` or ``0+5``; default all: adapting only the top blocks also spares the backward pass
    through the others).  A bare word after ``targets=`` continues the target list.  Targets and
    layers are sets: a repeated one is merged (kept once).  UsageError for an unknown key, a key
    given twice or a bad value.
    """
    out, key, given = {"r": 8, "alpha": None, "targets": None}, None, set()
    for token in [t.strip() for t in str(text).split(",") if t.strip()]:
        if "=" in token:
            key, _, value = (part.strip() for part in token.partition("="))
            if key in given:  # the later value would silently replace the earlier one
                raise UsageError(f"LoRA spec: key '{key}' is given twice in '{text}'; give each key once")
            given.add(key)
        elif key == "targets":
            value = token
        else:
            raise UsageError(f"LoRA spec: '{token}' is not key=value; use e.g. r=8,alpha=16,targets=q_proj,v_proj")
        if key not in _SPEC_KEYS:
            raise UsageError(f"LoRA spec: unknown key '{key}'; use r, alpha, targets and layers (the regularizer sets "
                             "dropout)")
        if key == "layers":
            out["layers"] = _layer_list(value)
            continue
        if key == "targets":
            out["targets"] = (out["targets"] if "=" not in token else []) + [v for v in re.split(r"\+", value) if v]
            continue
        try:
            out[key] = _SPEC_KEYS[key](value)
        except ValueError:
            raise UsageError(f"LoRA spec: {key} must be a number, got '{value}'") from None
    # r above a layer's width adapts nothing more, and r x (width in + out) is allocated per target:
    # a bound keeps a huge r from exhausting memory; alpha=inf would scale every update to NaN.
    if out["r"] not in checks.LORA_RANK or (out["alpha"] is not None and out["alpha"] not in checks.POSITIVE):
        raise UsageError(f"LoRA spec: r must be at least 1 and at most {checks.LORA_RANK_MAX}, and alpha "
                         f"{checks.POSITIVE.describe()}; got r={out['r']}, alpha={out['alpha']}")
    if out["alpha"] is None:
        out["alpha"] = float(2 * out["r"])
    for name in ("targets", "layers"):  # sets of modules and blocks: a repeat adapts nothing twice, so it merges
        if out.get(name) is not None:
            out[name] = list(dict.fromkeys(out[name]))
    return out


def _layer_list(text):
    """'18-29' -> [18, ..., 29]; '0+5' -> [0, 5]."""
    layers = []
    try:
        for part in text.split("+"):
            low, _, high = part.partition("-")
            layers.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UsageError(f"LoRA spec: layers must be block indices like 18-29 or 0+5, got '{text}'") from None
    if not layers or min(layers) < 0:
        raise UsageError(f"LoRA spec: layers must be block indices like 18-29 or 0+5, got '{text}'")
    return layers


def wrap_classifier(model, spec: str):
    """A classifier from ``training.load_classifier`` with LoRA of ``spec`` (a ``--lora`` string).

    Every module the checkpoint lacked (the new head, and e.g. a BERT pooler that a masked-LM
    checkpoint does not hold) trains fully and is saved with the adapter (PEFT's
    ``modules_to_save``): left frozen at its random initialisation, it would be neither trained nor
    reproducible from the adapter.
    """
    new = sorted({n.rpartition(".")[0] for n in getattr(model, "landscape_new_parameters", [])})
    return wrap(model, parse_lora_spec(spec), "SEQ_CLS", modules_to_save=new or None)


def wrap(model, spec: dict, task_type: str, dropout: float = 0.0, modules_to_save=None):
    """``peft.get_peft_model`` of ``model`` with LoRA of ``spec`` (from ``parse_lora_spec``).

    task_type: PEFT's task type ("SEQ_CLS" keeps the new classification head trainable and saved
    with the adapter; "CAUSAL_LM", ...).  modules_to_save: more modules that train fully and are
    saved with the adapter.  UsageError when a target names no module of the model.
    """
    peft = require_peft("LoRA")
    config = peft.LoraConfig(task_type=task_type, r=spec["r"], lora_alpha=spec["alpha"],
                             target_modules=spec["targets"], lora_dropout=float(dropout),
                             layers_to_transform=spec.get("layers"), modules_to_save=modules_to_save)
    try:
        with warnings.catch_warnings():  # transformers' deprecation note on a name PEFT still calls
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as err:  # PEFT's word for targets it cannot find or cannot infer
        raise UsageError(f"LoRA spec: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------------------- fine-tuning with LoRA

# Regularizers that act on LoRA's dropout: each sets every LoRA module's lora_dropout (the base
# model's own dropout sites keep their configured values under every one, so only lora_dropout differs).
LORA_REGULARIZERS = ("none", "dropout", "gaussian", "guided", "dropout-matched", "guided-shuffled")
_WHY_NOT = {
    "r3f": "R3F's embedding-noise penalty is implemented for full fine-tuning only",
    "r4f": "R4F's embedding-noise penalty and spectral-normalized head are implemented for full fine-tuning only",
    "mixout": "mixout mixes trained body weights with the pretrained ones, and LoRA freezes the body",
    "childtuning": "ChildTuning masks the gradients of the body's weights, and LoRA freezes the body",
}


def check_lora_regularizers(names) -> None:
    """UsageError (one line, naming why) for a regularizer that has no meaning under LoRA."""
    for name in names:
        if name in _WHY_NOT:
            raise UsageError(f"LoRA fine-tuning does not take the {name} regularizer: {_WHY_NOT[name]}; use any of "
                             f"{', '.join(LORA_REGULARIZERS)}")


def lora_probabilities(model, name: str, dropout: float, schedule=None) -> dict:
    """{LoRA site: p} that regularizer ``name`` trains with.

    none: 0 everywhere; dropout and gaussian: ``dropout`` everywhere; the schedule regularizers: the
    p of ``schedule`` (already the run's: guided, matched or shuffled), which must name exactly the
    model's LoRA sites (a schedule for other targets is refused).
    """
    check_lora_regularizers([name])
    sites = list(lora_modules(model))
    if schedule is None:
        return {s: 0.0 if name == "none" else float(dropout) for s in sites}
    from . import schedule as sched

    probs = sched._as_probabilities(schedule)
    extra = [n for n in probs if n not in sites]
    missing = [n for n in sites if n not in probs]
    if extra or missing:
        what = f"names '{extra[0]}', which LoRA does not adapt" if extra else f"has no entry for '{missing[0]}'"
        raise UsageError(f"the guided LoRA schedule {what}: make it for these LoRA targets "
                         "(landscape schedule --lora, or finetune --fisher)")
    return probs


def prepare(model, name: str, dropout: float, schedule=None):
    """Set a PeftModel's LoRA dropout for regularizer ``name``, in place; returns the model.

    gaussian: multiplicative Gaussian noise of the same p in every ``lora_dropout`` slot
    (``regularizers.GaussianDropout``); the others: standard dropout (see ``lora_probabilities``).
    """
    return set_probabilities(model, lora_probabilities(model, name, dropout, schedule), gaussian=name == "gaussian")
