"""Checkpoints of long trace and spectrum runs: a ``journal.Journal`` of finished probes/runs.

Each record is ``{"i": index, ...}`` with the fields the estimator that owns the journal checks.
Journals of the previous release (UTF-8 JSON lines: a header object with ``format`` =
``JOURNAL_FORMAT`` and the settings, then one object per unit) are read by ``legacy_journal``
and rewritten in the journal format.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

from ..errors import UsageError
from ..journal import Journal
from ..schema import Schema

JOURNAL_FORMAT = "landscape-hessian-journal"  # the previous release's header
_REMEDY = "delete it or choose another path"


def legacy_journal(data: bytes):
    """(settings, records, None for a line that is not JSON) of a journal of the previous release, else None.

    A torn last line (no newline) is left out, as the journal leaves it.
    """
    lines = data.split(b"\n")[:-1]
    try:
        header = json.loads(lines[0].decode("utf-8")) if lines else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict) or header.pop("format", None) != JOURNAL_FORMAT:
        return None
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            records.append(None)
    return header, records


class _Journal:
    """The journal of one estimator's run: ``records`` {index: record}, ``add(index, **values)``.

    A journal whose settings differ from this run's is refused (UsageError naming the fields); a
    record is ``{"i": index >= 0, ...}`` with the fields ``check`` (a function of the record, a
    ``Schema`` and where it is, given by the estimator) requires: a record that breaks it is
    refused in one line (``DamagedFile``) naming the line, never skipped or half-read.
    """

    def __init__(self, path, identity: dict, check: Optional[Callable[[dict, Schema, str], None]] = None):
        def check_record(record, schema: Schema, where: str) -> None:
            schema.mapping(record, where)
            schema.integer(schema.field(record, "i", where), f"{where}: i", minimum=0)
            if check is not None:
                check(record, schema, where)

        self.journal = Journal(path, "hessian", identity, what="checkpoint", remedy=_REMEDY, check=check_record,
                               legacy=legacy_journal, error=UsageError, called="Hessian checkpoint")
        self.path = self.journal.path
        self.records: dict[int, dict] = {int(r["i"]): r for r in self.journal.records}

    def add(self, index: int, **values) -> None:
        """Journal one finished unit (flushed and fsynced)."""
        record = {"i": int(index), **values}
        self.journal.append(record)
        self.records[int(index)] = record

    def say_resumed(self, done: int, total: int, units: str, progress: bool) -> None:
        """One line on stderr when this run starts from ``done`` finished units (with ``progress``).

        Said once, before the bar: where this run's numbers start, as Fisher and surface say it.
        """
        if progress and done:
            print(f"resuming from '{self.path}': {done} of {total} {units} done", file=sys.stderr, flush=True)


def _identity(op, method: str, seed: int, **settings) -> dict:
    """Everything that changes a finished probe's or run's numbers (not how many there are).

    The operator's ``identity()`` (for the Hessian: the weights and the sample by content, the
    coordinates, the objective), the method, the seed and the method's settings.
    """
    return {"method": method, **op.identity(), "seed": int(seed), **settings}
