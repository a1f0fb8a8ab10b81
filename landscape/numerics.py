"""The code numerics a result was computed under: one registry of the changes that moved numbers.

A change of how a model is loaded or run (a buffer kept in float32 where it was rounded before) moves
every number computed on the models it touches, without touching their weights: the checkpoint's
fingerprint and the settings stay the same.  A file begun before such a change and resumed after it
would mix points of two forwards.  So every resumable result records, beside its fingerprints, the
changes of ``CHANGES`` that apply to the model it is computed on (``stamp``, under ``NUMERICS_KEY``),
and a resume whose stamp differs from the running code's for that model is refused
(``identity.differences``, ``errors.NumericsChanged``).  docs/identity.md, "Numerics".

A future change of numerics is one entry of ``CHANGES``: its name (what files record), what it
changed (for refusals), and a predicate saying which loads it changes.  Files recorded before a
change was registered lack its name, so they are refused on the models it applies to and resume on
every other model.  A stamp is recorded only when some change applies (files of models no change
touches stay as the previous release wrote them), so a missing stamp means "none".

This module also holds what the load keeps in float32 in a half precision (``kept_in_float32``,
used by ``runtime.to_storage``), so the rule and the change that records it are read side by side.
Importing it imports no torch.
"""

import re
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

NUMERICS_KEY = "numerics"

_HALF = ("bfloat16", "float16")


def held_dtype(model: Any) -> str:
    """The precision a model was loaded in: 'float16' or 'bfloat16' when any parameter is held so, else the first's.

    A float16 T5 holds its ``wo`` in float32 (``kept_in_float32``): it is still a float16 load.
    """
    names = {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()}
    for name in ("float16", "bfloat16"):
        if name in names:
            return name
    first = next(iter(model.parameters()), None)
    return "float32" if first is None else str(first.dtype).replace("torch.", "")


def _has_rotary_embedding(model: Any) -> bool:
    return any(_is_rotary(module) for module in model.modules())


def _is_rotary(module: Any) -> bool:
    # transformers names every rotary embedding class so (LlamaRotaryEmbedding, Qwen2RotaryEmbedding, ...);
    # "in", not "ends with": the rule the load has applied since issue 29, so no number moves with this.
    return "RotaryEmbedding" in type(module).__name__


def _fp32_patterns(model: Any, dtype: str) -> List[str]:
    """The model's ``_keep_in_fp32_modules`` patterns that transformers applies to a load in ``dtype``.

    Its ``_get_dtype_plan``: ``_keep_in_fp32_modules`` for float16 only (bfloat16 has float32's range),
    ``_keep_in_fp32_modules_strict`` (where the installed transformers has it) for float16 and bfloat16.
    """
    patterns = []
    if dtype == "float16":
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in _HALF:
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return sorted(set(str(p) for p in patterns))


def _fp32_matcher(model: Any, dtype: str) -> Optional[Callable[[str], bool]]:
    """Whether a state-dict name is kept in float32, as transformers matches it; None: nothing is."""
    patterns = _fp32_patterns(model, dtype)
    if not patterns:
        return None
    # transformers' build_glob_alternation: each pattern a glob ('*' -> '.*'), searched anywhere in the name
    alternation = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return lambda name: alternation.search(name) is not None


def _keeps_modules(model: Any, dtype: str) -> bool:
    """Whether a load in ``dtype`` keeps some tensor of ``model`` in float32 by its class's rule (not a rotary one)."""
    return any(kind != "rotary" for _, kind, _ in kept_in_float32(model, dtype))


def kept_in_float32(model: Any, dtype: Any) -> List[Tuple[Any, str, str]]:
    """The tensors a load in ``dtype`` keeps in float32, as transformers' ``from_pretrained(dtype=...)`` does.

    * a rotary embedding's floating buffers (``inv_freq``: computed from the config, not read from
      the checkpoint), in any dtype: transformers computes them in float32 and its rotary forward
      reads them so;
    * in float16, the parameters and persistent buffers whose state-dict name matches the model's
      ``_keep_in_fp32_modules`` (T5's ``wo``: its activations overflow float16), and in float16 or
      bfloat16 those matching ``_keep_in_fp32_modules_strict``.

    Args:
        model: the model, before it is cast.
        dtype: the dtype it is cast to (a torch.dtype, its name, or None for no cast).

    Returns:
        [(module, kind, key)]: kind 'rotary' (a buffer kept as loaded: ``module._buffers[key]``),
        'buffer' or 'parameter' (held in float32: ``module._buffers[key]``, ``module._parameters[key]``).
    """
    name = None if dtype is None else str(dtype).replace("torch.", "")
    kept = [(module, "rotary", key) for module in model.modules() if _is_rotary(module)
            for key, buf in module._buffers.items() if buf is not None and buf.is_floating_point()]
    matches = _fp32_matcher(model, name) if name in _HALF else None
    if matches is None:
        return kept
    for prefix, module in model.named_modules(remove_duplicate=False):
        lead = f"{prefix}." if prefix else ""
        for key, param in module._parameters.items():
            if param is not None and param.is_floating_point() and matches(lead + key):
                kept.append((module, "parameter", key))
        for key, buf in module._buffers.items():
            if (buf is not None and buf.is_floating_point() and key not in module._non_persistent_buffers_set
                    and matches(lead + key) and not _is_rotary(module)):
                kept.append((module, "buffer", key))
    return kept


@dataclass(frozen=True)
class NumericsChange:
    """One change of the code's numerics: which loads it changes, in words for refusals.

    Attributes:
        name: what files record (stable: never renamed once released).
        what: what changed, for a refusal ("a bfloat16/float16 load keeps ... in float32").
        applies: ``applies(model, dtype)``: whether the change moves this load's numbers (``dtype``:
            the precision it was loaded in, ``held_dtype``).
    """

    name: str
    what: str
    applies: Callable[[Any, str], bool]


# The changes of the code's numerics since files were first written, oldest first.  Add one here
# when a change moves numbers; its predicate says which loads it changes.
CHANGES = (
    NumericsChange("rotary-float32",
                   "since issue 29 a bfloat16/float16 load keeps a rotary embedding's frequencies (inv_freq) in "
                   "float32, as transformers does, where they were rounded",
                   lambda model, dtype: dtype in _HALF and _has_rotary_embedding(model)),
    NumericsChange("keep-in-fp32-modules",
                   "since issue 29's follow-up a float16 load keeps the modules the model class keeps in float32 "
                   "(_keep_in_fp32_modules, T5's wo), as transformers does, where they were cast to float16",
                   lambda model, dtype: _keeps_modules(model, dtype)),
)


def stamp(model: Any, dtype: Optional[str] = None) -> str:
    """The changes of ``CHANGES`` that apply to ``model`` as loaded, by name, comma-separated ('' when none).

    Args:
        model: the model a result is computed on (a torch module, possibly sharded or a PEFT model).
        dtype: the precision it is loaded in (None: ``held_dtype``, what it holds; given for a model
            built on the meta device from its configuration).

    Returns:
        The stamp a resumable result records under ``NUMERICS_KEY`` (a string: safetensors metadata
        and HDF5 attributes hold strings).
    """
    dtype = held_dtype(model) if dtype is None else str(dtype).replace("torch.", "")
    return ",".join(change.name for change in CHANGES if change.applies(model, dtype))


def recorded(model: Any) -> dict:
    """``{NUMERICS_KEY: stamp}`` to add to a result's identity, or {} when no change applies.

    Left out when empty, so the files of models no change touches stay as the previous release wrote
    them (and keep resuming under it).
    """
    value = stamp(model)
    return {NUMERICS_KEY: value} if value else {}


def normalized(value: Any) -> str:
    """A recorded stamp as compared: missing or empty -> '', a list -> its names joined, sorted."""
    if value in (None, "", []):
        return ""
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return ",".join(sorted(str(n).strip() for n in names if str(n).strip()))


def describe(value: Any) -> str:
    """A stamp in words for a refusal: 'none' or the changes' names."""
    return normalized(value) or "none"


def explain(before: Any, now: Any) -> str:
    """What the changes that one side has and the other lacks did, '; '-joined."""
    a, b = set(normalized(before).split(",")) - {""}, set(normalized(now).split(",")) - {""}
    known = {change.name: change.what for change in CHANGES}
    return "; ".join(known.get(name, f"'{name}' is unknown to this code (a newer release's?)")
                     for name in sorted(a ^ b))
