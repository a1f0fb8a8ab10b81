"""Files the previous release left mid-run resume with this one (issue 27, item 2).

tests/data/legacy holds what commit 578638c wrote (its ``make.py``, run on that commit): a surface
and its journal stopped after 6 of 20 points, a Hessian trace journal of 2 probes, a sweep's per-run
CSV of 1 run, a Fisher checkpoint of 2 of 4 batches.  Each resumes to the numbers of a fresh run, its
journal rewritten in this release's format, and a changed setting is refused in one line naming it
(under the settings' name where the file spelled it otherwise).
"""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_in_process as _cli
from conftest import one_line as _one_line

from landscape.errors import UsageError
from landscape.journal import MAGIC

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


@pytest.fixture(scope="module")
def make():
    """tests/data/legacy/make.py, its inputs made (``make.INPUTS``)."""
    spec = importlib.util.spec_from_file_location("legacy_make", LEGACY / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.inputs()
    return module


@pytest.fixture
def there(make, monkeypatch):
    """Run in ``make.INPUTS``, where the files' relative names (model, corpus.jsonl, ...) point."""
    monkeypatch.chdir(make.INPUTS)
    return make


def _copies(folder: Path, *names) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copyfile(LEGACY / name, folder / name)
    return folder


def _with(args, flag, value):
    """``args`` with ``flag`` set to ``value``."""
    if flag not in args:
        return [*args, flag, value]
    at = args.index(flag) + 1
    return [*args[:at], value, *args[at + 1:]]


def _fields(path):
    with h5py.File(path, "r") as handle:
        return [np.asarray(handle[name][()]) for name in ("train_loss", "train_acc")]


def test_a_surface_and_journal_of_the_previous_release_resume_to_a_fresh_surface(there, tmp_path, capfd):
    fresh = tmp_path / "fresh.h5"
    assert _cli(capfd, *there.SURFACE, "--out", fresh)[0] == 0
    for name, files in (("both", ("surface.h5", "surface.h5.journal")), ("journal", ("surface.h5.journal",))):
        out = _copies(tmp_path / name, *files) / "surface.h5"
        journal = out.parent / "surface.h5.journal"
        # Another grid, another precision, another sample seed (stored as 'corpus_seed'): refused, naming it.
        for flag, value, words in (("--x", "-1:1:6", "a different grid"), ("--dtype", "tf32", "precision='float32'"),
                                   ("--seed", "1", "seed was 0, now 1")):
            _one_line(*_cli(capfd, *_with(there.SURFACE, flag, value), "--out", out)[::2], str(out), words)
            assert journal.read_bytes() == (LEGACY / "surface.h5.journal").read_bytes()  # untouched
        code, stdout, err = _cli(capfd, *there.SURFACE, "--out", out)
        assert code == 0, err
        assert f"{20 - there.SURFACE_STOP} point(s) computed now" in stdout
        for mine, theirs in zip(_fields(out), _fields(fresh)):
            np.testing.assert_array_equal(mine, theirs)  # bit for bit
        assert not journal.exists()


def test_a_surface_journal_of_the_previous_release_is_rewritten_in_the_journal_format(there, tmp_path):
    from landscape.surface.file import SurfaceFile

    out = _copies(tmp_path / "s", "surface.h5.journal") / "surface.h5"
    with h5py.File(LEGACY / "surface.h5", "r") as handle:
        identity = json.loads(handle.attrs["identity"])
        xs, ys = handle["xcoordinates"][()], handle["ycoordinates"][()]
    surface = SurfaceFile(out, xs, ys, identity, {})
    assert len(surface.missing()) == 20 - there.SURFACE_STOP
    surface.close(complete=False)
    lines = (out.parent / "surface.h5.journal").read_bytes().split(b"\n")
    assert lines[0].startswith(f"{MAGIC} surface ".encode()) and len(lines) == there.SURFACE_STOP + 2


def test_a_hessian_trace_journal_of_the_previous_release_resumes_to_a_fresh_trace(there, tmp_path):
    from landscape import curvature

    journal = _copies(tmp_path / "h", "trace.ckpt") / "trace.ckpt"
    op = there.trace_operator()
    with pytest.raises(UsageError, match="seed 0 then, 1 now") as refused:
        curvature.trace(op, samples=4, seed=1, checkpoint=journal)
    assert str(journal) in str(refused.value)
    assert journal.read_bytes() == (LEGACY / "trace.ckpt").read_bytes()
    resumed = curvature.trace(op, samples=4, checkpoint=journal)
    # The journal's probes were summed as that release summed them (float32 shares, added by autograd);
    # this one dots each share in float64 (docs/curvature.md, "Memory"): the same numbers to rounding
    # (6e-10 relative measured), where a wrong probe, seed or count is off in the first digits.
    assert resumed == pytest.approx(curvature.trace(op, samples=4), rel=1e-8)
    lines = journal.read_bytes().split(b"\n")
    assert lines[0].startswith(f"{MAGIC} hessian ".encode()) and len(lines) == 4 + 2  # header, 4 probes, ''


@pytest.mark.slow
def test_a_sweep_of_the_previous_release_resumes_to_the_runs_of_a_fresh_sweep(there, tmp_path, capfd):
    folder = _copies(tmp_path / "old", "runs.csv", "runs.csv.settings.json")
    args = [*there.SWEEP, "--restarts", "2", "--out", folder / "sweep.csv", "--runs-out", folder / "runs.csv"]
    _one_line(*_cli(capfd, *_with(args, "--lr", "2e-3"))[::2], "lr 0.001 -> 0.002")
    code, stdout, err = _cli(capfd, *args)
    assert code == 0, err
    assert f"resuming from {folder / 'runs.csv'}: 1 of 2 runs already done" in stdout
    fresh = tmp_path / "fresh"
    assert _cli(capfd, *args[:-4], "--out", fresh / "sweep.csv", "--runs-out", fresh / "runs.csv")[0] == 0
    old = (LEGACY / "runs.csv").read_text().splitlines()
    assert (folder / "runs.csv").read_text().splitlines()[:2] == old  # the old run kept byte for byte

    def numbers(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(path))]
    assert numbers(folder / "runs.csv") == numbers(fresh / "runs.csv")


def test_a_fisher_checkpoint_of_the_previous_release_resumes_to_a_fresh_fisher(there, tmp_path, capfd):
    from safetensors.torch import load_file

    fresh = tmp_path / "fresh.safetensors"
    assert _cli(capfd, *there.FISHER, "--out", fresh)[0] == 0
    out = _copies(tmp_path / "f", "fisher.safetensors.ckpt") / "fisher.safetensors"
    checkpoint = out.parent / "fisher.safetensors.ckpt"
    for flag, value, words in (("--batch-size", "4", "batch_size=2, this run has 4"),
                               ("--seq-len", "12", "seq_len was 16, now 12")):
        _one_line(*_cli(capfd, *_with(there.FISHER, flag, value), "--out", out)[::2], str(checkpoint), words)
        assert checkpoint.read_bytes() == (LEGACY / "fisher.safetensors.ckpt").read_bytes()  # untouched
    code, _, err = _cli(capfd, *there.FISHER, "--out", out)
    assert code == 0, err
    assert not checkpoint.exists()
    resumed, expected = load_file(str(out)), load_file(str(fresh))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)  # bit for bit
