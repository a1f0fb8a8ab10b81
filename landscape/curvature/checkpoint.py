"""Checkpoints of long trace and spectrum runs: a JSON-lines journal of finished probes/runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from ..identity import MODEL_KEY, SAMPLE_KEY, parameters_fingerprint, refuse_changed_resume, sample_fingerprint
from .operator import HessianOperator

JOURNAL_FORMAT = "landscape-hessian-journal"


class _Journal:
    """A JSON-lines journal: a header line with the settings, then one record per finished unit.

    A record is used only when its line is complete, so a kill mid-write loses that unit alone.
    A journal whose header differs from this run's settings is refused (UsageError).
    """

    def __init__(self, path, identity: dict):
        self.path, self.identity = Path(path), identity
        self.records: dict[int, dict] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as handle:
                handle.write(json.dumps({"format": JOURNAL_FORMAT, **identity}, sort_keys=True) + "\n")

    def _load(self):
        text = self.path.read_text()
        complete = text[: text.rfind("\n") + 1]
        if len(complete) != len(text):  # drop a line cut short by a kill, so appends start clean
            with open(self.path, "r+") as handle:
                handle.truncate(len(complete.encode()))
        lines = complete.split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.pop("format", None) != JOURNAL_FORMAT:
            raise UsageError(f"'{self.path}' is not a Hessian checkpoint; delete it or choose another path")
        if header != json.loads(json.dumps(self.identity)):
            refuse_changed_resume(self.path, header, self.identity, "delete it or choose another path", UsageError)
            key = next(k for k in sorted(set(header) | set(self.identity)) if header.get(k) != self.identity.get(k))
            raise UsageError(f"checkpoint '{self.path}' was written with other settings ({key}={header.get(key)!r}, "
                             f"this run has {self.identity.get(key)!r}); delete it or choose another path")
        for line in lines[1:]:
            try:
                record = json.loads(line)
                self.records[int(record["i"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue

    def add(self, index: int, **values):
        record = {"i": int(index), **values}
        self.records[int(index)] = record
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _identity(op: HessianOperator, method: str, seed: int, **settings) -> dict:
    """Everything that changes a finished probe's or run's numbers (not how many there are): the
    model's weights and the sample's tokens by content (``identity``), the coordinates, the seed."""
    return {"method": method, "model": type(op.model).__name__, MODEL_KEY: parameters_fingerprint(op.model),
            SAMPLE_KEY: sample_fingerprint(op.batches), "coordinates": op.space.fingerprint(), "dim": op.dim,
            "objective": op.kind, "seed": int(seed), **settings}
