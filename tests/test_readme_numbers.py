"""The README's numbers that a test can recompute, read from the README text itself (issue 30, item 9):
the size table's embedded-model column (``benchmarks/readme_numbers.py``, at the README's sample),
the stability table and the sharpness numbers of the demo's figures (from the committed CSV files
the demo wrote), and the wording of the test-suite times (from a pytest summary line).
"""

import csv
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PROSE = " ".join(README.split())  # line breaks of the prose as spaces


def _script():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "benchmarks" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NUMBERS = _script()


def _table(header_start):
    """The README table whose header row starts with ``header_start``: a list of rows of cells."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_readme_names_the_script_of_its_numbers():
    assert "python benchmarks/readme_numbers.py" in README
    assert "benchmarks/file_sizes.sh" not in README  # the old script measured masks of a 1-sample Fisher


@pytest.mark.slow  # a Fisher of 16 x 128 tokens, 4 direction files and a 21 x 21 surface on the embedded model
def test_the_size_table_is_what_the_readme_pipeline_writes_on_the_embedded_model(tmp_path):
    sizes = NUMBERS.measure_sizes(None, tmp_path)
    table = {row[0]: row[1] for row in _table("| file | embedded model")}
    assert table == {label: NUMBERS.human_size(size) for label, size in sizes.items()}


def test_sizes_are_written_as_the_readme_writes_them():
    assert NUMBERS.human_size(7_540_000) == "7.2 MiB" and NUMBERS.human_size(16_200) == "15.8 KiB"


def test_a_pytest_summary_is_worded_as_in_the_readme():
    log = "...\n========= 741 passed, 1 skipped, 69 deselected, 3 warnings in 121.40s (0:02:01) =========\n"
    summary = NUMBERS.pytest_summary(log)
    assert NUMBERS.describe_tests(summary) == "742 tests in 2 min 1 s (741 passed, 1 skipped, 69 deselected)"
    with pytest.raises(ValueError, match="no pytest summary"):
        NUMBERS.pytest_summary("collected 3 items\n")


def test_the_stability_table_is_the_demo_csv():
    with open(ROOT / "figures" / "stability.csv") as f:
        rows = {row["fraction"]: row for row in csv.DictReader(f)}
    columns = ["samples", "top5_overlap", "top1_overlap", "top0.5_overlap", "top0.25_overlap", "spearman", "rel_l1"]
    table = _table("| fraction | samples |")
    assert len(table) == len(rows) - 1  # every sub-sample; the reference row (fraction 1) is the table's caption
    for cells in table:
        row = rows[cells[0]]
        expected = [row["samples"]] + [f"{float(row[c]):.3f}" for c in columns[1:]]
        assert cells[1:] == expected, cells


def _sharpness(name):
    with open(ROOT / "figures" / f"{name}.sharpness.csv") as f:
        return {row["label"]: row for row in csv.DictReader(f)}


def _near(text, value, digits):
    """``text`` (a README number) is ``value`` rounded to ``digits`` significant digits."""
    return text == f"{float(f'{value:.{digits}g}'):.{len(text.split('.')[-1])}f}"


def test_the_sharpness_numbers_are_the_demo_csv():
    fig1 = _sharpness("compare_all_top_bottom")
    top, every, bottom = fig1["top 50% by Fisher"], fig1["all parameters"], fig1["bottom 50% by Fisher"]
    quoted = re.search(r"rise (\S+) vs (\S+), curvature (\S+) vs (\S+)\)", PROSE).groups()
    assert quoted == tuple(f"{float(v):.{d}f}" for v, d in
                           [(top["rise"], 3), (every["rise"], 3), (top["curvature"], 2), (every["curvature"], 2)])
    ratio = re.search(r"almost flat \(rise (\S+), (\d+)× less\)", PROSE).groups()
    assert _near(ratio[0], float(bottom["rise"]), 2) and int(ratio[1]) == round(float(every["rise"]) /
                                                                                 float(bottom["rise"]))
    assert f"{float(every['loss_origin']):.3f} nats" in PROSE
    sweep, controls = _sharpness("topk_sweep"), _sharpness("random_controls")
    rise = {**{k: float(v["rise"]) for k, v in sweep.items()}, **{k: float(v["rise"]) for k, v in controls.items()}}
    quoted = re.search(r"full rise \((\S+) vs (\S+) for the top 80%\); even the top 0.25% give more than half of "
                       r"it \((\S+)\)", PROSE).groups()
    top5, top80, top025 = (next(v for k, v in rise.items() if k.startswith(f"top {p}%")) for p in ("5", "80", "0.25"))
    assert quoted == (f"{top5:.3f}", f"{top80:.3f}", f"{top025:.3f}")
    random5, random025 = (next(v for k, v in rise.items() if k.startswith(f"random {p}%")) for p in ("5", "0.25"))
    quoted = re.search(r"random 5% rises (\S+) \((\d+)× less than top 5%\) and random 0.25% (\S+) \((\d+)× less\)",
                       PROSE).groups()
    assert _near(quoted[0], random5, 2) and int(quoted[1]) == round(top5 / random5)
    assert _near(quoted[2], random025, 2) and abs(int(quoted[3]) - top025 / random025) <= 0.05 * int(quoted[3])
