"""Progress (docs/outputs.md, "Progress"): a bar on a terminal; in a log file, whole lines at most every
30 s and one at the end, never carriage returns; ``--quiet`` on every command that shows progress.

Deterministic under load: the interval is tested on a fake clock, and each subprocess writes its
stderr to its own file.
"""

import argparse
import io
import os
import subprocess

import pytest
from conftest import landscape_cmd, subprocess_env

from landscape import progress
from landscape.cli import build_parser

SUBCOMMANDS = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
SAMPLE = ["--max-samples", "4", "--seq-len", "16", "--batch-size", "2", "--threads", "1"]


def _options(parser):
    return {opt for action in parser._actions for opt in action.option_strings}


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_log_lines_come_at_most_every_interval_and_once_at_the_end(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    bar = progress.LogLines(total=200, desc="fisher", unit="sample", file=out)
    for _ in range(200):  # one sample a second: 200 s
        clock.now += 1.0
        bar.update(1)
    bar.close()
    bar.close()  # a second close (a `with` after an explicit close) adds nothing
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in out.getvalue()
    lines = lines[:-1]
    assert len(lines) == 200 // 30 + 1, lines  # at 30, 60, ..., 180 s, and the end
    assert lines[0].startswith("fisher:  15% 30/200") and lines[-1].startswith("fisher: 100% 200/200"), lines


def test_log_lines_of_a_resumed_bar_count_from_where_it_resumed(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    with progress.LogLines(total=10, initial=6, desc="fisher", unit="sample", file=out) as bar:
        clock.now += 2.0
        bar.update(4)
    assert out.getvalue().startswith("fisher: 100% 10/10") and out.getvalue().count("\n") == 1


def test_a_bar_that_an_error_ends_writes_no_last_line(monkeypatch):
    # A refusal is one line in a log: no progress line just before it.
    out = io.StringIO()
    with pytest.raises(ValueError):
        with progress.LogLines(total=5, file=out) as bar:
            bar.update(2)
            raise ValueError("refused")
    bar = progress.LogLines(total=5, file=out)
    with pytest.raises(ValueError):
        try:
            bar.update(2)
            raise ValueError("refused")
        finally:
            bar.close()
    assert out.getvalue() == ""


def test_a_short_bar_that_is_not_kept_writes_nothing_and_a_long_one_its_last_line_too(monkeypatch):
    # As on a terminal, where such a bar clears itself: a quick command's log holds only what it wrote.
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    with progress.LogLines(total=5, leave=False, file=out) as bar:
        clock.now += 29.0
        bar.update(5)
    assert out.getvalue() == ""
    with progress.LogLines(total=5, leave=False, file=out) as bar:
        clock.now += 31.0
        bar.update(4)
        bar.update(1)
    assert [line[:9] for line in out.getvalue().splitlines()] == [" 80% 4/5 ", "100% 5/5 "]


def test_a_bar_that_counted_nothing_writes_nothing():
    out = io.StringIO()
    progress.LogLines(total=5, file=out).close()
    assert out.getvalue() == ""


def test_off_a_terminal_a_bar_is_log_lines_and_quiet_is_nothing(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    assert isinstance(progress.bar(total=3), progress.LogLines)
    with progress.quiet():
        assert progress.is_quiet() and getattr(progress.bar(total=3), "disable", False)
    assert not progress.is_quiet()
    assert getattr(progress.bar(total=3, enabled=False), "disable", False)


def test_quiet_turns_off_the_model_load_bar(monkeypatch, tmp_path):
    from landscape import models

    with open(tmp_path / "model.safetensors", "wb") as f:  # sparse: large weights without the disk
        f.truncate(models.LOAD_BAR_BYTES + 1)
    monkeypatch.setattr(models, "on_terminal", lambda: True)
    assert models._load_bar(str(tmp_path))
    with progress.quiet():
        assert not models._load_bar(str(tmp_path))
    monkeypatch.setattr(models, "on_terminal", lambda: False)
    assert not models._load_bar(str(tmp_path))  # a log gets no transformers bar either


@pytest.mark.parametrize("name", sorted(n for n, p in SUBCOMMANDS.items() if "--threads" in _options(p)))
def test_every_command_that_runs_a_model_takes_quiet(name):
    # Each of them shows progress: its stage's bar, or the model-load bar of large weights.
    assert "--quiet" in _options(SUBCOMMANDS[name]), name


def _run(tmp_path, name, *args):
    """A command with its stderr in a file, as in a log (not a terminal): (exit code, stderr text)."""
    log = tmp_path / f"{name}.stderr"
    with open(log, "w") as err:
        done = subprocess.run(landscape_cmd(*args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=err, timeout=300)
    return done.returncode, log.read_text()


@pytest.mark.slow  # real commands, each in its own process (about 35 s)
def test_a_log_file_gets_whole_progress_lines_and_quiet_gets_none(tiny_bert_dir, tiny_corpus_file, tmp_path):
    fisher = tmp_path / "F.safetensors"
    common = ["--model", tiny_bert_dir]
    # Seconds each: within the first 30 s, so the bars leave nothing in the log (tqdm wrote '\r' updates).
    code, err = _run(tmp_path, "fisher", "fisher", *common, "--corpus", tiny_corpus_file, *SAMPLE, "--out", fisher)
    assert code == 0 and err == "", repr(err)
    code, err = _run(tmp_path, "directions", "directions", *common, "--fisher", fisher, "--subset", "top:5",
                     "--threads", "1", "--out", tmp_path / "d.h5")
    assert code == 0 and err == "", repr(err)
    for name, args in {"directions": ["directions", *common, "--fisher", fisher, "--subset", "top:5", "--threads",
                                      "1", "--overwrite", "--out", tmp_path / "d.h5"],
                       "schedule": ["schedule", fisher, *common, "--threads", "1", "--out", tmp_path / "s.json"],
                       "surface": ["surface", "--directions", tmp_path / "d.h5", *common, "--corpus",
                                   tiny_corpus_file, *SAMPLE, "--x=-1:1:3", "--y=-1:1:3", "--out",
                                   tmp_path / "s.h5"]}.items():
        code, err = _run(tmp_path, f"{name}-quiet", *args, "--quiet")
        assert code == 0 and err == "", (name, err)
    assert os.path.getsize(tmp_path / "s.h5") > 0
