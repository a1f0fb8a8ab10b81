"""The per-run CSV of a fine-tuning sweep, used as its journal: a sweep resumes from it.

Each finished run is appended as one whole CSV line (a single write, flushed and fsynced) before
the next run starts, so a killed sweep leaves every finished run on disk and at most one torn
line at the end: a last line without its newline.  Opening the journal drops that torn tail
(truncating the file to the last complete line), so appending continues on a clean line.  The
header must be the one this sweep writes; a file with other columns or a malformed complete line
is refused with ``SettingsMismatch`` (pass ``overwrite=True`` to start it afresh).  Each row read
back goes through the caller's ``check`` (the sweep's schema of a run: types, ranges, finite
values), so a hand-edited cell is one line naming the file, the line and the column.  One sweep at
a time may write a journal (its ``outputs.claim_output`` lock).
"""

import csv
import io
import math
import os
from pathlib import Path

from ..errors import SettingsMismatch, UsageError
from ..outputs import claim_output
from ..schema import Schema

__all__ = ["RunJournal", "parse_cell"]


def parse_cell(text: str):
    """A CSV cell as Python: '' -> None, an integer -> int, a number -> float, else the string."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _format_cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # repr: exact round trip
    return str(value)


def _line(values) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([_format_cell(v) for v in values])
    text = buffer.getvalue()
    if text.count("\n") != 1:  # a newline inside a cell would make a torn line undetectable
        raise UsageError(f"a run record cannot contain a line break: {text!r}")
    return text.encode("utf-8")


class RunJournal:
    """Append-only per-run CSV with a fixed header; ``rows`` are the complete runs read at open.

    Use as a context manager (or call ``close``).  ``append(row)`` writes one dict row (keys outside
    ``columns`` are ignored, missing ones are empty) durably before returning.  Cells read back are
    parsed with ``parse_cell``, except those of ``text_columns`` (hashes, names), which stay strings
    (None when empty).
    """

    def __init__(self, path, columns, overwrite=False, text_columns=(), check=None):
        self.path = Path(path)
        self.columns = list(columns)
        self.text_columns = set(text_columns)
        self.check = check  # (row, Schema, "line N") -> None, raising DamagedFile for a damaged row
        self.rows = []
        self.dropped_tail = False
        # One sweep at a time; a file that is not a table is refused here, a table of other columns
        # by ``_open`` (which says whose columns they are).
        self._claim = claim_output(self.path, "table", overwrite)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a+b")
        except OSError as err:
            self._claim.release()
            raise UsageError(f"cannot write the per-run CSV '{self.path}': {err.strerror or err}") from None
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite):
        self._handle.seek(0)
        data = b"" if overwrite else self._handle.read()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
        self.dropped_tail = end < len(data)
        complete = data[:end].decode("utf-8", errors="replace")
        lines = complete.splitlines()
        if lines:
            header = next(csv.reader([lines[0]]))
            if header != self.columns:
                raise SettingsMismatch(
                    f"'{self.path}' has the columns of another sweep ({', '.join(header[:6])}"
                    f"{', ...' if len(header) > 6 else ''}), not this one's")
            for number, record in enumerate(csv.reader(lines[1:]), start=2):
                if len(record) != len(self.columns):
                    raise SettingsMismatch(f"line {number} of '{self.path}' has {len(record)} fields, not "
                                           f"{len(self.columns)}: not a per-run CSV of this sweep")
                row = self._parse(record)
                if self.check is not None:
                    self.check(row, Schema("per-run CSV", self.path, "correct or delete that line, or rerun with "
                                           "--overwrite"), f"line {number}")
                self.rows.append(row)
        self._write(lambda: self._reset(end if lines else 0, not lines))

    def _reset(self, end, write_header):
        self._handle.truncate(end)
        self._handle.seek(0, os.SEEK_END)
        if write_header:
            self._handle.write(_line(self.columns))

    def _write(self, action):
        try:
            action()
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as err:
            raise UsageError(f"cannot write the per-run CSV '{self.path}': {err.strerror or err}") from None

    def append(self, row: dict):
        """Write one run as one CSV line, flushed and fsynced, and add it to ``rows``."""
        line = _line([row.get(c) for c in self.columns])
        self._write(lambda: self._handle.write(line))
        self.rows.append(self._parse([_format_cell(row.get(c)) for c in self.columns]))

    def _parse(self, record):
        return {c: (v or None) if c in self.text_columns else parse_cell(v) for c, v in zip(self.columns, record)}

    def close(self):
        """Close the CSV file and release its claim."""
        if not self._handle.closed:
            self._handle.close()
        self._claim.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
