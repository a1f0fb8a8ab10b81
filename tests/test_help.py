"""``--help``: fast, and complete.  The top-level parser and every subcommand (read from the parser,
so a new one is covered without editing this file) answer without importing torch, transformers,
h5py or matplotlib, and every option says what it does and, where it has one, its default."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from landscape.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "h5py", "matplotlib")
# About 0.2 s on an idle machine; generous because other jobs may share this one's two cores.
HELP_SECONDS = 5.0

# `python -m landscape.cli ARGS` exactly as -m runs it (runpy), then the heavy modules it imported.
PROBE = """
import json, runpy, sys
sys.argv = ["landscape", *sys.argv[1:]]
try:
    runpy.run_module("landscape.cli", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as done:
    code = done.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
""".format(heavy=HEAVY)


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action, action.choices


PARSER, SUBPARSERS, SUBCOMMANDS = _subcommands()


def _no_default(value):
    return value is None or value is False or value is argparse.SUPPRESS


@pytest.mark.parametrize("command", [[]] + [[name] for name in SUBCOMMANDS], ids=lambda c: c[0] if c else "landscape")
def test_help_is_fast_and_imports_nothing_heavy(command):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *command, "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=subprocess_env(), timeout=60)
    seconds = time.perf_counter() - started
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, result.stderr
    assert result.stdout.startswith("usage: landscape"), result.stdout
    assert report["heavy"] == [], f"--help imported {report['heavy']}"
    assert "%%" not in result.stdout  # a description is not %-formatted: one % is written as one %
    assert seconds < HELP_SECONDS, f"{' '.join(command)} --help took {seconds:.1f} s"


def test_every_subcommand_has_a_summary():
    assert SUBPARSERS.help
    for pseudo in SUBPARSERS._choices_actions:
        assert pseudo.help and pseudo.help.strip(), pseudo.dest


@pytest.mark.parametrize("command", ["landscape", *SUBCOMMANDS])
def test_every_option_says_what_it_does_and_its_default(command):
    parser = PARSER if command == "landscape" else SUBCOMMANDS[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name}: no help text"
        text = formatter._expand_help(action)
        assert text.count("default:") <= 1, f"{command} {name}: the default is given twice: {text}"
        if action.option_strings and not _no_default(action.default):
            assert f"(default: {action.default})" in text, f"{command} {name}: default not shown: {text}"
