"""Small file helpers shared by the stages: outputs appear whole or not at all."""

import contextlib
import os
from pathlib import Path

from .errors import UsageError


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A crash, an exception or Ctrl-C inside the block leaves no partial ``path`` behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.partial-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def require_readable_file(path, what="file"):
    """Raise UsageError unless ``path`` is an existing, readable regular file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} '{path}' does not exist")
    if not path.is_file():
        raise UsageError(f"{what} '{path}' is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} '{path}' is not readable (check its permissions)")
    return path
