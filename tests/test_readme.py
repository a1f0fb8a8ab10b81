"""The README's shell blocks name only what exists: every `landscape COMMAND` and its options are in
the parser, every repository path is in the repository, and the quick commands run.  Read from the
README itself, so an edit to it is checked without editing this file."""

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import landscape_cmd, subprocess_env

from landscape.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
REPO_DIRS = ("data", "benchmarks", "tests", "landscape", "docs", "figures")


def _shell_blocks(text):
    """The README's ```bash blocks and its untagged ``` blocks (the pipeline overview)."""
    return [m.group(2) for m in re.finditer(r"^```(bash|sh|)\n(.*?)^```", text, re.S | re.M)]


def _commands(block):
    """Each shell command line of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines += [part.strip() for part in re.split(r"&&|\|\||;|\|", line) if part.strip()]
    return lines


def _landscape_calls():
    """(command line, words after `landscape`) for every `landscape ...` call, $(...) ones included."""
    calls = []
    for block in _shell_blocks(README):
        for line in _commands(block):
            for inner in re.findall(r"\$\((landscape [^)]*)\)", line):
                calls.append((line, shlex.split(inner)[1:]))
            outer = re.sub(r"\$\([^)]*\)", "X", line)
            words = shlex.split(outer)
            if "landscape" in words:
                calls.append((line, words[words.index("landscape") + 1:]))
    return calls


PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
CALLS = _landscape_calls()


def test_the_readme_has_shell_blocks_to_check():
    assert len(CALLS) >= 15, CALLS


@pytest.mark.parametrize("line,words", CALLS, ids=[" ".join(w[:2]) for _, w in CALLS])
def test_each_landscape_call_names_a_command_and_its_options(line, words):
    assert words and words[0] in SUBCOMMANDS, f"`{line}`: no subcommand '{words[:1]}'"
    parser = SUBCOMMANDS[words[0]]
    known = {opt for action in parser._actions for opt in action.option_strings}
    named = {w.split("=", 1)[0] for w in words[1:] if w.startswith("--")}
    assert named <= known, f"`{line}`: unknown option(s) {sorted(named - known)} of `landscape {words[0]}`"


def _repo_paths():
    """Paths in the repository that the README names: in code blocks, inline code and links."""
    found = set(re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README))  # relative markdown links
    pattern = r"(?<![\w./$~-])((?:%s)/[\w./-]*\w)" % "|".join(REPO_DIRS)
    for chunk in _shell_blocks(README):
        found.update(re.findall(pattern, chunk))
    # Inline code names scripts and docs by their repository path; other inline paths (figures/...,
    # data/model/) may be the demo's outputs or a package folder, which the links and blocks cover.
    for chunk in re.findall(r"`([^`\n]+)`", README):
        found.update(p for p in re.findall(pattern, chunk) if p.endswith((".py", ".sh", ".md")))
    return sorted(p for p in found if "*" not in p and "{" not in p)


@pytest.mark.parametrize("path", _repo_paths())
def test_each_repository_path_exists(path):
    assert (ROOT / path).exists(), f"the README names {path}, which is not in the repository"


@pytest.mark.parametrize("words", [["--help"], ["where"], ["where", "--data-home"], ["demo", "--help"]],
                         ids=" ".join)
def test_quick_commands_run(words, tmp_path):
    done = subprocess.run(landscape_cmd(*words), capture_output=True, text=True,
                          env=subprocess_env(LANDSCAPE_DATA=str(tmp_path)), timeout=60)
    assert done.returncode == 0, done.stderr
    if words[:1] == ["where"]:
        assert str(tmp_path) in done.stdout  # the data home follows LANDSCAPE_DATA


def test_where_refuses_an_unbuilt_checkpoint_in_one_line(tmp_path):
    done = subprocess.run(landscape_cmd("where", "--checkpoint", "smollm2-135m-instruct"),
                          capture_output=True, text=True, env=subprocess_env(LANDSCAPE_DATA=str(tmp_path)), timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "data/build_checkpoints.py" in done.stderr


def test_where_prints_a_built_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    done = subprocess.run(landscape_cmd("where", "--checkpoint", "tiny"),
                          capture_output=True, text=True, env=subprocess_env(LANDSCAPE_DATA=str(tmp_path)), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(folder)


def test_where_in_a_wheel_says_how_to_get_the_build_script(capfd, monkeypatch, tmp_path):
    from conftest import cli_in_process

    from landscape import datahome

    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path))
    monkeypatch.setattr(datahome, "checkpoint_builder", lambda: None)  # as installed from a wheel: no data/
    code, out, err = cli_in_process(capfd, "where")
    assert code == 0 and "python data/build_checkpoints.py" not in out
    assert "wheel does not carry" in out and "clone" in out and "--model" in out, out
    code, out, err = cli_in_process(capfd, "where", "--checkpoint", "smollm2-135m-instruct")
    assert code == 2 and "python data/build_checkpoints.py" not in err and "wheel does not carry" in err, err


def test_where_in_a_clone_names_its_build_script(capfd, monkeypatch, tmp_path):
    from conftest import cli_in_process

    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path))
    code, out, _ = cli_in_process(capfd, "where")
    assert code == 0 and f"python {ROOT / 'data' / 'build_checkpoints.py'}" in out, out


def test_no_module_or_doc_points_at_a_design_file_outside_the_repository():
    # The design card is not part of the repository: code and docs point at docs/ instead.
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "landscape").rglob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "data").glob("*.py")]
    named = [str(p.relative_to(ROOT)) for p in texts if "DESIGN.md" in p.read_text()]
    assert named == [], named
