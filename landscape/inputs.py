"""What a stage reads before it computes: its model (from a spec, or one already loaded) and its sample.

Every stage that runs a model goes through ``stage_model`` and ``sample_batches``, so a loaded
model is accepted, checked and recorded the same way everywhere, and the CPU thread policy
(``ModelSpec.threads``) and the matmul precision (``ModelSpec.dtype``) are applied by the stage
itself for its duration: a Python call runs as the command would.
"""

import contextlib
from pathlib import Path
from typing import Iterator, List, Optional

from .errors import UsageError
from .models import LoadedModel
from .settings import ModelSpec, SampleSpec


@contextlib.contextmanager
def stage_runtime(spec: ModelSpec) -> Iterator[int]:
    """Run the body as the spec says, then leave the process as it was found.

    ``spec.threads`` CPU threads (``runtime.apply_threads``; torch's count is restored after) and
    ``spec.dtype``'s matmul precision (``runtime.precision_context``: TF32 on for 'tf32' only).

    Yields:
        the intra-op thread count in use.
    """
    import torch

    from .runtime import apply_threads, precision_context

    before = torch.get_num_threads()
    try:
        with precision_context(spec.dtype):
            yield apply_threads(spec.threads)
    finally:
        torch.set_num_threads(before)


def stage_model(spec: ModelSpec, model: Optional[LoadedModel] = None, layout=None, device=None,
                corpora=()) -> LoadedModel:
    """The stage's model: ``model`` when one is given (checked against ``spec``), else loaded from ``spec``.

    Args:
        spec: the settings' model spec.
        model: a ``models.LoadedModel`` already in memory, or None to load ``spec.source``.
        layout: a ``sharding.ShardLayout`` (None: not sharded).
        device: the device to load on (None: ``spec.device``).
        corpora: corpora the stage will read, checked for reachability before a model is loaded.

    Returns:
        The loaded model.

    Raises:
        UsageError: a loaded model that contradicts the spec (another source or dtype), or what
            ``models.load_model`` raises.
    """
    from .data.hf_datasets import check_reachable
    from .models import load_model

    for corpus in corpora:
        check_reachable(corpus)  # before the model is loaded for nothing
    if model is None:
        return load_model(spec.source, device=device or spec.device, dtype=spec.dtype,
                          allow_new_head=spec.allow_new_head, layout=layout)
    _check_loaded(spec, model)
    return model


def _check_loaded(spec: ModelSpec, loaded: LoadedModel) -> None:
    """Refuse a loaded model the settings do not describe: the files would record the settings' model."""
    from .numerics import held_dtype
    from .runtime import storage_dtype

    if not isinstance(loaded, LoadedModel):
        raise UsageError(f"model must be a models.LoadedModel (or None to load the settings' model), "
                         f"got {type(loaded).__name__}")
    if spec.source is not None and str(spec.source) != str(loaded.source):
        raise UsageError(f"the settings name the model '{spec.source}' but the loaded model is '{loaded.source}'; "
                         "leave the settings' model source out when passing a loaded model")
    held = held_dtype(loaded.model)  # a float16 T5 holds its wo in float32: still a float16 load
    if held != storage_dtype(spec.dtype):
        raise UsageError(f"the settings say dtype {spec.dtype} but the loaded model holds {held}; "
                         f"give dtype='{held}' in the model spec")


def sample_batches(loaded: LoadedModel, sample: SampleSpec, corpus: Optional[str] = None,
                   device=None) -> List[dict]:
    """The sample's batches for ``loaded`` (``data.corpus.load_batches``), from ``corpus`` or the sample's own."""
    from .data.corpus import load_batches

    return load_batches(loaded, corpus=sample.corpus if corpus is None else corpus, device=device,
                        **sample.sampling())


# Old files the readers still take that ``outputs.identify`` cannot name as a landscape kind.
_READABLE_UNNAMED = {"fisher": ("tensors without a landscape Fisher header (model weights?)",),
                     "directions": ("a direction file not written by landscape (the original loss-landscape code's?)",),
                     "schedule": ("a JSON file of another program",)}
_CONTAINER = {"fisher": "a safetensors", "fisher-checkpoint": "a safetensors", "directions": "an HDF5",
              "surface": "an HDF5", "schedule": "a JSON", "hessian-report": "a JSON"}


def check_inputs(spec: ModelSpec, model: Optional[LoadedModel], files, adapter_base: bool = False) -> None:
    """Refuse a wrong input file before any model is loaded (on a real checkpoint that takes seconds).

    Each file must hold the kind the stage reads (recognized from its content, ``outputs.identify``:
    a loss surface given as a Fisher file is named as what it is), and the model fingerprint it
    records must be that of the stage's model, read from the checkpoint's files
    (``identity.source_fingerprint``) without loading it.  Missing files, and files or models
    without a fingerprint, are left to the readers' own checks.

    Args:
        spec: the stage's model spec.
        model: the ``LoadedModel`` the stage was given, or None (then ``spec.source``'s files are read).
        files: (path or None, kind) pairs: kinds of ``outputs.WORDS`` ('fisher', 'directions', 'schedule').
        adapter_base: accept a file made for a PEFT adapter's base model (what a LoRA schedule scores).

    Raises:
        UsageError: a file of another kind, or made for another model, in one line naming what it is.
    """
    from .outputs import WORDS, identify

    present = [(Path(path), kind) for path, kind in files if path is not None and Path(path).is_file()]
    for path, kind in present:
        held = identify(path)
        if held.kind != kind and held.words not in _READABLE_UNNAMED.get(kind, ()):
            inside = f" ({_CONTAINER[held.kind]} file)" if held.kind in _CONTAINER else ""
            raise UsageError(f"'{path}' is {held.words}{inside}, not {WORDS[kind]}")
    for path, kind in present:
        recorded = _recorded_model(path, kind)
        if recorded:
            check_file_for_model(path, WORDS[kind][2:], recorded, spec.source if model is None else model,
                                 adapter_base)


def check_file_for_model(path, what: str, recorded: str, model, adapter_base: bool = False) -> None:
    """UsageError when a file recording model fingerprint ``recorded`` was made for a model other than ``model``.

    Args:
        path: the file, named in the message.
        what: what it is ("Fisher file").
        recorded: the fingerprint the file records.
        model: a ``LoadedModel``, or a model spec (a folder, a cached hub id, None: the embedded model).
        adapter_base: a PEFT adapter's base model's fingerprint is accepted too; a file of neither
            is refused naming both ways out.

    Raises:
        UsageError: the file was made for another model.
    """
    from . import adapters
    from .identity import check_file_model, model_fingerprint, same_model, source_fingerprint

    loaded = model if isinstance(model, LoadedModel) else None
    source = loaded.source if loaded is not None else model
    current = model_fingerprint(loaded) if loaded is not None else source_fingerprint(source)
    if current is None or same_model(recorded, current) is not False:
        return
    if not (adapter_base and adapters.is_adapter_folder(source)):
        check_file_model(path, what, recorded, current, source)
    config, _ = adapters.read_config(source)
    base = adapters.resolve_base(config, source)
    if same_model(recorded, source_fingerprint(base)) is not False:
        return
    named = "the embedded model" if base is None else f"'{base}'"
    raise UsageError(f"{what} '{path}' was made for another model (model fingerprint {recorded}), neither for the "
                     f"adapter '{source}' ({current}) nor for its base {named}; compute it on the base "
                     f"(landscape fisher --model {base or '<embedded: leave --model out>'}) or on the adapter "
                     f"(--model {source})")


def _recorded_model(path: Path, kind: str) -> str:
    """The model fingerprint an input file records ('' when it records none), read without its tensors."""
    import json

    from safetensors import SafetensorError

    from .identity import MODEL_KEY

    try:
        if kind == "fisher":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return str((handle.metadata() or {}).get(MODEL_KEY) or "")
        if kind == "directions":
            import h5py

            with h5py.File(path, "r") as handle:
                value = handle.attrs.get(MODEL_KEY, "")
                return value.decode() if isinstance(value, bytes) else str(value)
        if kind == "schedule":
            return str(json.loads(path.read_text(encoding="utf-8")).get("model_fingerprint") or "")
    except (OSError, ValueError, AttributeError, SafetensorError):
        pass  # the reader names what is wrong with it
    return ""
