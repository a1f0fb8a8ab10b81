"""The Fisher file (contract): safetensors, float32, provenance in the header, never pickled.

One float32 tensor per parameter, named as in ``model.named_parameters()``; provenance is string
metadata in the header.

A Fisher is a mean of squares: every value is finite and non-negative.  A file that breaks that
(a diverged run, a hand-edited file) is refused on reading, so no mask or schedule is ranked on
NaN.  Its schema (``check_fisher_header``, ``check_fisher_tensor``): the header's ``format`` is
``FORMAT``, and every tensor is float32, finite and non-negative.
"""

import struct
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import SettingsMismatch, UsageError
from ..files import PathLike, atomic_output, json_text, require_readable_file
from ..identity import MODEL_KEY, check_file_model
from ..models import check_tensors_match
from ..schema import Schema
from ..sharding import full_shape, full_tensor, writer_of

DEFINITION = ("diagonal empirical Fisher F_j = (1/N) sum_n (d l_n / d theta_j)^2, l_n = mean target-token "
              "cross-entropy of sample (sequence) n, model in eval mode, exact per-sample gradients")
FORMAT = "landscape-fisher-v1"

def save_fisher(path, fisher, metadata=None):
    """Write a Fisher as float32 tensors and string metadata to a safetensors file, atomically.

    Tensors are written one at a time (no second copy of the whole Fisher exists).  Values may be
    sharded (DTensors, as ``compute_fisher`` returns them for a sharded model): then every rank of
    one shard group calls this, each tensor is gathered in turn (``sharding.full_tensor``), and
    only the group's first rank writes.

    Args:
        path: the file to write.
        fisher: {param name: tensor}, each shaped like its parameter.
        metadata: header metadata (values written as strings); ``format`` is added if absent.

    Returns:
        The path, as a ``Path``.
    """
    names = sorted(fisher)  # safetensors' own order for tensors of one dtype
    shapes = {name: tuple(full_shape(fisher[name])) for name in names}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", FORMAT)  # what readers check first (``check_fisher_header``)
    if not all(writer_of(t) for t in fisher.values()):
        for name in names:  # take part in every gather, in the writer's order
            full_tensor(fisher[name])
        return Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(_header(shapes, meta))
        for name in names:
            tensor = full_tensor(fisher[name]).detach().to("cpu", torch.float32).contiguous()
            handle.write(memoryview(tensor.numpy()).cast("B"))  # the tensor's own bytes, no copy
    return Path(path)


def _header(shapes, metadata):
    """The safetensors header of float32 tensors stored back to back in the order of ``shapes``.

    An 8-byte little-endian length, then JSON padded with spaces to a multiple of 8.
    """
    entries, offset = {"__metadata__": metadata}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json_text(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def load_fisher(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a Fisher file.

    Args:
        path: the Fisher file (.safetensors).

    Returns:
        ({param name: float32 tensor shaped like the param}, {metadata key: str}).

    Raises:
        UsageError: a missing or unreadable file, or one that is not a Fisher file.
        DamagedFile: a tensor that is not float32, finite and non-negative.
    """
    path = require_readable_file(path, "Fisher file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        fisher = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"'{path}' is not a Fisher file (safetensors): {str(err).splitlines()[0]}") from None
    check_fisher_header(metadata, path)
    check_fisher_values(fisher, path)
    return fisher, metadata


def _schema(path) -> Schema:
    return Schema("Fisher file", path, "recompute it with `landscape fisher`")


def check_fisher_header(metadata: dict, path) -> None:
    """DamagedFile unless the header metadata says this is a Fisher file (``format``).

    A file of model weights has tensors of the same names and shapes, but they are not Fisher
    scores.
    """
    if metadata.get("format") == FORMAT or _written_before_format(metadata):
        return
    found = f"format {metadata['format']!r}" if "format" in metadata else "no format"
    _schema(path).fail(f"is not a Fisher file (its header has {found}, not {FORMAT!r})")


def _written_before_format(metadata: dict) -> bool:
    # Files from before the ``format`` key carry the definition they were computed by; they stay readable.
    return "format" not in metadata and str(metadata.get("definition", "")).startswith("diagonal empirical Fisher")


def check_fisher_tensor(name: str, tensor, path="the Fisher") -> None:
    """DamagedFile unless ``tensor`` is float32 (the contract), finite and non-negative.

    An integer or half-precision tensor is refused rather than converted: the writer stores
    float32, so another dtype means the file was made or edited by something else.
    """
    low = _schema(path).tensor(name, tensor, dtypes=(torch.float32,))
    if low is not None and low < 0:
        _schema(path).fail(f"holds negative values (in '{name}'), which a Fisher (a mean of squares) cannot have")


def fisher_metadata(path) -> dict:
    """The header metadata of a Fisher file, without reading its tensors (UsageError if unreadable)."""
    from safetensors import safe_open

    path = require_readable_file(path, "Fisher file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"'{path}' is not a Fisher file (safetensors): {str(err).splitlines()[0]}") from None


def check_fisher_model(path, metadata: dict, fingerprint: str, model_spec=None) -> None:
    """Refuse a Fisher file computed on a model other than the given one.

    Files written before fingerprints were recorded pass here; their tensors' names and shapes are
    still checked against the model where they are used.

    Args:
        path: the Fisher file (named in the message).
        metadata: its header metadata.
        fingerprint: the model's fingerprint (``identity.model_fingerprint``).
        model_spec: how the user named the model, for the message.

    Raises:
        UsageError: the file records another model's fingerprint.
    """
    check_file_model(path, "Fisher file", metadata.get(MODEL_KEY), fingerprint, model_spec)


def check_fisher_values(fisher, path="the Fisher") -> None:
    """Check that every tensor of a Fisher is float32, finite and non-negative.

    Args:
        fisher: {param name: tensor}.
        path: the file the tensors came from, named in the message.

    Raises:
        DamagedFile: naming the first tensor that is not float32, or has a NaN, an infinity or a
            negative value.
    """
    for name, tensor in fisher.items():
        check_fisher_tensor(name, tensor, path)


def check_existing_fisher(path, metadata) -> None:
    """SettingsMismatch when ``path`` holds a Fisher computed with settings other than ``metadata``.

    A missing file passes; so does one with the same settings (recomputing it gives the same
    numbers).  Keys only one side has (such as the number of ranks) are not compared.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            old = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        raise SettingsMismatch(f"'{path}' exists but is not a Fisher file") from None
    for key in sorted(set(old) & set(metadata) - {"ranks"}):
        if str(old[key]) != str(metadata[key]):
            raise SettingsMismatch(f"'{path}' holds a Fisher computed with other settings "
                                   f"({key}={old[key]!r}, this run has {key}={metadata[key]!r})")


def check_fisher_matches(fisher, model):
    """UsageError unless ``fisher`` has one tensor per trainable parameter of ``model``, same shapes."""
    check_tensors_match(fisher, model, "the Fisher file", trainable_only=True)


def provenance(model_source, corpus, fraction, samples, seed, **extra):
    """Header metadata of a Fisher file.

    The contract's keys: model, corpus, fraction, sample count, seed, definition (and format),
    plus any extra settings given.

    Args:
        model_source: the model the Fisher was computed on.
        corpus: the corpus (None: the embedded default).
        fraction: the fraction of the corpus used (None: all of it).
        samples: the number of samples averaged.
        seed: the sampling seed.
        **extra: further settings, recorded as strings.

    Returns:
        {key: str} metadata for ``save_fisher``.
    """
    meta = {"model": model_source, "corpus": corpus if corpus is not None else "embedded default",
            "fraction": "1.0" if fraction is None else str(fraction), "samples": str(samples),
            "seed": str(seed), "definition": DEFINITION, "format": FORMAT}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta
