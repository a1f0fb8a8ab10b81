"""What a result was computed from, by content: the model's weights and the sample's tokens.

Every resumable stage stores both fingerprints with its checkpoint or journal and refuses a resume
whose model or sample changed, naming which one; every file a stage reads (Fisher, directions,
schedule, Hessian report) records the fingerprint of the model it was made for, and a stage that
uses it with another model refuses it.  See docs/identity.md.

Model fingerprint (``model_fingerprint``): a SHA-256 over, for every weight tensor of the
checkpoint in sorted name order, its name, its stored dtype, its shape and the stored bytes of
``SAMPLES_PER_TENSOR`` of its elements (64 evenly spaced runs of 64; all of a smaller tensor).  It
is read from the checkpoint files (safetensors headers and reads of those elements only;
``pytorch_model.bin`` through ``torch.load(weights_only=True, mmap=True)``), never from the loaded
model, and covers the folder's ``config.json`` (less the keys a re-save rewrites).  It is the same
for every ``--dtype``, for a model sharded with FSDP2, for the same weights split
into other safetensors shards, and for the classifier ``finetune`` builds on a checkpoint.  A
model that exists only in memory (the Python API) gets ``parameters_fingerprint``, the same hash
over its parameters.

Sample fingerprint (``sample_fingerprint``): a SHA-1 over the inputs and targets of every sample
in order, without padding (so the batch size does not change it).
"""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from .errors import SettingsMismatch, UsageError
from .files import json_text

MODEL_KEY = "model_fingerprint"
SAMPLE_KEY = "sample_fingerprint"
RUNS, RUN_LENGTH = 64, 64
SAMPLES_PER_TENSOR = RUNS * RUN_LENGTH  # elements hashed per tensor
SCHEME = b"landscape-weights/1"

# safetensors' dtype codes; torch tensors from .bin files and parameters are named the same way.
_TORCH_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# ----------------------------------------------------------------------------- the model
def _runs(count: int) -> List[tuple]:
    """The hashed elements of a tensor of ``count`` elements, as (first element, length) runs.

    All of a tensor of at most ``SAMPLES_PER_TENSOR`` elements, else ``RUNS`` evenly spaced runs of
    ``RUN_LENGTH`` consecutive elements.  Runs rather than single elements: a cold read touches at
    most 2 pages per run (at most ~0.5 MB per tensor), whatever the tensor's size.
    """
    if count <= SAMPLES_PER_TENSOR:
        return [(0, count)] if count else []
    return [((i * count) // RUNS, RUN_LENGTH) for i in range(RUNS)]


class _Digest:
    def __init__(self):
        self.hash = hashlib.sha256(SCHEME)

    def add(self, name: str, code: str, shape, sample: bytes) -> None:
        self.hash.update(json_text([name, code, [int(s) for s in shape]]).encode())
        self.hash.update(sample)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()[:16]


def _safetensors_entries(path: Path) -> Iterable:
    """(name, dtype code, shape, sampled bytes) of every tensor of one safetensors file.

    Read from its header and the sampled runs only (``os.pread`` with readahead off: a few pages a
    tensor).
    """
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            code, shape = str(entry["dtype"]), entry["shape"]
            size = _ITEM_SIZES.get(code, 1)
            start, end = (int(v) for v in entry["data_offsets"])
            base = 8 + length + start
            sample = b"".join(os.pread(handle.fileno(), count * size, base + first * size)
                              for first, count in _runs((end - start) // size))
            yield name, code, shape, sample


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    return b"".join(flat[first:first + count].cpu().contiguous().view(torch.uint8).numpy().tobytes()
                    for first, count in _runs(flat.numel()))


def _bin_entries(path: Path) -> Iterable:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) serialization cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for name, tensor in state.items():
        if torch.is_tensor(tensor):
            yield name, _TORCH_CODES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape), _tensor_sample(tensor)


def _weight_files(folder: Path, adapter: bool) -> List[Path]:
    """The checkpoint files of ``folder`` as transformers (or PEFT, for an ``adapter``) picks them.

    A sharded index's files, else the single file, safetensors before pickled ``.bin``.
    """
    names = ["adapter_model.safetensors", "adapter_model.bin"] if adapter else \
        ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return [folder / file for file in sorted(set(weight_map.values()))]
        if (folder / name).is_file():
            return [folder / name]
    return [] if adapter else sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))


def folder_fingerprint(folder) -> Optional[str]:
    """Fingerprint of the weights stored in a ``from_pretrained`` folder.

    For a PEFT adapter folder: of its adapter weights and its base model's fingerprint.

    Args:
        folder: a ``from_pretrained`` folder (str or Path).

    Returns:
        The fingerprint (a hex string), or None when the folder holds no weight files.
    """
    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    files = _weight_files(folder, adapter.is_file())
    if not files:
        return None
    digest = _Digest()
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        digest.hash.update(f"base:{source_fingerprint(base) if base else ''}".encode())
    digest.hash.update(_config_bytes(folder / "config.json"))
    entries = []
    try:
        for path in files:
            reader = _bin_entries if path.suffix == ".bin" else _safetensors_entries
            entries.extend(reader(path))
    except (OSError, ValueError, KeyError, struct.error, RuntimeError) as err:
        raise UsageError(f"cannot read the weights of '{folder}' to identify them: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for name, code, shape, sample in sorted(entries, key=lambda e: e[0]):
        digest.add(name, code, shape, sample)
    return digest.hexdigest()


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


def source_fingerprint(spec) -> Optional[str]:
    """Fingerprint of the model a ``--model`` value names.

    Args:
        spec: a folder, a cached hub id, or None for the embedded model.

    Returns:
        The fingerprint (a hex string), or None when no weight files can be found for it.
    """
    from .datahome import EMBEDDED_MODEL_DIR

    path = Path(str(spec)).expanduser() if spec is not None else EMBEDDED_MODEL_DIR
    if path.is_dir():
        return folder_fingerprint(path)
    folder = _hub_folder(str(spec))
    return folder_fingerprint(folder) if folder is not None else None


def parameters_fingerprint(model: torch.nn.Module) -> str:
    """The same hash over a model's parameters and buffers (for a model that exists only in memory).

    It depends on the dtype the parameters are held in.

    Args:
        model: the model.

    Returns:
        The fingerprint (a hex string).

    Raises:
        UsageError: a sharded (FSDP2) model: its ranks hold different parts, so identify it by its
            checkpoint folder instead.
    """
    from .sharding import is_sharded

    digest = _Digest()
    for name, tensor in sorted(model.state_dict().items()):
        if is_sharded(tensor):
            raise UsageError("a sharded model is identified by its checkpoint folder, not by its parameters")
        digest.add(name, _TORCH_CODES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape),
                   _tensor_sample(tensor))
    return digest.hexdigest()


def model_fingerprint(loaded) -> str:
    """Fingerprint of a ``models.LoadedModel``, computed once per loaded model.

    Args:
        loaded: a ``models.LoadedModel``.

    Returns:
        The fingerprint (a hex string) of its checkpoint files (``source_fingerprint``), else of
        its parameters.
    """
    cached = getattr(loaded, "_fingerprint", None)
    if cached is None:
        cached = source_fingerprint(loaded.source) or parameters_fingerprint(loaded.model)
        loaded._fingerprint = cached
    return cached


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
def changed(stored: Dict, current: Dict) -> Optional[str]:
    """Name what changed between a run's stored and current fingerprints.

    Args:
        stored: the metadata a run recorded.
        current: the metadata of the run resuming it.

    Returns:
        'the model' or 'the sample' when ``stored`` and ``current`` both carry that fingerprint and
        it differs (the model is named first); None otherwise.
    """
    for key, what in ((MODEL_KEY, "the model"), (SAMPLE_KEY, "the sample")):
        before, now = stored.get(key), current.get(key)
        if before not in (None, "") and now not in (None, "") and str(before) != str(now):
            return what
    return None


_DETAIL = {"the model": "its weights are not the ones the run started with",
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
    what = changed(stored, current)
    if what is not None:
        key = MODEL_KEY if what == "the model" else SAMPLE_KEY
        tail = f", or {remedy}" if remedy else ""
        detail = _DETAIL[what] if what == "the model" else _sample_detail(stored, current)
        raise error(f"cannot resume '{path}': {what} changed since it was written ({detail}; {key} "
                    f"{stored[key]} then, {current[key]} now); rerun with the same {what[4:]}{tail}")


# Settings that draw the sample: when one differs, it is the likely reason the tokens did.
_SAMPLE_SETTINGS = ("corpus", "fraction", "max_samples", "seq_len", "corpus_seed", "framing", "bos")


def _sample_detail(stored: Dict, current: Dict) -> str:
    for key in _SAMPLE_SETTINGS:
        if key in stored and key in current and stored[key] != current[key]:
            return f"{_DETAIL['the sample']}; {key} was {stored[key]!r}, now {current[key]!r}"
    return _DETAIL["the sample"]


def check_file_model(path, what: str, recorded: Optional[str], fingerprint: str, model_spec=None) -> None:
    """UsageError when a file made for one model (``recorded``) is used with another.

    Files written before fingerprints were recorded (``recorded`` empty) pass: their readers keep
    checking parameter names and shapes only.

    Args:
        path: the file, named in the message.
        what: what the file is ("Fisher file", "schedule"), named in the message.
        recorded: the model fingerprint the file records (None or empty: none).
        fingerprint: the fingerprint of the model it is used with.
        model_spec: how the user named that model, for the message.

    Raises:
        UsageError: the fingerprints differ.
    """
    if recorded in (None, "") or str(recorded) == str(fingerprint):
        return
    model = "the embedded model" if model_spec is None else f"'{model_spec}'"
    raise UsageError(f"{what} '{path}' was made for another model (model fingerprint {recorded}), not for "
                     f"{model} ({fingerprint}); make it for this model")
