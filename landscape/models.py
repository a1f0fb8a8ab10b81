"""Model adapters: load a pretrained LM with the right head, and tell which objective it trains.

``--model`` takes a Hugging Face hub id, a local ``from_pretrained`` folder, or nothing (the
embedded default in ``data/model``).  The head class is chosen from the config, never guessed from
the name: masked LM (BERT, RoBERTa, DistilBERT ...), causal LM (GPT-2, Llama ...) or seq2seq LM (T5,
BART ...).
"""

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError

from .adapters import is_adapter_folder, load_adapter, new_parameters
from .datahome import EMBEDDED_MODEL_DIR
from .errors import NewHeadRefused, UsageError
from .progress import is_quiet, on_terminal
from .runtime import resolve_device, storage_dtype, to_storage, transformers_silenced
from .sharding import ShardLayout

OBJECTIVE_KINDS = ("mlm", "causal", "seq2seq", "classification")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, objective kind and where it came from.

    ``kind`` is the objective every stage evaluates the model on, decided here once from the
    checkpoint's config (``kind_from_config``); a PEFT adapter's is its base model's.
    """

    model: torch.nn.Module
    tokenizer: object
    kind: str  # one of OBJECTIVE_KINDS; "classification" is a fine-tuned sequence classifier or regressor
    source: str  # the hub id or folder given, or the embedded model's folder
    adapter: Optional[dict] = None  # a PEFT adapter folder's record (``adapters.record``); None for a plain model


def parse_dtype(name):
    """'float32' | 'bfloat16' | 'float16' (or fp32/bf16/fp16) -> torch.dtype."""
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}'; use float32, bfloat16 or float16") from None


def kind_from_config(config):
    """Objective kind ('mlm', 'causal', 'seq2seq') for a transformers config, or UsageError."""
    from transformers.models.auto import modeling_auto as auto

    archs = getattr(config, "architectures", None) or []
    # A fine-tuned classifier (e.g. saved by `landscape finetune --save-models`) keeps its head.
    if any(arch.endswith("ForSequenceClassification") for arch in archs):
        return "classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    for arch in archs:
        if arch.endswith("ForMaskedLM"):
            return "mlm"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal"
    model_type = getattr(config, "model_type", None)
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "mlm"
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UsageError(
        f"unknown architecture '{model_type}': landscape needs a masked, causal or seq2seq language "
        "model (e.g. BERT, GPT-2, T5)"
    )


def check_kind(kind) -> str:
    """``kind`` when it names an objective; UsageError otherwise (None included).

    The objective is decided once, when a model is loaded (``LoadedModel.kind``; a PEFT adapter
    takes its base model's); it is never guessed from a module's class, which a wrapper such as a
    ``PeftModel`` hides and a classifier built in memory does not record in its config.

    Args:
        kind: 'mlm' | 'causal' | 'seq2seq' | 'classification'.

    Returns:
        ``kind``.

    Raises:
        UsageError: None or another value.
    """
    if kind not in OBJECTIVE_KINDS:
        raise UsageError(f"the objective must be one of {', '.join(OBJECTIVE_KINDS)} (a loaded model's "
                         f"'kind'), got {kind!r}")
    return kind


def _looks_like_path(spec):
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or Path(spec).suffix != ""


def _load_config(spec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec)
    except ValueError as err:  # transformers' word for a config whose model_type it does not know
        raise UsageError(f"unknown architecture in '{spec}': {str(err).splitlines()[0]}") from None
    except (OSError, EnvironmentError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(
            f"cannot load model '{spec}': it is not a local folder and the Hugging Face hub could not "
            f"provide it ({reason})"
        ) from None


def _refuse_new_head(spec, kind, new):
    objective = {"mlm": "masked-LM", "causal": "causal-LM", "seq2seq": "seq2seq LM",
                 "classification": "classification"}[kind]
    shown = ", ".join(new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
    raise NewHeadRefused(f"'{spec}' lacks weights its {objective} objective needs ({shown}): transformers would "
                         "initialize them randomly and every number would measure that noise; use a checkpoint "
                         "with its pretraining head, or allow a new head if you mean it")


# A load of at least this many bytes of weights (or from the hub) shows transformers' "Loading weights"
# bar: SmolLM2-135M's 538 MB take seconds, a 7B model minutes; the embedded model's 7 MB need none.
LOAD_BAR_BYTES = 100 * 2**20


def _load_bar(spec: str) -> bool:
    """Whether to show the loading bar: for large weights, on a terminal only, and never when quiet.

    The progress policy (``progress``): transformers' bar redraws with carriage returns, so a log
    gets none, and a refusal after the load stays one line on stderr there.
    """
    return on_terminal() and not is_quiet() and _weight_bytes(spec) >= LOAD_BAR_BYTES


def _weight_bytes(spec: str) -> float:
    """Bytes of weight files in a local folder; infinity for a hub id (a download may come too)."""
    folder = Path(spec)
    if not folder.is_dir():
        return float("inf")
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def load_model(spec: Optional[str] = None, device: Union[str, torch.device] = "cpu",
               dtype: Union[str, torch.dtype] = "float32", allow_new_head: bool = False,
               layout: Optional[ShardLayout] = None) -> LoadedModel:
    """Load a pretrained LM and its tokenizer, in eval mode, on ``device``.

    Weights are read from safetensors (or with ``weights_only``), never unpickled.

    Args:
        spec: hub id, local folder, PEFT adapter folder (``adapters.load_adapter``), or None for
            the embedded default model.
        device: "auto", "cpu", "cuda", "cuda:N" or a torch.device.
        dtype: the storage dtype ("float32", "bfloat16", "float16", or a torch.dtype); "tf32" loads
            float32 weights.  Loading switches nothing: matmuls compute in TF32 inside
            ``runtime.precision_context("tf32")``, which the stages enter around their work.
            A rotary embedding's frequencies stay float32 in any dtype (``runtime.to_storage``).
        allow_new_head: accept a checkpoint that lacks weights of the objective's model (a bare
            ``BertModel`` such as a sentence-transformers checkpoint has no MLM head); by default
            such a load is refused, because transformers would fill them randomly.
        layout: a ``sharding.ShardLayout`` (from ``sharding.shard_layout`` under torchrun); when it
            shards, the model is loaded on the CPU and sharded onto the device block by block
            (``sharding.shard_model``), so the device never holds all of it.

    Returns:
        a LoadedModel (model in eval mode, tokenizer, objective kind, source).

    Raises:
        UsageError: a missing or unreadable model, an unknown dtype; ``NewHeadRefused`` for a
            checkpoint without its head unless ``allow_new_head``.
    """
    if isinstance(dtype, str):
        dtype = storage_dtype(dtype)
    if layout is None or not layout.sharded:
        return _load(spec, device, dtype, allow_new_head)
    from .sharding import shard_model

    loaded = _load(spec, "cpu", dtype, allow_new_head)
    shard_model(loaded.model, layout)
    return loaded


# What the stages take as a model: a hub id or folder, None for the embedded model, or a loaded one.
ModelSource = Union[None, str, Path, LoadedModel]


def loaded_model(spec: ModelSource, allow_new_head: bool = False, **load) -> LoadedModel:
    """``spec`` itself when it is a loaded model, else ``load_model(spec, ...)``.

    A loaded model is identified by its source's checkpoint files (``identity.model_fingerprint``),
    so pass one whose weights are still those files.

    Args:
        spec: a ``LoadedModel``, a hub id, a ``from_pretrained`` folder, or None (embedded).
        allow_new_head: accept a checkpoint without its pretraining head.
        **load: ``device`` and ``dtype`` for ``load_model``.

    Returns:
        The loaded model.
    """
    if isinstance(spec, LoadedModel):
        return spec
    return load_model(None if spec is None else str(spec), allow_new_head=allow_new_head, **load)


def model_id(loaded: LoadedModel) -> str:
    """A model's source as files record it: a folder's absolute path, or the hub id.

    Args:
        loaded: a LoadedModel.

    Returns:
        the resolved folder path when ``loaded.source`` is a folder, else the source as given.
    """
    path = Path(loaded.source)
    return str(path.resolve()) if path.is_dir() else loaded.source


def _load_base(spec, allow_new_head: bool) -> LoadedModel:
    """An adapter's base model, on the CPU in float32 (``adapters.load_adapter`` moves it)."""
    return load_model(spec, device="cpu", dtype="float32", allow_new_head=allow_new_head)


def _load(spec, device, dtype, allow_new_head) -> LoadedModel:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    if spec is None:
        if not (EMBEDDED_MODEL_DIR / "config.json").exists():
            raise UsageError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}; reinstall landscape, "
                             "or rebuild it in a clone with `python data/pretrain.py`")
        spec_str = str(EMBEDDED_MODEL_DIR)
    else:
        spec_str = str(spec)
        path = Path(spec_str).expanduser()
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"model '{spec_str}' is a file; give the folder that holds config.json")
            if is_adapter_folder(path):  # a PEFT adapter: its base resolved as PEFT does, the adapter applied
                loaded = load_adapter(path, _load_base, device=device, allow_new_head=allow_new_head,
                                      dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype)
                check_finite_weights(loaded.model, spec_str)  # the base was checked; the adapter's own too
                return loaded
            if not (path / "config.json").exists():
                raise UsageError(f"model folder '{spec_str}' has no config.json; is it a from_pretrained folder?")
            spec_str = str(path)
        elif _looks_like_path(spec_str):
            raise UsageError(f"model folder '{spec_str}' does not exist")
        else:
            from .hub import unavailable

            reason = unavailable(spec_str, "model")  # at once, instead of half a minute of retries
            if reason is not None:
                raise UsageError(f"cannot load model '{spec_str}': it is not a local folder, and {reason}")

    config = _load_config(spec_str)
    kind = kind_from_config(config)
    check_weight_files(spec_str)
    head = {"mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM,
            "seq2seq": AutoModelForSeq2SeqLM, "classification": AutoModelForSequenceClassification}[kind]
    try:
        # Newly initialized weights are reported by us (below), in one line, not by transformers;
        # torch's note on an unusual pickle protocol is moot: such weights are refused below.
        with transformers_silenced(bars=_load_bar(spec_str)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            tokenizer = load_tokenizer(spec_str)  # first: a folder without one is refused before the weights load
            model, loading_info = head.from_pretrained(spec_str, config=config, output_loading_info=True)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors
        raise UsageError(f"cannot load model '{spec_str}': its pickled weights (pytorch_model.bin) cannot be loaded "
                         "safely (they hold more than tensors); convert them to safetensors in a trusted "
                         "environment, or use a safetensors copy of the model") from None
    except (OSError, ValueError, SafetensorError) as err:
        raise UsageError(f"cannot load model '{spec_str}': {str(err).splitlines()[0]}") from None
    new = new_parameters(loading_info)
    if new and not allow_new_head:
        _refuse_new_head(spec_str, kind, new)
    to_storage(model, device=resolve_device(device) if isinstance(device, str) else device,
               dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    check_finite_weights(model, spec_str)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=spec_str)


def check_weight_files(folder) -> None:
    """Check that every safetensors file of a local model folder is whole; reads headers only.

    Args:
        folder: the model folder (str or Path).

    Raises:
        DamagedFile: a file's header is unreadable or its tensors do not cover the file (a
            truncated or overwritten weights file).
    """
    from safetensors import safe_open

    from .schema import Schema

    path = Path(folder)
    if not path.is_dir():
        return  # a hub id: transformers reads its cached files
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            Schema("model weights", weights, "the file is truncated or damaged: copy or download the model "
                   "again").fail(f"cannot be read ({str(err).splitlines()[0]})")


# The files tokenizers are saved as (transformers' ``vocab_files_names``): a folder with none has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                    "sentencepiece.bpe.model", "sentencepiece.model", "spm.model", "vocab.model", "source.spm",
                    "tokenizer.tiktoken")


def load_tokenizer(source: str):
    """The tokenizer of a model folder or hub id, refused in one line when the folder has none.

    Transformers' own message for a folder without tokenizer files is several lines about
    backends and slow tokenizers; this says what is missing.

    Args:
        source: a ``from_pretrained`` folder or hub id.

    Returns:
        The tokenizer (checked by ``check_tokenizer_files``).

    Raises:
        UsageError: the folder has no tokenizer files, or transformers cannot build its tokenizer
            (its whole message, on one line).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        path = Path(source)
        if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise UsageError(_no_tokenizer(source, _TOKENIZER_FILES)) from None
        raise UsageError(f"cannot load the tokenizer of model '{source}': {' '.join(str(err).split())}") from None
    check_tokenizer_files(source, tokenizer)
    return tokenizer


def _no_tokenizer(folder, names) -> str:
    return (f"model folder '{folder}' has no tokenizer (none of {', '.join(sorted(names))}); save the tokenizer "
            "with the model (tokenizer.save_pretrained)")


def check_tokenizer_files(folder, tokenizer) -> None:
    """Refuse a local model folder that has none of its tokenizer's files.

    Transformers then builds a tokenizer of special tokens alone, which maps every word to the
    unknown token.

    Args:
        folder: the model folder (str or Path); anything else passes.
        tokenizer: the tokenizer loaded from it.

    Raises:
        UsageError: the folder has no tokenizer file.
    """
    path = Path(folder)
    if not path.is_dir():
        return
    names = {"tokenizer.json", *(getattr(tokenizer, "vocab_files_names", None) or {}).values()}
    if not any((path / name).is_file() for name in names):
        raise UsageError(_no_tokenizer(folder, names))


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse a model with a NaN or an infinity in its weights (in the dtype it was loaded in).

    Every loss, gradient and Fisher of such a model is NaN or meaningless.

    Args:
        model: the loaded model.
        source: how the model was named, for the message.

    Raises:
        UsageError: naming the first parameter with a NaN or an infinity.
    """
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.numel():
            low, high = torch.aminmax(param.detach())
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                dtype = str(param.dtype).replace("torch.", "")
                raise UsageError(f"model '{source}' has non-finite weights (in '{name}', {dtype}); "
                                 "use an intact checkpoint")


def check_tensors_match(tensors, model, what: str, trainable_only: bool = False, allow_extra: bool = False) -> None:
    """UsageError unless ``tensors`` has one tensor per parameter of ``model``, with its shape.

    The one check behind Fisher files, direction files and masks.

    Args:
        tensors: {param name: tensor}.
        model: the model they must fit.
        what: how to call the tensors in the message ("the Fisher file", "direction file 'D.h5'
            (xdirection)").
        trainable_only: only parameters with requires_grad are expected.
        allow_extra: names the model lacks are ignored.

    Raises:
        UsageError: a missing or extra name, or a shape that differs, named in the message.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    missing = next((n for n in params if n not in tensors), None)
    if missing is not None:
        raise UsageError(f"{what} does not match the model: no entry for '{missing}'; "
                         "was it made for another model?")
    extra = None if allow_extra else next((n for n in tensors if n not in params), None)
    if extra is not None:
        raise UsageError(f"{what} does not match the model: an entry '{extra}' the model does not have; "
                         "was it made for another model?")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise UsageError(f"{what} does not match the model: '{name}' has shape {tuple(tensors[name].shape)}, "
                             f"the model's parameter {tuple(param.shape)}; was it made for another model?")
