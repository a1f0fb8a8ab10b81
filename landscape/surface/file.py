"""The surface file (contract) and its crash-safe writer.

Layout, readable by the original loss-landscape plotting code: ``xcoordinates`` (nx,),
``ycoordinates`` (ny,) for 2D, ``train_loss`` and ``train_acc`` shaped (nx,) in 1D or (ny, nx) in
2D with ``Z[iy, ix]`` the value at ``(x[ix], y[iy])``.  NaN marks a point not computed yet; a
computed point whose loss diverged is +inf, never NaN.  A ``checksums`` attribute (CRC-32 of each
dataset's float64 values) lets readers tell a damaged file from a surface with odd values; files
without it (older ones, the original code's) are read unchecked.  Files written by the original code are
read too: they declare the 2D shape as (nx, ny) but fill it in the flat order of
``meshgrid(x, y)``, i.e. row-major over (ny, nx), and mark points not computed yet with -1.

Crash safety: every finished point is appended at once to a journal (``S.h5.journal``) whose
records each carry a CRC-32 and end with a newline (``journal.Journal``), so a torn or corrupted last
record is recognised, never misread, and cut off before the next run appends.  The HDF5 file is rewritten to a temporary
file and atomically renamed into place every few seconds.  A SIGKILL therefore loses only the
points being computed; rerunning replays the journal.  One run at a time may write a file (its
``outputs.claim_output`` lock).  With ``overwrite`` the new surface is built aside (``.S.h5.new.h5``
and its journal) and replaces ``S.h5`` only once complete, so an interrupted replacement keeps the
old file (rerunning with ``overwrite`` resumes the replacement).  The identity a resume must match
and the journal's records live in ``surface.identity``.
"""

import contextlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import h5py
import numpy as np

from .. import checks
from ..errors import SettingsMismatch, UsageError
from ..files import PathLike, atomic_output, json_text, require_readable_file
from ..identity import sample_fingerprint  # noqa: F401 (a name of this module before the split)
from ..outputs import claim_output
from ..schema import DamagedFile
from .identity import (  # noqa: F401 (names of this module before the split, still imported from it)
    FORMAT,
    _refuse,
    _scalar_attrs,
    check_same_identity,
    journal_path,
    open_journal,
    record,
    record_values,
    surface_identity,
)

FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc")
TRAIN_FIELDS, TEST_FIELDS = FIELDS[:2], FIELDS[2:]  # test_*: on the held-out sample of ``--eval-corpus``
MAX_POINTS = 10_000_000  # 160 MB of float64 loss and accuracy in memory; beyond that, refuse


# ----------------------------------------------------------------------------- reading
@dataclass
class Surface:
    """One field of a surface file, in the contract's layout.

    x: (nx,) coordinates along the first direction.  y: (ny,) or None for a 1D surface.
    z: (nx,) in 1D, (ny, nx) in 2D, float64; NaN where not computed.
    """

    path: Path
    field: str
    x: np.ndarray
    y: "np.ndarray | None"
    z: np.ndarray
    settings: dict = dataclass_field(default_factory=dict)
    legacy_layout: bool = False  # True when read from an original loss-landscape (nx, ny) file

    @property
    def dims(self):
        """1 for a 1D surface, 2 for a 2D one."""
        return 1 if self.y is None else 2

    @property
    def computed_fraction(self):
        """Fraction of the points computed (those of ``z`` that are not NaN), in [0, 1]."""
        return float(np.isfinite(self.z).mean())


def read_surface(path: PathLike, field: str = "train_loss") -> Surface:
    """Read ``field`` of a surface HDF5 file as a ``Surface`` (see the module docstring for layouts).

    Args:
        path: the surface file (.h5).
        field: the dataset to read, e.g. 'train_loss' or 'train_acc'.

    Returns:
        A ``Surface``: x (nx,), y (ny,) or None, z (nx,) or (ny, nx) float64, NaN where not computed.

    Raises:
        UsageError: a missing or non-HDF5 file, a missing field, or shapes that fit neither the
            contract nor the original loss-landscape layout.
    """
    path = require_readable_file(path, "surface file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise UsageError(f"surface file '{path}' is not an HDF5 file (write one with 'landscape surface')")
    try:
        with handle as f:
            x, y, raw, settings = _read_fields(f, path, field)
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # h5py's words for damaged internals
        raise UsageError(f"surface file '{path}' is damaged ({_first_line(err)}); recompute it") from None
    z, legacy = _to_contract_layout(raw, x, y, path, field)
    if legacy or np.any(z < 0):
        # Loss and accuracy are never negative; the original code marks pending points with -1.
        z = np.where(z < 0, np.nan, z)
    return Surface(path=path, field=field, x=x, y=y, z=z, settings=settings, legacy_layout=legacy)


def _read_fields(f, path, field):
    """(x, y or None, raw field values, settings) of an open surface file."""
    if "xcoordinates" not in f:
        raise UsageError(f"surface file '{path}' has no 'xcoordinates' dataset; is it a surface file?")
    if field not in f:
        present = ", ".join(k for k in FIELDS if k in f) or "none"
        raise UsageError(f"surface file '{path}' has no '{field}' dataset (present: {present})")
    names = ["xcoordinates"] + (["ycoordinates"] if "ycoordinates" in f else []) + [field]
    values = _verified(f, path, names)
    x = _coordinates(values["xcoordinates"], path, "xcoordinates")
    y = _coordinates(values["ycoordinates"], path, "ycoordinates") if "ycoordinates" in f else None
    raw = np.asarray(values[field], dtype=np.float64)
    return x, y, raw, _settings(f)


def _first_line(err):
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _crc(values) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(values, dtype='<f8').tobytes()):08x}"


def _verified(f, path, names):
    """{name: values} of datasets ``names``, checked against the file's ``checksums`` when it has them."""
    values = {name: np.asarray(f[name][()]) for name in names}
    stored = f.attrs.get("checksums")
    if stored is None:
        return values
    try:
        sums = json.loads(stored if isinstance(stored, str) else bytes(stored).decode())
        bad = next((n for n in names if n in sums and sums[n] != _crc(values[n])), None)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
        bad = "checksums"
    if bad is not None:
        raise ValueError(f"'{bad}' does not match the checksum written with it")
    return values


def _coordinates(values, path, name):
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise UsageError(f"'{name}' in '{path}' holds non-finite values; is it a surface file?")
    if values.ndim != 1 or len(values) < 2:
        raise UsageError(f"'{name}' in '{path}' must be a 1-D array of at least 2 points, got shape {values.shape}")
    if not np.all(np.diff(values) > 0):
        raise UsageError(f"'{name}' in '{path}' must be strictly increasing")
    return values


def _to_contract_layout(raw, x, y, path, field):
    """Return (z in the contract's layout, whether the file used the original (nx, ny) shape)."""
    nx = len(x)
    if y is None:
        if raw.shape != (nx,):
            raise UsageError(f"'{field}' in '{path}' has shape {raw.shape}; a 1D surface needs ({nx},)")
        return raw, False
    ny = len(y)
    if raw.shape == (ny, nx):
        return raw, False
    if raw.shape == (nx, ny):
        # Original layout: declared (nx, ny), filled in meshgrid(x, y) flat order = row-major (ny, nx).
        return raw.reshape(-1).reshape(ny, nx), True
    raise UsageError(f"'{field}' in '{path}' has shape {raw.shape}; a 2D surface needs ({ny}, {nx}) = (len(y), len(x))")


def _settings(f):
    """Attributes and scalar string datasets (the original code stores dir_file as a dataset)."""
    settings = {k: _plain(v) for k, v in f.attrs.items()}
    for key, item in f.items():
        if getattr(item, "shape", None) == () and key not in settings:
            settings[key] = _plain(item[()])
    return settings


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value




# ----------------------------------------------------------------------------- writing
def write_surface(path, xs, ys, loss, acc, attrs, extra=None):
    """Write a surface file atomically (contract layout, with ``checksums``).

    Args:
        path: the surface file (.h5).
        xs: (nx,) coefficients along x.
        ys: (ny,) coefficients along y, or None for 1D.
        loss: (nx,) or (ny, nx) float64 losses (nats per target token), NaN where not computed.
        acc: token accuracies, same shape, in [0, 1].
        attrs: file attributes: scalars and strings.
        extra: more fields shaped like ``loss``, {name: values} (``test_loss``, ``test_acc``).

    Raises:
        UsageError: the file cannot be written (its one-line reason).
    """
    data = {"xcoordinates": xs, "ycoordinates": ys, "train_loss": loss, "train_acc": acc, **(extra or {})}
    data = {name: np.asarray(values, dtype=np.float64) for name, values in data.items() if values is not None}
    with atomic_output(path) as tmp:
        # Through a Python file object: a failed write (full disk) is a clean OSError, where HDF5's
        # own writer reports it while freeing objects, noisily, and can crash the process.
        with open(tmp, "wb") as stream, h5py.File(stream, "w") as handle:
            for name, values in data.items():
                handle.create_dataset(name, data=values)
            for key, value in attrs.items():
                handle.attrs[key] = value
            handle.attrs["checksums"] = json_text({name: _crc(values) for name, values in data.items()})


def _read_surface_state(path, identity, shape, fields=TRAIN_FIELDS):
    """The arrays of ``fields`` from an existing surface file with the same settings (else UsageError)."""
    try:
        with h5py.File(path, "r") as handle:
            stored = handle.attrs.get("identity")
            if stored is None or "train_loss" not in handle:
                raise SettingsMismatch(f"'{path}' exists but is not a landscape surface file")
            held_out = [n for n in fields if n not in TRAIN_FIELDS and n not in handle]
            if held_out:  # a resume that adds a held-out corpus: say so, not that the file is unreadable
                raise SettingsMismatch(f"'{path}' holds a surface computed without a held-out corpus (no "
                                       f"'{held_out[0]}'), and this run evaluates one")
            names = [n for n in ("xcoordinates", "ycoordinates", *fields) if n in handle]
            values = _verified(handle, path, names)
            arrays = [values[name] for name in fields]
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise SettingsMismatch(f"'{path}' exists but cannot be read as a surface file "
                               f"({_first_line(err)})") from None
    try:
        old = json.loads(stored if isinstance(stored, str) else bytes(stored).decode())
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        old = None
    if not isinstance(old, dict):
        raise SettingsMismatch(f"'{path}' has a damaged 'identity' attribute (not JSON)")
    check_same_identity(path, old, identity)
    if arrays[0].shape != shape:
        raise SettingsMismatch(f"'{path}' has a {arrays[0].shape} grid, this run {shape}")
    return [a.astype(np.float64) for a in arrays]


def _clean_partials(path):
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def check_grid_size(xs, ys=None) -> None:
    """Refuse grids too large to hold in memory (the loss and accuracy of every point)."""
    total = len(xs) * (1 if ys is None else len(ys))
    if total > MAX_POINTS:
        raise UsageError(f"a grid of {total:,} points is too large (at most {MAX_POINTS:,}); "
                         "use fewer points or split it into several surfaces")


class SurfaceFile:
    """Rank 0's side of a resumable surface file: journal per point, atomic HDF5 every few seconds.

    ``missing()`` lists the points still to compute; ``record`` journals finished points at once;
    ``close(complete)`` writes the file and, when complete, removes the journal.  fields: the
    datasets computed at each point, in the order of each result's values (``TRAIN_FIELDS``, or
    ``FIELDS`` with a held-out sample's ``test_loss`` and ``test_acc``).
    """

    def __init__(self, path, xs, ys, identity, attrs, overwrite=False, flush_seconds=2.0, fields=TRAIN_FIELDS):
        check_grid_size(xs, ys)
        checks.non_negative_float(flush_seconds, "flush_seconds")  # NaN: the file would never be rewritten
        self.target, self.xs, self.ys, self.fields = Path(path), xs, ys, tuple(fields)
        # Where points go: the target itself, or aside until complete when replacing it.
        self.path = aside_path(self.target) if overwrite else self.target
        self.identity, self.attrs, self.flush_seconds = identity, attrs, flush_seconds
        self.shape = (len(xs),) if ys is None else (len(ys), len(xs))
        if self.target.is_dir():
            raise UsageError(f"'{self.target}' is a folder; give a surface file name")
        self._claim = claim_output(self.target, "surface", overwrite)
        try:
            self._load(overwrite)
        except OSError as err:
            self._claim.release()
            raise UsageError(f"cannot write '{journal_path(self.path)}': {err.strerror or err}") from None
        except BaseException:
            self._claim.release()
            raise
        self.last_flush = time.monotonic()

    def _load(self, overwrite):
        for path in {self.path, self.target}:
            _clean_partials(path)
        arrays = [np.full(self.shape, np.nan) for _ in self.fields]
        created = not journal_path(self.path).exists()
        try:
            if self.path.exists():
                arrays = _read_surface_state(self.path, self.identity, self.shape, self.fields)
            self.journal = open_journal(self.path, self.identity, len(self.fields), arrays[0].size)
        except (SettingsMismatch, DamagedFile):
            if created:  # leave nothing behind for a refused run
                journal_path(self.path).unlink(missing_ok=True)
            if not overwrite:
                raise
            # An earlier replacement with other settings, interrupted: start this one afresh.
            self.path.unlink(missing_ok=True)
            arrays = [np.full(self.shape, np.nan) for _ in self.fields]
            self.journal = open_journal(self.path, self.identity, len(self.fields), arrays[0].size, fresh=True)
        for entry in self.journal.records:
            index, values = record_values(entry)
            for array, value in zip(arrays, values):
                array.reshape(-1)[index] = value
        self.data = dict(zip(self.fields, arrays))

    @property
    def loss(self):
        """The train_loss array, shaped like the grid."""
        return self.data["train_loss"]

    @property
    def acc(self):
        """The train_acc array, shaped like the grid."""
        return self.data["train_acc"]

    def missing(self):
        """Flat (row-major) indices of points not computed yet (in any of the fields)."""
        pending = np.zeros(self.loss.size, dtype=bool)
        for values in self.data.values():
            pending |= np.isnan(values.reshape(-1))
        return np.flatnonzero(pending).tolist()

    def record(self, results):
        """Record finished points: journaled at once, the HDF5 file rewritten every ``flush_seconds``.

        A loss that is not finite (the model diverged there) is stored as +inf: computed, never NaN.

        Args:
            results: (flat index, *values) tuples, one value per field in ``fields`` order
                (loss, acc[, test loss, test acc]).

        Raises:
            UsageError: the journal or the file cannot be written (the points are kept).
        """
        results = [(i, *(_diverged_as_inf(v) if name.endswith("_loss") else v for name, v in zip(self.fields, values)))
                   for i, *values in results]
        self.journal.append(*(record(*result) for result in results))  # one write and fsync per batch
        for i, *values in results:
            for name, value in zip(self.fields, values):
                self.data[name].reshape(-1)[i] = value
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self):
        """Rewrite the HDF5 file with every point computed so far.

        Raises:
            UsageError: the file cannot be written (the journal still holds every point).
        """
        done = int((~np.isnan(self.loss)).sum())
        attrs = dict(self.attrs, points_done=done, points_total=int(self.loss.size))
        try:
            write_surface(self.path, self.xs, self.ys, self.loss, self.acc, attrs,
                          extra={name: self.data[name] for name in self.fields if name not in TRAIN_FIELDS})
        except UsageError as err:  # a full disk, a file-size limit: the journal still holds every point
            raise UsageError(f"{err}; the {done} finished point(s) are kept in the journal "
                             f"'{journal_path(self.path)}' and the last '{self.path.name}' written: "
                             "free space and rerun the same command to resume") from None
        self.last_flush = time.monotonic()

    def close(self, complete):
        """Write the file; when ``complete``, remove the journal.

        An incomplete close happens with an error in flight, which says what went wrong: a failed
        flush then stays quiet (the journal keeps every point).

        Args:
            complete: whether every point was computed.
        """
        try:
            try:
                self.flush()
            except UsageError:
                if complete:
                    raise
            if complete:
                if self.path != self.target:  # the replacement is whole: it takes the target's place
                    journal_path(self.target).unlink(missing_ok=True)  # the old file's, stale from now on
                    os.replace(self.path, self.target)
                journal_path(self.path).unlink(missing_ok=True)
        finally:
            self._claim.release()


def aside_path(path) -> Path:
    """Where ``overwrite`` builds the replacement of surface file ``path`` until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.new.h5")


def _diverged_as_inf(loss: float) -> float:
    return float(loss) if np.isfinite(loss) else float("inf")
