"""The one append-only journal of finished work: surface points, Hessian probes and runs, sweep runs.

A stage that can be killed keeps a journal beside its output and resumes from it (docs/identity.md,
"Journals").  Format ``landscape-journal/1``, UTF-8 lines, each ending with a newline and with the
CRC-32 of the rest of the line (8 hex digits) after its last space:

* the header: ``landscape-journal/1 <kind> <identity JSON> <crc>``: what the numbers were computed
  from, compared on resume with this run's through ``identity.differences`` (one refusal naming
  the fields that differ);
* then one record per finished unit: ``<JSON> <crc>``.

Each append is one write, flushed and fsynced before it returns.  A kill mid-write leaves a last
line without its newline, and a crash can leave a last line whose checksum fails: either is
dropped (cut off before anything is appended).  A damaged line followed by an intact one is not
what a crash leaves: it is refused in one line (``DamagedFile``), never skipped or half-read.

The per-run CSV of a sweep is a table users read: it keeps its CSV lines (``CsvLines``: the header
of its columns, then one row per run, each row checked by the sweep's schema instead of a CRC),
and the same class appends, cuts and refuses it.  Journals of the previous release (a surface's
``landscape-surface-journal/2``, the Hessian's JSON lines) are read by the stage's ``legacy``
reader and rewritten in this format before anything is appended.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from .errors import SettingsMismatch, UsageError
from .files import json_text
from .identity import differences, refuse_changed
from .schema import Schema

MAGIC = "landscape-journal/1"

# (identity, [record or None for a damaged line], byte offset where complete lines end)
Legacy = Callable[[bytes], Optional[Tuple[dict, List[object]]]]
Check = Callable[[object, Schema, str], None]
Refuse = Callable[[Path, dict, dict], None]


def crc(body: bytes) -> bytes:
    """The 8 hex digits of the CRC-32 of ``body``, as every checksummed line ends."""
    return f"{zlib.crc32(body):08x}".encode()


def checked_line(text: str) -> bytes:
    """``text`` and its CRC-32 as one journal line (with its newline)."""
    if "\n" in text:  # a newline inside a record would make a torn line undetectable
        raise UsageError(f"a journal record cannot contain a line break: {text!r}")
    body = text.encode("utf-8")
    return body + b" " + crc(body) + b"\n"


def unchecked(line: bytes) -> Optional[str]:
    """The text of a checksummed line (without its newline), or None when its CRC-32 fails."""
    body, space, digits = line.rpartition(b" ")
    if not space or digits != crc(body):
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


class JsonLines:
    """The journal format: a checksummed header naming ``kind`` and the identity, then JSON records."""

    def __init__(self, kind: str):
        self.kind = kind

    def header(self, identity: dict) -> bytes:
        """The header line of a journal of ``identity``."""
        return checked_line(f"{MAGIC} {self.kind} {json_text(identity, sort_keys=True)}")

    def read_header(self, line: bytes) -> Optional[dict]:
        """The identity in a header line (without its newline); None: not a header of this kind."""
        text = unchecked(line)
        prefix = f"{MAGIC} {self.kind} "
        if text is None or not text.startswith(prefix):
            return None
        try:
            identity = json.loads(text[len(prefix):])
        except json.JSONDecodeError:
            return None
        return identity if isinstance(identity, dict) else None

    def torn_header(self, data: bytes) -> bool:
        """Whether ``data`` (no whole line) can be the start of a header, cut by a kill."""
        start = f"{MAGIC} {self.kind} ".encode()
        return data.startswith(start) or start.startswith(data)

    def record(self, record) -> bytes:
        """The line of one record (a JSON-ready value)."""
        return checked_line(json_text(record, sort_keys=True))

    def read_record(self, line: bytes):
        """The record of an intact line; None when damaged (its CRC fails)."""
        text = unchecked(line)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # a CRC that matches over text that is not JSON: written so by hand
            return None


def parse_cell(text: str):
    """A CSV cell as Python: '' -> None, an integer -> int, a number -> float, else the string."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not isinstance(value, bool):
        return repr(value) if math.isfinite(value) else str(value)  # repr: an exact round trip
    return str(value)


class CsvLines:
    """A sweep's per-run CSV: the header of its columns, then one row per run (dicts).

    Cells read back go through ``parse_cell``, but those of ``text_columns`` (hashes, names), which
    stay strings (None when empty).  Rows carry no CRC (the table is for people and spreadsheets):
    a row with another number of fields is damaged, and the sweep's schema checks every cell.
    """

    def __init__(self, columns: Sequence[str], text_columns: Sequence[str] = ()):
        self.columns, self.text_columns = list(columns), set(text_columns)

    @staticmethod
    def _line(values) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        text = buffer.getvalue()
        if text.count("\n") != 1:  # a newline inside a cell would make a torn line undetectable
            raise UsageError(f"a run record cannot contain a line break: {text!r}")
        return text.encode("utf-8")

    def header(self, identity: dict) -> bytes:
        """The header row: the columns (``identity["columns"]``)."""
        return self._line(identity["columns"])

    def read_header(self, line: bytes) -> Optional[dict]:
        """{"columns": the header row's cells}."""
        return {"columns": next(csv.reader([line.decode("utf-8", errors="replace")]), [])}

    @staticmethod
    def torn_header(data: bytes) -> bool:
        """Always: a table without one whole line holds no run."""
        return True

    def record(self, row: dict) -> bytes:
        """The CSV line of a row (keys outside the columns are left out, missing ones are empty)."""
        return self._line([_format_cell(row.get(c)) for c in self.columns])

    def read_record(self, line: bytes):
        """The row of a line; None when it has another number of fields (damaged)."""
        cells = next(csv.reader([line.decode("utf-8", errors="replace")]), [])
        if len(cells) != len(self.columns):
            return None
        return {c: (v or None) if c in self.text_columns else parse_cell(v) for c, v in zip(self.columns, cells)}


class Journal:
    """An append-only journal at ``path`` of the run whose identity is ``identity`` (module docstring).

    Opening it reads what a previous run left: ``records`` (the intact ones, in order) and
    ``dropped_tail`` (whether a torn or corrupted last line was cut off); a missing or empty file
    is started with this run's header.  ``append`` adds records durably.  The file is opened per
    append, so nothing needs closing.

    Args:
        path: the journal file.
        kind: what it journals ("surface", "hessian"), in its header: another kind is refused.
        identity: this run's identity (a JSON-ready dict); a stored one that differs is refused.
        what: the file in words for refusals ("surface journal", "checkpoint").
        remedy: what to do about a refusal ("delete it to start over").
        lines: the line format (``JsonLines(kind)`` unless given, ``CsvLines`` for a sweep).
        check: ``check(record, schema, "line N")`` raising ``DamagedFile`` for a record that breaks
            the stage's schema.
        refuse: ``refuse(path, stored, current)`` raising the stage's refusal when the identities
            differ (None: ``identity.refuse_changed`` with ``error``).
        legacy: reads a file of the previous release: (identity, records, None for damaged lines)
            or None when it is not one; such a file is rewritten in this format.
        fresh: start afresh, whatever the file holds.
        error: the class of the refusal of other settings.
        called: the file in words when it is not a journal of ``kind`` ("Hessian checkpoint").
    """

    def __init__(self, path, kind: str, identity: dict, *, what: str, remedy: str, lines=None,
                 check: Optional[Check] = None, refuse: Optional[Refuse] = None, legacy: Optional[Legacy] = None,
                 fresh: bool = False, error=SettingsMismatch, called: Optional[str] = None):
        self.path, self.kind, self.identity = Path(path), kind, identity
        self.called = called or f"{kind} journal"
        self.lines = lines or JsonLines(kind)
        self.schema = Schema(what, self.path, remedy)
        self.records: List[object] = []
        self.dropped_tail = False
        self.created = fresh or not self.path.exists() or self.path.stat().st_size == 0
        try:
            data = b"" if self.created else self.path.read_bytes()
        except OSError as err:
            raise UsageError(f"cannot read {what} '{self.path}': {err.strerror or err}") from None
        self._header = identity  # what a rewritten file's header holds: a legacy file's own identity
        complete = self._read(data, check, refuse or (lambda p, s, c: refuse_changed(p, s, c, remedy, error)), legacy)
        if complete is None:
            self._rewrite()
        elif complete < len(data):
            self._write(lambda handle: handle.truncate(complete), "r+b")

    def _read(self, data: bytes, check, refuse, legacy) -> Optional[int]:
        """Fill ``records`` from ``data``; the offset where intact lines end, None: rewrite it all."""
        lines = data.split(b"\n")
        if len(lines) < 2 and self.lines.torn_header(data):  # nothing, or a header cut short by a kill
            return None
        stored = self.lines.read_header(lines[0])
        if stored is None and legacy is not None:
            old = legacy(data)
            if old is not None:
                stored, parsed = old
                refuse_if_changed(self.path, stored, self.identity, refuse)
                self._keep(parsed, check, first=2)
                self._header = stored  # as recorded (a version-1 fingerprint stays one)
                return None
        if stored is None:
            self.schema.fail(f"is not a {self.called} (no header line of one)")
        refuse_if_changed(self.path, stored, self.identity, refuse)
        kept = self._keep([self.lines.read_record(line) for line in lines[1:-1]], check, first=2)
        self.dropped_tail = self.dropped_tail or bool(lines[-1])
        return len(lines[0]) + 1 + sum(len(line) + 1 for line in lines[1:1 + kept])

    def _keep(self, parsed: List[object], check, first: int) -> int:
        """Keep the intact records of ``parsed`` (lines numbered from ``first``); how many are kept."""
        for number, record in enumerate(parsed, start=first):
            if record is None:
                if number - first + 1 < len(parsed):
                    self.schema.fail(f"is damaged: line {number} is not an intact record, and records follow it")
                self.dropped_tail = True
                return number - first
            if check is not None:
                check(record, self.schema, f"line {number}")
            self.records.append(record)
        return len(parsed)

    def _rewrite(self) -> None:
        """Write the header and the records kept: a new or legacy journal, in this format."""
        data = self.lines.header(self._header) + b"".join(self.lines.record(r) for r in self.records)
        temporary = self.path.with_name(f".{self.path.name}.rewrite")
        self._write(lambda handle: handle.write(data), "wb", temporary, lambda: os.replace(temporary, self.path))

    def append(self, *records) -> None:
        """Add ``records`` in one write, flushed and fsynced before returning (UsageError when it fails)."""
        data = b"".join(self.lines.record(r) for r in records)
        self._write(lambda handle: handle.write(data), "ab")
        self.records.extend(self.lines.read_record(self.lines.record(r)) for r in records)

    def _write(self, action, mode: str, path=None, then=None) -> None:
        try:
            if mode == "wb":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(path or self.path, mode) as handle:
                action(handle)
                handle.flush()
                os.fsync(handle.fileno())
            if then is not None:
                then()
        except OSError as err:
            raise UsageError(f"cannot write the journal '{self.path}' ({err.strerror or err}); the records it "
                             "holds are kept: free space and rerun to resume") from None


def refuse_if_changed(path, stored: dict, current: dict, refuse: Refuse) -> None:
    """Call ``refuse`` when ``identity.differences`` finds a field that differs."""
    if differences(stored, current):
        refuse(Path(path), stored, current)
