"""A surface's identity and its journal, for ``surface.file.SurfaceFile``.

The identity is everything that changes a surface's numbers, which a resume must match; the journal
(``journal.Journal``, kind ``surface``) holds one record per finished point: ``{"i": flat index,
"v": [values as hex floats]}`` (loss and accuracy, then test loss and accuracy with
``--eval-corpus``).  Journals of the previous release (``landscape-surface-journal/2``: a header
line ``landscape-surface-journal/2 <identity JSON>``, then ``<index> <value hex>... <crc32>`` per
point) are read by ``legacy_journal`` and rewritten in the journal format.  Split from
``surface.file`` (the contract's HDF5 file, its writer and reader), which re-exports these names.
"""

import contextlib
import json
import zlib
from pathlib import Path

from .. import numerics
from ..errors import SettingsMismatch, UsageError
from ..files import json_text
from ..identity import MODEL_KEY, canonical_identity, differences, refuse_changed_resume, sample_fingerprint
from ..journal import Journal
from ..models import check_kind

FORMAT = "landscape-surface"


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
    before, now = canonical_identity(old), canonical_identity(new)
    detail = "; ".join("a different grid" if key == "grid" else f"{key}={before.get(key)!r}, this run has "
                       f"{key}={now.get(key)!r}" for key in differences(old, new))
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
    dtype = numerics.held_dtype(model)  # a float16 T5 holds its wo in float32: still a float16 load
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
    identity.update(numerics.recorded(model))  # the code numerics: a change since the start is refused
    if MODEL_KEY not in identity:  # the Python API's in-memory model; the CLI gives its checkpoint's
        from ..identity import module_fingerprint

        with contextlib.suppress(UsageError):  # a sharded model has no whole parameters to hash here
            identity[MODEL_KEY] = module_fingerprint(model)
    return _canonical(identity)


def _scalar_attrs(identity):
    return {k: ("" if v is None else v) for k, v in identity.items() if isinstance(v, (str, int, float, bool))
            or v is None}


# ----------------------------------------------------------------------------- the journal
LEGACY_MAGIC = "landscape-surface-journal/2"


def journal_path(path) -> Path:
    """The journal of the surface file ``path``: the same path with ``.journal`` appended."""
    return Path(str(path) + ".journal")


def open_journal(path, identity: dict, count: int, size: int, fresh: bool = False) -> Journal:
    """The journal of surface file ``path`` for this run: its records of ``count`` values, index < ``size``.

    Raises:
        SettingsMismatch: it holds another surface (``check_same_identity``).
        DamagedFile: a damaged line before an intact one, a record that breaks the schema, a file
            that is not a surface journal.
    """
    return Journal(journal_path(path), "surface", identity, what="surface journal",
                   remedy="delete it to start over", check=_check_record(count, size),
                   refuse=lambda _, old, new: check_same_identity(path, old, new),
                   legacy=lambda data: legacy_journal(data, count), fresh=fresh)


def _check_record(count: int, size: int):
    def check(record, schema, where: str) -> None:
        schema.mapping(record, where)
        index = schema.integer(schema.field(record, "i", where), f"{where}: i", minimum=0)
        if index >= size:
            schema.fail(f"is damaged: {where}: i is {index}, past the grid's {size} points")
        values = schema.field(record, "v", where)
        if not isinstance(values, list) or len(values) != count:
            schema.fail(f"is damaged: {where}: v is not a list of {count} values")
        for value in values:
            try:
                float.fromhex(value)
            except (TypeError, ValueError):
                schema.fail(f"is damaged: {where}: v holds {value!r}, not a float's hex string")
    return check


def record(index: int, *values: float) -> dict:
    """One point's journal record: its flat index and its values (loss, acc[, test loss, test acc])."""
    return {"i": int(index), "v": [float(v).hex() for v in values]}


def record_values(record: dict):
    """(flat index, values) of a journal record."""
    return record["i"], tuple(float.fromhex(v) for v in record["v"])


def _legacy_record(line: bytes, count: int):
    """The record of an intact line of the previous release's format, else None."""
    try:
        text = line.decode("ascii")
        body, _, digits = text.rpartition(" ")
        if len(digits) != 8 or int(digits, 16) != zlib.crc32(body.encode()):
            return None
        index, *values = body.split(" ")
        if len(values) != count:
            return None
        return record(int(index), *(float.fromhex(v) for v in values))
    except ValueError:  # not ASCII, not hex
        return None


def legacy_journal(data: bytes, count: int):
    """(identity, records, None for each damaged line) of a journal of the previous release, else None.

    A torn last line (no newline) is left out, as the journal leaves it.
    """
    header, newline, rest = data.partition(b"\n")
    if not newline or not header.startswith(LEGACY_MAGIC.encode() + b" "):
        return None
    try:
        identity = json.loads(header[len(LEGACY_MAGIC) + 1:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(identity, dict):
        return None
    return identity, [_legacy_record(line, count) for line in rest.split(b"\n")[:-1]]
