"""docs/faults.md promises, row by row, that a test shows each fault handled: the tests must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_row_of_the_faults_table_names_an_existing_test():
    text = (ROOT / "docs" / "faults.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 20
    missing = [f"{file}::{name}" for file, name in named
               if not (ROOT / "tests" / file).exists()
               or not re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.M)]
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"


def test_every_table_row_names_a_test():
    rows = [line for line in (ROOT / "docs" / "faults.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| fault") and not line.startswith("|---")]
    assert rows
    assert all("::test_" in row for row in rows), [row for row in rows if "::test_" not in row]
