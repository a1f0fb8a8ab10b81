"""The command line: every contract subcommand exists, and bad input is one line, exit code 2,
no traceback and no partial output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_in_process, one_line, shown_lines

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ["fisher", "stability", "profile", "directions", "surface", "plot", "compare", "schedule",
            "finetune", "demo"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_help_lists_the_contract_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in CONTRACT:
        assert f"\n    {name}" in result.stdout, name


def test_console_script_is_installed():
    result = subprocess.run(["landscape", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("landscape ")


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def unknown_arch_dir(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    return folder


@pytest.fixture
def empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    return path


@pytest.mark.slow
def test_bad_inputs_end_in_one_line_and_leave_no_output(tmp_path, tiny_bert_dir, unknown_arch_dir, empty_corpus):
    out = tmp_path / "F.safetensors"
    cases = [
        (["--model", tmp_path / "missing_model/"], "does not exist"),
        (["--model", unknown_arch_dir], "unknown architecture"),
        (["--model", tiny_bert_dir, "--corpus", empty_corpus, "--seq-len", 32], "contains no text"),
        (["--model", tiny_bert_dir, "--corpus", tmp_path / "nowhere.txt", "--seq-len", 32], "does not exist"),
        (["--model", tiny_bert_dir, "--fraction", 1.5, "--seq-len", 32], "--fraction: must be a number in (0, 1]"),
        (["--model", tiny_bert_dir, "--fraction", 0, "--seq-len", 32], "--fraction: must be a number in (0, 1]"),
    ]
    for args, needle in cases:
        _assert_one_line_error(run_cli("fisher", *args, "--out", out, cwd=tmp_path), needle)
        assert not out.exists()
        assert list(tmp_path.glob(".F.safetensors*")) == []


def test_argparse_errors_are_one_line_too():
    _assert_one_line_error(run_cli("surface", "--directions", "d.h5", "--out", "s.h5", "--no-such-flag"),
                           "unrecognized arguments")


@pytest.fixture
def not_a_surface(tmp_path, monkeypatch):
    """`plot` of a file that is not HDF5: refused in one line, raised `from` h5py's OSError."""
    monkeypatch.delenv("LANDSCAPE_DEBUG", raising=False)
    surface = tmp_path / "S.h5"
    surface.write_bytes(b"not an HDF5 file")
    return ["plot", surface, "--out", tmp_path / "f.png"]


def test_debug_prints_a_refusal_s_traceback_before_its_one_line(not_a_surface, capfd, monkeypatch):
    code, _, err = cli_in_process(capfd, *not_a_surface)
    line = one_line(code, err, "landscape plot: error:", "is not an HDF5 file")
    for argv, env in (["--debug", *not_a_surface], "0"), ([*not_a_surface, "--debug"], ""), (not_a_surface, "1"):
        monkeypatch.setenv("LANDSCAPE_DEBUG", env)
        code, _, err = cli_in_process(capfd, *argv)
        assert code == 2, err
        lines = shown_lines(err)
        assert lines[0] == "Traceback (most recent call last):" and lines[-1] == line, err
        assert "OSError" in err and "landscape.errors.UsageError" in err, err  # and the error it came from
    monkeypatch.setenv("LANDSCAPE_DEBUG", "0")
    one_line(*cli_in_process(capfd, *not_a_surface)[::2])


def test_a_crash_is_python_s_traceback_with_or_without_debug(not_a_surface, capfd, monkeypatch):
    import landscape.plots

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(landscape.plots, "plot", crash)
    for argv in (not_a_surface, ["--debug", *not_a_surface]):
        with pytest.raises(RuntimeError, match="a bug"):  # uncaught: Python prints it and exits 1
            cli_in_process(capfd, *argv)
