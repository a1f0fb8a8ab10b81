"""PEFT adapter folders as models: ``--model DIR`` where DIR holds ``adapter_config.json``.

The base model is resolved as PEFT resolves it, from the adapter config's
``base_model_name_or_path``: a local folder, a hub id, or the embedded model (an adapter trained
on it records the embedded model's folder; when that path no longer exists, e.g. after landscape
moved, ``…/landscape/data/model`` or the name ``embedded`` still mean the embedded model).  The
adapter is applied with ``peft.PeftModel.from_pretrained``, unmerged, and every parameter is made
trainable (as ``from_pretrained`` leaves a plain model), so the stages see the adapted model whole:
the base weights (``…base_layer.weight``), the LoRA factors (``…lora_A.default.weight``) and any
module PEFT saved with the adapter (a classification head).

A sequence-classification adapter (PEFT task type ``SEQ_CLS``, as ``finetune --lora`` saves) gets
its base as a classifier whose head shape is read from the adapter's own head weights; a head the
adapter does not hold is refused, never filled randomly.

Files record ``adapter`` (the folder), ``adapter_config_sha256`` (of its adapter_config.json) and
``base_model`` (what the base resolved to) beside ``model`` (``record``).
"""

import copy
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional

from .datahome import EMBEDDED_MODEL_DIR
from .errors import UsageError
from .runtime import resolve_device, to_storage, transformers_silenced

ADAPTER_CONFIG = "adapter_config.json"
INSTALL_HINT = "pip install 'landscape[lora]' (or pip install peft)"
ADAPTER_SUBSET = "adapter"  # `--subset adapter` (directions, hessian): only the adapter's parameters


def require_peft(what="LoRA"):
    """The ``peft`` module, or UsageError naming the extra to install.

    Args:
        what: what needs peft, for the message.

    Returns:
        The imported ``peft`` module.

    Raises:
        UsageError: peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise UsageError(f"{what} needs the optional package peft: {INSTALL_HINT}") from None
    return peft


def new_parameters(loading_info: dict) -> list:
    """Parameters transformers had to initialize newly.

    Args:
        loading_info: what ``from_pretrained(..., output_loading_info=True)`` reports.

    Returns:
        Names of the keys missing from the checkpoint or of another shape there.
    """
    missing = list(loading_info.get("missing_keys") or [])
    mismatched = [entry[0] if isinstance(entry, (tuple, list)) else entry
                  for entry in loading_info.get("mismatched_keys") or []]
    return sorted(set(missing) | set(mismatched))


def is_adapter_folder(spec) -> bool:
    """True when ``spec`` is a folder holding a PEFT ``adapter_config.json``."""
    if spec is None:
        return False
    path = Path(str(spec)).expanduser()
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def read_config(folder) -> tuple:
    """(the adapter config as a dict, the SHA-256 of its file); UsageError if it is not JSON."""
    path = Path(folder).expanduser() / ADAPTER_CONFIG
    raw = path.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise UsageError(f"'{path}' is not a PEFT adapter config (JSON): {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"'{path}' is not a PEFT adapter config (a JSON object)")
    return config, hashlib.sha256(raw).hexdigest()


def resolve_base(config: dict, folder) -> Optional[str]:
    """The base model spec for ``models.load_model``: a folder, a hub id, or None (the embedded model)."""
    name = config.get("base_model_name_or_path")
    if not name:
        raise UsageError(f"adapter '{folder}' does not say its base model (no base_model_name_or_path in "
                         f"{ADAPTER_CONFIG}); load its base and apply it with peft yourself")
    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return None if path.resolve() == EMBEDDED_MODEL_DIR else str(path)
    if name == "embedded" or path.parts[-3:] == EMBEDDED_MODEL_DIR.parts[-3:]:
        return None
    return name


def record(loaded) -> dict:
    """What files store about an adapter model ({} for a plain one): adapter, config hash, base."""
    return dict(loaded.adapter or {})


def _head_rows(folder) -> dict:
    """{saved head parameter name (base model's): rows} of the modules saved with the adapter."""
    from safetensors import safe_open

    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        raise UsageError(f"adapter '{folder}' has no adapter_model.safetensors (only safetensors adapters load)")
    with safe_open(str(weights), "pt") as handle:
        return {name.removeprefix("base_model.model."): handle.get_slice(name).get_shape()[0]
                for name in handle.keys() if ".lora_" not in name}


def _classifier_base(base_spec, folder, load_base):
    """A base model as a sequence classifier whose new head the adapter's saved head replaces.

    The number of labels is read from the adapter: the output layer is the new weight with
    ``num_labels`` rows in a default (2-label) classifier, and the adapter's copy says how many rows
    it really has.
    """
    from transformers import AutoModelForSequenceClassification

    rows = _head_rows(folder)
    loaded = load_base(base_spec, True)  # checks, tokenizer

    def build(**kwargs):
        with transformers_silenced():
            return AutoModelForSequenceClassification.from_pretrained(loaded.source, output_loading_info=True,
                                                                      **kwargs)

    model, info = build()
    shapes = dict(model.named_parameters())
    new = new_parameters(info)
    outputs = [n for n in new if n.endswith(".weight") and n in rows and shapes[n].shape[0] == model.num_labels]
    if not outputs:
        raise UsageError(f"adapter '{folder}' is a sequence-classification adapter without its head's weights; "
                         "its head would be random")
    if rows[outputs[0]] != model.num_labels:
        model, info = build(num_labels=rows[outputs[0]])
    missing = [n for n in new_parameters(info) if n not in rows]
    if missing:
        raise UsageError(f"adapter '{folder}' does not hold '{missing[0]}', which its base lacks too; "
                         "that weight would be random")
    return dataclasses.replace(loaded, model=model, kind="classification")


def load_adapter(folder, load_base, device="cpu", dtype=None, allow_new_head: bool = False):
    """Load a PEFT adapter folder on its base model.

    ``models.load_model`` calls it for a folder with ``adapter_config.json``, passing itself as
    ``load_base`` (so this module does not import ``models``).

    Args:
        folder: the adapter folder.
        load_base: ``(spec, allow_new_head) -> models.LoadedModel``: loads the base on the CPU in
            float32.
        device: where the adapted model goes ("auto", "cpu", "cuda:N" or a torch.device).
        dtype: its torch dtype; None keeps float32.
        allow_new_head: accept a base checkpoint without its pretraining head.

    Returns:
        A ``models.LoadedModel`` whose model is the ``PeftModel`` (unmerged, in eval mode, every
        parameter trainable) and whose ``adapter`` records the adapter (see the module docstring).

    Raises:
        UsageError: peft is not installed (naming the extra), the config is unreadable or names no
            base, the base cannot be loaded, or the adapter does not fit the base.
    """
    peft = require_peft(f"the PEFT adapter '{folder}'")
    folder = Path(str(folder)).expanduser().resolve()
    if not (folder / "adapter_model.safetensors").is_file():  # never unpickle an adapter_model.bin
        raise UsageError(f"adapter '{folder}' has no adapter_model.safetensors; landscape reads adapter weights "
                         "from safetensors only (convert a pickled adapter_model.bin in a trusted environment)")
    config, digest = read_config(folder)
    base_spec = resolve_base(config, folder)
    if str(config.get("task_type", "")) == "SEQ_CLS":
        base = _classifier_base(base_spec, folder, load_base)
    else:
        base = load_base(base_spec, allow_new_head)
    try:
        with warnings.catch_warnings():  # transformers' deprecation note on a name PEFT still calls
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = peft.PeftModel.from_pretrained(base.model, str(folder))
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise UsageError(f"cannot apply adapter '{folder}' to its base '{base.source}': "
                         f"{str(err).splitlines()[0]}") from None
    for param in model.parameters():
        param.requires_grad_(True)
    to_storage(model, device=resolve_device(device) if isinstance(device, str) else device, dtype=dtype)
    model.eval()
    info = {"adapter": str(folder), "adapter_config_sha256": digest,
            "base_model": "embedded" if base_spec is None else base.source}
    return dataclasses.replace(base, model=model, source=str(folder), adapter=info)


def adapter_parameter_names(model) -> list:
    """``named_parameters()`` names of what the adapter trains; empty for a plain model.

    These are the LoRA factors and the modules PEFT saves with it (``modules_to_save``, e.g. a
    classification head).
    """
    return [n for n, _ in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n]


def check_adapter_subset(fisher) -> None:
    """UsageError when Fisher scores come with the adapter subset, which selects by name.

    Args:
        fisher: the Fisher scores or file given with the subset (None: none, as it should be).
    """
    if fisher is not None:
        raise UsageError(f"subset '{ADAPTER_SUBSET}' selects the adapter's parameters by name and takes no "
                         "Fisher scores")


def adapter_mask(model, names=None) -> dict:
    """{name: bool tensor}: True on the adapter's parameters, False elsewhere.

    All True for the adapter's parameters (``adapter_parameter_names``) that are in ``names`` (e.g.
    the perturbable ones; None: all), all False elsewhere.

    Raises:
        UsageError: the model has no adapter parameters (a plain model).
    """
    import torch

    mine = set(adapter_parameter_names(model))
    if not mine:
        raise UsageError("the adapter subset needs a PEFT adapter as the model (a folder with adapter_config.json)")
    allowed = mine if names is None else mine & set(names)
    return {n: torch.full(p.shape, n in allowed, dtype=torch.bool) for n, p in model.named_parameters()}


def merged_model(loaded):
    """The model in its base's parameter names.

    A merged copy of an adapter model (W + scale·B·A in every adapted weight), the model itself
    otherwise.  The copy leaves ``loaded.model`` untouched.
    """
    if not loaded.adapter:
        return loaded.model
    return copy.deepcopy(loaded.model).merge_and_unload()
