"""Who may write an output.

The one home of "never replace what we did not write" and "one writer per output".

Every stage calls ``claim_output(path, kind, ...)`` for each file (or folder) it will write, before
any work.  A claim

* takes the output's lock: a sidecar ``.NAME.lock`` next to it, locked with ``flock`` and holding
  the writer's pid and command line.  A second run on the same output is refused in one line naming
  that process; the kernel drops the lock of a killed run, so its left-over sidecar blocks nothing
  (the next run takes it over and removes it when it ends), nor do the partial files killed writers
  left in the output's folder (removed by the claim: ``partials``, only those whose writer is dead).
  Claims are re-entrant inside one process (a CLI command claims its outputs, then a library writer
  claims them again), and under torchrun only rank 0 locks (the other ranks are the same run).
* refuses, unless ``overwrite=True``, an existing file that is not this stage's kind: what it
  holds is recognized from its content (HDF5 attributes, safetensors metadata, a JSON ``format``,
  a figure's embedded stamp, a CSV's header), never from its name.  Whether a file of the right kind
  was made with the same settings is the stage's own check (``check_existing_*``), except for
  figures, whose stamp carries what they were drawn from (compared here).

Figures carry a stamp, which their writers take from the figure's claim (the ``Claim`` that
``claim_output`` returned, passed to them as ``claim=``): ``claim.figure_metadata(fmt)`` for
matplotlib's ``savefig(metadata=...)``, ``claim.stamp_html(page)`` for plotly pages.  A stamp is
``landscape-output:`` followed by base64 JSON of the claim's kind and settings and ``!``, so that
any of PNG, PDF, SVG and HTML is read back by one search.

Size: about 515 lines, 100 of them docstrings.  Claims, locks and what a file holds are one
mechanism: a claim takes the lock and reads the file under it, so they stay in one module.
"""

import base64
import contextlib
import fcntl
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import OutputBusy, OutputRefused, UsageError
from .files import json_text
from .partials import remove_dead_partials

# Words for what a file holds, by kind (the kinds that stages claim, and those only recognized).
WORDS = {
    "fisher": "a Fisher file", "fisher-checkpoint": "a Fisher checkpoint", "directions": "a direction file",
    "surface": "a loss surface", "surface-journal": "a surface journal", "hessian-report": "a Hessian report",
    "hessian-journal": "a Hessian checkpoint", "schedule": "a dropout schedule",
    "critical-sharpness": "a critical-sharpness report",
    "figure": "a figure drawn by landscape",
    "table": "a table", "folder": "a folder", "saved-model": "a saved model (config.json)",
}
STAMP_TAG = "landscape-output:"
# Base64 ends with "!": the bytes after a stamp (a PNG chunk's CRC) may look like base64 too.
_STAMP = re.compile(rb"landscape-output:([A-Za-z0-9_=-]+)!")
# lock path -> [open file, count, folders made]: this process's locks.  Process state, not a claim's:
# one lock per output however many claims of it this process holds (a command's and then its library
# writer's), and ``release_all`` drops them all when a command ends, whoever holds the Claim objects.
_HELD = {}
# The stamp of a figure drawn outside any claim of this process.
UNCLAIMED = {"kind": "figure", "settings": None}
# resolved path -> this process's live figure claims of it, newest last.  Only for callers that name
# a figure by its path alone (``figure_metadata(out, fmt)``); landscape's writers pass the Claim.
_BY_PATH = {}


@dataclass
class Held:
    """What an existing file holds.

    ``kind`` (a key of WORDS, or None for a foreign file), ``words`` for messages, ``columns`` of a
    CSV table, ``stamp`` settings of a figure.
    """

    kind: Optional[str]
    words: str
    columns: Optional[list] = None
    stamp: Optional[dict] = None


# ----------------------------------------------------------------------------- claims
class Claim:
    """A held output: ``release()`` (or leaving the ``with`` block) drops the lock.

    ``stamp`` is what a figure claimed with ``kind="figure"`` records ({"kind", "settings"}); None
    for other kinds.  The figure writers embed it: ``figure_metadata``, ``stamp_html``.
    """

    def __init__(self, path, lock_key, stamp: Optional[dict] = None):
        self.path, self._key, self.stamp = Path(path), lock_key, stamp
        if stamp is not None:
            _BY_PATH.setdefault(_resolved(self.path), []).append(self)

    def figure_metadata(self, fmt: str) -> dict:
        """The ``savefig(metadata=...)`` argument that stamps this claim's figure (see ``figure_metadata``)."""
        return _metadata(self.stamp or UNCLAIMED, fmt)

    def stamp_html(self, written) -> None:
        """Put this claim's stamp into the HTML page ``written`` (see ``stamp_html``)."""
        _stamp_page(written, self.stamp or UNCLAIMED)

    def release(self):
        """Drop the lock (once; later calls do nothing)."""
        _forget(self)
        if self._key is not None:
            _unlock(self._key)
            self._key = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def claim_output(path, kind: str, overwrite: bool = False, columns: Optional[Sequence[str]] = None,
                 settings: Optional[dict] = None) -> Claim:
    """Lock ``path`` for this run and check that it may be (re)written as ``kind``.

    Args:
        path: the output file, or folder for ``kind="folder"`` (only locked: its files are claimed
            one by one).
        kind: a key of ``WORDS``: what this stage writes there.
        overwrite: replace whatever is there (the lock is still taken).
        columns: for ``kind="table"``: the leading columns of this stage's CSV header; an existing
            CSV whose header does not start with them is another table.
        settings: for ``kind="figure"``: what the figure is drawn from (compared with the stamp of
            an existing figure, embedded by the figure writers).

    Returns:
        a Claim; the CLI releases every claim when a command ends (``release_all``).

    Raises:
        OutputBusy: another live process holds the output.
        OutputRefused: the output holds something else (a SettingsMismatch: ``overwrite=True``
            replaces it).
    """
    path = Path(path)
    key = _lock(path)
    try:
        if not overwrite and path.exists() and kind != "folder":
            _check_kind(path, kind, columns, settings)
    except BaseException:
        if key is not None:
            _unlock(key)
        raise
    return Claim(path, key, {"kind": kind, "settings": settings} if kind == "figure" else None)


def check_saved_models(folders, overwrite=False) -> None:
    """Check that models may be saved into ``folders``.

    Args:
        folders: where models will be saved, inside a folder the caller has claimed.
        overwrite: allow any existing content.

    Raises:
        OutputRefused: unless each folder is missing, empty, or a saved model (``save_pretrained``
            replaces it).
    """
    for folder in map(Path, folders):
        if overwrite or not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
            continue
        held = identify(folder)
        if held.kind != "saved-model":
            words = "a folder of other files" if held.kind == "folder" else held.words
            raise OutputRefused(folder, f"'{folder}' holds {words}, not {WORDS['saved-model']}")


def release_all():
    """Drop every claim of this process (the CLI calls it when a command ends)."""
    # Newest first: a claim that made a folder is released after the claims of files inside it,
    # so the folder is empty by then and a refused run leaves none behind.
    for key in reversed(list(_HELD)):
        _HELD[key][1] = 1
        _unlock(key)
    _BY_PATH.clear()


def _check_kind(path, kind, columns, settings):
    if path.is_file() and path.stat().st_size == 0:
        return  # nothing to lose
    held = identify(path)
    if held.kind != kind:
        raise OutputRefused(path, f"'{path}' holds {held.words}, not {WORDS[kind]}")
    if kind == "table" and columns is not None and list(held.columns[:len(columns)]) != list(columns):
        raise OutputRefused(path, f"'{path}' holds {held.words}, not the table this command writes "
                                  f"({_listed(columns)})")
    if kind == "figure" and settings is not None and held.stamp and held.stamp.get("settings") is not None:
        old = held.stamp["settings"]
        new = json.loads(json_text(settings, default=str))
        if old != new:
            key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise OutputRefused(path, f"'{path}' holds another figure drawn by landscape "
                                      f"({key}={old.get(key)!r}, this run has {key}={new.get(key)!r})")


def _listed(columns, most=5):
    columns = list(columns)
    return ", ".join(columns[:most]) + (", ..." if len(columns) > most else "")


# ----------------------------------------------------------------------------- locks
def lock_path(path) -> Path:
    """The sidecar lock file of ``path``: ``.NAME.lock`` in the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _resolved(path):
    return str(Path(os.path.abspath(path)))


def _lock(path):
    """Take the lock of ``path`` (re-entrant); the key to unlock it, or None on ranks other than 0."""
    if os.environ.get("RANK", "0") != "0":
        return None
    side = lock_path(Path(os.path.abspath(path)))
    key = str(side)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    made = [folder for folder in [side.parent, *side.parent.parents] if not folder.exists()]
    try:
        side.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(side, path)
    except OSError as err:
        _remove_empty(made)
        raise UsageError(f"cannot write '{path}': cannot create its lock file '{side}' "
                         f"({err.strerror or err})") from None
    except BaseException:
        _remove_empty(made)
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {_command()}\n".encode())
    handle.flush()
    _HELD[key] = [handle, 1, made]
    remove_dead_partials(side.parent, own_locks=set(_HELD))  # what killed writers left in this folder
    return key


def _remove_empty(folders):
    """Remove the folders a claim created for its lock file, deepest first, where still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _acquire(side, path):
    """The open, flock-ed lock file.

    A lock file removed by its last holder between our open and our flock is not the one at
    ``side`` any more: then try again on the new one.
    """
    for attempt in range(100):
        handle = open(side, "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            # A holder that wrote no pid yet: a claim being taken, or another run's cleanup looking
            # whether the lock is held (``partials``), which lets go at once: look again briefly.
            if holder == _UNNAMED and attempt < 20:
                time.sleep(0.01)
                continue
            raise OutputBusy(path, f"another run is writing '{path}' ({holder})") from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(side).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
    raise UsageError(f"cannot lock '{path}': its lock file '{side}' keeps changing")


_UNNAMED = "a process that has not said who it is yet"


def _holder(handle):
    handle.seek(0)
    text = handle.read(4096).decode("utf-8", "replace").strip()
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return _UNNAMED
    return f"pid {pid}" + (f": {command}" if command else "")


def _command():
    words = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if words[0] in ("__main__.py", "-m", "-c"):
        words[0] = "landscape"
    text = " ".join(words)
    return text if len(text) <= 300 else text[:297] + "..."


def _unlock(key):
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _HELD[key]
    handle = entry[0]
    # Remove while still locked: a run that opened it meanwhile sees a stale inode and retries.
    with contextlib.suppress(OSError):
        if os.fstat(handle.fileno()).st_ino == os.stat(key).st_ino:
            os.unlink(key)
    handle.close()
    _remove_empty(entry[2])  # a refused or failed run leaves no empty folder behind


# ----------------------------------------------------------------------------- figure stamps
def _encoded(stamp):
    text = base64.urlsafe_b64encode(json_text(stamp, sort_keys=True, default=str).encode()).decode()
    return f"{STAMP_TAG}{text}!"


def _forget(claim):
    claims = _BY_PATH.get(_resolved(claim.path), [])
    if claim in claims:
        claims.remove(claim)
        if not claims:
            del _BY_PATH[_resolved(claim.path)]


def _stamp_of(out, claim) -> dict:
    """``claim``'s stamp; without one, that of this process's newest figure claim of ``out``, if any."""
    if claim is not None:
        return claim.stamp or UNCLAIMED
    claims = _BY_PATH.get(_resolved(out))
    return claims[-1].stamp if claims else UNCLAIMED


def _metadata(stamp, fmt):
    field = {"png": "landscape-output", "pdf": "Subject", "svg": "Description"}.get(fmt.lower())
    return {field: _encoded(stamp)} if field else {}


def figure_metadata(out, fmt: str, claim: Optional[Claim] = None) -> dict:
    """The ``savefig(metadata=...)`` argument for a figure written to ``out``.

    Args:
        out: the figure's path.
        fmt: its format: png, pdf or svg (others get no stamp).
        claim: the figure's ``Claim`` (``claim_output(out, "figure", ...)``), as landscape's writers
            pass it; None: this process's newest claim of ``out``, or none (a stamp without settings).

    Returns:
        {field: stamp}: the stamp of its claim, in a field that the format keeps; {} otherwise.
    """
    return _metadata(_stamp_of(out, claim), fmt)


def stamp_html(written, out, claim: Optional[Claim] = None) -> None:
    """Put the stamp of a figure's claim into an HTML page.

    Args:
        written: the page as written (its temporary file); rewritten in place.
        out: the output path it will become.
        claim: its ``Claim``; None: as for ``figure_metadata``.

    The stamp goes in a ``<meta name="landscape-output">`` tag at the start of the head.
    """
    _stamp_page(written, _stamp_of(out, claim))


def _stamp_page(written, stamp):
    written = Path(written)
    text = written.read_text(encoding="utf-8")
    tag = f'<meta name="landscape-output" content="{_encoded(stamp)}">'
    head = text.find("<head>")
    text = text[:head + 6] + tag + text[head + 6:] if head >= 0 else tag + text
    written.write_text(text, encoding="utf-8")


def _read_stamp(data: bytes) -> Optional[dict]:
    found = _STAMP.search(data)
    if found is None:
        return None
    try:
        stamp = json.loads(base64.urlsafe_b64decode(found.group(1)))
    except (ValueError, UnicodeDecodeError):
        return None
    return stamp if isinstance(stamp, dict) else None


# ----------------------------------------------------------------------------- recognizing files
def identify(path) -> Held:
    """What the existing file (or folder) ``path`` holds, from its content."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return Held("saved-model", WORDS["saved-model"])
        return Held("folder", "a folder")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        return Held(None, f"a file that cannot be read ({err.strerror or err})")
    if not head:
        return Held(None, "an empty file")
    for sniff in (_hdf5, _safetensors, _figure, _json, _journal, _csv):
        held = sniff(path, head)
        if held is not None:
            return held
    return Held(None, f"data of another program ({path.stat().st_size:,} bytes)")


def _hdf5(path, head):
    if not head.startswith(b"\x89HDF\r\n\x1a\n"):
        return None
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            fmt = handle.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            names = set(handle.keys())
    except (OSError, RuntimeError, ValueError):
        return Held(None, "a damaged HDF5 file")
    if fmt == "landscape-surface":
        return Held("surface", WORDS["surface"])
    if fmt == "landscape-directions":
        return Held("directions", WORDS["directions"])
    if "train_loss" in names and "xcoordinates" in names:
        return Held(None, "a loss surface not written by landscape (the original loss-landscape code's?)")
    if "xdirection" in names:
        return Held(None, "a direction file not written by landscape (the original loss-landscape code's?)")
    return Held(None, "an HDF5 file of another program")


def _safetensors(path, head):
    import struct

    if len(head) < 9 or head[8:9] != b"{":
        return None
    size = struct.unpack("<Q", head[:8])[0]
    if size > 100_000_000:
        return None
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    if str(meta.get("format", "")).startswith("landscape-fisher"):
        return Held("fisher", WORDS["fisher"])
    if "fingerprint" in meta and "batches_done" in meta:
        return Held("fisher-checkpoint", WORDS["fisher-checkpoint"])
    return Held(None, "tensors without a landscape Fisher header (model weights?)")


_FIGURES = ((b"\x89PNG", "a PNG image"), (b"%PDF", "a PDF document"), (b"<svg", "an SVG image"),
            (b"<?xml", "an SVG image"), (b"<html", "a web page"), (b"<!DOCTYPE html", "a web page"),
            (b"<!doctype html", "a web page"))


def _figure(path, head):
    words = next((w for magic, w in _FIGURES if head.lstrip().startswith(magic[:16])), None)
    if words is None:
        return None
    size = path.stat().st_size
    with open(path, "rb") as handle:
        stamp = _read_stamp(handle.read(min(size, 64 * 2**20)))
    if stamp is None:
        return Held(None, f"{words} not drawn by landscape")
    return Held("figure", WORDS["figure"], stamp=stamp)


_JSON_KINDS = {"landscape-hessian": "hessian-report", "landscape-schedule/1": "schedule",
               "landscape-critical-sharpness/1": "critical-sharpness"}


def _json(path, head):
    if not head.lstrip().startswith((b"{", b"[")):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # perhaps a journal: JSON lines
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt in _JSON_KINDS:
        return Held(_JSON_KINDS[fmt], WORDS[_JSON_KINDS[fmt]])
    return Held(None, "a JSON file of another program")


def _journal(path, head):
    for kind in ("surface", "hessian"):  # the journal format (``journal.MAGIC``), then the previous release's
        if head.startswith(f"landscape-journal/1 {kind} ".encode()):
            return Held(f"{kind}-journal", WORDS[f"{kind}-journal"])
    if head.startswith(b"landscape-surface-journal"):
        return Held("surface-journal", WORDS["surface-journal"])
    if head.startswith(b"{"):
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20)
        if b'"landscape-hessian-journal"' in first:
            return Held("hessian-journal", WORDS["hessian-journal"])
        return Held(None, "JSON lines of another program")
    return None


def _csv(path, head):
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader([handle.readline(1 << 16)]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if len(header) < 2 or not all(c.strip() for c in header):
        return None
    return Held("table", f"a table with the columns ({_listed(header)})", columns=header)
