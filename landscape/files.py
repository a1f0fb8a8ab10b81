"""Small file helpers shared by the stages: outputs appear whole or not at all."""

import contextlib
import csv
import errno
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Union

from .errors import OutputUnwritable, SamePath, UsageError

# What a path argument of the public calls accepts (each turns it into a Path itself).
PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A crash, an exception or Ctrl-C inside the block leaves no partial ``path`` behind.  A full
    disk, a file-size limit or a read-only folder becomes a one-line UsageError naming ``path``,
    whichever writer failed (Python's OSError, h5py's RuntimeError, safetensors' error).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    tmp = parent / f".{path.name}.partial-{os.getpid()}"
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
        except Exception as err:
            reason = write_failure(err)
            if reason is None:
                raise
            raise UsageError(f"cannot write '{path}': {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def finite_or_null(value):
    """``value`` with every non-finite number (NaN, +inf, -inf) inside dicts, lists and tuples as None."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def json_text(value, **options) -> str:
    """``value`` as strict JSON text: the one way this package writes JSON.

    Python's ``json.dumps`` writes NaN and Infinity, which strict parsers (JavaScript, jq, Go,
    Rust's serde) refuse; here a non-finite number becomes ``null`` (docs/file-formats.md names
    the fields where that can happen) and ``allow_nan=False`` makes any other slip an error rather
    than a file others cannot read.  Finite values give the same text as ``json.dumps``, so the
    fingerprints computed from such text do not change.

    Args:
        value: dicts, lists, strings, numbers, booleans, None.
        options: ``json.dumps`` options (indent, sort_keys, separators, default, ensure_ascii).

    Returns:
        The JSON text.
    """
    return json.dumps(finite_or_null(value), allow_nan=False, **options)


_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|os error (\d+)|\[Errno (\d+)\]")


def write_failure(err: BaseException) -> Optional[str]:
    """The reason in words when ``err`` is a failed write.

    A failed write is a system error, also as h5py and safetensors report it: a message quoting the
    errno, or an error raised while handling one.

    Args:
        err: the exception raised while writing.

    Returns:
        The reason, or None when it is not a failed write (a bug, not the disk).
    """
    if isinstance(err, UsageError):
        return None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        reason = _system_error(err)
        if reason is not None:
            return reason
        err = err.__cause__ or err.__context__
    return None


def _system_error(err: BaseException) -> Optional[str]:
    if isinstance(err, OSError) and err.errno:
        return err.strerror or os.strerror(err.errno)
    found = _ERRNO_IN_TEXT.search(str(err))
    if found and (isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"):
        number = int(next(g for g in found.groups() if g))
        return os.strerror(number)
    if isinstance(err, OSError):
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def _probe_folder(folder: Path) -> Optional[str]:
    """Why a file cannot be created in ``folder``, or None when it can.

    Tried for real: permission bits do not stop root, a read-only mount or /proc do.
    """
    probe = folder / f".landscape-write-test-{os.getpid()}"
    try:
        handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as err:
        return err.strerror or os.strerror(err.errno or errno.EIO)
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def require_readable_file(path, what: str = "file") -> Path:
    """Raise UsageError unless ``path`` is an existing, readable regular file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} '{path}' does not exist")
    if not path.is_file():
        raise UsageError(f"{what} '{path}' is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} '{path}' is not readable (check its permissions)")
    return path


def check_output_path(path, what: str = "output", suffixes: Optional[Sequence[str]] = None) -> Path:
    """Refuse, before any computation, an output that could not be written at the end.

    Checks that ``path`` is not a folder, that its suffix is one of ``suffixes`` (lower case, with
    the dot) when given, and that its folder exists or can be made and is writable (by creating and
    removing a small file there, so a read-only file system is found even for root).

    Args:
        path: the output.
        what: what it is, named in messages.
        suffixes: the allowed suffixes, or None for any.

    Returns:
        The path, as a ``Path``.

    Raises:
        UsageError: any of those checks fails.
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + (" or " if len(suffixes) > 1 else "") + suffixes[-1]
        raise OutputUnwritable(what, path, f": use a {names} file name")
    if path.is_dir():
        raise OutputUnwritable(what, path, " is a folder; give a file name")
    existing = _existing_folder(path.parent if str(path.parent) else Path("."), what, path)
    reason = _probe_folder(existing)
    if reason is not None:
        raise OutputUnwritable(what, path, f" cannot be written: '{existing}' refuses new files ({reason})")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputUnwritable(what, path, " is not writable (check its permissions)")
    return path


def _existing_folder(folder: Path, what: str, path: Path) -> Path:
    """The first existing folder among ``folder`` and its parents (OutputUnwritable when it is a file)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputUnwritable(what, path, f": '{existing}' is a file, not a folder")
    return existing


def check_folder_path(path, what: str = "folder") -> Path:
    """Refuse a path meant as a folder that is a file or lies inside one (it could never hold files).

    Args:
        path: the folder (it may not exist yet).
        what: what it is, named in messages.

    Returns:
        The path, as a ``Path``.

    Raises:
        OutputUnwritable: ``path`` or one of its parents is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputUnwritable(what, path, " is a file, not a folder; give a folder")
    _existing_folder(path, what, path)
    return path


def check_output_folder(path, what: str = "folder") -> Path:
    """Refuse, before any work, a folder to write files into that could not take them at the end.

    Args:
        path: the folder (made when missing).
        what: what it is, named in messages (a parameter such as ``save_models``).

    Returns:
        The path, as a ``Path``.

    Raises:
        OutputUnwritable: ``path`` or one of its parents is a file, or the first existing one
            refuses new files.
    """
    path = check_folder_path(path, what)
    existing = _existing_folder(path, what, path)
    reason = _probe_folder(existing)
    if reason is not None:
        raise OutputUnwritable(what, path, f" cannot be written: '{existing}' refuses new files ({reason})")
    return path


def write_csv(rows: Sequence[dict], path, columns: Optional[Iterable[str]] = None) -> Path:
    """Write dict rows as CSV atomically.

    Args:
        rows: the rows, dicts.
        path: the CSV file.
        columns: the columns, in order (None: every key, in first-seen order).

    Returns:
        The path, as a ``Path``.
    """
    if not rows:
        raise UsageError(f"nothing to write to '{path}': no rows")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def check_distinct_paths(outputs: Dict[str, object], inputs: Optional[Dict[str, object]] = None) -> None:
    """Refuse, before any work, an output that another setting of the same call also names.

    An output given as an input too is overwritten while it is read, and two outputs at one path
    leave one of them (``finetune``'s summary written over its own per-run journal).  Paths are
    compared resolved (``./a`` and ``a``, a symbolic link and its target) and, where both exist, by
    ``os.path.samefile`` (hard links).  Inputs are not compared with each other: reading one file
    twice changes nothing (two surfaces of one model share a Hessian report).

    Args:
        outputs: {setting name: path}; a value that is not a path (None, a loaded model) is
            skipped, a list or tuple is one path each.
        inputs: {setting name: path}, the same way.

    Raises:
        SamePath: naming both settings.
    """
    def entries(named):
        for name, value in (named or {}).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for path in values:
                if isinstance(path, (str, os.PathLike)) and str(path) != "":
                    yield name, Path(path).expanduser()

    outs, ins = list(entries(outputs)), list(entries(inputs))
    for i, (name, path) in enumerate(outs):
        for other, other_path in outs[i + 1:] + ins:
            if _same_file(path, other_path):
                raise SamePath((name, other), (path, other_path))


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only its resolved path could match
        return False


def staged_path(path) -> Path:
    """Where a replacement of ``path`` is built until the whole result it belongs to is complete.

    ``.NAME.new.SUFFIX`` next to it (hidden, same folder: one ``os.replace`` puts it in place).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.new{path.suffix}")


def replace_together(pairs: Sequence) -> None:
    """Move each staged file onto its output, in order: the last step of a result of several files.

    Until this runs every output keeps its old content (a kill before leaves the old result whole,
    its replacement staged); the renames themselves take microseconds.  A staged file that does not
    exist is skipped (an optional part).

    Args:
        pairs: (staged path, output path) pairs.
    """
    for staged, final in pairs:
        if Path(staged).exists():
            os.replace(staged, final)
