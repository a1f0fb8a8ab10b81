"""What every stage call returns: ``StageResult``, which each stage's result extends."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from .settings import Settings


@dataclass
class StageResult:
    """What a stage wrote, in one shape for every stage.

    Attributes:
        path: the stage's main output file.
        settings: the settings it ran with (``landscape.settings``).
        computed: items computed by this call (samples, grid points, probes, runs); 0 when the
            output was already complete and was only read.
        total: items the output holds.
        fingerprints: the model's and the sample's fingerprints the output records
            (``identity``), by name; empty where the stage records none.
    """

    path: Path
    settings: Settings
    computed: int
    total: int
    fingerprints: Dict[str, str]
