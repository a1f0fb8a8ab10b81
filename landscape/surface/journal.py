"""A surface's identity and its crash-safe journal, for ``surface.file.SurfaceFile``.

The identity is everything that changes a surface's numbers, which a resume must match; the journal
holds one CRC-checked record per finished point.  Split from ``surface.file`` (the contract's HDF5
file, its writer and reader), which re-exports these names.  Journal: a header line ``JOURNAL_MAGIC
<identity JSON>``, then one record per point, ``<index> <value hex>... <crc32>`` (loss and accuracy,
then test loss and accuracy with ``--eval-corpus``), each ending with a newline, so a torn or
corrupted record is recognised, never misread.
"""

import contextlib
import json
import zlib
from pathlib import Path

from ..errors import SettingsMismatch, UsageError
from ..files import json_text
from ..identity import MODEL_KEY, differences, refuse_changed_resume, sample_fingerprint
from ..models import check_kind

FORMAT = "landscape-surface"
JOURNAL_MAGIC = "landscape-surface-journal/2"


# ----------------------------------------------------------------------------- identity
def _canonical(identity):
    return json.loads(json_text(identity, sort_keys=True, default=str))


def check_same_identity(path, old, new):
    """SettingsMismatch naming what differs when a surface's recorded identity is not this run's.

    Compared with ``identity.differences``: a surface that recorded a version-1 model fingerprint
    resumes on the same model.
    """
    if differences(old, new):
        _refuse(path, old, new)


def _refuse(path, old, new):
    refuse_changed_resume(path, old, new)  # the model or sample, by name
    held_out = [identity.get("eval_sample_fingerprint") for identity in (old, new)]
    if all(held_out) and held_out[0] != held_out[1]:
        raise SettingsMismatch(f"cannot resume '{path}': the held-out sample (--eval-corpus) changed since it was "
                               f"written (eval_sample_fingerprint {held_out[0]} then, {held_out[1]} now)")
    key = differences(old, new)[0]
    before, now = old.get(key), new.get(key)
    detail = "a different grid" if key == "grid" else f"{key}={before!r}, this run has {key}={now!r}"
    raise SettingsMismatch(f"'{path}' was computed with other settings ({detail})")


def surface_identity(directions_attrs, batches, model, xs, ys, settings=None, eval_batches=None, *, kind: str):
    """Everything that changes the numbers of a surface; a resumed file must match it exactly.

    Args:
        directions_attrs: the direction file's attributes (its fingerprint and settings).
        batches: the evaluation sample: list of batch dicts with ``labels``.
        model: the model.
        xs: coefficients along x.
        ys: coefficients along y, or None for 1D.
        settings: extra settings that identify the run.
        eval_batches: the held-out sample of ``test_loss``/``test_acc``, identified like ``batches``.
        kind: the objective the surface evaluates (``models.LoadedModel.kind``).

    Returns:
        A JSON-ready dict.
    """
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    identity = {
        "format": FORMAT,
        "dir_fingerprint": str(directions_attrs.get("fingerprint", "")),
        "sample_fingerprint": sample_fingerprint(batches),
        "n_samples": int(sum(b["labels"].shape[0] for b in batches)),
        "n_target_tokens": n_tokens,
        "kind": check_kind(kind),
        "dtype": dtype,
        "grid": {"x": [float(x) for x in xs], "y": None if ys is None else [float(y) for y in ys]},
    }
    for key in ("norm", "ignore", "seed", "subset", "mask_seed", "mask_granularity", "orthogonal",
                "fisher", "model"):
        if key in directions_attrs:
            identity[f"dir_{key}"] = directions_attrs[key]
    if eval_batches is not None:
        identity.update(eval_sample_fingerprint=sample_fingerprint(eval_batches),
                        eval_n_samples=int(sum(b["labels"].shape[0] for b in eval_batches)),
                        eval_n_target_tokens=sum(int((b["labels"] != -100).sum()) for b in eval_batches))
    identity.update(settings or {})
    if MODEL_KEY not in identity:  # the Python API's in-memory model; the CLI gives its checkpoint's
        from ..identity import module_fingerprint

        with contextlib.suppress(UsageError):  # a sharded model has no whole parameters to hash here
            identity[MODEL_KEY] = module_fingerprint(model)
    return _canonical(identity)


def _scalar_attrs(identity):
    return {k: ("" if v is None else v) for k, v in identity.items() if isinstance(v, (str, int, float, bool))
            or v is None}


# ----------------------------------------------------------------------------- the journal
def journal_path(path) -> Path:
    """The journal of the surface file ``path``: the same path with ``.journal`` appended."""
    return Path(str(path) + ".journal")


def _record(index: int, *values: float) -> bytes:
    """One journal line: the point's flat index, then its values (loss, acc[, test loss, test acc])."""
    body = " ".join([str(index)] + [float(v).hex() for v in values])
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def _parse_record(line: bytes, count: int = 2):
    """(index, values) of a whole, intact record line (without its newline) of ``count`` values, else None."""
    try:
        text = line.decode("ascii")
        body, _, crc = text.rpartition(" ")
        if int(crc, 16) != zlib.crc32(body.encode()) or len(crc) != 8:
            return None
        index, *values = body.split(" ")
        if len(values) != count:
            return None
        return int(index), tuple(float.fromhex(v) for v in values)
    except ValueError:  # not ASCII, not hex
        return None


def read_journal(path, identity, *arrays):
    """Apply a journal's intact records to the flat arrays of the surface's fields (loss, acc, ...).

    Reading stops at the first torn or corrupted record: everything after it is cut off by the
    writer, so a record appended later can never be glued onto a torn one.

    Args:
        path: the surface file (its journal is ``journal_path(path)``).
        identity: this run's ``surface_identity``; records under another header are not applied.
        *arrays: the flat (P,) float64 arrays of the surface's fields in the journal's order (loss,
            acc[, test loss, test acc]), filled in place.

    Returns:
        (whether it has this run's header, byte offset where intact records end).
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
    check_same_identity(path, old, identity)
    end = len(header) + 1
    while True:
        line, newline, after = rest.partition(b"\n")
        parsed = _parse_record(line, len(arrays)) if newline else None
        if parsed is None or not 0 <= parsed[0] < arrays[0].size:
            return True, end
        for array, value in zip(arrays, parsed[1]):
            array[parsed[0]] = value
        end += len(line) + 1
        rest = after
