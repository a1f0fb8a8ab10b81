"""Checkpoints of long trace and spectrum runs: a JSON-lines journal of finished probes/runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from ..errors import UsageError
from ..files import json_text
from ..identity import differences, refuse_changed_resume
from ..schema import Schema

JOURNAL_FORMAT = "landscape-hessian-journal"


class _Journal:
    """A JSON-lines journal: a header line with the settings, then one record per finished unit.

    A record is used only when its line is complete, so a kill mid-write loses that unit alone.
    A journal whose header differs from this run's settings is refused (UsageError).  Its schema:
    UTF-8 JSON lines, a header object with ``format`` = ``JOURNAL_FORMAT``, then objects with an
    index ``i`` >= 0 and the fields ``check`` (a function of the record and a ``Schema``, given by
    the estimator that owns the journal) requires; a complete line that breaks it is damage, refused
    in one line (``DamagedFile``) naming the line, never skipped or half-read.
    """

    def __init__(self, path, identity: dict, check: Optional[Callable[[dict, Schema, str], None]] = None):
        self.path, self.identity, self.check = Path(path), identity, check
        self.records: dict[int, dict] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as handle:
                handle.write(json_text({"format": JOURNAL_FORMAT, **identity}, sort_keys=True) + "\n")

    def _load(self):
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        schema = Schema("checkpoint", self.path, "delete it to start over, or choose another path")
        try:
            lines = complete.decode("utf-8").split("\n")[:-1]
            header = json.loads(lines[0]) if lines else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict) or header.pop("format", None) != JOURNAL_FORMAT:
            schema.fail("is not a Hessian checkpoint (no header line of one)")
        found = differences(header, self.identity)
        if found:
            refuse_changed_resume(self.path, header, self.identity, "delete it or choose another path", UsageError)
            key = found[0]
            raise UsageError(f"checkpoint '{self.path}' was written with other settings ({key}={header.get(key)!r}, "
                             f"this run has {self.identity.get(key)!r}); delete it or choose another path")
        for number, line in enumerate(lines[1:], start=2):
            self._add_record(line, schema, f"line {number}")
        if len(complete) != len(data):  # drop a line cut short by a kill, so appends start clean
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))

    def _add_record(self, line: str, schema: Schema, where: str):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            schema.fail(f"is damaged: {where} is not JSON")
        schema.mapping(record, where)
        index = schema.integer(schema.field(record, "i", where), f"{where}: i", minimum=0)
        if self.check is not None:
            self.check(record, schema, where)
        self.records[index] = record

    def add(self, index: int, **values):
        record = {"i": int(index), **values}
        self.records[int(index)] = record
        with open(self.path, "a") as handle:
            handle.write(json_text(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _identity(op, method: str, seed: int, **settings) -> dict:
    """Everything that changes a finished probe's or run's numbers (not how many there are).

    The operator's ``identity()`` (for the Hessian: the weights and the sample by content, the
    coordinates, the objective), the method, the seed and the method's settings.
    """
    return {"method": method, **op.identity(), "seed": int(seed), **settings}
