"""A surface's identity (everything that changes its numbers, which a resume must match) and its
crash-safe journal (one CRC-checked record per finished point), for ``surface.file.SurfaceFile``.

Split from ``surface.file`` (the contract's HDF5 file, its writer and reader), which re-exports
these names.  Journal: a header line ``JOURNAL_MAGIC <identity JSON>``, then one record per point,
``<index> <loss hex> <acc hex> <crc32>``, each ending with a newline, so a torn or corrupted record
is recognised, never misread.
"""

import contextlib
import json
import zlib
from pathlib import Path

from ..errors import SettingsMismatch, UsageError
from ..identity import MODEL_KEY, refuse_changed_resume, sample_fingerprint
from ..models import model_kind

FORMAT = "landscape-surface"
JOURNAL_MAGIC = "landscape-surface-journal/2"


# ----------------------------------------------------------------------------- identity
def _canonical(identity):
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _first_difference(old, new):
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def _refuse(path, old, new):
    refuse_changed_resume(path, old, new)  # the model or sample, by name
    key, before, now = _first_difference(old, new)
    detail = "a different grid" if key == "grid" else f"{key}={before!r}, this run has {key}={now!r}"
    raise SettingsMismatch(f"'{path}' was computed with other settings ({detail})")


def surface_identity(directions_attrs, batches, model, xs, ys, settings=None):
    """Everything that changes the numbers of a surface; a resumed file must match it exactly."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    identity = {
        "format": FORMAT,
        "dir_fingerprint": str(directions_attrs.get("fingerprint", "")),
        "sample_fingerprint": sample_fingerprint(batches),
        "n_samples": int(sum(b["labels"].shape[0] for b in batches)),
        "n_target_tokens": n_tokens,
        "kind": model_kind(model),
        "dtype": dtype,
        "grid": {"x": [float(x) for x in xs], "y": None if ys is None else [float(y) for y in ys]},
    }
    for key in ("norm", "ignore", "seed", "subset", "mask_seed", "mask_granularity", "orthogonal",
                "fisher", "model"):
        if key in directions_attrs:
            identity[f"dir_{key}"] = directions_attrs[key]
    identity.update(settings or {})
    if MODEL_KEY not in identity:  # the Python API's in-memory model; the CLI gives its checkpoint's
        from ..identity import parameters_fingerprint

        with contextlib.suppress(UsageError):  # a sharded model has no whole parameters to hash here
            identity[MODEL_KEY] = parameters_fingerprint(model)
    return _canonical(identity)


def _scalar_attrs(identity):
    return {k: ("" if v is None else v) for k, v in identity.items() if isinstance(v, (str, int, float, bool))
            or v is None}


# ----------------------------------------------------------------------------- the journal
def journal_path(path) -> Path:
    return Path(str(path) + ".journal")


def _record(index: int, loss: float, acc: float) -> bytes:
    body = f"{index} {float(loss).hex()} {float(acc).hex()}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def _parse_record(line: bytes):
    """(index, loss, acc) of a whole, intact record line (without its newline), else None."""
    try:
        text = line.decode("ascii")
        body, _, crc = text.rpartition(" ")
        if int(crc, 16) != zlib.crc32(body.encode()) or len(crc) != 8:
            return None
        index, loss, acc = body.split(" ")
        return int(index), float.fromhex(loss), float.fromhex(acc)
    except ValueError:  # not ASCII, not hex, wrong field count
        return None


def read_journal(path, identity, loss, acc):
    """Apply a journal's intact records to the flat loss/acc arrays.

    Returns (whether it has this run's header, byte offset where intact records end).  Reading
    stops at the first torn or corrupted record: everything after it is cut off by the writer, so a
    record appended later can never be glued onto a torn one.
    """
    data = journal_path(path).read_bytes()
    header, newline, rest = data.partition(b"\n")
    if not newline or not header.startswith(JOURNAL_MAGIC.encode() + b" "):
        return False, 0
    try:
        old = json.loads(header[len(JOURNAL_MAGIC) + 1:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False, 0
    if not isinstance(old, dict):
        return False, 0
    if old != identity:
        _refuse(path, old, identity)
    end = len(header) + 1
    while True:
        line, newline, after = rest.partition(b"\n")
        parsed = _parse_record(line) if newline else None
        if parsed is None or not 0 <= parsed[0] < loss.size:
            return True, end
        loss[parsed[0]], acc[parsed[0]] = parsed[1], parsed[2]
        end += len(line) + 1
        rest = after
