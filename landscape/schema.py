"""The checks every file a stage reads goes through: one schema per file kind, one line when it fails.

Each file kind's reader (``fisher.file``, ``direction_file``, ``surface.file``,
``guided.schedule``, ``journal`` (with ``guided.sweep``), ``curvature.report``, ``curvature.checkpoint``,
``data.labelled``, model weights in ``models``) states its schema with these helpers: the keys and
datasets it requires, their types, dtypes and shapes, that values are finite (and in range), and
its fingerprint or checksums recomputed where the file has them.  Every command that reads the file
gets the checks from its reader.  A violation is a ``DamagedFile`` (a ``UsageError``): one line that
names the kind of file, its path, what is wrong and what to do, never a traceback.
``docs/file-formats.md`` lists each kind's schema.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, NoReturn, Optional

import numpy as np

from .errors import UsageError


class DamagedFile(UsageError):
    """A file a stage reads is damaged, or is not the kind of file the stage needs."""


class Schema:
    """Checks for one file, each failing with a one-line ``DamagedFile``.

    Each check returns the value it checked (converted where said), so a reader validates and
    takes in one step: ``steps = schema.integer(schema.field(record, "steps"), "steps", minimum=1)``.

    Args:
        kind: what the file is ('Hessian report'), named in every message.
        path: the file, named in every message.
        remedy: what to do ('make it again with `landscape hessian`'), ending each message.
    """

    def __init__(self, kind: str, path, remedy: str = ""):
        self.kind, self.path, self.remedy = kind, path, remedy

    def fail(self, what: str) -> NoReturn:
        """Raise the one-line ``DamagedFile`` saying ``what`` is wrong."""
        tail = f"; {self.remedy}" if self.remedy else ""
        raise DamagedFile(f"{self.kind} '{self.path}' {what}{tail}")

    # ------------------------------------------------------------------------- structure
    def mapping(self, value: Any, where: str = "") -> dict:
        """``value`` must be a JSON object (dict)."""
        if not isinstance(value, dict):
            self.fail(f"is damaged: {_at(where)}is {_type(value)}, not an object")
        return value

    def field(self, obj: dict, key: str, where: str = "", optional: bool = False) -> Any:
        """``obj[key]``; a missing key fails unless ``optional`` (then None)."""
        if key not in obj or (optional and obj[key] is None):
            if optional:
                return None
            self.fail(f"is damaged: it has no '{_join(where, key)}'")
        return obj[key]

    # ------------------------------------------------------------------------- values
    def number(self, value: Any, where: str, *, minimum: Optional[float] = None, allow_nan: bool = False,
               finite: bool = True) -> float:
        """A real number (not a bool, not a string).

        Args:
            value: the value read.
            where: its place in the file, named in the message.
            minimum: the least value allowed (None: no bound).
            allow_nan: accept NaN.
            finite: refuse infinities.

        Returns:
            The value as a float.

        Raises:
            DamagedFile: the value is not such a number.
        """
        if isinstance(value, bool) or not isinstance(value, Real):
            self.fail(f"is damaged: '{where}' is {_type(value)}, not a number")
        value = float(value)
        if math.isnan(value):
            if not allow_nan:
                self.fail(f"is damaged: '{where}' is NaN")
            return value
        if finite and math.isinf(value):
            self.fail(f"is damaged: '{where}' is {value}, not a finite number")
        if minimum is not None and value < minimum:
            self.fail(f"is damaged: '{where}' is {value:g}, below {minimum:g}")
        return value

    def integer(self, value: Any, where: str, *, minimum: Optional[int] = None) -> int:
        """An integer (a JSON integer, or a float with an integral value), at least ``minimum``."""
        if isinstance(value, Real) and not isinstance(value, (bool, Integral)) and float(value).is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, Integral):
            self.fail(f"is damaged: '{where}' is {_type(value)}, not an integer")
        if minimum is not None and value < minimum:
            self.fail(f"is damaged: '{where}' is {value}, below {minimum}")
        return int(value)

    def text(self, value: Any, where: str) -> str:
        """``value`` (at ``where``) must be a string; returns it."""
        if not isinstance(value, str):
            self.fail(f"is damaged: '{where}' is {_type(value)}, not a string")
        return value

    def boolean(self, value: Any, where: str) -> bool:
        """``value`` (at ``where``) must be true or false; returns it."""
        if not isinstance(value, bool):
            self.fail(f"is damaged: '{where}' is {_type(value)}, not true or false")
        return value

    def numbers(self, value: Any, where: str, *, length: Optional[int] = None, minimum: Optional[float] = None,
                increasing: bool = False, allow_nan: bool = False, ndim: int = 1) -> np.ndarray:
        """A list (or nested lists) of numbers as a float64 array.

        Args:
            value: the value read.
            where: its place in the file, named in the message.
            length: the length required (None: any).
            minimum: the least value allowed for each element (None: no bound).
            increasing: require strictly increasing values.
            allow_nan: accept NaN (values are finite otherwise).
            ndim: the nesting depth required (the array's number of dimensions).

        Returns:
            The values as a float64 array of ``ndim`` dimensions.

        Raises:
            DamagedFile: the value is not such a list.
        """
        try:
            if not isinstance(value, (list, tuple)) or any(isinstance(v, (bool, str)) or v is None
                                                            for v in _flat(value)):
                raise TypeError
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            self.fail(f"is damaged: '{where}' is not a list of numbers")
        if array.ndim != ndim:
            self.fail(f"is damaged: '{where}' has {array.ndim} dimension(s), not {ndim}")
        if length is not None and len(array) != length:
            self.fail(f"is damaged: '{where}' has {len(array)} values, not {length}")
        self.finite_array(array, where, allow_nan=allow_nan)
        if minimum is not None and np.any(array < minimum):
            self.fail(f"is damaged: '{where}' has a value below {minimum:g}")
        if increasing and np.any(np.diff(array) <= 0):
            self.fail(f"is damaged: '{where}' is not strictly increasing")
        return array

    def finite_array(self, array: np.ndarray, where: str, allow_nan: bool = False) -> None:
        """Every value of ``array`` finite (NaN allowed with ``allow_nan``)."""
        bad = ~np.isfinite(array) if not allow_nan else np.isinf(array)
        if np.any(bad):
            first = array[bad].reshape(-1)[0]
            self.fail(f"is damaged: '{where}' holds non-finite values ({first})")

    def tensor(self, name: str, tensor, *, dtypes: tuple, minimum: Optional[float] = None) -> Optional[float]:
        """A torch tensor of one of ``dtypes``, with finite values, each at least ``minimum``.

        Reduces with ``aminmax`` (NaN propagates, ±inf shows), so no boolean copy of the tensor is
        made.  Returns the smallest value (None for an empty tensor).
        """
        import torch

        if tensor.dtype not in dtypes:
            allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            self.fail(f"holds '{name}' as {str(tensor.dtype).replace('torch.', '')}, not {allowed}")
        if tensor.numel() == 0:
            return None
        low, high = torch.aminmax(tensor.detach())
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            self.fail(f"holds non-finite values (in '{name}')")
        if minimum is not None and float(low) < minimum:
            self.fail(f"holds values below {minimum:g} (in '{name}')")
        return float(low)


def _flat(value):
    """The leaves of nested lists/tuples (to refuse booleans and strings numpy would accept)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flat(item)
    else:
        yield value


def _type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}")


def _at(where: str) -> str:
    return f"'{where}' " if where else "its content "


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
