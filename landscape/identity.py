"""What a result was computed from, by content: the model's weights and the sample's tokens.

Every resumable stage stores both fingerprints with its checkpoint or journal and refuses a resume
whose model or sample changed, naming which one; every file a stage reads (Fisher, directions,
schedule, Hessian report) records the fingerprint of the model it was made for, and a stage that
uses it with another model refuses it.  See docs/identity.md.

Model fingerprint (``model_fingerprint``, version 2, ``v2:`` and 16 hex digits): a SHA-256 over,
for every weight tensor of the checkpoint in sorted name order, its name, its stored dtype, its
shape and the SHA-256 of all its stored bytes (``weights_hash``: computed once per file version and
cached in the data home), and the folder's ``config.json`` (less the keys a re-save rewrites).  It
is read from the checkpoint files (``pytorch_model.bin`` through ``torch.load(weights_only=True,
mmap=True)``), never from the loaded model, so it is the same for every ``--dtype``, for a model
sharded with FSDP2, for the same weights split into other safetensors shards, and for the
classifier ``finetune`` builds on a checkpoint.  A model that exists only in memory (the Python
API) gets ``parameters_fingerprint``: the version-1 hash, over 4096 sampled elements per tensor.

Files written before version 2 record version-1 fingerprints (16 bare hex digits, sampled, of the
files; the Hessian's journals: of the loaded parameters).  They keep reading: ``same_model``
compares them with this model's version-1 fingerprint, computed when one is met.  Every
comparison of recorded identities goes through ``differences``, and every refusal of a changed
rerun through ``refuse_changed``.

Sample fingerprint (``sample_fingerprint``): a SHA-1 over the inputs and targets of every sample
in order, without padding (so the batch size does not change it).

Size: the two fingerprints and the one comparison of recorded identities (with the map of the
spellings earlier files used, ``canonical_identity``) are one contract, docs/identity.md.
"""

import contextlib
import hashlib
import json
import struct
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import torch

from .errors import NumericsChanged, NumericsMismatch, SettingsMismatch, UsageError
from .files import json_text
from .numerics import NUMERICS_KEY, describe, explain, normalized
from .weights_hash import code_of, file_tensors, sampled_file_tensors, tensor_sample, weight_files

MODEL_KEY = "model_fingerprint"
SAMPLE_KEY = "sample_fingerprint"
SCHEME = b"landscape-weights/1"  # version 1: sampled elements (and models only in memory)
SCHEME_WHOLE = b"landscape-weights/2"  # version 2: every stored byte
VERSION_2 = "v2:"  # how a version-2 fingerprint begins; a version-1 one is 16 bare hex digits


# ----------------------------------------------------------------------------- the model
class _Digest:
    def __init__(self, scheme: bytes = SCHEME):
        self.hash = hashlib.sha256(scheme)

    def add(self, name: str, code: str, shape, sample: bytes) -> None:
        self.hash.update(json_text([name, code, [int(s) for s in shape]]).encode())
        self.hash.update(sample)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()[:16]


def _folder_digest(folder: Path, whole: bool) -> Optional[str]:
    """The fingerprint of version 2 (``whole``: every stored byte) or 1 (sampled) of a folder."""
    adapter = folder / "adapter_config.json"
    files = weight_files(folder, adapter.is_file())
    if not files:
        return None
    digest = _Digest(SCHEME_WHOLE if whole else SCHEME)
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        base_fingerprint = (source_fingerprint if whole else _source_fingerprint_v1)(base) if base else ""
        digest.hash.update(f"base:{base_fingerprint or ''}".encode())
    digest.hash.update(_config_bytes(folder / "config.json"))
    entries = []
    try:
        for path in files:
            entries.extend(file_tensors(path) if whole else sampled_file_tensors(path))
    except (OSError, ValueError, KeyError, struct.error, RuntimeError) as err:
        raise UsageError(f"cannot read the weights of '{folder}' to identify them: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for name, code, shape, data in sorted(entries, key=lambda e: e[0]):
        digest.add(name, code, shape, data)
    return (VERSION_2 if whole else "") + digest.hexdigest()


def folder_fingerprint(folder) -> Optional[str]:
    """Fingerprint (version 2) of the weights stored in a ``from_pretrained`` folder.

    A SHA-256 over every stored byte of every tensor (hashed once per file version, then cached:
    ``weights_hash``) and the folder's ``config.json``.  For a PEFT adapter folder: of its adapter
    weights and its base model's fingerprint.

    Args:
        folder: a ``from_pretrained`` folder (str or Path).

    Returns:
        The fingerprint (``v2:`` and 16 hex digits), or None when the folder holds no weight files.
    """
    folder = Path(folder)
    versions = _file_versions(folder)
    fingerprint = _folder_digest(folder, whole=True)
    if fingerprint is not None:
        # Taken back to version 1 only while the files are the ones hashed now (else: cannot tell).
        _remember_v1(fingerprint, ("folder", str(folder.resolve()), fingerprint, versions), lambda: _folder_digest(
            folder, whole=False) if _file_versions(folder) == versions else None)
    return fingerprint


def _file_versions(folder: Path) -> tuple:
    """(name, size, mtime_ns, ctime_ns, inode) of every file in ``folder``: any write changes it."""
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            stat = path.stat()
            found.append((path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))
    return tuple(found)


# Keys a re-save rewrites without changing what the model computes.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache")


def _config_bytes(path: Path) -> bytes:
    """The model's configuration, as part of its identity.

    The same weights under another ``rope_theta``, attention scale or head count compute other
    numbers.
    """
    if not path.is_file():
        return b"config:none"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read '{path}' to identify the model: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"'{path}' is not a model configuration (a JSON object)")
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return b"config:" + json_text(kept, sort_keys=True).encode()


def _hub_folder(spec: str) -> Optional[Path]:
    """The local snapshot folder of a hub id that transformers has loaded (from the cache)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: no local snapshot to read
        return None


def _source_folder(spec) -> Optional[Path]:
    from .datahome import EMBEDDED_MODEL_DIR

    path = Path(str(spec)).expanduser() if spec is not None else EMBEDDED_MODEL_DIR
    return path if path.is_dir() else _hub_folder(str(spec))


def source_fingerprint(spec) -> Optional[str]:
    """Fingerprint of the model a ``--model`` value names.

    Args:
        spec: a folder, a cached hub id, or None for the embedded model.

    Returns:
        The fingerprint (a hex string), or None when no weight files can be found for it.
    """
    folder = _source_folder(spec)
    return folder_fingerprint(folder) if folder is not None else None


def _source_fingerprint_v1(spec) -> Optional[str]:
    folder = _source_folder(spec)
    return _folder_digest(folder, whole=False) if folder is not None else None


def parameters_fingerprint(model: torch.nn.Module) -> str:
    """The sampled hash (version 1) over a model's parameters and buffers, for a model only in memory.

    It depends on the dtype the parameters are held in.

    Args:
        model: the model.

    Returns:
        The fingerprint (16 hex digits).

    Raises:
        UsageError: a sharded (FSDP2) model: its ranks hold different parts, so identify it by its
            checkpoint folder instead.
    """
    from .sharding import is_sharded

    digest = _Digest()
    for name, tensor in sorted(model.state_dict().items()):
        if is_sharded(tensor):
            raise UsageError("a sharded model is identified by its checkpoint folder, not by its parameters")
        digest.add(name, code_of(tensor), tuple(tensor.shape), tensor_sample(tensor))
    return digest.hexdigest()


def model_fingerprint(loaded) -> str:
    """Fingerprint of a ``models.LoadedModel``, computed once per loaded model.

    The loaded module carries it too (``module_fingerprint``), so code that holds only the module
    (the Hessian's journals) identifies it the same way.

    Args:
        loaded: a ``models.LoadedModel``.

    Returns:
        The fingerprint of its checkpoint files (``source_fingerprint``), else of its parameters.
    """
    cached = getattr(loaded, "_fingerprint", None)
    if cached is None:
        cached = source_fingerprint(loaded.source) or parameters_fingerprint(loaded.model)
        loaded._fingerprint = cached
        model = loaded.model
        if cached.startswith(VERSION_2):  # a version-1 journal may have hashed the module (the Hessian's did)
            held = weakref.ref(model)  # remembering how must not keep a model alive
            _remember_v1(cached, ("module", id(model), cached), lambda: _parameters_or_none(held()))
        with contextlib.suppress(AttributeError, TypeError):  # a model object that takes no attributes
            model._landscape_fingerprint = cached
    return cached


def module_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of a module: its checkpoint's when loaded from one, else its parameters'.

    ``model_fingerprint`` marks the module it identified; any other is hashed from its parameters.
    """
    return getattr(model, "_landscape_fingerprint", None) or parameters_fingerprint(model)


def _parameters_or_none(model) -> Optional[str]:
    if model is None:  # freed since
        return None
    try:
        return parameters_fingerprint(model)
    except UsageError:
        return None


# Version 1 (sampled) fingerprints of the models this process identified by version 2, computed
# only when a file that recorded a version-1 fingerprint is met: {version 2: [how to get a v1]}.
_V1: Dict[str, Dict[object, Callable[[], Optional[str]]]] = {}
_V1_DONE: Dict[str, Set[str]] = {}
_V1_TAGS: Set[object] = set()


def _remember_v1(fingerprint: str, tag, compute: Callable[[], Optional[str]]) -> None:
    if tag not in _V1_TAGS:
        _V1_TAGS.add(tag)
        _V1.setdefault(fingerprint, {})[tag] = compute


def _v1_of(fingerprint: str) -> Set[str]:
    done = _V1_DONE.setdefault(fingerprint, set())
    pending = _V1.get(fingerprint, {})
    while pending:
        value = pending.pop(next(iter(pending)))()
        if value:
            done.add(value)
    return done


def is_version_1(fingerprint) -> bool:
    """Whether a recorded model fingerprint is of version 1 (sampled; files written before v2)."""
    text = str(fingerprint or "")
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def same_model(recorded, current) -> Optional[bool]:
    """Whether a recorded model fingerprint is the current model's; None when it cannot be told.

    A version-1 fingerprint (a file written before version 2) is compared with the version-1
    fingerprint of the current model, computed then (the sampled hash of its files or of its
    parameters, as the file's writer did), so old files keep reading.  None: one of them is empty,
    or a version-1 fingerprint meets a version-2 one that this process cannot take back to version 1
    (two files compared without a model).
    """
    recorded, current = str(recorded or ""), str(current or "")
    if not recorded or not current:
        return None
    if recorded == current:
        return True
    if is_version_1(recorded) and current.startswith(VERSION_2):
        known = _v1_of(current)
        return recorded in known if known else None
    if is_version_1(current) and recorded.startswith(VERSION_2):
        known = _v1_of(recorded)
        return current in known if known else None
    return False


# ----------------------------------------------------------------------------- the sample
def sample_fingerprint(batches) -> str:
    """Short hash of the evaluation sample (inputs and targets of every sample, in order).

    Each sample is hashed without its padding, so the same samples batched differently (another
    batch size) give the same fingerprint: batch size is not a setting of a surface.

    Args:
        batches: list of batch dicts of (B, T) tensors with ``labels``.

    Returns:
        The fingerprint (a hex string).
    """
    digest = hashlib.sha1()
    for batch in batches:
        mask = batch.get("attention_mask")
        for row in range(batch["labels"].shape[0]):
            length = int(mask[row].sum()) if mask is not None else None
            for key in sorted(batch):
                value = _unpadded(batch[key][row].detach().cpu(), key, length,
                                  None if mask is None else mask.shape[1])
                digest.update(key.encode())
                digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _unpadded(row, key, length, width):
    """A sample's row without the padding its batch gave it (right padding, as ``pad_batch`` does)."""
    if row.dim() == 0:
        return row
    if length is not None and row.shape[0] == width:
        return row[:length]
    if key == "labels":  # seq2seq targets have their own width, padded with -100
        kept = (row != -100).nonzero()
        return row[: int(kept.max()) + 1] if len(kept) else row[:0]
    return row


# ----------------------------------------------------------------------------- checks
# Facts that earlier files (and surface and Hessian files still, for their older readers) spell
# otherwise than the settings: {stored key: the settings' name}, {key: {stored value: the one value}}.
LEGACY_KEYS = {"corpus_seed": "seed", "precision": "dtype"}
LEGACY_VALUES = {"corpus": {"embedded default": "embedded"}}


def canonical_identity(identity: Dict) -> Dict:
    """A copy of ``identity`` with each fact under the settings' name and value (``LEGACY_KEYS``/``_VALUES``).

    A legacy key is renamed only where the settings' name is not recorded too: a surface records
    the parameters' ``dtype`` beside the requested ``precision``, a Hessian run its probe ``seed``
    beside the sample's ``corpus_seed`` (other facts, kept apart).
    """
    out = {}
    for key, value in identity.items():
        name = LEGACY_KEYS.get(key, key)
        name = key if name != key and name in identity else name
        out[name] = LEGACY_VALUES.get(name, {}).get(value, value) if isinstance(value, str) else value
    return out


def differences(stored: Dict, current: Dict) -> List[str]:
    """The fields whose values differ between what a run or file recorded and this run.

    The one comparison of identities (journals, checkpoints, surfaces, sweeps).  Values are
    compared as JSON (a tuple equals a list), each fact under the settings' name (``canonical_identity``:
    files of earlier releases keep resuming); ``model_fingerprint`` with ``same_model``
    (a version-1 fingerprint is compared with this model's version-1 one); a fingerprint that one
    side lacks (files written before fingerprints) is no difference.

    Args:
        stored: the identity a run or file recorded.
        current: this run's.

    Returns:
        The differing keys (the settings' names), ``model_fingerprint`` first, then ``sample_fingerprint``, then the
        others in sorted order.
    """
    def canonical(value):
        return json.loads(json_text(value, sort_keys=True, default=str))

    stored, current = canonical_identity(stored), canonical_identity(current)
    found = []
    for key in sorted(set(stored) | set(current), key=lambda k: (k != MODEL_KEY, k != SAMPLE_KEY, k)):
        before, now = stored.get(key), current.get(key)
        if key == MODEL_KEY:
            differs = same_model(before, now) is False
        elif key == NUMERICS_KEY:  # recorded only when a change applies: missing is none
            differs = normalized(before) != normalized(now)
        elif key == SAMPLE_KEY:
            differs = before not in (None, "") and now not in (None, "") and str(before) != str(now)
        else:
            differs = canonical(before) != canonical(now)
        if differs:
            found.append(key)
    return found


def changed(stored: Dict, current: Dict) -> Optional[str]:
    """'the model' or 'the sample' when that fingerprint differs (``differences``), model first; else None."""
    found = differences({k: stored.get(k) for k in (MODEL_KEY, SAMPLE_KEY)},
                        {k: current.get(k) for k in (MODEL_KEY, SAMPLE_KEY)})
    return {MODEL_KEY: "the model", SAMPLE_KEY: "the sample"}[found[0]] if found else None


_DETAIL = {"the model": "its weights or its configuration (config.json) are not the ones the run started with",
           "the sample": "its tokens are not the ones the run started with: an edited corpus, another "
                         "sub-sample or another tokenizer"}


def refuse_changed_resume(path, stored: Dict, current: Dict, remedy: Optional[str] = None,
                          error=SettingsMismatch) -> None:
    """Refuse a resume whose model or sample changed, in one line naming what changed.

    Args:
        path: the file being resumed, named in the message.
        stored: the metadata the run recorded.
        current: the metadata of this run.
        remedy: what else to do, e.g. "delete it to start over" (None: nothing is added).
        error: the error class to raise (SettingsMismatch by default, whose command-line message
            adds ``--overwrite``).

    Raises:
        SettingsMismatch: (or ``error``) when the model or the sample changed.
    """
    _refuse_model_or_sample(f"cannot resume '{path}'", stored, current, remedy, error)


def _refuse_model_or_sample(lead: str, stored: Dict, current: Dict, remedy: Optional[str], error) -> None:
    """Raise ``error`` with ``lead``, then which of the model or the sample changed and why.

    Then, on the same model and sample, ``NumericsChanged`` (``NumericsMismatch`` where ``error`` is a
    ``SettingsMismatch``) when the code numerics recorded are not this code's for the model.
    """
    _refuse_model_or_sample_only(lead, stored, current, remedy, error)
    if normalized(stored.get(NUMERICS_KEY)) != normalized(current.get(NUMERICS_KEY)):
        then, now = stored.get(NUMERICS_KEY), current.get(NUMERICS_KEY)
        tail = f"; {remedy}" if remedy else ""
        raise (NumericsMismatch if issubclass(error, SettingsMismatch) else NumericsChanged)(
            f"{lead}: it was begun under other numerics than this code computes with for this model "
            f"(numerics {describe(then)} then, {describe(now)} now: {explain(then, now)}); its numbers would "
            f"mix two forwards, so start it over{tail}")


def _refuse_model_or_sample_only(lead: str, stored: Dict, current: Dict, remedy: Optional[str], error) -> None:
    what = changed(stored, current)
    if what is not None:
        key = MODEL_KEY if what == "the model" else SAMPLE_KEY
        tail = f", or {remedy}" if remedy else ""
        detail = _DETAIL[what] if what == "the model" else _sample_detail(stored, current)
        raise error(f"{lead}: {what} changed since it was written ({detail}; {key} "
                    f"{stored[key]} then, {current[key]} now); rerun with the same {what[4:]}{tail}")


def refuse_changed(path, stored: Dict, current: Dict, remedy: Optional[str] = None, error=SettingsMismatch,
                   holds: Optional[str] = None) -> None:
    """Refuse a rerun whose recorded identity is not this run's, in one line naming every field that differs.

    The one refusal of a changed rerun (journals, checkpoints, finished reports), in one order: the
    model or the sample first (``refuse_changed_resume`` says which and why: a changed ``seq_len`` is
    named as the reason the sample changed), then every field ``differences`` finds, in its order and
    under the settings' names (``canonical_identity``).

    Args:
        path: the file, named in the message.
        stored: the identity the file recorded.
        current: this run's.
        remedy: what else to do, e.g. "delete it to start over" (None: nothing is added).
        error: the error class to raise.
        holds: what a finished file holds ("a Hessian report"): the line begins "'P' holds a Hessian
            report made with other settings", then ": the model changed since it was written (...)"
            or the fields ("(tol=0.001, this run has tol=0.01)"); None (a journal or checkpoint being
            resumed): "cannot resume 'P'", then ": the model changed..." or ": it was written with
            other settings (seed 0 then, 1 now)".

    Raises:
        SettingsMismatch: (or ``error``) when a field differs.
    """
    other = f"'{path}' holds {holds} made with other settings" if holds else None
    _refuse_model_or_sample(other or f"cannot resume '{path}'", stored, current, remedy, error)
    found = differences(stored, current)
    if not found:
        return
    old, new = canonical_identity(stored), canonical_identity(current)
    if other is None:
        detail = "; ".join(f"{key} {old.get(key)!r} then, {new.get(key)!r} now" for key in found)
        other = f"cannot resume '{path}': it was written with other settings"
    else:
        detail = "; ".join(f"{key}={old.get(key)!r}, this run has {key}={new.get(key)!r}" for key in found)
    raise error(f"{other} ({detail})" + (f"; {remedy}" if remedy else ""))


# Settings that draw the sample: when one differs, it is the likely reason the tokens did.
_SAMPLE_SETTINGS = ("corpus", "fraction", "max_samples", "seq_len", "seed", "framing", "bos")


def _sample_detail(stored: Dict, current: Dict) -> str:
    stored, current = canonical_identity(stored), canonical_identity(current)
    for key in _SAMPLE_SETTINGS:
        if key in stored and key in current and stored[key] != current[key]:
            return f"{_DETAIL['the sample']}; {key} was {stored[key]!r}, now {current[key]!r}"
    return _DETAIL["the sample"]


def check_file_model(path, what: str, recorded: Optional[str], fingerprint: str, model_spec=None) -> None:
    """UsageError when a file made for one model (``recorded``) is used with another.

    Files written before fingerprints were recorded (``recorded`` empty) pass: their readers keep
    checking parameter names and shapes only.  A version-1 fingerprint is compared with this
    model's version-1 one (``same_model``).

    Args:
        path: the file, named in the message.
        what: what the file is ("Fisher file", "schedule"), named in the message.
        recorded: the model fingerprint the file records (None or empty: none).
        fingerprint: the fingerprint of the model it is used with.
        model_spec: how the user named that model, for the message.

    Raises:
        UsageError: the fingerprints differ.
    """
    if same_model(recorded, fingerprint) is not False:  # the same, or a file without a fingerprint
        return
    model = "the embedded model" if model_spec is None else f"'{model_spec}'"
    raise UsageError(f"{what} '{path}' was made for another model (model fingerprint {recorded}), not for "
                     f"{model} ({fingerprint}); make it for this model")
