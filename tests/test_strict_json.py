"""Every JSON the tool writes is strict JSON (issue 28): no bare NaN or Infinity, which strict parsers
(JavaScript, jq, Go) refuse; a non-finite number is written as null (docs/file-formats.md).

Each writer is given a NaN or an infinity where its data can hold one and its text is read back with
a parser that refuses NaN; a real ``hessian --trace 1`` report (its standard error with one probe
is undefined) is read the same way, and by the tool again.
"""

import ast
import base64
import json
import math
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli_in_process as _cli

from landscape import outputs
from landscape.files import finite_or_null, json_text

PACKAGE = Path(__file__).resolve().parents[1] / "landscape"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict(text):
    """``text`` parsed as strict JSON (NaN, Infinity and -Infinity refused)."""
    return json.loads(text, parse_constant=_refuse)


def test_json_is_written_by_one_helper_only():
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "files.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("dump", "dumps")
                    and isinstance(node.value, ast.Name) and node.value.id == "json"):
                calls.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not calls, f"json.dump(s) outside landscape.files.json_text: {calls}"


def test_the_helper_writes_null_for_non_finite_numbers_and_finite_ones_as_json_does():
    value = {"a": [1.5, math.nan, (math.inf, -math.inf)], "b": np.float32("nan"), "c": np.float64(2.0), "d": 3}
    assert strict(json_text(value)) == {"a": [1.5, None, [None, None]], "b": None, "c": 2.0, "d": 3}
    finite = {"x": [0.1, 1e-300, -2.5], "k": "text", "n": None, "t": True}
    assert json_text(finite, sort_keys=True, indent=1) == json.dumps(finite, sort_keys=True, indent=1)
    assert finite_or_null([True, 0, math.nan]) == [True, 0, None]


def test_a_trace_report_of_one_probe_is_strict_json_and_read_back(tiny_bert_dir, tiny_corpus_file, tmp_path, capfd):
    out = tmp_path / "H.json"
    args = ["hessian", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16,
            "--trace", 1, "--quiet", "--out", out]
    code, _, err = _cli(capfd, *args)
    assert code == 0, err
    report = strict(out.read_text())
    assert report["trace"]["samples"] == 1 and report["trace"]["stderr"] is None
    code, printed, err = _cli(capfd, *args)  # complete: read back and summarized, the null as nan
    assert code == 0, err
    assert "trace:" in printed and "± nan" in printed, printed
    from landscape.curvature.report import load_report, report_numbers

    assert math.isnan(report_numbers(load_report(out))["trace_stderr"])


def test_every_writer_writes_strict_json_given_non_finite_numbers(tiny_bert, tmp_path):
    from landscape.curvature.checkpoint import _Journal
    from landscape.curvature.report import save_report
    from landscape.fisher.file import _header
    from landscape.guided import schedule as sched
    from landscape.guided.sweep import _remember_settings, _settings_file
    from landscape.surface.file import SurfaceFile, journal_path

    bad = {"radius": math.nan, "limit": math.inf}
    # the Hessian report and its checkpoint journal
    save_report(tmp_path / "H.json", {"format": "landscape-hessian", "loss": 1.0, "settings": bad,
                                      "trace": {"mean": 2.0, "stderr": math.nan, "samples": 1}})
    assert strict((tmp_path / "H.json").read_text())["trace"]["stderr"] is None
    journal = _Journal(tmp_path / "H.trace.ckpt", dict(bad))
    journal.add(0, value=math.nan)
    lines = (tmp_path / "H.trace.ckpt").read_text().splitlines()  # each line: JSON, then its CRC-32
    assert strict(lines[1].rsplit(" ", 1)[0])["value"] is None
    # a schedule with an unscored site
    schedule = sched.uniform(tiny_bert.model, 0.1)
    schedule.sites[0].score = math.nan
    sched.save_schedule(schedule, tmp_path / "s.json")
    strict((tmp_path / "s.json").read_text())
    # a sweep's settings file
    _remember_settings(tmp_path / "runs.csv", dict(bad, lr=1e-3), {"none": {"p": math.inf}})
    assert strict(_settings_file(tmp_path / "runs.csv").read_text())
    # a surface's journal header, HDF5 attributes (identity, checksums)
    surface = SurfaceFile(tmp_path / "S.h5", np.linspace(-1, 1, 3), None, dict(bad), {})
    header = journal_path(tmp_path / "S.h5").read_bytes().split(b"\n", 1)[0].decode()
    assert strict(header.split(" ", 2)[2].rsplit(" ", 1)[0]) == {"limit": None, "radius": None}
    surface.record([(0, 1.0, 0.5)])
    surface.close(complete=False)
    with h5py.File(tmp_path / "S.h5", "r") as handle:
        strict(handle.attrs["checksums"])
    # a Fisher file's safetensors header
    raw = _header({"w": (2, 3)}, {"format": "landscape-fisher"})
    strict(raw[8:8 + struct.unpack("<Q", raw[:8])[0]].decode())
    # a figure's stamp
    stamp = outputs._encoded({"kind": "figure", "settings": bad})
    assert strict(base64.urlsafe_b64decode(stamp[len(outputs.STAMP_TAG):-1]))["settings"] == {"radius": None,
                                                                                           "limit": None}


def test_files_written_before_with_nan_are_still_read(tmp_path):
    from landscape.curvature.report import load_report

    report = {"format": "landscape-hessian", "settings": {}, "provenance": {"n_coordinates": 10}, "loss": 1.0,
              "trace": {"mean": 2.0, "stderr": math.nan, "samples": 1}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report, allow_nan=True))  # as the tool wrote them before
    assert "NaN" in path.read_text()
    assert math.isnan(load_report(path)["trace"]["stderr"])
