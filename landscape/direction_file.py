"""The direction file (contract): HDF5, float32 datasets per parameter, settings, a fingerprint.

Group ``xdirection`` (and ``ydirection``) holds one float32 dataset per parameter named as in
``named_parameters()``; the settings are file attributes, and a content ``fingerprint`` lets
surfaces tell whether a file was regenerated.

Files are written and read one tensor at a time, so neither side holds a whole-model float32
copy.  Storage is as small as the values allow while every HDF5 reader still sees plain float32
datasets: a tensor that is mostly zeros (a Fisher-masked direction) is deflate-compressed, and
one whose values are exact in 16 bits (directions of a bfloat16 model) is byte-shuffled and
compressed, which stores the two zero low bytes of each float32 for almost nothing.
"""

import hashlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import h5py
import numpy as np
import torch

from .errors import SettingsMismatch, UsageError
from .files import PathLike, atomic_output, require_readable_file
from .models import check_tensors_match

GROUPS = ("xdirection", "ydirection")
FORMAT = "landscape-directions"
PRECISIONS = ("float32", "bfloat16", "float16")

Direction = Dict[str, torch.Tensor]
READ_BLOCK = 1 << 22  # float32 values read at a time: 16 MiB
RowsOf = Callable[[str], Optional[Tuple[int, int]]]  # param name -> [start, stop) of dim 0 to keep


def round_to(values: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 ``values`` rounded to ``precision`` ('float32' | 'bfloat16' | 'float16'), as float32."""
    if precision == "float32":
        return values
    return values.to(getattr(torch, precision)).float()


# ----------------------------------------------------------------------------- fingerprint
class Fingerprint:
    """Short content hash of directions, fed one tensor at a time.

    It covers names, shapes and float32 values, direction by direction and, inside one, by sorted
    name.
    """

    def __init__(self):
        self._digest = hashlib.sha1()

    def add(self, name: str, values: torch.Tensor) -> None:
        """One whole tensor."""
        t = values.detach().to("cpu", torch.float32).contiguous()
        self.begin(name, t.shape)
        self.update(t.numpy())

    def begin(self, name: str, shape) -> None:
        """Start a tensor whose float32 values follow, in C order, through ``update``."""
        self._digest.update(f"{name}{tuple(shape)}".encode())

    def update(self, values: np.ndarray) -> None:
        """More float32 values of the tensor begun with ``begin``, in C order (any shape)."""
        self._digest.update(np.ascontiguousarray(values, dtype=np.float32))  # the buffer itself, no copy

    def hexdigest(self) -> str:
        """The hash so far: 16 hex digits."""
        return self._digest.hexdigest()[:16]


def fingerprint(directions: List[Direction]) -> str:
    """Short content hash of a list of directions (names, shapes and float32 values)."""
    stamp = Fingerprint()
    for direction in directions:
        for name in sorted(direction):
            stamp.add(name, direction[name])
    return stamp.hexdigest()


# ----------------------------------------------------------------------------- writing
def _storage(values: np.ndarray) -> dict:
    """HDF5 dataset options: compressed where that pays (see the module docstring)."""
    if values.size < 4096:
        return {}
    if not (values.view(np.uint32) & 0x1FFF).any():  # exact in 16 bits: the low mantissa bits are zero
        return {"chunks": True, "compression": "gzip", "compression_opts": 1, "shuffle": True}
    if np.count_nonzero(values) < values.size // 2:
        return {"chunks": True, "compression": "gzip", "compression_opts": 1}
    return {}


class DirectionWriter:
    """Writes a direction file tensor by tensor, atomically (nothing at ``path`` until ``close``).

    Tensors come direction by direction and, inside one, in sorted name order (the fingerprint's
    order): ``add(axis, name, values)``.  Use as a context manager.
    """

    def __init__(self, path, settings: Optional[dict] = None):
        self.path = Path(path)
        self.settings = dict(settings or {})
        self._stamp = Fingerprint()
        self._order = (-1, "")

    def __enter__(self):
        self._atomic = atomic_output(self.path)
        tmp = self._atomic.__enter__()
        try:
            # Through a Python file object: a failed write (full disk) is a clean OSError (HDF5's
            # own writer reports it while freeing objects, noisily, and can crash the process).
            self._stream = open(tmp, "wb")
            self._handle = h5py.File(self._stream, "w")
        except BaseException as failure:
            self._abort(type(failure), failure, failure.__traceback__)
            raise
        return self

    def add(self, axis: int, name: str, values: torch.Tensor) -> None:
        """Append one tensor of direction ``axis`` (0 = x, 1 = y); float32 values."""
        if (axis, name) <= self._order:
            raise ValueError(f"direction tensors must come in (axis, sorted name) order; got {name!r} "
                             f"after {self._order[1]!r}")
        self._order = (axis, name)
        array = values.detach().to("cpu", torch.float32).contiguous().numpy()
        group = self._handle.require_group(GROUPS[axis])
        group.create_dataset(name, data=array, **_storage(array))
        self._stamp.add(name, values)

    def __exit__(self, kind, err, tb):
        if kind is not None:
            self._abort(kind, err, tb)
            return False
        try:
            for key, value in self.settings.items():  # written last: a caller may add counts on the way
                self._handle.attrs[key] = "" if value is None else value
            self._handle.attrs["format"] = FORMAT
            self._handle.attrs["fingerprint"] = self.fingerprint  # of these values, whatever settings held
            self._handle.close()
            self._stream.close()
        except BaseException as failure:  # a full disk shows up here, when HDF5 flushes
            self._abort(type(failure), failure, failure.__traceback__)
            raise
        self._atomic.__exit__(None, None, None)
        return False

    def _abort(self, kind, err, tb):
        """Close what is open and let ``atomic_output`` remove the partial file.

        ``atomic_output`` also turns a failed write into its one-line error.
        """
        for closing in (getattr(self, "_handle", None), getattr(self, "_stream", None)):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # the write already failed; report that error, not this one
                    pass
        self._atomic.__exit__(kind, err, tb)

    @property
    def fingerprint(self) -> str:
        """The content fingerprint of the directions written so far (16 hex digits)."""
        return self._stamp.hexdigest()


def save_directions(path, directions: List[Direction], settings: Optional[dict] = None) -> str:
    """Write 1 or 2 directions to an HDF5 direction file (atomically); returns its fingerprint.

    Args:
        path: the .h5 file.
        directions: list of {param name: tensor}.
        settings: file attributes (str, numbers, bools).
    """
    if len(directions) not in (1, 2):
        raise UsageError(f"a direction file holds 1 or 2 directions, got {len(directions)}")
    with DirectionWriter(path, settings) as writer:
        for axis, direction in enumerate(directions):
            for name in sorted(direction):
                writer.add(axis, name, direction[name])
    return writer.fingerprint


def check_existing_directions(path, settings) -> None:
    """SettingsMismatch when ``path`` holds directions made with settings other than ``settings``.

    A missing file passes; so does one with the same settings (they are seeded: the same file).
    Only scalar settings (text, numbers, None) are compared: arrays (eigenvalues, a trajectory's
    coordinates) are results, not settings.
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        with h5py.File(path, "r") as handle:
            old = {k: _attr(v) for k, v in handle.attrs.items()}
    except OSError:
        raise SettingsMismatch(f"'{path}' exists but is not a direction file") from None
    for key in sorted(set(settings) & set(old)):
        if settings[key] is not None and not isinstance(settings[key], (str, int, float)):
            continue
        now = "" if settings[key] is None else settings[key]
        if old[key] != now:
            raise SettingsMismatch(f"'{path}' holds directions made with other settings "
                                   f"({key}={old[key]!r}, this run has {key}={now!r})")


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- reading
def load_directions(path: PathLike, model: Optional[torch.nn.Module] = None, dtype: Optional[torch.dtype] = None,
                    device: Union[None, str, torch.device] = None, rows: Optional[RowsOf] = None,
                    axes: int = 2) -> Tuple[List[Direction], dict]:
    """Read a direction file, one tensor at a time, verifying its fingerprint and values.

    Args:
        path: the direction file.
        model: when given, every parameter must have a direction tensor of its (full) shape and
            no tensor may be extra (UsageError names the first mismatch).
        dtype: the dtype to keep the tensors in (default float32, the stored values).
        device: where to keep them (default CPU).
        rows: param name -> [start, stop) of dim 0 to keep (a sharded model's local rows), or
            None for the whole tensor.
        axes: keep at most this many directions (1: only x of a 2-direction file); the others
            are still read to verify the fingerprint, one tensor at a time.

    Returns:
        (list of 1 or 2 {param name: tensor}, {attribute: value}).

    Raises:
        UsageError: not a direction file, damaged (values not matching the fingerprint written
            with them), non-finite values, or made for another model.
    """
    path = require_readable_file(path, "direction file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise UsageError(f"'{path}' is not a direction file (not HDF5); make one with `landscape directions`") from None
    try:
        with handle:
            attrs = _attributes(handle, path)
            stamp, non_finite = Fingerprint(), []
            directions = []
            for axis, group in enumerate(g for g in GROUPS if g in handle):
                tensors = _read_group(handle[group], group, stamp, non_finite, dtype, device, rows)
                if axis < axes:
                    directions.append(dict(tensors))
                else:
                    for _ in tensors:  # hashed and checked, not kept
                        pass
            if str(attrs.setdefault("fingerprint", stamp.hexdigest())) != stamp.hexdigest():
                raise UsageError(f"direction file '{path}' is damaged (its values do not match the fingerprint "
                                 "written with them); make the directions again")
            if non_finite:  # such a direction would make every point of a surface NaN
                raise UsageError(f"direction file '{path}' holds non-finite values ({non_finite[0]}); "
                                 "make the directions again")
            if model is not None:
                _check_shapes(handle, path, model)
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # h5py's words for damaged internals
        raise UsageError(f"direction file '{path}' is damaged ({str(err).splitlines()[0]}); "
                         "make the directions again") from None
    return directions, attrs


def _attributes(handle, path) -> dict:
    if "xdirection" not in handle or not isinstance(handle["xdirection"], h5py.Group):
        raise UsageError(f"'{path}' is not a direction file (no 'xdirection' group); "
                         "make one with `landscape directions`")
    return {k: _attr(v) for k, v in handle.attrs.items()}


def _check_shapes(handle, path, model) -> None:
    """UsageError unless the file has one tensor per parameter of ``model``, of its full shape."""
    for group in GROUPS:
        if group in handle:
            shapes = {name: _Shaped(handle[group][name].shape) for name in handle[group]}
            check_tensors_match(shapes, model, f"direction file '{path}' ({group})")


class _Shaped:
    """A stand-in with only a shape, to check a file's layout without reading its values."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _read_group(group, group_name, stamp, non_finite, dtype, device, rows) -> Iterator[Tuple[str, torch.Tensor]]:
    buffer = np.empty(READ_BLOCK, dtype=np.float32)  # one read buffer for every tensor: no heap churn
    for name in sorted(group):
        item = group[name]
        # Schema: every member is a float dataset (an integer one would be read as float32 silently).
        if not isinstance(item, h5py.Dataset) or item.dtype.kind != "f":
            what = "a group" if not isinstance(item, h5py.Dataset) else f"of dtype {item.dtype}"
            raise UsageError(f"direction file '{group.file.filename}' is damaged: '{group_name}/{name}' is {what}, "
                             "not a float dataset; make the directions again")
        span = rows(name) if rows is not None else None
        values, finite = _read_tensor(group[name], name, stamp, buffer, dtype or torch.float32, device or "cpu", span)
        if not finite and not non_finite:
            non_finite.append(f"{group_name}/{name}")
        yield name, values


def _read_tensor(dataset, name, stamp, buffer, dtype, device, span):
    """Read one tensor (or rows [span) of it) in blocks of rows, hashing every value on the way.

    Returns (the tensor in ``dtype`` on ``device``, whether all values are finite); blocks are
    read through ``buffer``.

    The result is allocated once, in its final dtype and place: no float32 copy of a tensor that
    is kept in bfloat16, and no temporaries that would leave holes in the heap.
    """
    shape = tuple(dataset.shape)
    stamp.begin(name, shape)
    if not shape:  # a 0-dim tensor
        value = np.asarray(dataset[()], dtype=np.float32)
        stamp.update(value)
        return torch.tensor(float(value), dtype=dtype, device=device), bool(np.isfinite(value))
    rows, row_size = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    keep = span or (0, rows)
    out = torch.empty((keep[1] - keep[0], *shape[1:]), dtype=dtype, device=device)
    step = max(1, len(buffer) // max(1, row_size))
    if row_size > len(buffer):
        buffer = np.empty(row_size, dtype=np.float32)
    finite = True
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = buffer[: (stop - start) * row_size].reshape((stop - start, *shape[1:]))
        if block.size:
            dataset.read_direct(block, np.s_[start:stop])
        stamp.update(block)
        values = torch.from_numpy(block)
        # min and max propagate NaN and show ±inf, without a bool temporary of the block's size
        finite = finite and (not block.size or bool(torch.isfinite(values.min()) & torch.isfinite(values.max())))
        low, high = max(start, keep[0]), min(stop, keep[1])
        if low < high:
            out[low - keep[0]: high - keep[0]].copy_(values[low - start: high - start])
    return out, finite


def count_directions(path) -> int:
    """How many directions (1 or 2) a direction file holds, without reading them."""
    path = require_readable_file(path, "direction file")
    try:
        with h5py.File(path, "r") as handle:
            return sum(name in handle for name in GROUPS)
    except OSError:
        raise UsageError(f"'{path}' is not a direction file (not HDF5); make one with `landscape directions`") from None


def check_directions_match(directions, model, path="directions"):
    """UsageError naming the first tensor whose name or shape does not fit ``model``."""
    for axis, direction in zip(GROUPS, directions):
        check_tensors_match(direction, model, f"direction file '{path}' ({axis})")


def check_directions_finite(directions, path="directions"):
    """Refuse directions with a NaN or an infinity: they would make every point of a surface NaN.

    Args:
        directions: list of {param name: tensor}.
        path: the direction file, named in the message.

    Raises:
        UsageError: naming the first tensor with a NaN or an infinity.
    """
    for axis, direction in zip(GROUPS, directions):
        for name, tensor in direction.items():
            if not bool(torch.isfinite(tensor).all()):
                raise UsageError(f"direction file '{path}' holds non-finite values ({axis}/{name}); "
                                 "make the directions again")
